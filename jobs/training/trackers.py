"""Experiment trackers a run reports to (``training.report_to``): TensorBoard and MLflow.

Each writes through its library's own API: TensorBoard event files in ``<run>/tensorboard``,
an MLflow run in ``<studio home>/mlruns`` or at ``training.mlflow_tracking_uri``. The spec goes
in as parameters; every numeric value of a metrics.jsonl line (loss, lr, tokens/s, eval
metrics) and the final peak memory go in as metrics at their step.

A tracker that cannot start fails the job before training, with the reason. One that fails
later is reported once in the job log and metrics.jsonl, and dropped: training goes on.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from adapters.core.errors import StudioError
from jobs.home import studio_home
from jobs.runfolder import append_metrics

EXTRA = "pip install -e '.[trackers]'"


def flat_params(spec: dict, prefix: str = "") -> dict[str, str]:
    """The spec as ``section.key`` -> text, the shape both trackers take parameters in."""
    out: dict[str, str] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def numeric(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def _require(module: str, tracker: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise StudioError(f"training.report_to names {tracker}, but its package is not installed ({e}).",
                          "training.report_to", f"install the trackers extra: {EXTRA}; or remove {tracker}.") from None


class TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, spec: dict):
        _require("tensorboard", self.name)
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        params = flat_params(spec)
        self.writer.add_text("spec", "```\n" + json.dumps(spec, indent=2) + "\n```", 0)
        # The hparams plugin's records, written into this same event file (add_hparams would
        # open a second run folder per call).
        for summary in hparams(params, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.add_text("status", status, 0)
        self.writer.close()


class MLflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, spec: dict, tracking_uri: str | None):
        _require("mlflow", self.name)
        from mlflow import MlflowClient
        from mlflow.entities import Param

        if not tracking_uri:
            # MLflow 3 keeps its file store working behind this switch; a local folder needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            tracking_uri = (studio_home() / "mlruns").resolve().as_uri()
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        experiment = self.client.get_experiment_by_name("finetune-studio")
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment("finetune-studio")
        run = self.client.create_run(exp_id, run_name=run_dir.name, tags={"studio.run_dir": str(run_dir)})
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in flat_params(spec).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, {"completed": "FINISHED", "cancelled": "KILLED"}.get(status, "FAILED"))


class Trackers:
    """The run's trackers; ``log`` never raises, ``start`` does (before training)."""

    def __init__(self, run_dir: Path, active: list):
        self.run_dir, self.active = run_dir, active

    @classmethod
    def start(cls, spec, run_dir: Path) -> "Trackers":
        names = list(dict.fromkeys(spec.training.report_to))
        active = []
        try:
            for name in names:
                try:
                    if name == "tensorboard":
                        active.append(TensorBoard(run_dir, spec.resolved()))
                    else:
                        active.append(MLflow(run_dir, spec.resolved(), spec.training.mlflow_tracking_uri))
                except StudioError:
                    raise
                except Exception as e:
                    raise StudioError(f"the {name} tracker could not start: {type(e).__name__}: {e}",
                                      "training.report_to", "fix the tracker's setting (e.g. "
                                      "training.mlflow_tracking_uri), or remove it from report_to.") from None
        except BaseException:
            for tracker in active:
                tracker.close("failed")
            raise
        return cls(run_dir, active)

    def log(self, record: dict) -> None:
        values = numeric(record)
        if not values or "step" not in record:
            return
        for tracker in list(self.active):
            try:
                tracker.log(int(record["step"]), values)
            except Exception as e:
                self._drop(tracker, e)

    def close(self, status: str) -> None:
        for tracker in list(self.active):
            try:
                tracker.close(status)
            except Exception as e:
                self._drop(tracker, e)
        self.active = []

    def _drop(self, tracker, error: Exception) -> None:
        self.active.remove(tracker)
        message = f"{tracker.name} tracker failed and was stopped; training goes on: {type(error).__name__}: {error}"
        print(message, file=sys.stderr, flush=True)  # the job log
        append_metrics(self.run_dir, {"event": "tracker_failed", "tracker": tracker.name, "error": message})


NO_TRACKERS = Trackers(Path("."), [])
