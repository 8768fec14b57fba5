"""Leaner RMSNorm and SwiGLU for training: the model's own maths, fewer saved activations.

A Llama-style RMSNorm computes in fp32 and autograd keeps every intermediate: the fp32
input, the normalised fp32 tensor, its cast and the product with the weight. The SwiGLU
MLP keeps gate, up, silu(gate) and their product. Per token and layer of SmolLM2 in bf16
that is about a third of all saved activations for the norms and another sixth for the MLP.
The autograd functions here save only their inputs (and one fp32 scale per token) and
recompute the rest in backward, which costs little next to the matmuls and runs fewer
elementwise passes in forward.

``install(model)`` replaces the ``forward`` of the modules it recognises on that instance
only; saved models and exports are untouched. A norm is replaced only after its own output
on a probe input matched ours, so a variant with other maths (Gemma's ``1 + weight``) keeps
its own forward.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = _wide(x)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = _wide(x) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            normed = xhat.to(x.dtype)
            grad_weight = _wide(grad * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = _wide(grad * weight)
            grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        return grad_gate, grad_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SiluMul.apply(gate, up)


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _is_rms_norm(module: torch.nn.Module) -> bool:
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) or weight.ndim != 1:
        return False
    if not isinstance(eps, float):
        return False
    probe = torch.randn(2, 3, weight.shape[0], dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        theirs, ours = module(probe), rms_norm(probe, weight, eps)
    return theirs.dtype == ours.dtype and torch.allclose(theirs.float(), ours.float(), rtol=1e-3, atol=1e-3)


def _is_swiglu(module: torch.nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    if not callable(act) or not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    probe = torch.linspace(-6, 6, 97)
    with torch.no_grad():
        return torch.allclose(act(probe), F.silu(probe), rtol=1e-5, atol=1e-6)


def install(model: torch.nn.Module) -> dict[str, int]:
    """Use the lean functions in ``model``'s recognised norms and MLPs; how many of each."""
    counts = {"rms_norm": 0, "swiglu": 0}
    for module in model.modules():
        if _is_rms_norm(module):
            module.forward = types.MethodType(_norm_forward, module)
            counts["rms_norm"] += 1
        elif _is_swiglu(module):
            module.forward = types.MethodType(_mlp_forward, module)
            counts["swiglu"] += 1
    return counts
