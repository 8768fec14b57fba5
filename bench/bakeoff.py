"""The default bake-off on the demo task: every method with AdamW plus the memory-saving
rules on full fine-tuning, each with its own searched learning rate, two seeds, one budget.

``python -m bench.bakeoff`` (a short budget) or ``--full`` (the demo spec's own 120 steps).
Writes ``bench/results/bakeoff.json`` (the bake-off's report.json, the wall time of the whole
bake-off, the machine), ``bench/results/bakeoff.md`` (its report page) and
``bench/results/bakeoff.png`` (its Pareto plot). The bake-off runs
in the benchmarks' studio home, ``bench/.home``; every job is its own process, so each
run's peak memory is its own.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from bench.common import HOME, RESULTS, demo_spec, merge, say, warm_model_cache, write_result

# The short default keeps a CPU run to hours, not days: ~17 candidates x (3 search runs + 2 seeds).
DEFAULT = {"steps": 30, "eval_rows": 24}
FULL = {"steps": None, "eval_rows": 40}  # None: the demo spec's own step count


def run(full: bool = False, *, spec: dict | None = None, steps: int | None = None, seeds: int = 2,
        methods: list[str] | None = None, rules: list[str] | None = None, lr_factors: tuple[float, ...] | None = None,
        results_dir: Path | None = None, home: Path | None = None, inline: bool = False) -> dict:
    from jobs.bakeoff import plan as bakeoff
    from jobs.bakeoff.driver import drive

    budget = FULL if full else DEFAULT
    base = spec or demo_spec()
    steps = steps or budget["steps"] or base["training"]["max_steps"]
    base = merge(base, {"dataset": {"max_eval_rows": budget["eval_rows"]},
                        "training": {"exact_match_rows": budget["eval_rows"], "eval_samples": 2, "eval_every": 0}})
    base.pop("output_dir", None)
    home = home or HOME  # where warm_model_cache put the converted model
    warm_model_cache(base["model"])
    manifest = bakeoff.create(home, base, methods=methods, rules=rules, budget_steps=steps, seeds=seeds,
                              lr_factors=lr_factors or bakeoff.LR_FACTORS)
    say(f"bakeoff {manifest['id']}: {steps} steps, {seeds} seed(s), home {home}")
    started = time.perf_counter()
    folder = drive(home, manifest["id"], inline=inline, say=lambda text: say(f"  {text}"))
    wall = time.perf_counter() - started
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    out_dir = results_dir or RESULTS
    name = "bakeoff" if not full else "bakeoff_full"
    out_dir.mkdir(parents=True, exist_ok=True)
    if (folder / "pareto.png").is_file():
        shutil.copyfile(folder / "pareto.png", out_dir / f"{name}.png")
    # The page for people, beside the numbers (its plot link names pareto.png; ours is {name}.png).
    page = (folder / "report.md").read_text(encoding="utf-8").replace("](pareto.png)", f"]({name}.png)")
    (out_dir / f"{name}.md").write_text(page, encoding="utf-8")
    payload = {"settings": {"steps": steps, "seeds": seeds, "eval_rows": budget["eval_rows"],
                            "methods": methods, "rules": rules, "full": full},
               "wall_seconds": wall, "report_folder": str(folder), "report": report}
    write_result(name, payload, out_dir)
    say(f"bakeoff: {wall / 60:.1f} min; {report['recommendation']}")
    return payload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bakeoff", description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the demo spec's own step budget")
    p.add_argument("--steps", type=int, help="override the step budget")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--methods", help="comma-separated (default: every method)")
    p.add_argument("--rules", help="comma-separated (default: adamw + memory-saving rules on full)")
    args = p.parse_args(argv)
    split = lambda text: [n.strip() for n in text.split(",") if n.strip()] if text else None  # noqa: E731
    run(args.full, steps=args.steps, seeds=args.seeds, methods=split(args.methods), rules=split(args.rules))
    return 0


if __name__ == "__main__":
    sys.exit(main())
