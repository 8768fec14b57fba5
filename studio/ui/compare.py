"""The Compare tab: chosen runs side by side (cost and quality), their loss curves overlaid,
and the spec fields in which they differ."""
from __future__ import annotations

from typing import Any

import gradio as gr

from adapters.core.errors import StudioError
from jobs.runfolder import RunFolder
from studio.ui.common import Studio, describe_failure, fmt_bytes, fmt_num, fmt_seconds, for_api, message_html, parse_ids
from studio.ui.charts import loss_chart
from studio.ui.jobs import curve_points

COLUMNS = ["Run", "Status", "Method", "Update rule", "Trainable params", "Peak memory", "Tokens/s", "Train time",
           "Train loss", "Eval loss", "Exact match"]
IGNORED_FIELDS = ("output_dir",)  # differs for every run by construction


def compare(studio: Studio, job_ids: list) -> dict:
    ids = parse_ids(job_ids)
    if not ids:
        raise StudioError("no runs chosen.", "runs", "choose at least one job.")
    runs, curves, specs = [], [], {}
    for jid in dict.fromkeys(ids):
        job = studio.jobs.get(jid)
        m = RunFolder(job.run_dir).read().get("metrics") or {}
        label = f"#{job.id} {job.name}"
        runs.append({"id": job.id, "label": label, "status": job.status.value,
                     "method": job.spec["method"]["name"], "optimizer": job.spec["optimizer"]["name"],
                     **{k: m.get(k) for k in ("trainable_params", "total_params", "peak_memory_bytes", "memory_kind",
                                              "tokens_per_second", "train_seconds", "train_loss", "eval_loss",
                                              "exact_match")}})
        curves += [{**p, "series": f"{label} {p['series']}"} for p in curve_points(job.run_dir)]
        specs[label] = flatten({k: v for k, v in job.spec.items() if k not in IGNORED_FIELDS})
    return {"runs": runs, "curves": curves, "spec_diff": differences(specs)}


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(specs: dict[str, dict]) -> list[dict]:
    """Fields whose value is not the same in every run (a missing field counts as a value)."""
    fields = sorted({k for s in specs.values() for k in s})
    rows = []
    for field in fields:
        values = [s.get(field, "(unset)") for s in specs.values()]
        if len(specs) < 2 or any(v != values[0] for v in values):
            rows.append({"field": field, **dict(zip(specs, values))})
    return rows if len(specs) >= 2 else []


def runs_table(runs: list[dict]) -> list[list[Any]]:
    def params(r):
        n, total = r["trainable_params"], r["total_params"]
        if n is None:
            return "-"
        return f"{n:,}" + (f" ({n / total:.2%})" if total else "")

    def memory(r):
        kind = " (process RSS)" if r["memory_kind"] == "cpu_peak_rss" else ""
        return fmt_bytes(r["peak_memory_bytes"]) + (kind if r["peak_memory_bytes"] else "")

    return [[r["label"], r["status"], r["method"], r["optimizer"], params(r), memory(r),
             "-" if r["tokens_per_second"] is None else f"{r['tokens_per_second']:.0f}",
             fmt_seconds(r["train_seconds"]), fmt_num(r["train_loss"]), fmt_num(r["eval_loss"]),
             "-" if r["exact_match"] is None else f"{r['exact_match']:.1%}"] for r in runs]


def diff_table(rows: list[dict]):
    import pandas as pd

    if not rows:
        return pd.DataFrame({"field": ["(the chosen runs' specs are identical)"]})
    return pd.DataFrame(rows).astype(str)


def build(studio: Studio) -> dict:
    with gr.Row(equal_height=False, elem_classes=["studio-actions"]):
        choice = gr.Dropdown(label="Runs", choices=[], value=[], multiselect=True, scale=4, elem_id="compare.runs")
        go = gr.Button("Compare", variant="primary", scale=1, elem_id="compare.go")
    note = gr.HTML(elem_id="compare.status")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, label="Runs", elem_id="compare.table", wrap=True)
    plot = gr.HTML(elem_id="compare.loss")
    diff = gr.Dataframe(interactive=False, label="Spec differences", elem_id="compare.diff", wrap=True)

    def on_compare(chosen: list):
        try:
            data = compare(studio, chosen or [])
        except Exception as e:
            return message_html(describe_failure(e), "error"), gr.skip(), gr.skip(), gr.skip()
        return "", runs_table(data["runs"]), loss_chart(data["curves"]), diff_table(data["spec_diff"])

    go.click(on_compare, choice, [note, table, plot, diff], api_visibility="private")
    return {"choice": choice}


def register_api(studio: Studio) -> None:
    @for_api
    def compare_runs(job_ids: list[int]) -> dict:
        """Runs side by side: metrics per run, loss curve points per run, and the spec fields that differ."""
        return compare(studio, job_ids)

    gr.api(compare_runs, api_name="compare")
