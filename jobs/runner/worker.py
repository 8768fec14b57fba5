"""One job, one OS process: ``python -m jobs.runner.worker HOME JOB_ID``.

The scheduler starts this in its own process session with stdout and stderr going to
``<run>/log.txt``, so a crash, an out-of-memory kill or a segfault takes down only the
job. The process:

- touches ``<run>/heartbeat`` every few seconds from a thread, so the scheduler can tell
  a live job from a hung or vanished one;
- turns SIGTERM (or a cancel request found in the store) into a graceful stop at the
  next step boundary, where the training loop writes a checkpoint;
- runs the training loop itself, or, for a job asking for N devices, ``torchrun`` with
  N processes that each run ``python -m jobs.runner.worker --rank HOME JOB_ID``;
- writes the outcome from ``run.json`` back to the store.

Heavy imports (torch, the training loop) happen after the heartbeat starts.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from jobs.training.allocator import preload_env, running_on
from adapters.core.errors import StudioError, describe
from adapters.core.spawn import spawn_module
from jobs.home import AUTH_ENV, ENV_VAR
from jobs.runfolder import HEARTBEAT_FILE, LOG_FILE, RunFolder, make_marked_folder, read_run, update_run
from jobs.runner.store import Job, JobStore, Status

HEARTBEAT_EVERY = 2.0  # seconds; the scheduler's staleness limit is many times this

# Multi-node launch settings used when the spec does not carry them (one node).
NODE_DEFAULTS = {"nnodes": 1, "node_rank": 0, "rdzv_endpoint": None}


class StopRequest:
    """Set by SIGTERM or a cancel request; polled by the training loop at step boundaries."""

    def __init__(self):
        self.event = threading.Event()
        self.reason: str | None = None
        self.children: list[subprocess.Popen] = []
        self._told: set[int] = set()

    def set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()
        self.forward()

    def forward(self) -> None:
        """Pass the stop on to launched children once each (torchrun hands it to its ranks;
        a second SIGTERM would cut its graceful shutdown short)."""
        if not self.event.is_set():
            return
        for child in self.children:
            if child.pid not in self._told and child.poll() is None:
                self._told.add(child.pid)
                child.send_signal(signal.SIGTERM)

    def __call__(self) -> bool:
        return self.event.is_set()


class Heartbeat(threading.Thread):
    """Touches the heartbeat file and notices cancel requests made through the store."""

    def __init__(self, store: JobStore, job: Job, stop: StopRequest):
        super().__init__(name="heartbeat", daemon=True)
        self.store, self.job, self.stop_request = store, job, stop
        self.path = Path(job.run_dir) / HEARTBEAT_FILE
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(f"{os.getpid()} {time.time():.3f}\n")
            try:
                if self.store.get(self.job.id).cancel_requested:
                    self.stop_request.set("cancel requested")
            except Exception:  # a busy or vanished store must not kill the job
                pass
            self.done.wait(HEARTBEAT_EVERY)


def heartbeat_age(run_dir: str | Path) -> float | None:
    """Seconds since the job last beat, or None when it never did."""
    return RunFolder(run_dir).heartbeat_age()


def progress(run_dir: str | Path) -> dict:
    """How far a job has got, from its run folder (empty before it starts)."""
    folder = RunFolder(run_dir)
    run = folder.read()
    metrics = run.get("metrics") or {}
    out = {"step": run.get("step"), "max_steps": run.get("max_steps"), "run_status": run.get("status"),
           "heartbeat_age": folder.heartbeat_age()}
    out.update({k: metrics[k] for k in ("train_loss", "eval_loss", "exact_match", "tokens_per_second")
                if k in metrics})
    return out


def spawn(home: Path, job: Job, env: dict[str, str]) -> subprocess.Popen:
    """Start the job's process: own session, output appended to ``<run>/log.txt``."""
    preload = preload_env()  # a bad STUDIO_ALLOCATOR fails here, before the run folder is made
    run_dir = Path(job.run_dir)
    make_marked_folder(run_dir, {"job": job.id})
    with open(run_dir / LOG_FILE, "ab") as log:
        log.write(f"--- job {job.id} attempt {job.attempt} started {time.ctime()} ---\n".encode())
        log.flush()
        # Unbuffered (spawn_module), so `studio jobs logs --follow` shows lines as they happen.
        return spawn_module("jobs.runner.worker", home, job.id,
                            env={**job_environment(), **preload, **env, ENV_VAR: str(home)},
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=run_dir)


def job_environment() -> dict[str, str]:
    """This process's environment without the server's secrets."""
    return {k: v for k, v in os.environ.items() if k != AUTH_ENV}


def execute(home: Path, job_id: int, *, install_signals: bool = True) -> Status:
    """Run a claimed job in this process and record its outcome in the store."""
    store = JobStore(home)
    job = store.get(job_id)
    make_marked_folder(Path(job.run_dir), {"job": job.id})  # inline runs skip spawn()
    store.set_pid(job.id, os.getpid())
    stop = StopRequest()
    if install_signals:
        signal.signal(signal.SIGTERM, lambda *_: stop.set("SIGTERM"))
    beat = Heartbeat(store, job, stop)
    beat.start()
    print(f"job {job.id} ({job.name}): pid {os.getpid()}, {job.nprocs} process(es), devices {job.devices}, "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}, "
          f"malloc: {running_on() or 'the system'}", flush=True)
    try:
        if job.nprocs > 1:
            _run_distributed(home, job, stop)
        else:
            _run_here(job, stop)
        status, error = outcome(job, store, stop)
    except StudioError as e:
        status, error = Status.FAILED, e.message
    except RankLost as e:
        status, error = Status.INTERRUPTED, str(e)
        update_run(job.run_dir, status=Status.INTERRUPTED, error=error)
    except KeyboardInterrupt:
        status, error = Status.INTERRUPTED, "interrupted from the keyboard; resume to continue"
    except BaseException as e:  # the job's own failure, never the scheduler's
        traceback.print_exc()
        status, error = Status.FAILED, describe(e)
    finally:
        beat.done.set()
        beat.join()
    # Log first: a reader following the log stops once the store says the job ended.
    print(f"--- job {job.id} {status}{': ' + error if error else ''} ---", flush=True)
    store.finish(job.id, status, error, pid=os.getpid())
    return status


def _run_here(job: Job, stop: StopRequest) -> None:
    _limit_threads()
    from jobs.spec import parse_spec
    from jobs.training.recipe import train

    train(parse_spec(job.spec, where=f"job {job.id}"), resume=True, stop=stop)


class RankLost(Exception):
    """A rank of a distributed job was killed by a signal (out of memory, a lost machine, kill -9):
    the job is interrupted, not failed, and resumes from its last sealed checkpoint."""


def _run_distributed(home: Path, job: Job, stop: StopRequest) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={job.nprocs}",
           *node_args(job.spec, job.id), "-m", "jobs.runner.worker", "--rank", str(home), str(job.id)]
    print("launching:", " ".join(cmd), flush=True)
    # torchrun's stderr (and the ranks') passes through here to the log, so that its closing
    # report of which rank failed first, and how, can be read back.
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    stop.children.append(child)
    stop.forward()  # a stop that arrived while launching
    tail: list[str] = []
    for raw in child.stderr:
        line = raw.decode(errors="replace")
        sys.stderr.write(line)
        tail = (tail + [line])[-400:]
    sys.stderr.flush()
    code = child.wait()
    if code != 0 and not stop():
        lost = lost_rank("".join(tail))
        if lost:
            raise RankLost(f"rank {lost[0]} was killed by {lost[1]}; resume to continue from the last checkpoint")
        raise RuntimeError(f"torchrun exited with code {code}; the ranks' errors are above in this log")


def lost_rank(report: str) -> tuple[int, str] | None:
    """(rank, signal name) of the first failure torchrun reports, when a signal killed it."""
    import re

    cause = report.rpartition("Root Cause")[2]
    rank = re.search(r"rank\s*:\s*(\d+)", cause)
    signal_name = re.search(r"exitcode\s*:\s*-\d+.*?\((SIG[A-Z]+)\)", cause)
    if not (rank and signal_name):
        return None
    return int(rank.group(1)), signal_name.group(1)


def node_args(spec: dict, job_id: int) -> list[str]:
    """torchrun options for the job's node layout; one node uses a private local rendezvous."""
    training = spec.get("training", {})
    opts = {k: training.get(k, v) for k, v in NODE_DEFAULTS.items()}
    if opts["nnodes"] <= 1:
        return ["--standalone", "--nnodes=1"]
    if not opts["rdzv_endpoint"]:
        raise StudioError("a multi-node job needs a rendezvous endpoint.", "training.rdzv_endpoint",
                          "set it to host:port of node 0, reachable from every node.")
    return [f"--nnodes={opts['nnodes']}", f"--node-rank={opts['node_rank']}", "--rdzv-backend=static",
            f"--rdzv-endpoint={opts['rdzv_endpoint']}", f"--rdzv-id=studio-job-{job_id}"]


def outcome(job: Job, store: JobStore, stop: StopRequest) -> tuple[Status, str | None]:
    """The job's final status, from the training loop's own record in run.json."""
    run = read_run(job.run_dir) or {}
    state = run.get("status")
    if state == Status.COMPLETED:
        return Status.COMPLETED, None
    if state == Status.CANCELLED or (stop() and state in (None, Status.RUNNING)):
        if store.get(job.id).cancel_requested:
            return Status.CANCELLED, f"cancelled at step {run.get('step', 0)}; resume to continue"
        return Status.INTERRUPTED, f"stopped by {stop.reason or 'a signal'} at step {run.get('step', 0)}; resume to continue"
    if state in (Status.FAILED, Status.INTERRUPTED):
        return Status(state), run.get("error") or f"training {state}"
    return Status.FAILED, "training ended without recording a final status in run.json"


def _limit_threads() -> None:
    # The scheduler sets OMP_NUM_THREADS to this job's share of the cores; torch reads
    # it at import, set it again in case torch was imported first (inline runs).
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))


def _die_with_parent() -> None:
    """Linux: have the kernel stop this child when its parent dies, so no rank outlives
    a killed job (torchrun starts each rank in a session of its own)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def rank_main(home: Path, job_id: int) -> None:
    """One data-parallel rank under torchrun: train with the others until done or stopped."""
    _die_with_parent()
    if os.getppid() == 1:  # torchrun already gone before the line above took effect
        sys.exit("parent launcher exited")
    stop = StopRequest()
    signal.signal(signal.SIGTERM, lambda *_: stop.set("SIGTERM"))
    _run_here(JobStore(home).get(job_id), stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.runner.worker", description="Run one queued job (started by the scheduler).")
    parser.add_argument("--rank", action="store_true", help="run as one rank under torchrun")
    parser.add_argument("home", type=Path)
    parser.add_argument("job_id", type=int)
    args = parser.parse_args(argv)
    if args.rank:
        rank_main(args.home, args.job_id)
    else:
        execute(args.home, args.job_id)


if __name__ == "__main__":
    main()
