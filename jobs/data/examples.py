"""Training examples: tokenize validated rows with loss masks, and batch them.

Prompts go through the model's chat template when it has one (otherwise the plain
format below, ending in EOS).  Loss falls on response tokens and the end-of-turn
token that closes them; plain ``text`` rows train every token.  Labels are aligned
with ``input_ids`` (the model shifts them); ``-100`` marks positions without loss.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from adapters.core.errors import StudioError
from jobs.data.rows import FORMAT_FIELDS, Row, detect_format, read_rows
from jobs.spec import DatasetSpec

__all__ = ["Example", "Prepared", "Row", "FORMAT_FIELDS", "detect_format", "read_rows", "encode",
           "prepare", "plan_batches", "collate", "render_preview"]

IGNORE = -100
# Used when the model has no chat template; the response follows "### Response:" and ends in EOS.
PLAIN_INSTRUCTION = "### Instruction:\n{instruction}\n\n"
PLAIN_INPUT = "### Input:\n{input}\n\n"
PLAIN_RESPONSE = "### Response:\n"
MEGA_BATCH = 50  # batches sorted together: long enough to group lengths, short enough to stay random


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int] | None
    target: str | None

    @property
    def trained(self) -> int:
        """Positions whose next-token label is trained (not -100): what the loss averages over."""
        return sum(1 for y in self.labels[1:] if y != IGNORE)


@dataclass
class Prepared:
    format: str
    train: list[Example]
    eval: list[Example]
    train_rows: int
    eval_rows: int


# ---------------------------------------------------------------- encoding

def encode(rows: list[dict], fmt: str, tokenizer, max_seq_len: int, where: str) -> list[Example]:
    """Tokenize rows with loss on responses only (all tokens for ``text``); truncate to max_seq_len."""
    return [_encode_row(r, fmt, tokenizer, max_seq_len,
                        f"{where}, {getattr(r, 'where', '') or f'row {i}'}") for i, r in enumerate(rows, 1)]


def _messages(row: dict, fmt: str) -> list[dict]:
    if fmt == "chat":
        return [{"role": m["role"], "content": m["content"] or ""} for m in row["messages"]]
    if fmt == "instruction":
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def _render(row: dict, fmt: str, tokenizer, where: str) -> tuple[str, list[tuple[int, int]], bool]:
    """Full text, the character spans of each trained response, and whether it already holds special tokens."""
    if fmt == "text":
        return row["text"] + (tokenizer.eos_token or ""), [(0, len(row["text"]))], False
    msgs = _messages(row, fmt)
    eos = tokenizer.eos_token or ""
    if not getattr(tokenizer, "chat_template", None):
        return _render_plain(row, fmt, msgs, eos)
    try:
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception as e:  # jinja raises its own errors, e.g. "roles must alternate"
        raise StudioError(f"the model's chat template rejects this conversation ({e}).", where,
                          "reorder the messages as the template expects, or use format: text.") from None
    spans, cursor = [], 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        # The generation prompt marks where the answer starts; templates that rewrite earlier
        # turns (or inject text) only shift the search start, the content itself must appear.
        # Some templates trim messages, so look for the answer without its outer whitespace.
        prompt = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        answer = m["content"].strip()
        start = full.find(answer, len(prompt) if full.startswith(prompt) and len(prompt) >= cursor else cursor)
        if start < 0:
            raise StudioError("the model's chat template changes the assistant text, so the answer "
                              "cannot be located for the loss mask.", where,
                              "use format: text, or a model whose template keeps messages verbatim.")
        spans.append((start, start + len(answer)))
        cursor = start + len(answer)
    return full, spans, True


def plain_prompt(instruction: str, input: str | None = None) -> str:
    """An instruction as a model without a chat template sees it, up to where its answer starts."""
    return (PLAIN_INSTRUCTION.format(instruction=instruction) + (PLAIN_INPUT.format(input=input) if input else "")
            + PLAIN_RESPONSE)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A user's prompt in the playground, as training presented an instruction: through the chat
    template when the model has one, else the plain template above; ends where the answer starts."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(plain_prompt(prompt))["input_ids"]


def _render_plain(row: dict, fmt: str, msgs: list[dict], eos: str) -> tuple[str, list[tuple[int, int]], bool]:
    if fmt == "instruction":
        parts = [(plain_prompt(row["instruction"], row.get("input")), False), (row["output"], True), (eos, False)]
    elif fmt == "prompt_completion":
        parts = [(row["prompt"], False), (row["completion"], True), (eos, False)]
    else:
        parts = []
        for m in msgs:
            parts.append((f"### {m['role'].capitalize()}:\n", False))
            parts.append((m["content"], m["role"] == "assistant"))
            parts.append((eos + "\n\n" if m["role"] == "assistant" else "\n\n", False))
    text, spans = "", []
    for piece, trained in parts:
        if trained:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, spans, False


def _encode_row(row: dict, fmt: str, tokenizer, max_seq_len: int, where: str) -> Example:
    text, spans, templated = _render(row, fmt, tokenizer, where)
    enc = tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    labels = [IGNORE] * len(ids)
    first_of_last = None
    for n, (s, e) in enumerate(spans):
        k = next((k for k, (a, b) in enumerate(offsets) if b > s and a < e), None)
        if k is None:
            continue
        first_of_last = k
        while k < len(ids) and offsets[k][0] < e:
            labels[k] = ids[k]
            k += 1
        # Train through the end-of-turn token so the model learns to stop, but never into
        # the next turn's header: only whitespace may sit between the answer and that token.
        j = k
        while j < len(ids) and ids[j] not in special and not text[offsets[j][0]:offsets[j][1]].strip():
            j += 1
        if j < len(ids) and ids[j] in special:
            labels[k:j + 1] = ids[k:j + 1]
        elif n == len(spans) - 1 and tokenizer.eos_token_id is not None and fmt != "text":
            # The template closes no turn: append EOS so generation still learns to end.
            ids, labels = ids[:k] + [tokenizer.eos_token_id], labels[:k] + [tokenizer.eos_token_id]
    if fmt == "text":
        labels = list(ids)
    last = max((k for k, lab in enumerate(labels) if lab != IGNORE), default=-1)
    ids, labels = ids[:last + 1], labels[:last + 1]  # tokens after the last answer carry no loss
    length = len(ids)
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(lab == IGNORE for lab in labels[1:]):
        raise StudioError(f"the row is {length} tokens long and truncation at max_seq_len={max_seq_len} "
                          "leaves no trained tokens.", where,
                          "raise training.max_seq_len, or shorten the prompt of this row.")
    if fmt == "text":
        return Example(ids, labels, None, None)
    prompt_ids = list(enc["input_ids"][:first_of_last]) if first_of_last is not None else None
    # Compared with the generated text after stripping both, so outer whitespace never decides a match.
    return Example(ids, labels, prompt_ids, _messages(row, fmt)[-1]["content"].strip())


def prepare(ds: DatasetSpec, tokenizer, max_seq_len: int, seed: int) -> Prepared:
    """Read, validate, split (seeded) and tokenize both splits."""
    train_rows, eval_rows, fmt = read_rows(ds, seed)
    train = encode(train_rows, fmt, tokenizer, max_seq_len, ds.path)
    evals = encode(eval_rows, fmt, tokenizer, max_seq_len, ds.eval_path or ds.path)
    return Prepared(fmt, train, evals, len(train), len(evals))


# ---------------------------------------------------------------- batching

def plan_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index batches grouped by length; deterministic in (lengths, batch_size, seed, epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = MEGA_BATCH * batch_size
    batches = []
    for m in range(0, len(order), mega):
        chunk = sorted(order[m:m + mega], key=lambda i: -lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    if batches:  # the longest batch first, so running out of memory shows at step 1, not hours in
        top = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches.insert(0, batches.pop(top))
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def render_preview(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """The row as the model sees it, in spans flagged trained (True) or prompt (False)."""
    spans, run, flag = [], [], None
    for tok, lab in zip(example.input_ids, example.labels):
        trained = lab != IGNORE
        if run and trained != flag:
            spans.append((tokenizer.decode(run), flag))
            run = []
        run.append(tok)
        flag = trained
    if run:
        spans.append((tokenizer.decode(run), flag))
    return spans
