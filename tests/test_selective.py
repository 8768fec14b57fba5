"""Selective fine-tuning: what each selector picks, what is saved, and the errors a user sees."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adapters import METHODS
from adapters.base import Context
from adapters.selective import CONFIG_FILE, WEIGHTS_FILE, SelectiveParams, block_range, select
from adapters.core.errors import StudioError
from jobs.spec import parse_spec
from jobs.training.recipe import train
from helpers import make_spec, tiny_llama

CPU = Context(spec=None, device=torch.device("cpu"), dtype=torch.float32)
SELECTIVE = METHODS.get("selective")


def gpt2(layers: int = 3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def llama():
    return tiny_llama(vocab_size=96, num_hidden_layers=4).eval()


def picked(model, **cfg) -> list[str]:
    return select(model, SelectiveParams(**cfg))


def test_kinds():
    model = gpt2()
    biases = picked(model, kinds=["biases"])
    assert biases and all(n.endswith(".bias") for n in biases)
    assert len(biases) == sum(n.endswith(".bias") for n, _ in model.named_parameters())
    norms = picked(model, kinds=["norms"])
    assert norms and all(".ln_" in n for n in norms)
    assert picked(model, kinds=["embeddings"]) == ["transformer.wte.weight", "transformer.wpe.weight"]
    # GPT-2's head is tied to the token embedding: one tensor, reported under its first name.
    assert picked(model, kinds=["head"]) == ["transformer.wte.weight"]
    assert picked(llama(), kinds=["head"]) == ["lm_head.weight"]


def test_patterns_glob_and_regex():
    model = llama()
    assert picked(model, patterns=["model.layers.*.mlp.down_proj.weight"]) == [
        f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)]
    assert picked(model, patterns=[r"re:layers\.[23]\.self_attn\.q_proj"]) == [
        "model.layers.2.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight"]


@pytest.mark.parametrize("text,expected", [("-2:", [2, 3]), ("0:2", [0, 1]), ("1", [1]), ("-1", [3]),
                                           (":1", [0]), ("7", []), ("1:-1", [1, 2])])
def test_block_slices(text, expected):
    assert list(block_range(text, 4)) == expected


def test_layers_select_whole_blocks_and_selectors_unite():
    model = llama()
    last = picked(model, layers="-1:")
    assert last and all(n.startswith("model.layers.3.") for n in last)
    assert len(last) == len(list(model.model.layers[3].parameters()))
    union = picked(model, kinds=["embeddings"], layers="-1:")
    assert union == ["model.embed_tokens.weight"] + last


def test_default_is_the_last_two_blocks_only_when_nothing_else_is_chosen():
    assert SelectiveParams().layers == "-2:"
    assert SelectiveParams(kinds=["norms"]).layers is None
    assert SelectiveParams(kinds=["norms"], layers="0").layers == "0"
    spec = parse_spec(make_spec("m", "d.jsonl", "o", method={"name": "selective", "patterns": ["*bias"]}))
    assert spec.method["layers"] is None
    assert parse_spec(spec.resolved()).method == spec.method  # stable through the stored spec


def test_selection_that_matches_nothing_shows_the_names():
    with pytest.raises(StudioError, match=r"matches no parameter.*model\.embed_tokens\.weight.*lm_head\.weight"
                                          r".*4 blocks under model\.layers"):
        SELECTIVE.apply(llama(), SelectiveParams(kinds=["biases"], layers="9"), CPU)


@pytest.mark.parametrize("method,message", [
    ({"patterns": ["re:("]}, "method.patterns.*not a valid regular expression"),
    ({"layers": "last two"}, "method.layers.*not a block slice"),
    ({"layers": None}, "method.layers.*nothing is selected"),
    ({"kinds": ["heads"]}, "method.kinds"),
])
def test_bad_selections_are_spec_errors(method, message):
    with pytest.raises(StudioError, match=message):
        parse_spec(make_spec("m", "d.jsonl", "o", method={"name": "selective", **method}))


def test_apply_trains_exactly_the_selection_in_fp32():
    model = llama().to(torch.bfloat16)
    model = SELECTIVE.apply(model, SelectiveParams(kinds=["norms"]), CPU)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(picked(llama(), kinds=["norms"]))
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if n in trained else torch.bfloat16)


def test_save_holds_only_the_trained_tensors_and_loads_back(tmp_path):
    model = SELECTIVE.apply(gpt2(), SelectiveParams(kinds=["biases"], layers="-1:"), CPU)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits.detach()
    SELECTIVE.save(model, tmp_path)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(load_file(str(tmp_path / WEIGHTS_FILE))) == sorted(trained)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["parameters"] == trained
    reloaded = SELECTIVE.load(gpt2(), tmp_path, SelectiveParams(), CPU)
    merged = SELECTIVE.merge(reloaded)
    assert merged is reloaded and type(merged).__name__ == "GPT2LMHeadModel"
    torch.testing.assert_close(merged(input_ids=ids).logits.detach(), expected, rtol=0, atol=0)
    with pytest.raises(StudioError, match="do not fit this base"):
        SELECTIVE.load(llama(), tmp_path, SelectiveParams(), CPU)


def test_selective_trains_through_the_loop(tiny_model, toy_dataset, tmp_path, studio_home):
    run = train(parse_spec(make_spec(tiny_model, toy_dataset, tmp_path / "run",
                                     method={"name": "selective", "kinds": ["norms"], "layers": "-1:"},
                                     optimizer={"name": "adamw", "lr": 3e-3}, max_steps=6)))
    assert run["status"] == "completed"
    m = run["metrics"]
    # Llama tiny: the last block (2 x 32x32 + 2 x 16x32 attention, 3 x 32x64 MLP, 2 norms) plus
    # every norm (2 per block + the final one).
    assert m["trainable_params"] == (2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 64 + 2 * 32) + 3 * 32
