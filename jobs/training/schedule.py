"""What each optimizer step trains on and at what learning rate: pure functions of the spec
and the data, so a resumed run replays exactly the steps an unbroken one would take."""
from __future__ import annotations

import math
from datetime import datetime, timezone

from jobs.data.examples import plan_batches
from jobs.spec import TrainingSpec


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


class StepPlan:
    """The micro-batch stream: a pure function of (seed, epoch). Each global micro-batch holds
    ``batch_size`` rows per process; a step is ``grad_accum`` of them."""

    def __init__(self, examples: list, t: TrainingSpec, world_size: int):
        self.lengths = [len(e.input_ids) for e in examples]
        self.trained_counts = [e.trained for e in examples]
        self.t = t
        self.global_batch = t.batch_size * world_size
        self.per_epoch = len(plan_batches(self.lengths, self.global_batch, t.seed, 0))
        self.max_steps = t.max_steps or max(1, math.ceil(t.epochs * self.per_epoch / t.grad_accum))
        self._plans: dict[int, list[list[int]]] = {}

    def step_rows(self, step: int) -> list[list[int]]:
        """The global micro-batches (row indices) of optimizer step ``step``."""
        rows = []
        for j in range(self.t.grad_accum):
            epoch, idx = divmod(step * self.t.grad_accum + j, self.per_epoch)
            if epoch not in self._plans:
                self._plans.clear()
                self._plans[epoch] = plan_batches(self.lengths, self.global_batch, self.t.seed, epoch)
            rows.append(self._plans[epoch][idx])
        return rows

    def trained(self, global_rows: list[list[int]]) -> int:
        return sum(self.trained_counts[i] for rows in global_rows for i in rows)

    def tokens(self, global_rows: list[list[int]]) -> int:
        return sum(self.lengths[i] for rows in global_rows for i in rows)
