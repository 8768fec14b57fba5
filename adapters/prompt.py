"""Prompt tuning: trained soft-prompt embeddings prepended to the input (Lester et al., 2021)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from adapters.base import Context, Params
from adapters.peft_common import PeftMethod
from adapters.registry import METHODS


class PromptParams(Params):
    num_virtual_tokens: int = Field(16, ge=1, le=512, description="Soft-prompt length.")
    init: Literal["random", "text"] = Field("random", description="Start from random vectors or from the embeddings of init_text.")
    init_text: str = Field("", description="Text whose token embeddings initialise the prompt (init: text).")

    @model_validator(mode="after")
    def _text_needs_text(self):
        if self.init == "text" and not self.init_text.strip():
            raise ValueError("init: text needs a non-empty init_text")
        return self


def prompt_peft_config(cfg: PromptParams):
    from peft import PromptTuningConfig

    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens)


def init_from_text(model: torch.nn.Module, cfg: PromptParams, ctx: Context) -> None:
    # peft's own text init reloads a tokenizer by name, which a GGUF or offline model
    # cannot give it; our tokenizer is already loaded, so copy the embeddings here.
    if cfg.init != "text":
        return
    ids = ctx.tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
    ids = (ids * (cfg.num_virtual_tokens // max(len(ids), 1) + 1))[: cfg.num_virtual_tokens]
    emb = model.get_input_embeddings().weight
    encoder = model.prompt_encoder[model.active_adapter]
    with torch.no_grad():
        encoder.embedding.weight.copy_(emb[torch.tensor(ids)].to(encoder.embedding.weight.dtype))


METHODS.register(PeftMethod(
    name="prompt",
    summary="Trained soft-prompt embeddings before the input.",
    Config=PromptParams,
    to_peft_config=prompt_peft_config,
    suggested_lr=1e-2,
    after_apply=init_from_text,
    merge_blocker=("prompt tuning prepends learned embeddings that are not tokens of the vocabulary; "
                   "no weight of the model can stand in for them."),
))
