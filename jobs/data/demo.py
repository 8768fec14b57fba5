"""The bundled demo task: write an ISO date (``2021-07-04``) in words (``4 July 2021``).

Small instruction-tuned models answer this in their own style ("July 4, 2021",
"The date is ...") so they score near zero exact match before fine-tuning, while the
mapping is systematic enough for a LoRA run of a few CPU minutes to learn it.
Answers are at most ~10 tokens. ``python -m jobs.data.demo`` regenerates ``assets/demo/``
byte for byte from the seed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
# A few phrasings so the model learns the task rather than one exact prompt string.
INSTRUCTIONS = ("Write this date in words.", "Rewrite the date in words.", "Convert the date to words.",
                "Spell out this date.")
FIRST, LAST = dt.date(1900, 1, 1), dt.date(2099, 12, 31)
DEMO_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo"


def in_words(day: dt.date) -> str:
    return f"{day.day} {MONTHS[day.month - 1]} {day.year}"


def make_rows(n: int, seed: int, exclude: set[dt.date] = frozenset()) -> list[dict]:
    """``n`` distinct dates drawn uniformly from 1900-2099, none of them in ``exclude``."""
    rng = random.Random(seed)
    span = (LAST - FIRST).days
    seen, rows = set(exclude), []
    while len(rows) < n:
        day = FIRST + dt.timedelta(days=rng.randint(0, span))
        if day in seen:
            continue
        seen.add(day)
        rows.append({"instruction": rng.choice(INSTRUCTIONS), "input": day.isoformat(), "output": in_words(day)})
    return rows


def write_demo(out_dir: Path = DEMO_DIR, train_rows: int = 500, eval_rows: int = 80, seed: int = 0) -> None:
    """Write train.jsonl and eval.jsonl; eval dates never occur in train."""
    train = make_rows(train_rows, seed)
    evals = make_rows(eval_rows, seed + 1, exclude={dt.date.fromisoformat(r["input"]) for r in train})
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out_dir / name)  # never leave a half-written split behind


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.data.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="folder to write (default: assets/demo)")
    parser.add_argument("--train-rows", type=int, default=500)
    parser.add_argument("--eval-rows", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_demo(args.out, args.train_rows, args.eval_rows, args.seed)
    print(f"wrote {args.train_rows} train and {args.eval_rows} eval rows to {args.out}")


if __name__ == "__main__":
    main()
