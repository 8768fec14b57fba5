"""The training loop: one spec in, a run folder out. Reads top to bottom.

1. validate the spec and the data (before any weights load, before the run folder exists)
2. load the base model, apply the method, build the update rule
3. resume from the newest valid checkpoint when there is one
4. step: micro-batches -> update rule -> log; evaluate and checkpoint on schedule
5. evaluate, record the trained model's fingerprint (jobs/training/fingerprint.py), save the adapter,
   write run.json

Under torchrun each process takes every world-size-th row of each global micro-batch; the
loss is normalised by the trained-token count of the whole global step and gradients are
summed, so N processes compute the same update as one process with the same global batch.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from adapters.base import Context, decay_rule
from jobs.training import checkpoint, distributed, fingerprint, fused, memory, models
from jobs.training.precision import choose_precision, pick_device, source_shapes
from jobs.data.examples import collate, plan_batches, prepare
from adapters.core.errors import StudioError
from jobs.training.evaluate import evaluate
from jobs.training.loss import token_loss_sum
from jobs.training.memory import peak_memory
from jobs.runfolder import (CANCELLED, COMPLETED, FAILED, INTERRUPTED, RUNNER_FILES, RUNNING, RunFolder,
                            append_metrics, read_run, replace_dir_atomic, truncate_metrics, update_run)
from jobs.spec import JobSpec, TrainingSpec, check_combination
from jobs.training.trackers import NO_TRACKERS, Trackers

StopFn = Callable[[], bool]
ProgressFn = Callable[[dict], None]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def lr_at(step: int, peak: float, total: int, warmup: int, schedule: str) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule to 0."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(total - warmup, 1)
    if schedule == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def check_run_folder(run_dir: Path, spec: JobSpec, resume: bool) -> bool:
    """True when the folder holds an unfinished run of this same spec to continue."""
    run = read_run(run_dir)
    if run is None:
        if run_dir.exists() and any(p.name not in RUNNER_FILES for p in run_dir.iterdir()):
            raise StudioError("output folder is not empty and holds no run.", str(run_dir),
                              "choose a new output_dir (the studio never writes into other files).")
        return False
    if run.get("status") == COMPLETED:
        raise StudioError("output folder already holds a completed run.", str(run_dir),
                          "choose a new output_dir, or delete that run first.")
    if not resume:
        raise StudioError("output folder holds an unfinished run.", str(run_dir),
                          "resume it, or choose a new output_dir.")
    old, new = dict(run.get("spec") or {}), spec.resolved()
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise StudioError(f"the run in this folder was started with a different spec (differs in: {', '.join(diff)}).",
                          str(run_dir), "resume with the same spec, or choose a new output_dir.")
    return True


def train(spec: JobSpec, *, resume: bool = True, stop: StopFn | None = None,
          progress: ProgressFn | None = None) -> dict:
    world = distributed.setup()
    t = spec.training
    run_dir = Path(spec.output_dir)
    method, mcfg = spec.method_config()
    rule, rcfg = spec.optimizer_config()
    check_combination(spec)
    device = pick_device(world)

    # 1. Data first: a bad file must fail before minutes of model loading, and leave nothing behind.
    src = models.resolve(spec.model)
    precision = choose_precision(t.precision, device, source_shapes(src))  # auto: measured at the model's shapes
    dtype = precision.dtype
    tokenizer = models.load_tokenizer(src, spec.trust_remote_code)
    data = prepare(spec.dataset, tokenizer, t.max_seq_len, t.seed)
    continuing = check_run_folder(run_dir, spec, resume)
    trackers = NO_TRACKERS

    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        update_run(run_dir, status=RUNNING, error=None, spec=spec.resolved(), started_at=now(),
                   finished_at=None, model_source={"kind": src.kind, "path": src.path, "gguf_file": src.gguf_file},
                   data={"format": data.format, "train_rows": data.train_rows, "eval_rows": data.eval_rows},
                   world_size=world.size, device=str(device), dtype=str(dtype).removeprefix("torch."),
                   precision=precision.record())
    try:
        if world.main:  # a tracker that cannot start fails the job here, before the model loads
            trackers = Trackers.start(spec, run_dir)
        result = _train(spec, world, run_dir, method, mcfg, rule, rcfg, device, dtype, src, tokenizer, data,
                        continuing, stop, progress, trackers)
        trackers.close(result.get("status", "completed"))
    except BaseException as e:
        trackers.close("failed")
        if world.main:
            status = INTERRUPTED if isinstance(e, KeyboardInterrupt) else FAILED
            message = e.message if isinstance(e, StudioError) else f"{type(e).__name__}: {e}"
            update_run(run_dir, status=status, error=message, finished_at=now())
        raise
    finally:
        distributed.teardown()
    return result


@dataclass
class Trainee:
    """What a run trains: the model with its method applied, the lean functions' shared state
    (None when ``training.lean_activations`` is off), the trained parameters, the update rule,
    and the run's training settings, device and compute dtype."""
    model: torch.nn.Module
    lean: fused.SavedOutputs | None
    trainable: list[tuple[str, torch.nn.Parameter]]
    stepper: object
    training: TrainingSpec
    device: torch.device
    dtype: torch.dtype

    def autocast(self):
        """The context the model computes in: autocast to the compute dtype, none in fp32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def loss_fn(self, trained_tokens: int) -> Callable[[dict], torch.Tensor]:
        """A micro-batch's summed loss over ``trained_tokens``, the whole global step's count."""
        t = self.training

        def loss(batch: dict) -> torch.Tensor:
            with self.autocast():
                total, _ = token_loss_sum(self.model, batch, t.loss_chunk_tokens, self.lean, t.share_prefix)
            return total / max(trained_tokens, 1)
        return loss


def build_trainee(spec: JobSpec, method, mcfg, rule, rcfg, device: torch.device, dtype: torch.dtype, src,
                  tokenizer) -> Trainee:
    """Step 2 of a run: the base model loaded, the method applied, the update rule built, as a
    job does it (the speed benchmarks build their models here too). Frozen base weights may live
    in the compute dtype; trained weights stay fp32 (peft keeps adapters fp32; full fine-tuning
    keeps fp32 masters)."""
    t = spec.training
    model = models.load_model(src, models.frozen_base_dtype(method, dtype), spec.trust_remote_code,
                              tokenizer).to(device)
    model.config.use_cache = False
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ctx = Context(spec=spec, device=device, dtype=dtype, tokenizer=tokenizer,
                  all_reduce_grads=_sum_grads, all_reduce_mean=distributed.all_reduce_mean,
                  decays=decay_rule(method))
    _seed_everything(t.seed)
    loaded_bytes = memory.float_bytes(model)
    model = method.apply(model, mcfg, ctx).to(device)
    if memory.float_bytes(model) < loaded_bytes:  # the method replaced (quantized) base tensors
        memory.release_replaced_base(model, device)
    lean = fused.SavedOutputs() if t.lean_activations else None  # shared by the lean layers and the loss
    if lean is not None:
        fused.install(model, lean)
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise StudioError(f"method {method.name!r} left no parameter to train.", "method",
                          "check the method's target modules / patterns.")
    return Trainee(model, lean, trainable, rule.build(trainable, rcfg, ctx), t, device, dtype)


def _train(spec, world, run_dir, method, mcfg, rule, rcfg, device, dtype, src, tokenizer, data,
           continuing, stop, progress, trackers=NO_TRACKERS) -> dict:
    t = spec.training
    # 2. Model, method, update rule.
    trainee = build_trainee(spec, method, mcfg, rule, rcfg, device, dtype, src, tokenizer)
    model, trainable, stepper = trainee.model, trainee.trainable, trainee.stepper
    n_trainable = sum(p.numel() for _, p in trainable)
    n_total = sum(p.numel() for p in model.parameters())

    # The micro-batch stream: a pure function of (seed, epoch), so resume replays it exactly.
    lengths = [len(e.input_ids) for e in data.train]
    trained_counts = [e.trained for e in data.train]
    global_mb = t.batch_size * world.size
    per_epoch = len(plan_batches(lengths, global_mb, t.seed, 0))
    max_steps = t.max_steps or max(1, math.ceil(t.epochs * per_epoch / t.grad_accum))
    plans: dict[int, list[list[int]]] = {}

    def step_rows(step: int) -> list[list[int]]:
        rows = []
        for j in range(t.grad_accum):
            epoch, idx = divmod(step * t.grad_accum + j, per_epoch)
            if epoch not in plans:
                plans.clear()
                plans[epoch] = plan_batches(lengths, global_mb, t.seed, epoch)
            rows.append(plans[epoch][idx])
        return rows

    def to_batch(rows: list[int]) -> dict:
        return {k: v.to(device) for k, v in collate([data.train[i] for i in rows], tokenizer.pad_token_id).items()}

    autocast = trainee.autocast

    # 3. Resume.
    step, tokens_seen, trained_seen, train_seconds = 0, 0, 0, 0.0
    ckpt = checkpoint.latest_valid(run_dir) if continuing else None
    if ckpt is not None:
        saved, opt_state, state = checkpoint.load(ckpt)
        params = dict(trainable)
        missing = set(params) - set(saved)
        if missing:
            raise StudioError(f"checkpoint {ckpt.name} lacks trained tensors ({sorted(missing)[:3]}...).", str(ckpt),
                              "retry the job from scratch.")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name].to(p.dtype))
        stepper.load_state_dict(opt_state)
        step, tokens_seen, trained_seen = state["step"], state["tokens_seen"], state["trained_seen"]
        train_seconds = state["train_seconds"]
        _restore_rng(state.get("rng"))
        if world.main:
            truncate_metrics(run_dir, step)
            append_metrics(run_dir, {"event": "resumed", "step": step, "checkpoint": ckpt.name, "time": now()})

    def save_checkpoint() -> None:
        if world.main:
            checkpoint.save(run_dir, step, {n: p for n, p in trainable}, stepper.state_dict(),
                            {"tokens_seen": tokens_seen, "trained_seen": trained_seen,
                             "train_seconds": train_seconds, "rng": _rng_state()}, keep=t.keep_checkpoints)
        distributed.barrier()

    def run_eval() -> dict:
        metrics = {}
        if world.main:
            metrics = evaluate(model, tokenizer, data.eval, lambda ex: collate(ex, tokenizer.pad_token_id),
                               spec, device, autocast)
            append_metrics(run_dir, {"step": step, **metrics, "time": now()})
            trackers.log({"step": step, **metrics})
        distributed.barrier()
        return metrics

    if world.main:
        update_run(run_dir, step=step, max_steps=max_steps,
                   metrics={"trainable_params": n_trainable, "total_params": n_total})

    # 4. The loop.
    last_loss = None
    stopped = False
    while step < max_steps:
        if _should_stop(stop):
            stopped = True
            break
        started = time.perf_counter()
        global_rows = step_rows(step)
        step_trained = sum(trained_counts[i] for rows in global_rows for i in rows)
        step_tokens = sum(lengths[i] for rows in global_rows for i in rows)
        local = [rows[world.rank::world.size] for rows in global_rows]
        micro = [to_batch(rows) for rows in local if rows]

        lr = lr_at(step, rcfg.lr, max_steps, t.warmup_steps, t.lr_schedule)
        local_loss = stepper.step(micro, trainee.loss_fn(step_trained), lr)
        loss = float(_sum_scalar(local_loss))
        if not math.isfinite(loss):
            raise StudioError(f"the loss became {loss} at step {step + 1}.", "optimizer.lr",
                              "lower the learning rate, or use fp32 / bf16 instead of fp16.")
        elapsed = time.perf_counter() - started
        step += 1
        train_seconds += elapsed
        tokens_seen += step_tokens
        trained_seen += step_trained
        last_loss = loss
        if world.main and (step % t.log_every == 0 or step == max_steps):
            record = {"step": step, "loss": loss, "lr": lr, "tokens": step_tokens, "trained_tokens": step_trained,
                      "tokens_per_second": step_tokens / max(elapsed, 1e-9),
                      "trained_tokens_per_second": step_trained / max(elapsed, 1e-9),
                      "epoch": step * t.grad_accum / per_epoch, "time": now()}
            append_metrics(run_dir, record)
            trackers.log(record)
            update_run(run_dir, step=step, metrics={"train_loss": loss, "train_seconds": train_seconds,
                                                    "steps": step})
            if progress:
                progress({**record, "max_steps": max_steps})
        if t.eval_every and step % t.eval_every == 0 and step < max_steps:
            run_eval()
        if t.save_every and step % t.save_every == 0 and step < max_steps:
            save_checkpoint()

    # 5. Results.
    save_checkpoint()
    if stopped:
        if world.main:
            update_run(run_dir, status=CANCELLED, finished_at=now(), step=step)
        return read_run(run_dir) or {}
    final = run_eval()
    if world.main:
        peak = peak_memory(device)  # training's peak: the fingerprint below upcasts the frozen base
        # The model as it stands in memory, before anything is saved and loaded back.
        probe = fingerprint.record(model, data.eval or data.train, run_dir,
                                   {"method": method.name, "trained_dtype": str(dtype).removeprefix("torch.")})
        _save_adapter(method, model, tokenizer, run_dir)
        metrics = {"train_loss": last_loss, "steps": step, "train_seconds": train_seconds,
                   "tokens_seen": tokens_seen, "trained_tokens": trained_seen,
                   "tokens_per_second": tokens_seen / max(train_seconds, 1e-9),
                   "trained_tokens_per_second": trained_seen / max(train_seconds, 1e-9),
                   "trainable_params": n_trainable, "total_params": n_total,
                   **{k: v for k, v in final.items() if k != "samples"}, **peak}
        trackers.log({"step": step, **peak})
        if progress:
            progress({"event": "done", **metrics})
        return update_run(run_dir, status=COMPLETED, error=None, finished_at=now(), step=step, metrics=metrics,
                          samples=final.get("samples", []),
                          fingerprint={"files": [fingerprint.META, fingerprint.LOGITS], "rows": len(probe["rows"]),
                                       "max_abs_logit": probe.get("max_abs_logit"), "skipped": probe.get("skipped")})
    return {}


def _save_adapter(method, model, tokenizer, run_dir: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=run_dir))
    try:
        method.save(model, tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir_atomic(tmp, RunFolder(run_dir).adapter_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sum_grads(params: list[torch.nn.Parameter]) -> None:
    if not torch.distributed.is_initialized():
        return
    for p in params:
        if p.grad is None:  # a rank with no rows this step still joins the collective
            p.grad = torch.zeros_like(p)
    distributed.all_reduce_sum([p.grad for p in params])


def _sum_scalar(value: float) -> float:
    if not torch.distributed.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    distributed.all_reduce_sum([tensor])
    return float(tensor)


def _should_stop(stop: StopFn | None) -> bool:
    flag = bool(stop and stop())
    if torch.distributed.is_initialized():  # every rank must stop at the same step
        tensor = torch.tensor([1.0 if flag else 0.0])
        distributed.all_reduce_sum([tensor])
        flag = float(tensor) > 0
    return flag


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": json.dumps(random.getstate()), "torch": torch.get_rng_state().tolist()}


def _restore_rng(state: dict | None) -> None:
    if not state:
        return
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
