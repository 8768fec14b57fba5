"""`make gpu-check` (bench/gpu_check.py) where there is no GPU: it says so and exits with its own
code; its verdict, summary and judgements work on injected results; and the `cuda` marker's rule
(tests/cuda_marks.py) turns a CUDA test's skip into a failure where CUDA is present."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from helpers import ROOT

from bench import gpu_check
from bench.gpu_check import Check


def test_without_cuda_it_says_so_checks_nothing_and_exits_with_its_own_code(tmp_path):
    import os

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "out")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == gpu_check.NO_CUDA != 0, done.stderr[-2000:]
    assert "no CUDA device: nothing checked" in done.stderr
    assert not (tmp_path / "out").exists()


def junit(tmp_path, cases: list[str]) -> dict:
    body = "".join(f'<testcase classname="t" name="c{i}">{c}</testcase>' for i, c in enumerate(cases))
    skipped = sum("<skipped" in c for c in cases)
    failures = sum("<failure" in c for c in cases)
    path = tmp_path / "junit.xml"
    path.write_text(f'<testsuites><testsuite name="pytest" tests="{len(cases)}" failures="{failures}" errors="0" '
                    f'skipped="{skipped}">{body}</testsuite></testsuites>')
    return gpu_check.junit_counts(path)


def test_the_cuda_tests_fail_when_any_skips_fails_or_none_ran(tmp_path):
    assert gpu_check.judge_tests(junit(tmp_path, ["", ""]), 0).ok
    skipped = gpu_check.judge_tests(junit(tmp_path, ["", '<skipped message="no kernel"/>']), 0)
    assert not skipped.ok and "1 skipped" in skipped.detail and "t::c1" in skipped.detail
    assert not gpu_check.judge_tests(junit(tmp_path, []), 5).ok  # nothing collected
    failed = gpu_check.judge_tests(junit(tmp_path, ['<failure message="x"/>']), 1)
    assert not failed.ok and "1 failed" in failed.detail
    assert not gpu_check.judge_tests(junit(tmp_path, [""]), 2).ok  # pytest itself broke


def test_a_job_passes_only_on_cuda_with_an_estimate_near_its_peak():
    ran = {"status": "completed", "device": "cuda", "peak_memory_bytes": 1000, "losses": [2.0, 1.5]}
    near = gpu_check.judge_job("lora", ran, {"total_bytes": 1100})
    assert near.ok and near.data["error"] == pytest.approx(0.1) and "+10.0%" in near.detail
    far = gpu_check.judge_job("lora", ran, {"total_bytes": 1000 * (1 + gpu_check.ESTIMATE_TOLERANCE) + 10})
    assert not far.ok and "beyond" in far.detail
    assert not gpu_check.judge_job("qlora", {**ran, "device": "cpu"}, {"total_bytes": 1000}).ok
    assert not gpu_check.judge_job("qlora", {"error": "CUDA error: out of memory"}, {"total_bytes": 1000}).ok
    assert not gpu_check.judge_job("lora", ran, {"error": "ValueError: x"}).ok


def test_one_gpu_says_the_engines_could_not_be_checked():
    (only,) = gpu_check.check_engines(1)
    assert only.ok and only.data["not_applicable"] and "1 GPU" in only.detail


def test_summary_and_exit_code_from_injected_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "cuda_devices", lambda: (2, "NVIDIA H100 80GB HBM3"))
    monkeypatch.setattr(gpu_check, "check_cuda_tests", lambda: Check("cuda_tests", True, "3 passed"))
    monkeypatch.setattr(gpu_check, "check_jobs", lambda scratch: [Check("lora_bf16", True, "error +4.0%"),
                                                                  Check("qlora_bf16", True, "error -6.0%")])

    def broken(count):
        raise RuntimeError("NCCL error: unhandled system error")

    monkeypatch.setattr(gpu_check, "check_engines", broken)
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    md = (tmp_path / "gpu-check-NVIDIA-H100-80GB-HBM3.md").read_text()
    assert "**FAILED**: 3 of 4 checks passed" in md and "| nccl_engines | FAIL |" in md and "NCCL error" in md
    saved = json.loads((tmp_path / "gpu-check-NVIDIA-H100-80GB-HBM3.json").read_text())
    assert saved["passed"] is False and [c["ok"] for c in saved["checks"]] == [True, True, True, False]
    assert "RuntimeError" in saved["checks"][-1]["data"]["traceback"]

    monkeypatch.setattr(gpu_check, "check_engines", lambda count: [Check("nccl_none", True, "ok")])
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert "**PASSED**: 4 of 4" in (tmp_path / "gpu-check-NVIDIA-H100-80GB-HBM3.md").read_text()
    assert gpu_check.verdict([]) == 1  # no check at all is no pass


# -- the `cuda` marker -------------------------------------------------------------------------------

def item(marked: bool):
    return SimpleNamespace(get_closest_marker=lambda name: object() if marked and name == "cuda" else None)


def report(outcome: str, **extra):
    return SimpleNamespace(outcome=outcome, skipped=outcome == "skipped",
                           longrepr=("file", 1, "Skipped: no kernel") if outcome == "skipped" else None, **extra)


def test_a_cuda_test_that_skips_where_cuda_is_present_fails():
    import cuda_marks

    skipped = report("skipped")
    cuda_marks.forbid_skip(item(True), skipped, present=True)
    assert skipped.outcome == "failed" and "no kernel" in skipped.longrepr
    for marked, present, rep in [(True, False, report("skipped")), (False, True, report("skipped")),
                                 (True, True, report("skipped", wasxfail="expected")), (True, True, report("passed"))]:
        before = rep.outcome
        cuda_marks.forbid_skip(item(marked), rep, present=present)
        assert rep.outcome == before


def test_a_cuda_test_skips_only_without_cuda():
    import cuda_marks

    with pytest.raises(pytest.skip.Exception, match="CUDA"):
        cuda_marks.skip_without_cuda(item(True), present=False)
    cuda_marks.skip_without_cuda(item(True), present=True)
    cuda_marks.skip_without_cuda(item(False), present=False)


@pytest.mark.cuda
def test_peak_memory_reads_the_cuda_allocator():
    import torch

    from jobs.training.memory import peak_memory

    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    held = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    got = peak_memory(device)
    assert got["memory_kind"] == "cuda_allocated" and got["peak_memory_bytes"] >= held.numel()


@pytest.mark.cuda
def test_a_checkpoints_generator_state_covers_the_gpu():
    """Dropout masks on a GPU come from its own generator: a resumed run draws what an unbroken
    one would only if the checkpoint kept that state too."""
    import torch

    from jobs.training import checkpoint

    torch.cuda.manual_seed(0)
    torch.randn(8, device="cuda")
    state = checkpoint.rng_state()
    assert "cuda" in state
    expected = torch.randn(8, device="cuda")
    torch.cuda.manual_seed(123)  # as a resumed run seeds before it restores
    checkpoint.restore_rng(state)
    assert torch.equal(torch.randn(8, device="cuda"), expected)


@pytest.mark.cuda
def test_auto_takes_bf16_only_where_the_gpu_multiplies_it_natively():
    import torch

    from jobs.training.precision import choose_precision

    choice = choose_precision("auto", torch.device("cuda"))
    native = torch.cuda.get_device_capability() >= (8, 0)
    assert choice.dtype == (torch.bfloat16 if native else torch.float32), choice.reason
