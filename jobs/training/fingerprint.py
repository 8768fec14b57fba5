"""The trained model's fingerprint: its logits on a few fixed rows, recorded before anything is saved.

At the end of training the loop computes the logits of the model as it stands in memory on
the first few rows of the run's own data and writes them into the run folder with the rows
(``fingerprint.json``: token ids, positions, metadata; ``fingerprint.safetensors``: the
logits at those positions only, a few MB for a 49k vocabulary). Every later load of the run
(evaluation or the playground after a reload, and every export: adapter, merged, quantized)
computes the same logits and is refused when it differs by more than the method's tolerance,
so that what is exported is the model that trained, not one rebuilt from something else (a
re-quantized base, a base in another dtype, a broken merge).

The logits are computed in fp32 arithmetic on both sides: the trained model's frozen tensors
are upcast first (bf16 -> fp32 is exact, so the weights are the same), and a reload loads the
base in the dtype it trained in and upcasts it the same way. A bf16 forward would differ
from an fp32 one by about 3% of the largest logit on SmolLM2, which would hide the drifts
this check is for.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.core.errors import StudioError

META, LOGITS = "fingerprint.json", "fingerprint.safetensors"
PROBE_ROWS = 4       # rows of the run's data (held-out rows first)
POSITIONS = 4        # logits kept per row: evenly spread over its trained positions
# The smallest tolerance any method gets, per unit of the largest logit: fp32 summation-order
# differences between two computations of the same weights (peft layers against merged ones,
# the loop's lean norm/MLP functions against the library's).
FLOOR = 1e-5
BEFORE = "this run was made before trained fingerprints existed, so it is not checked"


@dataclass
class Fingerprint:
    rows: list[list[int]]
    positions: list[list[int]]
    logits: torch.Tensor     # (sum of positions, vocabulary), fp32
    meta: dict


def tolerance(method) -> float:
    """The method's declared ``fingerprint_tolerance`` (per unit of the largest logit), else its merge
    tolerance: a merged export is compared with the fingerprint too, so merging's rounding must pass."""
    declared = method.fingerprint_tolerance
    return max(float(method.merge_tolerance if declared is None else declared), FLOOR)


def trained_positions(labels: list[int], k: int = POSITIONS) -> list[int]:
    """Up to k positions whose logits predict a trained token, evenly spread; else the last position."""
    found = [i for i in range(len(labels) - 1) if labels[i + 1] != -100]
    if not found:
        return [len(labels) - 1]
    if len(found) <= k:
        return found
    return [found[round(j * (len(found) - 1) / (k - 1))] for j in range(k)] if k > 1 else found[-1:]


def upcast(model: torch.nn.Module) -> torch.nn.Module:
    """fp32 arithmetic on the same weights: float tensors to fp32 (exact from bf16/fp16), and layers
    that carry their own compute dtype (bitsandbytes' 4-bit layers) compute in fp32 too."""
    model.float()
    for module in model.modules():
        if isinstance(getattr(module, "compute_dtype", None), torch.dtype):
            module.compute_dtype = torch.float32
    return model


@torch.no_grad()
def probe_logits(model: torch.nn.Module, rows: list[list[int]], positions: list[list[int]]) -> torch.Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.autocast(device.type, enabled=False):
            for ids, pos in zip(rows, positions):
                x = torch.tensor([ids], device=device)
                logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0]
                out.append(logits[pos].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def record(model: torch.nn.Module, examples, run_dir: Path, meta: dict) -> dict:
    """Write the fingerprint of ``model`` (upcast in place: call it when training is over)."""
    from safetensors.torch import save_file

    chosen = examples[:PROBE_ROWS]
    rows = [list(e.input_ids) for e in chosen]
    positions = [trained_positions(e.labels) for e in chosen]
    info = {**meta, "computed_in": "float32", "rows": rows, "positions": positions}
    try:
        logits = probe_logits(upcast(model), rows, positions)
    except torch.OutOfMemoryError:
        # Upcasting a large bf16 base may not fit on a full GPU: losing the trained result over its
        # fingerprint would be worse than a run whose later loads say they are unchecked.
        info["skipped"] = "the fp32 copy of the model did not fit in memory when training ended"
    else:
        info.update(max_abs_logit=float(logits.abs().max()), finite=bool(torch.isfinite(logits).all()))
        save_file({"logits": logits.contiguous()}, str(Path(run_dir) / LOGITS))
    (Path(run_dir) / META).write_text(json.dumps(info) + "\n", encoding="utf-8")
    return info


def read(run_dir: Path) -> Fingerprint | None:
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not (run_dir / META).is_file() or not (run_dir / LOGITS).is_file():
        return None
    meta = json.loads((run_dir / META).read_text(encoding="utf-8"))
    return Fingerprint(meta["rows"], meta["positions"], load_file(str(run_dir / LOGITS))["logits"], meta)


def _skipped(run_dir: Path) -> str | None:
    path = Path(run_dir) / META
    return json.loads(path.read_text(encoding="utf-8")).get("skipped") if path.is_file() else None


def check(method, model: torch.nn.Module, run_dir: Path, what: str, fix: str) -> dict:
    """Compare ``model`` (fp32) with the run's fingerprint; refuse past the method's tolerance.

    A NaN or infinite difference never passes (``not diff <= allowed``). A run without a
    fingerprint (made before they existed) passes with the reason in the report.
    """
    fp = read(run_dir)
    if fp is None:
        skipped = _skipped(run_dir)
        return {"max_abs_logit_diff_vs_trained": None,
                "fingerprint": f"not recorded ({skipped}), so not checked" if skipped else BEFORE}
    got = probe_logits(model, fp.rows, fp.positions)
    if got.shape != fp.logits.shape:
        raise StudioError(f"{what} is not the model that trained: its logits on the fingerprint's rows have shape "
                          f"{tuple(got.shape)}, the trained model's {tuple(fp.logits.shape)} (another vocabulary?).",
                          str(run_dir), fix)
    diff = float((got - fp.logits).abs().max())
    scale = max(1.0, fp.meta["max_abs_logit"])
    allowed = tolerance(method) * scale
    if not diff <= allowed:
        why = ("is not finite" if not math.isfinite(diff)
               else f"is {diff:.3g}, more than {method.name}'s tolerance {tolerance(method):g} x largest logit "
                    f"{scale:.3g} = {allowed:.3g}")
        raise StudioError(f"{what} is not the model that trained: the largest logit difference from the trained "
                          f"model's fingerprint on {len(fp.rows)} of the run's rows {why}.",
                          str(run_dir), fix)
    return {"max_abs_logit_diff_vs_trained": diff, "allowed_diff_vs_trained": allowed,
            "fingerprint_rows": len(fp.rows)}
