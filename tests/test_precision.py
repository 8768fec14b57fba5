"""Training in bf16 (autocast with a bf16 frozen base) through the real loop, for every method.

CPUs with AMX multiply bf16 matrices several times faster than fp32 ones, so the studio
trains in bf16 there by default (``precision: auto``); every method and update rule must
therefore work under bf16 autocast on the CPU as well as on a GPU.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from adapters import METHODS
from jobs.training.loss import attention_kernels
from jobs.spec import parse_spec
from jobs.training.recipe import pick_precision, train
from helpers import make_spec

RULES = ["adamw", "sgd", "adamw_8bit", "paged_adamw_8bit", "lomo", "adalomo", "mezo"]


def _train_bf16(tiny_model, toy_dataset, tmp_path, method: dict, optimizer: dict) -> dict:
    spec = make_spec(tiny_model, toy_dataset, tmp_path / "run", method=method, optimizer=optimizer,
                     max_steps=4, precision="bf16", exact_match_rows=0, eval_samples=0)
    return train(parse_spec(spec))


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
    check = load_run(tmp_path / "run").check
    assert check["max_abs_logit_diff_vs_trained"] <= check["allowed_diff_vs_trained"]


def test_auto_precision_follows_the_hardware(monkeypatch):
    import jobs.training.recipe as jt

    cpu = torch.device("cpu")
    monkeypatch.setattr(jt, "cpu_has_bf16_matmul", lambda: True)
    assert pick_precision("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(jt, "cpu_has_bf16_matmul", lambda: False)
    assert pick_precision("auto", cpu) == torch.float32
    assert pick_precision("fp32", cpu) == torch.float32 and pick_precision("bf16", cpu) == torch.bfloat16


def test_auto_precision_can_be_told_there_is_no_amx(monkeypatch):
    """CI's second leg caps the kernels below AMX; auto must then pick fp32 even where the tiles exist."""
    import jobs.training.recipe as jt

    cpu = torch.device("cpu")
    for var in ("STUDIO_CPU_BF16", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert pick_precision("auto", cpu) == torch.bfloat16
    for var, value in (("ONEDNN_MAX_CPU_ISA", "AVX2"), ("ATEN_CPU_CAPABILITY", "avx2"), ("STUDIO_CPU_BF16", "0")):
        monkeypatch.setenv(var, value)
        assert pick_precision("auto", cpu) == torch.float32, var
        assert pick_precision("bf16", cpu) == torch.bfloat16  # an explicit choice stays
        monkeypatch.delenv(var)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setenv("STUDIO_CPU_BF16", "1")
    assert pick_precision("auto", cpu) == torch.bfloat16
    assert jt.cpu_bf16_override() is True


def test_short_rows_use_the_plain_attention_kernel_only_under_low_precision_autocast():
    cpu = torch.device("cpu")

    def plain(seq_len: int, autocast: bool) -> bool:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return not isinstance(attention_kernels(cpu, seq_len), contextlib.nullcontext)

    assert plain(64, autocast=True)
    assert not plain(64, autocast=False) and not plain(2048, autocast=True)
