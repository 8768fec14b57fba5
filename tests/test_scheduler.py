"""The scheduler and job processes under faults: kill -9, frozen processes, a killed
scheduler, corrupt checkpoints, cancel, and one slot shared by two jobs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import make_spec, serving_scheduler, wait_until

from adapters.core.errors import StudioError
from jobs.runfolder import read_metrics, read_run
from jobs.runner.scheduler import Scheduler, assign, kill_tree, run_inline, scheduler_pid
from jobs.runner.submit import submit_job
from jobs.runner.store import Job, JobStore, Status

ROOT = Path(__file__).resolve().parents[1]


def job_spec(model: Path, data: Path, **training) -> dict:
    spec = make_spec(model, data, Path("unused"), **training)
    del spec["output_dir"]  # the store puts the run in <home>/runs/<id>
    return spec




def last_step(run_dir: str) -> int:
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    return steps[-1] if steps else 0


def checkpoint_steps(run_dir: str) -> list[int]:
    root = Path(run_dir) / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*")) if root.is_dir() else []


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def scheduler(home):
    with serving_scheduler(home, cpu_slots=1, cancel_timeout=20, heartbeat_timeout=8) as sched:
        yield sched


def job(home, job_id) -> Job:
    return JobStore(home).get(job_id)


# -- placement (no processes) -----------------------------------------------------------

def fake(jid: int, nprocs: int = 1, devices: str | None = None, priority: int = 0) -> Job:
    return Job(jid, f"j{jid}", {}, Status.RUNNING if devices else Status.QUEUED, priority, 0.0, None, None, None,
               devices, nprocs, None, "", 1, False, [])


def test_gpus_are_exclusive_and_the_head_of_the_queue_waits():
    running = [fake(1, 1, "1")]
    placed = assign([fake(2, 2), fake(3, 1), fake(4, 1)], running, ["0", "1", "2"], cpu_slots=1)
    assert [(p.job.id, p.devices) for p in placed] == [(2, "0,2")]  # 3 and 4 wait behind it
    placed = assign([fake(2, 2), fake(3, 1)], running + [fake(5, 1, "0")], ["0", "1", "2"], cpu_slots=1)
    assert placed == []  # only GPU 2 is free; job 2 needs two and is not overtaken
    too_big = assign([fake(6, 4), fake(7, 1)], [], ["0", "1"], cpu_slots=1)
    assert too_big[0].devices is None and "has 2 GPU" in too_big[0].error
    assert (too_big[1].job.id, too_big[1].devices) == (7, "0")


def test_cpu_slots_count_jobs_not_processes():
    placed = assign([fake(1, 2), fake(2, 1)], [], [], cpu_slots=1)
    assert [(p.job.id, p.devices) for p in placed] == [(1, "cpu")]
    assert assign([fake(2, 1)], [fake(1, 2, "cpu")], [], cpu_slots=2)[0].devices == "cpu"


# -- submission ---------------------------------------------------------------------------

def test_submit_validates_and_stores_nothing_on_bad_input(home, tiny_model, toy_dataset):
    spec = job_spec(tiny_model, toy_dataset)
    with pytest.raises(StudioError, match="training.max_stepz: unknown key"):
        submit_job(home, {**spec, "training": {"max_stepz": 3}})
    with pytest.raises(StudioError, match="training.devices"):
        submit_job(home, spec, devices=0)
    assert JobStore(home).list() == []
    rel = {**spec, "dataset": {"path": toy_dataset.name}}
    queued = submit_job(home, rel, devices=2, priority=3, base_dir=toy_dataset.parent)
    assert queued.nprocs == 2 and queued.priority == 3 and queued.spec["training"]["devices"] == 2
    assert queued.spec["dataset"]["path"] == str(toy_dataset)  # jobs run in another folder


# -- processes ----------------------------------------------------------------------------

def test_two_jobs_with_one_slot_run_one_after_the_other(home, scheduler, tiny_model, toy_dataset):
    ids = [submit_job(home, job_spec(tiny_model, toy_dataset, max_steps=4), name=n).id for n in "ab"]
    wait_until(lambda: all(job(home, i).finished for i in ids), timeout=120, every=0.2)
    first, second = (job(home, i) for i in ids)
    assert first.status == second.status == Status.COMPLETED
    assert first.finished_at <= second.started_at  # never together
    log = (Path(second.run_dir) / "log.txt").read_text()
    assert log.count("completed") == 1
    # The job process ran on the allocator jobs.training.allocator picks here (tcmalloc where installed).
    from jobs.training.allocator import preload_env

    preloaded = preload_env({}).get("LD_PRELOAD", "").split(":")[0] or "the system"
    assert f"malloc: {preloaded}" in log


def test_each_job_gets_its_own_gpu_and_a_third_waits(home, tiny_model, toy_dataset):
    # GPU ids are only handed out here; on a machine without them the jobs train on the CPU.
    ids = [submit_job(home, job_spec(tiny_model, toy_dataset, max_steps=4), name=n).id for n in "abc"]
    with Scheduler(home, gpus=["0", "1"], poll_interval=0.1) as sched:
        sched.tick()
        first, second, third = (job(home, i) for i in ids)
        assert (first.devices, second.devices, third.status) == ("0", "1", Status.QUEUED)
        sched.run_until_idle(timeout=120)
    done = [job(home, i) for i in ids]
    assert all(j.status == Status.COMPLETED for j in done), [j.error for j in done]
    assert done[2].started_at >= min(done[0].finished_at, done[1].finished_at)
    for j in done:
        assert f"CUDA_VISIBLE_DEVICES={j.devices}," in (Path(j.run_dir) / "log.txt").read_text()


def test_kill_9_interrupts_and_resume_continues_the_step_count(home, scheduler, tiny_model, toy_dataset):
    jid = submit_job(home, job_spec(tiny_model, toy_dataset, max_steps=24, save_every=4)).id
    run_dir = job(home, jid).run_dir
    wait_until(lambda: 8 in checkpoint_steps(run_dir) and last_step(run_dir) < 24, timeout=60)
    os.kill(job(home, jid).pid, signal.SIGKILL)
    interrupted = wait_until(lambda: job(home, jid).status == Status.INTERRUPTED and job(home, jid), timeout=20)
    assert "killed by SIGKILL" in interrupted.error and "resume" in interrupted.error
    killed_at = checkpoint_steps(run_dir)[-1]
    hour_ago = time.time() - 3600  # resumed much later: the old heartbeat must not count against it
    os.utime(Path(run_dir) / "heartbeat", (hour_ago, hour_ago))

    JobStore(home).resume(jid)
    done = wait_until(lambda: job(home, jid).finished and job(home, jid), timeout=60, every=0.2)
    assert done.status == Status.COMPLETED, done.error
    resumed = [r for r in read_metrics(run_dir) if r.get("event") == "resumed"]
    assert [r["step"] for r in resumed] == [killed_at]
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, 25))  # continued, not restarted, and no step twice
    assert read_run(run_dir)["step"] == 24


def test_cancel_stops_at_a_step_with_a_checkpoint(home, scheduler, tiny_model, toy_dataset):
    jid = submit_job(home, job_spec(tiny_model, toy_dataset, max_steps=200)).id
    run_dir = job(home, jid).run_dir
    wait_until(lambda: last_step(run_dir) >= 3, timeout=60)
    JobStore(home).cancel(jid)
    done = wait_until(lambda: job(home, jid).finished and job(home, jid), timeout=30)
    assert done.status == Status.CANCELLED and "resume to continue" in done.error
    run = read_run(run_dir)
    assert run["status"] == "cancelled" and 3 <= run["step"] < 200
    assert checkpoint_steps(run_dir)[-1] == run["step"]  # nothing trained is lost


def test_corrupt_last_checkpoint_resumes_from_the_one_before(home, scheduler, tiny_model, toy_dataset):
    jid = submit_job(home, job_spec(tiny_model, toy_dataset, max_steps=24, save_every=4, keep_checkpoints=3)).id
    run_dir = job(home, jid).run_dir
    wait_until(lambda: len(checkpoint_steps(run_dir)) >= 2 and last_step(run_dir) < 24, timeout=60)
    os.kill(job(home, jid).pid, signal.SIGKILL)
    wait_until(lambda: job(home, jid).status == Status.INTERRUPTED, timeout=20)
    *_, before, newest = checkpoint_steps(run_dir)
    weights = Path(run_dir) / "checkpoints" / f"step-{newest:08d}" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn write

    JobStore(home).resume(jid)
    done = wait_until(lambda: job(home, jid).finished and job(home, jid), timeout=60, every=0.2)
    assert done.status == Status.COMPLETED, done.error
    resumed = [r for r in read_metrics(run_dir) if r.get("event") == "resumed"]
    assert [(r["step"], r["checkpoint"]) for r in resumed] == [(before, f"step-{before:08d}")]


def test_a_frozen_job_is_caught_by_its_heartbeat(home, scheduler, tiny_model, toy_dataset):
    jid = submit_job(home, job_spec(tiny_model, toy_dataset, max_steps=200)).id
    wait_until(lambda: last_step(job(home, jid).run_dir) >= 1, timeout=60)
    pid = job(home, jid).pid
    os.kill(pid, signal.SIGSTOP)  # alive, but silent: the scheduler must not wait forever
    try:
        done = wait_until(lambda: job(home, jid).finished and job(home, jid), timeout=30, every=0.2)
    finally:
        kill_tree(pid)
    assert done.status == Status.INTERRUPTED and "no heartbeat" in done.error


SURVIVOR_STEPS = 150


def test_killed_scheduler_is_reconciled_on_restart(home, tiny_model, toy_dataset):
    # Long enough to still be running when the scheduler is killed: the two jobs start one after
    # the other, and a short survivor could finish while the victim loads its model.
    survivor = submit_job(home, job_spec(tiny_model, toy_dataset, max_steps=SURVIVOR_STEPS), name="survivor").id
    victim = submit_job(home, job_spec(tiny_model, toy_dataset, max_steps=200), name="victim").id
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    service = subprocess.Popen([sys.executable, "-m", "studio.cli", "worker", "--home", str(home),
                                "--cpu-slots", "2", "--poll", "0.1"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: all(last_step(job(home, i).run_dir) >= 1 for i in (survivor, victim)), timeout=90)
        assert scheduler_pid(home) == service.pid
        with pytest.raises(StudioError, match="another scheduler"):
            Scheduler(home, gpus=[]).acquire()
        service.kill()  # the scheduler dies; its jobs live in their own sessions
        service.wait()
        assert scheduler_pid(home) is None
        os.kill(job(home, victim).pid, signal.SIGKILL)  # and one job dies while no one watches
        wait_until(lambda: not _exists(job(home, victim).pid), timeout=10)
        assert job(home, survivor).status == job(home, victim).status == Status.RUNNING

        with Scheduler(home, cpu_slots=2, gpus=[], poll_interval=0.1) as sched:
            lost = job(home, victim)
            assert lost.status == Status.INTERRUPTED and "is gone" in lost.error
            assert job(home, survivor).status == Status.RUNNING  # re-attached, not restarted
            sched.run_until_idle(timeout=300)
        kept = job(home, survivor)
        assert kept.status == Status.COMPLETED
        assert [r["step"] for r in read_metrics(kept.run_dir) if "loss" in r] == list(range(1, SURVIVOR_STEPS + 1))
    finally:
        service.kill()
        for j in JobStore(home).list((Status.RUNNING,)):
            kill_tree(j.pid)


def _exists(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_run_inline_executes_synchronously(home, tiny_model, toy_dataset):
    jid = submit_job(home, job_spec(tiny_model, toy_dataset, max_steps=3)).id
    done = run_inline(home, jid)
    assert done.status == Status.COMPLETED and done.devices == "inline"
    assert read_run(done.run_dir)["metrics"]["steps"] == 3
    with pytest.raises(StudioError, match="not queued"):
        run_inline(home, jid)
    assert json.loads(json.dumps(done.to_dict()))["status"] == "completed"


def test_a_bad_allocator_setting_fails_the_job_with_the_fix_and_no_run_folder(home, tiny_model, toy_dataset,
                                                                              monkeypatch):
    from jobs.runner.worker import spawn

    monkeypatch.setenv("STUDIO_ALLOCATOR", "fastest")
    queued = submit_job(home, job_spec(tiny_model, toy_dataset, max_steps=1), name="bad-malloc")
    with pytest.raises(StudioError) as e:
        spawn(home, queued, {})
    assert "STUDIO_ALLOCATOR" in e.value.message and "system" in e.value.message
    assert not Path(queued.run_dir).exists()
