"""The scheduler: starts queued jobs on free devices and watches the running ones.

One scheduler per store (an exclusive ``flock`` on ``<home>/scheduler.lock``). All state
lives in the store and the run folders, so the scheduler can be killed and restarted at
any time: on start it reconciles, marking jobs whose process is gone ``interrupted``
(with the reason) and re-attaching to jobs whose process still runs.

Devices: GPUs are handed out exclusively through ``CUDA_VISIBLE_DEVICES``; without GPUs
there are ``cpu_slots`` slots (one by default: two trainings on a few cores are each more
than twice as slow) and each job gets its share of the cores as torch threads. Waiting
jobs start by priority, then in submission order; a job that does not fit yet holds the
line rather than being overtaken forever by smaller ones.
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from adapters.core.errors import StudioError
from jobs.home import home_env, lock_path, studio_home
from jobs.runner.store import Job, JobStore, Status
from jobs.runner.worker import execute, heartbeat_age, spawn

log = logging.getLogger("studio.scheduler")

CPU = "cpu"
# A process created this long after its job was claimed cannot be the job's worker
# (the worker is spawned right after the claim); it reuses a dead worker's pid.
PID_REUSE_MARGIN = 30.0


def detect_gpus() -> list[str]:
    """GPU ids this process may hand out, as CUDA_VISIBLE_DEVICES entries.

    Counted by torch in a child process: the scheduler also runs inside the studio's web
    process, which never imports torch (its import alone is hundreds of MB).
    """
    try:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                               capture_output=True, text=True, timeout=300)
        out, err = probe.stdout, probe.stderr
    except subprocess.TimeoutExpired:
        out, err = "", "torch did not answer within 300 s"
    try:
        count = int(out.split()[-1])
    except (ValueError, IndexError):
        log.warning("could not count the GPUs (%s); scheduling on the CPU only", err.strip()[-300:])
        count = 0
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[:count] if visible else [str(i) for i in range(count)]


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Placement:
    job: Job
    devices: str | None  # "0,1" / "cpu"; None: can never run here (error says why)
    error: str | None = None


def assign(queued: list[Job], running: list[Job], gpus: list[str], cpu_slots: int) -> list[Placement]:
    """Which waiting jobs start now, and where. ``queued`` is already in start order."""
    busy = {d for j in running if j.devices and j.devices != CPU for d in j.devices.split(",")}
    free = [g for g in gpus if g not in busy]
    cpu_free = cpu_slots - sum(1 for j in running if j.devices == CPU)
    out = []
    for job in queued:
        if gpus:
            if job.nprocs > len(gpus):
                out.append(Placement(job, None, f"the job asks for {job.nprocs} devices but this machine has "
                                                f"{len(gpus)} GPU(s); resubmit with --devices {len(gpus)} or fewer"))
                continue
            if job.nprocs > len(free):
                break
            out.append(Placement(job, ",".join(free[:job.nprocs])))
            free = free[job.nprocs:]
        else:
            if cpu_free < 1:
                break
            out.append(Placement(job, CPU))
            cpu_free -= 1
    return out


class Scheduler:
    def __init__(self, home: str | Path | None = None, *, cpu_slots: int = 1, gpus: list[str] | None = None,
                 poll_interval: float = 1.0, cancel_timeout: float = 60.0, heartbeat_timeout: float = 120.0):
        self.home = studio_home(home)
        self.store = JobStore(self.home)
        self.gpus = detect_gpus() if gpus is None else list(gpus)
        self.cpu_slots = max(1, cpu_slots)
        self.poll_interval = poll_interval
        self.cancel_timeout = cancel_timeout  # graceful stop -> hard kill
        self.heartbeat_timeout = heartbeat_timeout  # silent this long -> hung, killed
        self.children: dict[int, subprocess.Popen] = {}
        self.term_sent: dict[int, float] = {}
        self._lock_file = None

    # -- the lock ------------------------------------------------------------------

    def acquire(self) -> None:
        f = open(lock_path(self.home), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise StudioError(f"another scheduler (pid {holder}) is already running on this store.",
                              str(self.home), "use that one, or stop it before starting another.") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f

    def release(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> "Scheduler":
        self.acquire()
        self.reconcile()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- the loop ------------------------------------------------------------------

    def reconcile(self) -> None:
        """Settle what an earlier scheduler left behind."""
        for job in self.store.list((Status.RUNNING,)):
            if job.pid is not None and self._alive(job):
                log.info("job %s: re-attached to running process %s", job.id, job.pid)
            self._watch(job)

    def tick(self) -> None:
        for job in self.store.list((Status.RUNNING,)):
            self._watch(job)
        running = self.store.list((Status.RUNNING,))
        for place in assign(self.store.queued(), running, self.gpus, self.cpu_slots):
            self._start(place)

    def serve(self, stop: threading.Event | None = None) -> None:
        """Run until ``stop`` is set (or SIGTERM / Ctrl-C in the main thread). Jobs keep
        running when the scheduler stops; the next one re-attaches to them."""
        stop = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
        with self:
            log.info("scheduler on %s: %s", self.home,
                     f"GPUs {','.join(self.gpus)}" if self.gpus else f"{self.cpu_slots} CPU slot(s)")
            while not stop.is_set():
                try:
                    self.tick()
                except Exception:  # e.g. a full disk or a locked store: retry, never give up the queue
                    log.exception("scheduler tick failed; retrying")
                stop.wait(self.poll_interval)

    def run_until_idle(self, timeout: float = 600.0) -> None:
        """Tick until nothing is queued or running (tests, scripts)."""
        deadline = time.monotonic() + timeout
        while self.store.list((Status.QUEUED, Status.RUNNING)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs still queued or running after {timeout} s")
            self.tick()
            time.sleep(self.poll_interval)

    # -- one job -------------------------------------------------------------------

    def _start(self, place: Placement) -> None:
        job = place.job
        if not self.store.claim(job.id, place.devices or "-"):
            return  # cancelled or taken meanwhile
        if place.devices is None:
            self.store.finish(job.id, Status.FAILED, place.error)
            return
        # A CPU job sees no GPU at all, so it cannot touch one another job holds.
        env = {"OMP_NUM_THREADS": str(self._threads(job)),
               "CUDA_VISIBLE_DEVICES": "" if place.devices == CPU else place.devices}
        try:
            proc = spawn(self.home, job, env)
        except (OSError, StudioError) as e:
            why = e.message if isinstance(e, StudioError) else str(e)
            self.store.finish(job.id, Status.FAILED, f"could not start the job process: {why}")
            return
        self.store.set_pid(job.id, proc.pid)
        self.children[job.id] = proc
        log.info("job %s: started on %s (pid %s)", job.id, place.devices, proc.pid)

    def _threads(self, job: Job) -> int:
        share = cpu_cores() // (len(self.gpus) or self.cpu_slots)
        return max(1, share // (1 if self.gpus else job.nprocs))

    def _watch(self, job: Job) -> None:
        if job.cancel_requested:
            self._stop_gracefully(job)
        child = self.children.get(job.id)
        if child is not None and child.pid == job.pid:
            code = child.poll()
            if code is not None:
                del self.children[job.id]
                self._settle(job, _exit_reason(job, code))
                return
        elif job.pid is None:
            if time.time() - (job.started_at or 0) > PID_REUSE_MARGIN:
                self._settle(job, "the job's process never started (the scheduler stopped while starting it)")
            return
        elif not self._alive(job):
            self._settle(job, _gone_reason(job))
            return
        # A heartbeat older than this start is a previous attempt's (resume reuses the folder).
        age = heartbeat_age(job.run_dir)
        since_start = time.time() - (job.started_at or time.time())
        silent = since_start if age is None else min(age, since_start)
        if silent > self.heartbeat_timeout:
            kill_tree(job.pid)
            self._settle(job, f"no heartbeat for {silent:.0f} s (hung or frozen); the process was killed")

    def _stop_gracefully(self, job: Job) -> None:
        sent = self.term_sent.get(job.id)
        if sent is None:
            if job.pid is not None:
                _signal(job.pid, signal.SIGTERM)
            self.term_sent[job.id] = time.monotonic()
        elif time.monotonic() - sent > self.cancel_timeout:
            kill_tree(job.pid)
            self.children.pop(job.id, None)
            self.term_sent.pop(job.id, None)
            self.store.finish(job.id, Status.CANCELLED, f"did not stop within {self.cancel_timeout:.0f} s of the "
                              "cancel request and was killed; resume continues from its last checkpoint",
                              pid=job.pid)

    def _settle(self, job: Job, reason: str) -> None:
        """The job's process is gone without recording an outcome: decide one."""
        from jobs.runfolder import COMPLETED, read_run

        self.term_sent.pop(job.id, None)
        self.children.pop(job.id, None)
        try:
            run = read_run(job.run_dir) or {}
        except ValueError:
            run = {}
        if run.get("status") == COMPLETED:
            status, error = Status.COMPLETED, None
        else:
            status, error = Status.INTERRUPTED, f"{reason}, at step {run.get('step', 0)}; resume to continue"
        if self.store.finish(job.id, status, error, pid=job.pid):
            log.info("job %s: %s%s", job.id, status, f" ({error})" if error else "")

    def _alive(self, job: Job) -> bool:
        try:
            proc = psutil.Process(job.pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            return proc.create_time() <= (job.started_at or 0) + PID_REUSE_MARGIN
        except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
            return False


def run_inline(home: str | Path | None, job_id: int | str) -> Job:
    """Run one queued job synchronously in this process (tests, notebooks); no scheduler
    is needed. Cancel it from elsewhere through the store."""
    home = studio_home(home)
    store = JobStore(home)
    job = store.get(job_id)
    if not store.claim(job.id, "inline"):
        raise StudioError(f"job {job.id} is {job.status}, not queued.", f"job {job.id}",
                          "resume or retry it first.")
    with home_env(home):  # the model cache follows the job's home
        execute(home, job.id, install_signals=False)
    return store.get(job.id)


def scheduler_pid(home: str | Path | None = None) -> int | None:
    """The pid of the scheduler serving this home, or None (the UI starts one then)."""
    path = lock_path(studio_home(home))
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            text = f.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def _exit_reason(job: Job, code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory, or killed by hand)" if name == "SIGKILL" else ""
        return f"job process {job.pid} was killed by {name}{hint}"
    return f"job process {job.pid} exited with code {code} without recording an outcome"


def _gone_reason(job: Job) -> str:
    age = heartbeat_age(job.run_dir)
    last = f" (last heartbeat {age:.0f} s ago)" if age is not None else ""
    return f"job process {job.pid} is gone{last}"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_tree(pid: int | None) -> None:
    """SIGKILL the job process and everything it started (torchrun ranks live in
    sessions of their own, so a process-group kill would miss them)."""
    if pid is None:
        return
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
