"""QLoRA: LoRA on top of a frozen base whose linear layers are 4-bit NF4 (Dettmers et al., 2023).

The base's linear layers (not the output head, not the embeddings) become bitsandbytes
``Linear4bit`` with double quantization, or ``Linear8bitLt`` for an 8-bit base; peft puts
its bitsandbytes-aware LoRA layers on top. The adapter folder is peft's: loading
holds the quantized base layers beside it (as LoftQ's does, about half a byte per weight at
4 bits), and loading restores them: re-quantizing would start from whatever base the reload
has, and a run trained in bf16 quantized its bf16 copy, whose NF4 codes and block scales
differ from those of the fp32 base an export loads (3.6 of logits up to 38 on SmolLM2).

Merging folds LoRA into the *dequantized* base, which is the model that trained, and
gives a plain full-precision model: re-quantizing after the merge (what peft does) would
add a fresh rounding error on top of what the adapter learned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from adapters.base import Context, Method, Params, ShardingBlocker
from adapters.core import compat
from adapters.lora import LoraParams, lora_peft_config
from adapters.peft_common import PeftMethod
from adapters.quant import nf4
from adapters.quant.saved import has_saved_layers, restore_bnb_layers, save_bnb_layers
from adapters.quant.targets import find_linears, set_module
from adapters.registry import METHODS
from adapters.core.errors import StudioError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Nf4Params(LoraParams):
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type: nf4 suits normally distributed weights (QLoRA's choice).")
    double_quant: bool = Field(
        True, description="Quantize the per-block scales too (saves about 0.4 bits per weight).")
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Dtype the 4-bit weights are expanded to for each matmul; "
                            "auto follows the training precision (bf16 on a GPU, fp32 on the CPU).")


class QloraParams(Nf4Params):
    bits: Literal[4, 8] = Field(
        4, description="Base precision: 4 (NF4, QLoRA) or 8 (LLM.int8; quant_type and double_quant do not apply).")


def compute_dtype(cfg: Nf4Params, ctx: Context) -> torch.dtype:
    return ctx.dtype if cfg.compute_dtype == "auto" else DTYPES[cfg.compute_dtype]


def merge_dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA layer into its dequantized base; return the bare fp32 transformers model."""
    from peft.tuners.lora import LoraLayer

    base = compat.bare_model(model)
    for name, module in [(n, m) for n, m in base.named_modules() if isinstance(m, LoraLayer)]:
        layer = module.get_base_layer()
        delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters if a in module.lora_A)
        if not nf4.is_bnb_linear(layer):
            raise TypeError(f"{name}: expected a quantized base layer, found {type(layer).__name__}")
        plain = nf4.dequantize_linear(layer, delta if torch.is_tensor(delta) else None)
        if not torch.isfinite(plain.weight).all():
            raise StudioError(f"merging gives non-finite weights in {name}.", name,
                              "the adapter is broken (the training diverged); export the adapter instead.")
        set_module(base, name, plain)
    return nf4.dequantize_all(base)


@dataclass(frozen=True)
class QloraMethod(Method):
    name: str = "qlora"
    fsdp_blocker: ShardingBlocker | None = ShardingBlocker(
        "its 4-bit base (bitsandbytes Params4bit) is not a tensor FSDP2 shards as it is, and the quant_storage route has silently trained wrong elsewhere (accelerate #3983, axolotl #2992); not verified exact here",
        "use lora with sharding: fsdp (the frozen base is sharded in the compute dtype), or qlora with sharding: none")
    summary: str = "LoRA on a frozen 4-bit NF4 (or 8-bit) base; merges into the dequantized base."
    Config: type[Params] = QloraParams
    # Per unit of the largest logit. Merged and unmerged multiply by the same dequantized weights;
    # only fp32 summation order differs: 1.1e-4 absolute at logits ~32 on SmolLM2 (3e-6 relative).
    merge_tolerance: float = 1e-4
    merge_blocker: str | None = None
    suggested_lr: float = 2e-4  # QLoRA paper's rate for small models
    merged_away: tuple[str, ...] = ("lora_", "base_layer")
    lora: PeftMethod = field(default_factory=lambda: PeftMethod(
        name="qlora", summary="", Config=QloraParams, to_peft_config=lora_peft_config))

    def check(self, cfg: QloraParams, spec: Any) -> None:
        self.lora.check(cfg, spec)

    def quantize_base(self, model: torch.nn.Module, cfg: QloraParams, ctx: Context) -> None:
        model.requires_grad_(False)
        linears = find_linears(model)
        nf4.quantize_linears(model, linears, cfg.bits, compute_dtype(cfg, ctx), cfg.quant_type, cfg.double_quant)

    def apply(self, model: torch.nn.Module, cfg: QloraParams, ctx: Context) -> torch.nn.Module:
        self.quantize_base(model, cfg, ctx)
        return self.lora.apply(model, cfg, ctx)

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        self.lora.save(model, out_dir)
        save_bnb_layers(model, out_dir, self.name)

    def load(self, base: torch.nn.Module, adapter_dir: Path, cfg: QloraParams, ctx: Context) -> torch.nn.Module:
        if has_saved_layers(adapter_dir):
            restore_bnb_layers(base, adapter_dir, compute_dtype(cfg, ctx))
        else:  # a run saved before the base was kept: re-quantize, as it was then
            self.quantize_base(base, cfg, ctx)
        return self.lora.load(base, adapter_dir, cfg, ctx)

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        return merge_dequantized(model)


METHODS.register(QloraMethod())
