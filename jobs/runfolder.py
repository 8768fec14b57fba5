"""The run folder, a contract outside tools rely on: run.json, metrics.jsonl, adapter/, checkpoints/.

Every file here is replaced atomically (write a temporary file, then rename), so a reader
never sees half a run.json and a crash never leaves one behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any


class Status(StrEnum):
    """The one status vocabulary: a job's in the store (jobs.runner.store) and a run's own in
    run.json, written by the training loop. A run folder never says ``queued`` (it is made
    when the job starts); the words are plain strings on disk and in the API."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


# The names the training loop writes run.json with.
RUNNING, COMPLETED, FAILED, CANCELLED, INTERRUPTED = (Status.RUNNING, Status.COMPLETED, Status.FAILED,
                                                      Status.CANCELLED, Status.INTERRUPTED)
RUN_FILE, METRICS_FILE, ADAPTER_DIR, CHECKPOINTS_DIR = "run.json", "metrics.jsonl", "adapter", "checkpoints"
# Written by the job runner before training starts; they do not make a folder "another run".
LOG_FILE, HEARTBEAT_FILE = "log.txt", "heartbeat"
# Written into every folder the studio creates for a job or a dataset; deleting removes
# only folders that carry it, so a folder the studio did not make is never touched.
MARKER = ".studio-made"
RUNNER_FILES = (LOG_FILE, HEARTBEAT_FILE, MARKER)
# What the studio writes in a run folder (and the temporary names of its atomic writes).
RUN_FILES = (RUN_FILE, METRICS_FILE, LOG_FILE, HEARTBEAT_FILE, ADAPTER_DIR, CHECKPOINTS_DIR, MARKER)
RUN_TEMP_PREFIXES = (".run.json.", ".metrics.", ".adapter-", ".adapter.old", f".{MARKER}.")
LOG_TAIL_BYTES = 12_000


@dataclass(frozen=True)
class RunFolder:
    """One run folder, read side: where each file is, and what the run says about itself.

    The UI and the CLI read runs through this (never by file name), so the names live here.
    """

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def heartbeat_file(self) -> Path:
        return self.path / HEARTBEAT_FILE

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def read(self) -> dict:
        """run.json, or {} before the run starts. It is replaced atomically, but a copy left by
        an older version may be damaged: that reads as empty, not as an error."""
        try:
            return read_run(self.path) or {}
        except ValueError:
            return {}

    def metrics(self) -> list[dict]:
        return read_metrics(self.path)

    @property
    def completed(self) -> bool:
        return self.read().get("status") == COMPLETED and self.adapter_dir.is_dir()

    def heartbeat_age(self) -> float | None:
        """Seconds since the job last beat, or None when it never did."""
        try:
            return max(0.0, time.time() - self.heartbeat_file.stat().st_mtime)
        except FileNotFoundError:
            return None

    def log_tail(self, limit: int = LOG_TAIL_BYTES) -> str:
        """The end of the job's log, from a line start."""
        if not self.log_file.is_file():
            return ""
        with open(self.log_file, "rb") as f:
            f.seek(max(0, self.log_file.stat().st_size - limit))
            text = f.read().decode("utf-8", errors="replace")
        return text if len(text) < limit else text.split("\n", 1)[-1]

    def progress(self, finished: bool = False, running: bool = False) -> dict:
        """Step, total, the fraction done and the time left, as run.json has them now."""
        run = self.read()
        metrics = run.get("metrics") or {}
        step, total = run.get("step"), run.get("max_steps")
        fraction = 1.0 if finished else min(step / total, 1.0) if step is not None and total else None
        eta = None
        if running and step and total and metrics.get("train_seconds"):
            eta = metrics["train_seconds"] / step * max(total - step, 0)
        return {"step": step, "max_steps": total, "progress": fraction, "eta_seconds": eta,
                "run_status": run.get("status"), "metrics": metrics}


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_run(run_dir: str | Path) -> dict | None:
    p = Path(run_dir) / RUN_FILE
    if not p.is_file():
        return None
    return json.loads(p.read_text(encoding="utf-8"))


def update_run(run_dir: Path, **fields: Any) -> dict:
    run = read_run(run_dir) or {}
    for key, value in fields.items():
        if key == "metrics":
            run.setdefault("metrics", {}).update(value)
        else:
            run[key] = value
    write_json_atomic(Path(run_dir) / RUN_FILE, run)
    return run


def append_metrics(run_dir: Path, record: dict) -> None:
    # One short write per line; a reader may see a partial last line and must skip it.
    with open(Path(run_dir) / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=float) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / METRICS_FILE
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return rows


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint we continue from."""
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    p = Path(run_dir) / METRICS_FILE
    fd, tmp = tempfile.mkstemp(prefix=".metrics.", dir=run_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, p)


def replace_dir_atomic(src_tmp: Path, target: Path) -> None:
    """Move a fully written temporary folder into place, replacing any older one."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(src_tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- folders the studio made ---------------------------------------------------------------

def make_marked_folder(folder: Path, owner: dict) -> bool:
    """Create ``folder`` carrying the studio's marker (``owner`` says for what). A folder
    that already exists is not the studio's to mark; returns whether it was created."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir()
    except FileExistsError:
        return False
    write_json_atomic(folder / MARKER, {"made_by": "studio", **owner})
    return True


def read_marker(folder: Path) -> dict | None:
    """The marker of a studio-made folder, or None (missing, a symlink, or not ours)."""
    folder = Path(folder)
    path = folder / MARKER
    if folder.is_symlink() or not folder.is_dir() or path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("made_by") == "studio" else None


def remove_marked_folder(folder: Path, owner: dict, ours) -> list[str]:
    """Delete the entries ``ours(name)`` accepts from a folder whose marker names ``owner``,
    then the folder once nothing else is left in it. Symlinks are never followed: a link
    the studio did not write stays, and rmtree removes links inside, not their targets.
    Returns what was removed (the folder alone when it went as a whole)."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None or any(marker.get(k) != v for k, v in owner.items()):
        return []
    removed = []
    for entry in list(os.scandir(folder)):
        if entry.name == MARKER or not ours(entry.name) or entry.is_symlink():
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
        removed.append(entry.path)
    if [e.name for e in os.scandir(folder)] == [MARKER]:
        os.unlink(folder / MARKER)
        folder.rmdir()
        return [str(folder)]
    return removed


def is_run_entry(name: str) -> bool:
    return name in RUN_FILES or name.startswith(RUN_TEMP_PREFIXES)
