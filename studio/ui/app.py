"""The studio page: seven tabs over one studio home, the named API endpoints, and the
scheduler that starts queued jobs.

The UI process never trains, and never imports torch: model work (estimates, previews,
generation, export) runs in model processes (studio/engine.py, jobs/engine/server.py). Jobs run
in their own processes, started by the scheduler
(``jobs.runner.scheduler``); when no ``studio worker`` serves this home, the UI runs one in a
background thread, and keeps trying to take over if an outside one stops. Jobs outlive
both the page and the UI process.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from adapters.core.errors import StudioError
from jobs.home import LOCK_FILE, STORE_FILE, uploads_dir
from studio.ui import bakeoff, compare, datasets, export, jobs, playground, train
from studio.ui.common import Studio, job_choices
from studio.ui.guard import RequestGuard, slow_login

log = logging.getLogger("studio.ui")
CSS = Path(__file__).resolve().parents[2] / "assets" / "studio.css"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_UPLOAD_MB = 200.0  # a fine-tuning set of this size is already a long run on one GPU
TABS = (("Datasets", "datasets", datasets), ("Train", "train", train), ("Jobs", "jobs", jobs),
        ("Compare", "compare", compare), ("Playground", "playground", playground), ("Export", "export", export),
        ("Bake-off", "bakeoff", bakeoff))


class SchedulerService:
    """Runs the home's scheduler in a thread whenever no other process holds its lock."""

    def __init__(self, home: Path, poll_interval: float = 1.0, retry_every: float = 5.0):
        self.home, self.poll_interval, self.retry_every = home, poll_interval, retry_every
        self.stop_event = threading.Event()
        self.serving = threading.Event()
        self.thread = threading.Thread(target=self._run, name="studio-scheduler", daemon=True)

    def start(self) -> "SchedulerService":
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)

    def _run(self) -> None:
        from jobs.runner.scheduler import Scheduler, scheduler_pid

        while not self.stop_event.is_set():
            if scheduler_pid(self.home) is None:
                try:
                    scheduler = Scheduler(self.home, poll_interval=self.poll_interval)
                    self.serving.set()
                    scheduler.serve(self.stop_event)
                except StudioError:
                    pass  # another scheduler took the lock first; it serves the queue
                except Exception:
                    log.exception("the scheduler stopped; restarting it")
                finally:
                    self.serving.clear()
            self.stop_event.wait(self.retry_every)

    def describe(self) -> str:
        from jobs.runner.scheduler import scheduler_pid

        if self.serving.is_set():
            return "jobs are started by this studio"
        pid = scheduler_pid(self.home)
        return f"jobs are started by the scheduler with pid {pid}" if pid else "no scheduler is running"


def build_app(studio: Studio, service: SchedulerService | None = None) -> gr.Blocks:
    with gr.Blocks(title="Fine-Tuning Studio", analytics_enabled=False) as demo:
        header = gr.HTML(header_html(studio, service), elem_id="studio.header")
        parts, tabs_by_id = {}, {}
        with gr.Tabs(elem_id="studio.tabs") as tabs:
            for title, key, module in TABS:
                with gr.Tab(title, id=key, elem_id=f"tab.{key}") as tab:
                    parts[key] = module.build(studio)
                tabs_by_id[key] = tab
        for _, _, module in TABS:
            module.register_api(studio)
        _wire(studio, demo, tabs, tabs_by_id, parts, header, service)
    return demo


def _wire(studio, demo, tabs, tab, parts, header, service) -> None:
    private = {"api_visibility": "private", "show_progress": "hidden"}

    def dataset_choices(current):
        options = datasets.choices(studio)
        ids = [v for _, v in options]
        return gr.update(choices=options, value=current if current in ids else (ids[0] if ids else None))

    def run_choices(which: str):
        def update(current):
            options = job_choices(studio) if which == "all" else job_choices(studio, completed_only=True)
            ids = {v for _, v in options}
            if isinstance(current, list):
                return gr.update(choices=options, value=[c for c in current if c in ids])
            return gr.update(choices=options, value=current if current in ids else None)
        return update

    train_ds = parts["train"]["dataset"]
    runs = {"compare": "all", "playground": "completed", "export": "completed"}
    demo.load(dataset_choices, train_ds, train_ds, **private)
    ds_choice = parts["datasets"]["choice"]
    demo.load(lambda: datasets.table(studio), None, parts["datasets"]["listing"], **private)
    demo.load(dataset_choices, ds_choice, ds_choice, **private)
    restore, inputs, outputs = parts["jobs"]["restore"]
    demo.load(restore, inputs, outputs, **private)
    demo.load(lambda: header_html(studio, service), None, header, **private)
    tab["train"].select(dataset_choices, train_ds, train_ds, **private)
    for key, which in runs.items():
        choice = parts[key]["choice"]
        demo.load(run_choices(which), choice, choice, **private)
        tab[key].select(run_choices(which), choice, choice, **private)

    def follow(job_id):
        if job_id is None:
            return gr.skip(), gr.skip()
        return gr.Tabs(selected="jobs"), gr.update(choices=job_choices(studio), value=str(job_id))

    def bakeoff_choices(current):
        options = bakeoff.choices(studio)
        return gr.update(choices=options, value=current if current in {v for _, v in options} else None)

    tab["bakeoff"].select(bakeoff_choices, parts["bakeoff"]["choice"], parts["bakeoff"]["choice"], **private)
    parts["train"]["launched"].change(follow, parts["train"]["launched"], [tabs, parts["jobs"]["choice"]], **private)


def _warm(studio: Studio) -> None:
    """Start the forms' model process now, so the first estimate does not wait for torch to load."""
    try:
        studio.ask("warm")
    except Exception:  # noqa: BLE001 - the first real request starts it again and reports the cause
        log.warning("the model process did not start", exc_info=True)


def header_html(studio: Studio, service: SchedulerService | None) -> str:
    import html

    where = service.describe() if service else "no scheduler attached"
    return (f'<div class="studio-header"><div class="studio-title">Efficient Fine-Tuning Studio</div>'
            f'<div class="studio-sub">home <code>{html.escape(str(studio.home))}</code> &middot; '
            f'{html.escape(where)}</div></div>')


def prepare_environment(home: Path) -> None:
    # Gradio keeps uploads and served files in its cache; keep that cache inside the studio
    # home so uploaded data never lands elsewhere on the machine.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(uploads_dir(home)))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def check_auth(host: str, auth: tuple[str, str] | None) -> None:
    if host not in LOCAL_HOSTS and not auth:
        raise StudioError(f"binding to {host} makes the studio reachable from other machines, without a password.",
                          "--host", "pass --auth user:password (or set STUDIO_AUTH), or bind to 127.0.0.1.")


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise StudioError("auth must be user:password with both parts non-empty.", "--auth / STUDIO_AUTH",
                          "write it as name:secret.")
    return user, password


def blocked_paths(home: Path) -> list[str]:
    """Never served by /gradio_api/file=, whatever else allows it: the job store and the
    folders of runs, datasets and models (exports/ and uploads/ are what the page serves)."""
    names = [STORE_FILE, f"{STORE_FILE}-wal", f"{STORE_FILE}-shm", LOCK_FILE, "runs", "datasets", "models"]
    return [str(home / n) for n in names]


def launch(home: str | Path | None = None, host: str = "127.0.0.1", port: int = 7860,
           auth: tuple[str, str] | None = None, default_model: str | None = None, *, block: bool = True,
           scheduler: bool = True, poll_interval: float = 1.0, allow_paths: tuple[str, ...] = (),
           allow_remote_code: bool = False, allow_multi_node: bool = False, allow_hosts: tuple[str, ...] = (),
           max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, mcp: bool = False,
           ) -> tuple[gr.Blocks, SchedulerService | None]:
    """Start the studio; with ``block=False`` return at once (tests, scripts) with the app running.

    Everything a caller names stays inside the studio home unless the ``allow_*`` options
    (the server's --allow-* flags) widen it; see the README's Security section."""
    check_auth(host, auth)
    if not 0 < max_upload_mb <= 1e6:
        raise StudioError(f"the upload limit {max_upload_mb} MB is not a positive size.", "--max-upload-mb",
                          "give a size in megabytes, e.g. 200.")
    studio = Studio.at(home, default_model, allow_paths=allow_paths, allow_remote_code=allow_remote_code,
                       allow_multi_node=allow_multi_node)
    prepare_environment(studio.home)
    service = SchedulerService(studio.home, poll_interval).start() if scheduler else None
    demo = build_app(studio, service)  # the method catalog: from the home's cache, or the model process once
    threading.Thread(target=_warm, args=(studio,), name="studio-warm", daemon=True).start()
    demo.queue(default_concurrency_limit=4)
    guard = Middleware(RequestGuard, bound_host=host, allow_hosts=tuple(allow_hosts))
    demo.launch(server_name=host, server_port=port, auth=slow_login(*auth) if auth else None,
                prevent_thread_lock=not block, share=False, mcp_server=mcp, ssr_mode=False,
                allowed_paths=[str(studio.exports)], blocked_paths=blocked_paths(studio.home),
                max_file_size=int(max_upload_mb * 2**20), app_kwargs={"middleware": [guard]},
                css_paths=[CSS], show_error=False, quiet=not block, theme=gr.themes.Soft(primary_hue="indigo"),
                footer_links=["api"])
    return demo, service
