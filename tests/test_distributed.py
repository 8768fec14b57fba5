"""Data-parallel jobs: two CPU processes on gloo, launched through torchrun by the worker."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
import torch
from helpers import make_spec, serving_scheduler, wait_until
from safetensors.torch import load_file

from jobs.runfolder import read_metrics, read_run
from jobs.runner.scheduler import run_inline, submit_job
from jobs.runner.store import JobStore, Status


def job_spec(model: Path, data: Path, **training) -> dict:
    spec = make_spec(model, data, Path("unused"), **training)
    del spec["output_dir"]
    return spec


def adapter(run_dir: str) -> dict[str, torch.Tensor]:
    files = list((Path(run_dir) / "adapter").glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(str(files[0]))




def ranks_of(worker_pid: int) -> list[psutil.Process]:
    """The training processes under a job's worker (torchrun's own command line names them too)."""
    try:
        procs = psutil.Process(worker_pid).children(recursive=True)
        return [p for p in procs if "--rank" in p.cmdline() and "torch.distributed.run" not in p.cmdline()]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture
def scheduler(tmp_path):
    with serving_scheduler(tmp_path / "home", cancel_timeout=30) as sched:
        yield sched


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(scheduler, tiny_model, toy_dataset):
    home = scheduler.home
    # 2 processes x 4 rows = 1 process x 8 rows per step; accumulation covers the split too.
    common = dict(max_steps=6, grad_accum=2, seed=3)
    two = submit_job(home, job_spec(tiny_model, toy_dataset, batch_size=4, **common), devices=2, name="two").id
    one = submit_job(home, job_spec(tiny_model, toy_dataset, batch_size=8, **common), name="one").id
    store = JobStore(home)
    wait_until(lambda: all(store.get(i).finished for i in (one, two)), timeout=150)
    a, b = store.get(one), store.get(two)
    assert a.status == b.status == Status.COMPLETED, (a.error, b.error)
    assert read_run(b.run_dir)["world_size"] == 2

    losses_a = [r["loss"] for r in read_metrics(a.run_dir) if "loss" in r]
    losses_b = [r["loss"] for r in read_metrics(b.run_dir) if "loss" in r]
    assert losses_a == pytest.approx(losses_b, rel=1e-4)
    wa, wb = adapter(a.run_dir), adapter(b.run_dir)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)
    assert "torch.distributed.run" in (Path(b.run_dir) / "log.txt").read_text()


def test_cancel_stops_every_rank_and_a_killed_job_leaves_no_rank_behind(scheduler, tiny_model, toy_dataset):
    home = scheduler.home
    store = JobStore(home)
    jid = submit_job(home, job_spec(tiny_model, toy_dataset, batch_size=4, max_steps=400), devices=2).id
    run_dir = store.get(jid).run_dir
    wait_until(lambda: any("loss" in r and r["step"] >= 2 for r in read_metrics(run_dir)), timeout=90)
    ranks = ranks_of(store.get(jid).pid)
    assert len(ranks) == 2
    store.cancel(jid)
    done = wait_until(lambda: store.get(jid).finished and store.get(jid), timeout=60)
    assert done.status == Status.CANCELLED, done.error
    run = read_run(run_dir)
    assert run["status"] == "cancelled" and (Path(run_dir) / "checkpoints" / f"step-{run['step']:08d}").is_dir()
    psutil.wait_procs(ranks, timeout=10)

    store.resume(jid)
    wait_until(lambda: store.get(jid).status == Status.RUNNING and store.get(jid).pid, timeout=10)
    worker = store.get(jid).pid
    ranks = wait_until(lambda: len(ranks_of(worker)) == 2 and ranks_of(worker), timeout=60)
    os.kill(worker, signal.SIGKILL)  # the job process dies: torchrun and both ranks must follow
    gone, alive = psutil.wait_procs(ranks, timeout=45)
    assert alive == []
    lost = wait_until(lambda: store.get(jid).finished and store.get(jid), timeout=10)
    assert lost.status == Status.INTERRUPTED and "SIGKILL" in lost.error


def test_a_distributed_job_runs_inline_too(tmp_path, tiny_model, toy_dataset, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # gloo on the CPU even where GPUs exist
    home = tmp_path / "home"
    jid = submit_job(home, job_spec(tiny_model, toy_dataset, batch_size=2, max_steps=2), devices=2).id
    done = run_inline(home, jid)
    assert done.status == Status.COMPLETED, done.error
    assert read_run(done.run_dir)["world_size"] == 2
