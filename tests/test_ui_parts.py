"""The studio's pieces without a browser: the launcher's auth rule, the memory verdict,
job progress and ETA from a run folder, export refusals, spec differences and charts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import toy_rows, write_jsonl

import app as launcher
from adapters.core.errors import StudioError
from jobs.runfolder import write_json_atomic
from jobs.runner.store import JobStore, Status
from studio.ui import charts, compare, export, train
from studio.ui.app import check_auth, parse_auth
from studio.ui.common import Studio, job_summary


def test_binding_beyond_localhost_needs_a_password(capsys, monkeypatch):
    check_auth("127.0.0.1", None)
    check_auth("0.0.0.0", ("me", "secret"))
    with pytest.raises(StudioError, match="--auth user:password"):
        check_auth("0.0.0.0", None)
    assert parse_auth("me:se:cret") == ("me", "se:cret")
    for bad in ("me", ":x", "me:"):
        with pytest.raises(StudioError, match="user:password"):
            parse_auth(bad)
    monkeypatch.delenv(launcher.AUTH_ENV, raising=False)
    assert launcher.main(["--host", "0.0.0.0", "--port", "1"]) == 2
    assert "without a password" in capsys.readouterr().err
    monkeypatch.setenv(launcher.AUTH_ENV, "nobody")
    assert launcher.main(["--port", "1"]) == 2
    assert "STUDIO_AUTH" in capsys.readouterr().err


@pytest.mark.slow
def test_a_protected_studio_answers_only_with_the_login(studio_home, monkeypatch, tiny_model):
    from gradio_client import Client
    from helpers import free_port

    from studio.ui.app import launch

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(studio_home / "uploads"))
    port = free_port()
    demo, _ = launch(studio_home, port=port, auth=("ann", "pw"), default_model=str(tiny_model), block=False,
                     scheduler=False)
    try:
        with pytest.raises(Exception):
            Client(f"http://127.0.0.1:{port}/", verbose=False).predict(api_name="/list_jobs")
        client = Client(f"http://127.0.0.1:{port}/", auth=("ann", "pw"), verbose=False)
        assert client.predict(api_name="/list_jobs") == []
    finally:
        demo.close()


@pytest.mark.parametrize("total, verdict", [(10, "fits"), (90, "tight"), (120, "does not fit")])
@pytest.mark.slow
def test_memory_verdict_against_the_device(studio_home, tiny_model, monkeypatch, total, verdict):
    # The model process's answer, as jobs.engine.tasks.check gives it; the verdict is the web process's.
    answer = {"available": True, "total_bytes": total, "breakdown": {"weights": total}, "peak_phase": "train",
              "assumptions": ["a note"], "precision": {"dtype": "bfloat16", "reason": "measured: bf16 4.4x fp32"}}
    monkeypatch.setattr(train, "estimate_for", lambda studio, data, device: answer)
    monkeypatch.setattr(train, "device_capacity", lambda studio, device: ("test device", 100, "cpu"))
    spec = {"model": str(tiny_model), "dataset": {"path": "demo"}, "method": {"name": "lora"}}
    result = train.check(Studio.at(studio_home, str(tiny_model)), spec, "cpu")
    assert result["verdict"] == verdict and result["total_bytes"] == total and result["device_bytes"] == 100
    page = train.check_html(result)
    assert verdict in page and "a note" in page and "highest while training" in page
    assert "computes in bfloat16: measured: bf16 4.4x fp32" in page


def test_an_invalid_combination_is_explained_before_launch(studio_home, tiny_model):
    spec = {"model": str(tiny_model), "dataset": {"path": "demo"}, "method": {"name": "prompt"},
            "training": {"gradient_checkpointing": True, "batch_size": 0}}
    with pytest.raises(StudioError, match=r"training\.batch_size"):
        train.check(Studio.at(studio_home, str(tiny_model)), spec, "cpu")
    assert JobStore(studio_home).list() == []


def running_job(home, tiny_model, tmp_path, method: str, **run) -> int:
    """A job the store has running, with the run.json its training loop would have written."""
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(10))
    spec = {"model": str(tiny_model), "dataset": {"path": str(data)}, "method": {"name": method},
            "optimizer": {"name": "adamw"}, "training": {"max_steps": 10}}
    store = JobStore(home)
    job = store.submit(spec, name=f"{method}-job")
    store.claim(job.id, "cpu")
    write_json_atomic(Path(job.run_dir) / "run.json", {"status": "running", **run})
    return job.id


def test_progress_and_eta_come_from_the_run_folder(studio_home, tiny_model, tmp_path):
    jid = running_job(studio_home, tiny_model, tmp_path, "lora", step=4, max_steps=10,
                             metrics={"train_seconds": 8.0, "train_loss": 1.5})
    s = job_summary(JobStore(studio_home).get(jid))
    assert s["status"] == "running" and s["progress"] == 0.4 and s["eta_seconds"] == pytest.approx(12.0)
    assert s["train_loss"] == 1.5 and s["heartbeat_age"] is None
    JobStore(studio_home).finish(jid, Status.COMPLETED)
    done = job_summary(JobStore(studio_home).get(jid))
    assert done["progress"] == 1.0 and done["eta_seconds"] is None


def test_export_refuses_unfinished_runs_and_explains_unmergeable_methods(studio_home, tiny_model, tmp_path):
    studio = Studio.at(studio_home)
    jid = running_job(studio_home, tiny_model, tmp_path, "prompt", step=1, max_steps=10)
    with pytest.raises(StudioError, match="only completed jobs have a result"):
        export.export(studio, jid, "merged")
    JobStore(studio_home).finish(jid, Status.COMPLETED)
    text, can_merge = export.describe(studio, jid)
    assert not can_merge and "cannot be merged" in text and "Download the adapter instead" in text
    with pytest.raises(StudioError, match="unknown export kind"):
        export.export(studio, jid, "onnx")  # gguf is a kind now
    assert list(studio.exports.iterdir()) == []


def test_spec_differences_and_charts():
    specs = {"#1 a": compare.flatten({"method": {"name": "lora", "r": 8}, "model": "m"}),
             "#2 b": compare.flatten({"method": {"name": "lora", "r": 4}, "model": "m", "extra": 1})}
    rows = compare.differences(specs)
    assert rows == [{"field": "extra", "#1 a": "(unset)", "#2 b": 1}, {"field": "method.r", "#1 a": 8, "#2 b": 4}]
    assert compare.differences({"#1 a": specs["#1 a"]}) == []

    points = [{"step": s, "loss": 2.0 - s / 10, "series": "#1 a train"} for s in (1, 2, 3)]
    points.append({"step": 3, "loss": 1.9, "series": "#1 a eval"})
    svg = charts.loss_chart(points)
    assert svg.count("<polyline") == 2 and svg.count("<circle") == 1 and "#1 a eval" in svg
    assert "No loss logged yet" in charts.loss_chart([])
    assert charts.nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    hist = charts.length_histogram([10, 12, 12, 40], limit=32)
    assert "max_seq_len 32" in hist and hist.count("<rect") == 3
    assert json.dumps(rows)  # plain data, as the API returns it
