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


def nan_in_second_probe(logits: torch.Tensor, run_dir) -> torch.Tensor:
    """One NaN logit at the first position of the fingerprint's second row (not its first: Python's
    max() over per-probe differences keeps a NaN only when it comes first)."""
    first_of_row_1 = len(fingerprint.read(run_dir).positions[0])
    changed = logits.clone()
    changed[first_of_row_1, 5] = float("nan")
    return changed


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
    (lambda t, run_dir: t + 0.5, "more than lora's tolerance"),
    (nan_in_second_probe, "not finite (1 NaN or infinite logit)"),
], ids=["drift", "nan-in-second-probe"])
def test_export_refuses_a_model_that_is_not_the_trained_one(run_dir, tmp_path, capsys, kind, change, reason):
    tamper(run_dir, lambda t: change(t, run_dir))
    assert main(["export", str(run_dir), kind, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not the model that trained" in err and reason in err
    assert not (tmp_path / "out").exists()


def test_every_load_of_the_run_is_checked(run_dir):
    from jobs.results.inference import load_any

    tamper(run_dir, lambda t: t * 1.5)
    with pytest.raises(StudioError, match="the reloaded run is not the model that trained"):
        load_any(str(run_dir))  # the playground's and studio generate's load


def forget_fingerprint(run_dir, damage: str) -> None:
    """A run made before fingerprints existed (no files, run.json records none), one whose files were
    deleted, or one whose logits file is damaged."""
    if damage == "unreadable":
        path = run_dir / fingerprint.LOGITS
        path.write_bytes(path.read_bytes()[:40])
        return
    (run_dir / fingerprint.META).unlink()
    (run_dir / fingerprint.LOGITS).unlink()
    if damage == "before":
        run = json.loads((run_dir / "run.json").read_text())
        del run["fingerprint"]
        (run_dir / "run.json").write_text(json.dumps(run))


@pytest.mark.parametrize("damage,reason", [
    ("before", "made before trained fingerprints existed"),
    ("deleted", "fingerprint files (fingerprint.json, fingerprint.safetensors) are missing"),
    ("unreadable", "fingerprint cannot be read"),
])
def test_a_run_without_a_readable_fingerprint_exports_only_when_told(run_dir, tmp_path, capsys, damage, reason):
    forget_fingerprint(run_dir, damage)
    for kind in ("--merged", "--adapter"):
        assert main(["export", str(run_dir), kind, str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err
        assert reason in err and "--no-fingerprint" in err, err
        assert not (tmp_path / "refused").exists()
    assert main(["export", str(run_dir), "--merged", str(tmp_path / "merged"), "--no-fingerprint"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["fingerprint_checked"] is False and report["max_abs_logit_diff_vs_trained"] is None
    assert report["fingerprint"].startswith("NOT CHECKED against the trained model") and reason in report["fingerprint"]
    assert "NOT checked against the trained model" in report["merge_note"]
    assert "warning: NOT CHECKED" in captured.err
    assert math.isfinite(report["max_abs_logit_diff"])  # merged against unmerged is still compared


def test_the_flag_does_not_bypass_a_fingerprint_that_is_there(run_dir, tmp_path, capsys):
    tamper(run_dir, lambda t: t + 0.5)
    assert main(["export", str(run_dir), "--adapter", str(tmp_path / "out"), "--no-fingerprint"]) == 2
    assert "not the model that trained" in capsys.readouterr().err


def test_playground_loads_of_an_old_run_go_on_and_say_unchecked(run_dir):
    from jobs.results.inference import load_run

    forget_fingerprint(run_dir, "before")
    check = load_run(run_dir).check
    assert check["fingerprint_checked"] is False and "made before trained fingerprints" in check["fingerprint"]


@pytest.mark.parametrize("kind", ["--merged", "--adapter"])
def test_export_refuses_a_run_whose_base_model_was_swapped(tmp_path, toy_dataset, studio_home, capsys, kind):
    """The base folder the run names now holds other weights of the same shape."""
    from helpers import build_tiny_llama

    base = build_tiny_llama(tmp_path / "base", seed=0)
    run = tmp_path / "run"
    train(parse_spec(make_spec(base, toy_dataset, run, max_steps=2, exact_match_rows=0, eval_samples=0)))
    build_tiny_llama(base, seed=1)
    for flags in ([], ["--no-fingerprint"]):
        assert main(["export", str(run), kind, str(tmp_path / "out"), *flags]) == 2
        err = capsys.readouterr().err
        assert "the reloaded run is not the model that trained" in err and "more than lora's tolerance" in err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["--merged", "--adapter"])
def test_export_refuses_an_edited_adapter(run_dir, tmp_path, capsys, kind):
    from safetensors.torch import load_file, save_file

    path = run_dir / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edited = [k for k in tensors if "lora_B" in k]
    assert edited
    save_file({k: t + 0.1 if k in edited else t for k, t in tensors.items()}, str(path))
    assert main(["export", str(run_dir), kind, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the reloaded run is not the model that trained" in err and "more than lora's tolerance" in err
    assert not (tmp_path / "out").exists()


def test_merge_check_refuses_nan_in_a_later_probe(run_dir, tmp_path, monkeypatch, capsys):
    """The merged model's logits NaN on its second probe only: the merged-vs-unmerged comparison refuses."""
    from jobs.results import export

    real, calls = export.logits_of, []

    def merged_nan_on_probe_1(model, batches):
        out = real(model, batches)
        calls.append(len(calls))
        if len(calls) == 2:  # the first call is the unmerged model's, the second the merged one's
            out[1] = torch.full_like(out[1], float("nan"))
        return out
    monkeypatch.setattr(export, "logits_of", merged_nan_on_probe_1)
    assert main(["export", str(run_dir), "--merged", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "merged and unmerged logits differ" in err and "not finite" in err and len(calls) == 2
    assert not (tmp_path / "out").exists()


def test_difference_counts_every_probe():
    a = [torch.zeros(1, 3, 8), torch.ones(1, 3, 8)]
    nan_later = [a[0].clone(), a[1].clone()]
    nan_later[1][0, 2, 4] = float("nan")
    diff = fingerprint.difference(a, nan_later)
    assert math.isnan(diff.max_abs) and diff.nonfinite == 1 and not diff.within(1e9)
    inf_ref = [a[0].clone(), a[1].clone()]
    inf_ref[1][0, 0, 0] = float("inf")
    assert not fingerprint.difference(inf_ref, a).within(1e9)
    shifted = [a[0], a[1] + 0.5]
    diff = fingerprint.difference(a, shifted)
    assert diff.max_abs == 0.5 and diff.scale == 1.0 and diff.within(0.5) and not diff.within(0.49)
    with pytest.raises(ValueError, match="shapes differ"):
        fingerprint.difference(a, [a[0]])


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
