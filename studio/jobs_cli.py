"""``studio jobs ...`` and ``studio worker``: the job queue from the command line.

Every command takes ``--home`` (else ``$STUDIO_HOME``, else ``~/.studio``). The commands
only read and write the store and the run folders; ``studio worker`` is what starts the
jobs, and it keeps running as a service until stopped (jobs survive it and are
re-attached by the next one).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime
from pathlib import Path


def _home_option() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--home", default=None,
                        help="studio home folder (default: $STUDIO_HOME, else ~/.studio)")
    return parent


def add_jobs_commands(subparsers) -> None:
    """Register ``jobs`` (with its subcommands) and ``worker`` on the ``studio`` parser."""
    home = _home_option()
    jobs = subparsers.add_parser("jobs", help="the job queue: submit, list, show, cancel, resume, retry, delete, logs")
    sub = jobs.add_subparsers(dest="jobs_command", required=True)

    p = sub.add_parser("submit", parents=[home], help="validate a spec and queue it; prints the job id")
    p.add_argument("spec", help="YAML or JSON spec file")
    p.add_argument("--name", help="label shown in lists (default: method-model)")
    p.add_argument("--devices", type=int, help="data-parallel processes (GPUs, or CPU processes); overrides the spec")
    p.add_argument("--priority", type=int, default=0, help="higher starts first; equal priorities start in order")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a spec field, e.g. --set training.max_steps=50 (repeatable)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("list", parents=[home], help="all jobs with status and progress")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", parents=[home], help="one job in detail")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_show)

    for verb, text in (("cancel", "stop a job (at its next step, with a checkpoint); a queued job never starts"),
                       ("resume", "continue a stopped job from its last good checkpoint"),
                       ("retry", "start a finished job again from scratch in a fresh run folder")):
        p = sub.add_parser(verb, parents=[home], help=text)
        p.add_argument("id")
        p.set_defaults(func=cmd_control, verb=verb)

    p = sub.add_parser("delete", parents=[home], help="remove a job from the store (its files only with --files)")
    p.add_argument("id")
    p.add_argument("--files", action="store_true", help="also delete the run folder(s)")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("logs", parents=[home], help="print a job's log (stdout and stderr)")
    p.add_argument("id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job finishes")
    p.set_defaults(func=cmd_logs)

    w = subparsers.add_parser("worker", parents=[home], help="run the scheduler that starts and watches jobs")
    w.add_argument("--cpu-slots", type=int, default=1,
                   help="jobs at once on a machine without GPUs (default 1; the cores are shared among them)")
    w.add_argument("--gpus", default=None,
                   help="comma-separated GPU ids to use (default: every GPU torch sees)")
    w.add_argument("--poll", type=float, default=1.0, help="seconds between checks")
    w.add_argument("--cancel-timeout", type=float, default=60.0,
                   help="seconds a cancelled job gets to stop at a step boundary before it is killed")
    w.add_argument("--heartbeat-timeout", type=float, default=120.0,
                   help="seconds without a heartbeat after which a job counts as hung and is killed")
    w.set_defaults(func=cmd_worker)


def cmd_submit(args) -> int:
    from jobs.runner.submit import submit_job
    from jobs.spec import apply_overrides, read_spec_file

    data = apply_overrides(read_spec_file(args.spec), args.set)
    job = submit_job(args.home, data, name=args.name or Path(args.spec).stem, priority=args.priority,
                     devices=args.devices, where=args.spec, base_dir=Path.cwd())
    print(job.id)
    return 0


def cmd_list(args) -> int:
    from jobs.runner.store import JobStore
    from jobs.runner.worker import progress

    jobs = JobStore(args.home).list()
    rows = [{**j.to_dict(), "progress": progress(j.run_dir)} for j in jobs]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("ID", "NAME", "STATUS", "PRIO", "STEP", "LOSS", "DEVICES", "CREATED", "ERROR")
    table = [header] + [(
        str(r["id"]), r["name"][:24], r["status"], str(r["priority"]), _step(r["progress"]),
        _num(r["progress"].get("train_loss")), r["devices"] or "-", _when(r["created_at"]),
        (r["error"] or "")[:60]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cmd_show(args) -> int:
    from jobs.runner.store import JobStore
    from jobs.runner.worker import LOG_FILE, progress

    job = JobStore(args.home).get(args.id)
    data = {**job.to_dict(), "progress": progress(job.run_dir), "log": str(Path(job.run_dir) / LOG_FILE)}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    p = data["progress"]
    lines = [("job", f"{job.id}  {job.name}"), ("status", job.status.value + (" (cancel requested)"
                                                                              if job.cancel_requested else "")),
             ("priority", job.priority), ("devices", f"{job.devices or '-'}  ({job.nprocs} process(es))"),
             ("created", _when(job.created_at)), ("started", _when(job.started_at)),
             ("finished", _when(job.finished_at)), ("pid", job.pid or "-"), ("attempt", job.attempt),
             ("step", _step(p)), ("train loss", _num(p.get("train_loss"))), ("eval loss", _num(p.get("eval_loss"))),
             ("heartbeat", "-" if p["heartbeat_age"] is None else f"{p['heartbeat_age']:.0f} s ago"),
             ("run folder", job.run_dir), ("log", data["log"]), ("error", job.error or "-")]
    for key, value in lines:
        print(f"{key:>11}: {value}")
    return 0


def cmd_control(args) -> int:
    from jobs.runner.store import JobStore

    store = JobStore(args.home)
    job = getattr(store, args.verb)(args.id)
    if args.verb == "cancel" and job.status.value == "running":
        print(f"job {job.id}: stop requested; it stops at its next step and keeps a checkpoint")
    else:
        print(f"job {job.id}: {job.status.value}" + (f", run folder {job.run_dir}" if args.verb == "retry" else ""))
    return 0


def cmd_delete(args) -> int:
    from jobs.runner.submit import delete_job

    removed = delete_job(args.home, args.id, files=args.files)
    print(f"job {args.id}: deleted" + (f"; removed {', '.join(removed)}" if removed else ""))
    return 0


def cmd_logs(args) -> int:
    from jobs.runner.store import JobStore
    from jobs.runner.worker import LOG_FILE

    store = JobStore(args.home)
    job = store.get(args.id)
    path, offset = Path(job.run_dir) / LOG_FILE, 0
    while True:
        if path.is_file():
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()
        if not args.follow:
            if not path.is_file():
                print(f"job {job.id} has no log yet ({job.status.value}).", file=sys.stderr)
            return 0
        if store.get(job.id).finished and (not path.is_file() or path.stat().st_size == offset):
            return 0
        time.sleep(0.5)


def cmd_worker(args) -> int:
    from jobs.runner.scheduler import Scheduler

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    gpus = None if args.gpus is None else [g.strip() for g in args.gpus.split(",") if g.strip()]
    Scheduler(args.home, cpu_slots=args.cpu_slots, gpus=gpus, poll_interval=args.poll,
              cancel_timeout=args.cancel_timeout, heartbeat_timeout=args.heartbeat_timeout).serve()
    return 0


def _step(progress: dict) -> str:
    step, total = progress.get("step"), progress.get("max_steps")
    return "-" if step is None else f"{step}/{total}" if total else str(step)


def _num(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
