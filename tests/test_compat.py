"""Pins the behaviour of other libraries that ``adapters.core.compat`` relies on.

Each test states one thing the studio assumes about transformers, peft or bitsandbytes. An
upgrade that changes it fails here, by name, instead of silently changing the maths (a LoRA
layer that stops being bitsandbytes-aware merges into the wrong weights) or the memory.
"""
from __future__ import annotations

import helpers
import pytest
import torch

from adapters.core import compat
from jobs.training import models


def tiny_llama(tie: bool = True):
    return helpers.tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=1, tie_word_embeddings=tie,
                              attn_implementation="sdpa")


def test_a_registered_attention_is_switched_to_through_the_public_api():
    calls = []
    sdpa = compat.sdpa_attention()

    def counting(module, *args, **kwargs):
        calls.append(1)
        return sdpa(module, *args, **kwargs)

    compat.register_attention("studio_compat_probe", counting)
    model = tiny_llama()
    assert compat.attention_of(model) == "sdpa" and compat.can_switch_attention(model)
    compat.set_attention(model, "studio_compat_probe")
    assert compat.attention_of(model) == "studio_compat_probe"
    assert compat.attention_of(model.model) == "studio_compat_probe"  # the inner model follows
    model(input_ids=torch.tensor([[1, 2, 3]]))
    assert calls, "the model did not dispatch to the registered attention"
    assert not compat.can_switch_attention(torch.nn.Linear(2, 2))


def test_an_instance_forward_replaces_the_class_one_for_that_instance_only():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    compat.replace_forward(a, lambda self, x: x * 0 + 7)
    assert torch.equal(a(torch.ones(1, 2)), torch.full((1, 2), 7.0))
    assert not torch.equal(b(torch.ones(1, 2)), torch.full((1, 2), 7.0))
    assert "forward" not in a.state_dict() and "forward" not in vars(b)


def test_a_keyword_of_the_call_reaches_the_attention_and_positions_are_the_callers():
    """The loss's shared prefix (jobs.training.prefix) packs a batch into one sequence: it passes its layout
    as a keyword of the model's call (through peft too), which transformers hands down to the
    attention function, and gives each token its own position, so a packed row attends and
    rotates exactly as the row alone does."""
    from peft import LoraConfig, get_peft_model

    def recording(module, query, key, value, attention_mask, seen=None, **kwargs):
        layouts.append(seen)
        return compat.sdpa_attention()(module, query, key, value, None, **kwargs)

    compat.register_attention("test_recording", recording)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for m in (tiny_llama(), get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))):
        base = compat.bare_model(m)
        whole = m(input_ids=ids).logits
        layouts = []
        compat.set_attention(base, "test_recording")
        packed = m(input_ids=ids, position_ids=torch.arange(6)[None], seen="layout").logits
        gapped = m(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 10, 11, 12]]), seen="layout").logits
        compat.set_attention(base, "sdpa")
        assert layouts == ["layout", "layout"] and compat.attention_of(base) == "sdpa"
        # The positions given are the ones the rotary embedding uses (it sees only their differences).
        torch.testing.assert_close(packed, whole, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(gapped[:, 3:], whole[:, 3:], atol=1e-4)


def test_tied_weight_keys_name_the_output_head():
    assert any("lm_head" in k for k in compat.tied_weight_keys(tiny_llama(tie=True)))


def test_peft_input_casting_is_the_switch_its_own_context_flips():
    """With casting off, an fp32 adapter gets the bf16 input as is (autocast decides the matmul
    dtype): outside autocast that is a dtype error, which shows the switch is really the one used."""
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)
    with disable_input_dtype_casting(model):
        assert not any(m.cast_input_dtype_enabled for m in layers)
    assert all(m.cast_input_dtype_enabled for m in layers)

    layer = layers[0]
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(1, 3, 64, dtype=torch.bfloat16)
    layer(x)  # peft casts x to the adapter's fp32
    compat.keep_peft_input_dtype(model)
    assert not any(m.cast_input_dtype_enabled for m in layers)
    with pytest.raises(RuntimeError):
        layer(x)  # no cast any more
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_peft_picks_bitsandbytes_layers_only_for_a_base_flagged_as_quantized():
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from adapters.quant import nf4
    from adapters.quant.targets import find_linears

    def wrapped(flag: bool):
        model = tiny_llama()
        linears = [(n, m) for n, m in find_linears(model) if n.endswith("q_proj")]
        nf4.quantize_linears(model, linears, 4, torch.float32)  # sets the flag (through compat)
        if not flag:
            compat.unmark_quantized_base(model)
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
        return [type(m) for n, m in peft_model.named_modules() if n.endswith("q_proj")]

    assert all(t is LoraLinear4bit for t in wrapped(True))
    assert not any(t is LoraLinear4bit for t in wrapped(False))


def test_bitsandbytes_caches_its_code_book_by_name():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    assert isinstance(bnb_functional.name2qmap, dict)
    bnb_functional.name2qmap["studio_probe"] = torch.empty(4, device="meta")
    compat.forget_meta_code_books()
    assert "studio_probe" not in bnb_functional.name2qmap


def test_the_gguf_quantizer_can_be_removed():
    """transformers leaves a GGUF-loaded model marked quantized; its quantizer's clean-up is public
    on the quantizer class the studio meets."""
    from transformers.quantizers.base import HfQuantizer

    assert callable(getattr(HfQuantizer, "remove_quantization_config", None))
    model = tiny_llama()
    compat.drop_gguf_quantizer(model)  # an ordinary model: nothing to drop
    assert getattr(model, "hf_quantizer", None) is None


# --- torch's private internals ---------------------------------------------------------------------


def test_a_dispatch_mode_sees_each_aten_op_and_its_outputs_as_leaves():
    seen = []

    class Seeing(compat.dispatch_mode()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen.append((str(func), [tuple(t.shape) for t in compat.tree_leaves(out) if isinstance(t, torch.Tensor)]))
            return out

    a = torch.ones(2, 3)
    with Seeing():
        torch.mm(a, a.t())
    assert ("aten.mm.default", [(2, 2)]) in seen
    assert compat.tree_leaves({"x": (1, [2, 3]), "y": 4}) == [1, 2, 3, 4]


def test_a_tensor_version_counts_in_place_writes():
    t = torch.zeros(3)
    before = compat.tensor_version(t)
    t.add_(1)
    assert compat.tensor_version(t) == before + 1
    assert compat.tensor_version(t + 1) == 0  # a new tensor starts again


def test_forward_hooks_of_either_kind_are_seen():
    for register in ("register_forward_hook", "register_forward_pre_hook"):
        layer = torch.nn.Linear(2, 2)
        assert not compat.has_forward_hooks(layer)
        handle = getattr(layer, register)(lambda *a: None)
        assert compat.has_forward_hooks(layer), register
        handle.remove()
        assert not compat.has_forward_hooks(layer)


@pytest.mark.parametrize("causal", [True, False])
def test_cpu_flash_attention_is_sdpa_with_its_log_sum_exp(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    bias = None if causal else torch.zeros(1, 1, 5, 5).masked_fill_(torch.rand(5, 5) < 0.3, float("-inf"))
    if bias is not None:
        bias[..., 0] = 0  # every row keeps one key
    out, lse = compat.cpu_flash_attention(q, k, v, causal, bias, scale=0.5)
    scores = q @ k.transpose(-1, -2) * 0.5
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf")) if causal else scores + bias
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, scores.softmax(-1) @ v, rtol=1e-4, atol=1e-4)


def test_the_amx_probe_agrees_with_the_cpu_flags():
    import pathlib

    info = pathlib.Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo to compare with")
    assert compat.cpu_has_amx() == (" amx_tile" in info.read_text())
