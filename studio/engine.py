"""The web process's side of the model process (``jobs.engine.server``): start it, ask, read the answer.

The web process imports no torch. Whatever needs a model or the method registry runs in
a child process that speaks JSON lines over a pipe:

- ``forms``: the method catalog, spec validation, memory estimates, the dataset preview.
  Kept warm (started when the studio starts), so checking a spec as the form changes
  takes the estimate's own time, not an interpreter and torch starting.
- ``playground``: generation; it keeps the models it loaded, and exits (freeing them)
  after five minutes without a request (``IDLE``).
- exports run in a process of their own that exits when done (``run_once``), so the
  memory of a merge goes back to the system.

One request at a time per process (a lock): the engine answers in order, and a second
process for the playground keeps a long generation from holding up the forms.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable

from adapters.core.errors import StudioError
from adapters.core.spawn import CODE_ROOT, spawn_module
from jobs.home import ENV_VAR

log = logging.getLogger("studio.engine")
ROLES = ("forms", "playground")
LOG_NAME = "engine.log"
LOG_LIMIT = 5 << 20
# The forms' process holds tokenizers at most; the playground's holds whole models.
IDLE = {"forms": 1800.0, "playground": 300.0}

Progress = Callable[[dict], None]


class EngineFailed(RuntimeError):
    """The model process failed with something other than a user's error; the message says what."""


class EngineGone(EngineFailed):
    """The model process ended before answering; ``code`` is its exit status."""

    def __init__(self, message: str, code: int | None, answered: bool):
        super().__init__(message)
        self.code, self.answered = code, answered


def _log_file(home: Path):
    folder = home / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOG_NAME
    if path.is_file() and path.stat().st_size > LOG_LIMIT:
        path.replace(path.with_suffix(".log.1"))  # keep one older log, never an endless one
    return open(path, "ab")


def _start(home: Path, args: list[str]) -> subprocess.Popen:
    with _log_file(home) as stderr:
        return spawn_module("jobs.engine.server", *args, env={**os.environ, ENV_VAR: str(home)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, cwd=str(CODE_ROOT),
                            text=True, encoding="utf-8", bufsize=1)


def _exchange(proc: subprocess.Popen, rid: int, task: str, args: dict, progress: Progress | None,
              home: Path) -> Any:
    """Send one request and read its answer, passing progress lines to ``progress``."""
    try:
        proc.stdin.write(json.dumps({"id": rid, "task": task, "args": args}) + "\n")
        proc.stdin.flush()
    except (BrokenPipeError, OSError):
        pass  # the process is gone; reading says why
    answered = False
    for line in proc.stdout:
        answered = True
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            continue  # not ours (the engine points stray prints at its log; be safe anyway)
        if message.get("id") != rid and message.get("id") is not None:
            continue
        if "progress" in message:
            if progress:
                progress(message["progress"])
            continue
        if "error" in message:
            raise _error(message["error"], task)
        return message.get("result")
    code = proc.wait()
    raise EngineGone(f"the model process stopped while running {task!r} (exit code {code}; "
                     f"killed for memory?). Its log: {log_tail(home)}", code, answered)


def _error(err: dict, task: str) -> Exception:
    if err.get("studio"):
        return StudioError(err.get("what") or "", err.get("where"), err.get("fix"))
    log.warning("%s failed in the model process:\n%s", task, err.get("traceback", ""))
    return EngineFailed(f"{err.get('type')}: {err.get('message')}")


def log_tail(home: Path, limit: int = 600) -> str:
    path = home / "logs" / LOG_NAME
    if not path.is_file():
        return "(none)"
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode("utf-8", errors="replace").strip() or "(empty)"


class Engine:
    """One long-lived model process, started on first use and again whenever it has exited."""

    def __init__(self, home: Path, role: str, idle: float | None = None):
        self.home, self.role, self.idle = home, role, idle
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.requests = 0

    def call(self, task: str, progress: Progress | None = None, **args: Any) -> Any:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = _start(self.home, self._args())
            self.requests += 1
            # An error answer leaves the process alive and in step; a dead one restarts next call.
            try:
                return _exchange(self.proc, self.requests, task, args, progress, self.home)
            except EngineGone as e:
                if e.code != 0 or e.answered:
                    raise
            # It exited cleanly without a word: it went idle just as the request came. Once more.
            self.proc = _start(self.home, self._args())
            self.requests += 1
            return _exchange(self.proc, self.requests, task, args, progress, self.home)

    def _args(self) -> list[str]:
        idle = self.idle if self.idle is not None else IDLE.get(self.role)
        return ["--idle", str(idle)] if idle is not None else []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.stdin.close()  # the engine exits when its input ends
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


def run_once(home: Path, task: str, progress: Progress | None = None, **args: Any) -> Any:
    """Run one task in a fresh process that exits when done."""
    if progress:
        progress({"message": f"starting a process for {task}"})
    proc = _start(home, ["--once"])
    try:
        return _exchange(proc, 1, task, args, progress, home)
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_engines: dict[tuple[Path, str], Engine] = {}
_engines_lock = threading.Lock()


def engine(home: Path, role: str) -> Engine:
    """The home's engine for ``role`` (one per home and role in this process)."""
    if role not in ROLES:
        raise ValueError(f"unknown engine role {role!r}")
    with _engines_lock:
        key = (Path(home), role)
        if key not in _engines:
            _retire_other_homes(Path(home))
            _engines[key] = Engine(Path(home), role)
        return _engines[key]


def _retire_other_homes(home: Path) -> None:
    # A web process serves one home; scripts and tests that open studio after studio
    # should not keep a model process per home they have left. A busy one is left alone.
    for key, e in list(_engines.items()):
        if key[0] != home and e.lock.acquire(blocking=False):
            try:
                e.close()
                del _engines[key]
            finally:
                e.lock.release()


def close_all() -> None:
    with _engines_lock:
        engines = list(_engines.values())
    for e in engines:
        e.close()


atexit.register(close_all)
