"""Leaner RMSNorm and SwiGLU for training: the model's own maths, fewer saved activations.

A Llama-style RMSNorm computes in fp32 and autograd keeps every intermediate: the fp32
input, the normalised fp32 tensor, its cast and the product with the weight. The SwiGLU
MLP keeps gate, up, silu(gate) and their product. Per token and layer of SmolLM2 in bf16
that is about a third of all saved activations for the norms and another sixth for the MLP.
The autograd functions here save only their inputs (and one fp32 scale per token) and
recompute the rest in backward, which costs little next to the matmuls and runs fewer
elementwise passes in forward.

``install(model, saved)`` replaces the ``forward`` of the modules it recognises (``recognise``) on that instance
only; saved models and exports are untouched. A norm is replaced only after its own output
on a probe input matched ours, so a variant with other maths (Gemma's ``1 + weight``) keeps
its own forward. It also routes the model's SDPA attention through ``attention``, which
trains short rows on the CPU under bf16 autocast with a leaner attention of ours.

``SavedOutputs.rebuilding()``, active while the loss's forward runs, lets a later layer that
saves one of these functions' outputs (a LoRA adapter keeps its input) hold a recipe
instead, recomputed in backward from what the function keeps anyway. That state is an
object the caller makes and passes to ``install`` and to the loss, not module globals.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from adapters.core import compat


def wide(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    with torch.no_grad():
        return torch.rsqrt(wide(x).pow(2).mean(-1, keepdim=True) + eps)


def _normed(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    return weight * (wide(x) * rstd).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, rstd)
        return _normed(x, weight, rstd)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = wide(x) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            normed = xhat.to(x.dtype)
            grad_weight = wide(grad * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = wide(grad * weight)
            grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return _silu_mul(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        return grad_gate, grad_up


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, saved: SavedOutputs | None = None) -> torch.Tensor:
    rstd = _rstd(x, eps)
    out = _RMSNorm.apply(x, weight, rstd)
    return saved.rebuildable(out, _normed, (x, weight, rstd)) if saved is not None else out


def silu_mul(gate: torch.Tensor, up: torch.Tensor, saved: SavedOutputs | None = None) -> torch.Tensor:
    out = _SiluMul.apply(gate, up)
    return saved.rebuildable(out, _silu_mul, (gate, up)) if saved is not None else out


class _Rebuilt:
    """A saved tensor autograd holds as a recipe: recomputed on first use in backward and kept
    until every node that saved it has used it (q, k and v's adapters share one)."""

    def __init__(self, fn, args: tuple):
        self.fn, self.args = fn, args
        self.users, self.value = 0, None

    def take(self) -> torch.Tensor:
        value = self.value
        if value is None:
            with torch.no_grad():
                value = self.fn(*self.args)
        self.users -= 1
        self.value = value if self.users > 0 else None
        return value


class _View:
    def __init__(self, rebuilt: _Rebuilt, t: torch.Tensor):
        self.rebuilt, self.geometry = rebuilt, (t.shape, t.stride(), t.storage_offset())
        rebuilt.users += 1

    def unpack(self) -> torch.Tensor:
        size, stride, offset = self.geometry
        return self.rebuilt.take().as_strided(size, stride, offset)


class SavedOutputs:
    """What one installed model's lean functions share with its loss: the outputs a later layer
    may save for backward, while ``rebuilding()`` is active, and who watches what autograd keeps.

    Made by the caller and handed to ``install`` and to the loss (``jobs.training.loss``), so two models
    in one process never share it.
    """

    def __init__(self):
        # By data pointer: (weak ref to the output, its version, how to recompute it from what the
        # function itself keeps); None while not rebuilding.
        self.rebuild: dict[int, tuple] | None = None
        # Called with every tensor autograd keeps as it is while rebuilding: hooks do not nest,
        # so this is how the memory estimator's probe sees them.
        self.observer: Callable[[torch.Tensor], None] | None = None

    def rebuildable(self, out: torch.Tensor, fn, args: tuple) -> torch.Tensor:
        if self.rebuild is not None and out.requires_grad and out.is_contiguous():
            table, ptr = self.rebuild, out.data_ptr()

            def forget(_ref) -> None:
                # Once the output is gone nothing can save it, so its recipe's inputs must not stay
                # alive until the forward ends: under gradient checkpointing a block's gate, up and
                # norm inputs would (SmolLM2 LoRA at 4 x 256 tokens: 1449 MiB instead of 1194).
                if table.get(ptr, (None,))[0] is _ref:
                    del table[ptr]

            table[ptr] = (weakref.ref(out, forget), compat.tensor_version(out), _Rebuilt(fn, args))
        return out

    def pack(self, t: torch.Tensor):
        entry = self.rebuild.get(t.data_ptr()) if self.rebuild is not None else None
        if entry is not None:
            ref, version, rebuilt = entry
            out = ref()
            if out is not None and compat.tensor_version(out) == version and t.untyped_storage().data_ptr() == out.data_ptr() \
                    and t.dtype == out.dtype and t.untyped_storage().nbytes() == out.untyped_storage().nbytes():
                return _View(rebuilt, t)
        if self.observer is not None:
            self.observer(t)
        return t

    @staticmethod
    def unpack(packed):
        return packed.unpack() if isinstance(packed, _View) else packed

    @contextlib.contextmanager
    def observing(self, fn: Callable[[torch.Tensor], None]):
        outer, self.observer = self.observer, fn
        try:
            yield
        finally:
            self.observer = outer

    @contextlib.contextmanager
    def rebuilding(self):
        """While active, a lean norm's or SwiGLU's output that a later layer saves for backward (a
        LoRA layer keeps its input, full fine-tuning's linear layers too) is kept as a recipe and
        recomputed in backward from the inputs the function keeps anyway. On SmolLM2 that is the
        normed input of the q/k/v and gate/up projections and the input of down_proj: 2.5 MB per
        layer at 8 x 57 tokens in bf16, recomputed by two elementwise passes."""
        outer, self.rebuild = self.rebuild, {}
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            self.rebuild = outer


def _norm_forward(saved: SavedOutputs):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, saved)
    return forward


def _mlp_forward(saved: SavedOutputs):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x), saved))
    return forward


class _ShortAttention(torch.autograd.Function):
    """Attention that keeps only q, k, v (as given) and one fp32 log-sum-exp per row.

    Torch's plain SDPA kernel upcasts bf16 inputs and keeps fp32 copies of q, the repeated
    k and v and the probabilities for backward: 4.3 MB per SmolLM2 layer at 8 x 57 tokens,
    against 0.9 MB here. Forward is torch's CPU flash kernel, which also returns the
    log-sum-exp; its own backward is slow on short rows, so backward recomputes the
    probabilities in fp32 from it instead, as flash attention does. Grouped-query heads are
    broadcast, never copied into the saved set.
    """

    @staticmethod
    def forward(ctx, q, k, v, keep, scale):
        bias = None if keep is None else torch.zeros(keep.shape, dtype=q.dtype, device=q.device) \
            .masked_fill_(~keep, float("-inf"))
        out, lse = compat.cpu_flash_attention(q, k, v, keep is None, bias, scale)
        ctx.save_for_backward(q, k, v, keep, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast("cpu", enabled=False):
            return _ShortAttention._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        q, k, v, keep, lse = ctx.saved_tensors
        b, hk, t, d = k.shape
        g = q.shape[1] // hk
        # Each kv head's query group stacked along rows: plain batched matmuls, no broadcast copies,
        # and the products for dk and dv sum over the group by themselves.
        q32, k32, v32 = wide(q).reshape(b, hk, g * t, d), wide(k), wide(v)
        s = torch.matmul(q32, k32.transpose(-1, -2)).mul_(ctx.scale)
        p = torch.exp_(s.sub_(lse.reshape(b, hk, g * t, 1))).view(b, hk, g, t, t)
        # exp(-inf) is 0 where masked; a row with nothing to attend to has an infinite lse: 0 too.
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril_() if keep is None \
            else keep.reshape(keep.shape[0], 1, 1, t, t)
        p = p.masked_fill_(~mask, 0).nan_to_num_(0.0).view(b, hk, g * t, t)
        go = wide(grad).reshape(b, hk, g * t, d)
        grad_v = torch.matmul(p.transpose(-1, -2), go)
        dp = torch.matmul(go, v32.transpose(-1, -2))
        ds = dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p).mul_(ctx.scale)
        grad_q = torch.matmul(ds, k32).reshape(q.shape)
        grad_k = torch.matmul(ds.transpose(-1, -2), q32)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None


SHORT_ROWS = 256  # tokens; beyond this torch's CPU flash kernel is both leaner and faster


def cpu_autocast_below_fp32() -> bool:
    """Whether CPU autocast is on with a 16-bit compute dtype."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.float32


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The model's SDPA attention, except while training on short rows under CPU autocast."""
    sdpa_attention_forward = compat.sdpa_attention()
    t = query.shape[2]
    lean = (torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)) and query.device.type == "cpu"
            and cpu_autocast_below_fp32() and t <= SHORT_ROWS and key.shape[2] == t and dropout == 0.0
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None and query.shape[1] % key.shape[1] == 0
            and (attention_mask.dtype == torch.bool and attention_mask.ndim == 4 and attention_mask.shape[1] == 1
                 if attention_mask is not None else getattr(module, "is_causal", True)))
    if not lean:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    low = torch.get_autocast_dtype("cpu")  # what autocast would have cast SDPA's inputs to
    with torch.autocast("cpu", enabled=False):
        out = _ShortAttention.apply(query.to(low), key.to(low), value.to(low), attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None


def attention_kernels(device: torch.device, seq_len: int):
    """SDPA's plain (math) kernel for short rows under bf16/fp16 autocast on the CPU, else the default.

    Torch's CPU flash-attention backward is slow in bf16 on short rows: 6.0 ms against 2.4 ms
    for the math kernel at 8 x 57 tokens, 9 heads (2-core Xeon with AMX, torch 2.13); at 512
    tokens flash wins 50 ms to 217 ms, and in fp32 it wins at every length, as it does without
    backward (0.4 ms against 1.3 ms forward). The choice only changes which kernel computes the
    same attention. Models with these lean functions installed train short rows through
    ``attention`` instead, which is leaner and faster than either; this covers the rest.
    """
    if device.type == "cpu" and cpu_autocast_below_fp32() and seq_len <= SHORT_ROWS and torch.is_grad_enabled():
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


ATTENTION = "studio_sdpa"


def _install_attention(model: torch.nn.Module) -> int:
    """Route ``model``'s SDPA attention through ``attention``; how many models were switched."""
    compat.register_attention(ATTENTION, attention, mask_like="sdpa")
    switched = 0
    for module in model.modules():
        if compat.attention_of(module) == "sdpa" and compat.can_switch_attention(module):
            compat.set_attention(module, ATTENTION)
            switched += 1
    return switched


def _is_rms_norm(module: torch.nn.Module) -> bool:
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) or weight.ndim != 1:
        return False
    if not isinstance(eps, float):
        return False
    probe = torch.randn(2, 3, weight.shape[0], dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        theirs, ours = module(probe), rms_norm(probe, weight, eps)
    return theirs.dtype == ours.dtype and torch.allclose(theirs.float(), ours.float(), rtol=1e-3, atol=1e-3)


def _is_swiglu(module: torch.nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    if not callable(act) or not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    probe = torch.linspace(-6, 6, 97)
    with torch.no_grad():
        return torch.allclose(act(probe), F.silu(probe), rtol=1e-5, atol=1e-6)


LEAN_KINDS = ("rms_norm", "swiglu")


def recognise(model: torch.nn.Module) -> dict[str, list[str]]:
    """The names of ``model``'s modules whose forward the lean functions can take over, by kind
    (``LEAN_KINDS``). A norm is checked on real numbers, so ``model`` must hold its weights."""
    found: dict[str, list[str]] = {kind: [] for kind in LEAN_KINDS}
    for name, module in model.named_modules():
        if _is_rms_norm(module):
            found["rms_norm"].append(name)
        elif _is_swiglu(module):
            found["swiglu"].append(name)
    return found


def install(model: torch.nn.Module, saved: SavedOutputs | None = None,
            recognised: dict[str, list[str]] | None = None) -> dict[str, int]:
    """Use the lean functions in ``model``'s recognised norms and MLPs; how many of each. Their
    outputs are rebuilt in backward only while ``saved.rebuilding()`` is active (the loss's forward).

    ``recognised``: ``recognise``'s verdict, made on another instance of the same model (FSDP2's
    rank 0 holds the weights; the other ranks build on the meta device, where a norm cannot be
    checked); default: recognised here."""
    saved = saved if saved is not None else SavedOutputs()
    recognised = recognise(model) if recognised is None else recognised
    forwards = {"rms_norm": _norm_forward(saved), "swiglu": _mlp_forward(saved)}
    counts = {kind: 0 for kind in LEAN_KINDS}
    for kind in LEAN_KINDS:
        for name in recognised.get(kind, []):
            compat.replace_forward(model.get_submodule(name), forwards[kind])
            counts[kind] += 1
    counts["attention"] = _install_attention(model)
    return counts
