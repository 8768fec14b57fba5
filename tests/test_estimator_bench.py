"""The out-of-sample scoring of the memory estimator (bench/estimator.py): its refit recovers
constants it is given, it scores both sets with both sets of constants, and it runs end to end
on a tiny model. No assertion depends on one machine's numbers."""
from __future__ import annotations

import json

import pytest
from helpers import toy_rows, write_jsonl

from bench import estimator
from jobs.estimate.estimator import allocator_slack

# The benchmarks' own machinery (run once per CI run, not per kernel path: .ci/run).
pytestmark = pytest.mark.bench


def fake(name: str, part: str, churn: int, gradients: int, rebuilt: int, apply: int, rest: int,
         truth: tuple[float, float, int]) -> dict:
    """A run whose measured peak is the estimator's formula at the constants ``truth``."""
    basis = {"churn": churn, "gradients": gradients, "rebuilt": rebuilt}
    est = {"phases": {"train": rest, "apply": apply, "load": apply // 2},
           "details": {"allocator_slack": 0, "slack_basis": basis}}
    measured = max(rest + allocator_slack(basis, truth[:2]), apply) + truth[2]
    return {"name": name, "set": part, "measured_peak_bytes": measured, "predicted_bytes": max(rest, apply),
            "error": max(rest, apply) / measured - 1, "estimate": est}


def test_refit_recovers_the_constants_that_made_the_peaks():
    truth = (0.3, 0.5, 40 << 20)
    mib = 1 << 20
    rows = [fake("lora", "fit", 200 * mib, 0, 0, 600 * mib, 1200 * mib, truth),
            fake("long", "fit", 900 * mib, 0, 0, 600 * mib, 1900 * mib, truth),
            fake("full", "fit", 200 * mib, 500 * mib, 0, 600 * mib, 2700 * mib, truth),
            fake("dora", "fit", 400 * mib, 0, 400 * mib, 600 * mib, 1500 * mib, truth),
            fake("apply-peak", "fit", 100 * mib, 0, 400 * mib, 2000 * mib, 1000 * mib, truth)]
    fitted = estimator.refit(rows)
    assert fitted["activation_slack"] == pytest.approx(0.3)
    assert fitted["rebuilt_weight_slack"] == pytest.approx(0.5)
    assert fitted["process_offset_bytes"] == pytest.approx(40 << 20, abs=1 << 20)
    scores = estimator.score(rows, fitted)
    assert scores["refit"]["fit"]["max_abs_error"] < 1e-3
    # The shipped estimate (no slack, no offset) is under every one of these peaks.
    assert all(r["error"] < 0 for r in rows) and scores["shipped"]["fit"]["max_abs_error"] > 0.01


def test_scores_keep_the_sets_apart_and_name_failures():
    truth = (0.0, 0.0, 0)
    rows = [fake("a", "fit", 1, 0, 0, 10, 100, truth), fake("b", "out_of_sample", 1, 0, 0, 10, 100, truth)]
    rows[1]["measured_peak_bytes"] = 125  # predicted 100: -20%
    rows[1]["error"] = 100 / 125 - 1
    rows.append({"name": "c", "set": "out_of_sample", "error": None, "estimate": None})
    scores = estimator.score(rows, estimator.refit(rows[:1]))
    assert scores["shipped"]["fit"]["max_abs_error"] == pytest.approx(0.0)
    assert scores["shipped"]["out_of_sample"]["max_abs_error"] == pytest.approx(0.2)
    assert scores["shipped"]["out_of_sample"]["outside_target"] == ["b"]
    assert scores["shipped"]["out_of_sample"]["failed"] == ["c"]


def test_conversations_are_long_enough_to_truncate(tmp_path):
    rows = toy_rows(40)
    path = estimator.conversations(write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "long.jsonl", exchanges=8)
    convs = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
    assert len(convs) == (40 - 8) // 4 + 1
    assert all(len(c) == 16 and [m["role"] for m in c[:2]] == ["user", "assistant"] for c in convs)
    assert convs[1][0]["content"] == rows[4]["instruction"]


def test_benchmark_runs_end_to_end_on_a_tiny_model(tiny_model, tmp_path, monkeypatch, results):
    folder = results
    monkeypatch.setattr(estimator, "EXCHANGES", 8)
    rows = toy_rows(40)
    base = {"model": str(tiny_model),
            "dataset": {"path": str(write_jsonl(tmp_path / "train.jsonl", rows[:32])),
                        "eval_path": str(write_jsonl(tmp_path / "eval.jsonl", rows[32:])), "max_eval_rows": 1},
            "method": {"name": "lora", "r": 4}, "optimizer": {"name": "adamw", "lr": 1e-2},
            "training": {"batch_size": 4, "max_seq_len": 64, "max_steps": 2, "precision": "fp32", "eval_every": 0,
                         "save_every": 0, "exact_match_rows": 0, "eval_samples": 0},
            "output_dir": "unused"}
    out = estimator.run(results_dir=folder, base=base, fit=[("lora", "lora", {}), ("full", "full", {})],
                        out_of_sample=[("lora 2x24", "lora", "smollm2", (2, 24), {})])
    runs = {r["name"]: r for r in out["runs"]}
    assert [r["set"] for r in out["runs"]] == ["fit", "fit", "out_of_sample"]
    assert all(r["measured_peak_bytes"] > 0 and r["predicted_bytes"] > 0 and r["failure"] is None
               for r in runs.values()), [r["failure"] for r in runs.values()]
    # The out-of-sample rows are truncated to exactly the shape asked for, and the estimate assumed it.
    assert runs["lora 2x24"]["shape_as_intended"] is True
    assert runs["lora 2x24"]["estimated_batch"]["rows"] == 2 and runs["lora 2x24"]["estimated_batch"]["length"] == 24
    assert out["max_abs_error_in_sample"] == max(abs(runs[n]["error"]) for n in ("lora", "full"))
    assert out["max_abs_error_out_of_sample"] == abs(runs["lora 2x24"]["error"])
    assert out["meets_target"] == (out["max_abs_error_out_of_sample"] <= estimator.TARGET)
    assert all(r["refit_error"] is not None for r in runs.values())
    saved = json.loads((folder / "estimator.json").read_text())
    assert saved["benchmark"] == "estimator" and saved["refit_constants"]["runs"] == ["lora", "full"]
    from bench.report import write_report

    report = write_report(results_dir=folder).read_text()
    assert "Memory estimator out of sample" in report and "lora 2x24" in report
