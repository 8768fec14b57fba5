"""Export a run: the merged standalone model, or the adapter alone. Reads only the run folder.

After merging, logits of the merged and unmerged model are compared on a few rows of the
run's data; the export is refused (nothing written) when they differ by more than the
method's own tolerance (relative to the largest logit).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from jobs.data import encode, read_rows
from jobs.errors import CannotMerge, StudioError
from jobs.inference import load_run, run_spec
from jobs.runfolder import replace_dir_atomic

PROBE_TEXT = "The studio checks that merging changed nothing: one, two, three, four, five."


def _check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise StudioError("export folder exists and is not empty.", str(out), "choose a new folder or empty it.")


def probe_batches(loaded, n_rows: int = 4) -> list[torch.Tensor]:
    """A few token sequences from the run's own data (or a fixed text when it is gone)."""
    spec, tok = loaded.spec, loaded.tokenizer
    try:
        train, evals, fmt = read_rows(spec.dataset, spec.training.seed)
        rows = (evals or train)[:n_rows]
        examples = encode(rows, fmt, tok, min(spec.training.max_seq_len, 256), spec.dataset.path)
        return [torch.tensor([e.input_ids]) for e in examples]
    except StudioError:
        return [torch.tensor([tok(PROBE_TEXT)["input_ids"]])]


@torch.no_grad()
def _logits(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=b, attention_mask=torch.ones_like(b)).logits.float() for b in batches]


def export_merged(run_dir: str | Path, out: str | Path) -> dict:
    run_dir, out = Path(run_dir), Path(out)
    spec = run_spec(run_dir)
    method, _ = spec.method_config()
    if method.merge_blocker:
        raise CannotMerge(method.merge_blocker, f"{run_dir} (method {method.name})",
                          f"export the adapter instead: studio export {run_dir} --adapter OUT.")
    _check_out(out)
    loaded = load_run(run_dir)
    probes = probe_batches(loaded)
    before = _logits(loaded.model, probes)
    merged = method.merge(loaded.model)
    after = _logits(merged, probes)
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after))
    # fp32 rounding grows with the logits' magnitude (a real 49k-vocabulary model reaches
    # |logit| ~ 30), so the method's tolerance applies per unit of the largest logit.
    scale = max(1.0, max(float(b.abs().max()) for b in before))
    allowed = method.merge_tolerance * scale
    leftovers = [n for n, _ in merged.named_modules() if "lora_" in n or "ia3_" in n or "base_layer" in n]
    if leftovers:
        raise RuntimeError(f"merged model still holds adapter modules: {leftovers[:3]}")
    if diff > allowed:
        raise StudioError(f"merged and unmerged logits differ by {diff:.3g}, more than {method.name}'s tolerance "
                          f"{method.merge_tolerance:g} x largest logit {scale:.3g}; nothing was written.", str(run_dir),
                          "export the adapter instead and report this run.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        replace_dir_atomic(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(out), "method": method.name, "max_abs_logit_diff": diff, "max_abs_logit": scale,
            "allowed_diff": allowed, "probe_rows": len(probes)}


def export_adapter(run_dir: str | Path, out: str | Path) -> dict:
    run_dir, out = Path(run_dir), Path(out)
    spec = run_spec(run_dir)
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        shutil.copytree(run_dir / "adapter", tmp, dirs_exist_ok=True)
        if out.exists():
            out.rmdir()
        replace_dir_atomic(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(out), "method": spec.method_name}


def export_quantized(run_dir: str | Path, out: str | Path) -> dict:
    """The run's quantized model (integer codes + scales + zeros), for methods whose result is one."""
    run_dir = Path(run_dir)
    method, _ = run_spec(run_dir).method_config()
    export = getattr(method, "export_quantized", None)
    if export is None:
        from adapters import METHODS

        able = [name for name, m in METHODS.items() if hasattr(m, "export_quantized")]
        raise StudioError(f"method {method.name} has no quantized form to export.", f"{run_dir} (method {method.name})",
                          f"use --merged or --adapter instead; quantized export exists for: {', '.join(able)}.")
    return export(run_dir, Path(out))
