"""Training in bf16 through the real loop, for every method and update rule, and how ``auto`` picks it.

CPUs that multiply bf16 natively (AMX, avx512_bf16) do it several times faster than fp32, so
``precision: auto`` trains in bf16 where it measures so (jobs/training/precision.py); every
method and update rule must therefore work under bf16 on the CPU as well as on a GPU, as mixed
precision: autocast computes in bf16 over a frozen base that may be bf16, while the trained
tensors, the update rule's state and the loss stay fp32.
"""
from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from adapters import METHODS
from jobs.training.fused import attention_kernels
from jobs.spec import parse_spec
from adapters.core.errors import StudioError
from jobs.training.precision import CACHE_FILE, choose_precision
from jobs.training.recipe import train
from helpers import make_spec

RULES = ["adamw", "sgd", "adamw_8bit", "paged_adamw_8bit", "lomo", "adalomo", "mezo"]


def _train_bf16(tiny_model, toy_dataset, tmp_path, method: dict, optimizer: dict) -> dict:
    spec = make_spec(tiny_model, toy_dataset, tmp_path / "run", method=method, optimizer=optimizer,
                     max_steps=4, precision="bf16", exact_match_rows=0, eval_samples=0)
    return train(parse_spec(spec))


def _assert_mixed_precision(run: dict, run_dir) -> None:
    """Trained tensors and update-rule state as the run's last checkpoint holds them: fp32 (or the
    8-bit rules' integer codes), never bf16; the loss as logged is a float."""
    from jobs.training import checkpoint

    assert run["precision"] == {"dtype": "bfloat16", "reason": "asked for bf16", "fp32_gflops": None,
                                "bf16_gflops": None}
    trained, state, _ = checkpoint.load(checkpoint.latest_valid(run_dir))

    def floats(obj, path=""):
        if isinstance(obj, torch.Tensor):
            yield path, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from floats(v, f"{path}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from floats(v, f"{path}/{i}")
    assert trained and {str(t.dtype) for t in trained.values()} == {"torch.float32"}
    low = [(name, t.dtype) for name, t in floats(state) if t.is_floating_point() and t.dtype != torch.float32]
    assert not low, low


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains_in_bf16_and_reloads_as_it_trained(name, tiny_model, toy_dataset, tmp_path, studio_home):
    """The quantizing methods (qlora, loftq, qalora, peqa) quantize the bf16 base here: the reload
    must restore those very layers, not re-quantize the fp32 one."""
    from jobs.training import fingerprint
    from jobs.results.inference import load_run

    lr = METHODS.get(name).suggested_lr * 30
    run = _train_bf16(tiny_model, toy_dataset, tmp_path, {"name": name}, {"name": "adamw", "lr": lr})
    assert run["status"] == "completed", run["error"]
    assert run["dtype"] == "bfloat16"
    assert math.isfinite(run["metrics"]["train_loss"]) and math.isfinite(run["metrics"]["eval_loss"])
    _assert_mixed_precision(run, tmp_path / "run")
    recorded = fingerprint.read(tmp_path / "run")
    assert recorded.meta["trained_dtype"] == "bfloat16" and torch.isfinite(recorded.logits).all()
    check = load_run(tmp_path / "run").check  # raises past the method's tolerance
    assert 0 <= check["max_abs_logit_diff_vs_trained"] <= check["allowed_diff_vs_trained"]


@pytest.mark.parametrize("rule", RULES)
def test_every_update_rule_steps_in_bf16_and_reloads_as_it_trained(rule, tiny_model, toy_dataset, tmp_path,
                                                                   studio_home):
    from jobs.results.inference import load_run

    method = {"name": "full"} if rule in ("lomo", "adalomo") else {"name": "lora", "r": 4}
    run = _train_bf16(tiny_model, toy_dataset, tmp_path, method, {"name": rule})
    assert run["status"] == "completed", run["error"]
    assert math.isfinite(run["metrics"]["train_loss"])
    _assert_mixed_precision(run, tmp_path / "run")
    check = load_run(tmp_path / "run").check
    assert check["max_abs_logit_diff_vs_trained"] <= check["allowed_diff_vs_trained"]


CPU = torch.device("cpu")
CAPS = ("STUDIO_CPU_BF16", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


@pytest.fixture()
def measured(monkeypatch):
    """No environment switch, no per-process memory of earlier measurements, and a measurement
    that is counted and returns ``measured.rates`` instead of timing anything."""
    import jobs.training.precision as jt

    for var in CAPS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(jt, "_MEASURED", {})

    class Fake:
        rates = (225.0, 980.0)
        calls: list = []

        def __call__(self, shapes):
            self.calls.append(shapes)
            return self.rates
    return Fake()


@pytest.mark.parametrize("fp32, bf16, want", [(225.0, 980.0, torch.bfloat16),   # avx512_bf16: 4.4x
                                              (200.0, 1300.0, torch.bfloat16),  # AMX: 6.5x
                                              (200.0, 250.0, torch.float32),    # 1.25x: not worth it
                                              (200.0, 18.0, torch.float32)])    # emulated bf16
def test_auto_on_the_cpu_takes_bf16_only_where_it_measures_clearly_faster(measured, tmp_path, fp32, bf16, want):
    measured.rates = (fp32, bf16)
    choice = choose_precision("auto", CPU, measure=measured, home=tmp_path)
    assert choice.dtype == want and (choice.fp32_gflops, choice.bf16_gflops) == (fp32, bf16)
    assert choice.reason.startswith("measured: bf16") and f"{bf16:.0f} vs {fp32:.0f} GFLOP/s" in choice.reason
    assert choice.record()["dtype"] == str(want).removeprefix("torch.")


def test_explicit_precisions_and_the_gpu_are_not_measured(measured, tmp_path):
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        choice = choose_precision(name, CPU, measure=measured, home=tmp_path)
        assert (choice.dtype, choice.reason) == (dtype, f"asked for {name}")
    with pytest.raises(StudioError, match="needs a GPU"):
        choose_precision("fp16", CPU, measure=measured, home=tmp_path)
    assert measured.calls == [] and not (tmp_path / CACHE_FILE).exists()


def test_the_measurement_is_kept_per_cpu_and_torch_version(measured, tmp_path, monkeypatch):
    import jobs.training.precision as jt

    shapes = jt.layer_shapes({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                              "num_key_value_heads": 2})
    assert shapes == ((512, 64, 64), (512, 64, 32), (512, 64, 128), (512, 128, 64))
    first = choose_precision("auto", CPU, shapes, measure=measured, home=tmp_path)
    assert measured.calls == [shapes]
    jt._MEASURED.clear()  # a new process: the file answers
    assert choose_precision("auto", CPU, shapes, measure=measured, home=tmp_path) == first
    assert len(measured.calls) == 1
    entries = json.loads((tmp_path / CACHE_FILE).read_text())["entries"]
    assert list(entries) == [jt.cache_key(shapes)]
    assert entries[jt.cache_key(shapes)]["fp32_gflops"] == 225.0 and "threads" in entries[jt.cache_key(shapes)]
    assert not [p for p in tmp_path.iterdir() if p.name != CACHE_FILE]  # no temporary file left behind

    # Another torch, another CPU, kernels capped elsewhere, other shapes: each measured once more, all kept.
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    choose_precision("auto", CPU, shapes, measure=measured, home=tmp_path)
    monkeypatch.setattr(jt, "_cpu_identity", lambda: ("Some Other CPU", "fpu sse2 avx512_bf16"))
    choose_precision("auto", CPU, shapes, measure=measured, home=tmp_path)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 instructions allowed: still measured
    choose_precision("auto", CPU, shapes, measure=measured, home=tmp_path)
    choose_precision("auto", CPU, None, measure=measured, home=tmp_path)
    assert len(measured.calls) == 5 and measured.calls[-1] == jt.layer_shapes({})
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())["entries"]) == 5


@pytest.mark.parametrize("content", ["{not json", "[]", '{"entries": []}', {"fp32_gflops": "fast", "bf16_gflops": 9},
                                     {"fp32_gflops": 0, "bf16_gflops": 980.0}, {"fp32_gflops": 225.0}])
def test_a_damaged_cache_is_measured_again_not_a_crash(measured, tmp_path, content):
    import jobs.training.precision as jt

    key = jt.cache_key(jt.layer_shapes({}))
    if isinstance(content, dict):  # an entry of this very key with unusable rates
        content = json.dumps({"entries": {key: content}})
    (tmp_path / CACHE_FILE).write_text(content)
    assert choose_precision("auto", CPU, measure=measured, home=tmp_path).dtype == torch.bfloat16
    assert len(measured.calls) == 1
    assert json.loads((tmp_path / CACHE_FILE).read_text())["entries"][key]["bf16_gflops"] == 980.0


@pytest.mark.parametrize("var, value, want", [("STUDIO_CPU_BF16", "0", torch.float32),
                                              ("STUDIO_CPU_BF16", "1", torch.bfloat16),
                                              ("ONEDNN_MAX_CPU_ISA", "AVX2", torch.float32),
                                              ("ATEN_CPU_CAPABILITY", "avx2", torch.float32)])
def test_the_environment_decides_outright(measured, tmp_path, monkeypatch, var, value, want):
    """CI's second leg caps the kernels below bf16 instructions: auto must pick fp32 there, unmeasured."""
    measured.rates = (100.0, 10.0) if want == torch.bfloat16 else (100.0, 1000.0)  # the opposite answer
    monkeypatch.setenv(var, value)
    choice = choose_precision("auto", CPU, measure=measured, home=tmp_path)
    assert choice.dtype == want and choice.reason.startswith(f"{var}={value}")
    assert choice.fp32_gflops is None and measured.calls == []
    assert choose_precision("bf16", CPU, measure=measured, home=tmp_path).dtype == torch.bfloat16  # asked: stays


def test_a_run_records_its_precision_and_why(measured, tiny_model, toy_dataset, tmp_path, studio_home, monkeypatch):
    """``auto`` through the real loop, with the measurement replaced: run.json names the dtype, the
    reason and both rates, and the run trains in bf16 (tiny shapes, whatever this CPU would measure)."""
    import jobs.training.precision as jt

    monkeypatch.setattr(jt, "measure_rates", measured)
    spec = make_spec(tiny_model, toy_dataset, tmp_path / "run", max_steps=2, precision="auto", exact_match_rows=0,
                     eval_samples=0)
    run = train(parse_spec(spec))
    assert run["status"] == "completed" and run["dtype"] == "bfloat16"
    assert run["precision"] == {"dtype": "bfloat16", "reason": "measured: bf16 4.4x fp32 (980 vs 225 GFLOP/s)",
                                "fp32_gflops": 225.0, "bf16_gflops": 980.0}
    assert measured.calls == [jt.source_shapes(jt_source(tiny_model))]  # the model's own shapes


def jt_source(model):
    from jobs.training import models

    return models.resolve(str(model))


def test_short_rows_use_the_plain_attention_kernel_only_under_low_precision_autocast():
    cpu = torch.device("cpu")

    def plain(seq_len: int, autocast: bool) -> bool:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return not isinstance(attention_kernels(cpu, seq_len), contextlib.nullcontext)

    assert plain(64, autocast=True)
    assert not plain(64, autocast=False) and not plain(2048, autocast=True)
