"""The memory-saving update rules: LOMO, AdaLomo and MeZO, alone, through the loop, and the
combinations their checks refuse."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from adapters import METHODS, UPDATE_RULES
from adapters.base import Context
from adapters.mezo import seeded_noise
from jobs.errors import StudioError
from jobs.loss import token_loss_sum
from jobs.runfolder import read_metrics
from jobs.spec import check_combination, parse_spec
from jobs.train import train
from conftest import make_spec

CPU = Context(spec=None, device=torch.device("cpu"), dtype=torch.float32)


def tiny_llama(seed: int = 0, dropout: float = 0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, attention_dropout=dropout))


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 120, (4, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def mean_loss(model):
    def loss_fn(b):
        total, n = token_loss_sum(model, b, 16)
        return total / n
    return loss_fn


def stepper_for(rule: str, model, ctx: Context = CPU, **cfg):
    r = UPDATE_RULES.get(rule)
    c = r.Config(**cfg)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return r.build(params, c, ctx), c


def max_diff(a, b) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def roundtrip(state: dict) -> dict:
    """Through torch.save / weights_only load, as checkpoints store optimizer state."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


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
    base = tiny_llama(dropout=0.3)
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
    from jobs.memory import HeapReturner

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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
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


# --- Properties that follow from the maths (float64 where rounding would blur them) -----------

class TinyNet(torch.nn.Module):
    """A float64 regression net with dropout: every operation stays in float64 (Llama's norms compute
    in fp32 whatever the model's dtype, and that rounding, divided by 2ε, would swamp MeZO's slope)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        new = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
        self.w1, self.b1, self.w2 = (torch.nn.Parameter(new(16, 8) * 0.5), torch.nn.Parameter(new(16) * 0.1),
                                     torch.nn.Parameter(new(4, 16) * 0.5))
        self.drop = torch.nn.Dropout(dropout)
        self.x, self.y = new(32, 8), new(32, 4)

    def loss(self, _batch=None) -> torch.Tensor:
        hidden = self.drop(torch.tanh(self.x @ self.w1.T + self.b1))
        return (hidden @ self.w2.T - self.y).pow(2).mean()

    def gradient(self, seed: int | None = None) -> torch.Tensor:
        if seed is not None:
            torch.manual_seed(seed)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(self.loss(), list(self.parameters()))])

    def noise(self, seed: int) -> torch.Tensor:
        return torch.cat([z.reshape(-1) for _, z in seeded_noise(list(self.parameters()), seed)])


def test_mezo_projected_gradient_is_the_directional_derivative():
    """(L(θ+εz) - L(θ-εz)) / 2ε = ∇L·z + O(ε²); with ε = 1e-5 in float64 they agree to ~1e-7 (g is kept in fp32)."""
    net = TinyNet()
    grad = net.gradient()
    mezo, _ = stepper_for("mezo", net, lr=1e-3, eps=1e-5)
    for _ in range(4):
        start = [p.detach().clone() for p in net.parameters()]
        mezo.step([None], net.loss, 0.0)  # lr 0: measure only
        assert all(float((p - q).abs().max()) < 1e-15 for p, q in zip(net.parameters(), start))
        directional = float(grad @ net.noise(mezo.last_seed))
        assert mezo.last_projected_grad == pytest.approx(directional, rel=1e-6, abs=1e-9)


def test_mezo_estimate_is_unbiased_and_each_step_descends():
    """E_z[(∇L·z) z] = ∇L for z ~ N(0, I). The mean of N estimates g·z has a relative error of about
    √((d + 1) / N) (d = 208 trained values): 0.32 for N = 2000, i.e. a cosine with ∇L near 0.95;
    we ask for 0.85. E[g²] = |∇L|² within 20% (standard error √(2/N) = 3%). And every single step
    moves by -lr·g·z, whose product with ∇L is -lr·g² ≤ 0: a descent direction to first order."""
    net = TinyNet()
    grad = net.gradient()
    mezo, _ = stepper_for("mezo", net, lr=1e-3, eps=1e-5)
    total, squares, n = torch.zeros_like(grad), 0.0, 2000
    for _ in range(n):
        mezo.step([None], net.loss, 0.0)
        g = mezo.last_projected_grad
        total += g * net.noise(mezo.last_seed)
        squares += g * g
    estimate = total / n
    assert float(torch.nn.functional.cosine_similarity(estimate, grad, dim=0)) > 0.85
    assert 0.8 < squares / n / float(grad @ grad) < 1.2
    start = torch.cat([p.detach().reshape(-1).clone() for p in net.parameters()])
    mezo.step([None], net.loss, 1e-2)
    moved = torch.cat([p.detach().reshape(-1) for p in net.parameters()]) - start
    g = mezo.last_projected_grad
    torch.testing.assert_close(moved, -1e-2 * g * net.noise(mezo.last_seed), rtol=0, atol=1e-12)
    assert float(moved @ grad) == pytest.approx(-1e-2 * g * g, rel=1e-4)


def test_mezo_with_dropout_measures_both_losses_with_the_same_masks():
    net = TinyNet(dropout=0.3).train()
    mezo, cfg = stepper_for("mezo", net, lr=1e-3, eps=1e-5)
    torch.manual_seed(11)
    mezo.step([None], net.loss, 0.0)
    z = net.noise(mezo.last_seed)
    losses = {}
    for sign in (1, -1):
        shifted = copy.deepcopy(net)
        with torch.no_grad():
            for part, noise in seeded_noise(list(shifted.parameters()), mezo.last_seed):
                part.add_(noise, alpha=sign * cfg.eps)
            for seed in (11, 12):
                torch.manual_seed(seed)
                losses[sign, seed] = float(shifted.loss())
    assert losses[1, 11] != losses[1, 12]  # the dropout is live: other masks, another loss
    same_masks = (losses[1, 11] - losses[-1, 11]) / (2 * cfg.eps)
    assert mezo.last_projected_grad == pytest.approx(same_masks, rel=1e-6, abs=1e-9)
    # ... so g is the slope of one fixed (masked) function, ∇L_mask·z, as autograd gives it.
    assert mezo.last_projected_grad == pytest.approx(float(net.gradient(seed=11) @ z), rel=1e-5, abs=1e-8)


def adalomo_reference(p: torch.Tensor, g: torch.Tensor, row, col, t: int, lr: float, cfg) -> tuple:
    """AdaLomo's update of one matrix, written out in float64 from the paper's formulas."""
    p, g = p.double(), g.double()
    beta2 = 1.0 - t ** cfg.decay_rate
    square = g * g + cfg.eps1
    row = beta2 * row + (1 - beta2) * square.mean(dim=1)
    col = beta2 * col + (1 - beta2) * square.mean(dim=0)
    v = torch.outer(row, col) / row.mean()
    u = g / v.sqrt()
    u = u / max(1.0, float(u.pow(2).mean().sqrt()) / cfg.clip_threshold)
    step = lr * max(cfg.eps2, float(p.pow(2).mean().sqrt()))
    return p - step * u, row, col


def test_adalomo_matrix_update_matches_a_float64_reference(batch):
    model = tiny_llama()
    name = "model.layers.0.mlp.up_proj.weight"
    ada, cfg = stepper_for("adalomo", model, lr=0.01)
    weight = dict(model.named_parameters())[name]
    row = torch.zeros(weight.shape[0], dtype=torch.float64)
    col = torch.zeros(weight.shape[1], dtype=torch.float64)
    expected = weight.detach().double()
    for t in (1, 2, 3):  # beta2 = 0 at the first step, then Adafactor's growing decay
        reference = copy.deepcopy(model)
        mean_loss(reference)(batch).backward()
        g = dict(reference.named_parameters())[name].grad
        expected, row, col = adalomo_reference(weight.detach(), g, row, col, t, 0.01, cfg)
        ada.step([batch], mean_loss(model), 0.01)
        torch.testing.assert_close(weight.detach().double(), expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ada.state.moments[name]["row"].double(), row, rtol=1e-5, atol=1e-12)


def adamw_reference(start: torch.Tensor, grads: list[torch.Tensor], lr: float, cfg) -> torch.Tensor:
    p, m, v = start.double(), 0.0, 0.0
    for t, g in enumerate(grads, 1):
        g = g.double()
        p = p * (1 - lr * cfg.weight_decay)
        m = cfg.beta1 * m + (1 - cfg.beta1) * g
        v = cfg.beta2 * v + (1 - cfg.beta2) * g * g
        p = p - lr * (m / (1 - cfg.beta1 ** t)) / ((v / (1 - cfg.beta2 ** t)).sqrt() + cfg.eps)
    return p


class Quadratic(torch.nn.Module):
    """A loss with a known gradient: wide enough (128 x 256) that 8-bit AdamW quantizes its state."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(128, 256, generator=g))
        self.target = torch.randn(128, 256, generator=g)

    def loss(self, _batch) -> torch.Tensor:
        return 0.5 * (self.weight - self.target).pow(2).sum()


@pytest.mark.parametrize("rule", ["adamw", "adamw_8bit", "paged_adamw_8bit"])
def test_adam_rules_follow_the_float64_reference(rule):
    """torch's AdamW through our stepper (clipping included) matches the formulas; 8-bit AdamW's first
    step too (its state is quantized after the update); each later step adds at most 5% of lr to the mean
    distance from the exact trajectory (block-wise 8-bit moments: 1-2% measured). On the CPU the paged
    variant is the same optimizer."""
    q = Quadratic()
    stepper, cfg = stepper_for(rule, q, lr=0.01, weight_decay=0.1, max_grad_norm=0)
    start, grads = q.weight.detach().clone(), []
    for t in range(3):
        grads.append((q.weight - q.target).detach().clone())
        stepper.step([None], q.loss, 0.01)
        diff = (q.weight.detach().double() - adamw_reference(start, grads, 0.01, cfg)).abs()
        if rule == "adamw" or t == 0:
            assert float(diff.max()) < 1e-6
        else:
            assert float(diff.mean()) < 0.05 * 0.01 * t and float(diff.max()) < 0.01 * t


def test_adamw_clips_the_global_norm_before_the_moments():
    """With eps = 1 Adam's step depends on the gradient's scale, so only the clipped gradient fits."""
    q = Quadratic()
    stepper, cfg = stepper_for("adamw", q, lr=0.01, eps=1.0, max_grad_norm=0.5)
    start, raw, clipped = q.weight.detach().clone(), [], []
    for _ in range(2):
        g = (q.weight - q.target).detach().double()
        raw.append(g)
        clipped.append(g * min(1.0, 0.5 / (float(g.norm()) + 1e-6)))
        stepper.step([None], q.loss, 0.01)
    expected = adamw_reference(start, clipped, 0.01, cfg)
    assert float((q.weight.detach().double() - expected).abs().max()) < 2e-6  # fp32 rounding of weights ~1
    unclipped = adamw_reference(start, raw, 0.01, cfg)
    assert float((unclipped - expected).abs().max()) > 1e-4  # the check would see a missing clip


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


def test_sensible_combinations_pass():
    check_combination(spec_with("lomo", gradient_checkpointing=True))
    check_combination(spec_with("adalomo", batch_size=16))
    check_combination(spec_with("mezo", devices=2))


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
    from jobs import models
    from jobs.inference import load_run

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
