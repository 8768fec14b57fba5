"""The Datasets tab: upload (validated by the engine), list, rename, delete, and a preview
of rows exactly as the model will see them, with trained tokens told apart from the prompt."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import FileData

from adapters.core.errors import StudioError
from studio.ui.charts import length_histogram
from studio.ui.common import Studio, describe_failure, for_api, message_html, want_int, want_text

COLUMNS = ["Name", "Format", "Rows", "Eval rows", "Source"]


# -- the work, shared by the page and the API ------------------------------------------------

def upload(studio: Studio, path: str, name: str | None = None, original_name: str | None = None) -> dict:
    return studio.datasets.add(path, name or None, original_name).to_dict()


def list_all(studio: Studio) -> list[dict]:
    return [e.to_dict() for e in studio.datasets.list()]


def preview(studio: Studio, key: str, model_ref: str, max_seq_len: int) -> dict:
    """The first rows as token spans (trained or prompt) and the token lengths of a sample of rows.

    Tokenizing needs transformers, so the model process does it (jobs.engine.tasks.preview)."""
    from jobs.spec import MAX_SEQ_LEN

    max_seq_len = want_int(max_seq_len, "max_seq_len", 8, MAX_SEQ_LEN)
    model_ref = want_text(model_ref, "model", 4096).strip()
    entry = studio.datasets.get(key)
    model = studio.policy.model(model_ref, "model") if model_ref else studio.default_model
    data = studio.ask("preview", file=entry.file, name=entry.name, model_ref=model, max_seq_len=max_seq_len)
    data["rows"] = [{**r, "spans": [tuple(s) for s in r["spans"]]} for r in data["rows"]]
    return {"dataset": entry.to_dict(), **data}


def preview_html(data: dict) -> str:
    parts = []
    for i, row in enumerate(data["rows"], 1):
        spans = "".join(f'<span class="{"tok-trained" if trained else "tok-prompt"}">{html.escape(text)}</span>'
                        for text, trained in row["spans"])
        parts.append(f'<div class="ds-row"><div class="ds-row-head">row {i} &middot; {row["tokens"]} tokens, '
                     f'{row["trained_tokens"]} trained</div><pre class="ds-text">{spans}</pre></div>')
    legend = ('<div class="ds-legend"><span class="tok-prompt">prompt (no loss)</span>'
              '<span class="tok-trained">trained tokens</span></div>')
    return f'<div class="ds-preview">{legend}{"".join(parts)}</div>'


def stats_markdown(data: dict, max_seq_len: int) -> str:
    entry, lengths = data["dataset"], data["lengths"]
    lines = [f"**{entry['name']}** &middot; format **{data['format']}** &middot; {entry['rows']} rows"
             + (f" + {entry['eval_rows']} eval rows" if entry.get("eval_rows") else "")]
    if lengths:
        ordered = sorted(lengths)
        median = ordered[len(ordered) // 2]
        sample = f" (first {data['sampled']} rows)" if data["sampled"] < entry["rows"] else ""
        lines.append(f"tokens per row{sample}: min {ordered[0]}, median {median}, max {ordered[-1]}")
        if data["over_max_seq_len"]:
            lines.append(f"{data['over_max_seq_len']} row(s) are longer than max_seq_len={max_seq_len} "
                         "and will be truncated.")
    return "  \n".join(lines)


def table(studio: Studio) -> list[list[Any]]:
    return [[e.name, e.format, e.rows, e.eval_rows if e.eval_rows is not None else "-",
             "bundled" if e.bundled else (e.original_name or "upload")] for e in studio.datasets.list()]


def choices(studio: Studio) -> list[tuple[str, str]]:
    return [(e.name, e.id) for e in studio.datasets.list()]


# -- the page --------------------------------------------------------------------------------

def build(studio: Studio) -> dict:
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            name = gr.Textbox(label="Name", placeholder="defaults to the file name", max_lines=1,
                              elem_id="datasets.name")
            file = gr.File(label="Upload JSONL, JSON, CSV or Parquet", type="filepath", elem_id="datasets.upload")
            status = gr.HTML(elem_id="datasets.status")
        with gr.Column(scale=2, min_width=400):
            # Filled on each page load by a private event (studio.ui.app): a callable value here
            # would add an unnamed public endpoint (/lambda_N) to the API.
            listing = gr.Dataframe(headers=COLUMNS, interactive=False,
                                   label="Datasets", elem_id="datasets.table", wrap=True)
    with gr.Row(equal_height=True):
        choice = gr.Dropdown(label="Dataset", choices=choices(studio), value=None, elem_id="datasets.choice",
                             scale=2)
        model = gr.Textbox(label="Tokenizer (base model) for the preview", value=studio.default_model,
                           max_lines=1, elem_id="datasets.preview_model", scale=2)
        max_len = gr.Number(label="max_seq_len", value=512, precision=0, elem_id="datasets.max_seq_len", scale=1)
    with gr.Row(equal_height=False, elem_classes=["studio-actions"]):
        new_name = gr.Textbox(label="New name", max_lines=1, elem_id="datasets.new_name", scale=3)
        rename_btn = gr.Button("Rename", elem_id="datasets.rename", scale=0, min_width=140)
        delete_btn = gr.Button("Delete", variant="stop", elem_id="datasets.delete", scale=0, min_width=140)
    stats = gr.Markdown(elem_id="datasets.stats")
    with gr.Row(equal_height=False):
        shown = gr.HTML(elem_id="datasets.preview")
        hist = gr.HTML(elem_id="datasets.histogram")

    keep = object()

    def refreshed(selected: Any = keep) -> tuple:
        if selected is keep:
            return table(studio), gr.update(choices=choices(studio))
        return table(studio), gr.update(choices=choices(studio), value=selected)

    def on_upload(path: str | None, label: str):
        if not path:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            entry = upload(studio, path, label, Path(path).name)
        except Exception as e:  # shown in the page; nothing was stored
            return message_html(describe_failure(e), "error"), *refreshed(), None
        text = f"Stored {entry['name']!r}: {entry['rows']} rows, format {entry['format']}."
        return message_html(text), *refreshed(entry["id"]), None

    def on_preview(key: str | None, ref: str, limit):
        if not key:
            return "", "", ""
        try:
            limit = int(limit or 512)
            data = preview(studio, key, ref, limit)
        except Exception as e:
            return "", message_html(describe_failure(e), "error"), ""
        return preview_html(data), stats_markdown(data, limit), length_histogram(data["lengths"], limit)

    def on_rename(key: str | None, label: str):
        try:
            entry = studio.datasets.rename(key or "", label)
        except Exception as e:
            return message_html(describe_failure(e), "error"), gr.skip(), gr.skip()
        return message_html(f"Renamed to {entry.name!r}."), *refreshed(entry.id)

    def on_delete(key: str | None):
        try:
            entry = studio.datasets.delete(key or "")
        except Exception as e:
            return message_html(describe_failure(e), "error"), gr.skip(), gr.skip()
        return message_html(f"Deleted {entry.name!r}."), *refreshed(None)

    private = {"api_visibility": "private"}
    file.upload(on_upload, [file, name], [status, listing, choice, file], **private)
    for trigger in (choice.change, model.submit, max_len.submit):
        trigger(on_preview, [choice, model, max_len], [shown, stats, hist], **private)
    rename_btn.click(on_rename, [choice, new_name], [status, listing, choice], **private)
    delete_btn.click(on_delete, [choice], [status, listing, choice], **private)
    return {"listing": listing, "choice": choice}


def register_api(studio: Studio) -> None:
    @for_api
    def upload_dataset(file: FileData, name: str = "") -> dict:
        """Validate and store a dataset file; returns its entry (id, name, format, rows, path)."""
        from gradio.utils import get_upload_folder, is_in_or_equal

        data = file if isinstance(file, dict) else file.model_dump() if isinstance(file, FileData) else {}
        path = data.get("path")
        # Only files that came in through Gradio's upload route, never arbitrary server
        # paths (symlinks resolved first: is_in_or_equal resolves both sides).
        if not isinstance(path, str) or not path or not is_in_or_equal(path, get_upload_folder()) \
                or not Path(path).is_file():
            raise StudioError("the file was not uploaded through this studio.", "file",
                              "send it with gradio_client's handle_file(path).")
        original = want_text(data.get("orig_name"), "file.orig_name", 255) or Path(path).name
        return upload(studio, path, want_text(name, "name", 80), Path(original).name)

    @for_api
    def list_datasets() -> list[dict]:
        """Every dataset: the bundled demo and the uploads, with format and row counts."""
        return list_all(studio)

    gr.api(upload_dataset, api_name="upload_dataset")
    gr.api(list_datasets, api_name="list_datasets")
