"""LoftQ: QLoRA whose NF4 base and LoRA start together close to the full-precision weights (Li et al., 2023).

For each adapted layer with weight W, alternate for ``iterations`` steps:
quantize what the adapter does not cover, Q = NF4(W - B·A), then refit the adapter to
what quantization lost, B·A = best rank-r approximation of W - Q (truncated SVD). The
result is a quantized base Q plus an adapter such that Q + B·A ~ W, where plain QLoRA
starts from Q = NF4(W) and B·A = 0. The quantizer is the one the base trains with, on
whatever device the weights are (peft's own LoftQ requires CUDA).

The base is changed by this initialisation, so it is part of the result: the adapter
folder holds the NF4 layers themselves (packed codes + quantization state, about half a
byte per weight) and loading restores them instead of re-running LoftQ. Re-running it
would be deterministic only for identical inputs, and a run trained from a bf16 base on a
GPU is exported from an fp32 base on the CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from adapters.core import compat
from adapters.base import Context, Method, Params, ShardingBlocker
from adapters.lora import lora_peft_config
from adapters.peft_common import PeftMethod
from adapters.qlora import Nf4Params, compute_dtype, merge_dequantized
from adapters.quant import nf4
from adapters.quant.saved import restore_bnb_layers, save_bnb_layers
from adapters.quant.targets import find_linears, is_conv1d, linear_weight, set_module
from adapters.registry import METHODS


class LoftqParams(Nf4Params):
    iterations: int = Field(
        1, ge=1, le=20, description="Alternating quantize/SVD steps; each lowers the starting error a little "
                                    "more (SmolLM2: 7% below plain NF4 after 1, 13% after 5) at one SVD per layer.")


@dataclass
class LoftqInit:
    base: Any                 # the NF4 Params4bit of the last step
    lora_A: torch.Tensor      # (r, in)
    lora_B: torch.Tensor      # (out, r)
    errors: list[float]       # relative error |W - Q - scaling·B·A| / |W| after each step


def top_singular(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k leading singular triplets of m, exactly, from the eigenvectors of its smaller Gram matrix.

    Several times faster on the CPU than a full SVD of a (576, 1536) layer, and LoftQ needs one per
    layer and iteration. The Gram matrix is formed in float64 so squaring the singular values
    costs no accuracy in the leading ones.
    """
    tall = m.shape[0] > m.shape[1]
    a = (m.t() if tall else m).double()
    _, vectors = torch.linalg.eigh(a @ a.t())  # ascending eigenvalues
    u = vectors[:, -k:].flip(-1)
    p = u.t() @ a                              # (k, n): rows are s_i * v_i
    s = p.norm(dim=1)
    vh = p / s.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    u, s, vh = u.to(m.dtype), s.to(m.dtype), vh.to(m.dtype)
    return (vh.t(), s, u.t()) if tall else (u, s, vh)


def loftq_init(weight: torch.Tensor, r: int, scaling: float, iterations: int, quant_type: str = "nf4",
               double_quant: bool = True) -> LoftqInit:
    """LoftQ for one (out, in) weight; the adapter is returned pre-divided by ``scaling``."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    k = min(r, out_features, in_features)
    lowrank = torch.zeros_like(w)
    errors = []
    for _ in range(iterations):
        # Quantized in the weight's own dtype, as plain QLoRA would quantize it.
        base = nf4.quantize((w - lowrank).to(weight.dtype), quant_type, double_quant)
        lost = w - nf4.dequantize(base)
        u, s, vh = top_singular(lost, k)
        lowrank = (u * s) @ vh
        errors.append(float(torch.linalg.norm(lost - lowrank) / torch.linalg.norm(w)))
    # Split the singular values evenly between the factors so both start at the same scale.
    root = (s / scaling).sqrt()
    lora_a = torch.zeros(r, in_features, device=w.device)
    lora_b = torch.zeros(out_features, r, device=w.device)
    lora_a[:k] = root[:, None] * vh
    lora_b[:, :k] = u * root
    return LoftqInit(base, lora_a, lora_b, errors)


def lora_scaling(cfg: LoftqParams) -> float:
    return cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)


@dataclass(frozen=True)
class LoftqMethod(Method):
    name: str = "loftq"
    fsdp_blocker: ShardingBlocker | None = ShardingBlocker(
        "its initialisation needs the real weights (an SVD of each quantization error), which the processes that build the model on the meta device do not have, and its base is quantized like QLoRA's",
        "use lora with sharding: fsdp, or loftq with sharding: none")
    summary: str = "QLoRA with a base and adapter initialised together to match the full-precision weights."
    Config: type[Params] = LoftqParams
    merge_tolerance: float = 1e-4  # as QLoRA: the same dequantized weights on both sides
    merge_blocker: str | None = None
    suggested_lr: float = 2e-4
    # Its initialisation needs an SVD of real weights; QLoRA holds the same tensors on the meta device.
    memory_twin: str | None = "qlora"
    merged_away: tuple[str, ...] = ("lora_", "base_layer")
    lora: PeftMethod = field(default_factory=lambda: PeftMethod(
        name="loftq", summary="", Config=LoftqParams, to_peft_config=lora_peft_config))

    def check(self, cfg: LoftqParams, spec: Any) -> None:
        self.lora.check(cfg, spec)

    def apply(self, model: torch.nn.Module, cfg: LoftqParams, ctx: Context) -> torch.nn.Module:
        model.requires_grad_(False)
        adapted = {n for n, _ in find_linears(model, cfg.target_modules)}
        dtype = compute_dtype(cfg, ctx)
        starts: dict[str, LoftqInit] = {}
        linears = find_linears(model)
        heap = nf4.returner(linears)
        for name, module in linears:
            if name in adapted:
                starts[name] = loftq_init(linear_weight(module), cfg.r, lora_scaling(cfg), cfg.iterations,
                                          cfg.quant_type, cfg.double_quant)
                base = starts[name].base
            else:  # layers without an adapter are quantized as in QLoRA
                base = nf4.quantize(linear_weight(module), cfg.quant_type, cfg.double_quant)
            set_module(model, name, nf4.linear4bit(base, module.bias, dtype, is_conv1d(module)))
            heap.freed(4 * linear_weight(module).numel())
        compat.mark_quantized_base(model, 4)
        wrapped = self.lora.apply(model, cfg, ctx)
        inner = wrapped.get_base_model()
        with torch.no_grad():
            for name, start in starts.items():
                layer = inner.get_submodule(name)
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                a.copy_(start.lora_A.to(a.device, a.dtype))
                b.copy_(start.lora_B.to(b.device, b.dtype))
        return wrapped

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        self.lora.save(model, out_dir)
        save_bnb_layers(model, out_dir, self.name)

    def load(self, base: torch.nn.Module, adapter_dir: Path, cfg: LoftqParams, ctx: Context) -> torch.nn.Module:
        restore_bnb_layers(base, adapter_dir, compute_dtype(cfg, ctx))
        return self.lora.load(base, adapter_dir, cfg, ctx)

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        return merge_dequantized(model)


METHODS.register(LoftqMethod())
