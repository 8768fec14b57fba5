"""PEQA: fine-tune only the quantization scales of a low-bit integer model (Kim et al., 2023).

Each chosen linear layer becomes an integer grid, W = scale * (q - zero), with one scale per
output row (or per row and ``group_size`` inputs). The integer codes and zero points are
frozen buffers; the scales are the only trained parameters, so the trained model is
itself a quantized model and the adapter is a few numbers per row. The adapter folder
holds the grid layers (codes, zeros and trained scales), so loading never re-quantizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from adapters.base import Context, Method, Params, ShardingBlocker
from adapters.quant.intgrid import GridBits, GridLinear, dequantize_grids
from adapters.quant.saved import restore_grid_layers, save_grid_layers
from adapters.quant.targets import check_groups, find_linears, set_module
from adapters.registry import METHODS


class PeqaParams(Params):
    bits: GridBits = Field(4, description="Width of the integer grid (3 to 8 bits; the paper uses 3 and 4).")
    group_size: int | None = Field(
        None, ge=2, description="Inputs sharing one scale; empty = one scale per output channel (the paper's "
                                "default). Groups quantize more finely and train more scales.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Linear layers to quantize and tune: 'all-linear' (all but the output head) "
                                  "or a list of module names.")


@dataclass(frozen=True)
class PeqaMethod(Method):
    name: str = "peqa"
    fsdp_blocker: ShardingBlocker | None = ShardingBlocker(
        "its trained tensors are the scales of integer grids, which FSDP2 is not verified to shard and gather exactly",
        "use lora with sharding: fsdp, or peqa with sharding: none")
    summary: str = "Low-bit integer base whose per-channel scales alone train; the result stays quantized."
    Config: type[Params] = PeqaParams
    # Per unit of the largest logit: the merged model holds exactly the weights the grid dequantizes to.
    merge_tolerance: float = 1e-5
    merge_blocker: str | None = None
    # A scale moves a whole row of weights at once, so it takes smaller steps than an adapter's weights.
    suggested_lr: float = 5e-5

    def check(self, cfg: PeqaParams, spec: Any) -> None:
        pass

    def decays(self, name: str, param: torch.Tensor) -> bool:
        # The scales are the quantized weights' sizes, one per row (or group): decaying them would
        # shrink whole rows of the model towards zero, not regularise a free parameter.
        return False

    def apply(self, model: nn.Module, cfg: PeqaParams, ctx: Context) -> nn.Module:
        model.requires_grad_(False)
        linears = find_linears(model, cfg.target_modules)
        check_groups(linears, cfg.group_size, "method.group_size")
        for name, module in linears:
            grid = GridLinear.quantize(module, cfg.bits, cfg.group_size)
            grid.scales.requires_grad_(True)
            set_module(model, name, grid)
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        save_grid_layers(model, out_dir, self.name)

    def load(self, base: nn.Module, adapter_dir: Path, cfg: PeqaParams, ctx: Context) -> nn.Module:
        return restore_grid_layers(base, adapter_dir)

    def merge(self, model: nn.Module) -> nn.Module:
        return dequantize_grids(model)

    def to_quantized(self, model: nn.Module) -> nn.Module:
        return model  # already the quantized model, with its tuned scales


METHODS.register(PeqaMethod())
