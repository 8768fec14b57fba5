"""Raw training rows: read a dataset file or folder and validate every row.

Four row formats, detected from the columns unless the spec names one:
  instruction        {"instruction", "input" (optional), "output"}
  chat               {"messages": [{"role": system|user|assistant, "content": str}, ...]}
  prompt_completion  {"prompt", "completion"}
  text               {"text"}

Nothing here needs a tokenizer or writes a file, so every bad input is reported
before a model is loaded, naming the file, the row (counted from 1) and the field.
"""
from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from adapters.core.errors import StudioError
from jobs.spec import DatasetSpec

ROLES = ("system", "user", "assistant")
FORMAT_FIELDS = {  # required fields, in detection order
    "chat": ("messages",),
    "instruction": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
FORMAT_HELP = ("instruction (instruction, optional input, output), chat (messages), "
               "prompt_completion (prompt, completion), text (text)")


class Row(dict):
    """A raw row that remembers where it came from ("line 7", "row 3 (line 4)")."""

    where: str = ""


# ---------------------------------------------------------------- reading

def read_rows(ds: DatasetSpec, seed: int = 0) -> tuple[list[dict], list[dict], str]:
    """Read and validate train and eval rows; hold out ``eval_fraction`` when no eval_path."""
    train, held = _load(ds.path, "dataset.path")
    fmt = _check_rows(train, ds.format, ds.path)
    if ds.eval_path:
        evals = _load(ds.eval_path, "dataset.eval_path")[0]
        _check_rows(evals, fmt, ds.eval_path)
        return train, evals[:ds.max_eval_rows], fmt
    if held:  # a saved DatasetDict with its own validation split
        _check_rows(held, fmt, ds.path)
        return train, held[:ds.max_eval_rows], fmt
    if ds.eval_fraction == 0:
        return train, [], fmt  # evaluation explicitly switched off
    n_eval = min(round(len(train) * ds.eval_fraction), ds.max_eval_rows)
    if n_eval == 0:
        raise StudioError(f"the eval split would be empty: {len(train)} rows x eval_fraction "
                          f"{ds.eval_fraction} is less than one row.", ds.path,
                          "raise dataset.eval_fraction, add rows, or give dataset.eval_path.")
    if n_eval >= len(train):
        raise StudioError(f"holding out {n_eval} eval rows leaves no training rows.", ds.path,
                          "add rows or give dataset.eval_path.")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_eval])
    return ([r for i, r in enumerate(train) if i not in held_out],
            [train[i] for i in sorted(held_out)], fmt)


def _load(path: str, field: str) -> tuple[list[Row], list[Row]]:
    """Rows of a file or saved folder (and a saved folder's validation split, if any)."""
    p = Path(path)
    if not p.exists():
        raise StudioError("dataset file not found.", path, f"check {field} (relative paths start at "
                          "the directory you run from).")
    if p.is_dir():
        rows, held = _load_saved(p)
    else:
        suffix = p.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json,
                   ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise StudioError(f"unsupported file type {suffix or '(none)'!r}.", path,
                              "use .jsonl, .json, .csv, .parquet or a folder saved with datasets' save_to_disk.")
        rows, held = readers[suffix](p), []
    if not rows:
        raise StudioError("the dataset has no rows.", path, f"add rows, or point {field} at the right file.")
    return rows, held


def _text(p: Path) -> str:
    try:
        data = p.read_bytes()
    except OSError as e:
        raise StudioError(f"cannot read the file ({e.strerror}).", str(p), "check its permissions.") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise StudioError(f"not UTF-8 text (byte {e.start} on line {line}).", str(p),
                          "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None


def _row(value, where: str, path: Path) -> Row:
    if not isinstance(value, dict):
        raise StudioError(f"expected an object with named fields, got {type(value).__name__}.",
                          f"{path}, {where}", "write each row as a JSON object, e.g. {\"text\": \"...\"}.")
    row = Row(value)
    row.where = where
    return row


def _read_jsonl(p: Path) -> list[Row]:
    rows = []
    for n, line in enumerate(_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise StudioError(f"invalid JSON ({e.msg} at column {e.colno}).", f"{p}, line {n}",
                              "each line must hold one complete JSON object.") from None
        rows.append(_row(value, f"line {n}", p))
    return rows


def _read_json(p: Path) -> list[Row]:
    text = _text(p)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line saved as .json
            return _read_jsonl(p)
        raise StudioError(f"invalid JSON ({e.msg}).", f"{p}, line {e.lineno}", "fix the syntax there.") from None
    if isinstance(data, dict):
        lists = [k for k in ("data", "rows", "examples", "train") if isinstance(data.get(k), list)]
        if not lists:
            raise StudioError(f"a JSON object needs a list of rows under 'data' or 'rows'; found keys "
                              f"{', '.join(map(str, data)) or '(none)'}.", str(p),
                              "write a list of row objects, or {\"data\": [...]}.")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise StudioError("the JSON file must hold a list of row objects.", str(p), "write [{...}, {...}].")
    return [_row(v, f"row {i}", p) for i, v in enumerate(data, 1)]


def _read_csv(p: Path) -> list[Row]:
    # Read as text, not through pandas, so "007" or "42" answers stay strings.
    reader = csv.DictReader(io.StringIO(_text(p), newline=""))
    rows = []
    try:
        for i, rec in enumerate(reader, 1):
            if None in rec:
                raise StudioError("the row has more cells than the header has columns.",
                                  f"{p}, row {i} (line {reader.line_num})", "quote cells that contain commas.")
            rows.append(_row(rec, f"row {i} (line {reader.line_num})", p))
    except csv.Error as e:
        raise StudioError(f"malformed CSV ({e}).", f"{p}, line {reader.line_num}", "fix the quoting there.") from None
    return rows


def _read_parquet(p: Path) -> list[Row]:
    import pyarrow.parquet as pq
    try:
        records = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise StudioError(f"not a readable Parquet file ({e}).", str(p), "re-export it, or use JSONL.") from None
    return [_row(r, f"row {i}", p) for i, r in enumerate(records, 1)]


def _load_saved(p: Path) -> tuple[list[Row], list[Row]]:
    import datasets
    try:
        loaded = datasets.load_from_disk(str(p))
    except Exception as e:  # not a save_to_disk folder
        raise StudioError(f"not a dataset folder saved with datasets' save_to_disk ({e}).", str(p),
                          "point dataset.path at a file, or at the folder save_to_disk wrote.") from None
    held = []
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise StudioError(f"the saved dataset has splits {', '.join(loaded)} but no 'train'.", str(p),
                              "save the training rows as the 'train' split.")
        for name in ("validation", "test"):
            if name in loaded:
                held = [_row(r, f"{name} row {i}", p) for i, r in enumerate(loaded[name], 1)]
                break
        loaded = loaded["train"]
    return [_row(r, f"row {i}", p) for i, r in enumerate(loaded, 1)], held


# ---------------------------------------------------------------- validation

def detect_format(row: dict) -> str | None:
    for fmt, fields in FORMAT_FIELDS.items():
        if all(row.get(f) is not None for f in fields):
            return fmt
    return None


def _check_rows(rows: list[Row], fmt: str, path: str) -> str:
    """Validate every row against ``fmt`` (``auto``: the first row's format); return the format."""
    first = rows[0]
    if fmt == "auto":
        fmt = detect_format(first)
        if fmt is None:
            raise StudioError(f"no row format matches the columns {_cols(first)}.", f"{path}, {first.where}",
                              f"name the columns for one of the formats: {FORMAT_HELP}.")
    for row in rows:
        missing = [f for f in FORMAT_FIELDS[fmt] if row.get(f) is None]
        if missing:
            other = detect_format(row)
            if other and row is not first:
                raise StudioError(f"mixed schemas: this row has the columns of {other} ({_cols(row)}), "
                                  f"but {first.where} is {fmt}.", f"{path}, {row.where}",
                                  "give every row the columns of one format.")
            raise StudioError(f"missing field {missing[0]!r} for the {fmt} format (columns found: {_cols(row)}).",
                              f"{path}, {row.where}", f"add {missing[0]!r} to every row, or set dataset.format "
                              f"to the format of the columns: {FORMAT_HELP}.")
        _check_fields(row, fmt, f"{path}, {row.where}")
    return fmt


def _cols(row: dict) -> str:
    return ", ".join(sorted(map(str, row))) or "(none)"


def _need_text(row: dict, field: str, where: str, optional: bool = False) -> None:
    value = row.get(field)
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise StudioError(f"{field!r} must be text, got {type(value).__name__} ({value!r:.40}).",
                          f"{where}, field {field!r}", "quote the value so it is a string.")
    if not optional and not value.strip():
        raise StudioError(f"{field!r} is empty.", f"{where}, field {field!r}",
                          "fill it in or remove the row.")


def _check_fields(row: Row, fmt: str, where: str) -> None:
    if fmt == "instruction":
        for field, optional in (("instruction", False), ("input", True), ("output", False)):
            _need_text(row, field, where, optional)
    elif fmt == "prompt_completion":
        _need_text(row, "prompt", where)
        _need_text(row, "completion", where)
    elif fmt == "text":
        _need_text(row, "text", where)
    else:
        _check_messages(row, where)


def _check_messages(row: Row, where: str) -> None:
    msgs = row["messages"]
    if isinstance(msgs, str):  # CSV cells hold the list as JSON text
        try:
            msgs = row["messages"] = json.loads(msgs)
        except json.JSONDecodeError:
            pass
    if not isinstance(msgs, list) or not msgs:
        raise StudioError(f"'messages' must be a non-empty list of {{role, content}} objects, got "
                          f"{type(msgs).__name__}.", f"{where}, field 'messages'", 'write [{"role": "user", "content": "..."}, ...].')
    for i, m in enumerate(msgs, 1):
        at = f"{where}, message {i}"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise StudioError("each message needs 'role' and 'content'.", at, 'write {"role": "user", "content": "..."}.')
        if m["role"] not in ROLES:
            raise StudioError(f"unknown role {m['role']!r}.", at, f"use one of: {', '.join(ROLES)}.")
        _need_text(m, "content", at, optional=m["role"] != "assistant")
    if not any(m["role"] == "assistant" for m in msgs):
        raise StudioError("the conversation has no assistant turn, so nothing would be trained.", where,
                          "add the assistant's answer as a message with role 'assistant'.")
    if msgs[-1]["role"] != "assistant":
        raise StudioError(f"the conversation ends with a {msgs[-1]['role']} turn that has no answer.", where,
                          "end each conversation with an assistant message, or drop the last turn.")
