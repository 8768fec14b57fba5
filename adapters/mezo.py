"""MeZO (Malladi et al., 2023): zeroth-order SGD with the memory of inference.

One step, for a step seed s and the trained parameters theta:
1. theta += eps * z(s);  L+ = loss          (forward only, under no_grad)
2. theta -= 2 eps * z(s); L- = loss
3. theta += eps * z(s)                      (back where we started)
4. g = (L+ - L-) / (2 eps), the slope of the loss along z
5. theta -= lr * g * z(s)

z is never stored: each use regenerates it from the seed, one slice of a parameter at a
time, so the extra memory is one slice of noise. Works on whatever requires grad after the
method's ``apply`` (all weights, LoRA, prefixes, ...). Both forward passes see the same
dropout masks, otherwise g would measure the masks' difference instead of the slope.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from pydantic import Field

from adapters.base import Context, LossFn, Params, RuleMemory, UpdateRule
from adapters.lomo import RngReplay
from adapters.registry import UPDATE_RULES
from adapters.core.errors import StudioError

# Elements of noise drawn at once: 4 MB in fp32, whatever the size of the largest tensor
# (SmolLM2's embedding would otherwise need 113 MB of noise beside it).
NOISE_SLICE = 1 << 20


class MezoParams(Params):
    lr: float = Field(1e-6, gt=0, le=1.0,
                      description="Step along the noise (paper: 1e-7..1e-6 for all weights, 1e-5..1e-4 for LoRA/prefix).")
    eps: float = Field(1e-3, gt=0, le=1.0, description="Perturbation size for the two loss measurements.")
    weight_decay: float = Field(0.0, ge=0, description="Decay on the tensors the method lets decay (matrices; never biases, norms or quantization scales).")


def step_seed(base: int, step: int) -> int:
    """A distinct, reproducible seed per step (a large odd multiplier keeps runs with nearby
    base seeds from sharing steps' noise)."""
    return (base * 1_000_003 + step * 7_919 + 12_345) % (2 ** 63)


def seeded_noise(params: list[torch.nn.Parameter], seed: int,
                 slice_size: int = NOISE_SLICE) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(slice of a parameter's storage, its noise), in the same order and with the same values
    on every call with the same seed.

    A parameter sharded by FSDP2 (a DTensor) gets exactly the noise one process would draw for
    the whole tensor, cut to this process's rows: every process draws every slice of the whole
    tensor (the generator advances as one process's would) and keeps the part that falls in its
    shard. That costs each process the drawing of the whole noise, never its memory."""
    generators: dict[torch.device, torch.Generator] = {}
    for p in params:
        gen = generators.get(p.device)
        if gen is None:
            gen = generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        rows = _shard_rows(p)
        if rows is not None:
            yield from _shard_noise(p, rows, gen, slice_size)
            continue
        data = p.data
        flat = data.view(-1) if data.is_contiguous() else None
        if flat is None:  # rare (a transposed view): draw the noise for the whole tensor
            yield data, torch.randn(data.shape, generator=gen, device=data.device, dtype=data.dtype)
            continue
        for start in range(0, flat.numel(), slice_size):
            part = flat[start:start + slice_size]
            yield part, torch.randn(part.shape, generator=gen, device=part.device, dtype=part.dtype)


def _shard_rows(p: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(this process's part, its first row in the whole tensor) of a DTensor; None: a plain tensor."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(p, DTensor):
        return None
    local = p._local_tensor  # the shard itself (``to_local`` may hand back a copy under autograd)
    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim == 1 and placements == (Replicate(),):
        return local, 0
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise StudioError(f"mezo draws its noise for tensors split by rows over one group of processes; this "
                          f"one is laid out as {placements} over a {mesh.ndim}-D mesh.", "training.sharding",
                          "use mezo with sharding: none.")
    # FSDP2 splits dim 0 as torch.chunk does: ceil(rows / processes) each, the last ones shorter or empty.
    chunk = -(-p.shape[0] // mesh.size())
    return local, min(mesh.get_local_rank() * chunk, p.shape[0])


def _shard_noise(p: torch.Tensor, rows: tuple[torch.Tensor, int], gen: torch.Generator,
                 slice_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    local, first_row = rows
    if not local.is_contiguous():
        raise StudioError("mezo found a sharded tensor whose rows are not contiguous.", "training.sharding",
                          "use mezo with sharding: none.")
    row = math.prod(p.shape[1:])
    mine = local.view(-1)
    lo, hi = first_row * row, first_row * row + mine.numel()  # this shard in the whole tensor, flat
    for start in range(0, p.numel(), slice_size):
        n = min(slice_size, p.numel() - start)
        z = torch.randn((n,), generator=gen, device=local.device, dtype=local.dtype)
        a, b = max(start, lo), min(start + n, hi)
        if a < b:
            yield mine[a - lo:b - lo], z[a - start:b - start]


class MezoStepper:
    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], cfg: MezoParams, ctx: Context, seed: int):
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.decaying = [p for n, p in params if ctx.decays(n, p)]  # the method's declaration
        self.cfg, self.ctx, self.base_seed = cfg, ctx, seed
        self.steps = 0
        self.last_seed: int | None = None
        self.last_projected_grad: float | None = None

    def _perturb(self, seed: int, scale: float) -> None:
        for part, z in seeded_noise(self.params, seed):
            part.add_(z, alpha=scale)

    def _losses(self, micro_batches: list[dict], loss_fn: LossFn) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for batch in micro_batches:
            total += float(loss_fn(batch))
        return total

    @torch.no_grad()
    def step(self, micro_batches: list[dict], loss_fn: LossFn, lr: float) -> float:
        eps = self.cfg.eps
        seed = step_seed(self.base_seed, self.steps)
        device = self.params[0].device if self.params else torch.device("cpu")
        rng = RngReplay(device)
        self._perturb(seed, eps)
        plus = self._losses(micro_batches, loss_fn)
        self._perturb(seed, -2 * eps)
        rng.replay()
        minus = self._losses(micro_batches, loss_fn)
        self._perturb(seed, eps)
        # Each rank's losses are its share of the global per-token mean: the global loss
        # difference is their sum (a scalar all-reduce; every rank joins, also one whose
        # micro-batch this step was only a zero-weighted filler).
        local = ((plus - minus) / (2 * eps)).to(device=device, dtype=torch.float32).reshape(1)
        g = float(self.ctx.all_reduce_sum(local))
        if not math.isfinite(g):
            raise StudioError(f"MeZO's loss difference became {g} at step {self.steps + 1}.", "optimizer.eps",
                              "lower optimizer.lr, or raise optimizer.eps if the losses are in fp16/bf16.")
        wd = self.cfg.weight_decay
        if wd:
            for p in self.decaying:
                p.mul_(1.0 - lr * wd)
        for part, z in seeded_noise(self.params, seed):
            part.add_(z, alpha=-lr * g)
        self.steps += 1
        self.last_seed, self.last_projected_grad = seed, g
        return float((plus + minus) / 2)

    def state_dict(self) -> dict:
        return {"base_seed": self.base_seed, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.base_seed, self.steps = int(state["base_seed"]), int(state["steps"])


@dataclass(frozen=True)
class MezoRule(UpdateRule):
    name: str = "mezo"
    summary: str = "Zeroth-order SGD from two forward passes (MeZO): inference memory, no gradients, no state."
    Config: type[Params] = MezoParams
    # No gradients and no state: only one slice of regenerated fp32 noise at a time.
    memory: RuleMemory = RuleMemory("none", lambda shapes, cfg: 0, lambda largest: min(largest, 4 * NOISE_SLICE))

    def check(self, cfg: Params, spec: Any) -> None:
        t = spec.training
        if t.grad_accum > 1:
            raise StudioError(
                f"mezo keeps no gradients, so there is nothing to accumulate (grad_accum is {t.grad_accum}); "
                "its memory is that of inference, so a larger batch costs only activations.", "training.grad_accum",
                f"set grad_accum to 1 and batch_size to {t.batch_size * t.grad_accum} for the same rows per step.")
        if t.gradient_checkpointing:
            raise StudioError(
                "mezo runs no backward pass, so gradient checkpointing has no activations to recompute and saves "
                "nothing.", "training.gradient_checkpointing", "set gradient_checkpointing to false.")

    def build(self, params: Iterable[tuple[str, torch.nn.Parameter]], cfg: Any, ctx: Context) -> MezoStepper:
        spec = getattr(ctx, "spec", None)
        seed = int(getattr(getattr(spec, "training", None), "seed", 0) or 0)
        return MezoStepper(list(params), cfg, ctx, seed)


UPDATE_RULES.register(MezoRule())
