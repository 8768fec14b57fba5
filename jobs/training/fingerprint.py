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
from collections.abc import Sequence
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
BEFORE = "this run was made before trained fingerprints existed (its run.json records none)"
# What a refusal for a missing or unreadable fingerprint tells the user to do.
UNCHECKED_FIX = ("retrain the run to get a fingerprint, or, knowing that nothing will show whether the model is "
                 "the one that trained, pass --no-fingerprint (no_fingerprint=True): the report then says "
                 "it was not checked.")


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


@dataclass(frozen=True)
class Difference:
    """How far one model's logits are from a reference's, NaN-proof: any non-finite logit on
    either side makes ``max_abs`` NaN, and NaN is never ``within`` a bound."""
    max_abs: float        # largest |got - reference|; NaN when any logit is not finite
    scale: float          # max(1, largest |reference logit|); the unit bounds are given in
    top1_agreement: float  # fraction of positions whose highest logit is the same token
    positions: int
    nonfinite: int        # logits that are NaN or infinite, on both sides together

    @property
    def relative(self) -> float:
        return self.max_abs / self.scale

    def within(self, relative_bound: float) -> bool:
        """True only for a finite difference at most ``relative_bound`` x scale: NaN compares False
        with everything, so ``diff > bound`` alone would let it through."""
        return math.isfinite(self.max_abs) and math.isfinite(self.scale) and self.max_abs <= relative_bound * self.scale

    def why(self, relative_bound: float, bound_name: str = "the bound") -> str:
        """The failed comparison in words (for a refusal)."""
        if not math.isfinite(self.max_abs) or not math.isfinite(self.scale):
            return f"is not finite ({self.nonfinite} NaN or infinite logit{'' if self.nonfinite == 1 else 's'})"
        return (f"is {self.max_abs:.3g}, more than {bound_name} {relative_bound:g} x largest logit {self.scale:.3g} "
                f"= {relative_bound * self.scale:.3g}")


def difference(reference: torch.Tensor | Sequence[torch.Tensor], got: torch.Tensor | Sequence[torch.Tensor]) -> Difference:
    """Compare logits (one tensor, or one per probe row, last dimension the vocabulary) with a reference.

    Every probe counts: no Python ``max()`` over per-probe floats, which keeps or drops a NaN
    depending on where it stands. Shapes must match (ValueError otherwise)."""
    ref = [reference] if torch.is_tensor(reference) else list(reference)
    out = [got] if torch.is_tensor(got) else list(got)
    if len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out)):
        raise ValueError(f"logit shapes differ: {[tuple(a.shape) for a in ref]} against {[tuple(b.shape) for b in out]}")
    ref_flat = torch.cat([a.detach().float().reshape(-1, a.shape[-1]).cpu() for a in ref])
    got_flat = torch.cat([b.detach().float().reshape(-1, b.shape[-1]).cpu() for b in out])
    nonfinite = int((~torch.isfinite(ref_flat)).sum()) + int((~torch.isfinite(got_flat)).sum())
    if nonfinite or ref_flat.numel() == 0:
        max_abs = math.nan
    else:
        max_abs = float((got_flat - ref_flat).abs().max())
    scale = max(1.0, float(ref_flat.abs().max())) if ref_flat.numel() and not nonfinite else math.nan
    agree = int((ref_flat.argmax(-1) == got_flat.argmax(-1)).sum()) if not nonfinite else 0
    positions = ref_flat.shape[0]
    return Difference(max_abs, scale, agree / max(positions, 1), positions, nonfinite)


def _unreadable(run_dir: Path, err: Exception) -> StudioError:
    return StudioError(f"the run's trained fingerprint cannot be read ({type(err).__name__}: {err}).",
                       str(Path(run_dir) / META), UNCHECKED_FIX)


def read(run_dir: Path) -> Fingerprint | None:
    """The recorded fingerprint; None when its files are absent; StudioError when they cannot be read."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not (run_dir / META).is_file() or not (run_dir / LOGITS).is_file():
        return None
    try:
        meta = json.loads((run_dir / META).read_text(encoding="utf-8"))
        fp = Fingerprint(meta["rows"], meta["positions"], load_file(str(run_dir / LOGITS))["logits"], meta)
        float(meta["max_abs_logit"])
    except Exception as err:  # any damage: truncated JSON, a missing key, a broken safetensors header
        raise _unreadable(run_dir, err) from err
    if fp.logits.ndim != 2 or fp.logits.shape[0] != sum(len(p) for p in fp.positions) or len(fp.rows) != len(fp.positions):
        raise _unreadable(run_dir, ValueError(f"logits of shape {tuple(fp.logits.shape)} do not fit "
                                              f"{len(fp.rows)} rows and their positions"))
    return fp


def missing_reason(run_dir: Path) -> str:
    """Why a run has no fingerprint to check against: made before they existed, not recorded, or deleted."""
    from jobs.runfolder import read_run

    path = Path(run_dir) / META
    if path.is_file():
        try:
            skipped = json.loads(path.read_text(encoding="utf-8")).get("skipped")
        except (OSError, ValueError, AttributeError):
            skipped = None
        if skipped:
            return f"no fingerprint was recorded when training ended ({skipped})"
    if "fingerprint" not in (read_run(run_dir) or {}):
        return BEFORE
    return f"its fingerprint files ({META}, {LOGITS}) are missing from the run folder"


def unchecked(reason: str) -> dict:
    """The report of a model that was not compared with the trained one, saying so."""
    return {"max_abs_logit_diff_vs_trained": None, "fingerprint_checked": False,
            "fingerprint": f"NOT CHECKED against the trained model: {reason}"}


def require(run_dir: Path, what: str, no_fingerprint: bool = False) -> tuple[Fingerprint | None, dict | None]:
    """The run's fingerprint, or (with ``no_fingerprint``) None and the unchecked report; without the
    flag a missing or unreadable fingerprint refuses."""
    try:
        fp = read(run_dir)
    except StudioError as err:
        if not no_fingerprint:
            raise
        return None, unchecked(f"{err.what} (no_fingerprint was set)")
    if fp is not None:
        return fp, None
    reason = missing_reason(run_dir)
    if no_fingerprint:
        return None, unchecked(f"{reason} (no_fingerprint was set)")
    raise StudioError(f"{what} cannot be checked against the trained model: {reason}.", str(run_dir), UNCHECKED_FIX)


def compare(fp: Fingerprint, model: torch.nn.Module) -> Difference:
    return difference(fp.logits, probe_logits(model, fp.rows, fp.positions))


def check(method, model: torch.nn.Module, run_dir: Path, what: str, fix: str, no_fingerprint: bool = False,
          required: bool = True) -> dict:
    """Compare ``model`` (fp32) with the run's fingerprint; refuse past the method's tolerance.

    A NaN anywhere refuses (``Difference.within``). A missing or unreadable fingerprint refuses
    when ``required`` unless ``no_fingerprint``; either way the report says it was not checked.
    ``required=False`` serves loads that are not exports (the playground, evaluation)."""
    fp, report = require(run_dir, what, no_fingerprint or not required)
    if fp is None:
        return report
    got = probe_logits(model, fp.rows, fp.positions)
    if got.shape != fp.logits.shape:
        raise StudioError(f"{what} is not the model that trained: its logits on the fingerprint's rows have shape "
                          f"{tuple(got.shape)}, the trained model's {tuple(fp.logits.shape)} (another vocabulary?).",
                          str(run_dir), fix)
    diff = difference(fp.logits, got)
    whose = f"{method.name}'s tolerance"
    bound = tolerance(method)
    if not diff.within(bound):
        raise StudioError(f"{what} is not the model that trained: the largest logit difference from the trained "
                          f"model's fingerprint on {len(fp.rows)} of the run's rows "
                          f"{diff.why(bound, whose)}.", str(run_dir), fix)
    return {"max_abs_logit_diff_vs_trained": diff.max_abs, "allowed_diff_vs_trained": bound * diff.scale,
            "fingerprint_rows": len(fp.rows), "fingerprint_checked": True}
