"""The prefix every row of a batch starts with, computed once for all rows.

Chat rows repeat their template and system prompt, and a causal model's states for those
positions are the same in every row. The loss (``jobs.training.loss``) asks ``shared_prefix``
whether a batch and a model qualify and, when they do, takes the final hidden states from
``shared_prefix_hidden``: one model call over the batch packed into a single sequence, with an
attention (``_prefix_attention``) that keeps the rows apart. The estimate asks the same question
of its first batch (``prefix_worth_sharing``), so the memory it predicts is the memory the
loop uses.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from adapters.core import compat
from jobs.training import fused


SHARED_PREFIX_MIN = 8  # tokens; a shorter prefix saves too little to pay for packing the batch
# Sharing saves (rows - 1) x prefix of the rows x width tokens the model would compute; the packed
# call costs a little besides (the index maps, the split attention), so a small saving can be
# lost in it. Paired in one process (`python -m bench.ab --changes share_prefix`, 2-core AMD EPYC,
# fp32, SmolLM2-135M LoRA, 8 rounds): saving 37% of the tokens (demo rows, 8 per batch) made steps
# 1.34x faster, and saving 7% (the speed benchmark's two conversations) 1.06x, a tie
# (bench/results/ab.json, ab-long.json); shorter probes of the same code, not kept in
# bench/results, gave 1.15x at 32% (4 rows) and 1.07x at 21% (2 rows). 7% still ties rather than
# loses, so the threshold sits a little below it: under this fraction of the batch's tokens the
# loop does not share.
SHARED_PREFIX_MIN_SAVING = 0.05


def shared_prefix(model: torch.nn.Module, batch: dict) -> int:
    """How many leading tokens every row of ``batch`` has in common, when the model can compute
    them once for all rows; 0 when it cannot or it would not pay (``prefix_worth_sharing``).

    Chat data repeats its template and system prompt at the start of every row: with SmolLM2's
    template that is 24 of the demo rows' 57 tokens. A causal model's states for those
    positions are the same in every row, so the prefix is computed once and the rest of every
    row attends to it (``shared_prefix_hidden``). Summing the rows' gradients at the prefix
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


def shared_prefix_hidden(model: torch.nn.Module, batch: dict, n: int, none: torch.Tensor,
                         call: torch.nn.Module) -> torch.Tensor:
    """``jobs.training.loss.final_hidden`` with the first ``n`` positions computed once for every row.

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
    """Attention for ``shared_prefix_hidden``'s packed sequence (``query``: ``[1, heads, tokens, dim]``)."""
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
