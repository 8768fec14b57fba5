"""Smoke tests of the benchmark code paths on a tiny model: they run, count alike and write their files.

No assertion here depends on how fast this machine is.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import bench.common
from bench import ab, efficiency, quality, speed
from bench.__main__ import main
from bench.report import write_report
from helpers import ROOT, toy_rows, write_jsonl

# The benchmarks' own machinery (run once per CI run, not per kernel path: .ci/run).
pytestmark = pytest.mark.bench


@pytest.fixture()
def tiny_spec(tiny_model, tmp_path) -> dict:
    rows = toy_rows(40)
    return {"model": str(tiny_model),
            "dataset": {"path": str(write_jsonl(tmp_path / "train.jsonl", rows[:32])),
                        "eval_path": str(write_jsonl(tmp_path / "eval.jsonl", rows[32:]))},
            "method": {"name": "lora", "r": 4}, "optimizer": {"name": "adamw", "lr": 1e-2, "max_grad_norm": 1.0},
            "training": {"batch_size": 4, "max_seq_len": 64, "max_steps": 8, "warmup_steps": 2,
                         "max_new_tokens": 8},
            "output_dir": "unused"}


def test_speed_runs_every_system_on_equal_footing_and_counts_trained_tokens_alike(tiny_spec, results):
    # 32 rows in batches of 4: 8 steps are exactly one epoch, so every system sees every row once.
    from jobs.training.allocator import preload_env

    every = [leg.system for leg in speed.legs("cpu") if leg.system != "trl_defaults"]
    out = speed.run(spec=tiny_spec, steps=8, repeats=1, results_dir=results, long_rows=False, systems=every)
    runs = {r["system"]: r for r in out["runs"]}

    expected = {"ours", "ours_unshared", "trainer", "trainer_trained_loss", "trl"}
    # Where job processes run on another malloc than a script, the both-on-glibc pair runs beside them.
    assert set(runs) == (expected | {"ours_glibc", "trainer_glibc"} if preload_env() else expected)
    assert not out["failures"]
    for name in expected:  # the headline legs share one allocator
        assert out["allocator"][name] == out["allocator"]["ours"]
    if preload_env():
        assert out["allocator"]["ours"] == preload_env()["LD_PRELOAD"].split(":")[0]
        assert out["allocator"]["ours_glibc"] == out["allocator"]["trainer_glibc"] == "system"
        assert out["comparisons"]["both_glibc"]["memory"]["ratio"] > 0
    for name, r in runs.items():
        assert r["trained_tokens"] == runs["ours"]["trained_tokens"] > 0, name
        assert r["tokens"] == runs["ours"]["tokens"], name
        assert r["steps"] == 8 and r["measured_steps"] == 7 and r["peak_memory_bytes"] > 0
        assert r["mean_train_loss"] > 0
    for anchor in ("trainer", "trl"):
        assert out[f"speedup_vs_{anchor}"] > 0 and out[f"memory_ratio_vs_{anchor}"] > 0
    # Ours' peak is read when training ends, as the anchors' is: the fingerprint's upcast comes after.
    # Two readings of VmHWM in one process, the later may be a few pages lower: Linux keeps the
    # resident count in per-CPU batches and the high-water mark takes it as read (seen: 72 KiB).
    assert runs["ours"]["process_peak_memory_bytes"] >= runs["ours"]["peak_memory_bytes"] - (1 << 20)
    assert runs["ours"]["peak_memory_bytes"] > 0
    # The common floor (libraries and weights) is measured once; each run's working memory is above it.
    floor = out["floor"]["floor_bytes"]
    assert out["floor"]["weights_bytes"] > 0 and floor > out["floor"]["weights_bytes"]
    for r in runs.values():
        assert r["working_memory_bytes"] == r["peak_memory_bytes"] - floor
    assert out["comparisons"]["trainer"]["working_memory"]["ratio"] == pytest.approx(
        runs["ours"]["working_memory_bytes"] / runs["trainer"]["working_memory_bytes"])
    # Before any ratio: every leg's loss on our first batch, from the same known weights, is ours.
    maths = out["same_maths"]["systems"]
    assert set(maths) == set(runs)
    # The known weights matter: an anchor that ignored its adapter would be caught.
    assert maths["ours"]["known_weights_move_loss"] > 5 * out["same_maths"]["tolerance"]  # 0.9% here
    for name, c in maths.items():
        assert c["same"] and c["relative_difference"] <= 1e-3 and c["rows"] == maths["ours"]["rows"], (name, c)
        assert c["known_values"] == maths["ours"]["known_values"] > 0
    # What else separates their mean losses: Trainer's warmup starts at lr 0, ours at lr/warmup.
    assert maths["trainer"]["lr_differs_at_steps"] == maths["trl"]["lr_differs_at_steps"] == [1, 2]
    assert maths["trainer"]["lr_by_step"][0] == 0.0 and maths["ours"]["lr_by_step"][0] == pytest.approx(5e-3)
    args = out["settings"]["anchor_arguments"]
    assert args["trainer"]["per_device_train_batch_size"] == 4 and args["trainer"]["max_steps"] == 8
    assert args["trainer"]["learning_rate"] == args["trl"]["learning_rate"] == 1e-2
    assert args["trl"]["completion_only_loss"] and args["trl"]["padding_free"] is False  # no FlashAttention here
    assert args["trl"]["gradient_checkpointing"] is False  # matched to the spec, not TRL's default
    saved = json.loads((results / "speed.json").read_text())
    assert saved["benchmark"] == "speed" and saved["machine"]["versions"]["torch"] and saved["machine"]["commit"]
    assert saved["speedup_vs_trl"] == out["speedup_vs_trl"]


def test_the_default_suite_is_the_headline_and_unknown_systems_are_refused(tiny_spec, results, monkeypatch):
    ran = []
    monkeypatch.setattr(speed, "_rounds", lambda legs, spec, steps, repeats, label: ran.append(
        (label, [leg.system for leg in legs])) or [])
    monkeypatch.setattr(speed, "warm_model_cache", lambda model: {})
    monkeypatch.setattr(speed, "common_floor", lambda spec, label: {})
    monkeypatch.setattr(speed, "same_maths", lambda legs, spec, label: ran.append(
        (label + " check", [leg.system for leg in legs])) or {"systems": {}})
    out = speed.run(spec=tiny_spec, results_dir=results, name="speed-default")
    assert ran == [("speed check", ["ours", "trainer", "trl"]), ("speed", ["ours", "trainer", "trl"]),
                   ("speed-long check", ["ours", "trainer", "trl"]), ("speed-long", ["ours", "trainer", "trl"])]
    assert out["suite_seconds"] >= 0 and (results / "speed-default.json").is_file()
    with pytest.raises(SystemExit, match="unknown system"):
        speed.run(spec=tiny_spec, results_dir=results, systems=["ours", "tranier"])


def test_ab_pairs_each_change_with_the_loop_without_it_on_the_same_batches(tiny_spec, results):
    out = ab.run(spec=tiny_spec, changes=("share_prefix",), rounds=2, steps=2, results_dir=results, name="ab-tiny")
    assert not out["failures"]
    for name, c in out["changes"].items():
        assert len(c["round_speedups"]) == 2 and all(r > 0 for r in c["round_speedups"])
        assert c["speedup_min"] <= c["speedup"] <= c["speedup_max"]
        assert c["verdict"] in ("faster", "slower", "tie")
        assert len(c["losses"]["with_it"]) == len(c["losses"]["without"]) == 4
        # No change alters the maths: both variants, from one seed on the same batches, train alike.
        assert c["max_loss_difference"] < 1e-3, name
    assert out["changes"]["share_prefix"]["without"] == "no_share_prefix"
    saved = json.loads((results / "ab-tiny.json").read_text())
    assert saved["benchmark"] == "ab-tiny" and saved["machine"]["commit"] and saved["settings"]["rounds"] == 2
    report = write_report(results_dir=results).read_text()
    assert "| share_prefix |" in report and " of 2 rounds faster with it)" in report
    with pytest.raises(SystemExit, match="unknown change"):
        ab.run(spec=tiny_spec, changes=("share_prefx",), results_dir=results)


def test_ab_compiles_every_decoder_layer_and_the_compiled_model_computes_the_same(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    # aot_eager traces the graphs bench.ab's inductor compiles, forward and backward, without
    # generating kernels (inductor's code generation alone takes a minute on two cores).
    eager, compiled = (AutoModelForCausalLM.from_pretrained(tiny_model) for _ in range(2))
    assert ab.compile_layers(compiled, backend="aot_eager") == eager.config.num_hidden_layers
    ids = torch.randint(0, eager.config.vocab_size, (2, 9))
    losses = [m(input_ids=ids, labels=ids).loss for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


def test_ab_summary_calls_a_change_faster_only_when_every_round_agrees():
    def result(with_it, without):
        return {"seconds": {"with_it": with_it, "without": without}, "steps": 2, "max_loss_difference": 0.0}

    faster = ab.summarise(result([1.0, 1.0, 1.2], [1.5, 1.6, 1.3]))
    assert faster["verdict"] == "faster" and faster["speedup"] == pytest.approx(1.5)
    assert faster["seconds_per_step"]["with_it"]["median"] == pytest.approx(0.5)
    assert ab.summarise(result([1.0, 1.0], [1.2, 0.9]))["verdict"] == "tie"
    assert ab.summarise(result([2.0, 2.0], [1.0, 1.5]))["verdict"] == "slower"


def test_the_trained_positions_loss_equals_the_full_logits_loss(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[2, 9:] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    # The reference in float64 throughout (transformers' own loss upcasts logits to fp32 only).
    logits = model(input_ids=ids, attention_mask=inputs["attention_mask"]).logits[:, :-1]
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    assert speed._trained_positions_loss(model, inputs).item() == pytest.approx(full.item(), rel=1e-9)


def test_long_rows_are_conversations_of_the_same_rows(tiny_spec, tmp_path):
    spec = speed.long_rows_spec(tiny_spec, tmp_path / "long.jsonl", exchanges=4)
    rows = [json.loads(line) for line in (tmp_path / "long.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and spec["dataset"] == {"path": str(tmp_path / "long.jsonl"), "eval_path": None}
    first = rows[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"] * 4
    assert first[0]["content"] == toy_rows(1)[0]["instruction"] and first[1]["content"] == toy_rows(1)[0]["output"]
    assert spec["training"]["max_seq_len"] == speed.LONG_ROWS["max_seq_len"]


def test_speed_summary_is_a_ratio_of_medians_with_its_range_and_survives_failures():
    def r(system, tps, peak, repeat=1):
        return {"system": system, "repeat": repeat, "trained_tokens_per_second": tps, "tokens_per_second": tps,
                "trained_tokens_per_cpu_second": tps, "peak_memory_bytes": peak, "device": "cpu",
                "device_name": "x", "dtype": "float32", "memory_kind": "cpu_peak_rss"}

    s = speed.summarise([r("ours", 30, 50), r("trainer", 20, 100), r("ours", 60, 70, 2), r("trainer", 10, 100, 2),
                         r("trl", 10, 200), r("trl", 12, 220, 2), {"system": "ours", "repeat": 3, "error": "boom"}])
    assert s["speedup_vs_trainer"] == pytest.approx(45 / 15)
    assert s["memory_ratio_vs_trainer"] == pytest.approx(0.6) and not s["meets_memory_target_vs_trainer"]
    c = s["comparisons"]["trainer"]["speed"]
    assert (c["ratio_min"], c["ratio_max"]) == pytest.approx((30 / 20, 60 / 10))
    assert not c["tie"] and s["meets_speed_target_vs_trainer"]
    assert s["memory_ratio_vs_trl"] == pytest.approx(60 / 210) and s["meets_memory_target_vs_trl"]
    assert s["spread"]["ours"]["trained_tokens_per_second"] == {"median": 45, "min": 30, "max": 60, "n": 2}
    assert s["failures"] == ["ours #3: boom"]
    # Overlapping runs are a tie, and a tie never meets a target, whatever the medians say.
    tie = speed.summarise([r("ours", 30, 50), r("ours", 12, 50, 2), r("trainer", 10, 100), r("trainer", 14, 100, 2)])
    assert tie["comparisons"]["trainer"]["speed"]["tie"] and not tie["meets_speed_target_vs_trainer"]
    none = speed.summarise([r("ours", 30, 50), {"system": "trainer", "repeat": 1, "error": "out of memory"}])
    assert none["speedup_vs_trainer"] is None and none["failures"] == ["trainer #1: out of memory"]
    assert none["comparisons"]["trainer"] == {"systems": ["ours", "trainer"], "failed": True}
    # No ratio for a pair that does not compute the same loss on the same batch, or was not checked.
    from bench.same_maths import verdict

    runs = [r("ours", 30, 50), r("trainer", 20, 100), r("trl", 10, 200)]
    loss = {"ours": 2.0, "trainer": 2.0 * (1 + 0.9e-3), "trl": 2.0 * (1 + 1.1e-3)}
    maths = verdict({"systems": {k: {"loss": v, "rows": [0, 1]} for k, v in loss.items()}})
    assert [maths["systems"][k]["same"] for k in loss] == [True, True, False]
    checked = speed.summarise(runs, maths)
    assert checked["speedup_vs_trainer"] == pytest.approx(1.5) and "refused_vs_trainer" not in checked
    assert checked["speedup_vs_trl"] is None and checked["memory_ratio_vs_trl"] is None
    assert "first-batch loss" in checked["refused_vs_trl"] == checked["comparisons"]["trl"]["refused"]
    other_rows = verdict({"systems": {"ours": {"loss": 2.0, "rows": [0, 1]}, "trainer": {"loss": 2.0, "rows": [1, 2]}}})
    assert not other_rows["systems"]["trainer"]["same"]
    unchecked = speed.summarise(runs, {"error": "the check crashed"})
    assert unchecked["speedup_vs_trainer"] is None and "the check crashed" in unchecked["refused_vs_trainer"]


def test_a_bf16_suite_checks_the_maths_in_fp32_and_each_systems_rounding_against_it():
    """bf16 systems round in different places, so their losses are held to fp32's exact check and,
    as they train, to a rounding bound around our fp32 loss; either failing refuses the ratio."""
    from bench.same_maths import ROUNDING_TOLERANCE, verdict, with_rounding

    bound = ROUNDING_TOLERANCE["bfloat16"]
    rows = {"rows": [0, 1]}
    exact = verdict({"systems": {"ours": {"loss": 2.0, **rows}, "trainer": {"loss": 2.0, **rows},
                                 "trl": {"loss": 2.0 * (1 + 5e-3), **rows}}})
    low = {"systems": {"ours": {"loss": 2.0 * (1 + bound / 2), **rows}, "trainer": {"loss": 2.0 * (1 - bound / 2), **rows},
                       "trl": {"loss": 2.0, **rows}}}
    both = with_rounding(exact, low, "bfloat16")
    assert both["systems"]["ours"]["same"] and both["systems"]["trainer"]["same"]
    assert not both["systems"]["trl"]["same"] and "over 0.001" in both["systems"]["trl"]["why"]  # fp32 maths differ
    far = with_rounding(exact, {"systems": {**low["systems"], "trainer": {"loss": 2.0 * (1 + 2 * bound), **rows}}},
                        "bfloat16")
    assert not far["systems"]["trainer"]["same"] and "bfloat16 loss" in far["systems"]["trainer"]["why"]
    missing = with_rounding(exact, {"systems": {"ours": low["systems"]["ours"]}}, "bfloat16")
    assert not missing["systems"]["trainer"]["same"] and "not checked in bfloat16" in missing["systems"]["trainer"]["why"]
    summary = speed.summarise([{"system": s, "repeat": 1, "trained_tokens_per_second": 10.0,
                                "trained_tokens_per_cpu_second": 5.0, "peak_memory_bytes": 100, "device": "cpu",
                                "device_name": "cpu", "dtype": "bfloat16", "memory_kind": "rss"}
                               for s in ("ours", "trainer")],
                              far)
    assert summary["speedup_vs_trainer"] is None and "bfloat16 loss" in summary["refused_vs_trainer"]


def test_quality_ladder_has_the_base_floor_and_each_method(tiny_spec, results):
    out = quality.run(spec=tiny_spec, steps=2, eval_rows=3, methods=["lora", "ia3"], results_dir=results)
    rows = {r["method"]: r for r in out["rows"]}
    assert list(rows) == [quality.BASE, "lora", "ia3"]
    assert all(r["status"] == "ok" and r["eval_loss"] > 0 and 0 <= r["exact_match"] <= 1 for r in rows.values())
    assert rows[quality.BASE]["trainable_params"] == 0 and rows["lora"]["trainable_params"] > 0
    # Each method's rate is its suggested rate times the one factor taken from the spec.
    assert out["settings"]["lr_scale"] == pytest.approx(1e-2 / 2e-4)
    assert rows["lora"]["lr"] == pytest.approx(1e-2)
    assert json.loads((results / "quality.json").read_text())["rows"][0]["method"] == quality.BASE
    with pytest.raises(ValueError, match="no_such_method"):
        quality.run(spec=tiny_spec, steps=1, methods=["no_such_method"], results_dir=results)


def test_a_failing_run_is_reported_with_its_error_and_log(results):
    failed = bench.common.run_isolated("bench.quality", "train", {"spec": {"model": "x"}}, "broken")
    assert "error" in failed and (results / "raw" / "broken.log").is_file()
    assert quality._row(failed)["status"] == "failed"


def test_efficiency_counts_model_flops_and_measures_matmul(tiny_spec, results):
    out = efficiency.run(spec=tiny_spec, steps=3, matmul_size=128, results_dir=results, layer_seconds=0.05)
    assert out["matmul"]["rates"]["float32"]["best_flops_per_second"] > 0
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"full", "lora"}
    for r in rows.values():
        assert r["model_flops"] > 0 and 0 < r["fraction_of_peak"] and r["measured_steps"] == 2
        assert r["layer_rates"]["float32"] > 0 and r["fraction_of_layer_rate"] > 0
        # FLOPs done: the timed steps' micro-batches, padding included (one micro-batch per step here)
        assert len(r["micro_batches"]) == 2 and r["done_flops"] > 0
        assert r["done_flops"] == sum(efficiency.done_flops(r["method"], r["counts"], *b) for b in r["micro_batches"])
    counts = rows["full"]["counts"]
    assert counts["adapter"] == 0 and rows["lora"]["counts"]["adapter"] == rows["lora"]["trainable_params"] > 0
    assert counts["body"] + counts["head"] <= counts["all"]


def test_flops_done_count_padding_and_a_shared_prefix_once():
    counts = {"body": 100, "head": 10, "adapter": 0, "layers": 2, "attention_width": 4}
    # 3 rows padded to 10: 30 positions computed; with a shared prefix of 4: 10 + 2 x 6 = 22
    assert efficiency.done_flops("full", counts, 3, 10, 0, 5) == efficiency.training_flops("full", counts, 30, 5, 3)
    assert efficiency.done_flops("full", counts, 3, 10, 4, 5) == \
        efficiency.training_flops("full", counts, 22, 5, 2.2)


def test_training_flops_follow_the_documented_formula():
    counts = {"body": 100, "head": 10, "adapter": 5, "layers": 2, "attention_width": 4}
    attention = 6 * 2 * 4 * (20 / 2) * 20  # 20 tokens in 2 rows: mean length 10
    assert efficiency.training_flops("full", counts, 20, 3, 2) == 6 * 100 * 20 + 6 * 10 * 3 + attention
    assert efficiency.training_flops("lora", counts, 20, 3, 2) == 4 * 100 * 20 + 4 * 10 * 3 + 6 * 5 * 20 + attention


def fake_results() -> dict:
    machine = {"cpu": "Test CPU", "usable_cores": 2, "ram_bytes": 8 * 2 ** 30, "gpus": [], "date": "2025-01-01",
               "versions": {"torch": "2.x"}, "command": "python -m bench", "load_average": [1.0, 1.0, 1.0]}
    run = {"tokens_per_second": 50.0, "mean_train_loss": 1.0, "load_average": [2.0, 1.0, 1.0], "device": "cpu",
           "device_name": "Test CPU", "dtype": "float32", "memory_kind": "cpu_peak_rss", "allocator": "tcmalloc"}

    def r(system, repeat, tps, peak):
        return {"system": system, "repeat": repeat, "trained_tokens_per_second": tps,
                "trained_tokens_per_cpu_second": tps / 2, "peak_memory_bytes": peak, **run}

    speed_runs = [r("ours", 1, 15.0, 0.7 * 2 ** 30), r("trainer", 1, 10.0, 2 ** 30), r("trl", 1, 16.0, 2 ** 30),
                  r("ours", 2, 15.0, 0.7 * 2 ** 30), r("trainer", 2, 10.0, 2 ** 30), r("trl", 2, 14.0, 2 ** 30)]
    return {
        "speed": {"machine": machine, **speed.summarise(speed_runs),
                  "settings": {"steps": 4, "measured_steps": 3, "repeats": 2,
                               "spec": {"model": "m", "method": {"name": "lora", "r": 8},
                                        "training": {"batch_size": 8}},
                               "systems": {"ours": {"about": "our loop"}},
                               "anchor_arguments": {"trainer": {"save_strategy": "no"}}},
                  "runs": speed_runs},
        "quality": {"machine": machine, "settings": {"steps": 4, "eval_rows": 8, "lr_scale": 5.0,
                                                     "lr_reference": "lora"},
                    "rows": [{"method": quality.BASE, "status": "ok", "eval_loss": 3.0, "exact_match": 0.0},
                             {"method": "lora", "lr": 1e-3, "status": "ok", "eval_loss": 0.5, "exact_match": 0.75,
                              "trainable_params": 2_000_000, "train_seconds": 12.0, "peak_memory_bytes": 2 ** 31},
                             {"method": "prefix", "lr": 1e-2, "status": "failed", "error": "loss became nan"}],
                    "failed": ["prefix"]},
        "efficiency": {"machine": machine, "matmul": {"size": 64, "threads": 2, "device_name": "Test CPU",
                                                      "rates": {"float32": {"best_flops_per_second": 1e11,
                                                                            "median_flops_per_second": 8e10}}},
                       "rows": [{"method": "full", "model_flops_per_second": 2e10, "fraction_of_peak": 0.2,
                                 "peak_flops_per_second": 1e11, "dtype": "float32", "flops_6nt_per_second": 3e10,
                                 "tokens_per_second": 40.0, "peak_memory_bytes": 3 * 2 ** 30}]},
        "memory": {"machine": machine, "steps": 2, "batch_size": 4, "max_seq_len": 128,
                   "inference": {"measured_peak_bytes": 2 ** 29, "predicted_bytes": 2 ** 29, "error": 0.0},
                   "runs": [{"name": "lora+adamw", "measured_peak_bytes": 2 ** 30, "predicted_bytes": 2 ** 29,
                             "error": -0.5, "trainable_params": 100}],
                   "ratios": {"full_lomo_over_full_adamw": {"value": 0.4, "target_at_most": 0.5}}},
        "ui_latency": {"machine": machine, "p95_ms": 120.5, "rows": [{"name": "load", "p95_ms": 1.5}]},
    }


def test_report_from_fake_results(tmp_path):
    path = write_report(fake_results(), tmp_path)
    text = path.read_text()
    for expected in ("speedup_vs_trainer: 1.50x", "memory_ratio_vs_trainer: 0.70x", "1.00x (0.94-1.07) tie",
                     "**not met**", "| TRL SFTTrainer |",
                     "| lora | 0.001 | 2.00 M | 0.500 | 75% |", "failed: loss became nan", "20.0%",
                     "## Memory ladder", "| lora+adamw | 1.00 GiB | 512 MiB | -50.0% |",
                     "full_lomo_over_full_adamw: 0.40 (target <= 0.5: met)", "## Ui latency", "p95_ms: 120.500",
                     "Measured 2025-01-01 on Test CPU", "`trainer` settings: `save_strategy=no`"):
        assert expected in text, expected
    assert text.index("## Speed") < text.index("## Memory") < text.index("## Quality") < text.index("## Efficiency")
    pytest.importorskip("matplotlib")
    for name in ("speed", "quality", "efficiency", "memory"):
        assert f"![{name}]({name}.png)" in text and (tmp_path / f"{name}.png").stat().st_size > 0


def test_report_without_matplotlib_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.report._pyplot", lambda: None)
    text = write_report(fake_results(), tmp_path).read_text()
    assert "matplotlib is not installed" in text and not list(tmp_path.glob("*.png"))


def test_runner_keeps_going_after_a_crash_and_writes_the_report(results, monkeypatch):
    calls = []

    def crash(full):
        raise RuntimeError("no model")

    monkeypatch.setattr(speed, "run", crash)
    monkeypatch.setattr(efficiency, "run", lambda full: calls.append(full))
    assert main(["--only", "speed", "--only", "efficiency", "--full"]) == 1
    assert calls == [True] and (results / "REPORT.md").is_file()
    assert main(["--only", "report"]) == 0


def test_peak_memory_is_the_worker_own_not_its_parent(tmp_path):
    ballast = bytearray(512 * 2 ** 20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # resident, not just reserved
    code = "import json; from bench.common import process_peak_memory; print(json.dumps(process_peak_memory('cpu')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert 0 < json.loads(out.stdout)["peak_memory_bytes"] < len(ballast)
