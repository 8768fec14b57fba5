"""The scale benchmark: both systems, both methods, on a tiny model; its summary, finding and report.

No assertion here depends on how fast this machine is.
"""
from __future__ import annotations

import json

import pytest

from bench import scale
from bench import report
from bench.report import write_report
from helpers import toy_rows, write_jsonl

# The benchmarks' own machinery (run once per CI run, not per kernel path: .ci/run).
pytestmark = pytest.mark.bench


def test_scale_runs_ours_and_trainer_for_lora_and_qlora(tiny_model, tmp_path, results):
    rows = toy_rows(24)
    base = {"model": "replaced", "dataset": {"path": str(write_jsonl(tmp_path / "train.jsonl", rows))},
            "method": {"name": "lora", "r": 4, "target_modules": "all-linear"},
            "optimizer": {"name": "adamw", "lr": 1e-2}, "training": {"max_steps": 3, "max_seq_len": 64}}
    out = scale.run(steps=3, repeats=1, spec=base, folders={"tiny": str(tiny_model)}, results_dir=results)
    assert out["failures"] == [] and out["settings"]["steps"] == {"tiny": 3} and out["rows"][0]["steps"] == 3
    assert [(r["method"], r["system"]) for r in out["runs"]] == [
        ("lora", "ours"), ("lora", "trainer"), ("qlora", "trainer"), ("qlora", "ours")]  # alternating order
    for r in out["runs"]:
        assert r["steps"] == 3 and r["measured_steps"] == 2 and r["trained_tokens_per_second"] > 0
        assert r["allocator"] == out["runs"][0]["allocator"]  # both systems on the same allocator
    for row in out["rows"]:
        # the same adapter trains on both sides, on a model of the counted size
        assert row["ours"]["trainable_params"] == row["trainer"]["trainable_params"] > 0
        assert row["parameters"] == out["models"]["tiny"]["parameters"] > row["ours"]["trainable_params"]
        assert row["speedup_vs_trainer"] > 0 and row["memory_ratio_vs_trainer"] > 0
        assert row["projection_speedup"] >= 1.0 and 0 < row["head_share"] < 1
    quant = out["settings"]["trainer_qlora"]["BitsAndBytesConfig"]
    assert quant["bnb_4bit_quant_type"] == "nf4" and quant["bnb_4bit_compute_dtype"] == out["dtype"]
    saved = json.loads((results / "scale.json").read_text())
    assert saved["benchmark"] == "scale" and saved["finding"] == out["finding"]


def _runs(size: str, parameters: int, method: str, ours: float, trainer: float, ours_mem: int, trainer_mem: int):
    return [{"size": size, "method": method, "system": "ours", "repeat": 1, "parameters": parameters,
             "trained_tokens_per_second": ours, "peak_memory_bytes": ours_mem},
            {"size": size, "method": method, "system": "trainer", "repeat": 1, "parameters": parameters,
             "trained_tokens_per_second": trainer, "peak_memory_bytes": trainer_mem}]


def test_summary_trend_and_finding_follow_the_numbers():
    models = {"s": {"parameters": 100}, "m": {"parameters": 500}, "l": {"parameters": 1500}}
    runs = (_runs("s", 100, "lora", 30, 20, 6, 10) + _runs("m", 500, "lora", 40, 20, 6, 10)
            + _runs("l", 1500, "lora", 60, 20, 6, 10)                        # speedup 1.5 -> 3: grows
            # speedup 2 -> 2.1: holds; memory ratio 0.5 -> 0.9: the memory advantage shrinks
            + _runs("s", 100, "qlora", 20, 10, 5, 10) + _runs("l", 1500, "qlora", 21, 10, 9, 10))
    runs += [{"size": "m", "method": "qlora", "system": "ours", "repeat": 1, "parameters": 500,
              "trained_tokens_per_second": 5, "peak_memory_bytes": 5},
             {"size": "m", "method": "qlora", "system": "trainer", "repeat": 1, "parameters": 500,
              "error": "MemoryError"}]
    rows = scale.summarise(runs, ("s", "m", "l"), ("lora", "qlora"), models)
    by = {(r["size"], r["method"]): r for r in rows}
    assert by["m", "lora"]["speedup_vs_trainer"] == pytest.approx(2.0)
    assert by["s", "qlora"]["memory_ratio_vs_trainer"] == pytest.approx(0.5)
    failed = by["m", "qlora"]
    assert failed["speedup_vs_trainer"] is None and failed["errors"] == {"trainer": "MemoryError"}
    assert failed["ours"]["trained_tokens_per_second"] == 5  # the side that ran keeps its numbers

    lora, qlora = scale.trends(rows, "lora"), scale.trends(rows, "qlora")
    assert lora["speedup_vs_trainer"]["trend"] == "grows" and lora["memory_ratio_vs_trainer"]["trend"] == "holds"
    assert qlora["sizes"] == ["s", "l"]
    assert qlora["speedup_vs_trainer"]["trend"] == "holds" and qlora["memory_ratio_vs_trainer"]["trend"] == "shrinks"
    text = scale.finding(rows)
    assert "LoRA: the speed advantage grows" in text and "1.50x at 100," in text
    assert "QLoRA: the speed advantage holds" in text and "memory advantage shrinks" in text
    assert "no ratio for m" in text and "largest at" not in text and "Trainer was the faster" not in text
    peaked = scale.summarise(_runs("s", 100, "lora", 30, 20, 6, 10) + _runs("m", 500, "lora", 60, 20, 6, 10)
                             + _runs("l", 1500, "lora", 31, 20, 6, 10), ("s", "m", "l"), ("lora",), models)
    assert "holds (within 10%) with size" in scale.finding(peaked) and "largest at m" in scale.finding(peaked)
    slower = scale.summarise(_runs("s", 100, "lora", 18, 20, 6, 10) + _runs("l", 1500, "lora", 30, 20, 6, 10),
                             ("s", "l"), ("lora",), models)
    assert "grows" in scale.finding(slower) and "below 1x Trainer was the faster" in scale.finding(slower)


def test_a_size_whose_runs_overlap_is_a_tie_and_ties_everywhere_claim_no_trend():
    models = {"s": {"parameters": 100}, "l": {"parameters": 1500}}
    overlap = (_runs("s", 100, "lora", 20, 18, 6, 10) + _runs("s", 100, "lora", 26, 27, 6, 10)
               + _runs("l", 1500, "lora", 30, 26, 6, 10) + _runs("l", 1500, "lora", 25, 26, 6, 10))
    rows = scale.summarise(overlap, ("s", "l"), ("lora",), models)
    assert all(r["speed_tie"] for r in rows) and rows[0]["speed_range"] == pytest.approx([20 / 27, 26 / 18])
    text = scale.finding(rows)
    assert "tie on speed at every size" in text and "grows" not in text and "memory advantage holds" in text
    assert report._scale_range(rows[0]) == " (0.74-1.44) tie"  # the report's speedup cell
    apart = scale.summarise(_runs("s", 100, "lora", 20, 18, 6, 10) + _runs("s", 100, "lora", 21, 20.5, 6, 10)
                            + _runs("l", 1500, "lora", 40, 20, 6, 10) + _runs("l", 1500, "lora", 42, 21, 6, 10),
                            ("s", "l"), ("lora",), models)
    assert [r["speed_tie"] for r in apart] == [True, False]
    assert "grows" in scale.finding(apart) and "a tie at s" in scale.finding(apart)
    single = scale.summarise(_runs("s", 100, "lora", 20, 18, 6, 10), ("s",), ("lora",), {"s": {"parameters": 100}})
    assert single[0]["speed_tie"] is None  # one run per system: no spread, so no verdict


def test_load_note_only_when_the_machine_was_shared():
    runs = [{"load_average": [1.5, 1.0, 1.0]}, {"load_average": [2.5, 1.0, 1.0]}, {"error": "x"}]
    assert "up to 2.5 on 2 cores" in scale.load_note(runs, 2)
    assert scale.load_note(runs, 4) is None and scale.load_note([], 2) is None


def test_finding_says_when_too_few_sizes_finished():
    rows = scale.summarise(_runs("s", 100, "lora", 30, 20, 6, 10), ("s",), ("lora",), {"s": {"parameters": 100}})
    assert "too few sizes" in scale.finding(rows)


def test_report_has_the_scale_table_finding_and_plot(tmp_path):
    models = {"s": {"parameters": 135_000_000}, "l": {"parameters": 1_500_000_000}}
    runs = (_runs("s", 135_000_000, "lora", 30, 20, 2 ** 30, 2 ** 31)
            + _runs("l", 1_500_000_000, "lora", 3, 2, 2 ** 32, 2 ** 33))
    runs.append({"size": "l", "method": "qlora", "system": "trainer", "repeat": 1, "error": "bitsandbytes missing"})
    rows = scale.summarise(runs, ("s", "l"), ("lora", "qlora"), models)
    data = {"benchmark": "scale", "machine": {"cpu": "Test CPU", "date": "2025-01-01", "command": "python -m bench"},
            "device": "cpu", "device_name": "Test CPU", "dtype": "float32",
            "settings": {"steps": {"s": 5, "l": 3}, "repeats": 1, "trend_tolerance": scale.TREND_TOLERANCE,
                         "spec": {"method": {"name": "lora", "r": 8}, "training": {"batch_size": 4}}},
            "rows": rows, "finding": scale.finding(rows)}
    text = write_report({"scale": data}, tmp_path).read_text()
    assert "## Against Trainer by model size" in text and data["finding"] in text
    assert "| l | 1500.00 M | qlora | - |" in text and "trainer: bitsandbytes missing" in text
    assert "1.50x" in text
    pytest.importorskip("matplotlib")
    assert (tmp_path / "scale.png").stat().st_size > 0
