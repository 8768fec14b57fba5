"""The memory-saving update rules: LOMO, AdaLomo and MeZO, alone, through the loop, and the
combinations their checks refuse."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from adapters import METHODS, UPDATE_RULES
from adapters.base import Context, RuleMemory, UpdateRule
from adapters.mezo import seeded_noise
from adapters.core.errors import StudioError
from jobs.runfolder import read_metrics
from jobs.spec import check_combination, parse_spec
from jobs.training.recipe import train
from helpers import make_spec, mean_loss, stepper_for, tiny_llama

CPU = Context(spec=None, device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 120, (4, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def max_diff(a, b) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def roundtrip(state: dict) -> dict:
    """Through torch.save / weights_only load, as checkpoints store optimizer state."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --- the contract every rule joins ----------------------------------------------------------


def _tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for v in state.values():
            yield from _tensors(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from _tensors(v)


@pytest.mark.parametrize("rule", UPDATE_RULES.names())
def test_rule_declares_its_memory_and_holds_what_it_declares(rule, batch):
    """The estimator reads each rule's own ``memory``: after a step, the state the rule keeps is
    the bytes it declares (on the tiny model every tensor is under bitsandbytes' 8-bit minimum,
    so 8-bit AdamW keeps fp32 moments there, as its declaration says), and a rule that holds no
    gradients leaves none on the weights."""
    r = UPDATE_RULES.get(rule)
    assert UpdateRule in type(r).__mro__, f"{rule} does not subclass adapters.base.UpdateRule"
    assert isinstance(r.memory, RuleMemory) and r.memory.gradients in ("all", "one", "none")
    model = tiny_llama()
    stepper, cfg = stepper_for(rule, model, **({"momentum": 0.9} if "momentum" in r.Config.model_fields else {}))
    stepper.step([batch], mean_loss(model), 1e-3)
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    held = sum(t.numel() * t.element_size() for t in _tensors(stepper.state_dict()) if t.numel() > 1)
    assert held == r.memory.state_bytes(shapes, cfg)
    assert r.memory.temporaries(1 << 20) >= 0
    if r.memory.gradients != "all":
        assert all(p.grad is None for p in model.parameters())


def test_adamw_steps_with_torchs_fused_kernel_in_place(batch):
    """AdamW runs torch's fused kernel (one in-place pass per tensor; the default CPU loop is
    several times slower and allocates per tensor), and so declares no temporaries."""
    model = tiny_llama()
    stepper, _ = stepper_for("adamw", model)
    assert stepper.optimizer.defaults["fused"] is True
    assert UPDATE_RULES.get("adamw").memory.temporaries(1 << 20) == 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        stepper.step([batch], mean_loss(model), 1e-3)
    seen = {e.key for e in prof.key_averages()}
    assert "aten::_fused_adamw_" in seen, sorted(k for k in seen if "adam" in k)


# --- LOMO -------------------------------------------------------------------------------

def test_lomo_equals_sgd_without_clipping(batch):
    base = tiny_llama()
    lomo_model, sgd_model = copy.deepcopy(base), copy.deepcopy(base)
    lomo, _ = stepper_for("lomo", lomo_model, lr=0.1, max_grad_norm=0)
    sgd, _ = stepper_for("sgd", sgd_model, lr=0.1)
    for _ in range(2):
        lomo.step([batch], mean_loss(lomo_model), 0.1)
        sgd.step([batch], mean_loss(sgd_model), 0.1)
    assert max_diff(base, lomo_model) > 1e-3
    assert max_diff(lomo_model, sgd_model) == 0.0


def test_lomo_two_pass_clipping_equals_clipped_sgd_with_the_same_dropout(batch):
    base = tiny_llama(attention_dropout=0.3)
    base.train()
    lomo_model, sgd_model = copy.deepcopy(base), copy.deepcopy(base)
    lomo, _ = stepper_for("lomo", lomo_model, lr=0.1, max_grad_norm=0.05)
    sgd, _ = stepper_for("sgd", sgd_model, lr=0.1, max_grad_norm=0.05)
    torch.manual_seed(7)
    lomo.step([batch], mean_loss(lomo_model), 0.1)
    torch.manual_seed(7)
    sgd.step([batch], mean_loss(sgd_model), 0.1)
    # The norm is far above 0.05, so clipping is active; the second pass replays the first's masks.
    torch.testing.assert_close(dict(lomo_model.named_parameters()), dict(sgd_model.named_parameters()),
                               rtol=1e-5, atol=1e-7)


def test_lomo_never_holds_the_gradients_of_the_model(batch):
    model = tiny_llama()
    lomo, _ = stepper_for("lomo", model, lr=0.1)
    params = list(model.parameters())
    alive = []
    for p in params:  # runs after LOMO's own hook on the same parameter
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
    lomo.step([batch], mean_loss(model), 0.1)
    assert len(alive) == 2 * len(params)  # two passes (clipping is on by default)
    assert max(alive) == 0
    assert all(p.grad is None for p in params)


def test_lomo_hands_freed_gradient_memory_back_every_so_many_bytes(batch):
    from adapters.core.memory import HeapReturner

    model = tiny_llama()
    lomo, _ = stepper_for("lomo", model, lr=0.1)
    calls = []
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    lomo.heap.every, lomo.heap._trim = grad_bytes // 3, calls.append  # about 3 trims per backward pass
    lomo.step([batch], mean_loss(model), 0.1)
    assert 4 <= len(calls) <= 6 and set(calls) == {0}  # two passes; malloc_trim(0) keeps no top pad
    assert HeapReturner(torch.device("meta"))._trim is None  # only the CPU heap is trimmed


def test_lomo_fp16_loss_scaling_unscales_and_skips_overflow(batch):
    fp16 = Context(spec=None, device=torch.device("cpu"), dtype=torch.float16)
    base = tiny_llama()
    scaled_model, sgd_model = copy.deepcopy(base), copy.deepcopy(base)
    lomo, _ = stepper_for("lomo", scaled_model, fp16, lr=0.1, max_grad_norm=0, scale_window=2)
    sgd, _ = stepper_for("sgd", sgd_model, lr=0.1)
    assert lomo.scaler.scale == 2.0 ** 16
    lomo.step([batch], mean_loss(scaled_model), 0.1)
    sgd.step([batch], mean_loss(sgd_model), 0.1)
    torch.testing.assert_close(dict(scaled_model.named_parameters()), dict(sgd_model.named_parameters()),
                               rtol=1e-6, atol=1e-8)
    # An overflowing backward changes no weight, halves the scale and is counted.
    before = copy.deepcopy(scaled_model)
    lomo.step([batch], lambda b: mean_loss(scaled_model)(b) * 1e36, 0.1)
    assert max_diff(before, scaled_model) == 0.0
    assert lomo.scaler.scale == 2.0 ** 15 and lomo.skipped == 1
    # Two clean steps in a row (scale_window=2) double it again.
    lomo.step([batch], mean_loss(scaled_model), 0.1)
    lomo.step([batch], mean_loss(scaled_model), 0.1)
    assert lomo.scaler.scale == 2.0 ** 16
    state = roundtrip(lomo.state_dict())
    again, _ = stepper_for("lomo", copy.deepcopy(base), fp16, lr=0.1)
    again.load_state_dict(state)
    assert again.scaler.scale == lomo.scaler.scale and again.skipped == 1


# --- AdaLomo ----------------------------------------------------------------------------

def test_adalomo_first_step_is_a_relative_sign_step_on_vectors(batch):
    model = tiny_llama()
    reference = copy.deepcopy(model)
    mean_loss(reference)(batch).backward()
    ada, cfg = stepper_for("adalomo", model, lr=0.01)
    ada.step([batch], mean_loss(model), 0.01)
    # Step 1: beta2 = 0, so v = g^2 and g / sqrt(v) = sign(g), whose RMS is 1 (no clipping);
    # norm gains are ones, RMS 1, so each moves by exactly lr against its gradient's sign.
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if name.endswith("norm.weight"):
            torch.testing.assert_close(p - q, -cfg.lr * torch.sign(q.grad), rtol=1e-5, atol=1e-7)


def test_adalomo_state_is_factored(batch):
    model = tiny_llama()
    ada, _ = stepper_for("adalomo", model, lr=0.01)
    ada.step([batch], mean_loss(model), 0.01)
    moments = ada.state.moments
    q = model.model.layers[0].self_attn.q_proj.weight
    m = moments["model.layers.0.self_attn.q_proj.weight"]
    assert set(m) == {"row", "col"} and m["row"].shape == q.shape[:1] and m["col"].shape == q.shape[1:]
    assert set(moments["model.norm.weight"]) == {"full"}
    state = sum(t.numel() for m in moments.values() for t in m.values())
    weights = sum(p.numel() for p in model.parameters())
    assert state < 0.1 * weights


def test_adalomo_resume_continues_exactly(batch):
    whole_model = tiny_llama()
    split_model = copy.deepcopy(whole_model)
    whole, _ = stepper_for("adalomo", whole_model, lr=0.01)
    for _ in range(3):
        whole.step([batch], mean_loss(whole_model), 0.01)
    first, _ = stepper_for("adalomo", split_model, lr=0.01)
    for _ in range(2):
        first.step([batch], mean_loss(split_model), 0.01)
    resumed_model = copy.deepcopy(split_model)
    second, _ = stepper_for("adalomo", resumed_model, lr=0.01)
    second.load_state_dict(roundtrip(first.state_dict()))
    second.step([batch], mean_loss(resumed_model), 0.01)
    assert max_diff(whole_model, resumed_model) == 0.0


@pytest.mark.cuda
@pytest.mark.parametrize("rule", ["lomo", "adalomo", "mezo"])
def test_rules_run_on_cuda(rule, batch):
    model = tiny_llama().cuda()
    ctx = Context(spec=None, device=torch.device("cuda"), dtype=torch.float32)
    stepper, cfg = stepper_for(rule, model, ctx, lr=1e-3)
    cuda_batch = {k: v.cuda() for k, v in batch.items()}
    before = copy.deepcopy(model)
    stepper.step([cuda_batch], mean_loss(model), cfg.lr)
    assert max_diff(before, model) > 0
    if rule == "adalomo":
        assert all(t.is_cuda for m in stepper.state.moments.values() for t in m.values())


# --- MeZO -------------------------------------------------------------------------------

def test_mezo_is_reproducible_for_a_seed(batch):
    base = tiny_llama()
    runs = []
    for seed in (0, 0, 1):
        model = copy.deepcopy(base)
        mezo, _ = stepper_for("mezo", model, lr=1e-3)
        mezo.base_seed = seed
        for _ in range(3):
            mezo.step([batch], mean_loss(model), 1e-3)
        runs.append(model)
    assert max_diff(runs[0], runs[1]) == 0.0
    assert max_diff(runs[0], runs[2]) > 0.0


def test_mezo_step_moves_along_the_seeded_noise(batch):
    model = tiny_llama()
    start = copy.deepcopy(model)
    mezo, cfg = stepper_for("mezo", model, lr=1e-3, eps=1e-3)
    grad_mode = []

    def loss_fn(b):
        grad_mode.append(torch.is_grad_enabled())
        return mean_loss(model)(b)
    mezo.step([batch], loss_fn, cfg.lr)
    assert grad_mode == [False, False] and all(p.grad is None for p in model.parameters())
    g = mezo.last_projected_grad
    start_params = list(start.parameters())
    z = torch.cat([noise.reshape(-1) for _, noise in seeded_noise(start_params, mezo.last_seed)])
    delta = torch.cat([(p - q).reshape(-1) for p, q in zip(model.parameters(), start_params)])
    torch.testing.assert_close(delta, -cfg.lr * g * z, rtol=0, atol=1e-6)
    # g is the slope of the loss along z, measured independently here.
    probe = [copy.deepcopy(start) for _ in range(2)]
    for model_copy, sign in zip(probe, (1, -1)):
        with torch.no_grad():
            for part, noise in seeded_noise(list(model_copy.parameters()), mezo.last_seed):
                part.add_(noise, alpha=sign * cfg.eps)
    with torch.no_grad():
        slope = (mean_loss(probe[0])(batch) - mean_loss(probe[1])(batch)) / (2 * cfg.eps)
    assert g == pytest.approx(float(slope), rel=1e-3, abs=1e-4)


def test_mezo_moves_only_what_the_method_trains(batch):
    lora = METHODS.get("lora")
    model = lora.apply(tiny_llama(), lora.Config(r=4), CPU)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mezo, _ = stepper_for("mezo", model, lr=1e-2)
    mezo.step([batch], mean_loss(model), 1e-2)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    assert moved == {n for n, p in model.named_parameters() if p.requires_grad}


def test_mezo_resume_continues_the_seed_sequence(batch):
    whole_model = tiny_llama()
    split_model = copy.deepcopy(whole_model)
    whole, _ = stepper_for("mezo", whole_model, lr=1e-3)
    for _ in range(3):
        whole.step([batch], mean_loss(whole_model), 1e-3)
    first, _ = stepper_for("mezo", split_model, lr=1e-3)
    for _ in range(2):
        first.step([batch], mean_loss(split_model), 1e-3)
    second, _ = stepper_for("mezo", split_model, lr=1e-3)
    second.load_state_dict(roundtrip(first.state_dict()))
    second.step([batch], mean_loss(split_model), 1e-3)
    assert max_diff(whole_model, split_model) == 0.0


# --- Combinations the rules refuse --------------------------------------------------------

def spec_with(rule: str, **training):
    return parse_spec(make_spec("model", "data.jsonl", "out", method={"name": "full"},
                                optimizer={"name": rule}, **training))


@pytest.mark.parametrize("rule", ["lomo", "adalomo"])
def test_fused_rules_refuse_gradient_accumulation(rule):
    with pytest.raises(StudioError, match=r"training\.grad_accum.*nothing to accumulate.*batch_size to 16"):
        check_combination(spec_with(rule, grad_accum=2, batch_size=8))


@pytest.mark.parametrize("rule", ["lomo", "adalomo"])
def test_fused_rules_refuse_several_devices(rule):
    with pytest.raises(StudioError, match=r"training\.devices.*set devices to 1"):
        check_combination(spec_with(rule, devices=2))


def test_mezo_refuses_gradient_accumulation():
    with pytest.raises(StudioError, match=r"training\.grad_accum.*nothing to accumulate.*batch_size to 12"):
        check_combination(spec_with("mezo", grad_accum=3, batch_size=4))


def test_mezo_refuses_gradient_checkpointing():
    with pytest.raises(StudioError, match=r"training\.gradient_checkpointing.*no backward"):
        check_combination(spec_with("mezo", gradient_checkpointing=True))


@pytest.mark.parametrize("rule", ["adamw", "sgd", "adamw_8bit", "paged_adamw_8bit"])
def test_rules_without_loss_scaling_refuse_fp16(rule):
    """Their fp16 gradients would underflow to zero with a finite loss: refused before launch, with
    the precisions and the rules that do work."""
    with pytest.raises(StudioError, match=r"training\.precision.*no loss scaling.*use bf16 .* or fp32.*lomo"):
        check_combination(spec_with(rule, precision="fp16"))


def test_sensible_combinations_pass():
    check_combination(spec_with("lomo", gradient_checkpointing=True))
    check_combination(spec_with("adalomo", batch_size=16))
    check_combination(spec_with("mezo", devices=2))
    for rule in ("lomo", "adalomo", "mezo"):  # LOMO's rules scale the loss; MeZO has no backward
        check_combination(spec_with(rule, precision="fp16"))


# --- Through the training loop ------------------------------------------------------------

@pytest.mark.parametrize("method,optimizer", [
    ({"name": "full"}, {"name": "lomo", "lr": 0.05}),
    ({"name": "full"}, {"name": "adalomo", "lr": 0.01}),
    ({"name": "full"}, {"name": "mezo", "lr": 1e-3}),
    ({"name": "lora", "r": 4}, {"name": "mezo", "lr": 0.1}),
], ids=["full+lomo", "full+adalomo", "full+mezo", "lora+mezo"])
def test_rule_steps_through_the_loop_and_the_run_reloads_as_trained(method, optimizer, tiny_model, toy_dataset,
                                                                     tmp_path, studio_home):
    """Whether a handful of steps lowers the loss depends on the CPU's arithmetic and the learning rate;
    the rules' maths is tested step by step above. Here: the loop drives the rule, the model changes,
    and what is saved reloads as the model that trained."""
    from jobs.training import models
    from jobs.results.inference import load_run

    out = tmp_path / "run"
    run = train(parse_spec(make_spec(tiny_model, toy_dataset, out, method=method, optimizer=optimizer,
                                     max_steps=3, exact_match_rows=0, eval_samples=0)))
    assert run["status"] == "completed" and run["metrics"]["steps"] == 3
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    loaded = load_run(out)  # refuses a reload that differs from the trained fingerprint
    assert loaded.check["max_abs_logit_diff_vs_trained"] <= loaded.check["allowed_diff_vs_trained"]
    ids = torch.tensor([loaded.tokenizer("what is 3 plus 1 ?")["input_ids"]])
    base = models.load_model(models.resolve(str(tiny_model))).eval()
    with torch.no_grad():
        assert not torch.equal(loaded.model(ids).logits, base(ids).logits)
