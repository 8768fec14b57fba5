"""The ``studio`` command. Errors a user can cause print as one clear line, never a traceback."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jobs.runfolder import Status
from studio.bakeoff_cli import add_bakeoff_command
from studio.estimate_cli import add_estimate_command
from studio.jobs_cli import add_jobs_commands


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The same switches as transformers' set_verbosity_error / disable_progress_bar, set
    # through the environment so that commands that never load a model (studio jobs list)
    # do not pay for importing transformers.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


class ProgressBar:
    def __init__(self, stream=sys.stderr):
        self.stream, self.started = stream, time.time()

    def __call__(self, rec: dict) -> None:
        if rec.get("event") == "done":
            self.stream.write("\n")
            return
        step, total = rec["step"], rec["max_steps"]
        width = 30
        filled = int(width * step / total)
        elapsed = time.time() - self.started
        eta = elapsed / step * (total - step) if step else 0
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{total} loss {rec['loss']:.4f} "
                          f"lr {rec['lr']:.2e} {rec['tokens_per_second']:.0f} tok/s eta {eta:.0f}s ")
        self.stream.flush()


def cmd_train(args) -> int:
    from jobs.spec import load_spec

    spec = load_spec(args.spec, args.set)
    if args.argv is not None:
        _restart_on_job_allocator(args.argv)
    from jobs.training.recipe import train

    run = train(spec, resume=not args.no_resume, progress=None if args.quiet else ProgressBar())
    return _summary(spec.output_dir, run)


def _restart_on_job_allocator(argv: list[str]) -> None:
    """Run an inline fine-tune on the malloc a queued job gets (jobs/training/allocator.py): otherwise
    `studio train` would peak higher and run slower on glibc than the same spec as a job, and
    `studio estimate`, which predicts for the job's allocator, would be wrong for it.
    The process replaces itself before torch is imported; nothing happens where the system
    has no such library, with STUDIO_ALLOCATOR=system, or once it is preloaded."""
    from jobs.training.allocator import preload_env

    env = preload_env()
    if env:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "studio.cli", *argv], {**os.environ, **env})


def _summary(run_dir: str, run: dict) -> int:
    m = run.get("metrics", {})
    fields = ["train_loss", "eval_loss", "eval_perplexity", "exact_match", "steps", "trainable_params",
              "total_params", "tokens_per_second", "train_seconds", "peak_memory_bytes"]
    print(f"run: {run_dir}  status: {run.get('status')}")
    for k in fields:
        if m.get(k) is not None:
            v = m[k]
            print(f"  {k:18} {v:.4f}" if isinstance(v, float) else f"  {k:18} {v}")
    for s in run.get("samples", [])[:3]:
        print(f"  sample: target={s['target']!r} output={s['output']!r}")
    return 0 if run.get("status") == Status.COMPLETED else 1


def cmd_export(args) -> int:
    from jobs.results.export import export_adapter, export_merged, export_quantized

    if args.gguf:
        if args.merged or args.adapter or args.quantized:
            print("error: --gguf goes alone (it writes the merged model as one GGUF file)", file=sys.stderr)
            return 2
        from jobs.results.gguf import export_gguf

        report = export_gguf(args.run, args.gguf, args.gguf_type, no_fingerprint=args.no_fingerprint)
    else:
        chosen = [(fn, out) for fn, out in ((export_merged, args.merged), (export_adapter, args.adapter),
                                            (export_quantized, args.quantized)) if out]
        if len(chosen) != 1:
            print("error: give exactly one of --merged OUT, --adapter OUT, --quantized OUT or --gguf OUT.gguf",
                  file=sys.stderr)
            return 2
        fn, out = chosen[0]
        report = fn(args.run, out, no_fingerprint=args.no_fingerprint)
    print(json.dumps(report, indent=2))
    if report.get("fingerprint_checked") is False:  # also in the report; said where a reader of the terminal looks
        print(f"warning: {report['fingerprint']}", file=sys.stderr)
    if report.get("warning"):
        print(f"warning: {report['warning']}", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from jobs.results.inference import generate_text, load_any

    loaded = load_any(args.model)
    print(generate_text(loaded, args.prompt, args.max_new_tokens, args.temperature))
    return 0


def cmd_evaluate(args) -> int:
    from jobs.results.lm_eval_task import evaluate_run

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    print(json.dumps(evaluate_run(args.run, tasks, args.limit, args.batch_size), indent=2))
    return 0


def cmd_methods(args) -> int:
    from adapters import METHODS, UPDATE_RULES

    for title, reg in (("methods", METHODS), ("update rules", UPDATE_RULES)):
        print(f"{title}:")
        for name, item in reg.items():
            print(f"  {name:18} {item.summary}")
            for field, info in item.Config.model_fields.items():
                print(f"      {field} = {info.default!r}: {info.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="studio", description="Parameter- and memory-efficient fine-tuning studio.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune in the foreground from a spec (YAML or JSON)")
    t.add_argument("spec")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a spec field, e.g. --set training.max_steps=50 (repeatable)")
    t.add_argument("--no-resume", action="store_true", help="refuse to continue an unfinished run in output_dir")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="write a run's merged model or its adapter")
    e.add_argument("run")
    e.add_argument("--merged", metavar="OUT", help="standalone model folder loadable by plain transformers")
    e.add_argument("--adapter", metavar="OUT", help="the trained adapter alone")
    e.add_argument("--quantized", metavar="OUT",
                   help="the integer-quantized model (codes + scales + zeros), for qalora and peqa runs")
    e.add_argument("--gguf", metavar="OUT.gguf",
                   help="the merged model as one GGUF file for llama.cpp and Ollama (Llama and Qwen2 families), "
                        "with an Ollama Modelfile beside it")
    e.add_argument("--gguf-type", default="f16", choices=["f16", "bf16", "q8_0", "q4_0"],
                   help="tensor type of the GGUF file's weights (default f16)")
    e.add_argument("--no-fingerprint", action="store_true",
                   help="export a run that has no readable trained fingerprint (made before fingerprints existed, or "
                        "its files lost), unchecked: the report says so. Without it such a run is refused. A "
                        "fingerprint that is there is still checked")
    e.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help="generate from a run folder, a model folder, a .gguf file or a Hub id")
    g.add_argument("model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("evaluate", help="run EleutherAI's lm-eval harness on a run's model (extra [eval])")
    v.add_argument("run")
    v.add_argument("--tasks", default="heldout",
                   help="comma-separated: heldout (the run's own held-out rows, offline) and/or lm-eval task names")
    v.add_argument("--limit", type=int, default=None, help="score at most this many rows per task")
    v.add_argument("--batch-size", type=int, default=8)
    v.set_defaults(func=cmd_evaluate)

    m = sub.add_parser("methods", help="list methods and update rules with their parameters")
    m.set_defaults(func=cmd_methods)

    add_jobs_commands(sub)
    add_estimate_command(sub)
    add_bakeoff_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from adapters.core.errors import StudioError

    args = build_parser().parse_args(argv)
    # Only a process started as the command may replace itself (never a caller of main()).
    args.argv = sys.argv[1:] if argv is None else None
    _quiet_libraries()
    try:
        return args.func(args)
    except StudioError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; `studio train` with the same spec resumes from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
