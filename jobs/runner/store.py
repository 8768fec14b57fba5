"""The job store: one SQLite table in the studio's home, shared by every process.

The CLI, the UI, the scheduler and the job processes all read and write it at the same
time, so the database runs in WAL mode (readers never block the writer), every
operation opens its own short transaction, and every status change is a conditional
update (``WHERE status = ...``): two processes racing on one job cannot both win.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from adapters.core.errors import StudioError
from jobs.home import runs_dir, store_path, studio_home
from jobs.runfolder import Status  # the run folder's words, shared; imported from here by the runner and UI


FINISHED = (Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.INTERRUPTED)
# A stopped job can continue from its last good checkpoint; a completed one has nothing left.
RESUMABLE = (Status.FAILED, Status.CANCELLED, Status.INTERRUPTED)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s.value) for s in Status)})),
    priority INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    pid INTEGER,
    devices TEXT,
    nprocs INTEGER NOT NULL DEFAULT 1,
    error TEXT,
    run_dir TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 1,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    earlier_run_dirs TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, priority, id);
"""


@dataclass
class Job:
    id: int
    name: str
    spec: dict
    status: Status
    priority: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    pid: int | None
    devices: str | None  # "0,1" for GPUs, "cpu" for a CPU slot, None while queued
    nprocs: int  # data-parallel processes the job runs as
    error: str | None
    run_dir: str
    attempt: int
    cancel_requested: bool
    earlier_run_dirs: list[str]  # folders of previous attempts (retry starts a fresh one)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        data = dict(row)
        data["spec"] = json.loads(data["spec"])
        data["status"] = Status(data["status"])
        data["cancel_requested"] = bool(data["cancel_requested"])
        data["earlier_run_dirs"] = json.loads(data["earlier_run_dirs"])
        return cls(**data)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data


class JobStore:
    """Jobs persisted in ``<home>/jobs.sqlite``; cheap to create, one per caller is fine."""

    def __init__(self, home: str | Path | None = None):
        self.home = studio_home(home)
        self.path = store_path(self.home)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # Autocommit mode, with explicit BEGIN IMMEDIATE for writes: taking the write
        # lock up front avoids the deadlock of two readers both upgrading to writers.
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("PRAGMA synchronous=NORMAL")  # safe under WAL; a crash loses no committed step
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- reading -----------------------------------------------------------------

    def get(self, job_id: int | str) -> Job:
        jid = parse_id(job_id)
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (jid,)).fetchone()
        if row is None:
            raise StudioError(f"no job with id {jid}.", str(self.path), "list the jobs with `studio jobs list`.")
        return Job.from_row(row)

    def list(self, statuses: tuple[Status, ...] | None = None) -> list[Job]:
        query, args = "SELECT * FROM jobs", ()
        if statuses:
            query += f" WHERE status IN ({', '.join('?' * len(statuses))})"
            args = tuple(s.value for s in statuses)
        with self._connect() as db:
            return [Job.from_row(r) for r in db.execute(query + " ORDER BY id", args)]

    def queued(self) -> list[Job]:
        """Waiting jobs in the order they should start: higher priority first, then FIFO."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY priority DESC, id",
                              (Status.QUEUED.value,))
            return [Job.from_row(r) for r in rows]

    # -- writing -----------------------------------------------------------------

    def submit(self, spec: dict, *, name: str, priority: int = 0, nprocs: int = 1,
               run_dir: str | None = None) -> Job:
        """Queue a job; ``run_dir`` defaults to ``<home>/runs/<id>``."""
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO jobs (name, spec, status, priority, created_at, nprocs, run_dir)"
                " VALUES (?, ?, ?, ?, ?, ?, '')",
                (name, "{}", Status.QUEUED.value, priority, time.time(), nprocs))
            jid = cur.lastrowid
            taken = _run_folders(db)
            folder = run_dir or str(_free_folder(runs_dir(self.home) / str(jid), taken))
            spec = {**spec, "output_dir": folder}
            db.execute("UPDATE jobs SET spec = ?, run_dir = ? WHERE id = ?", (json.dumps(spec), folder, jid))
        return self.get(jid)

    def claim(self, job_id: int, devices: str) -> bool:
        """Move a queued job to running on ``devices``; False if it is no longer queued."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET status = ?, devices = ?, started_at = ?, finished_at = NULL, pid = NULL,"
                " error = NULL, cancel_requested = 0 WHERE id = ? AND status = ?",
                (Status.RUNNING.value, devices, time.time(), job_id, Status.QUEUED.value))
            return cur.rowcount == 1

    def set_pid(self, job_id: int, pid: int) -> None:
        with self._write() as db:
            db.execute("UPDATE jobs SET pid = ? WHERE id = ? AND status = ?", (pid, job_id, Status.RUNNING.value))

    def finish(self, job_id: int, status: Status, error: str | None = None, *, pid: int | None = None) -> bool:
        """End a running job. With ``pid``, only if that process is still the job's owner,
        so a late report about an old process never overwrites a newer attempt."""
        if status not in FINISHED:
            raise ValueError(f"{status} is not a finished status")
        query = "UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE id = ? AND status = ?"
        args: tuple = (status.value, error, time.time(), job_id, Status.RUNNING.value)
        if pid is not None:
            query += " AND pid = ?"
            args += (pid,)
        with self._write() as db:
            return db.execute(query, args).rowcount == 1

    def cancel(self, job_id: int | str) -> Job:
        """Cancel a queued job at once; ask a running one to stop at its next step."""
        job = self.get(job_id)
        if job.finished:
            raise StudioError(f"job {job.id} is already {job.status}.", f"job {job.id}", "nothing to cancel.")
        with self._write() as db:
            db.execute("UPDATE jobs SET status = ?, finished_at = ?, error = ? WHERE id = ? AND status = ?",
                       (Status.CANCELLED.value, time.time(), "cancelled before it started", job.id,
                        Status.QUEUED.value))
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = ?",
                       (job.id, Status.RUNNING.value))
        return self.get(job.id)

    def resume(self, job_id: int | str) -> Job:
        """Queue a stopped job again in the same run folder; training continues from its
        last good checkpoint."""
        job = self.get(job_id)
        self._requeue(job, "resume", {})
        return self.get(job.id)

    def retry(self, job_id: int | str, check: Callable[[str], None] | None = None) -> Job:
        """Queue a finished job again from scratch, in a fresh run folder beside its first one;
        ``check(folder)`` may refuse that folder (raise) before anything changes."""
        job = self.get(job_id)
        attempt = job.attempt + 1
        first = (job.earlier_run_dirs or [job.run_dir])[0]
        with self._connect() as db:
            taken = _run_folders(db)
        folder = str(_free_folder(Path(f"{first}-attempt{attempt}"), taken))
        if check is not None:
            check(folder)
        spec = {**job.spec, "output_dir": folder}
        self._requeue(job, "retry", {"attempt": attempt, "run_dir": folder, "spec": json.dumps(spec),
                                     "earlier_run_dirs": json.dumps(job.earlier_run_dirs + [job.run_dir])})
        return self.get(job.id)

    def _requeue(self, job: Job, verb: str, changes: dict) -> None:
        allowed = RESUMABLE if verb == "resume" else FINISHED
        sets = ", ".join(f"{k} = ?" for k in changes)
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET status = ?, pid = NULL, devices = NULL, started_at = NULL, finished_at = NULL,"
                f" error = NULL, cancel_requested = 0{', ' + sets if sets else ''}"
                f" WHERE id = ? AND status IN ({', '.join('?' * len(allowed))})",
                (Status.QUEUED.value, *changes.values(), job.id, *(s.value for s in allowed)))
        if cur.rowcount != 1:
            can = ", ".join(s.value for s in allowed)
            raise StudioError(f"job {job.id} is {self.get(job.id).status}; only {can} jobs can {verb}.",
                              f"job {job.id}",
                              "cancel it first." if job.status == Status.RUNNING else
                              "use `studio jobs retry` to start it again from scratch.")

    def delete(self, job_id: int | str) -> Job:
        job = self.get(job_id)
        with self._write() as db:
            cur = db.execute("DELETE FROM jobs WHERE id = ? AND status != ?", (job.id, Status.RUNNING.value))
        if cur.rowcount != 1:
            raise StudioError(f"job {job.id} is running.", f"job {job.id}", "cancel it first, then delete it.")
        return job


def parse_id(job_id: int | str) -> int:
    text = str(job_id).strip().removeprefix("#")
    if isinstance(job_id, bool) or not (text.isascii() and text.isdigit()) or len(text) > 18:  # SQLite ids are 64-bit
        raise StudioError(f"{str(job_id)[:40]!r} is not a job id.", "job id",
                          "pass the number `studio jobs list` shows.")
    return int(text)


def _run_folders(db: sqlite3.Connection) -> set[str]:
    """Every run folder a job in the store has, or had (also those not created yet)."""
    out = set()
    for run_dir, earlier in db.execute("SELECT run_dir, earlier_run_dirs FROM jobs"):
        out.update([run_dir, *json.loads(earlier)])
    return out


def _free_folder(path: Path, taken: set[str] = frozenset()) -> Path:
    """``path``, or ``path-2``, ... when a folder of that name already holds something
    (a store recreated in an old home must not write into an earlier run) or belongs to
    another job (one queued but not started has no folder yet)."""
    candidate, n = path, 1
    while str(candidate) in taken or (candidate.exists() and any(candidate.iterdir())):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
