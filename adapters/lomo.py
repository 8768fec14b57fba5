"""LOMO (Lv et al., 2023): SGD fused into the backward pass.

Each parameter is updated by a post-accumulate-grad hook the moment its gradient is
complete, and the gradient is dropped at once, so the gradients of the whole model never
exist together: memory is the weights plus activations plus one parameter's gradient.

The price: the update must be known when the gradient arrives. Clipping by the global
gradient norm therefore takes two passes (the first backward only measures the norm, the
second applies the clipped update), with the same dropout masks in both; fp16 training
takes the same two passes so that an overflow is found before any weight has changed.
``FusedStepper`` is shared with AdaLomo, which only swaps the per-parameter update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from pydantic import Field

from adapters.base import (Context, DecayFn, LossFn, Params, RuleMemory, ShardingBlocker, UpdateRule,
                           decays_by_default)
from adapters.registry import UPDATE_RULES
from adapters.core.errors import StudioError
from adapters.core.memory import HeapReturner

# update(name, param, gradient, lr): change ``param`` in place; the gradient is already
# unscaled and clipped, and is the caller's to overwrite.
Update = Callable[[str, torch.nn.Parameter, torch.Tensor, float], None]


class LomoParams(Params):
    lr: float = Field(1e-2, gt=0, le=10.0, description="SGD learning rate (no momentum; the LOMO paper used 1e-2..3e-2).")
    weight_decay: float = Field(0.0, ge=0, description="Decay on the tensors the method lets decay (matrices; never biases, norms or quantization scales).")
    max_grad_norm: float = Field(
        1.0, ge=0, description="Clip the global gradient norm (two forward/backward passes per step; 0: off, one pass).")
    loss_scale: float = Field(2.0 ** 16, ge=1, description="fp16 only: initial dynamic loss scale.")
    scale_window: int = Field(1000, ge=1, description="fp16 only: steps without overflow before the scale doubles.")


class LossScaler:
    """Dynamic loss scaling for fp16: halve on overflow (and skip the step), grow after a clean window."""

    def __init__(self, scale: float, window: int):
        self.scale, self.window, self.clean = float(scale), int(window), 0

    def overflowed(self) -> None:
        self.scale, self.clean = max(self.scale / 2, 1.0), 0

    def succeeded(self) -> None:
        self.clean += 1
        if self.clean >= self.window:
            self.scale, self.clean = self.scale * 2, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean": self.clean}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean = float(state["scale"]), int(state["clean"])


class RngReplay:
    """Remembers the torch RNG at construction; ``replay()`` rewinds to it, so a repeated
    forward pass draws the same dropout masks as the first."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def replay(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def decay(p: torch.Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled decay of one tensor; the caller asks the method's ``decays`` first."""
    if weight_decay:
        p.mul_(1.0 - lr * weight_decay)


class FusedStepper:
    """Backward passes whose gradients are consumed by ``update`` as they appear."""

    def __init__(self, params: Iterable[tuple[str, torch.nn.Parameter]], update: Update, max_grad_norm: float,
                 ctx: Context, loss_scale: float = 2.0 ** 16, scale_window: int = 1000):
        self.params = list(params)
        self.update, self.max_grad_norm, self.ctx = update, max_grad_norm, ctx
        self.scaler = LossScaler(loss_scale, scale_window) if ctx.dtype == torch.float16 else None
        self.phase: str | None = None  # None: leave gradients alone (a backward outside step())
        self.squares: torch.Tensor | None = None
        self.factor, self.lr = 1.0, 0.0
        self.skipped = 0
        self.heap = HeapReturner(ctx.device)
        for name, p in self.params:
            p.register_post_accumulate_grad_hook(self._hook(name))

    def _hook(self, name: str):
        def on_gradient(p: torch.nn.Parameter) -> None:
            if self.phase is None or p.grad is None:
                return
            grad, p.grad = p.grad, None
            with torch.no_grad():
                if self.phase == "measure":
                    part = grad.float().pow(2).sum()
                    self.squares = part if self.squares is None else self.squares + part
                else:
                    if self.factor != 1.0:
                        grad.mul_(self.factor)
                    self.update(name, p, grad, self.lr)
            freed = grad.numel() * grad.element_size()
            del grad
            self.heap.freed(freed)  # on the CPU glibc would otherwise keep it resident
        return on_gradient

    def step(self, micro_batches: list[dict], loss_fn: LossFn, lr: float) -> float:
        if not micro_batches:
            return 0.0
        if len(micro_batches) > 1:
            raise RuntimeError("fused updates take one micro-batch per step (training.grad_accum must be 1)")
        batch = micro_batches[0]
        scale = self.scaler.scale if self.scaler else 1.0
        clip = 1.0
        device = next((p.device for _, p in self.params), torch.device("cpu"))
        rng = RngReplay(device)
        if self.max_grad_norm > 0 or self.scaler:
            self.phase, self.squares = "measure", None
            try:
                loss = loss_fn(batch)
                (loss * scale).backward()
            finally:
                self.phase = None
            norm = math.sqrt(float(self.squares)) / scale if self.squares is not None else 0.0
            if not math.isfinite(norm):
                # Nothing has changed yet: skip the step (fp16: retry at half the scale).
                self.skipped += 1
                if self.scaler:
                    self.scaler.overflowed()
                return float(loss.detach())
            if self.max_grad_norm > 0:
                clip = min(1.0, self.max_grad_norm / (norm + 1e-6))
            rng.replay()
        self.phase, self.factor, self.lr = "apply", clip / scale, lr
        try:
            loss = loss_fn(batch)
            (loss * scale).backward()
        finally:
            self.phase, self.factor = None, 1.0
        if self.scaler:
            self.scaler.succeeded()
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler else None, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped = int(state.get("skipped", 0))


# LOMO and AdaLomo under FSDP2: the post-accumulate-grad hook fires on the gathered copy of a
# layer before FSDP2 reduce-scatters, so the update would see one process's gradient only, and
# FSDP2 drops that copy at the reshard that follows.
FUSED_UNDER_FSDP = ShardingBlocker(
    "it updates each weight inside backward, on the layer's gathered copy, before FSDP2 sums the other "
    "processes' gradients into the shards: the update would use one process's gradient and be lost with that copy",
    "use adamw or sgd with sharding: fsdp, or this rule with sharding: none on one device")


def reject_accumulation_and_devices(rule: str, spec: Any) -> None:
    """The two combinations a fused update cannot honour, shared by LOMO and AdaLomo."""
    t = spec.training
    if t.grad_accum > 1:
        raise StudioError(
            f"{rule} applies each gradient during backward and keeps none, so there is nothing to accumulate "
            f"across micro-batches (grad_accum is {t.grad_accum}).", "training.grad_accum",
            f"set grad_accum to 1 and batch_size to {t.batch_size * t.grad_accum} for the same rows per step "
            "(with gradient_checkpointing: true if that batch does not fit), or use adamw.")
    if t.devices > 1:
        raise StudioError(
            f"{rule} updates each weight inside backward, before gradients from other devices could be summed; "
            "the studio does not run its per-parameter all-reduce.", "training.devices",
            "set devices to 1, or use adamw / sgd for data-parallel training.")


def sgd_update(weight_decay: float, decays: DecayFn = decays_by_default) -> Update:
    def update(name: str, p: torch.nn.Parameter, grad: torch.Tensor, lr: float) -> None:
        if decays(name, p):
            decay(p, lr, weight_decay)
        p.add_(grad.to(p.dtype), alpha=-lr)
    return update


@dataclass(frozen=True)
class LomoRule(UpdateRule):
    name: str = "lomo"
    summary: str = "SGD fused into backward: no gradients held, no optimizer state (LOMO)."
    Config: type[Params] = LomoParams
    # One gradient at a time, no state; squaring it for the clipping norm makes one temporary.
    memory: RuleMemory = RuleMemory("one", lambda shapes, cfg: 0, lambda largest: largest)
    fsdp_blocker: ShardingBlocker | None = FUSED_UNDER_FSDP

    def check(self, cfg: Params, spec: Any) -> None:
        reject_accumulation_and_devices(self.name, spec)

    def build(self, params: Iterable[tuple[str, torch.nn.Parameter]], cfg: Any, ctx: Context) -> FusedStepper:
        return FusedStepper(params, sgd_update(cfg.weight_decay, ctx.decays), cfg.max_grad_norm, ctx,
                            cfg.loss_scale, cfg.scale_window)


UPDATE_RULES.register(LomoRule())
