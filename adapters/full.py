"""Full fine-tuning: every weight trains; the result is a whole model folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters.core import compat
from adapters.base import Context, Method, Params
from adapters.registry import METHODS


class FullParams(Params):
    pass


@dataclass(frozen=True)
class FullMethod(Method):
    name: str = "full"
    summary: str = "Every weight trains; nothing to merge."
    Config: type[Params] = FullParams
    merge_tolerance: float = 0.0
    merge_blocker: str | None = None
    suggested_lr: float = 2e-5
    # Every weight trains, so the base loads in fp32 (the masters) whatever the compute dtype.
    base_dtype: str = "fp32"

    def check(self, cfg: Params, spec: Any) -> None:
        pass

    def apply(self, model: torch.nn.Module, cfg: Params, ctx: Context) -> torch.nn.Module:
        model.requires_grad_(True)
        return model

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        model.save_pretrained(str(out_dir), safe_serialization=True)

    def load(self, base: torch.nn.Module, adapter_dir: Path, cfg: Params, ctx: Context) -> torch.nn.Module:
        from safetensors.torch import load_file

        state = {}
        for f in sorted(Path(adapter_dir).glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing, unexpected = base.load_state_dict(state, strict=False)
        # Tied output weights are saved once; anything else missing is a broken folder.
        missing = [k for k in missing if k not in compat.tied_weight_keys(base)]
        if missing or unexpected:
            raise RuntimeError(f"{adapter_dir}: weights do not match the base model "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return base

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


METHODS.register(FullMethod())
