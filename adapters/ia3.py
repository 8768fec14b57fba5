"""IA3: learned scaling vectors on keys, values and the MLP (Liu et al., 2022)."""
from __future__ import annotations

from pydantic import Field

from adapters.base import Params
from adapters.peft_common import PeftMethod
from adapters.registry import METHODS


class Ia3Params(Params):
    target_modules: list[str] | None = Field(
        None, description="Modules to scale; empty uses peft's per-architecture default (k, v, down).")
    feedforward_modules: list[str] | None = Field(
        None, description="Which of target_modules are MLP layers (scaled on their input).")


def ia3_peft_config(cfg: Ia3Params):
    from peft import IA3Config

    return IA3Config(task_type="CAUSAL_LM", target_modules=cfg.target_modules,
                     feedforward_modules=cfg.feedforward_modules)


METHODS.register(PeftMethod(
    name="ia3",
    summary="Learned scaling vectors on keys, values and MLP inputs; merges exactly.",
    Config=Ia3Params,
    to_peft_config=ia3_peft_config,
    suggested_lr=3e-3,
    merged_away=("ia3_", "base_layer"),
))
