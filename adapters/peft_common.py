"""Methods that peft implements: one recipe, filled in by each method's module.

Each module (lora.py, dora.py, ...) supplies its Config and how that Config becomes a
peft config; saving, loading and merging are peft's own and shared here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from adapters.core import compat
from adapters.base import Context, Method, Params, ShardingBlocker
from adapters.core.errors import CannotMerge, StudioError


@dataclass(frozen=True)
class PeftMethod(Method):
    name: str
    summary: str
    Config: type[Params]
    to_peft_config: Callable[[Params], Any]
    merge_tolerance: float = 1e-4
    suggested_lr: float = 2e-4
    merge_blocker: str | None = None
    checks: tuple[Callable[[Params, Any], None], ...] = ()
    # peft's layer names that only the unmerged model has (merge_and_unload removes them).
    merged_away: tuple[str, ...] = ()
    # Initialisation peft cannot do on its own (e.g. from our tokenizer), run after wrapping.
    after_apply: Callable[[torch.nn.Module, Params, Context], None] | None = None
    fsdp_blocker: ShardingBlocker | None = None

    def check(self, cfg: Params, spec: Any) -> None:
        for c in self.checks:
            c(cfg, spec)

    def apply(self, model: torch.nn.Module, cfg: Params, ctx: Context) -> torch.nn.Module:
        from peft import get_peft_model

        try:
            wrapped = get_peft_model(model, self.to_peft_config(cfg))
        except ValueError as e:  # peft names the missing target modules
            raise StudioError(f"{self.name} does not fit this model: {e}", "method",
                              "set method.target_modules to module names the model has.") from None
        if self.after_apply:
            self.after_apply(wrapped, cfg, ctx)
        if ctx.dtype != torch.float32:
            keep_input_dtype(wrapped)
        return wrapped

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        model.save_pretrained(str(out_dir), safe_serialization=True)

    def load(self, base: torch.nn.Module, adapter_dir: Path, cfg: Params, ctx: Context) -> torch.nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.merge_blocker:
            raise CannotMerge(self.merge_blocker, self.name,
                              "export the adapter instead (studio export RUN --adapter OUT).")
        # safe_merge works on a copy of each weight and refuses NaNs.
        return model.merge_and_unload(safe_merge=True)


def keep_input_dtype(model: torch.nn.Module) -> None:
    """Stop peft casting each adapter's input to the adapter's fp32 before its matmul.

    Training in bf16/fp16 runs under autocast, which casts that input straight back to the
    compute dtype, so the cast only costs a copy per adapted layer that backward then keeps:
    on SmolLM2 in bf16 on the CPU, 7% of the step time and 120 MB of peak memory. The
    adapter weights stay fp32; autocast decides the matmul dtype, as for the base layers.
    """
    compat.keep_peft_input_dtype(model)


def no_gradient_checkpointing(reason: str) -> Callable[[Params, Any], None]:
    def check(cfg: Params, spec: Any) -> None:
        if spec.training.gradient_checkpointing:
            raise StudioError(f"gradient checkpointing cannot be combined with this method: {reason}",
                              "training.gradient_checkpointing", "set it to false.")
    return check
