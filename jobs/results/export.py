"""Export a run: the merged standalone model, the adapter alone, or the quantized model.
Reads only the run folder.

Every export is checked against the trained model's fingerprint (jobs/training/fingerprint.py): the
reloaded run, and the merged or quantized model itself, must compute the logits the trained
model computed, within the method's tolerance (relative to the largest logit). The report
gives the largest difference as ``max_abs_logit_diff_vs_trained``; past the tolerance, or
not finite, the export is refused and nothing is written. Merged and quantized exports are
also compared with the unmerged reload (``max_abs_logit_diff``). A run without a readable
fingerprint (made before they existed, or its files lost) is refused unless the caller passes
``no_fingerprint=True`` (``studio export --no-fingerprint``); the report then says it was not
checked against the trained model.

Merged models are written in fp32 whatever the run computed in: a quantized base is expanded
to fp32 and the adapter's update added in fp32, so the merged model multiplies by the weights
the fp32 check of the trained model used, and merging adds only summation-order rounding.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from jobs.data.examples import encode, read_rows
from adapters.core.errors import CannotMerge, StudioError
from adapters.quant.export import save_quantized
from jobs.training import fingerprint
from jobs.results.inference import load_run, run_spec, trained_dtype
from jobs.runfolder import RunFolder, replace_dir_atomic

PROBE_TEXT = "The studio checks that merging changed nothing: one, two, three, four, five."


def check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise StudioError("export folder exists and is not empty.", str(out), "choose a new folder or empty it.")


def write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder, then move it into place: never a half-written export."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            out.rmdir()  # empty, checked before
        replace_dir_atomic(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@torch.no_grad()
def logits_of(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=b, attention_mask=torch.ones_like(b)).logits.float() for b in batches]


def compare_or_refuse(method, before: list[torch.Tensor], after: list[torch.Tensor], run_dir: Path,
                      what: str, fix: str) -> dict:
    """Largest logit difference over every probe; refuse (StudioError) past the method's tolerance.

    fp32 rounding grows with the logits' magnitude (a real 49k-vocabulary model reaches
    |logit| ~ 30), so the method's tolerance applies per unit of the largest logit. A NaN or
    infinite logit in any probe refuses (``fingerprint.difference``).
    """
    diff = fingerprint.difference(before, after)
    whose = f"{method.name}'s tolerance"
    if not diff.within(method.merge_tolerance):
        raise StudioError(f"{what} differ: the largest difference {diff.why(method.merge_tolerance, whose)}; "
                          "nothing was written.", str(run_dir), fix)
    return {"max_abs_logit_diff": diff.max_abs, "max_abs_logit": diff.scale,
            "allowed_diff": method.merge_tolerance * diff.scale, "probe_rows": len(before)}


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


@dataclass
class MergedRun:
    loaded: object                 # the run as loaded (tokenizer, spec, method)
    model: torch.nn.Module         # the merged model
    probes: list[torch.Tensor]     # token rows the merge was checked on
    check: dict                    # merged-vs-unmerged logit difference


def mergeable_method(run_dir: Path):
    """The run's method, or CannotMerge with the method's reason: checked before anything is loaded."""
    method, _ = run_spec(run_dir).method_config()
    if method.merge_blocker:
        raise CannotMerge(method.merge_blocker, f"{run_dir} (method {method.name})",
                          f"export the adapter instead: studio export {run_dir} --adapter OUT.")
    return method


def merge_checked(run_dir: Path, no_fingerprint: bool = False, require_fingerprint: bool = True) -> MergedRun:
    """Load a run, merge it and refuse when merging changed its logits: what every merged export starts from.
    A run without a readable fingerprint refuses unless ``no_fingerprint``; evaluation, which writes no
    model, passes ``require_fingerprint=False`` and goes on as the playground does (see ``load_run``)."""
    method = mergeable_method(run_dir)
    loaded = load_run(run_dir, require_fingerprint=require_fingerprint, no_fingerprint=no_fingerprint)
    probes = probe_batches(loaded)
    before = logits_of(loaded.model, probes)
    merged = method.merge(loaded.model)
    leftovers = [n for n, _ in merged.named_modules() if any(part in n for part in method.merged_away)]
    if leftovers:
        raise RuntimeError(f"merged model still holds adapter modules: {leftovers[:3]}")
    check = compare_or_refuse(method, before, logits_of(merged, probes), run_dir, "merged and unmerged logits",
                              "export the adapter instead and report this run.")
    # The merged model answers for the trained one: every merged format (safetensors, GGUF) is
    # checked against the run's fingerprint before anything is written.
    trained = check_trained(method, merged, run_dir, "the merged model", loaded.check)
    return MergedRun(loaded, merged, probes, {"method": method.name, **check, **trained,
                                              **merged_dtype(merged, run_dir, {**check, **trained})})


def merged_dtype(merged: torch.nn.Module, run_dir: Path, check: dict) -> dict:
    """The merged model's dtype, the run's, and what the measured differences mean, for the report."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in merged.parameters() if p.is_floating_point()})
    trained = str(trained_dtype(run_dir)).removeprefix("torch.")
    note = (f"merged in {'/'.join(dtypes)} (a quantized base expanded to fp32 and the adapter's update added in "
            f"fp32; the run computed in {trained}): its logits differ from the unmerged run's by "
            f"{check['max_abs_logit_diff']:.2g}, {check['max_abs_logit_diff'] / check['max_abs_logit']:.1e} of the "
            "largest logit (fp32 summation order)")
    if check.get("max_abs_logit_diff_vs_trained") is not None:
        note += (f" and from the trained model's fingerprint by {check['max_abs_logit_diff_vs_trained']:.2g} "
                 f"(allowed {check['allowed_diff_vs_trained']:.2g})")
    else:
        note += "; it was NOT checked against the trained model (see fingerprint)"
    return {"merged_dtype": "/".join(dtypes), "trained_dtype": trained, "merge_note": note + "."}


def export_merged(run_dir: str | Path, out: str | Path, no_fingerprint: bool = False) -> dict:
    """The merged model as a safetensors folder plain transformers loads (fp32, see ``merged_dtype``)."""
    run_dir, out = Path(run_dir), Path(out)
    mergeable_method(run_dir)
    check_out(out)
    result = merge_checked(run_dir, no_fingerprint)

    def write(folder: Path) -> None:
        result.model.save_pretrained(folder, safe_serialization=True)
        result.loaded.tokenizer.save_pretrained(folder)
    write_atomically(out, write)
    return {"path": str(out), **result.check}


def check_trained(method, model, run_dir: Path, what: str, reload: dict | None) -> dict:
    """``model`` against the fingerprint; the report keeps the larger of its and the reload's difference.
    A reload that was not checked (``no_fingerprint``) leaves the model unchecked too, and says so."""
    if reload is not None and reload.get("fingerprint_checked") is False:
        return dict(reload)
    got = fingerprint.check(method, model, run_dir, what,
                            "nothing was written; export the adapter instead and report this run.")
    reloaded = (reload or {}).get("max_abs_logit_diff_vs_trained")
    if got["max_abs_logit_diff_vs_trained"] is not None and reloaded is not None:
        got = {**got, "max_abs_logit_diff_vs_trained": max(got["max_abs_logit_diff_vs_trained"], reloaded),
               "reload_diff_vs_trained": reloaded}
    return got


def export_adapter(run_dir: str | Path, out: str | Path, no_fingerprint: bool = False) -> dict:
    """The adapter folder as the run wrote it, once the run, reloaded from it, matches the fingerprint."""
    run_dir, out = Path(run_dir), Path(out)
    spec = run_spec(run_dir)
    check_out(out)
    # Refuses (nothing written) when base + adapter is not what trained, or nothing says what trained.
    loaded = load_run(run_dir, require_fingerprint=True, no_fingerprint=no_fingerprint)
    write_atomically(out, lambda folder: shutil.copytree(RunFolder(run_dir).adapter_dir, folder, dirs_exist_ok=True))
    return {"path": str(out), "method": spec.method_name, **loaded.check}


def export_quantized(run_dir: str | Path, out: str | Path, no_fingerprint: bool = False) -> dict:
    """The run's quantized model (integer codes + scales + zeros), for methods whose result is one:
    those declaring ``to_quantized(model)``. The folder's format is the integer grid's own
    (``adapters.quant.export``); the method only turns its trained model into grid layers."""
    run_dir, out = Path(run_dir), Path(out)
    method, _ = run_spec(run_dir).method_config()
    if method.to_quantized is None:
        from adapters import METHODS

        able = [name for name, m in METHODS.items() if m.to_quantized is not None]
        raise StudioError(f"method {method.name} has no quantized form to export.", f"{run_dir} (method {method.name})",
                          f"use --merged or --adapter instead; quantized export exists for: {', '.join(able)}.")
    check_out(out)
    loaded = load_run(run_dir, require_fingerprint=True, no_fingerprint=no_fingerprint)
    probes = probe_batches(loaded)
    before = logits_of(loaded.model, probes)
    quantized = method.to_quantized(loaded.model)
    check = compare_or_refuse(method, before, logits_of(quantized, probes), run_dir,
                              "the quantized model's logits and the trained model's",
                              "export the dequantized model (--merged) or the adapter instead, and report this run.")
    trained = check_trained(method, quantized, run_dir, "the quantized model", loaded.check)
    written: dict = {}
    write_atomically(out, lambda folder: written.update(save_quantized(quantized, folder, loaded.tokenizer, method.name)))
    return {"path": str(out), "method": method.name, **check, **trained, **written}
