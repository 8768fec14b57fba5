"""The job store: lifecycle transitions, ordering, and safety across processes."""
from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from adapters.core.errors import StudioError
from jobs.home import studio_home
from jobs.runner.store import JobStore, Status

SPEC = {"model": "m", "dataset": {"path": "d.jsonl"}, "output_dir": "ignored"}


@pytest.fixture
def store(tmp_path):
    return JobStore(studio_home(tmp_path / "home"))


def test_home_precedence_and_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "from_env"))
    assert studio_home() == (tmp_path / "from_env").resolve()
    home = studio_home(tmp_path / "flag")
    assert home == (tmp_path / "flag").resolve()
    assert {p.name for p in home.iterdir()} >= {"runs", "datasets", "models"}
    monkeypatch.delenv("STUDIO_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert studio_home() == (tmp_path / "user" / ".studio").resolve()


def test_store_is_wal_and_submit_sets_run_folder(store):
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    job = store.submit(SPEC, name="a")
    assert job.status == Status.QUEUED and job.attempt == 1
    assert job.run_dir == str(store.home / "runs" / str(job.id))
    assert job.spec["output_dir"] == job.run_dir
    named = store.submit({**SPEC}, name="b", run_dir="/elsewhere/run")
    assert named.run_dir == named.spec["output_dir"] == "/elsewhere/run"


def test_existing_folder_is_not_reused(store):
    (store.home / "runs" / "1").mkdir()
    (store.home / "runs" / "1" / "run.json").write_text("{}")
    job = store.submit(SPEC, name="a")
    assert job.id == 1 and job.run_dir.endswith("runs/1-2")


def test_queue_order_is_priority_then_fifo(store):
    ids = [store.submit(SPEC, name=n, priority=p).id for n, p in [("a", 0), ("b", 5), ("c", 0), ("d", 5)]]
    assert [j.name for j in store.queued()] == ["b", "d", "a", "c"]
    assert store.claim(ids[1], "cpu")
    assert not store.claim(ids[1], "cpu")  # already running
    assert [j.name for j in store.queued()] == ["d", "a", "c"]


def test_finish_only_for_the_owning_process(store):
    job = store.submit(SPEC, name="a")
    store.claim(job.id, "0")
    store.set_pid(job.id, 111)
    assert not store.finish(job.id, Status.INTERRUPTED, "stale report", pid=222)
    assert store.finish(job.id, Status.COMPLETED, pid=111)
    assert not store.finish(job.id, Status.FAILED)  # no longer running
    job = store.get(job.id)
    assert job.status == Status.COMPLETED and job.finished_at >= job.started_at


def test_cancel_queued_and_running(store):
    queued = store.submit(SPEC, name="q")
    assert store.cancel(queued.id).status == Status.CANCELLED
    running = store.submit(SPEC, name="r")
    store.claim(running.id, "cpu")
    job = store.cancel(running.id)
    assert job.status == Status.RUNNING and job.cancel_requested
    with pytest.raises(StudioError, match="already cancelled"):
        store.cancel(queued.id)


def test_resume_retry_delete_rules(store):
    job = store.submit(SPEC, name="a")
    with pytest.raises(StudioError, match="only failed, cancelled, interrupted"):
        store.resume(job.id)
    store.claim(job.id, "cpu")
    with pytest.raises(StudioError, match="is running"):
        store.delete(job.id)
    store.finish(job.id, Status.INTERRUPTED, "process gone")
    resumed = store.resume(job.id)
    assert resumed.status == Status.QUEUED and resumed.run_dir == job.run_dir and resumed.error is None
    store.claim(job.id, "cpu")
    store.finish(job.id, Status.COMPLETED)
    with pytest.raises(StudioError, match="retry"):
        store.resume(job.id)
    retried = store.retry(job.id)
    assert retried.attempt == 2 and retried.run_dir == job.run_dir + "-attempt2"
    assert retried.spec["output_dir"] == retried.run_dir and retried.earlier_run_dirs == [job.run_dir]
    store.delete(job.id)
    with pytest.raises(StudioError, match="no job with id"):
        store.get(job.id)
    with pytest.raises(StudioError, match="not a job id"):
        store.get("abc")


def _claim_all(home, out):
    s = JobStore(home)
    won = [j.id for j in s.list() if s.claim(j.id, "cpu")]
    out.put(won)


def test_concurrent_claims_never_double_start(store):
    for i in range(30):
        store.submit(SPEC, name=str(i))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(store.home, out)) for _ in range(3)]
    for p in procs:
        p.start()
    won = [jid for _ in procs for jid in out.get(timeout=60)]
    for p in procs:
        p.join()
    assert sorted(won) == [j.id for j in store.list()]  # every job claimed exactly once


def test_new_and_retried_run_folders_never_take_another_jobs_folder(store):
    runs = store.home / "runs"
    # Queued jobs that named the folders the store would choose next (their folders do not exist yet).
    squatter = store.submit(SPEC, name="named", run_dir=str(runs / "2"))
    job = store.submit(SPEC, name="a")
    assert job.id == 2 and job.run_dir == str(runs / "2-2")
    later = store.submit(SPEC, name="b", run_dir=job.run_dir + "-attempt2")
    store.claim(job.id, "cpu")
    store.finish(job.id, Status.COMPLETED)
    retried = store.retry(job.id)
    assert retried.run_dir not in {squatter.run_dir, later.run_dir, job.run_dir}
