"""``studio bakeoff SPEC``: every suitable method on this data and this machine, under one
fair budget, with a noise floor; prints the report folder's path as its last line."""
from __future__ import annotations

import sys
from pathlib import Path


def _names(values: list[str] | None) -> list[str] | None:
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    return names or None


def add_bakeoff_command(subparsers) -> None:
    p = subparsers.add_parser("bakeoff", help="compare methods on this data and machine under one fair budget")
    p.add_argument("spec", nargs="?", help="base spec (YAML or JSON): model, data, training settings")
    p.add_argument("--home", default=None, help="studio home folder (default: $STUDIO_HOME, else ~/.studio)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a base spec field (repeatable)")
    p.add_argument("--methods", action="append", metavar="A,B",
                   help="methods to compare (default: every registered method)")
    p.add_argument("--rules", action="append", metavar="A,B",
                   help="update rules (default: adamw, plus lomo, adalomo, mezo, adamw_8bit on full)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-steps", type=int, help="optimizer steps per candidate (default: the spec's)")
    budget.add_argument("--budget-minutes", type=float, help="training minutes per candidate instead of steps")
    p.add_argument("--seeds", type=int, default=2, help="replicates per candidate; 2 or more give a noise floor")
    p.add_argument("--lr-factors", default="0.3,1,3",
                   help="multiples of each candidate's suggested learning rate to search (one value: no search)")
    p.add_argument("--search-steps", type=int, help="steps per search run (default: a quarter of the budget)")
    p.add_argument("--memory-budget-gb", type=float,
                   help="memory budget for the recommendation (default: the device's memory)")
    p.add_argument("--inline", action="store_true",
                   help="run the jobs one by one in this process (peak memory is then not per run)")
    p.add_argument("--resume", metavar="ID", help="continue an unfinished or cancelled bake-off (its stopped jobs resume from their checkpoints)")
    p.set_defaults(func=cmd_bakeoff)


def cmd_bakeoff(args) -> int:
    from jobs.bakeoff.plan import create
    from jobs.bakeoff.driver import drive, resume
    from adapters.core.errors import StudioError
    from jobs.spec import apply_overrides, read_spec_file, with_paths

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if args.resume:
        bid = args.resume
        queued = resume(args.home, bid)
        say(f"bake-off {bid}: continuing" + (f"; {len(queued)} stopped job(s) queued again" if queued else ""))
    else:
        if not args.spec:
            raise StudioError("no base spec given.", "studio bakeoff", "pass a spec file, or --resume ID.")
        try:
            factors = tuple(float(f) for f in args.lr_factors.split(",") if f.strip())
        except ValueError:
            raise StudioError(f"{args.lr_factors!r} is not a list of numbers.", "--lr-factors",
                              "write e.g. 0.3,1,3.") from None
        data = apply_overrides(read_spec_file(args.spec), args.set)
        if isinstance(data, dict):
            data = with_paths(data, Path(args.spec))
            model = Path(args.spec).parent / str(data.get("model", ""))
            if data.get("model") and model.exists():
                data["model"] = str(model.resolve())
        manifest = create(args.home, data, methods=_names(args.methods), rules=_names(args.rules),
                          budget_steps=args.budget_steps, budget_minutes=args.budget_minutes, seeds=args.seeds,
                          lr_factors=factors, search_steps=args.search_steps,
                          memory_budget_bytes=int(args.memory_budget_gb * 1e9) if args.memory_budget_gb else None)
        bid = manifest["id"]
        say(f"bake-off {bid}")
    try:
        out = drive(args.home, bid, inline=args.inline, say=say)
    except KeyboardInterrupt:
        say(f"\nstopped; its jobs stay in the queue. Continue with `studio bakeoff --resume {bid}`")
        return 130
    import json

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    say(report["recommendation"])
    print(out)
    return 0
