"""bitsandbytes 4-bit (NF4/FP4) and 8-bit base layers: build, dequantize, save and restore.

The same quantizer serves QLoRA (quantize the loaded base) and LoftQ (quantize residuals
inside its alternating loop), so the base LoftQ optimises against is exactly the one that
trains. Everything here works on whatever device the weights are on (bitsandbytes >= 0.50
runs NF4 and int8 on the CPU).
"""
from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from adapters.core import compat
from adapters.quant.targets import is_conv1d, linear_weight, plain_linear, set_module

# bitsandbytes' own default: one absmax per 64 weights (QLoRA paper).
BLOCKSIZE = 64


def _bnb():
    import bitsandbytes as bnb

    return bnb


def quantize(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True):
    """Quantize a (out, in) weight; returns the bitsandbytes Params4bit (packed codes + quant state)."""
    bnb = _bnb()
    packed, state = bnb.functional.quantize_4bit(weight.detach().contiguous(), blocksize=BLOCKSIZE,
                                                 compress_statistics=double_quant, quant_type=quant_type)
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
                             compress_statistics=double_quant, quant_type=quant_type, bnb_quantized=True)


def dequantize(param) -> torch.Tensor:
    """The fp32 weight a 4-bit parameter stands for: exactly what its forward pass multiplies an fp32
    input by (bitsandbytes expands the codes straight into the input's dtype).

    Not ``dequantize_4bit(param.data, param.quant_state)``: that expands into the dtype the weight
    was quantized from, so a base quantized from its bf16 copy would come back rounded to bf16, a
    weight the fp32 forward never multiplies by (a merged bf16 QLoRA run then differed from the
    unmerged one by 1.4% of its largest logit on SmolLM2).
    """
    state = copy.copy(param.quant_state)
    state.dtype = torch.float32
    return _bnb().functional.dequantize_4bit(param.data, state)


def linear4bit(param, bias: torch.Tensor | None, compute_dtype: torch.dtype, from_conv1d: bool = False) -> nn.Module:
    bnb = _bnb()
    out_features, in_features = param.quant_state.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=param.compress_statistics, quant_type=param.quant_type,
                              device="meta")
    # bitsandbytes repacks CPU weights into a bf16 kernel layout at the first eval-mode forward; that
    # mutates the frozen weight and computes in bf16, so fp32 runs would no longer match training.
    layer.support_avx512bf16_for_cpu = False
    param.module = layer
    layer.weight = param
    layer.quant_state = param.quant_state
    layer.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
    layer.from_conv1d = from_conv1d  # so merging restores the layout the model expects
    return layer.to(param.device)


def _int8_weight(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An LLM.int8 weight in ``dtype``: each row's int8 codes times that row's absmax over 127."""
    return codes.to(dtype).mul_(scales.unsqueeze(1).mul(1.0 / 127.0))


class _Int8Product(torch.autograd.Function):
    """``x @ W.T + bias`` for a frozen int8 weight, dequantized in x's dtype for the product and
    again in backward for x's gradient, never kept."""

    @staticmethod
    def forward(ctx, x, codes, scales, bias):
        ctx.dtype = x.dtype
        ctx.save_for_backward(codes, scales)
        return nn.functional.linear(x, _int8_weight(codes, scales, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        codes, scales = ctx.saved_tensors
        grad_x = torch.matmul(grad.to(ctx.dtype), _int8_weight(codes, scales, ctx.dtype)) \
            if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


@functools.cache
def _int8_linear_class() -> type:
    bnb = _bnb()

    class Int8Linear(bnb.nn.Linear8bitLt):
        """bitsandbytes' int8 layer (its storage, saving and loading) computing with its dequantized
        weight, on every device and in both modes.

        bitsandbytes itself does that only when training on a CPU; in eval mode, and on a GPU in
        both modes, it runs LLM.int8, which quantizes the activations too. The fingerprint is
        recorded on the training device and exports are checked on the CPU: the model that trained
        must be the one that evaluation, the fingerprint and the export measure, wherever each runs.
        """

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.weight.dtype != torch.int8:  # made on a GPU from a float weight: quantize it now
                codes, scales, _ = bnb.functional.int8_vectorwise_quant(self.weight.data.to(torch.float16))
                self.weight.data, self.weight.SCB = codes, scales
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return _Int8Product.apply(x, self.weight.data, int8_scales(self), bias)

    return Int8Linear


def int8_scales(module: nn.Module) -> torch.Tensor:
    """An int8 layer's per-row scales: on its weight until bitsandbytes' own forward moves them to
    the layer's state."""
    return module.weight.SCB if module.weight.SCB is not None else module.state.SCB


def linear8bit(module: nn.Module) -> nn.Module:
    """LLM.int8 row-wise weight quantization; threshold 0: no fp16 outlier columns, all weights int8."""
    bnb = _bnb()
    weight = linear_weight(module)
    out_features, in_features = weight.shape
    layer = _int8_linear_class()(in_features, out_features, bias=module.bias is not None,
                                 has_fp16_weights=False, threshold=0.0, device="meta")
    layer.weight = bnb.nn.Int8Params(weight.contiguous().clone(), requires_grad=False, has_fp16_weights=False)
    layer.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    layer.from_conv1d = is_conv1d(module)
    return layer.to(weight.device)  # moving an Int8Params from the CPU quantizes it (on a GPU, its first forward)


def is_bnb_linear(module: nn.Module) -> bool:
    try:
        bnb = _bnb()
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 (out, in) weight a bitsandbytes layer multiplies by."""
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear4bit):
        return dequantize(module.weight)
    if isinstance(module, bnb.nn.Linear8bitLt):
        return _int8_weight(module.weight.data, int8_scales(module).float(), torch.float32)
    raise TypeError(f"not a bitsandbytes layer: {type(module).__name__}")


def dequantize_linear(module: nn.Module, delta: torch.Tensor | None = None) -> nn.Module:
    """A plain fp32 layer computing what a bitsandbytes layer computes, plus an optional (out, in) update."""
    weight = dequantized_weight(module)
    if delta is not None:
        weight = weight + delta.float()
    return plain_linear(weight, module.bias, getattr(module, "from_conv1d", False))


def returner(linears: list[tuple[str, nn.Module]]):
    """Trims the CPU heap as a quantizing loop frees each layer's full-precision temporaries.

    Without it glibc keeps them, and applying QLoRA or LoftQ to SmolLM2 peaked 0.1-0.3 GB
    higher from one run to the next (the peak of a quantizing method on the CPU is this loop).
    """
    from adapters.core.memory import HeapReturner

    device = linear_weight(linears[0][1]).device if linears else torch.device("meta")
    return HeapReturner(device, every=64 * 2**20)


def quantize_linears(model: nn.Module, linears: list[tuple[str, nn.Module]], bits: int,
                     compute_dtype: torch.dtype, quant_type: str = "nf4", double_quant: bool = True) -> None:
    """Replace each listed layer by its 4-bit or 8-bit bitsandbytes counterpart, in place."""
    heap = returner(linears)
    for name, module in linears:
        if bits == 8:
            new = linear8bit(module)
        else:
            new = linear4bit(quantize(linear_weight(module), quant_type, double_quant), module.bias, compute_dtype,
                             is_conv1d(module))
        set_module(model, name, new)
        heap.freed(4 * linear_weight(module).numel())
    # peft picks its bitsandbytes-aware LoRA layers only for models flagged as loaded this way.
    compat.mark_quantized_base(model, bits)


def dequantize_all(model: nn.Module) -> nn.Module:
    """Swap every bitsandbytes layer left in ``model`` for its fp32 equivalent, in place."""
    for name, module in [(n, m) for n, m in model.named_modules() if is_bnb_linear(m)]:
        set_module(model, name, dequantize_linear(module))
    compat.unmark_quantized_base(model)
    return model


def state_of(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that rebuild a bitsandbytes layer's weight bit for bit: 4-bit packed codes + quant
    state, or 8-bit codes + their per-row scales (SCB)."""
    bnb = _bnb()
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return {"weight": layer.weight.data.contiguous(), "SCB": int8_scales(layer).contiguous()}
    return {"weight": layer.weight.data.contiguous(),
            **{k: v.contiguous() for k, v in layer.weight.quant_state.as_dict(packed=True).items()}}


def _int8_from_state(tensors: dict[str, torch.Tensor], like: nn.Module) -> nn.Module:
    bnb = _bnb()
    codes, scb = tensors["weight"], tensors["SCB"]
    if tuple(codes.shape) != tuple(linear_weight(like).shape):
        raise ValueError(f"saved 8-bit weight has shape {tuple(codes.shape)}, the base layer "
                         f"{tuple(linear_weight(like).shape)}")
    out_features, in_features = codes.shape
    layer = _int8_linear_class()(in_features, out_features, bias=like.bias is not None,
                                 has_fp16_weights=False, threshold=0.0, device="meta")
    layer.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scb)
    layer.bias = None if like.bias is None else nn.Parameter(like.bias.detach().clone(), requires_grad=False)
    layer.from_conv1d = is_conv1d(like)
    return layer.to(like.weight.device)  # already int8: moving keeps the codes and their scales


def from_state(tensors: dict[str, torch.Tensor], like: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """The layer saved by ``state_of``, in place of the fp layer ``like`` (whose bias it keeps)."""
    if "SCB" in tensors:
        return _int8_from_state(tensors, like)
    bnb = _bnb()
    stats = {k: v for k, v in tensors.items() if k != "weight"}
    param = bnb.nn.Params4bit.from_prequantized(tensors["weight"], stats, requires_grad=False,
                                                device=like.weight.device)
    if tuple(param.quant_state.shape) != tuple(linear_weight(like).shape):
        raise ValueError(f"saved 4-bit weight has shape {tuple(param.quant_state.shape)}, "
                         f"the base layer {tuple(linear_weight(like).shape)}")
    return linear4bit(param, like.bias, compute_dtype, is_conv1d(like))
