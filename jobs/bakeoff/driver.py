"""Driving a bake-off: queue its jobs, wait for them (or run them), choose, report.

``drive`` is idempotent: it picks up from what the manifest records, so a bake-off whose
driver stopped continues with ``studio bakeoff --resume ID``. ``cancel`` stops one: its
unfinished jobs are cancelled and the driver ends at its next check. The UI starts the
driver as ``python -m jobs.bakeoff.driver drive HOME ID``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from jobs.bakeoff.plan import (candidate_spec, choose_rates, extend_grids, folder, load, plan, save,
                               searched_rates, settle_landings)
from adapters.core.errors import StudioError, describe
from adapters.core.spawn import spawn_module
from jobs.home import home_env, studio_home
from jobs.runner.store import FINISHED, RESUMABLE, JobStore, Status

CANCEL_FILE = "cancel"  # a marker, not a manifest field: the driver rewrites the manifest


class Cancelled(Exception):
    pass


def _submit(home: Path, bid: str, data: dict, name: str) -> int:
    from jobs.runner.submit import submit_job

    return submit_job(home, data, name=f"bakeoff {bid} {name}", where=f"bake-off {bid}: {name}").id


def submit_search(home: Path, manifest: dict) -> None:
    bid, seed0 = manifest["id"], manifest["seeds"][0]
    queued = {(s["key"], s["lr"]) for s in manifest["search"]}  # a driver that stopped midway
    timed = manifest["request"]["budget_minutes"] is not None
    for cand in manifest["candidates"]:
        # One rate needs no search, unless the runs must also measure the step time.
        if cand["skipped"] or len(cand["lr_grid"]) < 2 and not timed:
            continue
        for lr in searched_rates(cand):
            if (cand["key"], lr) in queued:
                continue
            data = candidate_spec(manifest["spec"], cand["method"], cand["rule"], lr, manifest["search_steps"],
                                  seed0, search=True, rows=manifest.get("data"))
            jid = _submit(home, bid, data, f"{cand['key']} lr={lr:.3g} (search)")
            manifest["search"].append({"key": cand["key"], "lr": lr, "job_id": jid})
            save(home, manifest)


def submit_final(home: Path, manifest: dict) -> None:
    queued = {(f["key"], f["seed"]) for f in manifest["final"]}
    for cand in manifest["candidates"]:
        if cand["skipped"] or cand["lr"] is None:
            continue
        for seed in manifest["seeds"]:
            if (cand["key"], seed) in queued:
                continue
            data = candidate_spec(manifest["spec"], cand["method"], cand["rule"], cand["lr"], cand["steps"],
                                  seed, search=False, rows=manifest.get("data"))
            jid = _submit(home, manifest["id"], data, f"{cand['key']} seed {seed}")
            manifest["final"].append({"key": cand["key"], "seed": seed, "lr": cand["lr"], "job_id": jid})
            save(home, manifest)


def _jobs(manifest: dict) -> list[int]:
    return [entry["job_id"] for phase in ("search", "final") for entry in manifest[phase]]


def cancel(home: str | Path | None, bid: str) -> list[int]:
    """Stop a bake-off: its driver ends at its next check, its unfinished jobs are cancelled
    (running ones keep a checkpoint). Returns the jobs asked to stop."""
    (folder(home, bid) / CANCEL_FILE).touch()
    return _stop_jobs(home, load(home, bid))


def _stop_jobs(home, manifest: dict) -> list[int]:
    store, stopped = JobStore(home), []
    for jid in _jobs(manifest):
        try:
            if not store.get(jid).finished:
                store.cancel(jid)
                stopped.append(jid)
        except StudioError:
            continue  # deleted, or finished meanwhile
    return stopped


def resume(home: str | Path | None, bid: str) -> list[int]:
    """Before driving again: lift a cancel and queue the bake-off's stopped jobs again (they
    continue from their checkpoints). Returns the jobs queued again."""
    (folder(home, bid) / CANCEL_FILE).unlink(missing_ok=True)
    store, queued = JobStore(home), []
    for jid in _jobs(load(home, bid)):
        try:
            if store.get(jid).status in RESUMABLE:
                store.resume(jid)
                queued.append(jid)
        except StudioError:
            continue
    return queued


def wait(home: Path, job_ids: list[int], inline: bool = False, say=lambda text: None, poll: float = 1.0,
         cancelled=lambda: False) -> None:
    """Until every job has finished: run them here one by one (``inline``), leave them to the
    scheduler serving this home, or, when none does, serve the home ourselves (one process
    per job, so each run's peak memory is its own). Raises Cancelled once ``cancelled()``."""
    from jobs.runner.scheduler import Scheduler, run_inline, scheduler_pid

    store = JobStore(home)
    if inline:
        for jid in job_ids:
            if cancelled():
                raise Cancelled()
            if store.get(jid).status == Status.QUEUED:
                say(f"job {jid}: {store.get(jid).name}")
                run_inline(home, jid)
        return
    sched = None
    try:
        while True:
            if cancelled():
                raise Cancelled()
            pending = [j for j in job_ids if store.get(j).status not in FINISHED]
            if not pending:
                return
            if sched is None and scheduler_pid(home) is None:
                try:
                    sched = Scheduler(home, poll_interval=poll)
                    sched.acquire()
                    sched.reconcile()
                    say("no `studio worker` serves this home: this process starts the jobs")
                except StudioError:
                    sched = None  # another scheduler started meanwhile; it serves the queue
            if sched is not None:
                sched.tick()
            time.sleep(poll)
    finally:
        if sched is not None:
            sched.release()


def drive(home: str | Path | None, bid: str, inline: bool = False, say=lambda text: None) -> Path:
    """Run a bake-off to its report from wherever it stands; returns the report folder."""
    from jobs.bakeoff.report import write_report

    home = studio_home(home)
    manifest = load(home, bid)
    if driver_alive(manifest):
        raise StudioError(f"bake-off {bid} is already being driven by process {manifest['driver_pid']}.",
                          f"bake-off {bid}", "wait for it, or cancel the bake-off first.")
    manifest.update(driver_pid=os.getpid(), error=None, inline=inline)
    save(home, manifest)
    with home_env(home):  # the estimator's model cache is the home's
        marker = folder(home, bid) / CANCEL_FILE
        watch = {"inline": inline, "say": say, "cancelled": marker.exists}
        try:
            if not manifest["candidates"]:
                say("planning: validating candidates and estimating their memory")
                plan(home, manifest)
            if any(c["skipped"] is None and c.get("lr_landing") is None for c in manifest["candidates"]):
                submit_search(home, manifest)
                _phase(home, manifest, "searching")
                say(f"learning-rate search: {len(manifest['search'])} short runs")
                wait(home, [s["job_id"] for s in manifest["search"]], **watch)
                choose_rates(home, manifest)
                extended = extend_grids(manifest)
                if extended:  # a winner at the edge of its grid: one more rate beyond it, once
                    submit_search(home, manifest)
                    say(f"learning-rate search: one more rate past the edge for {', '.join(extended)}")
                    wait(home, [s["job_id"] for s in manifest["search"]], **watch)
                    choose_rates(home, manifest)
                settle_landings(home, manifest)
            submit_final(home, manifest)
            _phase(home, manifest, "training")
            say(f"training: {len(manifest['final'])} runs")
            wait(home, [f["job_id"] for f in manifest["final"]], **watch)
            _phase(home, manifest, "reporting")
            out = write_report(home, manifest)
            manifest.update(status="done", finished_at=time.time(), report_dir=str(out))
            return out
        except Cancelled:
            _stop_jobs(home, manifest)  # also those queued after the request
            manifest.update(status="cancelled", error=f"cancelled; `studio bakeoff --resume {bid}` continues it")
            raise StudioError(f"bake-off {bid} was cancelled.", f"bake-off {bid}",
                              f"`studio bakeoff --resume {bid}` continues it.") from None
        except BaseException as e:
            manifest.update(status="failed" if not isinstance(e, KeyboardInterrupt) else manifest["status"],
                            error=describe(e))
            raise
        finally:
            manifest["driver_pid"] = None
            save(home, manifest)


def driver_alive(manifest: dict) -> bool:
    """Whether the process recorded as the bake-off's driver still runs (and is one)."""
    import psutil

    pid = manifest.get("driver_pid")
    if pid is None or pid == os.getpid():
        return False
    try:
        return any("bakeoff" in part for part in psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _phase(home: Path, manifest: dict, status: str) -> None:
    manifest["status"] = status
    save(home, manifest)


def spawn_driver(home: Path, bid: str) -> int:
    """Start ``drive`` in a process of its own (the UI's launch); its output goes to driver.log."""
    import subprocess

    with open(folder(home, bid) / "driver.log", "ab") as log:
        proc = spawn_module("jobs.bakeoff.driver", "drive", home, bid, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bakeoff.driver")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("drive", help="run a recorded bake-off to its report")
    d.add_argument("home")
    d.add_argument("id")
    args = parser.parse_args(argv)
    try:
        out = drive(args.home, args.id, say=lambda text: print(text, flush=True))
    except StudioError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
