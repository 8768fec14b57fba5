"""`studio evaluate`: EleutherAI's lm-eval harness on a run's model, offline, with the run's held-out rows as a task."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import hide_package, make_spec
from adapters.core.errors import StudioError
from jobs.runfolder import read_run

pytest.importorskip("lm_eval", reason="the [eval] extra is not installed: pip install -e '.[eval]'")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model):
    from helpers import toy_rows, write_jsonl
    from jobs.spec import parse_spec
    from jobs.training.recipe import train

    root = tmp_path_factory.mktemp("lm-eval")
    data = write_jsonl(root / "toy.jsonl", toy_rows())
    # 10 held-out rows, 4 of them scored by the studio's own exact match.
    assert train(parse_spec(make_spec(tiny_model, data, root / "run", max_steps=2)))["status"] == "completed"
    return root / "run"


def known_answers(monkeypatch, run_dir, padded: int = 2):
    """The model generates for real; the first ``padded`` answers are then replaced by their row's
    own target wrapped in spaces. Returns ``expected()``: the exact match the task must report,
    padded rows (once stripped) plus the real answers that match, over the rows seen. A task that
    scored other rows, another target, or without the strip filter would report something else."""
    from lm_eval.models.huggingface import HFLM

    from jobs.results.inference import load_run
    from jobs.results.lm_eval_task import heldout_rows

    targets = {r["prompt"]: r["target"] for r in heldout_rows(load_run(run_dir))}
    real, seen = HFLM.generate_until, []

    def generate(self, requests, disable_tqdm=False):
        out = []
        for request, answer in zip(requests, real(self, requests, disable_tqdm)):
            prompt = request.args[0]
            seen.append((prompt, answer))
            out.append(f"  {targets[prompt]}\n" if len(seen) <= padded else answer)
        return out
    monkeypatch.setattr(HFLM, "generate_until", generate)

    def expected():
        assert len(seen) > padded and all(p in targets for p, _ in seen)  # the run's own held-out rows
        return (padded + sum(a.strip() == targets[p] for p, a in seen[padded:])) / len(seen)
    expected.seen = seen
    return expected


def test_heldout_task_scores_the_runs_own_rows(run_dir, studio_home, monkeypatch):
    from jobs.results.lm_eval_task import evaluate_run

    expected = known_answers(monkeypatch, run_dir)
    result = evaluate_run(run_dir, ["heldout"], limit=4)
    scores = result["scores"]["heldout"]
    assert result["model_form"] == "merged" and scores["sample_len"] == 4 == len(expected.seen)
    assert scores["exact_match"] == expected()
    report = json.loads((run_dir / "eval" / "lm_eval.json").read_text())
    assert report["scores"] == result["scores"] and "heldout" in report["results"]
    assert report["configs"]["heldout"]["output_type"] == "generate_until"
    assert read_run(run_dir)["metrics"]["lm_eval"]["heldout"] == scores
    assert not list(run_dir.glob(".lm-eval-*"))  # its work folder is gone


@pytest.mark.plumbing  # pages and processes, no arithmetic the kernels could change
def test_named_tasks_without_cached_data_are_refused_not_waited_for(run_dir, monkeypatch):
    from jobs.training import models
    from jobs.results.lm_eval_task import evaluate_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.hub_reachable.cache_clear()
    with pytest.raises(StudioError, match="'arc_easy' is not in the local cache and the Hub is unreachable"):
        evaluate_run(run_dir, ["heldout", "arc_easy"])
    with pytest.raises(StudioError, match="no task named not_a_task"):
        evaluate_run(run_dir, ["not_a_task"])


def test_missing_harness_names_the_extra(run_dir, monkeypatch):
    from jobs.results.lm_eval_task import evaluate_run

    hide_package(monkeypatch, "lm_eval")
    with pytest.raises(StudioError, match=r"\.\[eval\]"):
        evaluate_run(run_dir, ["heldout"])


@pytest.mark.plumbing  # pages and processes, no arithmetic the kernels could change
def test_compare_shows_the_scores_and_the_ui_runs_the_harness_in_a_child(run_dir, tmp_path, monkeypatch):
    """The Compare tab's Evaluate starts `studio evaluate` in another process; its table shows the scores."""
    import sys

    from jobs.runner.store import Status
    from studio.ui import child, compare
    from studio.ui.common import Studio

    # The run lives outside this home: the operator allowed its folder (--allow-path).
    studio = Studio.at(tmp_path / "home", allow_paths=(str(Path(run_dir).parent),))
    job = studio.jobs.submit(read_run(run_dir)["spec"], name="tiny", run_dir=str(run_dir))
    studio.jobs.claim(job.id, "cpu")
    studio.jobs.finish(job.id, Status.COMPLETED)
    started = []
    real_run = child.subprocess.run
    monkeypatch.setattr(child.subprocess, "run", lambda cmd, **kw: started.append(cmd) or real_run(cmd, **kw))
    result = compare.evaluate(studio, job.id, "heldout", limit=2)
    assert started[0][:4] == [sys.executable, "-m", "studio.cli", "evaluate"]
    assert result["scores"]["heldout"]["sample_len"] == 2
    (row,) = compare.runs_table(compare.compare(studio, [job.id])["runs"])
    assert row[compare.COLUMNS.index("Benchmarks (lm-eval)")].startswith("heldout exact_match ")
    with pytest.raises(StudioError, match="no task named"):
        compare.evaluate(studio, job.id, "not_a_task")


@pytest.mark.smollm
@pytest.mark.timeout(1500)  # pays for the shared SmolLM2 run when it is the first to use it
def test_bundled_model_heldout_evaluation(smollm_lora_run, monkeypatch):
    from jobs.results.lm_eval_task import evaluate_run

    monkeypatch.setenv("STUDIO_HOME", str(smollm_lora_run["home"]))
    expected = known_answers(monkeypatch, smollm_lora_run["run_dir"], padded=1)
    result = evaluate_run(smollm_lora_run["run_dir"], ["heldout"], limit=2)
    assert result["scores"]["heldout"]["sample_len"] == 2
    assert result["scores"]["heldout"]["exact_match"] == expected()
