"""A prefix every row of a batch shares is computed once, and the loss and gradients are those of
the unshared batch; where sharing would change the maths it is not used."""
from __future__ import annotations

import math

import pytest
import torch

import jobs.training.loss as loss_module
import jobs.training.prefix as prefix_module
from adapters import METHODS
from adapters.base import Context
from helpers import make_spec
from jobs.training import fused, models
from jobs.data.examples import collate, encode
from jobs.spec import parse_spec

LORA = {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}
PROMPT = "you are a careful helper . answer the question in words , then stop . the question is :"


def _rows(n: int = 6) -> list[dict]:
    # Different lengths after the common instruction, so that rows are padded differently.
    return [{"instruction": PROMPT, "input": f"what is {i} plus {' 1' * (1 + i % 3)} ?",
             "output": f"the answer is {i + 1 + i % 3}"} for i in range(n)]


def _batch(src, rows):
    tok = models.load_tokenizer(src)
    return collate(encode(rows, "instruction", tok, 128, "rows"), tok.pad_token_id)


def _model(src, tok, tmp, method: dict, checkpointing: bool = False):
    spec = parse_spec(make_spec(src.path, "unused.jsonl", tmp / "run", method=method))
    method, cfg = spec.method_config()
    ctx = Context(spec=spec, device=torch.device("cpu"), dtype=torch.float32, tokenizer=tok)
    torch.manual_seed(0)
    model = method.apply(models.load_model(src), cfg, ctx)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _loss_and_grads(model, batch, share: bool, saved=None):
    model.zero_grad(set_to_none=True)
    original = prefix_module.shared_prefix
    try:
        if not share:
            prefix_module.shared_prefix = lambda *a: 0
        total, n = loss_module.token_loss_sum(model, batch, 16, saved)
    finally:
        prefix_module.shared_prefix = original
    (total / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(total.detach()) / n, grads


VIRTUAL_TOKENS = ("prefix", "prompt")  # methods that prepend states of their own: never shared


@pytest.fixture(scope="module")
def setting(tiny_model, tmp_path_factory):
    src = models.resolve(str(tiny_model))
    tok = models.load_tokenizer(src)
    return src, tok, _batch(src, _rows()), tmp_path_factory


@pytest.mark.parametrize("name", METHODS.names())
@pytest.mark.slow
def test_shared_prefix_gives_the_unshared_loss_and_gradients(name, setting):
    src, tok, batch, factory = setting
    model = _model(src, tok, factory.mktemp(name), {"name": name})
    shared = prefix_module.shared_prefix(model, batch)
    if name in VIRTUAL_TOKENS:
        assert shared == 0
        return
    assert shared >= prefix_module.SHARED_PREFIX_MIN
    assert (batch["input_ids"][:, :shared] == batch["input_ids"][:1, :shared]).all()
    assert not (batch["input_ids"][:, shared] == batch["input_ids"][0, shared]).all()
    loss, grads = _loss_and_grads(model, batch, share=True)
    ref_loss, ref_grads = _loss_and_grads(model, batch, share=False)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for key, g in grads.items():
        torch.testing.assert_close(g, ref_grads[key], rtol=1e-4, atol=1e-4 * float(ref_grads[key].abs().max()),
                                   msg=key)


def test_shared_prefix_with_the_lean_functions_installed(setting):
    src, tok, batch, factory = setting
    model = _model(src, tok, factory.mktemp("lean"), LORA)
    saved = fused.SavedOutputs()
    fused.install(model, saved)
    loss, grads = _loss_and_grads(model, batch, True, saved)
    ref_loss, ref_grads = _loss_and_grads(model, batch, False, saved)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-4 * float(ref_grads[name].abs().max()))


def test_the_spec_switch_turns_sharing_off(setting):
    src, tok, batch, factory = setting
    model = _model(src, tok, factory.mktemp("switch"), LORA)
    calls = []
    original = prefix_module.shared_prefix_hidden
    prefix_module.shared_prefix_hidden = lambda *a: calls.append(1) or original(*a)
    try:
        loss_module.token_loss_sum(model, batch, 16, None, share_prefix=False)
        assert not calls
        loss_module.token_loss_sum(model, batch, 16)
        assert calls
    finally:
        prefix_module.shared_prefix_hidden = original
    assert parse_spec(make_spec(src.path, "x.jsonl", factory.mktemp("s") / "run")).training.share_prefix is True


def test_the_estimate_probes_with_the_prefix_every_batch_shares(setting, tmp_path):
    from helpers import write_jsonl
    from jobs.estimate.footprint import first_batch

    src, tok, batch, factory = setting
    data = write_jsonl(tmp_path / "rows.jsonl", _rows(24))
    for share in (True, False):
        spec = parse_spec(make_spec(src.path, data, tmp_path / "run", batch_size=6, share_prefix=share))
        found, _ = first_batch(spec, src)
        assert (found.shared >= prefix_module.SHARED_PREFIX_MIN) if share else found.shared == 0


def test_what_is_not_shared(setting):
    src, tok, batch, factory = setting
    tmp = factory.mktemp("not-shared")
    lora = _model(src, tok, tmp, LORA)
    assert prefix_module.shared_prefix(lora, batch) > 0
    assert prefix_module.shared_prefix(_model(src, tok, tmp, {**LORA, "dropout": 0.1}), batch) == 0  # one dropout draw
    assert prefix_module.shared_prefix(_model(src, tok, tmp, LORA, checkpointing=True), batch) == 0  # cache replayed
    assert prefix_module.shared_prefix(lora, {k: v[:1] for k, v in batch.items()}) == 0  # one row
    ids = batch["input_ids"][:2].clone()
    short = dict(batch, input_ids=ids.clone(), attention_mask=batch["attention_mask"][:2])
    short["input_ids"][1, prefix_module.SHARED_PREFIX_MIN - 1] += 1
    assert prefix_module.shared_prefix(lora, short) == 0  # under SHARED_PREFIX_MIN in common
    ids[1, 0] += 1
    assert prefix_module.shared_prefix(lora, dict(short, input_ids=ids)) == 0  # nothing in common


def test_a_prefix_is_shared_only_where_it_saves_enough_of_the_batch():
    """Two rows of 400 tokens: sharing n tokens saves n of the 800 computed. The packed call costs
    a little besides, so a prefix saving under SHARED_PREFIX_MIN_SAVING of the tokens is computed
    per row like the rest."""
    rows, width = 2, 400
    enough = math.ceil(prefix_module.SHARED_PREFIX_MIN_SAVING * rows * width / (rows - 1))
    assert enough > prefix_module.SHARED_PREFIX_MIN  # the fraction decides here, not the minimum
    for n, shared in ((enough - 1, 0), (enough, enough)):
        ids = torch.arange(rows * width).reshape(rows, width)
        ids[1, :n] = ids[0, :n]
        mask = torch.ones_like(ids)
        assert prefix_module.common_prefix(ids, mask) == n
        assert prefix_module.prefix_worth_sharing(ids, mask) == shared, n
