"""The lean RMSNorm and SwiGLU compute what the model's own modules compute, gradients included."""
from __future__ import annotations

import pytest
import torch

from jobs import fused, models
from jobs.data import collate, encode
from jobs.loss import token_loss_sum
from conftest import toy_rows


def _batch(src):
    tok = models.load_tokenizer(src)
    return collate(encode(toy_rows(8), "instruction", tok, 64, "toy"), tok.pad_token_id)


def _loss_and_grads(model, batch, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        total, n = token_loss_sum(model, batch, 64)
    (total / n).backward()
    return float(total.detach() / n), {k: p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_installed_functions_match_the_model(tiny_model, dtype):
    src = models.resolve(str(tiny_model))
    batch = _batch(src)
    model = models.load_model(src)
    loss, grads = _loss_and_grads(model, batch, dtype)
    counts = fused.install(model)
    layers = model.config.num_hidden_layers
    assert counts == {"rms_norm": 2 * layers + 1, "swiglu": layers}
    loss2, grads2 = _loss_and_grads(model, batch, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(loss - loss2) <= tol * max(1.0, abs(loss))
    assert grads.keys() == grads2.keys() and any("norm" in k for k in grads)
    for name, g in grads.items():
        scale = g.abs().max().clamp_min(1e-6)
        assert ((g - grads2[name]).abs().max() / scale) <= (1e-4 if dtype == torch.float32 else 5e-2), name


def test_gradients_of_the_functions_alone():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fused.rms_norm(a, b, 1e-6), (x, w))
    gate = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused.silu_mul, (gate, up))


def test_other_maths_keep_their_own_forward():
    class GemmaLikeRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.zeros(8)), 1e-6

        def forward(self, x):
            x32 = x.float()
            return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)).to(x.dtype)

    class GeluMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = self.up_proj = self.down_proj = torch.nn.Linear(8, 8)
            self.act_fn = torch.nn.GELU()

    model = torch.nn.Sequential(GemmaLikeRMSNorm(), GeluMLP())
    assert fused.install(model) == {"rms_norm": 0, "swiglu": 0}
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[1])
