"""The trained fingerprint: recorded at the end of training, checked by every reload and export."""
from __future__ import annotations

import json
import math

import pytest
import torch

from jobs.training import fingerprint
from adapters.core.errors import StudioError
from jobs.spec import parse_spec
from jobs.training.recipe import train
from studio.cli import main
from helpers import make_spec


@pytest.fixture()
def run_dir(tiny_model, toy_dataset, tmp_path, studio_home):
    out = tmp_path / "run"
    train(parse_spec(make_spec(tiny_model, toy_dataset, out, max_steps=2, exact_match_rows=0, eval_samples=0)))
    return out


def tamper(run_dir, change) -> None:
    from safetensors.torch import load_file, save_file

    path = run_dir / fingerprint.LOGITS
    logits = load_file(str(path))["logits"]
    save_file({"logits": change(logits).contiguous()}, str(path))


def test_the_run_folder_holds_the_trained_models_logits_on_its_own_rows(run_dir, toy_dataset):
    from jobs.results.inference import load_run

    recorded = fingerprint.read(run_dir)
    meta = json.loads((run_dir / fingerprint.META).read_text())
    assert meta["method"] == "lora" and meta["trained_dtype"] == "float32" and meta["computed_in"] == "float32"
    assert len(recorded.rows) == fingerprint.PROBE_ROWS
    assert recorded.logits.shape[0] == sum(len(p) for p in recorded.positions) <= 4 * fingerprint.POSITIONS
    # The rows are the run's held-out rows, tokenized as training saw them.
    loaded = load_run(run_dir)
    texts = [loaded.tokenizer.decode(ids) for ids in recorded.rows]
    assert all("plus 1" in t for t in texts)
    assert json.loads((run_dir / "run.json").read_text())["fingerprint"]["rows"] == fingerprint.PROBE_ROWS
    # The reload computes those logits again, to fp32 rounding.
    assert loaded.check["max_abs_logit_diff_vs_trained"] <= 1e-6


def test_export_reports_the_difference_from_the_trained_model(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--merged", str(tmp_path / "merged")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 <= report["max_abs_logit_diff_vs_trained"] <= report["allowed_diff_vs_trained"]
    assert report["allowed_diff_vs_trained"] == pytest.approx(1e-4 * max(1.0, fingerprint.read(run_dir).meta["max_abs_logit"]))
    assert main(["export", str(run_dir), "--adapter", str(tmp_path / "adapter")]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_logit_diff_vs_trained"] <= 1e-6


@pytest.mark.parametrize("kind", ["--merged", "--adapter"])
@pytest.mark.parametrize("change,reason", [
    (lambda t: t + 0.5, "more than lora's tolerance"),
    (lambda t: t.index_fill(1, torch.tensor([3]), float("nan")), "not finite"),
], ids=["drift", "nan"])
def test_export_refuses_a_model_that_is_not_the_trained_one(run_dir, tmp_path, capsys, kind, change, reason):
    tamper(run_dir, change)
    assert main(["export", str(run_dir), kind, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not the model that trained" in err and reason in err
    assert not (tmp_path / "out").exists()


def test_every_load_of_the_run_is_checked(run_dir):
    from jobs.results.inference import load_any

    tamper(run_dir, lambda t: t * 1.5)
    with pytest.raises(StudioError, match="the reloaded run is not the model that trained"):
        load_any(str(run_dir))  # the playground's and studio generate's load


def test_a_run_from_before_fingerprints_says_so_and_exports(run_dir, tmp_path):
    from jobs.results.export import export_merged

    (run_dir / fingerprint.META).unlink()
    (run_dir / fingerprint.LOGITS).unlink()
    report = export_merged(run_dir, tmp_path / "merged")
    assert report["max_abs_logit_diff_vs_trained"] is None and "before trained fingerprints" in report["fingerprint"]
    assert math.isfinite(report["max_abs_logit_diff"])


def test_tolerance_is_the_methods_own(run_dir):
    from adapters import METHODS

    assert fingerprint.tolerance(METHODS.get("lora")) == METHODS.get("lora").merge_tolerance
    assert fingerprint.tolerance(METHODS.get("full")) == fingerprint.FLOOR  # nothing to merge: rounding only

    class Declared:
        name, merge_tolerance, fingerprint_tolerance = "declared", 1e-4, 3e-3
    assert fingerprint.tolerance(Declared()) == 3e-3


def test_probe_positions_are_trained_ones():
    labels = [-100] * 5 + [7, 8, 9, 10, 11, 12, 13]
    positions = fingerprint.trained_positions(labels, 4)
    assert positions[0] == 4 and positions[-1] == len(labels) - 2 and len(positions) == 4
    assert all(labels[i + 1] != -100 for i in positions)
    assert fingerprint.trained_positions([-100, -100, -100]) == [2]


def test_a_fingerprint_that_did_not_fit_says_so(tiny_model, toy_dataset, tmp_path, studio_home, monkeypatch):
    """On a full GPU the fp32 copy may not fit: the run keeps its result and its loads say they are unchecked."""
    from jobs.results.inference import load_run

    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("no room")
    monkeypatch.setattr(fingerprint, "probe_logits", no_room)
    out = tmp_path / "run"
    run = train(parse_spec(make_spec(tiny_model, toy_dataset, out, max_steps=1, exact_match_rows=0, eval_samples=0)))
    assert run["status"] == "completed" and "did not fit" in run["fingerprint"]["skipped"]
    monkeypatch.undo()
    check = load_run(out).check
    assert check["max_abs_logit_diff_vs_trained"] is None and "did not fit" in check["fingerprint"]
