"""The suite runner: ``python -m bench [--full] [--only NAME]``.

Runs the benchmarks in order (speed, ab, memory, estimator, quality, efficiency, scale), each writing its JSON
file into bench/results/, then rewrites the report from those files. A benchmark that
crashes does not stop the others; the exit status says whether all of them finished.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

from bench.common import say

BENCHMARKS = ("speed", "ab", "memory", "estimator", "quality", "efficiency", "scale")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="longer runs and more repeats, every speed system on both row sets (bench/README.md says how long each takes)")
    parser.add_argument("--only", action="append", choices=[*BENCHMARKS, "report"], metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}, or 'report' "
                             "to rewrite the report from the existing results")
    args = parser.parse_args(argv)
    selected = [b for b in BENCHMARKS if not args.only or b in args.only]
    crashed = []
    for name in selected:
        run = _runner(name)
        if run is None:
            say(f"{name}: bench/{name}.py has no run(); skipped")
            continue
        started = time.perf_counter()
        say(f"{name}: start{' (--full)' if args.full else ''}")
        try:
            run(full=args.full)
        except Exception as e:  # one broken benchmark must not cost the results of the others
            crashed.append(name)
            say(f"{name}: crashed: {type(e).__name__}: {e}")
            continue
        say(f"{name}: done in {time.perf_counter() - started:.0f} s")
    from bench.report import write_report

    path = write_report()
    say(f"report: {path}")
    if crashed:
        say(f"crashed: {', '.join(crashed)}")
    return 1 if crashed else 0


def _runner(name: str):
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"bench.{name}":
            return None
        raise
    return getattr(module, "run", None)


if __name__ == "__main__":
    sys.exit(main())
