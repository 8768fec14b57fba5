"""The memory estimator on tiny models: its parts add up, its counts are the methods' own,
the orderings between methods and update rules hold, it stays near a measured run, and the
CLI prints it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, make_spec, tiny_tokenizer

from adapters import METHODS
from jobs.estimate.estimator import estimate, estimate_inference
from jobs.spec import parse_spec

PARTS = {"weights", "trainable", "gradients", "optimizer_state", "activations", "logits", "framework_overhead",
         "gathered"}


def spec(model: Path, dataset: Path, out: Path, method: dict | None = None, optimizer: dict | None = None,
         **training):
    return parse_spec(make_spec(model, dataset, out, method, optimizer, **training))


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    """A config and tokenizer only, no weights: big enough (31M values) that the model, not the
    process, dominates each estimate; the estimator never needs the weights."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("wide-config")
    tok = tiny_tokenizer(folder)
    LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                tie_word_embeddings=True).save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))
    return folder


def test_breakdown_adds_up_to_the_total(tiny_model, toy_dataset, tmp_path):
    result = estimate(spec(tiny_model, toy_dataset, tmp_path / "run"), "cpu")
    assert set(result["breakdown"]) == PARTS
    assert sum(result["breakdown"].values()) == result["total_bytes"] > 0
    assert result["total_bytes"] == max(result["phases"].values())
    assert result["batch"]["source"] == "dataset" and result["batch"]["rows"] == 8
    assert result["assumptions"] and all(isinstance(a, str) for a in result["assumptions"])
    floor = estimate_inference(spec(tiny_model, toy_dataset, tmp_path / "run"), "cpu")
    assert sum(floor["breakdown"].values()) == floor["total_bytes"] < result["total_bytes"]


@pytest.mark.parametrize("name", METHODS.names())
def test_trainable_count_is_what_the_method_trains(name, tiny_model, toy_dataset, tmp_path):
    import torch

    from adapters.base import Context
    from jobs.training import models

    s = spec(tiny_model, toy_dataset, tmp_path / "run", {"name": name})
    method, cfg = s.method_config()
    src = models.resolve(s.model)
    tokenizer = models.load_tokenizer(src)
    ctx = Context(spec=s, device=torch.device("cpu"), dtype=torch.float32, tokenizer=tokenizer)
    model = method.apply(models.load_model(src), cfg, ctx)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate(s, "cpu")["trainable_params"] == trained


def test_orderings_between_methods_and_rules(wide_model, toy_dataset, tmp_path):
    def total(method, optimizer, **training):
        return estimate(spec(wide_model, toy_dataset, tmp_path / "run", {"name": method}, {"name": optimizer},
                             **training), "cpu")["total_bytes"]

    full_adamw, full_lomo, full_mezo = total("full", "adamw"), total("full", "lomo"), total("full", "mezo")
    assert total("lora", "adamw") < full_adamw
    assert full_lomo < full_adamw
    assert full_mezo < full_lomo
    assert total("full", "adamw_8bit") < full_adamw
    # Checkpointing keeps fewer activations; where the gradients take over the memory backward
    # frees (a reusing malloc), the peak is the gradients' and stays.
    plain = estimate(spec(wide_model, toy_dataset, tmp_path / "run", {"name": "full"}), "cpu")
    ckpt = estimate(spec(wide_model, toy_dataset, tmp_path / "run", {"name": "full"},
                         gradient_checkpointing=True), "cpu")
    assert ckpt["breakdown"]["activations"] < plain["breakdown"]["activations"]
    assert ckpt["total_bytes"] <= plain["total_bytes"] == full_adamw


def test_quantized_base_is_smaller_than_the_plain_one_on_a_gpu(wide_model, toy_dataset, tmp_path):
    # On a GPU only what the model holds counts (no memory-mapped file pages); while the
    # base is quantized, base and quantized copy exist together.
    def phases(method):
        return estimate(spec(wide_model, toy_dataset, tmp_path / "run", {"name": method}), "cuda")["phase_breakdowns"]

    qlora, lora = phases("qlora"), phases("lora")
    assert qlora["train"]["weights"] < 0.5 * lora["train"]["weights"]
    assert qlora["apply"]["weights"] > lora["apply"]["weights"]


def test_weights_rebuilt_in_every_forward_are_found(tiny_model, toy_dataset, tmp_path):
    # DoRA combines base and update into a full weight per layer and step; quantized layers are
    # dequantized; plain LoRA multiplies by the weight it has.
    def rebuilt(method):
        return estimate(spec(tiny_model, toy_dataset, tmp_path / "run", {"name": method}),
                        "cpu")["details"]["weights_rebuilt_per_forward"]

    assert rebuilt("lora") == 0 and rebuilt("full") == 0
    assert rebuilt("dora") > 0 and rebuilt("qlora") > 0


def test_a_meta_quantization_leaves_real_quantization_working(tiny_model, toy_dataset, tmp_path):
    import bitsandbytes.functional as bnb
    import torch

    from adapters.quant import nf4

    bnb.name2qmap.pop("dynamic", None)  # as in a fresh process, where the estimate quantizes first
    estimate(spec(tiny_model, toy_dataset, tmp_path / "run", {"name": "qlora"}), "cpu")
    assert not any(t.is_meta for t in bnb.name2qmap.values())
    assert nf4.dequantize(nf4.quantize(torch.randn(64, 64))).shape == (64, 64)


def test_without_the_dataset_rows_are_max_seq_len_long(tiny_model, toy_dataset, tmp_path):
    s = spec(tiny_model, toy_dataset, tmp_path / "run", max_seq_len=64)
    guessed = estimate(s, "cpu", use_data=False)
    assert guessed["batch"] == {"rows": 8, "length": 64, "trained_positions": 8 * 64, "source": "max_seq_len"}
    assert guessed["breakdown"]["activations"] > estimate(s, "cpu")["breakdown"]["activations"]


@pytest.mark.slow
def test_estimate_is_near_a_measured_tiny_run(tiny_model, toy_dataset, tmp_path):
    """Loose: on a tiny model the process itself is nearly all of it, and the machine is shared."""
    data = make_spec(tiny_model, toy_dataset, tmp_path / "run", max_steps=3)
    (tmp_path / "spec.json").write_text(json.dumps(data))
    # The process's own peak (VmHWM): ru_maxrss would start from pytest's size, inherited through fork.
    script = ("import json, re, sys; from pathlib import Path; from jobs.spec import parse_spec; "
              "from jobs.training.recipe import train; "
              "train(parse_spec(json.loads(Path(sys.argv[1]).read_text())), resume=False); "
              "print(int(re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text()).group(1)) * 1024)")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "spec.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**_env(), "STUDIO_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr[-2000:]
    measured = int(done.stdout.split()[-1])
    predicted = estimate(parse_spec(data), "cpu")["total_bytes"]
    assert 0.6 < predicted / measured < 1.6, (predicted, measured)


def test_cli_prints_the_table_and_json(tiny_model, toy_dataset, tmp_path, capsys):
    from studio.cli import main

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(make_spec(tiny_model, toy_dataset, tmp_path / "run")))
    assert main(["estimate", str(path), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "Predicted peak memory" in table
    assert all(part in table for part in PARTS) and "assumptions:" in table
    assert main(["estimate", str(path), "--json", "--set", "training.batch_size=2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["batch"]["rows"] == 2 and sum(result["breakdown"].values()) == result["total_bytes"]


def test_cli_rejects_a_combination_training_would_reject(tiny_model, toy_dataset, tmp_path, capsys):
    from studio.cli import main

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(make_spec(tiny_model, toy_dataset, tmp_path / "run", optimizer={"name": "mezo"},
                                         grad_accum=2)))
    assert main(["estimate", str(path)]) == 2
    assert "grad_accum" in capsys.readouterr().err


def _env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def test_allocator_slack_follows_the_malloc_jobs_run_on(wide_model, toy_dataset, tmp_path, monkeypatch):
    # glibc keeps freed activations and DoRA's rebuilt weights resident; tcmalloc reuses them.
    import jobs.estimate.estimator

    def slack(preloaded: bool):
        monkeypatch.setattr(jobs.estimate.estimator, "preload_env", lambda: {"LD_PRELOAD": "x"} if preloaded else {})
        return estimate(spec(wide_model, toy_dataset, tmp_path / "run", {"name": "dora"}), "cpu")["details"]

    glibc, tcmalloc = slack(False), slack(True)
    assert glibc["weights_rebuilt_per_forward"] > 0 and glibc["allocator_slack"] > 0
    assert tcmalloc["allocator_slack"] == 0

    # On a reusing malloc the gradients take over the memory backward frees from activations.
    def train_parts(preloaded: bool):
        monkeypatch.setattr(jobs.estimate.estimator, "preload_env", lambda: {"LD_PRELOAD": "x"} if preloaded else {})
        return estimate(spec(wide_model, toy_dataset, tmp_path / "run", {"name": "full"}), "cpu")["breakdown"]

    summed, reused = train_parts(False), train_parts(True)
    assert reused["activations"] == summed["activations"] > 0
    assert reused["gradients"] == max(0, summed["gradients"] - summed["activations"])


@pytest.mark.parametrize("lean", [True, False])
def test_under_checkpointing_a_block_keeps_only_its_input(lean, tiny_model, toy_dataset, tmp_path):
    # Measured, not assumed: the probe runs its blocks checkpointed, as training does, and weighs
    # what is still alive when the forward ends. A block should then hold its input and nothing
    # else, whatever the lean norms and MLP register for rebuilding their outputs.
    from transformers import AutoConfig

    from jobs.training import models
    from jobs.estimate.footprint import first_batch, probe_saved

    s = spec(tiny_model, toy_dataset, tmp_path / "run", gradient_checkpointing=True, lean_activations=lean)
    method, mcfg = s.method_config()
    src = models.resolve(s.model)
    batch, tokenizer = first_batch(s, src)
    config = AutoConfig.from_pretrained(src.path)
    saved = probe_saved(config, s, method, mcfg, batch, tokenizer)
    assert saved.checkpointed_per_block == batch.rows * batch.length * config.hidden_size * 4
    assert saved.checkpointed_per_block < saved.per_block
    plain = probe_saved(config, spec(tiny_model, toy_dataset, tmp_path / "run", lean_activations=lean), method, mcfg,
                        batch, tokenizer)
    assert plain.checkpointed_per_block is None and plain.per_block == pytest.approx(saved.per_block, rel=0.01)


def test_quantizing_copies_the_kept_base_beside_the_mapped_file(toy_dataset, tmp_path):
    # After quantizing, the loop copies the tensors the method kept (embeddings, norms) off the
    # memory-mapped file, which stays mapped until the last copy exists: on the CPU the apply
    # phase holds both. A config whose tied embedding outweighs its layers makes that copy show.
    from transformers import LlamaConfig

    folder = tmp_path / "big-vocab"
    tok = tiny_tokenizer(folder)
    LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                tie_word_embeddings=True).save_pretrained(folder)
    embedding = 32000 * 64 * 4

    def extra(device):  # what quantizing adds to the apply phase's weights
        def weights(method):
            return estimate(spec(folder, toy_dataset, tmp_path / "run", {"name": method}),
                            device)["phase_breakdowns"]["apply"]["weights"]
        return weights("qlora") - weights("lora")

    assert extra("cpu") >= embedding > extra("cuda")


# --- per rank, under the chosen engine (jobs/estimate/sharding.py) -------------------------------

def _one_process() -> dict:
    """A one-process estimate's phases, in bytes (made-up sizes with distinct values)."""
    return {"train": {"weights": 1000, "trainable": 4000, "gradients": 4000, "optimizer_state": 8000,
                      "activations": 300, "logits": 50, "framework_overhead": 100},
            "apply": {"weights": 1000, "trainable": 4000, "framework_overhead": 100},
            "load": {"weights": 5001, "framework_overhead": 100}}


UNITS_ARGS = {"block_numel": 100, "block_trainable_numel": 100, "root_numel": 300, "root_trainable_numel": 300}


def test_fsdp_shards_scale_as_one_over_the_world():
    from jobs.estimate.sharding import SHARDED_PARTS, Units, gathered_bytes, per_rank

    one, units = _one_process(), Units(**UNITS_ARGS)
    for world in (2, 3, 8):
        ranked = per_rank(one, units, world=world, sharding="fsdp", trainable_bytes=4000, compute_bytes=4,
                          backward=True, all_gradients=True)
        for part, value in one["train"].items():
            expected = -(-value // world) if part in SHARDED_PARTS else value
            assert ranked["train"][part] == expected, (world, part)
        # What is gathered does not shrink with the world: a block is a block on every rank.
        assert ranked["train"]["gathered"] == gathered_bytes(units, 4, True) > 0
        # Rank 0 loads the whole base and applies the method, then makes its own shard beside it.
        assert ranked["load"] == {**one["load"], "gathered": 0}
        assert ranked["apply"] == {**one["apply"], "gathered": -(-(1000 + 4000) // world)}
        assert "save" not in ranked
        # Every rank maps the files in place: nothing loaded, then what the method made, its shard,
        # and the rows of the files it read that shard from.
        mapped = per_rank(one, units, world=world, sharding="fsdp", trainable_bytes=4000, compute_bytes=4,
                          backward=True, all_gradients=True, read_in_place=True, made_bytes=700)
        assert mapped["load"] == {**one["load"], "weights": 0, "gathered": 0}
        own = -(-(1000 + 4000) // world)
        assert mapped["apply"] == {**one["apply"], "weights": own, "trainable": 700, "gathered": own}
        assert mapped["train"] == ranked["train"]
    same = per_rank(one, units, world=1, sharding="fsdp", trainable_bytes=4000, compute_bytes=4, backward=True,
                    all_gradients=True)
    assert same["train"] == {**one["train"], "gathered": 0}


def test_on_the_cpu_rank_0_puts_the_trained_model_together_at_the_end():
    from jobs.estimate.sharding import Units, per_rank

    one = _one_process()

    def save(read_in_place, **phase):
        phases = {**one, "train": {**one["train"], **phase}}
        return per_rank(phases, Units(**UNITS_ARGS), world=2, sharding="fsdp", trainable_bytes=4000, compute_bytes=4,
                        backward=True, all_gradients=True, cpu=True, read_in_place=read_in_place)

    converted = save(False)
    # Everything gathered beside the rank's shards; the optimizer's state was let go first.
    assert converted["save"]["gathered"] == 1000 + 4000 and converted["save"]["activations"] == 0
    assert converted["save"]["optimizer_state"] == 0 and converted["train"]["optimizer_state"] == 4000
    assert converted["save"]["weights"] == converted["train"]["weights"] == 500
    # Read in place: only the trained tensors are gathered ...
    assert save(True)["save"]["gathered"] == 4000 and save(True)["save"]["weights"] == 500
    # ... and where the frozen base is the bigger part, its files mapped again beside them count.
    big_base = save(True, weights=40000)["save"]
    assert big_base["weights"] == 40000 and big_base["trainable"] == 4000 and big_base["gathered"] == 0


def test_gathered_units_count_prefetch_and_unsharded_gradients():
    from jobs.estimate.sharding import Units, gathered_bytes

    frozen = Units(block_numel=100, root_numel=300)
    # Forward only: the root, and one block computing while the next is prefetched; bf16 gathers halve it.
    assert gathered_bytes(frozen, 4, backward=False) == 4 * 300 + 2 * 4 * 100
    assert gathered_bytes(frozen, 2, backward=False) == 2 * 300 + 2 * 2 * 100
    # Backward adds each trained unit's unsharded gradient (compute dtype) and its fp32 reduce buffer.
    trained = Units(**UNITS_ARGS)
    assert gathered_bytes(trained, 2, backward=True) == gathered_bytes(trained, 2, False) + (300 + 100) * (2 + 4)


def test_ddp_ranks_hold_every_gradient_in_buckets_from_the_start():
    # One process on a reusing malloc lets gradients take over the memory backward frees from
    # activations (here 4000 of gradients counted as 1000); DDP's buckets exist from the wrap on.
    from jobs.estimate.sharding import Units, per_rank

    one = {**_one_process(), "train": {**_one_process()["train"], "gradients": 1000}}

    def train(world, **kw):
        args = {"trainable_bytes": 4000, "compute_bytes": 4, "backward": True, "all_gradients": True,
                "gradient_bytes": 4000, **kw}
        return per_rank(one, Units(**UNITS_ARGS), world=world, sharding="none", **args)["train"]

    assert train(2) == {**one["train"], "gradients": 4000, "gathered": 0}
    assert train(8) == train(2)   # every replica holds the same, however many there are
    # Each gradient is made on its own before it is copied into its bucket: one more beside them.
    assert train(2, ddp_transient_bytes=700)["gradients"] == 4000 + 700
    assert train(1, ddp_transient_bytes=700)["gradients"] == 1000  # one process has no buckets
    assert train(1)["gradients"] == 1000
    # A rule that never holds all gradients at once (LOMO, MeZO) fills no buckets.
    assert train(2, all_gradients=False)["gradients"] == 1000
    assert train(2, backward=False)["gradients"] == 1000
    with pytest.raises(ValueError, match="sharding"):
        per_rank(one, Units(), world=2, sharding="zero3", trainable_bytes=0, compute_bytes=4, backward=True,
                 all_gradients=True)


def test_fsdp_rank_is_below_a_ddp_rank_for_full_finetuning(wide_model, toy_dataset, tmp_path, monkeypatch):
    # On a reusing malloc (what jobs run on where it is installed): on glibc, a model this small
    # keeps so much of FSDP2's per-step gathering that sharding saves nothing (see the next test).
    import jobs.estimate.estimator

    monkeypatch.setattr(jobs.estimate.estimator, "preload_env", lambda: {"LD_PRELOAD": "x"})

    def result(devices, sharding, method="full"):
        return estimate(spec(wide_model, toy_dataset, tmp_path / "run", {"name": method}, devices=devices,
                             sharding=sharding), "cpu")

    single, ddp, fsdp = result(1, "none"), result(2, "none"), result(2, "fsdp")
    assert fsdp["total_bytes"] < single["total_bytes"] <= ddp["total_bytes"]
    assert fsdp["breakdown"]["optimizer_state"] * 2 == pytest.approx(ddp["breakdown"]["optimizer_state"], abs=2)
    assert fsdp["breakdown"]["gathered"] > 0 == ddp["breakdown"]["gathered"]
    assert fsdp["world_size"] == 2 and fsdp["per"] == "rank" and fsdp["node_bytes"] == 2 * fsdp["total_bytes"]
    assert any("FSDP2" in note for note in fsdp["assumptions"])
    # nnodes counts too: 2 devices on each of 2 machines shard four ways.
    four = estimate(spec(wide_model, toy_dataset, tmp_path / "run", {"name": "full"}, devices=2, sharding="fsdp",
                         nnodes=2, rdzv_endpoint="node0:29500"), "cpu")
    assert four["world_size"] == 4 and four["total_bytes"] < fsdp["total_bytes"]
    assert four["node_bytes"] == 2 * four["total_bytes"]


def test_gathered_units_are_the_models_own(wide_model, toy_dataset, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from jobs.estimate.footprint import count

    s = spec(wide_model, toy_dataset, tmp_path / "run", {"name": "full"})
    method, mcfg = s.method_config()
    config = AutoConfig.from_pretrained(wide_model)
    units = count(config, s, method, mcfg, torch.float32).units
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(wide_model))
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert units.block_numel == units.block_trainable_numel == layer
    assert units.root_numel == units.root_trainable_numel == sum(p.numel() for p in model.parameters()) - 8 * layer
    lora = count(config, s, *spec(wide_model, toy_dataset, tmp_path / "run", {"name": "lora"}).method_config(),
                 torch.float32).units
    assert lora.root_trainable_numel == 0 and lora.block_trainable_numel == lora.block_numel - layer > 0


@pytest.mark.parametrize("device, verdict", [("cpu", "does not fit"), ("cuda:0", "fits")])
@pytest.mark.slow
def test_verdict_is_per_device(device, verdict, studio_home, tiny_model, monkeypatch):
    # One rank's peak is 60 of a device's 100: a GPU holds one rank, a CPU's RAM both of this machine's.
    from studio.ui import train
    from studio.ui.common import Studio

    answer = {"available": True, "total_bytes": 60, "node_bytes": 120, "breakdown": {"weights": 60},
              "peak_phase": "train", "assumptions": []}
    monkeypatch.setattr(train, "estimate_for", lambda studio, data, device: answer)
    monkeypatch.setattr(train, "device_capacity", lambda studio, device: ("test device", 100, device))
    spec_data = {"model": str(tiny_model), "dataset": {"path": "demo"}, "method": {"name": "lora"},
                 "training": {"devices": 2}}
    result = train.check(Studio.at(studio_home, str(tiny_model)), spec_data, device)
    assert result["verdict"] == verdict and result["total_bytes"] == 60


def test_fsdp_gathering_is_churn_for_the_cpu_malloc(wide_model, toy_dataset, tmp_path, monkeypatch):
    # glibc keeps a share of what FSDP2 gathers and frees every step; a reusing malloc keeps none.
    import jobs.estimate.estimator
    from jobs.estimate.sharding import Units, step_churn

    units = Units(block_numel=100, block_trainable_numel=100, root_numel=300, root_trainable_numel=300)
    assert step_churn(units, 8, 4, backward=False) == 8 * 400 + 1200
    assert step_churn(units, 8, 4, backward=True) == 8 * (800 + 800) + 1200 + 2400

    def slack(preloaded: bool, sharding: str) -> int:
        monkeypatch.setattr(jobs.estimate.estimator, "preload_env", lambda: {"LD_PRELOAD": "x"} if preloaded else {})
        return estimate(spec(wide_model, toy_dataset, tmp_path / "run", {"name": "full"}, devices=2,
                             sharding=sharding), "cpu")["details"]["allocator_slack"]

    assert slack(False, "fsdp") > slack(False, "none")
    assert slack(True, "fsdp") == slack(True, "none") == 0
