"""Prefix tuning: trained key/value vectors prepended in every attention layer (Li & Liang, 2021)."""
from __future__ import annotations

from pydantic import Field

from adapters.base import Params
from adapters.peft_common import PeftMethod, no_gradient_checkpointing
from adapters.registry import METHODS


class PrefixParams(Params):
    num_virtual_tokens: int = Field(16, ge=1, le=512, description="Prefix length in every layer.")
    projection: bool = Field(False, description="Reparametrise the prefix through an MLP (more stable, more memory).")
    projection_hidden: int = Field(256, ge=1, description="Hidden size of that MLP.")


def prefix_peft_config(cfg: PrefixParams):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
                              prefix_projection=cfg.projection, encoder_hidden_size=cfg.projection_hidden)


METHODS.register(PeftMethod(
    name="prefix",
    summary="Trained key/value prefix in every layer.",
    Config=PrefixParams,
    to_peft_config=prefix_peft_config,
    suggested_lr=3e-3,
    merge_blocker=("prefix tuning adds key/value vectors to every attention layer at run time; "
                   "there is no weight they could be folded into."),
    checks=(no_gradient_checkpointing(
        "the prefix enters through the key/value cache, which checkpointed layers do not carry."),),
))
