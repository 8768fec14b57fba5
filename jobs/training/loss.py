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

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from adapters.core import compat
from jobs.training import prefix
from jobs.training.fused import SavedOutputs, attention_kernels, wide


def final_hidden(model: torch.nn.Module, batch: dict, saved: SavedOutputs | None = None,
                 share_prefix: bool = True, call: torch.nn.Module | None = None) -> torch.Tensor:
    """The last hidden states; with ``saved`` (the state ``jobs.training.fused.install`` was given), its lean
    functions' outputs that later layers save are rebuilt in backward instead of kept.

    A prefix every row of the batch starts with is computed once (``jobs.training.prefix``), unless
    ``share_prefix`` is false (``training.share_prefix``)."""
    ids = batch["input_ids"]
    none = torch.empty(0, dtype=torch.long, device=ids.device)
    rebuilding = saved.rebuilding() if saved is not None else contextlib.nullcontext()
    shared = prefix.shared_prefix(model, batch) if share_prefix else 0
    with attention_kernels(ids.device, ids.shape[1]), rebuilding:
        if shared:
            return prefix.shared_prefix_hidden(model, batch, shared, none, call or model)
        out = (call or model)(input_ids=ids, attention_mask=batch["attention_mask"],
                    output_hidden_states=True, logits_to_keep=none, use_cache=False)
    hidden = out.hidden_states[-1]
    # Prompt tuning prepends virtual tokens: the text's positions are the last ones.
    offset = hidden.shape[1] - batch["input_ids"].shape[1]
    return hidden[:, offset:]


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
        logits = wide(_project(h, weight, bias, ctx.autocast))
        lse = torch.logsumexp(logits, -1)
        loss = (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
        ctx.save_for_backward(h, weight, bias, y, lse)
        return loss

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, y, lse = ctx.saved_tensors
        with torch.autocast(h.device.type, enabled=False):
            low = ctx.autocast or weight.dtype
            w = weight.to(low)  # one cast for both products (full fine-tuning's head is an fp32 master)
            g = wide(_project(h, w, bias, ctx.autocast)).sub_(lse[:, None]).exp_()  # softmax
            g[torch.arange(len(y), device=y.device), y] -= 1
            g = g.mul_(grad).to(low)
            grad_h = g @ w if ctx.needs_input_grad[0] else None
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
    plain = type(head) is torch.nn.Linear and not compat.has_forward_hooks(head)
    for i in range(0, h.shape[0], chunk):
        hc, yc = h[i:i + chunk], y[i:i + chunk]
        if use_ckpt and plain:
            total = total + _LinearCrossEntropy.apply(hc, head.weight, head.bias, yc)
        elif use_ckpt:  # a wrapped head (e.g. a trained copy): its own forward, recomputed in backward
            total = total + checkpoint(_chunk_loss, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hc, yc)
    return total, int(y.numel())
