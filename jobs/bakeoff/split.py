"""The bake-off's rows: split once, the same for every run, with the rate search kept apart.

A learning rate chosen on the rows that then score the candidate flatters that candidate:
the rate is fitted to those rows. And a split that moves with ``training.seed`` mixes two
sources of variance into the seeds' spread (which rows score, and how the model starts and
sees its batches). So the bake-off splits the base dataset once, before any run:

- ``score``: the held-out rows the base spec itself would hold out (its ``eval_path``, a
  saved validation split, or ``eval_fraction`` of the rows split with the first seed);
  only the final runs evaluate on them;
- ``search``: as many rows again, taken out of the training rows; the learning-rate search
  evaluates on them and nothing trains on them;
- ``train``: the rest, which every run (search and final) trains on.

The three files live in the bake-off's folder (inside the studio home) and every candidate
spec names them, so replicate k of every candidate differs from replicate j only in its
seed: initialisation and data order.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

from adapters.core.errors import StudioError

DATA_DIR = "data"
PARTS = ("train", "search", "score")
MIN_TRAIN_ROWS = 2  # fewer leaves nothing to learn from once the search rows are taken out


def search_size(n_train: int, n_score: int) -> int:
    """As many search rows as scoring rows (a rate is picked with the same noise the candidates
    are scored with), but never more than a fifth of the training rows."""
    return max(1, min(n_score, n_train // 5))


def split_rows(train: list[dict], score: list[dict], seed: int, searching: bool = True) -> dict[str, list[dict]]:
    """``train`` minus the search rows, the search rows, and ``score`` untouched (plain arithmetic,
    deterministic in ``seed``). Without a search (one rate, no time budget) no row is kept apart."""
    if not score:
        raise StudioError("the base spec holds out no rows, and a bake-off scores candidates on held-out rows.",
                          "dataset.eval_fraction", "set dataset.eval_fraction above 0, or give dataset.eval_path.")
    n_search = search_size(len(train), len(score)) if searching else 0
    if len(train) - n_search < MIN_TRAIN_ROWS:
        raise StudioError(f"{len(train)} training rows are too few to keep {n_search} apart for the learning-rate "
                          f"search and still train on {MIN_TRAIN_ROWS} or more.", "dataset.path",
                          "add training rows, or search no rate (--lr-factors 1).")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    search = set(order[:n_search])
    return {"train": [r for i, r in enumerate(train) if i not in search],
            "search": [train[i] for i in sorted(search)], "score": list(score)}


def write_split(folder: Path, base: dict, seed: int, searching: bool = True) -> dict:
    """Read the base spec's rows (validated as a run would), split them, write the files under
    ``folder/data`` (no search file without a search); returns the manifest's ``data`` entry."""
    from jobs.data.rows import read_rows
    from jobs.spec import DatasetSpec

    ds = DatasetSpec(**base["dataset"])
    train, score, fmt = read_rows(ds, seed)
    parts = split_rows(train, score, seed, searching)
    out = folder / DATA_DIR
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: str(_write_jsonl(out / f"{name}.jsonl", parts[name])) if parts[name] else None for name in PARTS}
    return {**paths, "format": fmt, "split_seed": seed, "rows": {n: len(parts[n]) for n in PARTS},
            "source": {"path": ds.path, "eval_path": ds.eval_path, "eval_fraction": ds.eval_fraction}}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:  # an odd extra column (a date from Parquet) is kept as text
                f.write(json.dumps(dict(row), ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.resolve()


def dataset_for(base_dataset: dict, data: dict | None, search: bool) -> dict:
    """The dataset section of one candidate run: the split's training rows, evaluated on the
    search rows (a search run) or the scoring rows (a final run). Without a split (a manifest
    written before the split existed) the base section, unchanged."""
    if not data:
        return dict(base_dataset)
    if search and not data["search"]:
        raise StudioError("this bake-off kept no rows apart for a learning-rate search.", "bake-off data",
                          "start a new bake-off with two or more --lr-factors.")
    rows = data["rows"]["search" if search else "score"]
    return {"path": data["train"], "eval_path": data["search" if search else "score"], "format": data["format"],
            "max_eval_rows": max(1, rows)}
