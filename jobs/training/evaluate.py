"""Held-out evaluation: loss, perplexity, greedy exact match, and a few sample generations."""
from __future__ import annotations

import math

import torch

from jobs.training.loss import token_loss_sum


@torch.no_grad()
def eval_loss(model, examples, collate, batch_size: int, chunk: int, device, autocast) -> float | None:
    if not examples:
        return None
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for i in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in collate([examples[j] for j in order[i:i + batch_size]]).items()}
        with autocast():
            s, n = token_loss_sum(model, batch, chunk)
        total += float(s)
        count += n
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, device, batch_size: int = 8) -> list[str]:
    """Greedy continuations of tokenized prompts, batched with left padding."""
    outs: list[str] = []
    pad = tokenizer.pad_token_id
    stop = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=sorted(stop),
                             use_cache=True)  # training turned the config's cache off
        for row in out[:, width:]:
            outs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return outs


def evaluate(model, tokenizer, examples, collate, spec, device, autocast) -> dict:
    t = spec.training
    was_training = model.training
    model.eval()
    try:
        loss = eval_loss(model, examples, collate, t.batch_size, t.loss_chunk_tokens, device, autocast)
        result: dict = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50)) if loss is not None else None}
        scored = [e for e in examples if e.target is not None and e.prompt_ids]
        n = max(t.exact_match_rows, t.eval_samples)
        scored = scored[:n]
        if scored:
            with autocast():
                outputs = generate(model, tokenizer, [e.prompt_ids for e in scored], t.max_new_tokens, device)
            em_rows = list(zip(scored, outputs))[: t.exact_match_rows]
            if em_rows:
                result["exact_match"] = sum(o.strip() == e.target.strip() for e, o in em_rows) / len(em_rows)
            result["samples"] = [
                {"prompt": tokenizer.decode(e.prompt_ids, skip_special_tokens=False), "target": e.target, "output": o}
                for e, o in list(zip(scored, outputs))[: t.eval_samples]]
        return result
    finally:
        model.train(was_training)
