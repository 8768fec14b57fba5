"""Update rules against the maths: each step compared with a float64 reference or with what its
formula implies (MeZO's estimate, AdaLomo's factored moments, AdamW and its 8-bit forms), so the
tests hold on any CPU's arithmetic and at any learning rate."""
from __future__ import annotations

import copy

import pytest
import torch

from adapters.mezo import seeded_noise
from helpers import mean_loss, stepper_for, tiny_llama


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 120, (4, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


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


@pytest.mark.slow
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
    if rule != "adamw":  # and the moments are stored in 8 bits: one byte a value, no full-size fp32 copy
        (state,) = stepper.optimizer.state.values()
        assert state["state1"].dtype == state["state2"].dtype == torch.uint8
        assert state["state1"].shape == state["state2"].shape == q.weight.shape
        assert not [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
                    and v.numel() >= q.weight.numel()]


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
