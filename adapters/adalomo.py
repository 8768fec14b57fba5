"""AdaLomo (Lv et al., 2023): LOMO's fused update with an adaptive, Adafactor-style step.

Per parameter, inside backward:
- second moment of the gradient, factored for matrices (one running mean per row and one
  per column, their outer product over the overall mean approximates the full table) and
  kept whole for vectors, with Adafactor's growing decay ``beta2_t = 1 - t^decay_rate``;
- the normalised update ``g / sqrt(v)`` is scaled down when its RMS exceeds
  ``clip_threshold`` (grouped update normalisation: every tensor on its own);
- the step is relative: ``lr * max(eps2, RMS(param))``, so big and small tensors move by the
  same fraction of their size.

State is two vectors per matrix, a fraction of a percent of the weights. Every tensor is
created beside its parameter (never ``.cuda()``), so it runs wherever the model runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from pydantic import Field

from adapters.base import (Context, DecayFn, Params, RuleMemory, ShardingBlocker, UpdateRule, decays_by_default,
                           numel)
from adapters.lomo import FUSED_UNDER_FSDP, FusedStepper, decay, reject_accumulation_and_devices
from adapters.registry import UPDATE_RULES


class AdaLomoParams(Params):
    lr: float = Field(1e-3, gt=0, le=1.0,
                      description="Relative step: each update moves a tensor by about lr times its RMS (paper: 5e-4..1e-3).")
    weight_decay: float = Field(0.0, ge=0, description="Decay on the tensors the method lets decay (matrices; never biases, norms or quantization scales).")
    clip_threshold: float = Field(1.0, gt=0, description="Largest RMS of a tensor's normalised update.")
    decay_rate: float = Field(-0.8, lt=0, gt=-1.0, description="beta2_t = 1 - t^decay_rate (Adafactor's schedule).")
    eps1: float = Field(1e-30, gt=0, description="Added to squared gradients before averaging.")
    eps2: float = Field(1e-3, gt=0, description="Floor of the parameter RMS in the relative step (zero-initialised tensors).")
    max_grad_norm: float = Field(
        0.0, ge=0, description="Clip the global gradient norm (two passes per step; 0: off, the update is already normalised).")
    loss_scale: float = Field(2.0 ** 16, ge=1, description="fp16 only: initial dynamic loss scale.")
    scale_window: int = Field(1000, ge=1, description="fp16 only: steps without overflow before the scale doubles.")


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.pow(2).mean().sqrt()


class AdaLomoState:
    """Step count and second moments; builds the per-parameter update the fused stepper calls."""

    def __init__(self, cfg: AdaLomoParams, decays: DecayFn = decays_by_default):
        self.cfg, self.decays = cfg, decays
        self.t = 0
        self.moments: dict[str, dict[str, torch.Tensor]] = {}

    def begin_step(self) -> None:
        self.t += 1
        self.beta2 = 1.0 - self.t ** self.cfg.decay_rate

    def _moments(self, name: str, p: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.moments.get(name)
        if m is None:
            new = lambda shape: torch.zeros(shape, dtype=torch.float32, device=p.device)  # noqa: E731
            m = ({"row": new(p.shape[:-1]), "col": new(p.shape[:-2] + p.shape[-1:])} if p.ndim >= 2
                 else {"full": new(p.shape)})
            self.moments[name] = m
        return m

    def update(self, name: str, p: torch.nn.Parameter, grad: torch.Tensor, lr: float) -> None:
        cfg, beta2 = self.cfg, self.beta2
        g = grad.float()
        square = g.pow(2).add_(cfg.eps1)
        m = self._moments(name, p)
        if p.ndim >= 2:
            m["row"].mul_(beta2).add_(square.mean(dim=-1), alpha=1.0 - beta2)
            m["col"].mul_(beta2).add_(square.mean(dim=-2), alpha=1.0 - beta2)
            del square
            # v[i, j] ~ row[i] * col[j] / mean(row): 1/sqrt(v) as an outer product of two vectors.
            row_factor = (m["row"] / m["row"].mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
            col_factor = m["col"].rsqrt().unsqueeze(-2)
            u = g.mul_(row_factor).mul_(col_factor)  # the gradient is ours to overwrite
        else:
            m["full"].mul_(beta2).add_(square, alpha=1.0 - beta2)
            u = g.mul_(m["full"].rsqrt())
        # Tensor-valued scalars throughout: no host synchronisation per parameter on a GPU.
        u.div_((_rms(u) / cfg.clip_threshold).clamp(min=1.0))
        step = lr * _rms(p.detach().float()).clamp(min=cfg.eps2)
        if self.decays(name, p):
            decay(p, lr, cfg.weight_decay)
        p.sub_((u * step).to(p.dtype))

    def state_dict(self) -> dict:
        return {"t": self.t, "moments": {n: {k: v.detach().cpu() for k, v in m.items()} for n, m in self.moments.items()}}

    def load_state_dict(self, state: dict, devices: dict[str, torch.device]) -> None:
        self.t = int(state["t"])
        self.moments = {n: {k: v.to(devices[n], torch.float32) for k, v in m.items()}
                        for n, m in state["moments"].items() if n in devices}


class AdaLomoStepper(FusedStepper):
    """The fused stepper plus AdaLomo's state (counted in optimizer steps, saved for resume)."""

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], cfg: AdaLomoParams, ctx: Context):
        self.state = AdaLomoState(cfg, ctx.decays)
        super().__init__(params, self.state.update, cfg.max_grad_norm, ctx, cfg.loss_scale, cfg.scale_window)

    def step(self, micro_batches, loss_fn, lr):
        self.state.begin_step()
        return super().step(micro_batches, loss_fn, lr)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "adalomo": self.state.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.state.load_state_dict(state["adalomo"], {n: p.device for n, p in self.params})


def _factored_bytes(shapes) -> int:
    """A mean per row and per column of every matrix, the whole square for vectors (fp32)."""
    return sum(4 * (numel(s[:-1]) + numel(s[:-2] + s[-1:])) if len(s) >= 2 else 4 * numel(s) for s in shapes)


@dataclass(frozen=True)
class AdaLomoRule(UpdateRule):
    name: str = "adalomo"
    summary: str = "LOMO with factored adaptive step sizes (AdaLomo): Adam-like results at LOMO's memory."
    Config: type[Params] = AdaLomoParams
    # One gradient at a time. It is squared too, then the update is built in the gradient's own
    # storage (the square is freed first): one temporary, as LOMO.
    memory: RuleMemory = RuleMemory("one", lambda shapes, cfg: _factored_bytes(shapes), lambda largest: largest)
    fsdp_blocker: ShardingBlocker | None = FUSED_UNDER_FSDP

    def check(self, cfg: Params, spec: Any) -> None:
        reject_accumulation_and_devices(self.name, spec)

    def build(self, params: Iterable[tuple[str, torch.nn.Parameter]], cfg: Any, ctx: Context) -> AdaLomoStepper:
        return AdaLomoStepper(list(params), cfg, ctx)


UPDATE_RULES.register(AdaLomoRule())
