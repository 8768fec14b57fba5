"""The Bake-off tab: which method for this data on this machine. Launch a bake-off, watch
its jobs, read its report (table, Pareto plot, recommendation) and download it.

This process only writes the request and reads files: planning (the registry, the memory
estimator) and waiting for the jobs happen in the bake-off's own driver process
(``python -m jobs.bakeoff.driver drive``), and the jobs run under the scheduler like any other.
"""
from __future__ import annotations

import html
import json
import zipfile
from pathlib import Path
from typing import Any

import gradio as gr
import yaml
from gradio.data_classes import FileData

from jobs.bakeoff import plan as bakeoff, driver as bakeoff_driver
from adapters.core.errors import StudioError
from jobs.runner.store import FINISHED
from studio.ui.common import (Studio, describe_failure, fmt_bytes, fmt_seconds, for_api, message_html, want_float,
                              want_int)

DEMO_SPEC = Path(__file__).resolve().parents[2] / "assets" / "specs" / "demo_lora.yaml"
REPORT_FILES = ("report.json", "report.md", "pareto.png")
TICK_SECONDS = 3.0
# Bounds on one request from the page or the API: each seed and factor is a set of training runs.
MAX_SEEDS, MAX_LR_FACTORS, MAX_STEPS, MAX_MINUTES = 10, 8, 1_000_000, 7 * 24 * 60.0
COLUMNS = ["Candidate", "lr", "Held-out loss", "Exact match", "Peak memory", "Predicted", "Train time",
           "Trainable params", "Adapter on disk", "Merges", "Runs ok"]


def default_spec_text(studio: Studio) -> str:
    """The demo spec with absolute paths and this studio's default model: a base to edit."""
    data = yaml.safe_load(DEMO_SPEC.read_text(encoding="utf-8"))
    for key in ("path", "eval_path"):
        if data["dataset"].get(key):
            data["dataset"][key] = str((DEMO_SPEC.parent / data["dataset"][key]).resolve())
    data["model"] = studio.default_model
    return yaml.safe_dump(data, sort_keys=False)


def _names(text: Any) -> list[str] | None:
    items = text if isinstance(text, list) else str(text or "").replace(",", " ").split()
    return [str(n).strip() for n in items if str(n).strip()] or None


def start(studio: Studio, spec: Any, methods: Any = None, rules: Any = None, budget_steps: int | None = None,
          budget_minutes: float | None = None, seeds: int = 2, lr_factors: list[float] | None = None,
          spawn: bool = True) -> dict:
    """Record a bake-off and start its driver; ``spec`` is a mapping or YAML text."""
    from studio.ui.train import PLACEHOLDER_DIR, resolve_dataset

    if isinstance(spec, str):
        try:
            spec = yaml.safe_load(spec)
        except yaml.YAMLError as e:
            raise StudioError(f"the base spec is not valid YAML: {e}", "base spec", "fix the line shown.") from None
    if not isinstance(spec, dict):
        raise StudioError("the base spec must be a mapping (model, dataset, training, ...).", "base spec",
                          "start from the spec shown when the tab opens.")
    # The base spec names files and flags like a launch does, so it is confined the same way
    # (validated in the model process, then checked against the server's policy).
    # Each candidate gets a run folder the studio picks, so the base spec's output_dir is not used.
    spec = {k: v for k, v in resolve_dataset(studio, spec).items() if k != "output_dir"}
    resolved = studio.ask("validate", data={**spec, "output_dir": PLACEHOLDER_DIR}, where="base spec")
    resolved = studio.policy.check_spec(resolved, output_dir_given=False, where="base spec")
    factors = lr_factors or bakeoff.LR_FACTORS
    if not isinstance(factors, (list, tuple)) or len(factors) > MAX_LR_FACTORS:
        raise StudioError(f"lr_factors must be a list of at most {MAX_LR_FACTORS} numbers.", "lr_factors",
                          "e.g. [0.3, 1, 3].")
    factors = tuple(want_float(f, "lr_factors", 1e-4, 1e4) for f in factors)
    manifest = bakeoff.create(
        studio.home, resolved, methods=_names(methods), rules=_names(rules),
        budget_steps=want_int(budget_steps, "budget_steps", 1, MAX_STEPS) if budget_steps else None,
        budget_minutes=want_float(budget_minutes, "budget_minutes", 0.1, MAX_MINUTES) if budget_minutes else None,
        seeds=want_int(seeds or 2, "seeds", 1, MAX_SEEDS), lr_factors=factors)
    if spawn:
        bakeoff_driver.spawn_driver(studio.home, manifest["id"])
    return {"id": manifest["id"], "status": manifest["status"]}


def status(studio: Studio, bid: str) -> dict:
    """A bake-off as the tab and the API show it: phase, its jobs' progress, the report once written."""
    manifest = bakeoff.load(studio.home, bid)
    store = studio.jobs
    counts = {}
    for phase in ("search", "final"):
        done = total = 0
        for entry in manifest[phase]:
            total += 1
            try:
                done += store.get(entry["job_id"]).status in FINISHED
            except StudioError:
                done += 1  # deleted: it will not finish
        counts[phase] = {"done": done, "total": total}
    report_path = bakeoff.folder(studio.home, bid) / "report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if manifest["status"] == "done" and \
        report_path.is_file() else None
    return {"id": bid, "status": manifest["status"], "error": manifest.get("error"),
            "driver_running": bakeoff_driver.driver_alive(manifest), "jobs": counts,
            "candidates": [{k: c.get(k) for k in ("key", "lr", "lr_grid", "steps", "skipped", "predicted_peak_bytes")}
                           for c in manifest["candidates"]],
            "report": report}


def cancel(studio: Studio, bid: str) -> dict:
    """Stop a bake-off and its unfinished jobs (running ones keep a checkpoint)."""
    stopped = bakeoff_driver.cancel(studio.home, bid)
    return {"id": bid, "cancelled_jobs": stopped}


def resume(studio: Studio, bid: str) -> dict:
    """Continue a stopped bake-off: its stopped jobs are queued again and a driver started."""
    manifest = bakeoff.load(studio.home, bid)
    if bakeoff_driver.driver_alive(manifest):
        raise StudioError(f"bake-off {bid} is still being driven (pid {manifest['driver_pid']}).",
                          f"bake-off {bid}", "wait for it, or cancel it first.")
    if manifest["status"] == "done":
        raise StudioError(f"bake-off {bid} is done.", f"bake-off {bid}", "start a new one to compare again.")
    queued = bakeoff_driver.resume(studio.home, bid)
    bakeoff_driver.spawn_driver(studio.home, bid)
    return {"id": bid, "resumed_jobs": queued}


def archive(studio: Studio, bid: str) -> Path:
    """The report's files as one zip in the studio's exports folder (what the page serves)."""
    src = bakeoff.folder(studio.home, bid)
    if not (src / "report.json").is_file():
        raise StudioError(f"bake-off {bid} has no report yet.", f"bake-off {bid}", "wait until it is done.")
    target = studio.exports / f"bakeoff-{bid}.zip"
    partial = target.with_name(f".{target.name}.partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as z:
        for name in REPORT_FILES:
            if (src / name).is_file():
                z.write(src / name, f"bakeoff-{bid}/{name}")
    partial.replace(target)
    return target


def choices(studio: Studio) -> list[tuple[str, str]]:
    return [(f"{m['id']} ({m['status']})", m["id"]) for m in bakeoff.list_bakeoffs(studio.home)]


def progress_html(s: dict) -> str:
    phase = {"planned": "planning: validating candidates and estimating memory", "searching": "learning-rate search",
             "training": "training the candidates", "reporting": "writing the report", "done": "done",
             "failed": "failed"}.get(s["status"], s["status"])
    jobs = " &middot; ".join(f"{name}: {c['done']}/{c['total']} jobs finished"
                             for name, c in (("search", s["jobs"]["search"]), ("training", s["jobs"]["final"]))
                             if c["total"])
    parts = [f"<b>{html.escape(s['id'])}</b>: {html.escape(phase)}" + (f" &middot; {jobs}" if jobs else "")]
    if s["status"] != "done" and not s["driver_running"]:
        parts.append("its driver is not running: Resume continues it (or <code>studio bakeoff --resume "
                     f"{html.escape(s['id'])}</code>)")
    if s["error"]:
        parts.append(f"error: {html.escape(s['error'])}")
    for c in s["candidates"]:
        if c["skipped"]:
            parts.append(f"skipped {html.escape(c['key'])}: {html.escape(c['skipped'])}")
        elif c["lr"] is not None:
            parts.append(f"{html.escape(c['key'])}: learning rate {c['lr']:.2g} chosen")
    return '<div class="studio-msg studio-msg-info">' + "<br>".join(parts) + "</div>"


def summary_rows(report: dict) -> list[list[Any]]:
    def spread(s, key, fmt):
        if s.get(key) is None:
            return "-"
        sp = s.get(f"{key}_spread")
        return fmt(s[key]) + ("" if sp is None else f" ± {fmt(sp / 2)}")

    return [[s["candidate"], "-" if s["lr"] is None else f"{s['lr']:.2g}",
             spread(s, "eval_loss", lambda v: f"{v:.3f}"), spread(s, "exact_match", lambda v: f"{v:.0%}"),
             fmt_bytes(s.get("peak_memory_bytes")), fmt_bytes(s.get("predicted_peak_bytes")),
             fmt_seconds(s.get("train_seconds")),
             "-" if s.get("trainable_params") is None else f"{s['trainable_params']:,}",
             fmt_bytes(s.get("adapter_bytes")), "yes" if s["merges"] else "no", f"{s['completed']}/{s['runs']}"]
            for s in report["summary"]]


def build(studio: Studio) -> dict:
    with gr.Row(equal_height=False):
        spec = gr.Code(default_spec_text(studio), language="yaml", label="Base spec (model, data, training)",
                       elem_id="bakeoff.spec", scale=3)
        with gr.Column(scale=2):
            methods = gr.Textbox(label="Methods (empty: every method with AdamW + memory-saving rules on full)",
                                 elem_id="bakeoff.methods")
            rules = gr.Textbox(label="Update rules (empty: the defaults above)", elem_id="bakeoff.rules")
            with gr.Row():
                steps = gr.Number(label="Budget: steps", value=None, precision=0, minimum=1, elem_id="bakeoff.steps")
                minutes = gr.Number(label="or minutes", value=None, minimum=0, elem_id="bakeoff.minutes")
                seeds = gr.Number(label="Seeds", value=2, precision=0, minimum=1, elem_id="bakeoff.seeds")
            go = gr.Button("Launch bake-off", variant="primary", elem_id="bakeoff.launch")
    with gr.Row(equal_height=False, elem_classes=["studio-actions"]):
        choice = gr.Dropdown(label="Bake-off", choices=choices(studio), value=None, scale=4, elem_id="bakeoff.choice")
        cancel_btn = gr.Button("Cancel", variant="stop", scale=0, min_width=100, elem_id="bakeoff.cancel")
        resume_btn = gr.Button("Resume", scale=0, min_width=100, elem_id="bakeoff.resume")
        download_btn = gr.Button("Download report (zip)", scale=1, elem_id="bakeoff.download")
    note = gr.HTML(elem_id="bakeoff.status")
    progress = gr.HTML(elem_id="bakeoff.progress")
    advice = gr.Markdown(elem_id="bakeoff.recommendation")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, label="Candidates (mean over seeds, ± half the spread)",
                         elem_id="bakeoff.table", wrap=True)
    image = gr.Image(label="Pareto fronts", type="filepath", interactive=False, elem_id="bakeoff.plot")
    download = gr.File(label="Report", interactive=False, elem_id="bakeoff.file")
    timer = gr.Timer(TICK_SECONDS)

    def on_launch(text, m, r, n_steps, n_minutes, n_seeds):
        try:
            out = start(studio, text, m, r, n_steps, n_minutes, n_seeds)
        except Exception as e:
            return message_html(describe_failure(e), "error"), gr.skip()
        return (message_html(f"Bake-off {out['id']} started; its jobs appear in the Jobs tab."),
                gr.update(choices=choices(studio), value=out["id"]))

    def refresh(selected, last=None):
        """Progress every tick; the report's parts only when what is shown changed (a tick
        that redraws the table would reset the user's scrolling)."""
        if not selected:
            return "", "", None, None, None
        try:
            s = status(studio, selected)
        except Exception as e:
            return message_html(describe_failure(e), "error"), "", None, None, None
        report = s["report"]
        key = [selected, report and report["written_at"]]
        if key == last:
            return progress_html(s), gr.skip(), gr.skip(), gr.skip(), key
        if not report:
            return progress_html(s), "", None, None, key
        png = bakeoff.folder(studio.home, selected) / "pareto.png"
        text = f"**Recommendation:** {report['recommendation']}\n\n" + \
            f"Pareto front (quality against memory): {', '.join(report['pareto']) or '-'}; " \
            f"against time: {', '.join(report['pareto_time']) or '-'}."
        return progress_html(s), text, summary_rows(report), archive_png(studio, selected, png), key

    def on_download(selected):
        try:
            if not selected:
                raise StudioError("no bake-off chosen.", "bake-off", "choose one.")
            return "", str(archive(studio, selected))
        except Exception as e:
            return message_html(describe_failure(e), "error"), None

    def act(fn, text):
        def run(selected):
            try:
                if not selected:
                    raise StudioError("no bake-off chosen.", "bake-off", "choose one.")
                out = fn(studio, selected)
            except Exception as e:
                return message_html(describe_failure(e), "error")
            return message_html(text(out))
        return run

    private = {"api_visibility": "private"}
    cancel_btn.click(act(cancel, lambda o: f"Bake-off {o['id']}: cancelled, {len(o['cancelled_jobs'])} job(s) "
                                           "asked to stop."), choice, note, **private)
    resume_btn.click(act(resume, lambda o: f"Bake-off {o['id']}: continuing, {len(o['resumed_jobs'])} job(s) "
                                           "queued again."), choice, note, **private)
    go.click(on_launch, [spec, methods, rules, steps, minutes, seeds], [note, choice], **private)
    shown = gr.State(None)  # (bake-off, report written at) the page last drew
    outputs = [progress, advice, table, image, shown]
    choice.change(refresh, choice, outputs, show_progress="hidden", **private)
    timer.tick(refresh, [choice, shown], outputs, show_progress="hidden", **private)
    download_btn.click(on_download, choice, [note, download], **private)
    return {"choice": choice}


def archive_png(studio: Studio, bid: str, png: Path) -> str | None:
    """The plot copied beside the downloads, the one folder the page serves files from."""
    if not png.is_file():
        return None
    target = studio.exports / f"bakeoff-{bid}-pareto.png"
    if not target.is_file() or target.stat().st_mtime < png.stat().st_mtime:
        target.write_bytes(png.read_bytes())
    return str(target)


def register_api(studio: Studio) -> None:
    @for_api
    def bakeoff_start(spec: dict, methods: list[str] | None = None, rules: list[str] | None = None,
                      budget_steps: int | None = None, budget_minutes: float | None = None, seeds: int = 2,
                      lr_factors: list[float] | None = None) -> dict:
        """Start a bake-off from a base spec; returns its id (its jobs join the queue). ``lr_factors``:
        multiples of each candidate's suggested rate to search (default 0.3, 1, 3; one value: no search)."""
        return start(studio, spec, methods, rules, budget_steps, budget_minutes, seeds, lr_factors)

    @for_api
    def bakeoff_status(bakeoff_id: str) -> dict:
        """A bake-off's phase, its jobs' progress and, once done, its report (report.json)."""
        return status(studio, bakeoff_id)

    @for_api
    def bakeoff_report(bakeoff_id: str) -> FileData:
        """Zip of the report: report.json, report.md and pareto.png."""
        return FileData(path=str(archive(studio, bakeoff_id)))

    @for_api
    def bakeoff_cancel(bakeoff_id: str) -> dict:
        """Stop a bake-off and its unfinished jobs."""
        return cancel(studio, bakeoff_id)

    @for_api
    def bakeoff_resume(bakeoff_id: str) -> dict:
        """Continue a stopped bake-off: its stopped jobs resume from their checkpoints."""
        return resume(studio, bakeoff_id)

    gr.api(bakeoff_start, api_name="bakeoff_start")
    gr.api(bakeoff_cancel, api_name="bakeoff_cancel")
    gr.api(bakeoff_resume, api_name="bakeoff_resume")
    gr.api(bakeoff_status, api_name="bakeoff_status")
    gr.api(bakeoff_report, api_name="bakeoff_report")
