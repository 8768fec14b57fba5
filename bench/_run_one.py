"""One memory-ladder run in this process, so the peak it reports is that run's alone.

    python -m bench._run_one --worker train|inference IN.json OUT.json   (see bench.common)

``IN.json`` holds ``spec`` (a job spec dict) and ``scratch`` (a folder for the run). ``train``
trains through ``jobs.training.recipe.train`` exactly as ``studio train`` does. ``inference`` loads the
same model, tokenizer and data and runs the loss forward without gradients, twice (as a
MeZO step does), over the run's first batch: the floor every method is compared with.

The peak is the process's own (``bench.common.process_peak_memory``: VmHWM on Linux, the
CUDA allocator's peak on a GPU); the run's own record (run.json, ``jobs.training.memory``) is kept
beside it. At each phase boundary (setup: imports, tokenizer, data; load; apply: method and
update rule; each step; checkpoint; eval; adapter save) the peak so far and the current
resident memory are noted: the phase where the peak grows is where it lies. With
``phases: true`` the peak is also reset at each boundary (``/proc/self/clear_refs``), which
gives every phase its own peak; the run's record then covers only the last phase, so the
reported peak is the largest phase peak.
"""
from __future__ import annotations

import functools
import re
import time
from pathlib import Path

from bench.common import compute_device, merge, process_peak_memory, worker_main


def _status_bytes(field: str) -> int:
    status = Path("/proc/self/status")
    if not status.is_file():
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", status.read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


class Phases:
    """Named boundaries with the peak (VmHWM) and current (VmRSS) resident memory at each."""

    def __init__(self, reset: bool):
        self.reset = reset and Path("/proc/self/clear_refs").exists()
        self.marks: list[dict] = []
        self.started = time.perf_counter()

    def mark(self, ended: str) -> None:
        self.marks.append({"phase": ended, "peak_bytes": _status_bytes("VmHWM"), "rss_bytes": _status_bytes("VmRSS"),
                           "seconds": round(time.perf_counter() - self.started, 2)})
        if self.reset:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def peak(self, device: str) -> int:
        if device == "cpu" and self.reset:
            return max(m["peak_bytes"] for m in self.marks)
        return process_peak_memory(device)["peak_memory_bytes"]


def _around(owner, name: str, before=None, after=None, once: bool = False) -> None:
    """Wrap ``owner.name`` so ``before(args)`` and ``after(args)`` run around its (first) call."""
    original = getattr(owner, name)
    calls = [0]

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        active = not once or calls[0] == 1
        if active and before:
            before(args)
        result = original(*args, **kwargs)
        if active and after:
            after(args)
        return result

    setattr(owner, name, wrapper)


def base_weight_bytes(model) -> int:
    """Bytes of the weights that do not train, as the applied model holds them (quantized or not)."""
    from adapters.quant.targets import held_bytes

    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return held_bytes(model) - trained


def train_once(params: dict) -> dict:
    phases = Phases(params.get("phases", False))
    import jobs.training.recipe as train_mod
    import jobs.training.trainee as trainee_mod
    from jobs.training import checkpoint, models
    from jobs.spec import parse_spec

    spec = parse_spec(merge(params["spec"], {"output_dir": str(Path(params["scratch"]) / "run")}))
    device, _ = compute_device()
    held = {}
    _around(models, "load_model", before=lambda a: phases.mark("setup"), after=lambda a: phases.mark("load"))
    _around(trainee_mod, "token_loss_sum", once=True,
            before=lambda a: (phases.mark("apply"), held.setdefault("base", base_weight_bytes(a[0]))))
    _around(checkpoint, "save", after=lambda a: phases.mark("checkpoint"))
    _around(train_mod, "evaluate", after=lambda a: phases.mark("eval"))
    _around(train_mod, "_save_adapter", after=lambda a: phases.mark("adapter_save"))
    losses = []

    def progress(record: dict) -> None:
        if not record.get("event"):
            phases.mark(f"step{record['step']}")
            losses.append(record["loss"])

    run = train_mod.train(spec, resume=False, progress=progress)
    phases.mark("end")
    metrics = run.get("metrics", {})
    return {"status": run.get("status"), "device": device, "peak_memory_bytes": phases.peak(device),
            "recorded_peak_bytes": metrics.get("peak_memory_bytes"), "phases": phases.marks,
            "base_weight_bytes": held.get("base"), "trainable_params": metrics.get("trainable_params"),
            "total_params": metrics.get("total_params"), "losses": losses, "eval_loss": metrics.get("eval_loss")}


def inference_once(params: dict) -> dict:
    phases = Phases(params.get("phases", False))
    import torch

    import jobs.training.recipe  # noqa: F401  (the imports of a training process)
    from jobs.training import models
    from jobs.data.examples import collate, plan_batches, prepare
    from jobs.training.loss import token_loss_sum
    from jobs.spec import parse_spec
    from jobs.training.precision import pick_precision

    spec = parse_spec(merge(params["spec"], {"output_dir": str(Path(params["scratch"]) / "run")}))
    t = spec.training
    device_name, _ = compute_device()
    device = torch.device(device_name)
    dtype = pick_precision(t.precision, device)
    src = models.resolve(spec.model)
    tokenizer = models.load_tokenizer(src, spec.trust_remote_code)
    data = prepare(spec.dataset, tokenizer, t.max_seq_len, t.seed)
    first = plan_batches([len(e.input_ids) for e in data.train], t.batch_size, t.seed, 0)[0]
    batch = {k: v.to(device) for k, v in collate([data.train[i] for i in first], tokenizer.pad_token_id).items()}
    phases.mark("setup")
    model = models.load_model(src, dtype, spec.trust_remote_code).to(device)
    model.config.use_cache = False
    model.eval().requires_grad_(False)
    phases.mark("load")
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        losses = [float(token_loss_sum(model, batch, t.loss_chunk_tokens)[0]) for _ in range(2)]
    phases.mark("forward")
    return {"status": "completed", "device": device_name, "peak_memory_bytes": phases.peak(device_name),
            "phases": phases.marks, "base_weight_bytes": base_weight_bytes(model),
            "batch_shape": list(batch["input_ids"].shape), "losses": losses}


if __name__ == "__main__":
    worker_main({"train": train_once, "inference": inference_once})
