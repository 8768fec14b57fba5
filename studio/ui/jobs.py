"""The Jobs tab: every job with its status, a progress bar with ETA, the live loss curve
(train and eval), the log tail, and cancel / resume / retry / delete.

Everything shown is read from the store and the run folders on each tick, so closing or
reloading the page never touches a job, and a reloaded page picks up where it was.
"""
from __future__ import annotations

import html
from typing import Any

import gradio as gr
import yaml

from jobs.runfolder import RunFolder
from jobs.runner.store import Status
from studio.ui.charts import loss_chart
from studio.ui.common import (Studio, describe_failure, fmt_num, fmt_seconds, fmt_when, for_api, held, job_choices,
                              job_for, job_summary, log_tail, message_html, outside_note, want_bool)

TICK_SECONDS = 2.0
COLUMNS = ["ID", "Name", "Status", "Progress", "Train loss", "Eval loss", "ETA", "Created"]
VERBS = ("cancel", "resume", "retry")


# -- the work, shared by the page and the API ------------------------------------------------

def list_rows(studio: Studio) -> list[dict]:
    return [job_summary(j) for j in reversed(studio.jobs.list())]


def status(studio: Studio, job_id: int | str, log_bytes: int = 4000) -> dict:
    """One job in detail: its summary, loss points, final metrics, samples and log tail. A job
    outside the home (common.held) shows its summary, curve and metrics only: its spec, log and
    samples stay with the command line, and ``withheld`` says so."""
    job = studio.jobs.get(job_id)
    out = job_summary(job)
    run = RunFolder(job.run_dir).read()
    out.update(curve=curve_points(job.run_dir), metrics=run.get("metrics") or {}, samples=[], log="", spec_yaml="",
               withheld=None)
    if not held(studio, job):
        why, command = outside_note(studio, job, "status")
        return {**out, "withheld": f"Job {job.id}: {why} On this machine's command line: {command}"}
    # The spec goes out as YAML text: gradio_client would take its dataset section, a dict
    # with a "path", for a file to download.
    out.update(samples=run.get("samples") or [], log=log_tail(job.run_dir, log_bytes),
               spec_yaml=yaml.safe_dump(job.spec, sort_keys=False))
    return out


def curve_points(run_dir: str) -> list[dict]:
    points = []
    for rec in RunFolder(run_dir).metrics():
        if "loss" in rec and "step" in rec:
            points.append({"step": rec["step"], "loss": rec["loss"], "series": "train"})
        if rec.get("eval_loss") is not None and "step" in rec:
            points.append({"step": rec["step"], "loss": rec["eval_loss"], "series": "eval"})
    return points


def control(studio: Studio, verb: str, job_id: int | str) -> dict:
    from jobs.runner.submit import retry_job

    job = job_for(studio, job_id, verb)
    if verb == "retry":  # the new attempt's folder is checked against the same rule before it is made
        return job_summary(retry_job(studio.home, job.id, policy=studio.policy))
    return job_summary(getattr(studio.jobs, verb)(job.id))


def delete(studio: Studio, job_id: int | str, files: bool = False) -> list[str]:
    from jobs.runner.submit import delete_job

    job = job_for(studio, job_id, "delete_files" if files else "delete")
    return delete_job(studio.home, job.id, files=files)


# -- rendering -------------------------------------------------------------------------------

def table(rows: list[dict]) -> list[list[Any]]:
    return [[r["id"], r["name"], r["status"], progress_text(r), fmt_num(r["train_loss"]), fmt_num(r["eval_loss"]),
             fmt_seconds(r["eta_seconds"]) if r["status"] == "running" else "-", fmt_when(r["created_at"])]
            for r in rows]


def progress_text(r: dict) -> str:
    if r["step"] is None:
        return "starting" if r["status"] == "running" else "-"
    return f"{r['step']}/{r['max_steps']}" if r["max_steps"] else str(r["step"])


def header_html(s: dict) -> str:
    pct = int(round((s["progress"] or 0) * 100))
    where = f" on {s['devices']}" if s["devices"] and s["status"] == "running" else ""
    bits = ["waiting for a free device" if s["status"] == "queued" else f"step {progress_text(s)}"]
    if s["status"] == "running":
        bits.append(f"ETA {fmt_seconds(s['eta_seconds'])}" if s["eta_seconds"] is not None else "ETA after the first step")
    if s["cancel_requested"] and s["status"] == "running":
        bits.append("stop requested")
    metrics = s.get("metrics") or {}
    done = [f"{label} {fmt_num(metrics.get(key))}" for key, label in
            (("train_loss", "train loss"), ("eval_loss", "eval loss")) if metrics.get(key) is not None]
    if metrics.get("exact_match") is not None:
        done.append(f"exact match {metrics['exact_match']:.1%}")
    if metrics.get("tokens_per_second"):
        done.append(f"{metrics['tokens_per_second']:.0f} tokens/s")
    error = f'<div class="studio-msg studio-msg-error">{html.escape(s["error"])}</div>' if s["error"] else ""
    return (f'<div class="job-head"><span class="job-title">#{s["id"]} {html.escape(s["name"])}</span>'
            f'<span class="badge badge-{s["status"]}">{s["status"]}{where}</span>'
            f'<span class="job-meta">{html.escape(s["method"] or "")} + {html.escape(s["optimizer"] or "")}'
            f' &middot; attempt {s["attempt"]}</span></div>'
            f'<div class="job-progress"><div class="job-bar bar-{s["status"]}" style="width:{pct}%"></div></div>'
            f'<div class="job-progress-text">{pct}% &middot; {" &middot; ".join(bits)}</div>'
            + (f'<div class="job-metrics">{" &middot; ".join(done)}</div>' if done else "") + error)


def samples_text(samples: list[dict]) -> str:
    return "\n".join(f"target: {s.get('target')!r}\noutput: {s.get('output')!r}\n" for s in samples)


def pick_default(rows: list[dict], remembered: Any) -> str | None:
    """After a reload: the job this browser last looked at, else a running one, else the newest."""
    ids = {str(r["id"]) for r in rows}
    if remembered is not None and str(remembered) in ids:
        return str(remembered)
    running = [r for r in rows if r["status"] == Status.RUNNING.value]
    return str((running or rows)[0]["id"]) if rows else None


# -- the page --------------------------------------------------------------------------------

def build(studio: Studio) -> dict:
    listing = gr.Dataframe(headers=COLUMNS, interactive=False, label="Jobs", elem_id="jobs.table", wrap=True,
                           max_height=300)
    with gr.Row(equal_height=False, elem_classes=["studio-actions"]):
        choice = gr.Dropdown(label="Job", choices=[], value=None, scale=3, elem_id="jobs.choice")
        cancel_btn = gr.Button("Cancel", elem_id="jobs.cancel", scale=0, min_width=110)
        resume_btn = gr.Button("Resume", elem_id="jobs.resume", scale=0, min_width=110)
        retry_btn = gr.Button("Retry", elem_id="jobs.retry", scale=0, min_width=110)
        delete_btn = gr.Button("Delete", variant="stop", elem_id="jobs.delete", scale=0, min_width=110)
        delete_files = gr.Checkbox(label="delete its files too", value=False, elem_id="jobs.delete_files", scale=0,
                                   min_width=170)
    action = gr.HTML(elem_id="jobs.action")
    head = gr.HTML(elem_id="jobs.status")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            plot = gr.HTML(loss_chart([]), label="Loss", elem_id="jobs.training.loss")
        samples = gr.Textbox(label="Sample generations (last evaluation)", lines=10, max_lines=14, scale=2,
                             elem_id="jobs.samples", interactive=False)
    log_box = gr.Textbox(label="Log (tail)", lines=12, max_lines=12, autoscroll=True, elem_id="jobs.log",
                         interactive=False, elem_classes=["studio-log"])
    timer = gr.Timer(TICK_SECONDS)
    remembered = gr.BrowserState(None, storage_key="studio-selected-job")
    shown = gr.State(None)  # what the detail pane last drew, so unchanged ticks redraw nothing

    def refresh(selected: str | None, last: Any):
        rows = list_rows(studio)
        out = {listing: table(rows), choice: gr.update(choices=job_choices(studio))}
        if not selected:
            return {**out, head: "", plot: loss_chart([]), samples: "", log_box: "", shown: None}
        try:
            s = status(studio, selected)
        except Exception as e:  # deleted meanwhile
            return {**out, head: message_html(describe_failure(e), "error"), shown: None}
        key = (s["id"], s["attempt"], s["status"], len(s["curve"]), len(s["log"]), s["step"])
        out[head] = header_html(s)
        if key == last:
            return out
        return {**out, plot: loss_chart(s["curve"]), samples: samples_text(s["samples"]),
                log_box: s["withheld"] or s["log"],
                shown: key}

    def restore(saved: Any):
        rows = list_rows(studio)
        return gr.update(choices=job_choices(studio), value=pick_default(rows, saved))

    def act(verb: str):
        def run(selected: str | None, files: bool = False):
            try:
                if not selected:
                    return message_html("Choose a job first.", "error"), gr.skip()
                if verb == "delete":
                    removed = delete(studio, selected, files)
                    note = f"; removed {len(removed)} folder(s)" if removed else ""
                    return message_html(f"Job #{selected} deleted{note}."), None
                s = control(studio, verb, selected)
            except Exception as e:
                return message_html(describe_failure(e), "error"), gr.skip()
            text = {"cancel": "stop requested; it stops at its next step and keeps a checkpoint"
                    if s["status"] == "running" else s["status"],
                    "resume": "queued again; it continues from its last checkpoint",
                    "retry": "queued again from scratch in a fresh run folder"}[verb]
            return message_html(f"Job #{s['id']}: {text}."), gr.skip()
        return run

    private = {"api_visibility": "private"}
    detail = [listing, choice, head, plot, samples, log_box, shown]
    timer.tick(refresh, [choice, shown], detail, show_progress="hidden", **private)
    choice.change(refresh, [choice, gr.State(None)], detail, show_progress="hidden", **private).then(
        lambda v: v, choice, remembered, **private)
    for verb, btn in zip(VERBS, (cancel_btn, resume_btn, retry_btn)):
        btn.click(act(verb), [choice], [action, choice], **private).then(
            refresh, [choice, gr.State(None)], detail, show_progress="hidden", **private)
    delete_btn.click(act("delete"), [choice, delete_files], [action, choice], **private)
    return {"choice": choice, "restore": (restore, [remembered], [choice])}


def register_api(studio: Studio) -> None:
    @for_api
    def list_jobs() -> list[dict]:
        """Every job, newest first, with status, step, progress, ETA and latest losses."""
        return list_rows(studio)

    @for_api
    def job_status(job_id: int) -> dict:
        """One job: summary, loss curve points, final metrics, eval samples and the log tail."""
        return status(studio, job_id)

    @for_api
    def cancel(job_id: int) -> dict:
        """Cancel a queued job, or ask a running one to stop at its next step (with a checkpoint)."""
        return control(studio, "cancel", job_id)

    @for_api
    def resume(job_id: int) -> dict:
        """Queue a stopped job again; it continues from its last good checkpoint."""
        return control(studio, "resume", job_id)

    @for_api
    def retry(job_id: int) -> dict:
        """Queue a finished job again from scratch in a fresh run folder."""
        return control(studio, "retry", job_id)

    @for_api
    def delete_job(job_id: int, files: bool = False) -> list[str]:
        """Remove a job that is not running; with files, the run folders the studio made for it."""
        return delete(studio, job_id, want_bool(files, "files"))

    for fn in (list_jobs, job_status, cancel, resume, retry, delete_job):
        gr.api(fn, api_name=fn.__name__)
