"""The Export tab's GGUF download: the merged model as one GGUF file plus its Ollama Modelfile, zipped.

The web process holds no model, so the export runs as ``studio export RUN --gguf`` in a child
process whose JSON report is read back; its one-line error becomes the page's message. As
with the other exports, the archive lives in the studio home and is reused while the run is
unchanged.
"""
from __future__ import annotations

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
from studio.ui.child import run_cli
from studio.ui.common import Studio, archive_path, completed_run, describe_failure, for_api, message_html

# The same names as jobs.gguf_export.TYPES, which the web process cannot import (it loads torch).
GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_0")
_lock = threading.Lock()  # one GGUF export at a time: each loads a whole model


def export(studio: Studio, job_id: int | str, gguf_type: str) -> tuple[Path, dict]:
    if gguf_type not in GGUF_TYPES:
        raise StudioError(f"unknown GGUF type {gguf_type!r}.", "gguf_type", f"use one of: {', '.join(GGUF_TYPES)}.")
    job = completed_run(studio, job_id)
    target = archive_path(studio, job, f"{gguf_type}.gguf")
    run_json = Path(job.run_dir) / "run.json"
    stem = target.name.removesuffix(".gguf.zip")
    with _lock:
        if target.is_file() and target.stat().st_mtime >= run_json.stat().st_mtime:
            with zipfile.ZipFile(target) as z:
                return target, json.loads(z.read(f"{stem}/export.json"))
        work = Path(tempfile.mkdtemp(prefix=".gguf-", dir=studio.exports))
        try:
            folder = work / stem
            folder.mkdir()
            report = run_cli(["export", job.run_dir, "--gguf", str(folder / f"{stem}.gguf"),
                              "--gguf-type", gguf_type])
            report = {**report, "path": target.name, "job": job.id, "run_dir": job.run_dir, "kind": "gguf"}
            (folder / "export.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
            partial = work / target.name
            # Stored, not deflated: quantized weights do not compress, and the file can be GBs.
            with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for f in sorted(folder.iterdir()):
                    z.write(f, f.relative_to(work).as_posix())
            os.replace(partial, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target, report


def build(studio: Studio, choice, note, download) -> None:
    """A GGUF type and button in the Export tab, writing to the tab's status line and download."""
    with gr.Row(equal_height=False, elem_classes=["studio-actions"]):
        kind = gr.Dropdown(label="GGUF type", choices=list(GGUF_TYPES), value="f16", scale=1,
                           elem_id="export.gguf_type",
                           info="f16/bf16: exact to rounding; q8_0, q4_0: smaller, lossy (see README).")
        button = gr.Button("GGUF + Ollama Modelfile (zip)", scale=2, elem_id="export.gguf")

    def on_gguf(selected, gguf_type):
        try:
            if not selected:
                raise StudioError("no run chosen.", "run", "choose a completed run.")
            path, report = export(studio, selected, gguf_type)
        except Exception as e:
            return message_html(describe_failure(e), "error"), None
        return message_html(
            f"Wrote {path.name}: {report['size_bytes'] / 2**20:.1f} MB of {gguf_type}; read back by transformers, "
            f"its logits differ from the merged model's by at most {report['max_abs_logit_diff']:.2g} "
            f"({report['relative_diff']:.2%} of the largest), top-1 token agreement "
            f"{report['top1_agreement']:.1%}. Unzip, then: ollama create NAME -f "
            f"{Path(report['modelfile']).name if report.get('modelfile') else 'Modelfile'}"), str(path)

    button.click(on_gguf, [choice, kind], [note, download], api_visibility="private")


def register_api(studio: Studio) -> None:
    @for_api
    def export_gguf(job_id: int, gguf_type: str = "f16") -> FileData:
        """Zip of the run's merged model as a GGUF file (llama.cpp, Ollama) with its Modelfile and report."""
        return FileData(path=str(export(studio, job_id, gguf_type)[0]))

    gr.api(export_gguf, api_name="export_gguf")
