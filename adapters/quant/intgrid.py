"""Uniform integer grids with a scale and a zero point per output row (or per row and input group).

A weight is stored as codes ``q`` in [0, 2^bits - 1] and dequantized as ``scale * (q - zero)``,
with one (scale, zero) per row and per ``group_size`` consecutive inputs. PEQA trains the
scales with codes and zeros frozen; QA-LoRA folds its adapter into the zeros. Zeros are
kept as floats rather than rounded to integers: rounding them moves the whole grid by up to
half a step for no gain here (the studio has no integer kernels), and a merged QA-LoRA
adapter makes them fractional anyway.

Codes of 4 bits or fewer are packed two to a byte, so 3- and 4-bit layers hold half a byte
per weight. ``GridLinear`` recomputes the dequantized weight in forward and again in
backward instead of keeping it for backward: autograd would otherwise hold one full
precision copy of every layer until the backward pass, the memory quantization saves.
"""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import AfterValidator
from torch import nn

from adapters.quant.targets import is_conv1d, linear_weight, outermost, plain_linear, set_module

# Below 3 bits a plain min-max grid loses too much for fine-tuning to recover (PEQA's lowest is 3).
MIN_BITS, MAX_BITS = 3, 8


def check_bits(bits: int) -> int:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{bits}-bit integer grids are not supported; use {MIN_BITS} to {MAX_BITS} bits "
                         f"(4 is the usual choice, 3 the smallest that still fine-tunes well)")
    return bits


# A config field for grid widths, validated with the message above.
GridBits = Annotated[int, AfterValidator(check_bits)]


def _groups(in_features: int, group_size: int | None) -> tuple[int, int]:
    g = group_size or in_features
    return in_features // g, g


def quantize_grid(weight: torch.Tensor, bits: int, group_size: int | None = None):
    """(out, in) weight -> (codes uint8 (out, in), scales (out, n_groups), zeros (out, n_groups)).

    Min-max grid per group, so every weight is within half a step (scale / 2) of its code.
    """
    check_bits(bits)
    out_features, in_features = weight.shape
    n_groups, g = _groups(in_features, group_size)
    if n_groups * g != in_features:
        raise ValueError(f"group size {g} does not divide {in_features} inputs")
    w = weight.detach().float().reshape(out_features, n_groups, g)
    lo, hi = w.amin(-1), w.amax(-1)
    levels = 2 ** bits - 1
    scales = (hi - lo) / levels
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # a constant group: any scale is exact
    zeros = -lo / scales
    codes = torch.clamp(torch.round(w / scales[..., None] + zeros[..., None]), 0, levels)
    return codes.to(torch.uint8).reshape(out_features, in_features), scales, zeros


def dequantize_grid(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    out_features, in_features = codes.shape
    n_groups = scales.shape[-1]
    q = codes.float().reshape(out_features, n_groups, in_features // n_groups)
    return ((q - zeros[..., None]) * scales[..., None]).reshape(out_features, in_features)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Two codes per byte when they fit in 4 bits and the row splits into pairs."""
    if bits > 4 or codes.shape[-1] % 2:
        return codes.contiguous()
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    if packed.shape[-1] == in_features:
        return packed
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], in_features)


class _GridMatmul(torch.autograd.Function):
    """x @ W.T with W = scale * (q - zero), rebuilt from the codes in backward."""

    @staticmethod
    def forward(ctx, x, packed, scales, zeros, in_features):
        weight = dequantize_grid(unpack(packed, in_features), scales, zeros)
        ctx.in_features = in_features
        ctx.save_for_backward(x if scales.requires_grad else None, packed, scales, zeros)
        return nn.functional.linear(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, packed, scales, zeros = ctx.saved_tensors
        codes = unpack(packed, ctx.in_features)
        grad_x = grad_scales = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_grid(codes, scales, zeros)
            grad_x = grad_out @ weight.to(grad_out.dtype)
        if ctx.needs_input_grad[2]:
            # d loss / d scale = sum over the group of (d loss / d W) * (q - zero).
            out_features, n_groups = scales.shape
            grad_w = grad_out.reshape(-1, out_features).float().t() @ x.reshape(-1, ctx.in_features).float()
            offsets = codes.float().reshape(out_features, n_groups, -1) - zeros[..., None]
            grad_scales = (grad_w.reshape(out_features, n_groups, -1) * offsets).sum(-1)
        return grad_x, None, grad_scales, None, None


class GridLinear(nn.Module):
    """A linear layer whose weight is an integer grid: codes and zeros are buffers, scales a parameter
    (frozen unless a method unfreezes it), bias kept as is."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 bias: bool = True, device=None, from_conv1d: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.from_conv1d = bits, group_size, from_conv1d
        n_groups, _ = _groups(in_features, group_size)
        packed_width = in_features // 2 if bits <= 4 and in_features % 2 == 0 else in_features
        self.register_buffer("qweight", torch.zeros(out_features, packed_width, dtype=torch.uint8, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, device=device))
        self.scales = nn.Parameter(torch.ones(out_features, n_groups, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def shell_like(cls, module: nn.Module, bits: int, group_size: int | None) -> "GridLinear":
        """An empty layer shaped like ``module`` (to load saved codes into), keeping its bias."""
        out_features, in_features = linear_weight(module).shape
        layer = cls(in_features, out_features, bits, group_size, bias=module.bias is not None,
                    device=module.weight.device, from_conv1d=is_conv1d(module))
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return layer

    @classmethod
    def quantize(cls, module: nn.Module, bits: int, group_size: int | None) -> "GridLinear":
        layer = cls.shell_like(module, bits, group_size)
        codes, scales, zeros = quantize_grid(linear_weight(module), bits, group_size)
        with torch.no_grad():
            layer.qweight.copy_(pack(codes, bits))
            layer.scales.copy_(scales)
            layer.zeros.copy_(zeros)
        return layer

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.in_features)

    def dequantized(self) -> torch.Tensor:
        return dequantize_grid(self.codes(), self.scales.detach(), self.zeros)

    def to_plain(self) -> nn.Module:
        """The fp32 layer this grid stands for (what the merged full-precision model holds)."""
        return plain_linear(self.dequantized(), self.bias, self.from_conv1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _GridMatmul.apply(x, self.qweight, self.scales, self.zeros, self.in_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size or self.in_features}, bias={self.bias is not None}")


def dequantize_grids(model: nn.Module) -> nn.Module:
    """Replace every grid layer by the fp32 layer it stands for, in place."""
    for name, layer in outermost(model, (GridLinear,)).items():
        set_module(model, name, layer.to_plain())
    return model
