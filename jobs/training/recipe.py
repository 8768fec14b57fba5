"""The training recipe: one spec in, a run folder out. ``Recipe`` reads top to bottom:

1. ``setup``: validate the spec and the data (before any weights load, before the run folder
   exists), load the base model, apply the method, build the update rule, resume from the
   newest valid checkpoint when there is one
2. ``train``: step over micro-batches with the update rule, log, evaluate and checkpoint on
   schedule
3. ``finish``: evaluate, record the trained model's fingerprint (jobs/training/fingerprint.py),
   save the adapter, write run.json
4. ``cleanup``: close the trackers and leave the process group

Under torchrun each process takes every world-size-th row of each global micro-batch; the
loss is normalised by the trained-token count of the whole global step and gradients are
summed by the engine (jobs/training/engines.py: DDP, or FSDP2 for ``sharding: fsdp``), so N
processes compute the same update as one process with the same global batch.
"""
from __future__ import annotations

import gc
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable


from adapters.core.errors import StudioError, describe
from adapters.core.memory import HeapReturner
from jobs.data.examples import collate, prepare
from jobs.runfolder import (CANCELLED, COMPLETED, FAILED, INTERRUPTED, RUNNER_FILES, RUNNING, RunFolder,
                            append_metrics, read_run, replace_dir_atomic, truncate_metrics, update_run)
from jobs.spec import JobSpec, check_combination
from jobs.training import checkpoint, distributed, fingerprint, models
from jobs.training.evaluate import evaluate
from jobs.training.memory import peak_memory
from jobs.training.precision import choose_precision, pick_device, source_shapes
from jobs.training.schedule import StepPlan, lr_at, now
from jobs.training.trackers import NO_TRACKERS, Trackers
from jobs.training.engines import make_engine
from jobs.training.trainee import FILLER, build_trainee, whole_model

StopFn = Callable[[], bool]
ProgressFn = Callable[[dict], None]
__all__ = ["Recipe", "train", "check_run_folder"]


def train(spec: JobSpec, *, resume: bool = True, stop: StopFn | None = None,
          progress: ProgressFn | None = None) -> dict:
    """Run ``spec`` to its end (or to a stop) and return run.json's record."""
    recipe = Recipe(spec, stop, progress)
    try:
        recipe.setup(resume)
        stopped = recipe.train()
        return recipe.finish(stopped)
    except BaseException as e:
        recipe.fail(e)
        raise
    finally:
        recipe.cleanup()


class Recipe:
    """One fine-tune, as phases; its state (model, counters, run folder) lives on ``self``."""

    def __init__(self, spec: JobSpec, stop: StopFn | None = None, progress: ProgressFn | None = None):
        self.world = distributed.setup()
        self.spec, self.t = spec, spec.training
        self.stop, self.progress = stop, progress
        self.run_dir = Path(spec.output_dir)
        self.method, self.mcfg = spec.method_config()
        self.rule, self.rcfg = spec.optimizer_config()
        check_combination(spec)
        self.device = pick_device(self.world)
        self.src = models.resolve(spec.model)
        self.precision = choose_precision(self.t.precision, self.device, source_shapes(self.src))  # auto: measured
        self.dtype = self.precision.dtype
        self.engine = make_engine(self.t.sharding, self.world, self.device, self.dtype)
        self.trackers = NO_TRACKERS
        self.started = False  # run.json says running: a failure from here on is recorded there
        self.step = self.tokens_seen = self.trained_seen = 0
        self.train_seconds = 0.0
        self.last_loss: float | None = None

    # 1. Set-up -----------------------------------------------------------------------------
    def setup(self, resume: bool) -> None:
        spec, world = self.spec, self.world
        # Data first: a bad file must fail before minutes of model loading, and leave nothing behind.
        self.tokenizer = models.load_tokenizer(self.src, spec.trust_remote_code)
        self.data = prepare(spec.dataset, self.tokenizer, self.t.max_seq_len, self.t.seed)
        continuing = check_run_folder(self.run_dir, spec, resume)
        distributed.barrier()  # every rank has looked at the folder before rank 0 writes into it
        if world.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            src, data = self.src, self.data
            update_run(self.run_dir, status=RUNNING, error=None, spec=spec.resolved(), started_at=now(),
                       finished_at=None,
                       model_source={"kind": src.kind, "path": src.path, "gguf_file": src.gguf_file},
                       data={"format": data.format, "train_rows": data.train_rows, "eval_rows": data.eval_rows},
                       world_size=world.size, device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
                       precision=self.precision.record())
        self.started = True
        if world.main:  # a tracker that cannot start fails the job here, before the model loads
            self.trackers = Trackers.start(spec, self.run_dir)
        self.trainee = build_trainee(spec, self.method, self.mcfg, self.rule, self.rcfg, self.device, self.dtype,
                                     self.src, self.tokenizer, self.engine)
        self.model, self.stepper = self.trainee.model, self.trainee.stepper
        # Counted now: a sharded run lets go of its model before the final record.
        self.n_trainable = sum(p.numel() for _, p in self.trainee.trainable)
        self.n_total = sum(p.numel() for p in self.model.parameters())
        self.plan = StepPlan(self.data.train, self.t, world.size)
        if continuing:
            self.resume_from_checkpoint()
        installed = self.trainee.lean_installed
        # What every process installed (the fewest of each kind): a rank that silently trains
        # without them would otherwise show only in its memory.
        lean = dict(zip(installed, distributed.least(list(installed.values())))) if installed is not None else None
        if world.main:
            update_run(self.run_dir, step=self.step, max_steps=self.plan.max_steps, lean_functions=lean,
                       metrics={"trainable_params": self.n_trainable, "total_params": self.n_total})

    def resume_from_checkpoint(self) -> None:
        ckpt = checkpoint.latest_valid(self.run_dir)
        if ckpt is None:
            return
        self.restore_counters(self.engine.load_checkpoint(ckpt, self.trainee.trainable, self.stepper))
        if self.world.main:
            truncate_metrics(self.run_dir, self.step)
            append_metrics(self.run_dir, {"event": "resumed", "step": self.step, "checkpoint": ckpt.name,
                                          "time": now()})

    def restore_counters(self, state: dict) -> None:
        self.step, self.tokens_seen, self.trained_seen = state["step"], state["tokens_seen"], state["trained_seen"]
        self.train_seconds = state["train_seconds"]
        checkpoint.restore_rng(state.get("rng"))

    def counters(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "trained_seen": self.trained_seen,
                "train_seconds": self.train_seconds, "rng": checkpoint.rng_state()}

    # 2. The loop ---------------------------------------------------------------------------
    def train(self) -> bool:
        """Step until ``max_steps``; True when stopped early by a stop request."""
        t = self.t
        while self.step < self.plan.max_steps:
            if distributed.any_rank(bool(self.stop and self.stop())):  # every rank stops at the same step
                return True
            self.train_step()
            if t.eval_every and self.step % t.eval_every == 0 and self.step < self.plan.max_steps:
                self.evaluate()
            if t.save_every and self.step % t.save_every == 0 and self.step < self.plan.max_steps:
                self.save_checkpoint()
        return False

    def train_step(self) -> None:
        world, plan = self.world, self.plan
        started = time.perf_counter()
        global_rows = plan.step_rows(self.step)
        step_trained = plan.trained(global_rows)
        step_tokens = plan.tokens(global_rows)
        # Every process runs as many micro-batches as the others (the engines' collectives pair
        # up): one whose share of a micro-batch is empty runs a row of it with zero weight.
        micro = [self.to_batch(rows[world.rank::world.size]) if rows[world.rank::world.size]
                 else {**self.to_batch(rows[:1]), FILLER: True} for rows in global_rows]
        lr = lr_at(self.step, self.rcfg.lr, plan.max_steps, self.t.warmup_steps, self.t.lr_schedule)
        local_loss = self.stepper.step(micro, self.trainee.loss_fn(step_trained), lr)
        loss = float(distributed.sum_scalar(local_loss))
        if not math.isfinite(loss):
            raise StudioError(f"the loss became {loss} at step {self.step + 1}.", "optimizer.lr",
                              "lower the learning rate, or use fp32 / bf16 instead of fp16.")
        elapsed = time.perf_counter() - started
        self.step += 1
        self.train_seconds += elapsed
        self.tokens_seen += step_tokens
        self.trained_seen += step_trained
        self.last_loss = loss
        if world.main and (self.step % self.t.log_every == 0 or self.step == plan.max_steps):
            self.log_step({"step": self.step, "loss": loss, "lr": lr, "tokens": step_tokens,
                           "trained_tokens": step_trained,
                           "tokens_per_second": step_tokens / max(elapsed, 1e-9),
                           "trained_tokens_per_second": step_trained / max(elapsed, 1e-9),
                           "epoch": self.step * self.t.grad_accum / plan.per_epoch, "time": now()})

    def to_batch(self, rows: list[int]) -> dict:
        examples = [self.data.train[i] for i in rows]
        return {k: v.to(self.device) for k, v in collate(examples, self.tokenizer.pad_token_id).items()}

    def log_step(self, record: dict) -> None:
        append_metrics(self.run_dir, record)
        self.trackers.log(record)
        update_run(self.run_dir, step=self.step, metrics={"train_loss": record["loss"],
                                                          "train_seconds": self.train_seconds, "steps": self.step})
        if self.progress:
            self.progress({**record, "max_steps": self.plan.max_steps})

    def evaluate(self) -> dict:
        metrics = {}
        if self.world.main or self.engine.evaluates_everywhere:  # a sharded model computes on every rank
            self.engine.before_forward()
            metrics = evaluate(self.model, self.tokenizer, self.data.eval,
                               lambda ex: collate(ex, self.tokenizer.pad_token_id), self.spec, self.device,
                               self.trainee.autocast)
        if self.world.main:
            append_metrics(self.run_dir, {"step": self.step, **metrics, "time": now()})
            self.trackers.log({"step": self.step, **metrics})
        distributed.barrier()
        return metrics

    def save_checkpoint(self) -> None:
        self.engine.save_checkpoint(self.run_dir, self.step, self.trainee.trainable, self.stepper, self.counters(),
                                    self.t.keep_checkpoints)

    # 3. Results ----------------------------------------------------------------------------
    def finish(self, stopped: bool) -> dict:
        self.save_checkpoint()
        if stopped:
            if self.world.main:
                update_run(self.run_dir, status=CANCELLED, finished_at=now(), step=self.step)
            self.trackers.close("cancelled")
            return read_run(self.run_dir) or {}
        final = self.evaluate()
        peak = peak_memory(self.device)  # training's peak: the fingerprint below upcasts the frozen base
        gathered = None
        if self.engine.evaluates_everywhere:  # sharded: rank 0 puts the trained model together
            self.let_go("stepper")  # the optimizer's state is in the checkpoint just saved
            gathered = self.engine.gathered_state()
            self.let_go("trainee", "model")  # the shards; rank 0 keeps what it gathered
            HeapReturner(self.device).release()
        if not self.world.main:
            return {}
        if gathered is not None:  # sharded: the whole trained model, on rank 0's CPU
            model = whole_model(self.spec, self.method, self.mcfg, self.src, self.dtype, self.tokenizer, gathered)
            del gathered
        else:
            model = self.model
        # The model as it stands in memory, before anything is saved and loaded back.
        probe = fingerprint.record(model, self.data.eval or self.data.train, self.run_dir,
                                   {"method": self.method.name,
                                    "trained_dtype": str(self.dtype).removeprefix("torch.")})
        _save_adapter(self.method, model, self.tokenizer, self.run_dir)
        metrics = {"train_loss": self.last_loss, "steps": self.step, "train_seconds": self.train_seconds,
                   "tokens_seen": self.tokens_seen, "trained_tokens": self.trained_seen,
                   "tokens_per_second": self.tokens_seen / max(self.train_seconds, 1e-9),
                   "trained_tokens_per_second": self.trained_seen / max(self.train_seconds, 1e-9),
                   "trainable_params": self.n_trainable, "total_params": self.n_total,
                   **{k: v for k, v in final.items() if k != "samples"}, **peak}
        self.trackers.log({"step": self.step, **peak})
        if self.progress:
            self.progress({"event": "done", **metrics})
        run = update_run(self.run_dir, status=COMPLETED, error=None, finished_at=now(), step=self.step,
                         metrics=metrics, samples=final.get("samples", []),
                         fingerprint={"files": [fingerprint.META, fingerprint.LOGITS], "rows": len(probe["rows"]),
                                      "max_abs_logit": probe.get("max_abs_logit"),
                                      "skipped": probe.get("skipped")})
        self.trackers.close("completed")
        return run

    # 4. Failure and clean-up ---------------------------------------------------------------
    def fail(self, e: BaseException) -> None:
        self.trackers.close("failed")
        if self.world.main and self.started:
            status = INTERRUPTED if isinstance(e, KeyboardInterrupt) else FAILED
            message = describe(e)
            update_run(self.run_dir, status=status, error=message, finished_at=now())

    def let_go(self, *names: str) -> None:
        """Drop what the run holds under these names (``trainee``, ``model``, ``stepper``), the
        trainee's and the engine's references too. The modules hold reference cycles: with
        several processes they are collected now, so the memory is free before rank 0 rebuilds
        the model and the process group is really gone when destroyed. One process leaves them
        to the collector (a full collection costs time at every run's end, and the suite runs
        hundreds)."""
        trainee = self.__dict__.get("trainee")
        for name in names:
            self.__dict__.pop(name, None)
            if trainee is not None and name in ("model", "stepper"):
                setattr(trainee, name, None)
        if "model" in names:
            self.engine.close()
        if self.world.size > 1:
            gc.collect()

    def cleanup(self) -> None:
        # The wrapped model goes before the process group (``Single.close``).
        self.let_go("trainee", "model", "stepper")
        distributed.teardown()


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


def _save_adapter(method, model, tokenizer, run_dir: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=run_dir))
    try:
        method.save(model, tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir_atomic(tmp, RunFolder(run_dir).adapter_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
