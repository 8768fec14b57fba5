"""The Compare tab: chosen runs side by side (cost and quality), their loss curves overlaid,
and the spec fields in which they differ."""
from __future__ import annotations

import re
from typing import Any

import gradio as gr

from adapters.core.errors import StudioError
from jobs.runfolder import RunFolder
from studio.ui.child import run_cli
from studio.ui.common import (Studio, completed_run, describe_failure, fmt_bytes, fmt_num, fmt_seconds, for_api,
                              job_for, message_html, parse_ids, want_int, want_text)
from studio.ui.charts import loss_chart
from studio.ui.jobs import curve_points

COLUMNS = ["Run", "Status", "Method", "Update rule", "Trainable params", "Peak memory", "Tokens/s", "Train time",
           "Train loss", "Eval loss", "Exact match", "Benchmarks (lm-eval)"]
IGNORED_FIELDS = ("output_dir",)  # differs for every run by construction
# lm-eval task names as the harness spells them; never an option or a path.
TASK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")
MAX_TASKS, MAX_LIMIT = 20, 100_000


def compare(studio: Studio, job_ids: list) -> dict:
    ids = parse_ids(job_ids)
    if not ids:
        raise StudioError("no runs chosen.", "runs", "choose at least one job.")
    runs, curves, specs = [], [], {}
    for jid in dict.fromkeys(ids):
        job = job_for(studio, jid, "compare")
        m = RunFolder(job.run_dir).read().get("metrics") or {}
        label = f"#{job.id} {job.name}"
        runs.append({"id": job.id, "label": label, "status": job.status.value,
                     "method": job.spec["method"]["name"], "optimizer": job.spec["optimizer"]["name"],
                     **{k: m.get(k) for k in ("trainable_params", "total_params", "peak_memory_bytes", "memory_kind",
                                              "tokens_per_second", "train_seconds", "train_loss", "eval_loss",
                                              "exact_match", "lm_eval")}})
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
             "-" if r["exact_match"] is None else f"{r['exact_match']:.1%}", benchmarks(r["lm_eval"])] for r in runs]


def benchmarks(scores: dict | None) -> str:
    """lm-eval scores as one cell: task metric value, per task (sample counts left out)."""
    return "; ".join(f"{task} {metric} {value:.3g}" for task, values in (scores or {}).items()
                     for metric, value in values.items() if metric != "sample_len") or "-"


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
    with gr.Row(equal_height=False, elem_classes=["studio-actions"]):
        tasks = gr.Textbox(label="lm-eval tasks", value="heldout", scale=4, elem_id="compare.eval_tasks",
                           info="heldout = each run's own held-out rows (offline); or harness task names, "
                                "comma-separated (their data must be cached or the Hub reachable).")
        evaluate_btn = gr.Button("Evaluate chosen runs", scale=1, elem_id="compare.evaluate")

    def on_evaluate(chosen: list, task_text: str):
        try:
            for jid in parse_ids(chosen or []):
                evaluate(studio, jid, task_text)
        except Exception as e:
            return (message_html(describe_failure(e), "error"),) + on_compare(chosen)[1:]
        return on_compare(chosen)

    evaluate_btn.click(on_evaluate, [choice, tasks], [note, table, plot, diff], api_visibility="private")
    return {"choice": choice}


def evaluate(studio: Studio, job_id: int | str, tasks: str, limit: int | None = None) -> dict:
    """lm-eval on a completed run, in a child process (``studio evaluate``); its scores land in run.json."""
    job = completed_run(studio, job_id, "evaluate")
    names = [t.strip() for t in want_text(tasks, "tasks", 1000).split(",") if t.strip()]
    if not names:
        raise StudioError("no lm-eval task named.", "tasks", "write heldout, or harness task names.")
    bad = [n for n in names if not TASK_NAME.match(n)]
    if bad or len(names) > MAX_TASKS:
        raise StudioError(f"not a list of at most {MAX_TASKS} task names: {', '.join(bad) or len(names)}.", "tasks",
                          "use names of letters, digits, '_', '-' and '.', separated by commas.")
    limit = want_int(limit, "limit", 1, MAX_LIMIT) if limit else None
    return run_cli(["evaluate", job.run_dir, "--tasks", ",".join(names)] + (["--limit", str(limit)] if limit else []))


def register_api(studio: Studio) -> None:
    @for_api
    def compare_runs(job_ids: list[int]) -> dict:
        """Runs side by side: metrics per run, loss curve points per run, and the spec fields that differ."""
        return compare(studio, job_ids)

    gr.api(compare_runs, api_name="compare")

    @for_api
    def evaluate_run(job_id: int, tasks: str = "heldout", limit: int | None = None) -> dict:
        """lm-eval harness scores for a completed run (in a child process); also shown by compare."""
        return evaluate(studio, job_id, tasks, limit)

    gr.api(evaluate_run, api_name="evaluate")
