"""The model work the web process hands off: every function here may import torch.

The studio's web process (``studio/``) never imports torch, transformers or peft; it asks
a model process (``jobs.engine.server``) to run one of these by name with JSON arguments, and
gets JSON back. Each task is a plain function so the CLI and tests can call it directly.

``TASKS`` is the whole list: a name not in it is refused by the engine.
"""
from __future__ import annotations

import gc
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

Progress = Callable[[dict], None]
CACHED_MODELS = 3     # playground models kept loaded; trying prompt after prompt loads each once
PREVIEW_ROWS = 3
LENGTH_SAMPLE = 2000  # rows tokenized for the dataset histogram; enough for its shape, quick on any file


def _quiet(_: dict) -> None:
    pass


# -- what the forms need: the registries, the devices, validation -------------------------------

def catalog(progress: Progress = _quiet) -> dict:
    """Every method and update rule as JSON: name, summary, its Config's JSON schema, and the
    attributes the forms show. The web process builds its forms from this (studio/catalog.py)."""
    from adapters import METHODS, UPDATE_RULES

    def entry(item) -> dict:
        return {"name": item.name, "summary": getattr(item, "summary", ""),
                "schema": item.Config.model_json_schema(),
                "suggested_lr": getattr(item, "suggested_lr", None),
                "merge_blocker": getattr(item, "merge_blocker", None)}

    return {"methods": [entry(m) for _, m in METHODS.items()],
            "rules": [entry(r) for _, r in UPDATE_RULES.items()],
            "devices": devices()}


def warm(progress: Progress = _quiet) -> None:
    """Import what estimates need, so the first one after the studio starts is not slow."""
    import adapters  # noqa: F401
    import jobs.estimate.estimator  # noqa: F401


def devices(progress: Progress = _quiet) -> list[dict]:
    import torch

    return [{"id": f"cuda:{i}", "name": torch.cuda.get_device_properties(i).name,
             "total_memory": int(torch.cuda.get_device_properties(i).total_memory)}
            for i in range(torch.cuda.device_count())]


def validate(data: dict, where: str = "spec", progress: Progress = _quiet) -> dict:
    """The spec as launch stores it (defaults filled in), or a StudioError saying what is wrong."""
    from jobs.spec import check_combination, parse_spec

    spec = parse_spec(data, where)
    check_combination(spec, where)
    return spec.resolved()


def check(data: dict, device: str = "cpu", where: str = "spec", progress: Progress = _quiet) -> dict:
    """Validate (errors raise), then estimate the peak memory (a failure is reported, not raised:
    the estimate is advice and must not block launching). The reason names the real cause."""
    import inspect

    from jobs.spec import parse_spec

    resolved = validate(data, where)
    try:
        from jobs.estimate.estimator import estimate

        spec = parse_spec(resolved, where)
        kwargs = {"device": device} if "device" in inspect.signature(estimate).parameters else {}
        result = estimate(spec, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported to the user with its type and message
        from adapters.core.errors import describe

        reason = describe(e)
        return {"resolved": resolved, "available": False, "reason": reason}
    return {"resolved": resolved, "available": True, "total_bytes": int(result["total_bytes"]),
            "breakdown": result.get("breakdown", {}), "peak_phase": result.get("peak_phase"),
            "assumptions": result.get("assumptions", []), "precision": result.get("precision")}


# -- the dataset preview ------------------------------------------------------------------

_tokenizers: OrderedDict[str, Any] = OrderedDict()


def _tokenizer(ref: str):
    from jobs.training import models

    if ref not in _tokenizers:
        _tokenizers[ref] = models.load_tokenizer(models.resolve(ref))
        while len(_tokenizers) > 4:
            _tokenizers.popitem(last=False)
    _tokenizers.move_to_end(ref)
    return _tokenizers[ref]


def preview(file: str, name: str, model_ref: str, max_seq_len: int, progress: Progress = _quiet) -> dict:
    """The first rows as token spans (trained or prompt) and the token lengths of up to LENGTH_SAMPLE rows."""
    from jobs.data.examples import encode, render_preview
    from jobs.data.rows import read_rows
    from jobs.spec import DatasetSpec

    rows, _, fmt = read_rows(DatasetSpec(path=file, eval_fraction=0.0))
    tok = _tokenizer(model_ref)
    shown = []
    for example in encode(rows[:PREVIEW_ROWS], fmt, tok, int(max_seq_len), name):
        trained = sum(1 for lab in example.labels if lab != -100)
        shown.append({"tokens": len(example.input_ids), "trained_tokens": trained,
                      "spans": render_preview(example, tok)})
    # Lengths without truncation, so the histogram shows what max_seq_len would cut.
    lengths = [len(e.input_ids) for e in encode(rows[:LENGTH_SAMPLE], fmt, tok, 10**9, name)]
    return {"format": fmt, "rows": shown, "lengths": lengths, "sampled": len(lengths),
            "over_max_seq_len": sum(n > max_seq_len for n in lengths)}


# -- the playground -------------------------------------------------------------------------

_models: OrderedDict[str, Any] = OrderedDict()


def _loaded(ref: str, progress: Progress):
    from jobs.results.inference import load_any

    if ref in _models:
        _models.move_to_end(ref)
        return _models[ref]
    progress({"message": f"loading {ref}"})
    _models[ref] = load_any(ref)
    while len(_models) > CACHED_MODELS:
        _models.popitem(last=False)
        gc.collect()
    return _models[ref]


def generate(targets: list[list[str]], prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             progress: Progress = _quiet) -> list[dict]:
    """One generation per ``[label, ref]`` target (a run folder or a base model reference)."""
    from jobs.results.inference import generate_text

    out = []
    for i, (label, ref) in enumerate(targets):
        progress({"message": f"generating with {label}", "done": i, "total": len(targets)})
        started = time.perf_counter()
        text = generate_text(_loaded(ref, progress), prompt, int(max_new_tokens), float(temperature))
        out.append({"label": label, "ref": ref, "output": text, "seconds": time.perf_counter() - started})
    return out


# -- export --------------------------------------------------------------------------------

def export(run_dir: str, kind: str, out: str, progress: Progress = _quiet, gguf_type: str = "f16") -> dict:
    """Write a run's merged model, adapter, or GGUF file (+ Modelfile) to the folder ``out``; the report."""
    from jobs.results.export import export_adapter, export_merged

    if kind == "gguf":
        from jobs.results.gguf import export_gguf

        progress({"message": f"exporting the merged model as {gguf_type} GGUF"})
        Path(out).mkdir(parents=True)
        return export_gguf(run_dir, Path(out) / f"{Path(out).name}.gguf", gguf_type)
    progress({"message": f"exporting the {kind} model" if kind == "merged" else "exporting the adapter"})
    return (export_merged if kind == "merged" else export_adapter)(run_dir, Path(out))


TASKS: dict[str, Callable[..., Any]] = {
    "warm": warm, "catalog": catalog, "devices": devices, "validate": validate, "check": check, "preview": preview,
    "generate": generate, "export": export,
}
