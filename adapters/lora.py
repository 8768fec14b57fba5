"""LoRA: a trainable low-rank update B·A beside each chosen linear layer (Hu et al., 2021)."""
from __future__ import annotations

from pydantic import Field

from adapters.base import Params
from adapters.peft_common import PeftMethod
from adapters.registry import METHODS


class LoraParams(Params):
    r: int = Field(8, ge=1, le=1024, description="Rank of the update; 8-16 suits most tasks.")
    alpha: float = Field(16, gt=0, description="Scale numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input (0 keeps steps deterministic).")
    target_modules: str | list[str] = Field(
        "all-linear", description="Linear layers to adapt: 'all-linear' or a list of module names.")
    rslora: bool = Field(False, description="Scale by alpha / sqrt(r) (rank-stabilised LoRA).")


def lora_peft_config(cfg: LoraParams, **extra):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=cfg.target_modules, use_rslora=cfg.rslora, **extra)


METHODS.register(PeftMethod(
    name="lora",
    summary="Low-rank update beside each linear layer; merges exactly.",
    Config=LoraParams,
    to_peft_config=lora_peft_config,
    merged_away=("lora_", "base_layer"),
))
