"""What test files share: tiny random models and tokenizers, toy data, specs, homes, waiting,
and a running studio. Fixtures that hand these out live in conftest.py; test files import
plain helpers from here, never from conftest or from one another."""
from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")  # Debian's, which the browser tests drive through playwright


def tiny_tokenizer(folder: Path):
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
    tok = tiny_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def toy_rows(n: int = 48) -> list[dict]:
    """A learnable instruction task in the tiny tokenizer's vocabulary: say the next number."""
    return [{"instruction": f"what is {i} plus 1 ?", "output": f"the answer is {i + 1}"} for i in range(n)]


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
    from jobs.runner.scheduler import Scheduler, kill_tree
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
            kill_tree(job.pid)


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


def tiny_llama(seed: int = 0, **config):
    """An in-memory random Llama (no tokenizer, no folder) for tests of maths on modules:
    2 layers of width 32 over 120 tokens unless ``config`` says otherwise."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    return LlamaForCausalLM(LlamaConfig(**{**shape, **config}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_studio(root: Path):
    """The real app on a free localhost port, its home and a tiny model under ``root``."""
    from jobs.runner.store import JobStore, Status

    home, model = root / "home", build_tiny_llama(root / "tiny-llama")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_HOME", str(home))
        mp.setenv("GRADIO_TEMP_DIR", str(home / "uploads"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        from studio.ui.app import launch

        port = free_port()
        demo, service = launch(home, port=port, default_model=str(model), block=False, poll_interval=0.3)
        try:
            yield {"url": f"http://127.0.0.1:{port}/", "home": home, "model": model, "demo": demo}
        finally:
            store = JobStore(home)
            for job in store.list((Status.QUEUED, Status.RUNNING)):
                store.cancel(job.id)
            deadline = time.monotonic() + 60
            while store.list((Status.RUNNING,)) and time.monotonic() < deadline:
                time.sleep(0.3)
            demo.close()
            service.stop()


def el(page, elem_id: str, inner: str = ""):
    """The page element with Gradio ``elem_id`` (ids hold dots, so by attribute), or one inside it."""
    return page.locator(f"[id='{elem_id}'] {inner}".strip())


def mean_loss(model):
    """The model's mean token loss on a batch, as the update rules' closures take it."""
    from jobs.training.loss import token_loss_sum

    def loss_fn(b):
        total, n = token_loss_sum(model, b, 16)
        return total / n
    return loss_fn


def stepper_for(rule: str, model, ctx=None, **cfg):
    """The update rule ``rule`` built over ``model``'s trainable parameters (on the CPU), and its config."""
    import torch

    from adapters import UPDATE_RULES
    from adapters.base import Context

    ctx = ctx or Context(spec=None, device=torch.device("cpu"), dtype=torch.float32)
    r = UPDATE_RULES.get(rule)
    c = r.Config(**cfg)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return r.build(params, c, ctx), c
