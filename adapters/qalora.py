"""QA-LoRA: LoRA that merges exactly into a group-wise quantized base (Xu et al., 2023).

The base's linear layers become integer grids with one scale and zero point per row and
per ``group_size`` inputs. The adapter sees its input average-pooled over the same groups
(A has in_features / group_size columns), so its update B·A·pool is constant within each
group: exactly a shift of that group's zero point. Merging therefore leaves a quantized
model with the same codes and scales and new (fractional) zeros, and dequantizing it
gives the full-precision merged model.

The quantized layers (codes, scales, zeros) and the adapter are saved together in the
adapter folder, so loading and export use the very grids that trained.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from adapters.base import Context, Method, Params, ShardingBlocker
from adapters.lora import LoraParams
from adapters.quant.intgrid import GridBits, GridLinear, dequantize_grids
from adapters.quant.saved import restore_grid_layers, save_grid_layers
from adapters.quant.targets import check_groups, find_linears, outermost, set_module
from adapters.registry import METHODS


class QaloraParams(LoraParams):
    bits: GridBits = Field(4, description="Width of the base's integer grid (3 to 8 bits).")
    group_size: int = Field(
        32, ge=2, description="Inputs sharing one scale and zero point; must divide every layer's input width. "
                              "Smaller groups quantize more finely and give the adapter more columns.")


class QaLoraLinear(nn.Module):
    """A frozen grid layer plus a LoRA update computed from the group-pooled input."""

    def __init__(self, base: GridLinear, cfg: QaloraParams):
        super().__init__()
        self.base = base
        self.n_groups = base.scales.shape[1]
        self.group_size = base.in_features // self.n_groups
        device = base.qweight.device
        self.lora_A = nn.Linear(self.n_groups, cfg.r, bias=False, device=device)  # nn.Linear's Kaiming init
        self.lora_B = nn.Linear(cfg.r, base.out_features, bias=False, device=device)
        nn.init.zeros_(self.lora_B.weight)  # so the wrapped model equals the quantized base at step 0
        self.scaling = cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        pooled = self.dropout(x).reshape(*x.shape[:-1], self.n_groups, self.group_size).mean(-1)
        update = self.lora_B(self.lora_A(pooled.to(self.lora_A.weight.dtype))) * self.scaling
        return y + update.to(y.dtype)

    @torch.no_grad()
    def merged(self) -> GridLinear:
        """The base grid with the adapter folded into its zero points (codes and scales unchanged).

        The update adds scaling·(B·A)[o, j] / group_size to every weight of row o, group j, and
        scale·(q - zero) grows by d exactly when zero shrinks by d / scale.
        """
        shift = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * (self.scaling / self.group_size)
        self.base.zeros.sub_(shift / self.base.scales.float())
        return self.base


def merge_into_grids(model: nn.Module) -> nn.Module:
    """Replace every QA-LoRA layer by its merged grid layer, in place: the merged quantized model."""
    for name, layer in outermost(model, (QaLoraLinear,)).items():
        set_module(model, name, layer.merged())
    return model


@dataclass(frozen=True)
class QaloraMethod(Method):
    name: str = "qalora"
    fsdp_blocker: ShardingBlocker | None = ShardingBlocker(
        "its base is an integer grid with group scales, which FSDP2 is not verified to shard and gather exactly",
        "use lora with sharding: fsdp, or qalora with sharding: none")
    summary: str = "LoRA on group-pooled inputs over an integer-grid base; merges into the quantized model."
    Config: type[Params] = QaloraParams
    # Per unit of the largest logit. Merging shifts float zero points, so merged and unmerged differ
    # by fp32 rounding only: 1.1e-4 absolute at logits ~32 on SmolLM2 (3e-6 relative).
    merge_tolerance: float = 1e-4
    merge_blocker: str | None = None
    suggested_lr: float = 2e-4  # as LoRA: the pooled input keeps the adapter's scale comparable

    def check(self, cfg: QaloraParams, spec: Any) -> None:
        pass

    def apply(self, model: nn.Module, cfg: QaloraParams, ctx: Context) -> nn.Module:
        model.requires_grad_(False)
        linears = find_linears(model)
        check_groups(linears, cfg.group_size, "method.group_size")
        adapted = {n for n, _ in find_linears(model, cfg.target_modules)}
        for name, module in linears:
            grid = GridLinear.quantize(module, cfg.bits, cfg.group_size)
            set_module(model, name, QaLoraLinear(grid, cfg) if name in adapted else grid)
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        save_grid_layers(model, out_dir, self.name, adapters=(QaLoraLinear,))

    def load(self, base: nn.Module, adapter_dir: Path, cfg: QaloraParams, ctx: Context) -> nn.Module:
        return restore_grid_layers(base, adapter_dir, wrap=lambda grid: QaLoraLinear(grid, cfg))

    def merge(self, model: nn.Module) -> nn.Module:
        return dequantize_grids(merge_into_grids(model))

    def to_quantized(self, model: nn.Module) -> nn.Module:
        return merge_into_grids(model)


METHODS.register(QaloraMethod())
