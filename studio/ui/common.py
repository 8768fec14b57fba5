"""What every tab shares: the studio's folders, job summaries read from the run folders,
and the two ways an error a user caused reaches them (a message in the page, or a clean
API error), never a traceback."""
from __future__ import annotations

import functools
import hashlib
import html
import logging
import shlex
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from jobs.confine import Policy
from adapters.core.errors import StudioError
from jobs.home import studio_home
from jobs.runfolder import RunFolder
from jobs.runner.store import Job, JobStore, Status
from studio.catalog import Catalog, load_catalog
from studio.datasets_store import DatasetStore, slug
from studio.engine import EngineFailed, engine

log = logging.getLogger("studio.ui")
MAX_IDS = 20  # runs one call may compare or generate with


@dataclass
class Studio:
    """One studio instance: its home folder, the defaults its forms start from, and what
    its callers may name (``policy``: confined to the home unless the operator widened it)."""

    home: Path
    default_model: str
    policy: Policy

    @classmethod
    def at(cls, home: str | Path | None = None, default_model: str | None = None, *,
           allow_paths: tuple[str, ...] = (), allow_remote_code: bool = False,
           allow_multi_node: bool = False) -> "Studio":
        from jobs.spec import DEFAULT_MODEL
        from studio.datasets_store import BUNDLED_DIR

        home, model = studio_home(home), default_model or DEFAULT_MODEL
        folders = []
        for folder in allow_paths:
            path = Path(folder).expanduser().resolve()
            if not path.is_dir():
                raise StudioError(f"--allow-path {folder}: not a folder.", "--allow-path", "name an existing folder.")
            folders.append(path)
        policy = Policy(home, allow_paths=tuple(folders), allow_remote_code=allow_remote_code,
                        allow_multi_node=allow_multi_node, models=(model,), readonly=(BUNDLED_DIR,))
        return cls(home, model, policy)

    @property
    def jobs(self) -> JobStore:
        return JobStore(self.home)

    @property
    def datasets(self) -> DatasetStore:
        return DatasetStore(self.home)

    def ask(self, task: str, progress: Callable[[dict], None] | None = None, **args: Any) -> Any:
        """Run a task of ``jobs.engine.tasks`` in the home's warm model process (validation, estimates, previews)."""
        return engine(self.home, "forms").call(task, progress, **args)

    @property
    def catalog(self) -> Catalog:
        """Every method and update rule with its Config, without importing them (studio/catalog.py)."""
        return _catalog(self.home)

    @property
    def exports(self) -> Path:
        folder = self.home / "exports"
        folder.mkdir(parents=True, exist_ok=True)
        return folder


@functools.lru_cache(maxsize=8)
def _catalog(home: Path) -> Catalog:
    try:
        return load_catalog(home, lambda task: engine(home, "forms").call(task))
    except EngineFailed as e:  # the page cannot be built without it: say why, at start-up
        raise StudioError(f"the model process could not list the methods: {e}", "start-up",
                          f"see {home / 'logs' / 'engine.log'}; check that torch, transformers and peft import.")


# -- errors ---------------------------------------------------------------------------

def message_html(text: str, kind: str = "ok") -> str:
    """A status line in the page; ``kind`` is ok, error or info (styled by studio.css)."""
    return f'<div class="studio-msg studio-msg-{kind}">{html.escape(text)}</div>'


def for_api(fn: Callable) -> Callable:
    """An endpoint: a StudioError becomes a gr.Error with its message, nothing more."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StudioError as e:
            raise gr.Error(e.message, print_exception=False) from None
        except EngineFailed as e:  # the model process's own failure: its type and message, no traceback
            raise gr.Error(str(e), print_exception=False) from None
    return wrapper


def describe_failure(e: BaseException) -> str:
    """The message for the page: a StudioError as written, anything else in one line."""
    if isinstance(e, StudioError):
        return e.message
    if isinstance(e, EngineFailed):  # already logged with its traceback; the message names the cause
        return str(e)
    log.exception("unexpected error in a UI handler")
    return f"unexpected {type(e).__name__}: {e}"


# -- endpoint arguments ----------------------------------------------------------------
# The API's type hints are documentation only: a caller can send any JSON value. These
# check each argument's type strictly ("false" is not a bool, 1e30 is not a count).

def want_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise StudioError(f"{name} must be true or false, not {value!r}.", name, "send a JSON boolean.")
    return value


def want_int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise StudioError(f"{name} must be a whole number from {low} to {high}, not {value!r}.", name,
                          f"send an integer in {low}..{high}.")
    return value


def want_float(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:  # NaN fails
        raise StudioError(f"{name} must be a number from {low} to {high}, not {value!r}.", name,
                          f"send a finite number in {low}..{high}.")
    return float(value)


def want_text(value: Any, name: str, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit or "\x00" in value:
        shown = f"{len(value)} characters" if isinstance(value, str) else repr(value)[:40]
        raise StudioError(f"{name} must be text of at most {limit} characters, not {shown}.", name,
                          "send shorter text.")
    return value


def want_dict(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise StudioError(f"{name} must be a mapping (JSON object), not {type(value).__name__}.", name,
                          "send the spec as a JSON object.")
    return value


def progress_reporter(progress: Any) -> Callable[[dict], None]:
    """Pass the model process's progress lines ({message, done, total}) to a gr.Progress."""
    def report(p: dict) -> None:
        done, total = p.get("done"), p.get("total")
        try:
            progress(done / total if done is not None and total else None, desc=p.get("message"))
        except Exception:  # noqa: BLE001 - progress is decoration; outside a page event it may not bind
            pass
    return report


# -- jobs ------------------------------------------------------------------------------

def job_summary(job: Job) -> dict[str, Any]:
    """A job as the tabs and the API show it: store row plus progress from its run folder."""
    running = job.status == Status.RUNNING
    run = RunFolder(job.run_dir)
    p = run.progress(finished=job.status == Status.COMPLETED, running=running)
    metrics = p["metrics"]
    return {
        "id": job.id, "name": job.name, "status": job.status.value, "attempt": job.attempt,
        "method": job.spec.get("method", {}).get("name"), "optimizer": job.spec.get("optimizer", {}).get("name"),
        "model": job.spec.get("model"), "step": p["step"], "max_steps": p["max_steps"], "progress": p["progress"],
        "eta_seconds": p["eta_seconds"], "train_loss": metrics.get("train_loss"), "eval_loss": metrics.get("eval_loss"),
        "exact_match": metrics.get("exact_match"), "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "devices": job.devices, "error": job.error,
        "cancel_requested": job.cancel_requested, "run_dir": job.run_dir,
        "heartbeat_age": run.heartbeat_age() if running else None,
    }


def job_label(job: Job) -> str:
    return f"#{job.id} {job.name} ({job.status.value})"


def job_choices(studio: Studio, completed_only: bool = False) -> list[tuple[str, str]]:
    """Dropdown choices, newest first; values are job ids as text."""
    jobs = studio.jobs.list((Status.COMPLETED,) if completed_only else None)
    return [(job_label(j), str(j.id)) for j in reversed(jobs)]


def log_tail(run_dir: str, limit: int | None = None) -> str:
    folder = RunFolder(run_dir)
    return folder.log_tail(limit) if limit else folder.log_tail()


def archive_path(studio: Studio, job, kind: str) -> Path:
    """Where an export of ``job`` is zipped: unique per job and run folder, so two jobs never share
    an archive, and a retried job (a new run folder) or a store recreated in an old home never
    reuses an old one."""
    run = hashlib.sha256(str(job.run_dir).encode()).hexdigest()[:10]
    return studio.exports / f"{slug(job.name)}-job{job.id}-{run}-{kind}.zip"


# What a web caller may ask of a job (the words the refusal uses), and the command the machine's
# own user types instead when the job is not the server's to act on.
ACTIONS = {
    "cancel": ("cancel it", "studio jobs cancel {id} --home {home}"),
    "resume": ("resume it", "studio jobs resume {id} --home {home}"),
    "retry": ("retry it", "studio jobs retry {id} --home {home}"),
    "delete": ("delete it", "studio jobs delete {id} --home {home}"),
    "delete_files": ("delete its files", "studio jobs delete {id} --files --home {home}"),
    "compare": ("compare it", "studio jobs show {id} --home {home}"),
    "export_merged": ("export it", "studio export {run} --merged OUT"),
    "export_adapter": ("export it", "studio export {run} --adapter OUT"),
    "export_gguf": ("export it", "studio export {run} --gguf OUT.gguf --gguf-type TYPE"),
    "evaluate": ("evaluate it", "studio evaluate {run} --tasks TASKS"),
    "generate": ("generate with it", "studio generate {run} --prompt TEXT"),
    "status": ("show its spec and log", "studio jobs show {id} --home {home}; studio jobs logs {id} --home {home}"),
}


def held(studio: Studio, job: Job) -> bool:
    """Whether this server may act on ``job``: its run folders, every attempt's, lie inside the
    studio home (or an --allow-path folder). See jobs.confine."""
    return studio.policy.holds_run(job.run_dir, *job.earlier_run_dirs)


def outside_note(studio: Studio, job: Job, action: str) -> tuple[str, str]:
    """Why ``action`` is not done through the web on ``job``, and the command that does it."""
    verb, command = ACTIONS[action]
    command = command.format(id=job.id, home=shlex.quote(str(studio.home)), run=shlex.quote(str(job.run_dir)))
    return (f"its run folder {job.run_dir} is outside the studio home, so the web API does not {verb} "
            "(it lists the job with its status and progress, nothing more).", command)


def job_for(studio: Studio, job_id: int | str, action: str) -> Job:
    """The job ``job_id``, when this server may ``action`` it (a key of ACTIONS); else a refusal
    naming the command-line equivalent. Every endpoint and page handler that takes a job id
    fetches the job here: the web API acts only on jobs whose run folders are inside the home."""
    job = studio.jobs.get(job_id)
    if not held(studio, job):
        why, command = outside_note(studio, job, action)
        raise StudioError(why, f"job {job.id}", f"on this machine's command line: {command}. The operator can let the "
                          "web act on runs under a folder by starting the server with --allow-path DIR.")
    return job


def completed_run(studio: Studio, job_id: int | str, action: str) -> Job:
    job = job_for(studio, job_id, action)
    if job.status != Status.COMPLETED:
        raise StudioError(f"job {job.id} is {job.status.value}; only completed jobs have a result.",
                          f"job {job.id}", "wait for it to finish, or resume it.")
    return job


def parse_ids(values: Any) -> list[int]:
    """Job ids from a dropdown or an API call: ints, "3", "#3" or labels like "#3 name"."""
    from jobs.runner.store import parse_id

    if values is None:
        return []
    if not isinstance(values, (list, tuple)):
        values = [values]
    if len(values) > MAX_IDS:
        raise StudioError(f"{len(values)} job ids given.", "job ids", f"choose at most {MAX_IDS}.")
    return [parse_id(str(v).split()[0]) for v in values if str(v).strip()]


# -- formatting ------------------------------------------------------------------------

def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def fmt_num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_when(ts: float | None) -> str:
    if ts is None:
        return "-"
    day = datetime.fromtimestamp(ts)
    return day.strftime("%H:%M:%S") if time.time() - ts < 86_400 else day.strftime("%Y-%m-%d %H:%M")
