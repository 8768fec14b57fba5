"""Quantized fine-tuning: quantizers, QLoRA, LoftQ, QA-LoRA, PEQA and the quantized export.

The method contract (train, save/load, merge) runs for these methods in test_methods.py;
here are the properties that make each of them what it is.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adapters import METHODS
from adapters.base import Context
from adapters.quant import intgrid, nf4
from adapters.quant.export import load_quantized, save_quantized
from adapters.quant.intgrid import GridLinear
from adapters.quant.targets import held_bytes
from jobs.training import models
from adapters.core.errors import StudioError
from jobs.spec import parse_spec
from helpers import make_spec, toy_rows

# Merges here differ only by fp32 rounding; on tiny models (logits below 1) that stays far under this.
EXACT = 1e-5


def method_config(name: str, **params):
    spec = parse_spec(make_spec("unused", "unused.jsonl", "unused", method={"name": name, **params}))
    return spec.method_config()[1], Context(spec=spec, device=torch.device("cpu"), dtype=torch.float32)


def apply(name: str, model: nn.Module, seed: int = 0, **params) -> nn.Module:
    cfg, ctx = method_config(name, **params)
    torch.manual_seed(seed)
    return METHODS.get(name).apply(model, cfg, ctx)


def wider_llama(hidden: int = 128, seed: int = 0) -> nn.Module:
    """Layers wide enough that bitsandbytes' per-layer code books (about 1 KB) stop dominating the count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def toy_batch(src) -> dict:
    from jobs.data.examples import collate, encode

    tok = models.load_tokenizer(src)
    return collate(encode(toy_rows(8), "instruction", tok, 64, "toy"), tok.pad_token_id)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    src = models.resolve(str(tiny_model))
    return src, toy_batch(src)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def randomize_trainables(model: nn.Module, std: float = 0.05) -> None:
    """Give adapters non-trivial values, so merging has something to fold in."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


# Quantizers.

def test_nf4_round_trip_stays_within_half_a_code_gap():
    w = torch.randn(96, 128) * 0.02
    param = nf4.quantize(w)
    deq = nf4.dequantize(param)
    code = param.quant_state.code.sort().values
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    block_absmax = w.reshape(-1, nf4.BLOCKSIZE).abs().amax(1, keepdim=True)
    err = (deq - w).reshape(-1, nf4.BLOCKSIZE).abs()
    # Double quantization stores each block's absmax in 8 bits: allow 1% on top of the grid error.
    assert (err <= block_absmax * (half_gap + 0.01)).all()
    assert 0.03 < float((deq - w).norm() / w.norm()) < 0.15


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
def test_grid_round_trip_stays_within_half_a_step(bits, group_size):
    w = torch.randn(24, 64)
    codes, scales, zeros = intgrid.quantize_grid(w, bits, group_size)
    assert int(codes.max()) <= 2 ** bits - 1
    assert torch.equal(intgrid.unpack(intgrid.pack(codes, bits), 64), codes)
    step = scales.repeat_interleave(64 // scales.shape[1], dim=1)
    assert ((intgrid.dequantize_grid(codes, scales, zeros) - w).abs() <= step * 0.5001).all()


def test_grid_errors_shrink_with_bits_and_groups():
    w = torch.randn(32, 128)

    def error(bits, group_size=None):
        return float((intgrid.dequantize_grid(*intgrid.quantize_grid(w, bits, group_size)) - w).norm())
    assert error(3) > error(4) > error(8)
    assert error(4, 16) < error(4)
    with pytest.raises(ValueError, match="2-bit"):
        intgrid.quantize_grid(w, 2)


def test_grid_layer_gradients_match_autograd_on_the_dequantized_weight():
    layer = GridLinear.quantize(nn.Linear(64, 24), 4, 16)
    layer.scales.requires_grad_(True)
    x = torch.randn(3, 5, 64, requires_grad=True)
    (layer(x) ** 2).sum().backward()
    scales = layer.scales.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    weight = intgrid.dequantize_grid(layer.codes(), scales, layer.zeros)
    (nn.functional.linear(x2, weight, layer.bias) ** 2).sum().backward()
    torch.testing.assert_close(layer.scales.grad, scales.grad)
    torch.testing.assert_close(x.grad, x2.grad)


# QLoRA.

def test_qlora_base_is_nf4_and_holds_a_fraction_of_loras_base_bytes():
    import bitsandbytes as bnb

    lora = apply("lora", wider_llama())
    qlora = apply("qlora", wider_llama())
    q_layers = [m.get_base_layer() for m in qlora.modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")]
    assert q_layers and all(isinstance(m, bnb.nn.Linear4bit) for m in q_layers)
    assert all(m.weight.quant_state.nested and m.weight.quant_type == "nf4" for m in q_layers)
    assert type(qlora.get_base_model().lm_head) is nn.Linear  # the output head stays full precision
    l_layers = [m.get_base_layer() for m in lora.modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")]
    ratio = sum(map(held_bytes, q_layers)) / sum(map(held_bytes, l_layers))
    assert ratio <= 0.35, ratio
    assert all(".lora_A." in n or ".lora_B." in n for n, p in qlora.named_parameters() if p.requires_grad)


def test_qlora_8bit_base_trains_saves_its_base_and_merges(tiny, tmp_path):
    import bitsandbytes as bnb

    from jobs.training.loss import token_loss_sum

    src, batch = tiny
    cfg, ctx = method_config("qlora", bits=8)
    method = METHODS.get("qlora")
    model = apply("qlora", models.load_model(src), bits=8).train()
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    codes = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    start = {n: p.detach().clone() for n, p in trainable}
    # One SGD step: the adapter moves by exactly -lr times the gradient through the 8-bit base.
    lr = 0.5
    loss = lambda b: token_loss_sum(model, b, 64)[0] / int((b["labels"][:, 1:] != -100).sum())  # noqa: E731
    torch.manual_seed(0)
    grads = torch.autograd.grad(loss(batch), [p for _, p in trainable])
    opt = torch.optim.SGD([p for _, p in trainable], lr=lr)
    torch.manual_seed(0)
    loss(batch).backward()
    opt.step()
    for (n, p), g in zip(trainable, grads):
        torch.testing.assert_close(p.detach(), start[n] - lr * g, rtol=0, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in grads)
    assert all(torch.equal(m.weight.data, codes[n]) for n, m in model.named_modules() if n in codes)

    # The 8-bit base is saved with the adapter and restored bit for bit, not re-quantized.
    randomize_trainables(model)
    expected = logits(model.eval(), batch)
    method.save(model, tmp_path / "adapter")
    reloaded = method.load(models.load_model(src), tmp_path / "adapter", cfg, ctx).eval()
    restored = {n: m.weight.data for n, m in reloaded.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert sorted(restored) == sorted(codes) and all(torch.equal(restored[n], codes[n]) for n in codes)
    assert float((logits(reloaded, batch) - expected).abs().max()) < EXACT
    merged = method.merge(reloaded)
    assert not any(nf4.is_bnb_linear(m) for m in merged.modules())
    assert float((logits(merged, batch) - expected).abs().max()) < EXACT


def test_qlora_keeps_the_nf4_base_it_trained_on(tiny, tmp_path):
    """A bf16 run quantizes the bf16 copy of the base; export loads fp32. Re-quantizing that would
    give other codes and block scales, so loading restores the saved layers instead."""
    src, batch = tiny
    cfg, ctx = method_config("qlora")
    method = METHODS.get("qlora")
    model = apply("qlora", models.load_model(src, torch.bfloat16))
    method.save(model, tmp_path)
    reloaded = method.load(models.load_model(src), tmp_path, cfg, ctx)
    name = "model.layers.0.mlp.down_proj"
    trained = nf4.dequantize(model.get_base_model().get_submodule(name).get_base_layer().weight)
    restored = nf4.dequantize(reloaded.get_base_model().get_submodule(name).get_base_layer().weight)
    fresh = nf4.dequantize(nf4.quantize(models.load_model(src).get_submodule(name).weight))
    assert torch.equal(restored, trained) and not torch.equal(restored, fresh)


# LoftQ.

def loftq_errors(w: torch.Tensor, iterations: int) -> list[float]:
    from adapters.loftq import loftq_init

    start = loftq_init(w, r=8, scaling=2.0, iterations=iterations)
    # The returned adapter really reproduces the last error it reports.
    rebuilt = nf4.dequantize(start.base) + 2.0 * start.lora_B @ start.lora_A
    assert abs(float((rebuilt - w).norm() / w.norm()) - start.errors[-1]) < 1e-4
    return start.errors


def test_loftq_init_beats_plain_nf4_and_improves_with_iterations():
    torch.manual_seed(0)
    # A weight with some low-rank structure, as trained weights have, plus noise.
    w = torch.randn(64, 8) @ torch.randn(8, 128) * 0.01 + torch.randn(64, 128) * 0.02
    plain = float((nf4.dequantize(nf4.quantize(w)) - w).norm() / w.norm())
    errors = loftq_errors(w, iterations=5)
    assert errors[0] < plain
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])) and errors[-1] < errors[0]


def test_loftq_model_starts_closer_to_full_precision_and_keeps_its_base(tiny, tmp_path):
    src, batch = tiny
    full = logits(models.load_model(src), batch)
    qlora_gap = (logits(apply("qlora", models.load_model(src)).eval(), batch) - full).norm()
    model = apply("loftq", models.load_model(src), iterations=3).eval()
    assert (logits(model, batch) - full).norm() < qlora_gap

    # Loading restores the LoftQ base from the adapter folder, not a fresh quantization of the base.
    cfg, ctx = method_config("loftq", iterations=3)
    method = METHODS.get("loftq")
    method.save(model, tmp_path)
    reloaded = method.load(models.load_model(src), tmp_path, cfg, ctx).eval()
    name = "model.layers.0.self_attn.q_proj"
    trained = nf4.dequantize(model.get_base_model().get_submodule(name).get_base_layer().weight)
    restored = nf4.dequantize(reloaded.get_base_model().get_submodule(name).get_base_layer().weight)
    fresh = nf4.dequantize(nf4.quantize(models.load_model(src).get_submodule(name).weight))
    assert torch.equal(restored, trained) and not torch.equal(restored, fresh)
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=1e-6)


# QA-LoRA.

def test_qalora_merges_exactly_into_the_zero_points(tiny, tmp_path):
    from adapters.qalora import QaLoraLinear, merge_into_grids

    src, batch = tiny
    model = apply("qalora", models.load_model(src), group_size=16)
    randomize_trainables(model, std=0.2)
    unmerged = logits(model.eval(), batch)
    grids = {n: (m.base.qweight.clone(), m.base.scales.detach().clone(), m.base.zeros.clone())
             for n, m in model.named_modules() if isinstance(m, QaLoraLinear)}
    quantized = merge_into_grids(model)
    assert not any(isinstance(m, QaLoraLinear) for m in quantized.modules())
    for name, (qweight, scales, zeros) in grids.items():
        layer = quantized.get_submodule(name)
        assert torch.equal(layer.qweight, qweight) and torch.equal(layer.scales, scales)
        assert not torch.equal(layer.zeros, zeros)  # the adapter went into the zeros, nowhere else
    assert float((logits(quantized, batch) - unmerged).abs().max()) < EXACT

    # The quantized model written to disk loads back with the same outputs ...
    save_quantized(quantized, tmp_path / "q")
    assert float((logits(load_quantized(tmp_path / "q"), batch) - unmerged).abs().max()) < EXACT
    # ... and dequantizing it gives the full-precision merged model.
    plain = intgrid.dequantize_grids(quantized)
    assert not any(isinstance(m, GridLinear) for m in plain.modules())
    assert float((logits(plain, batch) - unmerged).abs().max()) < EXACT


def test_bad_grid_configs_say_what_to_change(tiny):
    src, _ = tiny
    with pytest.raises(StudioError, match="2-bit integer grids are not supported"):
        method_config("peqa", bits=2)
    with pytest.raises(StudioError, match=r"group_size 24 does not divide .* layer model\.layers\.0\."):
        apply("qalora", models.load_model(src), group_size=24)
    with pytest.raises(StudioError, match="input should be 4 or 8|Input should be 4 or 8"):
        method_config("qlora", bits=3)


@pytest.mark.parametrize("name", ["qlora", "loftq", "qalora", "peqa"])
def test_gpt2_conv1d_layers_quantize_and_merge_back_to_conv1d(name):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    batch = {"input_ids": torch.randint(0, 128, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    model = apply(name, model)
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    randomize_trainables(model, std=0.01)
    expected = logits(model.eval(), batch)
    merged = METHODS.get(name).merge(model)
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)  # the layout GPT-2 checkpoints use
    assert float((logits(merged, batch) - expected).abs().max()) < EXACT


# PEQA.

@pytest.mark.parametrize("bits,group_size", [(4, None), (3, None), (4, 16)])
def test_peqa_trains_only_the_scales(tiny, bits, group_size):
    from jobs.training.loss import token_loss_sum

    src, batch = tiny
    model = apply("peqa", models.load_model(src), bits=bits, group_size=group_size).train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grids = [m for m in model.modules() if isinstance(m, GridLinear)]
    assert trainable and all(n.endswith(".scales") for n, _ in trainable)
    assert len(trainable) == len(grids) == 14 and all(g.bits == bits for g in grids)
    frozen = {n: t.clone() for n, t in list(model.named_buffers()) + list(model.named_parameters())
              if not n.endswith(".scales")}
    scales = {n: p.detach().clone() for n, p in trainable}
    opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        total, n = token_loss_sum(model, batch, 64)
        (total / n).backward()
        opt.step()
    for n, t in list(model.named_buffers()) + list(model.named_parameters()):
        if n in frozen:
            assert torch.equal(t, frozen[n]), f"{n} changed"
    assert all(not torch.equal(p, scales[n]) for n, p in trainable)


def test_peqa_scales_never_decay_under_any_update_rule(tiny):
    """With a zero gradient every rule's only change is weight decay: PEQA declares that its scales
    (the sizes of whole rows of quantized weights) take none; LoRA's matrices do, by exactly lr x wd."""
    from adapters import UPDATE_RULES
    from adapters.base import decay_rule

    src, _ = tiny
    for rule in ("adamw", "sgd", "adamw_8bit", "lomo", "adalomo", "mezo"):
        for name, shrinks in (("peqa", False), ("lora", True)):
            model = apply(name, models.load_model(src)).train()
            trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            ctx = Context(spec=None, device=torch.device("cpu"), dtype=torch.float32,
                          decays=decay_rule(METHODS.get(name)))
            r = UPDATE_RULES.get(rule)
            stepper = r.build(trainable, r.Config(lr=0.01, weight_decay=0.5), ctx)
            before = {n: p.detach().clone() for n, p in trainable}
            stepper.step([None], lambda _: sum((p * 0).sum() for _, p in trainable), 0.01)  # zero gradient
            for n, p in trainable:
                expected = before[n] * (1 - 0.01 * 0.5) if shrinks and p.ndim >= 2 else before[n]
                torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-9, msg=f"{rule}, {name}: {n}")


# Export, from a real run folder.

@pytest.mark.parametrize("name", ["qlora", "loftq", "qalora", "peqa"])
def test_exports_of_a_trained_run_match_it(name, tiny_model, toy_dataset, tmp_path, studio_home):
    from transformers import AutoModelForCausalLM

    from jobs.results.export import export_merged
    from jobs.results.inference import load_run
    from jobs.training.recipe import train
    from studio.cli import main

    method, run_dir = METHODS.get(name), tmp_path / "run"
    train(parse_spec(make_spec(tiny_model, toy_dataset, run_dir, method={"name": name}, max_steps=2,
                               optimizer={"name": "adamw", "lr": method.suggested_lr},
                               eval_samples=0, exact_match_rows=0)))
    batch = toy_batch(models.resolve(str(tiny_model)))
    expected = logits(load_run(run_dir).model, batch)
    report = export_merged(run_dir, tmp_path / "merged")
    assert 0 <= report["max_abs_logit_diff_vs_trained"] <= report["allowed_diff_vs_trained"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert float((logits(plain, batch) - expected).abs().max()) < EXACT

    if method.to_quantized is None:
        assert main(["export", str(run_dir), "--quantized", str(tmp_path / "q")]) == 2
        assert not (tmp_path / "q").exists()
        return
    assert main(["export", str(run_dir), "--quantized", str(tmp_path / "q")]) == 0
    got = logits(load_quantized(tmp_path / "q"), batch)
    assert float((got - expected).abs().max()) < EXACT
    assert not (tmp_path / "q" / "model.safetensors").exists()  # plain transformers must not half-load it


def test_a_bf16_qlora_run_exports_merged_in_fp32(tiny_model, toy_dataset, tmp_path, studio_home, capsys):
    """A run that computed in bf16 quantized its bf16 copy of the base. The fp32 check multiplies by
    the NF4 codes expanded straight into fp32; a merge that expanded them into bf16 (the dtype they
    were quantized from) rounded the base the trained model never used, and the export refused."""
    import json

    from safetensors import safe_open

    from jobs.training.recipe import train
    from studio.cli import main

    run_dir = tmp_path / "run"
    train(parse_spec(make_spec(tiny_model, toy_dataset, run_dir, method={"name": "qlora"}, max_steps=2,
                               precision="bf16", optimizer={"name": "adamw", "lr": 1e-2},
                               eval_samples=0, exact_match_rows=0)))
    assert main(["export", str(run_dir), "--merged", str(tmp_path / "merged")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trained_dtype"] == "bfloat16" and report["merged_dtype"] == "float32"
    assert report["fingerprint_checked"] is True
    assert 0 <= report["max_abs_logit_diff_vs_trained"] <= report["allowed_diff_vs_trained"]
    assert 0 <= report["max_abs_logit_diff"] <= report["allowed_diff"]
    assert "merged in float32" in report["merge_note"] and "computed in bfloat16" in report["merge_note"]
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_export_quantized_names_the_methods_that_have_one(tiny_model, toy_dataset, tmp_path, studio_home):
    from jobs.results.export import export_quantized
    from jobs.training.recipe import train

    run_dir = tmp_path / "run"
    train(parse_spec(make_spec(tiny_model, toy_dataset, run_dir, max_steps=1, eval_samples=0, exact_match_rows=0)))
    with pytest.raises(StudioError, match="lora has no quantized form.*peqa, qalora"):
        export_quantized(run_dir, tmp_path / "out")


def test_quantizing_methods_copy_the_rest_of_the_base_off_its_file(tiny_model, toy_dataset, tmp_path, studio_home,
                                                                    monkeypatch):
    """After the base's layers are quantized, the tensors left over (embeddings, norms) would keep
    the whole memory-mapped file resident: train() copies them once the method is applied."""
    import jobs.training.memory
    from jobs.training.memory import release_replaced_base
    from jobs.spec import parse_spec
    from jobs.training.recipe import train
    from helpers import make_spec

    src = models.resolve(str(tiny_model))
    model = models.load_model(src)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    release_replaced_base(model, torch.device("cpu"))
    for n, p in model.named_parameters():
        assert p.data_ptr() != before[n][0] and torch.equal(p, before[n][1]), n
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight or \
        not model.config.tie_word_embeddings  # ties survive the copy

    calls = []
    monkeypatch.setattr(jobs.training.memory, "release_replaced_base", lambda m, d: calls.append(type(m).__name__))
    for name in ("lora", "qlora"):
        train(parse_spec(make_spec(tiny_model, toy_dataset, tmp_path / name, method={"name": name}, max_steps=1,
                                   exact_match_rows=0, eval_samples=0)))
    assert len(calls) == 1  # qlora's run only


@pytest.mark.parametrize("autocast", [False, True])
def test_an_int8_layer_computes_the_same_model_in_training_and_evaluation(autocast):
    """The 8-bit base multiplies by its dequantized weight in both modes, as bitsandbytes does only
    when training on a CPU (in eval mode it would quantize the activations too): the output and the
    input's gradient equal bitsandbytes' training path bit for bit, in either mode."""
    import copy

    import bitsandbytes as bnb

    torch.manual_seed(0)
    ours = nf4.linear8bit(nn.Linear(64, 48))
    theirs = copy.deepcopy(ours).train()
    x = torch.randn(2, 5, 64)

    def run(layer, forward):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = forward(layer, xi)
        y.float().pow(2).sum().backward()
        return y.detach(), xi.grad

    expected = run(theirs, bnb.nn.Linear8bitLt.forward)  # on a CPU in training: dequantize, then multiply
    for mode in (True, False):
        got = run(ours.train(mode), type(ours).forward)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), mode
    assert ours.weight.dtype == torch.int8  # the codes stay codes


@pytest.mark.cuda
def test_an_int8_layer_on_a_gpu_multiplies_by_its_dequantized_weight():
    """On a GPU too: not LLM.int8, whose quantized activations would put the trained model about
    1e-2 away from the one its export is checked against on the CPU."""
    torch.manual_seed(0)
    layer = nf4.linear8bit(nn.Linear(256, 128)).to("cuda")
    x = torch.randn(4, 256, device="cuda")
    expected = nn.functional.linear(x, nf4.dequantized_weight(layer), layer.bias)
    for mode in (True, False):
        torch.testing.assert_close(layer.train(mode)(x), expected, rtol=1e-5, atol=1e-5)
