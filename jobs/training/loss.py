"""Causal-LM loss over the trained positions only, never materialising a batch's full logits.

The model runs with an empty ``logits_to_keep`` index, so it projects no position at all
(``logits_to_keep=1`` would still project the last one, and with an input that needs a
gradient torch's matmul then copies the whole head weight once per sequence in the batch:
450 MB and half a second per step for SmolLM2 in bf16). We take its final hidden states,
keep the positions whose next token is trained (response tokens), and project them onto
the vocabulary a chunk at a time. Each chunk is projected again in backward, so at most one
chunk of ``[chunk, vocab]`` logits exists at any moment. With SmolLM2's 49k vocabulary a
batch of 8 x 512 tokens would otherwise hold 800 MB of fp32 logits, plus as much again for
their gradient.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from adapters.core import compat
from jobs.training import fused
from jobs.training.fused import SHORT_ROWS, SavedOutputs, _wide, cpu_autocast_below_fp32


def final_hidden(model: torch.nn.Module, batch: dict, saved: SavedOutputs | None = None,
                 share_prefix: bool = True, call: torch.nn.Module | None = None) -> torch.Tensor:
    """The last hidden states; with ``saved`` (the state ``jobs.training.fused.install`` was given), its lean
    functions' outputs that later layers save are rebuilt in backward instead of kept.

    A prefix every row of the batch starts with is computed once (``shared_prefix``), unless
    ``share_prefix`` is false (``training.share_prefix``)."""
    ids = batch["input_ids"]
    none = torch.empty(0, dtype=torch.long, device=ids.device)
    rebuilding = saved.rebuilding() if saved is not None else contextlib.nullcontext()
    shared = shared_prefix(model, batch) if share_prefix else 0
    with attention_kernels(ids.device, ids.shape[1]), rebuilding:
        if shared:
            return _shared_prefix_hidden(model, batch, shared, none, call or model)
        out = (call or model)(input_ids=ids, attention_mask=batch["attention_mask"],
                    output_hidden_states=True, logits_to_keep=none, use_cache=False)
    hidden = out.hidden_states[-1]
    # Prompt tuning prepends virtual tokens: the text's positions are the last ones.
    offset = hidden.shape[1] - batch["input_ids"].shape[1]
    return hidden[:, offset:]


SHARED_PREFIX_MIN = 8  # tokens; a shorter prefix saves too little to pay for packing the batch
# Sharing saves (rows - 1) x prefix of the rows x width tokens the model would compute; the packed
# call costs a little besides (the index maps, the split attention). Paired in one process
# (`python -m bench.ab --changes share_prefix`, 2-core AMD EPYC, fp32, SmolLM2-135M LoRA, 8 rounds):
# saving 37% of the tokens (demo rows, 8 per batch) made steps 1.34x faster and 7% (the speed
# benchmark's two conversations) 1.06x, a tie (bench/results/ab.json, ab-long.json); probes of
# the same code before it was committed gave 1.15x at 32% (4 rows) and 1.07x at 21% (2 rows).
# Below this fraction the loop does not share.
SHARED_PREFIX_MIN_SAVING = 0.05


def shared_prefix(model: torch.nn.Module, batch: dict) -> int:
    """How many leading tokens every row of ``batch`` has in common, when the model can compute
    them once for all rows; 0 when it cannot or it would not pay (``prefix_worth_sharing``).

    Chat data repeats its template and system prompt at the start of every row: with SmolLM2's
    template that is 24 of the demo rows' 57 tokens. A causal model's states for those
    positions are the same in every row, so the prefix is computed once and the rest of every
    row attends to it (``_shared_prefix_hidden``). Summing the rows' gradients at the prefix
    gives exactly the gradient of the unshared batch.

    Not shared: a single row; a model with active dropout (one draw for the prefix would be
    correlated across rows); gradient checkpointing (the memory estimate's checkpointed probe
    assumes the unshared batch); virtual-token methods (prefix and prompt tuning prepend their
    own states); models whose attention is not transformers' SDPA (``_inner_attention``).
    """
    n = prefix_worth_sharing(batch["input_ids"], batch["attention_mask"])
    if not n or not _can_share(model):
        return 0
    return n


def prefix_worth_sharing(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """The batch's common prefix (``common_prefix``) when computing it once saves enough of the
    batch's tokens to pay for the extra call, else 0. The estimate asks the same question."""
    n = common_prefix(ids, mask)
    rows, width = ids.shape
    if n < SHARED_PREFIX_MIN or (rows - 1) * n < SHARED_PREFIX_MIN_SAVING * rows * width:
        return 0
    return n


def common_prefix(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading positions hold the same real token in every row; at most all but the last
    position (the second call needs one), and 0 for a single row. The estimate uses it too."""
    if ids.shape[0] < 2:
        return 0
    same = ((ids == ids[:1]) & (mask != 0)).all(0)
    return min(int(same.long().cumprod(0).sum()), ids.shape[1] - 1)


def _can_share(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    if _inner_attention(compat.bare_model(model)) is None:
        return False
    for m in model.modules():  # one pass: checkpointing blocks, active dropout
        if getattr(m, "gradient_checkpointing", None) is True or \
                (isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training):
            return False
    return True


def _shared_prefix_hidden(model: torch.nn.Module, batch: dict, n: int, none: torch.Tensor,
                          call: torch.nn.Module) -> torch.Tensor:
    """``final_hidden`` with the first ``n`` positions computed once for every row.

    One model call over the batch's distinct tokens: the first row whole, then every other row
    from position ``n`` on, packed into one sequence with each token's own position. Every
    matrix product of the body runs once over them all (a separate call for the prefix would
    run each layer's products on a one-row sliver, at a fraction of their speed).
    ``_prefix_attention`` keeps the rows apart: the first row attends causally to itself, each
    other row to the first row's prefix and causally to its own tokens, exactly the keys and
    values it would have seen unshared. Gradients reaching the prefix from every row are summed,
    as the unshared batch's are. The rows come back as ``[rows, width, hidden]``.
    """
    ids = batch["input_ids"]
    rows, width = ids.shape
    tail = width - n
    dev = ids.device
    packed = torch.cat([ids[0], ids[1:, n:].reshape(-1)])[None]
    positions = torch.cat([torch.arange(width, device=dev), torch.arange(n, width, device=dev).repeat(rows - 1)])
    base = compat.bare_model(model)
    layout = PackedPrefix(rows, width, n, _inner_attention(base))
    compat.register_attention(PREFIX_ATTENTION, _prefix_attention, mask_like="sdpa")
    with _attention_switched(base, PREFIX_ATTENTION):
        out = call(input_ids=packed, position_ids=positions[None], output_hidden_states=True,
                    logits_to_keep=none, use_cache=False, packed_prefix=layout)
    hidden = out.hidden_states[-1][0]
    # Where each row's positions sit in the packed sequence: its prefix is the first row's.
    starts = width + tail * torch.arange(rows - 1, device=dev)
    index = torch.cat([torch.arange(width, device=dev)[None],
                       torch.cat([torch.arange(n, device=dev).expand(rows - 1, n),
                                  starts[:, None] + torch.arange(tail, device=dev)], dim=1)])
    return hidden[index]


@dataclass(frozen=True)
class PackedPrefix:
    """The packed batch's layout, which the model passes down to its attention with the call."""
    rows: int
    width: int
    prefix: int
    inner: Callable  # the attention the model had: what computes each part


PREFIX_ATTENTION = "studio_packed_prefix"


def _inner_attention(base: torch.nn.Module) -> Callable | None:
    """The attention ``base`` dispatches to, when a packed call can run its parts through it:
    transformers' SDPA, or the lean functions' SDPA (``jobs.training.fused``), which falls back to it."""
    name = compat.attention_of(base)
    if not compat.can_switch_attention(base) or name not in ("sdpa", fused.ATTENTION):
        return None
    return compat.sdpa_attention() if name == "sdpa" else fused.attention


def _prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      packed_prefix: PackedPrefix | None = None, **kwargs):
    """Attention for ``_shared_prefix_hidden``'s packed sequence (``query``: ``[1, heads, tokens, dim]``)."""
    if packed_prefix is None:
        raise RuntimeError("a packed shared-prefix call reached attention without its layout: this model's forward "
                           "does not pass its keyword arguments down; set training.share_prefix: false")
    p = packed_prefix
    w, n, tail, others = p.width, p.prefix, p.width - p.prefix, p.rows - 1

    def rows_of(t: torch.Tensor) -> torch.Tensor:  # [1, h, others * tail, d] -> [others, h, tail, d]
        return t[0, :, w:].reshape(t.shape[1], others, tail, t.shape[3]).transpose(0, 1)

    def with_prefix(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:, :, :n].expand(others, -1, -1, -1), rows_of(t)], dim=2)

    first, _ = p.inner(module, query[:, :, :w], key[:, :, :w], value[:, :, :w], None, dropout=dropout,
                       scaling=scaling, **kwargs)
    # Each other row's query j sees the whole prefix and its own tokens up to j.
    seen = torch.ones(tail, n + tail, dtype=torch.bool, device=query.device)
    seen[:, n:] = torch.ones(tail, tail, dtype=torch.bool, device=query.device).tril()
    rest, _ = p.inner(module, rows_of(query), with_prefix(key), with_prefix(value), seen[None, None],
                      dropout=dropout, scaling=scaling, **kwargs)
    # Both come back as [batch, tokens, heads, dim]; the packed sequence is one batch row.
    return torch.cat([first[0], rest.reshape(others * tail, *rest.shape[2:])])[None], None


@contextlib.contextmanager
def _attention_switched(model: torch.nn.Module, name: str):
    before = compat.attention_of(model)
    compat.set_attention(model, name)
    try:
        yield
    finally:
        compat.set_attention(model, before)


def attention_kernels(device: torch.device, seq_len: int):
    """SDPA's plain (math) kernel for short rows under bf16/fp16 autocast on the CPU, else the default.

    Torch's CPU flash-attention backward is slow in bf16 on short rows: 6.0 ms against 2.4 ms
    for the math kernel at 8 x 57 tokens, 9 heads (2-core Xeon with AMX, torch 2.13); at 512
    tokens flash wins 50 ms to 217 ms, and in fp32 it wins at every length, as it does without
    backward (0.4 ms against 1.3 ms forward). The choice only changes which kernel computes the
    same attention. Models with ``jobs.training.fused`` installed train short rows through its own
    attention instead, which is leaner and faster than either; this covers the rest.
    """
    if device.type == "cpu" and cpu_autocast_below_fp32() and seq_len <= SHORT_ROWS and torch.is_grad_enabled():
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def _chunk_loss(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ weight.T (+ bias)`` against ``y``, keeping no logits.

    Forward keeps one fp32 log-sum-exp per row; backward projects the chunk again and turns
    those logits into their own gradient in place (softmax minus the one-hot target). Autograd
    through ``F.cross_entropy`` under checkpointing holds the logits, their fp32 copy and the
    log-softmax at once, and as much again for their gradients: this holds the logits and one
    fp32 copy. The projection runs in autocast's dtype when autocast is on, as ``head(h)`` would.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, y):
        device = h.device.type
        ctx.autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        logits = _wide(_project(h, weight, bias, ctx.autocast))
        lse = torch.logsumexp(logits, -1)
        loss = (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
        ctx.save_for_backward(h, weight, bias, y, lse)
        return loss

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, y, lse = ctx.saved_tensors
        with torch.autocast(h.device.type, enabled=False):
            low = ctx.autocast or weight.dtype
            g = _wide(_project(h, weight, bias, ctx.autocast)).sub_(lse[:, None]).exp_()  # softmax
            g[torch.arange(len(y), device=y.device), y] -= 1
            g = g.mul_(grad).to(low)
            grad_h = g @ weight.to(low) if ctx.needs_input_grad[0] else None
            grad_w = (g.t() @ h.to(low)).to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_b = g.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return None if grad_h is None else grad_h.to(h.dtype), grad_w, grad_b, None


def _project(h, weight, bias, dtype):
    """``F.linear`` as autocast would run it: inputs cast to ``dtype`` when it is set."""
    if dtype is not None:
        h, weight = h.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(h.device.type, enabled=False):
        return F.linear(h, weight, bias)


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Mask over positions whose *next* token is trained."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def token_loss_sum(model: torch.nn.Module, batch: dict, chunk: int, saved: SavedOutputs | None = None,
                   share_prefix: bool = True, call: torch.nn.Module | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over trained positions, and how many there were
    (``call``: see ``final_hidden``)."""
    hidden = final_hidden(model, batch, saved, share_prefix, call)
    mask = trained_positions(batch["labels"])
    h = hidden[mask]
    y = batch["labels"][:, 1:][mask[:, :-1]]
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    use_ckpt = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    plain = type(head) is torch.nn.Linear and not (head._forward_hooks or head._forward_pre_hooks)
    for i in range(0, h.shape[0], chunk):
        hc, yc = h[i:i + chunk], y[i:i + chunk]
        if use_ckpt and plain:
            total = total + _LinearCrossEntropy.apply(hc, head.weight, head.bias, yc)
        elif use_ckpt:  # a wrapped head (e.g. a trained copy): its own forward, recomputed in backward
            total = total + checkpoint(_chunk_loss, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hc, yc)
    return total, int(y.numel())
