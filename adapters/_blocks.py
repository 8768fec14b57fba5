"""Where a causal LM keeps its transformer blocks, found by structure rather than by family name.

Llama, Qwen2, Mistral and Gemma call the stack ``model.layers`` with ``self_attn``/``mlp``
inside; GPT-2 calls it ``transformer.h`` with ``attn``/``mlp``; GPT-NeoX ``gpt_neox.layers``
with ``attention``/``mlp``. Looking for the longest ``ModuleList`` of blocks covers them all
without a table per family.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.core.errors import StudioError

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class Blocks:
    prefix: str                      # e.g. "model.layers"
    modules: list[torch.nn.Module]

    def __len__(self) -> int:
        return len(self.modules)

    def index_of(self, param_name: str) -> int | None:
        """Block number of a parameter name, or None when it lies outside the blocks."""
        head = self.prefix + "."
        if not param_name.startswith(head):
            return None
        number = param_name[len(head):].split(".", 1)[0]
        return int(number) if number.isdigit() else None


def child_named(module: torch.nn.Module, names: tuple[str, ...]) -> tuple[str, torch.nn.Module] | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, torch.nn.Module):
            return name, child
    return None


def find_blocks(model: torch.nn.Module, need_sublayers: bool = False) -> Blocks | None:
    """The longest ModuleList of blocks with attention and MLP children; without such a list
    (and unless ``need_sublayers``), the longest ModuleList at all."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    # A mixture-of-experts MLP holds a longer list (its experts) than the block stack itself.
    blocks = [(n, m) for n, m in lists
              if all(child_named(b, ATTENTION_NAMES) and child_named(b, MLP_NAMES) for b in m)]
    candidates = blocks or ([] if need_sublayers else lists)
    if not candidates:
        return None
    name, found = max(candidates, key=lambda item: len(item[1]))
    return Blocks(name, list(found))


def require_blocks(model: torch.nn.Module, method: str, need_sublayers: bool = False) -> Blocks:
    blocks = find_blocks(model, need_sublayers)
    if blocks is not None:
        return blocks
    looked_for = (f" holding an attention ({', '.join(ATTENTION_NAMES)}) and an MLP ({', '.join(MLP_NAMES)}) child"
                  if need_sublayers else "")
    sample = ", ".join(n for n, _ in list(model.named_modules())[1:8])
    raise StudioError(f"{method} found no list of transformer blocks{looked_for} in this model "
                      f"(its modules begin: {sample}).", "model",
                      "use a decoder-only model of a supported family (Llama, Qwen2, Mistral, GPT-2, ...), "
                      "or a method that does not depend on the block layout, such as lora.")
