"""Bottleneck adapters (series and parallel) on the Llama, Qwen2 and GPT-2 families."""
from __future__ import annotations

import json

import pytest
import torch

from adapters import METHODS
from adapters.base import Context
from adapters.bottleneck import CONFIG_FILE, WEIGHTS_FILE, Bottleneck
from adapters.core.errors import CannotMerge, StudioError
from jobs.runfolder import read_metrics
from jobs.spec import parse_spec
from jobs.training.recipe import train
from helpers import make_spec

CPU = Context(spec=None, device=torch.device("cpu"), dtype=torch.float32)
METHOD_NAMES = ["series_adapter", "parallel_adapter"]


def family(name: str, seed: int = 0):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(seed)
    small = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(**small)).eval()
    if name == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**small)).eval()
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def sublayers(model):
    stack = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    attn = [b.attn if hasattr(b, "attn") else b.self_attn for b in stack]
    return attn, [b.mlp for b in stack]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))


def randomise(modules, name: str):
    with torch.no_grad():
        for m in modules:
            getattr(m, name).up.weight.normal_(std=0.5)


@pytest.mark.parametrize("fam", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.slow
def test_adapters_start_as_the_base_and_hook_every_sublayer(fam, name):
    method = METHODS.get(name)
    model = family(fam)
    base = logits(model, IDS)
    model = method.apply(model, method.Config(positions=["attention", "mlp"]), CPU)
    assert torch.equal(logits(model, IDS), base)  # the up projection starts at zero
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(f".{name}." in n for n in trained)
    assert sum(isinstance(m, Bottleneck) for m in model.modules()) == 4  # 2 blocks x 2 sublayers
    attn, mlp = sublayers(model)
    # Each placement is live: non-zero attention adapters alone change the output, then MLP ones.
    randomise(attn, name)
    after_attention = logits(model, IDS)
    assert not torch.allclose(after_attention, base)
    randomise(mlp, name)
    assert not torch.allclose(logits(model, IDS), after_attention)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_sublayer_output_follows_the_placement(name):
    method = METHODS.get(name)
    model = method.apply(family("llama"), method.Config(scaling=2.0, non_linearity="gelu"), CPU)
    mlp = model.model.layers[0].mlp
    adapter = getattr(mlp, name)
    randomise([mlp], name)
    x = torch.randn(2, 5, 32)
    plain = mlp.forward(x)  # forward() skips the hooks: the base sublayer alone
    expected = plain + adapter(plain) if name == "series_adapter" else plain + adapter(x)
    torch.testing.assert_close(mlp(x), expected)
    manual = 2.0 * adapter.up(torch.nn.functional.gelu(adapter.down(plain if name == "series_adapter" else x)))
    torch.testing.assert_close(adapter(plain if name == "series_adapter" else x), manual)


def test_defaults_follow_the_papers():
    series, parallel = METHODS.get("series_adapter").Config(), METHODS.get("parallel_adapter").Config()
    assert series.positions == ["attention", "mlp"] and series.scaling == 1.0
    assert parallel.positions == ["mlp"] and parallel.scaling == 4.0
    model = METHODS.get("parallel_adapter").apply(family("gpt2"), parallel, CPU)
    attn, mlp = sublayers(model)
    assert not any(hasattr(a, "parallel_adapter") for a in attn) and all(hasattr(m, "parallel_adapter") for m in mlp)


def test_half_precision_base_keeps_fp32_adapters():
    method = METHODS.get("series_adapter")
    model = family("llama").to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = logits(model, IDS)
    model = method.apply(model, method.Config(), CPU)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(logits(model, IDS), base)


@pytest.mark.parametrize("fam", ["qwen2", "gpt2"])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_saved_adapter_loads_onto_a_fresh_base(fam, name, tmp_path):
    method = METHODS.get(name)
    cfg = method.Config(bottleneck=8, non_linearity="silu", positions=["mlp", "attention"])
    model = method.apply(family(fam), cfg, CPU)
    attn, mlp = sublayers(model)
    randomise(attn + mlp, name)
    expected = logits(model, IDS)
    method.save(model, tmp_path)
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert saved["method"] == name and saved["config"]["bottleneck"] == 8
    assert saved["config"]["positions"] == ["attention", "mlp"] and saved["adapters"] == 4
    # The folder describes itself: the caller's (default) config does not override it.
    reloaded = method.load(family(fam), tmp_path, method.Config(), CPU)
    torch.testing.assert_close(logits(reloaded, IDS), expected, rtol=0, atol=0)


def test_load_refuses_a_foreign_folder(tmp_path):
    series, parallel = METHODS.get("series_adapter"), METHODS.get("parallel_adapter")
    series.save(series.apply(family("llama"), series.Config(), CPU), tmp_path)
    with pytest.raises(StudioError, match="series_adapter"):
        parallel.load(family("llama"), tmp_path, parallel.Config(), CPU)
    with pytest.raises(StudioError, match="width 32"):
        series.load(wider_llama(), tmp_path, series.Config(), CPU)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(StudioError, match="incomplete"):
        series.load(family("llama"), tmp_path, series.Config(), CPU)


def wider_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_merge_is_refused_with_the_reason(name):
    method = METHODS.get(name)
    assert "non-linearity" in method.merge_blocker
    with pytest.raises(CannotMerge, match="export the adapter"):
        method.merge(method.apply(family("llama"), method.Config(), CPU))


def test_model_without_blocks_is_refused():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(StudioError, match="no list of transformer blocks.*proj"):
        METHODS.get("series_adapter").apply(Flat(), METHODS.get("series_adapter").Config(), CPU)


def test_bad_settings_are_spec_errors():
    with pytest.raises(StudioError, match="non_linearity"):
        parse_spec(make_spec("m", "d.jsonl", "o", method={"name": "series_adapter", "non_linearity": "swish"}))
    with pytest.raises(StudioError, match="bottleneck"):
        parse_spec(make_spec("m", "d.jsonl", "o", method={"name": "parallel_adapter", "bottleneck": 0}))
    spec = parse_spec(make_spec("m", "d.jsonl", "o", method={"name": "series_adapter", "positions": ["mlp", "mlp"]}))
    assert spec.method["positions"] == ["mlp"]


def test_series_adapter_steps_through_the_loop_reloads_as_trained_and_exports_as_adapter(
        tiny_model, toy_dataset, tmp_path, studio_home):
    """Whether 12 steps lower the loss depends on the CPU's arithmetic and the learning rate; that the
    loop trains the adapters (the up projections leave zero) and the reload is the trained model does not."""
    from jobs.results.export import export_adapter, export_merged
    from jobs.results.inference import load_run

    out = tmp_path / "run"
    run = train(parse_spec(make_spec(tiny_model, toy_dataset, out, method={"name": "series_adapter"},
                                     optimizer={"name": "adamw", "lr": 1e-2}, max_steps=3)))
    assert run["status"] == "completed"
    assert len([r for r in read_metrics(out) if "loss" in r]) == 3
    assert (out / "adapter" / WEIGHTS_FILE).is_file() and (out / "adapter" / CONFIG_FILE).is_file()
    loaded = load_run(out)  # checked against the trained fingerprint
    assert loaded.check["max_abs_logit_diff_vs_trained"] <= loaded.check["allowed_diff_vs_trained"]
    adapters = [m for m in loaded.model.modules() if isinstance(m, Bottleneck)]
    assert len(adapters) == 4
    ups = [p for m in adapters for n, p in m.named_parameters() if "up" in n and n.endswith("weight")]
    assert ups and all(float(p.abs().max()) > 0 for p in ups)  # they start at zero
    with pytest.raises(CannotMerge, match="non-linearity"):
        export_merged(out, tmp_path / "merged")
    assert export_adapter(out, tmp_path / "adapter")["method"] == "series_adapter"
