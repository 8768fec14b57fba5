"""The method contract: every registered method joins as one row.

For each method on a tiny Llama: only its intended parameters train (everything else is
bit-for-bit unchanged), one AdamW step through the update rule is exactly AdamW's first step
on the method's gradient (so it points downhill: its product with the gradient is negative),
the saved state loads back onto a fresh base with identical outputs, and merging either stays
within the method's own tolerance or refuses with the method's reason. Whether a few steps
lower the loss on a tiny random model depends on the learning rate and the CPU's arithmetic,
so that is not what is asserted.
"""
from __future__ import annotations

import pytest
import torch

from adapters import METHODS, UPDATE_RULES
from adapters.base import Context, Method, decays_by_default
from jobs.training import models
from jobs.data.examples import collate, encode
from adapters.core.errors import CannotMerge
from jobs.training.loss import token_loss_sum
from jobs.spec import parse_spec
from helpers import make_spec, toy_rows



@pytest.fixture(scope="module")
def setting(tiny_model, tmp_path_factory):
    src = models.resolve(str(tiny_model))
    tok = models.load_tokenizer(src)
    examples = encode(toy_rows(16), "instruction", tok, 64, "toy")
    batch = collate(examples, tok.pad_token_id)
    return src, tok, batch, tmp_path_factory


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def build(name: str, src, tok, tmp, seed: int = 0):
    method = METHODS.get(name)
    spec = parse_spec(make_spec(src.path, "unused.jsonl", tmp / "run", method={"name": name},
                                optimizer={"name": "adamw", "lr": method.suggested_lr}))
    _, cfg = spec.method_config()
    ctx = Context(spec=spec, device=torch.device("cpu"), dtype=torch.float32, tokenizer=tok)
    torch.manual_seed(seed)
    model = method.apply(models.load_model(src), cfg, ctx)
    return method, cfg, ctx, spec, model


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name, setting):
    src, tok, batch, factory = setting
    tmp = factory.mktemp(name)
    method, cfg, ctx, spec, model = build(name, src, tok, tmp)
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, f"{name} trains nothing"
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable}

    rule, rcfg = spec.optimizer_config()
    stepper = rule.build(trainable, rcfg, ctx)
    n_trained = int((batch["labels"][:, 1:] != -100).sum())

    def loss_fn(b):
        return token_loss_sum(model, b, 64)[0] / n_trained
    torch.manual_seed(1)  # the step below sees the same dropout masks
    grads = torch.autograd.grad(loss_fn(batch), [p for _, p in trainable], allow_unused=True)
    torch.manual_seed(1)
    stepper.step([batch], loss_fn, rcfg.lr)

    # AdamW's first step: bias-corrected moments are g and g², so each value moves by
    # -lr·g/(|g| + eps), after clipping the global norm.
    norm = sum(float(g.double().pow(2).sum()) for g in grads if g is not None) ** 0.5
    clip = min(1.0, rcfg.max_grad_norm / (norm + 1e-6)) if rcfg.max_grad_norm > 0 else 1.0
    descent = 0.0
    for (n, p), g in zip(trainable, grads):
        if g is None:
            assert torch.equal(p, start[n]), f"{name}: {n} has no gradient but moved"
            continue
        g = g.double() * clip
        expected = start[n].double() - rcfg.lr * g / (g.abs() + rcfg.eps)
        # Relative to the step, which is at most lr per value (an absolute 1e-6 was 2-5% of a
        # 2e-5 step): 0.1% of lr, plus the one fp32 rounding of the new value that no step undoes.
        err = (p.detach().double() - expected).abs()
        tol = 1e-3 * rcfg.lr + start[n].double().abs() * 2.0 ** -23
        assert bool((err <= tol).all()), \
            f"{name}: {n} is off AdamW's first step by up to {float(err.max()) / rcfg.lr:.2%} of lr"
        descent += float(((p.detach().double() - start[n].double()) * g).sum())
    assert descent < 0, f"{name}: the step does not point downhill"

    # Only the intended parameters moved.
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{name}: frozen {n} changed"
    assert any(not torch.equal(p, start[n]) for n, p in trainable)
    # One step at a real learning rate barely moves an adapter: give the trained tensors visible
    # values so that save/load and merging have something to carry.
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for _, p in trainable:
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.eval()

    # Save -> load onto a fresh base gives the same outputs.
    expected = logits_of(model, batch)
    method.save(model, tmp / "adapter")
    reloaded = method.load(models.load_model(src), tmp / "adapter", cfg, ctx).eval()
    torch.testing.assert_close(logits_of(reloaded, batch), expected, rtol=0, atol=1e-6)

    # Merge within the method's own tolerance, or refuse with its reason.
    if method.merge_blocker:
        with pytest.raises(CannotMerge, match="adapter"):
            method.merge(reloaded)
    else:
        merged = method.merge(reloaded)
        names = [n for n, _ in merged.named_modules()]
        assert not any(part in n for n in names for part in method.merged_away)
        diff = float((logits_of(merged, batch) - expected).abs().max())
        assert diff <= max(method.merge_tolerance, 1e-6), f"{name}: merged logits differ by {diff}"


@pytest.mark.parametrize("name", ["lora", "dora", "ia3"])
def test_merge_equivalence_fp32(name, setting):
    """Merged fp32 logits match the unmerged model within 1e-4 (issue's bar), on trained weights."""
    src, tok, batch, factory = setting
    tmp = factory.mktemp(f"merge-{name}")
    method, cfg, ctx, spec, model = build(name, src, tok, tmp, seed=1)
    # Give the adapter non-trivial values so the merge has something to fold in.
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    unmerged = logits_of(model, batch)
    merged = method.merge(model)
    assert float((logits_of(merged, batch) - unmerged).abs().max()) < 1e-4


def test_every_update_rule_is_registered():
    assert {"adamw", "sgd", "adamw_8bit", "paged_adamw_8bit", "lomo", "adalomo", "mezo"} <= set(UPDATE_RULES.names())


@pytest.mark.parametrize("name", METHODS.names())
def test_method_declares_what_it_is(name, setting):
    """Every method states, in its own file (or by the Protocol's default), what the jobs side
    would otherwise have to know by its name."""
    src, tok, batch, factory = setting
    method = METHODS.get(name)
    assert Method in type(method).__mro__, f"{name} does not subclass adapters.base.Method (no defaults)"
    assert method.base_dtype in ("compute", "fp32")
    assert models.frozen_base_dtype(method, torch.bfloat16) == (torch.float32 if method.base_dtype == "fp32"
                                                                else torch.bfloat16)
    if method.memory_twin is not None:  # the estimator's stand-in exists and accepts this method's config
        twin = METHODS.get(method.memory_twin)
        assert twin.memory_twin is None and twin.name != name
        shared = {k: v for k, v in method.Config().model_dump().items() if k in twin.Config.model_fields}
        twin.Config(**shared)  # as jobs/estimate/footprint.py builds it
    assert method.fingerprint_tolerance is None or method.fingerprint_tolerance > 0
    assert method.to_quantized is None or callable(method.to_quantized)
    assert isinstance(method.merged_away, tuple) and all(isinstance(p, str) and p for p in method.merged_away)
    assert isinstance(method.decays("w", torch.zeros(2, 2)), bool)

    # What a merge must remove is really there before it (so the export's check can fire).
    if method.merged_away:
        _, _, _, _, model = build(name, src, tok, factory.mktemp(f"declares-{name}"))
        names = [n for n, _ in model.named_modules()]
        assert all(any(part in n for n in names) for part in method.merged_away), name


def test_decays_default_is_matrices_only():
    assert decays_by_default("w", torch.zeros(2, 2)) and not decays_by_default("b", torch.zeros(2))
    assert METHODS.get("lora").decays("w", torch.zeros(2, 2)) and not METHODS.get("lora").decays("b", torch.zeros(2))
