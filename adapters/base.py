"""The two contracts every fine-tuning method and every update rule fulfil.

They are ``Protocol``s, not base classes: a method is any object with these
attributes, usually a small frozen dataclass instance built in its own module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Base for method and update-rule configs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def decays_by_default(name: str, param: torch.Tensor) -> bool:
    """Matrices decay; vectors (biases, norm gains) do not: shrinking those towards zero only hurts."""
    return param.ndim >= 2


# decays(name, param): whether weight decay applies to this trained tensor.
DecayFn = Callable[[str, torch.Tensor], bool]


def decay_rule(method: Any) -> DecayFn:
    """The method's own declaration of which trained tensors decay (``decays``), else the default."""
    return getattr(method, "decays", decays_by_default)


@dataclass
class Context:
    """What a method or update rule may need to know about the run."""

    spec: Any  # jobs.spec.JobSpec (kept loose to avoid an import cycle)
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any = None
    # Sums the .grad of the given parameters over data-parallel workers (a no-op alone).
    all_reduce_grads: Callable[[list[torch.nn.Parameter]], None] = lambda params: None
    # Averages a scalar over data-parallel workers (a no-op alone).
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    # Which trained tensors weight decay may shrink: the method's declaration (decay_rule).
    decays: DecayFn = decays_by_default
    extras: dict = field(default_factory=dict)


class Method(Protocol):
    name: str
    summary: str
    Config: type[Params]
    # Largest |logit difference| allowed between merged and unmerged model in fp32.
    merge_tolerance: float
    # Why this method cannot be merged, or None when it can.
    merge_blocker: str | None
    # A good AdamW peak learning rate on a real model (the UI's default for this method).
    suggested_lr: float
    # Optional: ``decays(name, param) -> bool``, which trained tensors weight decay applies to
    # (decays_by_default when absent: matrices only, never biases or norms). A method whose
    # trained matrices are not weights (quantization scales) declares its own.
    # Optional: ``fingerprint_tolerance``, the largest logit difference (per unit of the largest
    # logit) between a reload or export and the trained model; the merge tolerance when absent
    # (jobs/fingerprint.py).

    def check(self, cfg: Params, spec: Any) -> None:
        """Raise StudioError for combinations with the rest of the spec that make no sense."""

    def apply(self, model: torch.nn.Module, cfg: Params, ctx: Context) -> torch.nn.Module:
        """Wrap or modify ``model``; afterwards exactly the trained parameters require grad."""

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        """Write the trained state (the run's ``adapter/`` folder)."""

    def load(self, base: torch.nn.Module, adapter_dir: Path, cfg: Params, ctx: Context) -> torch.nn.Module:
        """Rebuild the trained model from a fresh base and a saved ``adapter/`` folder."""

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        """Return a plain transformers model with the result folded in (raise CannotMerge)."""


# loss_fn(micro_batch) -> scalar loss already scaled so that summing over the step's
# micro-batches gives the per-token mean over the whole (global) batch.
LossFn = Callable[[dict], torch.Tensor]


class Stepper(Protocol):
    def step(self, micro_batches: list[dict], loss_fn: LossFn, lr: float) -> float:
        """Do one optimizer step over the micro-batches; return the (scaled) loss sum."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class UpdateRule(Protocol):
    name: str
    summary: str
    Config: type[Params]

    def check(self, cfg: Params, spec: Any) -> None:
        """Raise StudioError for combinations that make no sense (e.g. MeZO + accumulation)."""

    def build(self, params: Iterable[tuple[str, torch.nn.Parameter]], cfg: Params, ctx: Context) -> Stepper:
        ...
