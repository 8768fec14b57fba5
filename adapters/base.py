"""The two contracts every fine-tuning method and every update rule fulfil.

They are ``Protocol``s: a method is a small frozen dataclass built in its own module that
subclasses ``Method`` explicitly, which gives it the defaults of everything it need not declare
(its base dtype policy, estimator stand-in, merge leftovers, quantized form, decay rule); an
update rule likewise subclasses ``UpdateRule`` (its memory traits). The contract tests
(tests/test_methods.py, tests/test_update_rules.py) check every registered one.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Protocol

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
    """The method's own declaration of which trained tensors decay (``Method.decays``)."""
    return method.decays


@dataclass(frozen=True)
class ShardingBlocker:
    """Why a method or update rule cannot train sharded (FSDP2), and what to use instead."""
    why: str
    instead: str


@dataclass
class Context:
    """What a method or update rule may need to know about the run."""

    spec: Any  # jobs.spec.JobSpec (kept loose to avoid an import cycle)
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any = None
    # gradient_sync(last): the context one micro-batch's backward runs in. The engine
    # (jobs/training/engines.py) reduces gradients over data-parallel processes in the backward
    # of the last micro-batch of a step only; alone it does nothing.
    gradient_sync: Callable[[bool], ContextManager] = lambda last: contextlib.nullcontext()
    # Sums a tensor over data-parallel processes (a copy; the tensor itself alone).
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    # Which trained tensors weight decay may shrink: the method's declaration (decay_rule).
    decays: DecayFn = decays_by_default
    extras: dict = field(default_factory=dict)


class Method(Protocol):
    """A fine-tuning method. Implementations subclass this Protocol explicitly to inherit the
    defaults below, and override a default only to declare something of their own: what a
    method is (how its base loads, what the estimator builds for it, what its merge removes,
    whether it has a quantized form) is said here, in the method's file, not by name elsewhere."""

    name: str
    summary: str
    Config: type[Params]
    # Largest |logit difference| allowed between merged and unmerged model in fp32.
    merge_tolerance: float
    # Why this method cannot be merged, or None when it can.
    merge_blocker: str | None
    # A good AdamW peak learning rate on a real model (the UI's default for this method).
    suggested_lr: float

    # The dtype its base loads in: "compute" (frozen weights in the run's dtype, half the memory
    # in bf16) or "fp32" (the method trains the base itself and keeps fp32 masters).
    base_dtype: str = "compute"
    # The method the memory estimator builds on the meta device instead of this one, when this
    # one cannot be applied there (its initialisation needs real numbers, e.g. an SVD) and the
    # other holds the same tensors; None: this method itself.
    memory_twin: str | None = None
    # Fragments of module names that only the unmerged model has (peft's ``lora_``, ``base_layer``):
    # a merged model still holding one is a broken merge and is not exported.
    merged_away: tuple[str, ...] = ()
    # The largest logit difference (per unit of the largest logit) allowed between a reload or
    # export and the trained model; None: the merge tolerance (jobs/training/fingerprint.py).
    fingerprint_tolerance: float | None = None
    # ``to_quantized(model) -> model`` whose quantized layers are integer grids (adapters/quant),
    # exported by ``studio export --quantized``; None: the method has no quantized form.
    to_quantized: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    # Why this method cannot train with ``training.sharding: fsdp`` and what to use instead
    # (``ShardingBlocker``), or None when FSDP2 trains it as one process would.
    fsdp_blocker: "ShardingBlocker | None" = None

    def decays(self, name: str, param: torch.Tensor) -> bool:
        """Which trained tensors weight decay applies to: matrices only, never biases or norms. A
        method whose trained matrices are not weights (quantization scales) declares its own."""
        return decays_by_default(name, param)

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


@dataclass(frozen=True)
class RuleMemory:
    """What an update rule holds beside the weights, for the memory estimator (jobs/estimate/estimator.py)."""

    gradients: str                                  # "all": one per trained value; "one": a tensor at a time; "none"
    state_bytes: Callable[[list[tuple[int, ...]], Any], int]   # (trained shapes, rule config) -> bytes
    temporaries: Callable[[int], int]               # bytes alive during an update, from the largest tensor's bytes


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def moments_bytes(per_value: int) -> Callable[[list[tuple[int, ...]], Any], int]:
    """State of ``per_value`` bytes for every trained value (AdamW's two fp32 moments: 8)."""
    return lambda shapes, cfg: per_value * sum(map(numel, shapes))


# loss_fn(micro_batch) -> scalar loss already scaled so that summing over the step's
# micro-batches gives the per-token mean over the whole (global) batch.
LossFn = Callable[[dict], torch.Tensor]


class Stepper(Protocol):
    def step(self, micro_batches: list[dict], loss_fn: LossFn, lr: float) -> float:
        """Do one optimizer step over the micro-batches; return the (scaled) loss sum."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class UpdateRule(Protocol):
    """An update rule; implementations subclass this Protocol explicitly to inherit its defaults."""

    name: str
    summary: str
    Config: type[Params]
    # Gradients held, optimizer state and temporaries, for the estimator; None: counted like
    # AdamW, and the estimate says so.
    memory: RuleMemory | None = None
    # Why this rule cannot train with ``training.sharding: fsdp``, or None when it can.
    fsdp_blocker: "ShardingBlocker | None" = None

    def check(self, cfg: Params, spec: Any) -> None:
        """Raise StudioError for combinations that make no sense (e.g. MeZO + accumulation)."""

    def build(self, params: Iterable[tuple[str, torch.nn.Parameter]], cfg: Params, ctx: Context) -> Stepper:
        ...
