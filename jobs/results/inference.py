"""Load what a run produced (base + its trained state) and generate text from it or a base model.

Every load of a run is checked against the trained model's fingerprint (jobs/training/fingerprint.py):
the playground, ``studio generate`` and every export use only a model that computes what the
trained one computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.base import Context
from jobs.training import fingerprint, models
from jobs.data.examples import prompt_ids
from adapters.core.errors import StudioError
from jobs.runfolder import COMPLETED, RunFolder, read_run
from jobs.spec import JobSpec, parse_spec


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    spec: JobSpec | None
    method: object | None
    # The reload's check against the trained fingerprint (None for a base model).
    check: dict | None = None


def is_run(path: str | Path) -> bool:
    return RunFolder(path).run_file.is_file()


def run_spec(run_dir: Path) -> JobSpec:
    run = read_run(run_dir)
    if run is None:
        raise StudioError("not a run folder (no run.json).", str(run_dir), "pass the output_dir of a training run.")
    if run.get("status") != COMPLETED or not RunFolder(run_dir).adapter_dir.is_dir():
        raise StudioError(f"the run has status {run.get('status')!r}; only completed runs have a result.",
                          str(run_dir), "resume or retry the run first.")
    return parse_spec(run["spec"], where=str(RunFolder(run_dir).run_file))


def trained_dtype(run_dir: Path) -> torch.dtype:
    """The compute dtype the run trained in (run.json's ``dtype``); fp32 when unknown."""
    found = getattr(torch, str((read_run(run_dir) or {}).get("dtype") or "float32"), None)
    return found if isinstance(found, torch.dtype) else torch.float32


def load_run(run_dir: str | Path, device: torch.device | None = None, require_fingerprint: bool = False,
             no_fingerprint: bool = False) -> Loaded:
    """Fresh base model + the run's saved state, computing in fp32, checked against the fingerprint.

    Exports pass ``require_fingerprint``: a run without a readable fingerprint then refuses unless
    ``no_fingerprint`` (the user's explicit flag). Other loads (the playground, evaluation) go on
    and their ``check`` says the run was not checked.

    The base loads in the dtype it trained in (a bf16 run's frozen weights are the bf16 copy),
    then everything is upcast, which is exact: the weights are those that trained.
    """
    run_dir = Path(run_dir)
    spec = run_spec(run_dir)
    method, cfg = spec.method_config()
    device = device or torch.device("cpu")
    src = models.resolve(spec.model)
    tokenizer = models.load_tokenizer(src, spec.trust_remote_code)
    base_dtype = models.frozen_base_dtype(method, trained_dtype(run_dir))
    base = models.load_model(src, base_dtype, spec.trust_remote_code, tokenizer).to(device)
    ctx = Context(spec=spec, device=device, dtype=torch.float32, tokenizer=tokenizer)
    model = fingerprint.upcast(method.load(base, RunFolder(run_dir).adapter_dir, cfg, ctx).to(device)).eval()
    check = fingerprint.check(method, model, run_dir, "the reloaded run",
                              "the base model or the run folder changed since training (check that model "
                              f"{spec.model!r} is the one the run trained on), or retrain the run.",
                              no_fingerprint=no_fingerprint, required=require_fingerprint)
    return Loaded(model, tokenizer, spec, method, check)


def load_any(ref: str, device: torch.device | None = None) -> Loaded:
    """A run folder, or anything a spec's ``model`` accepts."""
    if is_run(ref):
        return load_run(ref, device)
    src = models.resolve(ref)
    tokenizer = models.load_tokenizer(src)
    model = models.load_model(src, torch.float32).to(device or torch.device("cpu")).eval()
    return Loaded(model, tokenizer, None, None)


@torch.no_grad()
def generate_text(loaded: Loaded, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0) -> str:
    tok, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tok, prompt)], device=device)
    sampling = temperature > 0
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=sampling, temperature=temperature if sampling else None, top_p=None, top_k=None,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
