"""The bake-off: planning, the learning-rate choice, the report's arithmetic (Pareto fronts,
noise floor) on hand-made tables, and a tiny 3 methods x 2 seeds bake-off end to end."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from helpers import make_spec

from jobs.bakeoff import plan as bakeoff
from jobs.bakeoff.report import different, pareto_front, quality_metric, recommend, summarize
from adapters.core.errors import StudioError

pytestmark = pytest.mark.timeout(300)


def point(name, loss=None, em=None, mem=None, secs=None, **extra):
    return {"candidate": name, "eval_loss": loss, "exact_match": em, "peak_memory_bytes": mem,
            "train_seconds": secs, **extra}


# -- the arithmetic, on tables made by hand ------------------------------------------------

def test_pareto_front_keeps_ties_and_drops_dominated_points():
    table = [point("a", loss=1.0, mem=100), point("b", loss=0.8, mem=200), point("c", loss=0.8, mem=200),
             point("d", loss=0.9, mem=250),   # dominated by b: worse loss, more memory
             point("e", loss=1.0, mem=150),   # dominated by a: same loss, more memory
             point("f", loss=0.5, mem=400), point("g", loss=None, mem=50)]  # g never finished
    assert pareto_front(table, "eval_loss", "peak_memory_bytes") == ["a", "b", "c", "f"]
    # exact match is better when higher; time as the cost
    table = [point("a", em=0.5, secs=10), point("b", em=0.9, secs=30), point("c", em=0.9, secs=40),
             point("d", em=0.5, secs=10), point("e", em=0.4, secs=5)]
    assert pareto_front(table, "exact_match", "train_seconds") == ["e", "a", "d", "b"]


def rows_for(name, losses, mems, status="completed"):
    return [{"candidate": name, "method": name, "rule": "adamw", "lr": 1e-3, "merges": True,
             "predicted_peak_bytes": 1, "status": status, "eval_loss": loss, "exact_match": None,
             "peak_memory_bytes": mem, "train_seconds": 1.0, "trained_tokens_per_second": 10.0,
             "trainable_params": 5, "adapter_bytes": 7} for loss, mem in zip(losses, mems)]


def test_noise_floor_decides_which_gaps_count():
    rows = (rows_for("lora", [0.50, 0.60], [2e9, 2e9]) + rows_for("ia3", [0.58, 0.62], [1e9, 1e9])
            + rows_for("full", [0.90, 0.92], [5e9, 5e9]) + rows_for("prompt", [0.1, 0.1], [1e9, 1e9], "failed"))
    summary = {s["candidate"]: s for s in summarize(rows)}
    assert summary["lora"]["eval_loss"] == pytest.approx(0.55)
    assert summary["lora"]["eval_loss_spread"] == pytest.approx(0.10)
    assert summary["prompt"]["completed"] == 0 and summary["prompt"]["eval_loss"] is None
    assert different(summary["lora"], summary["ia3"], "eval_loss") is False  # gap 0.05 < spread 0.10
    assert different(summary["lora"], summary["full"], "eval_loss") is True
    text = recommend(list(summary.values()), "eval_loss", int(3e9))
    assert text.startswith("within 3.00 GB: lora, held-out loss 0.550, 2.00 GB peak;")
    assert "ia3 is within noise of it" in text and "ia3 needs only 1.00 GB" in text
    assert "full" not in text  # over budget, and clearly worse
    assert recommend(list(summary.values()), "eval_loss", int(5e8)).startswith("within 0.50 GB: no candidate fits; the smallest peak was ia3 at 1.00 GB")
    one_seed = summarize(rows_for("lora", [0.5], [1e9]))
    assert one_seed[0]["eval_loss_spread"] is None
    assert "no noise floor" in recommend(one_seed, "eval_loss", None)


def test_quality_is_exact_match_only_where_it_separates_the_candidates():
    tied = [{"completed": 1, "exact_match": 0.0}, {"completed": 2, "exact_match": 0.0}]
    assert quality_metric(tied) == "eval_loss"
    assert quality_metric([{"completed": 1, "exact_match": 0.2}, {"completed": 2, "exact_match": 0.5}]) == "exact_match"
    assert quality_metric([{"completed": 1, "exact_match": None}, {"completed": 2, "exact_match": 0.5}]) == "eval_loss"


# -- planning ------------------------------------------------------------------------------

def test_default_candidates_and_their_search_centres():
    from adapters import METHODS, UPDATE_RULES

    pairs = bakeoff.candidate_pairs(None, None)
    assert {(m, "adamw") for m in METHODS.names()} <= set(pairs)
    assert {("full", r) for r in bakeoff.MEMORY_RULES} <= set(pairs)
    assert bakeoff.candidate_pairs(["lora"], ["adamw", "sgd"]) == [("lora", "adamw"), ("lora", "sgd")]
    with pytest.raises(StudioError, match="unknown method.*nosuch"):
        bakeoff.candidate_pairs(["nosuch"], None)
    lora, full = METHODS.get("lora"), METHODS.get("full")
    assert bakeoff.suggested_lr(lora, UPDATE_RULES.get("adamw")) == lora.suggested_lr
    assert bakeoff.suggested_lr(lora, UPDATE_RULES.get("adamw_8bit")) == lora.suggested_lr
    mezo = UPDATE_RULES.get("mezo")
    assert bakeoff.suggested_lr(full, mezo) == mezo.Config().lr


def test_a_request_is_checked_before_anything_is_written(studio_home):
    for kwargs, where in (({"budget_steps": 0}, "budget"), ({"seeds": 0}, "--seeds"),
                          ({"budget_steps": 5, "budget_minutes": 1.0}, "--budget-steps"),
                          ({"lr_factors": (1.0, -2.0)}, "--lr-factors")):
        with pytest.raises(StudioError, match=where):
            bakeoff.create(studio_home, {"dataset": {"path": "x"}}, **kwargs)
    assert bakeoff.list_bakeoffs(studio_home) == []
    with pytest.raises(StudioError, match="no bake-off"):
        bakeoff.load(studio_home, "../runs")


def test_plan_skips_invalid_combinations_and_what_does_not_fit(studio_home, tiny_model, toy_dataset, monkeypatch):
    """The plan's own logic, with stand-in predictions (the end-to-end bake-off below uses the
    real estimator; its accuracy is tests/test_estimate.py's)."""
    from jobs.estimate import estimator as est

    spec = make_spec(tiny_model, toy_dataset, Path("unused"), grad_accum=2)
    predicted = {("lora", "adamw"): 3 * 2**20, ("ia3", "adamw"): 2**20}
    asked = []

    def estimate(spec, device=None, **kw):
        asked.append((spec.method_name, spec.optimizer_name))
        return {"total_bytes": predicted[asked[-1]]}
    monkeypatch.setattr(est, "estimate", estimate)
    monkeypatch.setattr(bakeoff, "device_capacity", lambda device: 2 * 2**20)  # room for ia3 only
    manifest = bakeoff.create(studio_home, spec, methods=["lora", "ia3"], rules=["adamw", "mezo"], budget_steps=4)
    plan = {c["key"]: c for c in bakeoff.plan(studio_home, manifest)["candidates"]}
    assert sorted(asked) == sorted(predicted)  # an invalid combination is never estimated
    assert "invalid combination" in plan["lora+mezo"]["skipped"] and "grad_accum" in plan["lora+mezo"]["skipped"]
    assert plan["ia3+adamw"]["skipped"] is None and plan["ia3+adamw"]["predicted_peak_bytes"] == 2**20
    assert plan["lora+adamw"]["skipped"].startswith("does not fit: predicted peak")
    assert plan["lora+adamw"]["predicted_peak_bytes"] == 3 * 2**20
    assert plan["ia3+adamw"]["lr_grid"] == [plan["ia3+adamw"]["suggested_lr"] * f for f in bakeoff.LR_FACTORS]
    monkeypatch.setattr(bakeoff, "device_capacity", lambda device: 2**19)
    with pytest.raises(StudioError, match="no candidate can run here"):
        bakeoff.plan(studio_home, bakeoff.create(studio_home, spec, methods=["lora", "ia3"], budget_steps=4))


def test_learning_rates_come_from_held_out_loss_and_minutes_from_step_time(studio_home, tiny_model, toy_dataset):
    from jobs.runfolder import update_run
    from jobs.runner.store import JobStore, Status

    spec = make_spec(tiny_model, toy_dataset, Path("unused"))
    manifest = bakeoff.create(studio_home, spec, methods=["lora", "ia3"], budget_minutes=0.5)
    manifest.update(seeds=[0], search_steps=2, candidates=[
        {"key": k, "method": k.split("+")[0], "rule": "adamw", "lr_grid": [1e-3, 1e-2], "skipped": None, "lr": None,
         "steps": None} for k in ("lora+adamw", "ia3+adamw")])
    from jobs.bakeoff.driver import submit_search

    submit_search(studio_home, manifest)
    store = JobStore(studio_home)
    results = {("lora+adamw", 1e-3): 0.9, ("lora+adamw", 1e-2): 0.7,  # 1e-2 wins
               ("ia3+adamw", 1e-3): math.nan, ("ia3+adamw", 1e-2): None}  # diverged, failed
    for s in manifest["search"]:
        job = store.get(s["job_id"])
        assert job.spec["training"]["max_steps"] == 2 and job.spec["optimizer"]["lr"] == s["lr"]
        loss = results[(s["key"], s["lr"])]
        update_run(Path(job.run_dir), metrics={"eval_loss": loss, "train_seconds": 3.0, "steps": 2})
        store.claim(job.id, "cpu")
        store.finish(job.id, Status.COMPLETED if loss is not None else Status.FAILED)
    bakeoff.choose_rates(studio_home, manifest)
    cands = {c["key"]: c for c in manifest["candidates"]}
    assert cands["lora+adamw"]["lr"] == 1e-2
    assert cands["lora+adamw"]["steps"] == 20  # 30 s / (6 s / 4 steps)
    assert "every learning rate" in cands["ia3+adamw"]["skipped"]


def test_one_split_for_every_seed_and_the_search_scores_on_rows_of_its_own(tmp_path, tiny_model, toy_dataset):
    """Plan level, no training: the rows each candidate spec names, for several seeds."""
    from jobs.bakeoff.split import write_split
    from jobs.data.rows import read_rows
    from jobs.spec import DatasetSpec

    base = make_spec(tiny_model, toy_dataset, Path("unused"))
    _, held_at_seed0, _ = read_rows(DatasetSpec(**base["dataset"]), 0)
    _, held_at_seed1, _ = read_rows(DatasetSpec(**base["dataset"]), 1)
    assert held_at_seed0 != held_at_seed1  # the base spec alone moves its held-out rows with the seed
    data = write_split(tmp_path / "bakeoff", base, 0)

    def rows_of(seed, search):
        spec = bakeoff.candidate_spec(base, "lora", "adamw", 1e-3, 4, seed, search=search, rows=data)
        assert spec["training"]["seed"] == seed
        train, held, _ = read_rows(DatasetSpec(**spec["dataset"]), seed)  # as the run itself reads them
        return [json.dumps(r, sort_keys=True) for r in train], [json.dumps(r, sort_keys=True) for r in held]

    train0, score0 = rows_of(0, search=False)
    assert score0 == [json.dumps(r, sort_keys=True) for r in held_at_seed0]  # what the base spec scores on
    for seed in (1, 7):
        assert rows_of(seed, search=False) == (train0, score0)  # the same rows whatever the seed
    strain, picked = rows_of(0, search=True)
    assert strain == train0 and rows_of(1, search=True) == (train0, picked)
    assert len(picked) == 7 and not set(picked) & set(score0) and not set(picked) & set(train0)
    assert len(train0) + len(picked) + len(score0) == 48
    # One rate and no time budget: nothing searches, so no row is kept from training.
    whole = write_split(tmp_path / "single", base, 0, searching=False)
    assert whole["search"] is None and whole["rows"]["train"] == 38
    with pytest.raises(StudioError, match="no rows apart"):
        bakeoff.candidate_spec(base, "lora", "adamw", 1e-3, 4, 0, search=True, rows=whole)
    with pytest.raises(StudioError, match="holds out no rows"):
        write_split(tmp_path / "none", merge_dataset(base, eval_fraction=0.0), 0)


def merge_dataset(spec, **dataset):
    return {**spec, "dataset": {**spec["dataset"], **dataset}}


def test_a_rate_at_the_edge_extends_the_grid_once_and_the_report_says_where_it_landed(studio_home, tiny_model,
                                                                                      toy_dataset):
    from jobs.bakeoff.driver import submit_search
    from jobs.bakeoff.report import recommend
    from jobs.bakeoff.split import write_split
    from jobs.runner.store import JobStore

    grid = [1e-3, 3e-3, 9e-3]
    cands = {k: {"key": k, "method": "lora", "rule": "adamw", "lr_grid": list(g), "lr": lr, "skipped": skip,
                 "lr_extra": None, "steps": 4}
             for k, g, lr, skip in (("inside", grid, 3e-3, None), ("top", grid, 9e-3, None),
                                    ("bottom", grid, 1e-3, None), ("one", [1e-3], 1e-3, None),
                                    ("skipped", grid, None, "does not fit"))}
    manifest = {"candidates": list(cands.values())}
    assert bakeoff.extend_grids(manifest) == ["top", "bottom"]
    assert cands["top"]["lr_extra"] == pytest.approx(2.7e-2) and cands["bottom"]["lr_extra"] == pytest.approx(1e-3 / 3)
    assert bakeoff.extend_grids(manifest) == []  # once
    assert [bakeoff.landing(cands[k]) for k in ("inside", "top", "one", "skipped")] == \
        ["interior", "extended", "single", None]  # the edge rate beat the extra one
    cands["bottom"]["lr"] = cands["bottom"]["lr_extra"]  # the extra rate won: still at an edge
    assert bakeoff.landing(cands["bottom"]) == "edge"
    assert bakeoff.landing({**cands["top"], "lr_extra": None}) == "edge"  # not (yet) extended
    # The driver queues only the extension runs, on the search rows.
    spec = make_spec(tiny_model, toy_dataset, Path("unused"))
    real = bakeoff.create(studio_home, spec, methods=["lora"], budget_steps=4)
    real.update(seeds=[0], search_steps=2, data=write_split(bakeoff.folder(studio_home, real["id"]), spec, 0),
                candidates=[cands["top"]], search=[{"key": "top", "lr": lr, "job_id": -1} for lr in grid])
    submit_search(studio_home, real)
    (extra,) = real["search"][3:]
    job = JobStore(studio_home).get(extra["job_id"])
    assert extra["lr"] == job.spec["optimizer"]["lr"] == cands["top"]["lr_extra"]
    assert job.spec["dataset"]["eval_path"] == real["data"]["search"] and "(search)" in job.name
    # The recommendation warns when the best rate stayed at the edge.
    summary = summarize(rows_for("lora", [0.5, 0.6], [1e9, 1e9]))
    assert "stayed at the edge" in recommend(summary, "eval_loss", None, {"lora": "edge"})
    assert "edge" not in recommend(summary, "eval_loss", None, {"lora": "extended"})


# -- end to end ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model):
    """`studio bakeoff` on 3 methods x 2 seeds, its jobs run inline; (home, stdout, report)."""
    import subprocess

    from helpers import toy_rows, write_jsonl

    root = tmp_path_factory.mktemp("bakeoff")
    data = write_jsonl(root / "toy.jsonl", toy_rows())
    spec = make_spec(tiny_model, data, Path("unused"))
    spec.pop("output_dir")
    (root / "spec.json").write_text(json.dumps(spec))
    home = root / "home"
    out = subprocess.run([sys.executable, "-m", "studio.cli", "bakeoff", str(root / "spec.json"), "--home", str(home),
                          "--methods", "lora,ia3", "--methods", "full", "--budget-steps", "4", "--search-steps", "2",
                          "--lr-factors", "0.3,3", "--inline"], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = Path(out.stdout.strip().splitlines()[-1])
    return home, folder, json.loads((folder / "report.json").read_text())


def test_the_report_folder_is_the_last_line_and_holds_the_report(finished):
    home, folder, report = finished
    assert folder.parent == home / "bakeoffs"
    assert {"report.json", "report.md", "pareto.png", "bakeoff.json"} <= {p.name for p in folder.iterdir()}
    assert len(report["candidates"]) == 6 and {c["seed"] for c in report["candidates"]} == {0, 1}
    assert {c["method"] for c in report["candidates"]} == {"lora", "ia3", "full"}
    page = (folder / "report.md").read_text()
    assert report["recommendation"] in page and "Learning-rate search" in page


def test_report_numbers_are_the_runs_own(finished):
    from jobs.runfolder import read_run

    home, folder, report = finished
    for row in report["candidates"]:
        run = read_run(row["run_dir"])
        assert run["status"] == "completed" and row["status"] == "completed"
        for key in ("eval_loss", "exact_match", "peak_memory_bytes", "train_seconds", "trainable_params",
                    "tokens_per_second"):
            assert row[key] == run["metrics"][key], key
        assert row["lr"] == run["spec"]["optimizer"]["lr"] and row["seed"] == run["spec"]["training"]["seed"]
        assert run["spec"]["method"]["name"] == row["method"] and run["spec"]["optimizer"]["name"] == row["rule"]
        assert run["metrics"]["steps"] == 4
        assert row["adapter_bytes"] > 0 and row["predicted_peak_bytes"] > 0
    summary = report["summary"]
    assert report["pareto"] == pareto_front(summary, report["quality_metric"], "peak_memory_bytes")
    assert report["pareto_time"] == pareto_front(summary, report["quality_metric"], "train_seconds")
    assert set(report["pareto"]) <= {s["candidate"] for s in summary} and report["pareto"]


def test_every_candidate_gets_its_searched_rate_and_the_same_data(finished):
    from jobs.runner.store import JobStore

    home, folder, report = finished
    search = report["lr_search"]
    for key, lr in search["chosen"].items():
        tried = [r for r in search["runs"] if r["candidate"] == key]
        # Two factors: every first choice is at an edge, so each grid got one more rate past it.
        low, high = sorted(r["lr"] for r in tried[:2])
        assert search["extra"][key] in (pytest.approx(low * low / high), pytest.approx(high * high / low))
        assert [r["lr"] for r in tried][2] == search["extra"][key]
        assert len(tried) == 3 and lr == min(tried, key=lambda r: r["eval_loss"])["lr"]
        assert search["landing"][key] == ("edge" if lr == search["extra"][key] else "extended")
        assert {r["lr"] for r in report["candidates"] if r["candidate"] == key} == {lr}
    assert search["train_seconds"] > 0
    assert search["at_edge"] == sorted(k for k, v in search["landing"].items() if v == "edge")
    jobs = [j for j in JobStore(home).list() if j.name.startswith(f"bakeoff {report['id']} ")]
    assert len(jobs) == 15  # 6 search + 3 extensions + 6 final, all ordinary jobs
    finals = [j.spec for j in jobs if "seed" in j.name]
    searches = [j.spec for j in jobs if "search" in j.name]
    # One split for every run: the same training rows; the search scores on rows no final run scores on.
    assert len({json.dumps(s["dataset"]) for s in finals}) == 1 and len({json.dumps(s["dataset"]) for s in searches}) == 1
    assert {s["dataset"]["path"] for s in finals + searches} == {str(folder / "data" / "train.jsonl")}
    rows = report["rows"]
    assert (rows["train"], rows["search"], rows["score"]) == (31, 7, 10)  # 48 rows: 20% held out, a fifth of the rest
    score, picked = finals[0]["dataset"]["eval_path"], searches[0]["dataset"]["eval_path"]
    read = lambda path: {line for line in Path(path).read_text().splitlines() if line}  # noqa: E731
    assert read(score) and read(picked) and not read(score) & read(picked)
    assert not read(picked) & read(finals[0]["dataset"]["path"])
    for seed in (0, 1):
        same = [s for s in finals if s["training"]["seed"] == seed]
        assert len(same) == 3 and {s["training"]["max_steps"] for s in same} == {4}
    page = (folder / "report.md").read_text()
    assert "where the rates landed:" in page and "(extension)" in page


def test_the_ui_reads_progress_and_serves_the_report(finished):
    import zipfile

    from studio.ui import bakeoff as tab
    from studio.ui.common import Studio

    home, folder, report = finished
    studio = Studio.at(home)
    assert tab.choices(studio)[0][1] == report["id"]
    s = tab.status(studio, report["id"])
    assert s["status"] == "done" and s["jobs"]["final"] == {"done": 6, "total": 6}
    assert s["report"]["recommendation"] == report["recommendation"]
    assert len(tab.summary_rows(s["report"])) == 3
    with zipfile.ZipFile(tab.archive(studio, report["id"])) as z:
        assert {Path(n).name for n in z.namelist()} == {"report.json", "report.md", "pareto.png"}


@pytest.mark.plumbing  # pages and processes, no arithmetic the kernels could change
def test_without_a_worker_the_bakeoff_serves_the_home_itself(studio_home, tiny_model, toy_dataset):
    """One process per job (so each peak is its own), started by the bake-off's own scheduler."""
    from jobs.runner.scheduler import scheduler_pid
    from jobs.runner.store import JobStore

    spec = make_spec(tiny_model, toy_dataset, Path("unused"))
    manifest = bakeoff.create(studio_home, spec, methods=["lora"], budget_steps=2, seeds=1, lr_factors=(1.0,))
    from jobs.bakeoff.driver import drive

    out = drive(studio_home, manifest["id"])
    report = json.loads((out / "report.json").read_text())
    (row,) = report["candidates"]
    assert row["status"] == "completed" and report["lr_search"]["runs"] == []
    assert row["lr"] == report["lr_search"]["chosen"]["lora+adamw"]
    job = JobStore(studio_home).get(row["job_id"])
    assert job.devices == "cpu" and job.pid is not None  # a job process, not this one
    assert scheduler_pid(studio_home) is None  # the lock is given back
    assert "no noise floor" in report["recommendation"]


@pytest.mark.plumbing  # pages and processes, no arithmetic the kernels could change
def test_the_page_launches_a_bakeoff_whose_driver_and_jobs_run_elsewhere(tmp_path):
    """Through the named endpoints: the app writes the request and starts the driver process;
    the app's scheduler runs the jobs; the report comes back as a zip."""
    import time
    import zipfile

    from helpers import toy_rows, write_jsonl
    from gradio_client import Client, handle_file
    from helpers import running_studio

    with running_studio(tmp_path) as s:
        client = Client(s["url"], verbose=False)
        # A web caller names datasets inside the home: upload first, then refer to it by name.
        data = write_jsonl(tmp_path / "toy.jsonl", toy_rows())
        name = client.predict(handle_file(str(data)), "toy", api_name="/upload_dataset")["name"]
        spec = make_spec(s["model"], Path(name), Path("unused"))
        started = client.predict(spec, ["lora"], None, 2, None, 1, [1.0], api_name="/bakeoff_start")
        deadline = time.monotonic() + 240
        while (st := client.predict(started["id"], api_name="/bakeoff_status"))["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline, st
            time.sleep(1.0)
        log = (s["home"] / "bakeoffs" / started["id"] / "driver.log").read_text()
        assert st["status"] == "done", (st["error"], log[-2000:])
        assert st["report"]["candidates"][0]["status"] == "completed" and st["jobs"]["search"]["total"] == 0
        with zipfile.ZipFile(client.predict(started["id"], api_name="/bakeoff_report")) as z:
            assert json.loads(z.read(f"bakeoff-{started['id']}/report.json"))["id"] == started["id"]


def test_the_benchmark_runs_on_a_tiny_budget(tiny_model, toy_dataset, tmp_path):
    from bench import bakeoff as bench_bakeoff

    spec = make_spec(tiny_model, toy_dataset, Path("unused"))
    out = bench_bakeoff.run(spec=spec, steps=2, seeds=1, methods=["lora"], lr_factors=(1.0,),
                            results_dir=tmp_path / "results", home=tmp_path / "home", inline=True)
    saved = json.loads((tmp_path / "results" / "bakeoff.json").read_text())
    assert saved["benchmark"] == "bakeoff" and saved["wall_seconds"] > 0 and "machine" in saved
    assert saved["report"]["candidates"][0]["status"] == "completed" == out["report"]["candidates"][0]["status"]
    assert (tmp_path / "results" / "bakeoff.png").is_file()
    page = (tmp_path / "results" / "bakeoff.md").read_text()
    assert out["report"]["recommendation"] in page and "](bakeoff.png)" in page


def test_a_cancelled_bakeoff_stops_its_jobs_and_resume_finishes_it(studio_home, tiny_model, toy_dataset):
    from jobs.bakeoff.driver import cancel, drive, resume
    from jobs.runner.store import JobStore

    spec = make_spec(tiny_model, toy_dataset, Path("unused"))
    manifest = bakeoff.create(studio_home, spec, methods=["lora"], budget_steps=2, seeds=1, lr_factors=(1.0,))
    assert cancel(studio_home, manifest["id"]) == []  # nothing queued yet; the driver stops at its first wait
    with pytest.raises(StudioError, match="cancelled.*--resume"):
        drive(studio_home, manifest["id"], inline=True)
    stopped = bakeoff.load(studio_home, manifest["id"])
    assert stopped["status"] == "cancelled" and stopped["driver_pid"] is None
    (entry,) = stopped["final"]
    assert JobStore(studio_home).get(entry["job_id"]).status == "cancelled"
    assert resume(studio_home, manifest["id"]) == [entry["job_id"]]
    out = drive(studio_home, manifest["id"], inline=True)
    report = json.loads((out / "report.json").read_text())
    assert [r["job_id"] for r in report["candidates"]] == [entry["job_id"]]
    assert report["candidates"][0]["status"] == "completed"


@pytest.mark.plumbing  # pages and processes, no arithmetic the kernels could change
@pytest.mark.browser
def test_the_bakeoff_tab_shows_a_finished_report_and_serves_it(tmp_path):
    """In Chromium: choose a finished bake-off, see its recommendation and table, download the zip."""
    import zipfile

    from helpers import toy_rows, write_jsonl
    from helpers import CHROMIUM, el
    from helpers import running_studio

    from jobs.bakeoff.driver import drive

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    from playwright.sync_api import expect, sync_playwright

    with running_studio(tmp_path) as s:
        spec = make_spec(s["model"], write_jsonl(tmp_path / "toy.jsonl", toy_rows()), Path("unused"))
        manifest = bakeoff.create(s["home"], spec, methods=["lora", "ia3"], budget_steps=2, seeds=1,
                                  lr_factors=(1.0,))
        # The running studio's scheduler runs the jobs (inline, the test and the scheduler would race
        # to claim the same queued job).
        drive(s["home"], manifest["id"])
        report = json.loads((s["home"] / "bakeoffs" / manifest["id"] / "report.json").read_text())
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True).new_page()
            page.set_default_timeout(30_000)
            page.goto(s["url"])
            page.get_by_role("tab", name="Bake-off").click()
            expect(el(page, "bakeoff.spec")).to_contain_text("demo")  # the base spec to edit
            el(page, "bakeoff.choice", "input").click()
            page.get_by_role("option", name=f"{manifest['id']} (done)").click()
            expect(el(page, "bakeoff.recommendation")).to_contain_text(report["recommendation"][:40])
            expect(el(page, "bakeoff.table")).to_contain_text("ia3+adamw")
            expect(el(page, "bakeoff.progress")).to_contain_text("done")
            el(page, "bakeoff.download").click()
            with page.expect_download() as dl:
                el(page, "bakeoff.file", "a").first.click()
            with zipfile.ZipFile(dl.value.path()) as z:
                assert f"bakeoff-{manifest['id']}/report.md" in z.namelist()
            browser.close()


def test_a_time_budget_runs_one_measuring_run_even_without_a_search(studio_home, tiny_model, toy_dataset):
    from jobs.bakeoff.driver import drive

    spec = make_spec(tiny_model, toy_dataset, Path("unused"))
    manifest = bakeoff.create(studio_home, spec, methods=["lora"], budget_minutes=0.02, search_steps=2, seeds=1,
                              lr_factors=(1.0,))
    out = drive(studio_home, manifest["id"], inline=True)
    done = bakeoff.load(studio_home, manifest["id"])
    (cand,) = done["candidates"]
    assert len(done["search"]) == 1 and cand["seconds_per_step"] > 0
    assert cand["steps"] == max(1, int(0.02 * 60 / cand["seconds_per_step"]))
    report = json.loads((out / "report.json").read_text())
    assert report["candidates"][0]["steps"] == cand["steps"] and report["budget"]["minutes"] == 0.02
