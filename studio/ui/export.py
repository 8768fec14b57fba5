"""The Export tab: a completed run's merged model, its adapter alone, or the merged model as a
GGUF file with its Ollama Modelfile, as a zip download.

Archives are written inside the studio home (``exports/``) and reused while the run is
unchanged, so downloading twice exports once. A method that cannot merge says why.
"""
from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path

import gradio as gr
from gradio.data_classes import FileData

from adapters.core.errors import StudioError
from jobs.runfolder import RunFolder
from studio.engine import Progress, run_once
from studio.ui.common import (Studio, archive_path, completed_run, describe_failure, for_api, job_choices,
                              message_html, progress_reporter)

KINDS = ("merged", "adapter", "gguf")
# The same names as jobs.results.gguf.TYPES, which the web process cannot import (it loads torch).
GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_0")
_lock = threading.Lock()  # one export at a time: each loads a whole model (in its own process)


def export(studio: Studio, job_id: int | str, kind: str, progress: Progress | None = None,
           gguf_type: str = "f16") -> tuple[Path, dict]:
    """Write (or reuse) the zip of a run's export; returns its path and the report.

    The export itself runs in a process of its own (studio.engine.run_once): merging loads
    the whole model, and that memory goes back to the system when the process ends."""
    if kind not in KINDS:
        raise StudioError(f"unknown export kind {kind!r}.", "kind", f"use one of: {', '.join(KINDS)}.")
    if kind == "gguf" and gguf_type not in GGUF_TYPES:
        raise StudioError(f"unknown GGUF type {gguf_type!r}.", "gguf_type", f"use one of: {', '.join(GGUF_TYPES)}.")
    job = completed_run(studio, job_id, f"export_{kind}")
    target = archive_path(studio, job, f"gguf-{gguf_type}" if kind == "gguf" else kind)
    run_json = RunFolder(job.run_dir).run_file
    with _lock:
        if target.is_file() and target.stat().st_mtime >= run_json.stat().st_mtime:
            with zipfile.ZipFile(target) as z:
                return target, json.loads(z.read(f"{target.stem}/export.json"))
        work = Path(tempfile.mkdtemp(prefix=".export-", dir=studio.exports))
        try:
            folder = work / target.stem
            report = run_once(studio.home, "export", progress, run_dir=job.run_dir, kind=kind, out=str(folder),
                              gguf_type=gguf_type)
            report = {**report, "path": target.name, "job": job.id, "run_dir": job.run_dir, "kind": kind}
            (folder / "export.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
            partial = work / target.name
            # A GGUF file is stored, not deflated: quantized weights do not compress, and it can be GBs.
            method = zipfile.ZIP_STORED if kind == "gguf" else zipfile.ZIP_DEFLATED
            with zipfile.ZipFile(partial, "w", method, allowZip64=True) as z:
                for f in sorted(folder.rglob("*")):
                    if f.is_file():
                        z.write(f, f.relative_to(work).as_posix())
            os.replace(partial, target)  # a download never sees half an archive
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target, report


def export_message(path: Path, report: dict) -> str:
    """What the page says after an export: its size and the checks it passed."""
    text = f"Wrote {path.name} ({path.stat().st_size / 2**20:.1f} MB)"
    if report.get("kind") == "gguf":
        return (f"{text}: read back by transformers, its logits differ from the merged model's by at most "
                f"{report['max_abs_logit_diff']:.2g} ({report['relative_diff']:.2%} of the largest), top-1 token "
                f"agreement {report['top1_agreement']:.1%}. Unzip, then: ollama create NAME -f "
                f"{Path(report['modelfile']).name if report.get('modelfile') else 'Modelfile'}")
    if "max_abs_logit_diff" in report:
        text += f"; merged and unmerged logits differ by at most {report['max_abs_logit_diff']:.2g}"
    return text + "."


def describe(studio: Studio, job_id: int | str) -> tuple[str, bool]:
    """What the chosen run will export, and whether it can merge."""
    methods = studio.catalog.methods
    job = completed_run(studio, job_id, "export_merged")
    name = job.spec["method"]["name"]
    blocker = methods.get(name).merge_blocker if name in methods else None
    base = html.escape(str(job.spec.get("model")))
    if blocker:
        return message_html(f"{name} cannot be merged into the base model: {blocker} "
                            "Download the adapter instead; load it on top of the base model.", "warn"), False
    return (f'<div class="studio-msg studio-msg-info">Method <b>{html.escape(name)}</b> on <b>{base}</b>: the merged '
            'model is a standalone safetensors folder that plain transformers loads '
            '(<code>AutoModelForCausalLM.from_pretrained</code>); the adapter needs the base model.</div>'), True


def build(studio: Studio) -> dict:
    with gr.Row(equal_height=False, elem_classes=["studio-actions"]):
        choice = gr.Dropdown(label="Completed run", choices=[], value=None, scale=3, elem_id="export.run")
        merged_btn = gr.Button("Merged model (zip)", variant="primary", scale=1, elem_id="export.merged")
        adapter_btn = gr.Button("Adapter only (zip)", scale=1, elem_id="export.adapter")
    with gr.Row(equal_height=False, elem_classes=["studio-actions"]):
        gguf_type = gr.Dropdown(label="GGUF type", choices=list(GGUF_TYPES), value="f16", scale=1,
                                elem_id="export.gguf_type",
                                info="f16/bf16: exact to rounding; q8_0, q4_0: smaller, lossy (see README).")
        gguf_btn = gr.Button("GGUF + Ollama Modelfile (zip)", scale=2, elem_id="export.gguf")
    info = gr.HTML(elem_id="export.info")
    note = gr.HTML(elem_id="export.status")
    download = gr.File(label="Download", interactive=False, elem_id="export.file")

    def on_choose(selected):
        if not selected:
            return "", gr.update(interactive=True)
        try:
            text, can_merge = describe(studio, selected)
        except Exception as e:
            return message_html(describe_failure(e), "error"), gr.update(interactive=True)
        return text, gr.update(interactive=can_merge)

    def on_export(kind: str):
        def run(selected, gguf_type="f16", progress=gr.Progress()):
            try:
                if not selected:
                    raise StudioError("no run chosen.", "run", "choose a completed run.")
                path, report = export(studio, selected, kind, progress_reporter(progress), gguf_type)
            except Exception as e:
                return message_html(describe_failure(e), "error"), None
            return message_html(export_message(path, report)), str(path)
        return run

    private = {"api_visibility": "private"}
    choice.change(on_choose, choice, [info, merged_btn], **private)
    merged_btn.click(on_export("merged"), choice, [note, download], **private)
    adapter_btn.click(on_export("adapter"), choice, [note, download], **private)
    gguf_btn.click(on_export("gguf"), [choice, gguf_type], [note, download], **private)
    return {"choice": choice, "choices": lambda: job_choices(studio, completed_only=True)}


def register_api(studio: Studio) -> None:
    @for_api
    def export_merged(job_id: int) -> FileData:
        """Zip of the run's merged model: a safetensors folder that plain transformers loads."""
        return FileData(path=str(export(studio, job_id, "merged")[0]))

    @for_api
    def export_adapter(job_id: int) -> FileData:
        """Zip of the run's trained adapter alone (load it on top of the base model)."""
        return FileData(path=str(export(studio, job_id, "adapter")[0]))

    @for_api
    def export_gguf(job_id: int, gguf_type: str = "f16") -> FileData:
        """Zip of the run's merged model as a GGUF file (llama.cpp, Ollama) with its Modelfile and report."""
        return FileData(path=str(export(studio, job_id, "gguf", gguf_type=gguf_type)[0]))

    gr.api(export_merged, api_name="export_merged")
    gr.api(export_adapter, api_name="export_adapter")
    gr.api(export_gguf, api_name="export_gguf")
