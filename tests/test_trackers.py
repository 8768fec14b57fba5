"""training.report_to: TensorBoard event files and an MLflow run, read back with each library's own reader."""
from __future__ import annotations

import json

import pytest

from helpers import hide_package, make_spec
from adapters.core.errors import StudioError
from jobs.runfolder import read_metrics, read_run
from jobs.spec import parse_spec

pytest.importorskip("tensorboard", reason="the [trackers] extra is not installed: pip install -e '.[trackers]'")
pytest.importorskip("mlflow", reason="the [trackers] extra is not installed: pip install -e '.[trackers]'")


def train_reporting(tiny_model, toy_dataset, out, **training):
    from jobs.training.recipe import train

    spec = parse_spec(make_spec(tiny_model, toy_dataset, out, max_steps=4, eval_every=2, **training))
    return train(spec)


def steps_of(rows: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r and "event" not in r}


def test_tensorboard_and_mlflow_hold_what_metrics_jsonl_holds(tiny_model, toy_dataset, tmp_path, studio_home):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train_reporting(tiny_model, toy_dataset, tmp_path / "run", report_to=["tensorboard", "mlflow"])
    assert run["status"] == "completed"
    rows = read_metrics(tmp_path / "run")

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for key in ("loss", "lr", "tokens_per_second", "eval_loss", "exact_match", "peak_memory_bytes"):
        assert key in scalars, key
    for key in ("loss", "lr", "tokens_per_second", "eval_loss"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx(steps_of(rows, key), rel=1e-6), key  # event files store float32
    assert events.Scalars("peak_memory_bytes")[-1].value == pytest.approx(run["metrics"]["peak_memory_bytes"])
    assert "spec/text_summary" in events.Tags()["tensors"]

    client = MlflowClient(tracking_uri=(studio_home / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("finetune-studio")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.data.params["method.name"] == "lora" and found.data.params["training.max_steps"] == "4"
    assert json.loads(found.data.params["training.report_to"]) == ["tensorboard", "mlflow"]
    for key in ("loss", "lr", "tokens_per_second", "eval_loss", "exact_match"):
        history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, key)}
        assert history == pytest.approx(steps_of(rows, key)), key
    assert found.data.metrics["peak_memory_bytes"] == run["metrics"]["peak_memory_bytes"]


def test_a_user_given_tracking_uri(tiny_model, toy_dataset, tmp_path, studio_home, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "elsewhere").resolve().as_uri()
    train_reporting(tiny_model, toy_dataset, tmp_path / "run", report_to=["mlflow"], mlflow_tracking_uri=uri)
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name("finetune-studio")
    assert len(MlflowClient(tracking_uri=uri).search_runs([experiment.experiment_id])) == 1
    assert not (studio_home / "mlruns").exists()


def test_a_tracker_that_cannot_start_fails_the_job_before_training(tiny_model, toy_dataset, tmp_path, studio_home):
    with pytest.raises(StudioError, match="mlflow tracker could not start"):
        train_reporting(tiny_model, toy_dataset, tmp_path / "run", report_to=["mlflow"],
                        mlflow_tracking_uri="nosuchscheme://nowhere")
    run = read_run(tmp_path / "run")
    assert run["status"] == "failed" and "mlflow tracker could not start" in run["error"]
    assert not [r for r in read_metrics(tmp_path / "run") if "loss" in r]  # no step ran


def test_a_tracker_failing_mid_run_is_logged_and_training_goes_on(tiny_model, toy_dataset, tmp_path, studio_home,
                                                                   monkeypatch, capsys):
    from jobs.training import trackers

    def broken(self, step, values):
        raise OSError("disk full")

    monkeypatch.setattr(trackers.TensorBoard, "log", broken)
    run = train_reporting(tiny_model, toy_dataset, tmp_path / "run", report_to=["tensorboard"])
    assert run["status"] == "completed"
    failures = [r for r in read_metrics(tmp_path / "run") if r.get("event") == "tracker_failed"]
    assert len(failures) == 1 and "disk full" in failures[0]["error"]  # reported once, then dropped
    assert "tensorboard tracker failed" in capsys.readouterr().err


def test_a_missing_package_names_the_extra(tiny_model, toy_dataset, tmp_path, studio_home, monkeypatch):
    hide_package(monkeypatch, "mlflow")
    with pytest.raises(StudioError, match=r"\.\[trackers\]"):
        train_reporting(tiny_model, toy_dataset, tmp_path / "run", report_to=["mlflow"])


def test_report_to_is_checked_with_the_spec(tiny_model, toy_dataset, tmp_path):
    with pytest.raises(Exception, match="report_to"):
        parse_spec(make_spec(tiny_model, toy_dataset, tmp_path / "run", report_to=["wandb"]))
