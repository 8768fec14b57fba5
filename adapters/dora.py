"""DoRA: LoRA on the direction of each weight plus a trained per-column magnitude (Liu et al., 2024)."""
from __future__ import annotations

from adapters.lora import LoraParams, lora_peft_config
from adapters.peft_common import PeftMethod
from adapters.registry import METHODS


class DoraParams(LoraParams):
    pass


METHODS.register(PeftMethod(
    name="dora",
    summary="LoRA on the weight direction plus a trained magnitude vector; merges exactly.",
    Config=DoraParams,
    to_peft_config=lambda cfg: lora_peft_config(cfg, use_dora=True),
    merged_away=("lora_", "base_layer"),
))
