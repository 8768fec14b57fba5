"""The lean RMSNorm and SwiGLU compute what the model's own modules compute, gradients included."""
from __future__ import annotations

import pytest
import torch

from adapters.core import compat
from jobs.training import fused, models
from jobs.data.examples import collate, encode
from jobs.training.loss import token_loss_sum
from helpers import toy_rows


def _batch(src):
    tok = models.load_tokenizer(src)
    return collate(encode(toy_rows(8), "instruction", tok, 64, "toy"), tok.pad_token_id)


def _loss_and_grads(model, batch, dtype, saved=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        total, n = token_loss_sum(model, batch, 64, saved)
    (total / n).backward()
    return float(total.detach() / n), {k: p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_installed_functions_match_the_model(tiny_model, dtype):
    src = models.resolve(str(tiny_model))
    batch = _batch(src)
    model = models.load_model(src)
    loss, grads = _loss_and_grads(model, batch, dtype)
    saved = fused.SavedOutputs()
    counts = fused.install(model, saved)
    layers = model.config.num_hidden_layers
    assert counts == {"rms_norm": 2 * layers + 1, "swiglu": layers, "attention": 1}
    loss2, grads2 = _loss_and_grads(model, batch, dtype, saved)
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


def _reference_attention(q, k, v, keep, scale):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.slow
def test_short_attention_matches_plain_attention(masked):
    torch.manual_seed(0)
    b, h, hk, t, d = 2, 6, 2, 7, 8  # grouped-query heads
    q = torch.randn(b, t, h, d, dtype=torch.float64).transpose(1, 2).requires_grad_()  # as the model lays it out
    k = torch.randn(b, hk, t, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hk, t, d, dtype=torch.float64, requires_grad=True)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    keep = None
    if masked:  # the second row is padded after 4 tokens, as collate pads
        valid = torch.tensor([[True] * t, [True] * 4 + [False] * (t - 4)])
        keep = (causal & valid[:, None, :])[:, None]
    fn = lambda a, b_, c: fused._ShortAttention.apply(a, b_, c, keep, d ** -0.5)
    expected = _reference_attention(q, k, v, causal if keep is None else keep, d ** -0.5)
    torch.testing.assert_close(fn(q, k, v), expected)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_short_attention_is_used_only_where_it_pays(tiny_model):
    """bf16 autocast training on the CPU takes it; fp32, inference and long rows keep SDPA."""
    src = models.resolve(str(tiny_model))
    model = models.load_model(src)
    fused.install(model)
    assert compat.attention_of(model) == fused.ATTENTION
    calls = []
    original = fused._ShortAttention.apply
    fused._ShortAttention.apply = lambda *a: calls.append(a[0].shape[2]) or original(*a)
    try:
        batch = _batch(src)
        for dtype, grad in ((torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True)):
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                token_loss_sum(model, batch, 64)
        assert calls and set(calls) == {batch["input_ids"].shape[1]}
        calls.clear()
        long = torch.randint(0, model.config.vocab_size, (1, fused.SHORT_ROWS + 1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            token_loss_sum(model, {"input_ids": long, "attention_mask": torch.ones_like(long), "labels": long}, 64)
        assert not calls
    finally:
        fused._ShortAttention.apply = original


def test_rebuilt_outputs_give_the_same_gradients_and_keep_less(tiny_model):
    """LoRA's adapters keep their input; for a norm's or SwiGLU's output that input is rebuilt in
    backward instead: bit for bit the same gradients, fewer bytes kept."""
    from peft import LoraConfig, get_peft_model

    src = models.resolve(str(tiny_model))
    batch = _batch(src)
    model = get_peft_model(models.load_model(src), LoraConfig(r=4, target_modules="all-linear"))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # lora_B starts at zero: give every gradient a path
    saved = fused.SavedOutputs()
    fused.install(model, saved)
    kept = []

    def saved_and_grads(rebuild):
        kept.clear()
        with saved.observing(lambda t: kept.append(t.untyped_storage())), \
                torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            _, grads = _loss_and_grads(model, batch, torch.float32, saved if rebuild else None)
        return sum({s.data_ptr(): s.nbytes() for s in kept}.values()), grads

    plain_bytes, plain = saved_and_grads(False)
    lean_bytes, lean = saved_and_grads(True)
    assert plain.keys() == lean.keys() and any("lora_A" in k for k in plain)
    for name, g in plain.items():
        assert torch.equal(g, lean[name]), name
    assert lean_bytes < 0.8 * plain_bytes


def test_a_recipe_does_not_outlive_its_output():
    """An output nothing saved (a checkpointed block's inner tensors) takes its recipe, and with
    it the inputs the recipe would rebuild from, when it dies; not only when the forward ends."""
    import weakref

    saved = fused.SavedOutputs()
    gate, up = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    with saved.rebuilding():
        inner = gate * 2  # made inside the block, like a projection's output
        out = fused.silu_mul(inner, up, saved)
        assert out.data_ptr() in saved.rebuild
        gone = weakref.ref(inner)
        del out, inner
        assert not saved.rebuild and gone() is None


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
    assert fused.install(model) == {"rms_norm": 0, "swiglu": 0, "attention": 0}
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[1])


def test_two_installed_models_do_not_share_their_state(tiny_model):
    """The rebuild state is the object the caller hands over, not the module's: rebuilding for one
    model leaves another's outputs alone."""
    src = models.resolve(str(tiny_model))
    a_saved, b_saved = fused.SavedOutputs(), fused.SavedOutputs()
    a, b = models.load_model(src), models.load_model(src)
    fused.install(a, a_saved)
    fused.install(b, b_saved)
    ids = torch.tensor([[1, 2, 3, 4]])
    with a_saved.rebuilding():
        # Kept alive, so its recipe stays registered (a dead output's is dropped at once).
        normed = a.model(input_ids=ids).last_hidden_state
        b.model(input_ids=ids).last_hidden_state.sum()
        assert normed.data_ptr() in a_saved.rebuild and b_saved.rebuild is None
