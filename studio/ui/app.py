"""The studio page: seven tabs over one studio home, the named API endpoints, and the
scheduler that starts queued jobs.

The UI process never trains. Jobs run in their own processes, started by the scheduler
(``jobs.scheduler``); when no ``studio worker`` serves this home, the UI runs one in a
background thread, and keeps trying to take over if an outside one stops. Jobs outlive
both the page and the UI process.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import gradio as gr

from jobs.errors import StudioError
from studio.ui import bakeoff, compare, datasets, export, jobs, playground, train
from studio.ui.common import Studio, job_choices

log = logging.getLogger("studio.ui")
CSS = Path(__file__).resolve().parents[2] / "assets" / "studio.css"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
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
        from jobs.scheduler import Scheduler, scheduler_pid

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
        from jobs.scheduler import scheduler_pid

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


def header_html(studio: Studio, service: SchedulerService | None) -> str:
    import html

    where = service.describe() if service else "no scheduler attached"
    return (f'<div class="studio-header"><div class="studio-title">Efficient Fine-Tuning Studio</div>'
            f'<div class="studio-sub">home <code>{html.escape(str(studio.home))}</code> &middot; '
            f'{html.escape(where)}</div></div>')


def prepare_environment(home: Path) -> None:
    # Gradio keeps uploads and served files in its cache; keep that cache inside the studio
    # home so uploaded data never lands elsewhere on the machine.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(home / "uploads"))
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


def launch(home: str | Path | None = None, host: str = "127.0.0.1", port: int = 7860,
           auth: tuple[str, str] | None = None, default_model: str | None = None, *, block: bool = True,
           scheduler: bool = True, poll_interval: float = 1.0) -> tuple[gr.Blocks, SchedulerService | None]:
    """Start the studio; with ``block=False`` return at once (tests, scripts) with the app running."""
    check_auth(host, auth)
    studio = Studio.at(home, default_model)
    prepare_environment(studio.home)
    service = SchedulerService(studio.home, poll_interval).start() if scheduler else None
    demo = build_app(studio, service)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=host, server_port=port, auth=[auth] if auth else None, prevent_thread_lock=not block,
                allowed_paths=[str(studio.exports)], css_paths=[CSS], show_error=False, quiet=not block,
                theme=gr.themes.Soft(primary_hue="indigo"), footer_links=["api"])
    return demo, service
