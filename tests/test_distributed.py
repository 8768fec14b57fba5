"""Data-parallel jobs: two CPU processes on gloo, launched through torchrun by the worker."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import json
import subprocess
import sys

import psutil
import pytest
import torch
from helpers import ROOT, make_spec, serving_scheduler, toy_rows, wait_until, write_jsonl
from safetensors.torch import load_file

from adapters.core.errors import StudioError
from jobs.spec import check_combination, parse_spec

from jobs.runfolder import read_metrics, read_run
from jobs.runner.scheduler import run_inline
from jobs.runner.submit import submit_job
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


@pytest.mark.plumbing  # pages and processes, no arithmetic the kernels could change
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


@pytest.mark.plumbing  # pages and processes, no arithmetic the kernels could change
def test_a_distributed_job_runs_inline_too(tmp_path, tiny_model, toy_dataset, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # gloo on the CPU even where GPUs exist
    home = tmp_path / "home"
    jid = submit_job(home, job_spec(tiny_model, toy_dataset, batch_size=2, max_steps=2), devices=2).id
    done = run_inline(home, jid)
    assert done.status == Status.COMPLETED, done.error
    assert read_run(done.run_dir)["world_size"] == 2


# Several specs trained one after another by the same two processes (one launch: each costs the
# imports of torch and transformers twice over). gloo on the CPU; nccl where two GPUs exist.
TWO_RANKS = """
import gc, json, sys
import torch, torch.distributed as dist
gc.disable()  # a wrapper outliving its run must show here, not be collected by chance
from jobs.spec import parse_spec
from jobs.training.recipe import train
dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
import jobs.training.trainee as trainee
seeded = trainee.seed_everything
for spec in json.load(open(sys.argv[1])):
    if spec.pop("skew_seeds", False):  # each rank draws the method's new tensors from a seed of its own
        trainee.seed_everything = lambda seed: seeded(seed + dist.get_rank())
    train(parse_spec(spec))
    trainee.seed_everything = seeded
    wrappers = [type(o).__name__ for o in gc.get_objects()
                if isinstance(o, torch.nn.Module) and type(o).__name__.startswith(("DistributedDataParallel", "FSDP"))]
    with open(sys.argv[1] + f".alive-{dist.get_rank()}", "a") as out:
        out.write(json.dumps(wrappers) + "\\n")
dist.destroy_process_group()
"""
ENGINES = ("none", "fsdp")
METHODS = ("lora", "full")
# Sharded only (their replicated runs are the ordinary DDP path): MeZO over every weight (its noise
# must be one process's draw cut to each shard), and peft's prompt-learning methods (their model
# holds the input embedding twice).
FSDP_ONLY = ("mezo", "prefix", "prompt")


def step_spec(model: Path, data: Path, out: Path, case: str, batch_size: int, **training) -> dict:
    """One step of ``case`` on ``batch_size`` rows per micro-batch (x2 micro-batches, x1 for MeZO).
    Evaluation is cut to 2 held-out rows, and greedy exact match (a generation per token) runs
    only in the sharded LoRA run, which the export test also uses: it is most of a run's time."""
    generate = case == "lora" and training.get("sharding") == "fsdp"
    common = dict(max_steps=1, exact_match_rows=2 if generate else 0, eval_samples=0, **training)
    if case == "mezo":  # it accumulates nothing: the same global batch in one micro-batch
        spec = make_spec(model, data, out, method={"name": "full"}, optimizer={"name": "mezo", "lr": 1e-3},
                         batch_size=2 * batch_size, **common)
    else:
        # SGD, not AdamW: its first update is lr x gradient, so a gradient off by any factor shows
        # (AdamW's first step is about lr x sign(gradient) whatever the scale).
        spec = make_spec(model, data, out, method={"name": case}, optimizer={"name": "sgd", "lr": 0.5},
                         grad_accum=2, batch_size=batch_size, **common)
    spec["dataset"]["max_eval_rows"] = 2
    return spec


def run_two_ranks(root: Path, specs: list[dict]) -> None:
    (root / "specs.json").write_text(json.dumps(specs))
    (root / "two_ranks.py").write_text(TWO_RANKS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STUDIO_HOME": str(root / "home")}
    if torch.cuda.device_count() < 2:
        env["CUDA_VISIBLE_DEVICES"] = ""  # two processes on the CPU
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(root / "two_ranks.py"), str(root / "specs.json")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def tied_copy(model: Path, folder: Path) -> Path:
    """The tiny model with its input embedding and output head one tensor (as Qwen2-0.5B's are),
    stored in fp64: an fp32 run converts it as it loads (exactly), so under fsdp it takes the other
    way in (``engines.Sharded``): rank 0 loads, the rest build on the meta device."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    weights = load_file(str(folder / "model.safetensors"))
    del weights["lm_head.weight"]  # else the loader keeps the two apart (and the meta-built ranks tie them)
    save_file({k: v.double() for k, v in weights.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory, tiny_model) -> Path:
    """One step of each engine x method on 2 ranks x 2 rows x 2 micro-batches, and one process
    with 4 rows x 2 micro-batches: the same global batch."""
    root = tmp_path_factory.mktemp("engines")
    data = write_jsonl(root / "toy.jsonl", toy_rows())
    tied = tied_copy(tiny_model, root / "tied-model")
    pairs = [(e, m) for e in ENGINES for m in METHODS] + [("fsdp", m) for m in FSDP_ONLY]
    skewed = [{**step_spec(tiny_model, data, root / f"{e}-skewed", "lora", 2, sharding=e, devices=2),
               "skew_seeds": True} for e in ENGINES]
    for spec in skewed:
        spec["training"]["exact_match_rows"] = 0
    run_two_ranks(root, [step_spec(tiny_model, data, root / f"{e}-{m}", m, 2, sharding=e, devices=2)
                         for e, m in pairs] +
                  [step_spec(tied, data, root / f"{e}-tied", "full", 2, sharding=e, devices=2) for e in ENGINES] +
                  skewed)
    from jobs.training.recipe import train

    mp = pytest.MonkeyPatch()
    mp.setenv("STUDIO_HOME", str(root / "home"))
    try:
        for m in METHODS + FSDP_ONLY:
            train(parse_spec(step_spec(tiny_model, data, root / f"one-{m}", m, 4)))
        train(parse_spec(step_spec(tied, data, root / "one-tied", "full", 4)))
    finally:
        mp.undo()
    return root


def trained_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run_dir / "adapter").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("engine, method", [(e, m) for e in ENGINES for m in (*METHODS, "tied", "skewed")] +
                         [("fsdp", m) for m in ("prefix", "prompt")])
def test_one_step_of_each_engine_equals_one_process_with_the_same_global_batch(engine_runs, engine, method):
    """``tied``: full fine-tuning of a model whose input embedding is its output head, the tensor
    that gets the head's dense gradient and the embedding's sparse rows under fsdp; stored in fp64
    (``tied_copy``), so loading converts it: under fsdp rank 0 loads alone and sends, under DDP its
    start-up broadcast makes the replicas equal.

    ``skewed``: LoRA with each rank seeding its generator differently, as ranks on different
    machines may draw differently: every rank must still start from rank 0's adapters."""
    one = engine_runs / f"one-{'lora' if method == 'skewed' else method}"
    two = engine_runs / f"{engine}-{method}"
    assert read_run(two)["world_size"] == 2 and read_run(two)["status"] == "completed"
    assert read_run(two)["spec"]["training"]["sharding"] == engine
    a, b = trained_tensors(one), trained_tensors(two)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    losses = [[r["loss"] for r in read_metrics(d) if "loss" in r] for d in (one, two)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_no_engine_wrapper_outlives_its_run(engine_runs):
    """DDP's reducer and FSDP2's state hold the process group: one still alive when the group is
    destroyed keeps gloo's threads until interpreter exit, where they abort a rank (SIGABRT) after
    a run that completed. The two-rank script lists the wrappers still alive after each run, with
    automatic collection off."""
    for rank in (0, 1):
        alive = [json.loads(line) for line in (engine_runs / f"specs.json.alive-{rank}").read_text().splitlines()]
        assert len(alive) == len(json.loads((engine_runs / "specs.json").read_text()))
        assert alive == [[]] * len(alive), alive


@pytest.mark.parametrize("engine, case", [("none", "full"), ("fsdp", "full"), ("fsdp", "tied")])
def test_every_rank_trains_with_the_lean_functions_one_process_uses(engine_runs, engine, case):
    """The record is the fewest over ranks. ``tied`` is loaded by rank 0 alone: only rank 0 can
    recognise a norm (the others are built on the meta device) and must tell them, or they train
    silently without."""
    one = read_run(engine_runs / f"one-{case}")["lean_functions"]
    assert one["rms_norm"] > 0 and one["swiglu"] > 0
    assert read_run(engine_runs / f"{engine}-{case}")["lean_functions"] == one


def test_a_tied_trained_embedding_gives_sparse_rows_into_the_heads_dense_gradient():
    """What ``Sharded.wrap`` does to a tied embedding, in one process: the weight's gradient is the
    same dense sum; an untied or frozen embedding is left as it is."""
    from helpers import tiny_llama

    from jobs.training.engines import sparse_tied_embedding

    ids = torch.tensor([[1, 5, 5, 9, 3], [7, 1, 2, 2, 0]])
    grads = []
    for sparse in (False, True):
        model = tiny_llama(tie_word_embeddings=True)
        assert sparse_tied_embedding(model) if sparse else True
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.get_input_embeddings().weight.grad)
    assert model.get_input_embeddings().sparse and not grads[1].is_sparse
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)
    assert not sparse_tied_embedding(tiny_llama(tie_word_embeddings=False))
    frozen = tiny_llama(tie_word_embeddings=True)
    frozen.requires_grad_(False)
    assert not sparse_tied_embedding(frozen) and not frozen.get_input_embeddings().sparse


def test_one_mezo_step_sharded_moves_every_weight_as_one_process_does(engine_runs, tiny_model):
    """MeZO's step is -lr x g x z: z must be one process's noise over each whole tensor (not the
    same numbers in every shard), g the loss slope summed over processes. The step, not the
    weights, is compared, relative to its size: g comes from a difference of two losses."""
    one, two = engine_runs / "one-mezo", engine_runs / "fsdp-mezo"
    assert read_run(two)["world_size"] == 2 and read_run(two)["status"] == "completed"
    base = load_file(str(tiny_model / "model.safetensors"))
    a, b = trained_tensors(one), trained_tensors(two)
    assert a.keys() == b.keys() == base.keys()
    for name in a:
        step_one, step_two = a[name] - base[name], b[name] - base[name]
        assert step_one.abs().max() > 0, name
        torch.testing.assert_close(step_two, step_one, rtol=1e-3, atol=1e-3 * float(step_one.abs().max()), msg=name)
    losses = [[r["loss"] for r in read_metrics(d) if "loss" in r] for d in (one, two)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_mezo_noise_on_a_shard_is_the_whole_tensor_noise_cut_to_its_rows():
    """The slicing behind a sharded MeZO step, without processes: shards of uneven rows (as
    FSDP2 cuts them), noise slices that straddle shard boundaries, and an empty last shard."""
    from adapters.mezo import _shard_noise, seeded_noise

    whole = torch.zeros(7, 5)
    expected = torch.cat([z for _, z in seeded_noise([whole], seed=11, slice_size=8)]).view(7, 5)
    for processes in (2, 3, 4, 8):
        chunk = -(-7 // processes)
        got = []
        for rank in range(processes):
            first = min(rank * chunk, 7)
            local = torch.zeros(max(0, min(chunk, 7 - first)), 5)
            gen = torch.Generator().manual_seed(11)
            for part, z in _shard_noise(whole, (local, first), gen, 8):
                part.add_(z)
            got.append(local)
        torch.testing.assert_close(torch.cat(got), expected, rtol=0, atol=0, msg=f"{processes} processes")


def test_a_two_rank_fsdp_run_exports_a_merged_model_that_matches_its_fingerprint(engine_runs, tmp_path):
    from jobs.results.export import export_merged

    run = engine_runs / "fsdp-lora"
    assert read_run(run)["fingerprint"]["rows"] > 0
    mp = pytest.MonkeyPatch()
    mp.setenv("STUDIO_HOME", str(engine_runs / "home"))
    try:
        report = export_merged(run, tmp_path / "merged")  # refuses a model that is not the trained one
    finally:
        mp.undo()
    assert (tmp_path / "merged" / "config.json").is_file() and report


@pytest.mark.parametrize("part, name", [("method", "qlora"), ("method", "loftq"), ("method", "qalora"),
                                        ("method", "peqa"), ("optimizer", "lomo"), ("optimizer", "adalomo"),
                                        ("optimizer", "adamw_8bit"),
                                        ("optimizer", "paged_adamw_8bit")])
def test_fsdp_refuses_what_it_cannot_train_exactly_before_launch(part, name):
    base = {"dataset": {"path": "rows.jsonl"}, "output_dir": "out", "training": {"sharding": "fsdp", "devices": 2}}
    spec = parse_spec({**base, part: name})
    with pytest.raises(StudioError, match=f"'{name}' cannot train sharded") as refused:
        check_combination(spec)
    assert "sharding" in refused.value.where and "use " in refused.value.fix
    check_combination(parse_spec({**base, "training": {"sharding": "none", "devices": 1}, part: name}))


def test_fsdp_refuses_a_single_process():
    # One process has nothing to shard across: it would quietly run unsharded.
    spec = parse_spec({"dataset": {"path": "rows.jsonl"}, "output_dir": "out", "training": {"sharding": "fsdp"}})
    with pytest.raises(StudioError, match="needs more than one process") as refused:
        check_combination(spec)
    assert "training.devices" in refused.value.fix
    check_combination(parse_spec({"dataset": {"path": "rows.jsonl"}, "output_dir": "out",
                                  "training": {"sharding": "fsdp", "nnodes": 2, "rdzv_endpoint": "host:29500"}}))


@pytest.mark.parametrize("method, rule", [("full", "adamw"), ("selective", "adamw"), ("lora", "adamw"),
                                          ("dora", "adamw"), ("ia3", "adamw"), ("series_adapter", "adamw"),
                                          ("parallel_adapter", "adamw"), ("prefix", "adamw"),
                                          ("prompt", "adamw"), ("full", "mezo"), ("lora", "mezo")])
def test_fsdp_accepts_the_methods_it_trains(method, rule):
    check_combination(parse_spec({"dataset": {"path": "rows.jsonl"}, "output_dir": "out", "method": method,
                                  "optimizer": rule, "training": {"sharding": "fsdp", "devices": 2}}))


def rank_number(proc: psutil.Process) -> int | None:
    try:
        return int(proc.environ().get("RANK", "-1"))
    except (psutil.Error, ValueError):
        return None


def test_a_killed_rank_interrupts_the_job_and_resume_ends_where_an_unbroken_run_does(scheduler, tiny_model,
                                                                                     toy_dataset):
    home = scheduler.home
    store = JobStore(home)
    settings = dict(batch_size=2, max_steps=10, save_every=2, keep_checkpoints=2, sharding="fsdp",
                    exact_match_rows=0, eval_samples=0)
    broken = submit_job(home, job_spec(tiny_model, toy_dataset, **settings), devices=2, name="broken").id
    whole = submit_job(home, job_spec(tiny_model, toy_dataset, **settings), devices=2, name="whole").id
    run_dir = store.get(broken).run_dir
    wait_until(lambda: any("loss" in r and r["step"] >= 3 for r in read_metrics(run_dir)), timeout=120)
    victim = next(p for p in ranks_of(store.get(broken).pid) if rank_number(p) == 1)
    victim.kill()  # SIGKILL, mid-run
    lost = wait_until(lambda: store.get(broken).finished and store.get(broken), timeout=60)
    assert lost.status == Status.INTERRUPTED, lost.error
    assert "rank 1" in lost.error and "SIGKILL" in lost.error
    assert read_run(run_dir)["status"] == "interrupted"
    sealed = [c for c in (Path(run_dir) / "checkpoints").iterdir() if c.name.startswith("step-")]
    assert sealed and all((c / "MANIFEST.json").is_file() for c in sealed)

    store.resume(broken)
    wait_until(lambda: all(store.get(i).finished for i in (broken, whole)), timeout=240)
    a, b = store.get(broken), store.get(whole)
    assert a.status == b.status == Status.COMPLETED, (a.error, b.error)
    assert any(r.get("event") == "resumed" for r in read_metrics(a.run_dir))
    wa, wb = adapter(a.run_dir), adapter(b.run_dir)
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)



@pytest.mark.plumbing  # which device a process binds, no arithmetic
def test_each_rank_binds_its_own_gpu_before_the_group_starts(monkeypatch):
    """Under torchrun on GPUs, rank k of a machine makes GPU k current before nccl starts: FSDP2's
    default mesh and the recipe's collectives take the current device, which is otherwise GPU 0 on
    every rank. A rank without a GPU of its own is refused with the setting to change."""
    import torch.distributed as dist

    from jobs.training import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("current", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("group", kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "_owned", [])
    world = distributed.setup()
    assert world.local_rank == 1 and world.size == 2
    assert calls == [("current", 1), ("group", {"backend": "nccl", "device_id": torch.device("cuda", 1),
                                                "timeout": distributed.GROUP_TIMEOUT})]
    calls.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(StudioError, match="training.devices: .*local rank 1.*1 GPU") as err:
        distributed.setup()
    assert "at most 1" in str(err.value) and not calls
