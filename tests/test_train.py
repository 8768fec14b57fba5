"""The training loop and the run folder it writes."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from jobs.training import checkpoint
from jobs.data.examples import collate, encode
from adapters.core.errors import StudioError
from jobs.training.loss import token_loss_sum
from jobs.runfolder import read_metrics
from jobs.spec import parse_spec
from jobs.training.recipe import train
from jobs.training.schedule import lr_at
from helpers import make_spec, toy_rows


def stop_after(n_steps: int):
    """A stop() that asks to stop once n_steps steps have been taken (it is polled before each)."""
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > n_steps
    return stop


@pytest.mark.slow
def test_run_folder_contract(tiny_model, toy_dataset, tmp_path, studio_home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run = train(parse_spec(make_spec(tiny_model, toy_dataset, out, max_steps=6, eval_every=3)))
    assert run["status"] == "completed" and run["error"] is None
    m = run["metrics"]
    for key in ("train_loss", "eval_loss", "trainable_params", "total_params", "peak_memory_bytes",
                "tokens_per_second", "train_seconds", "steps"):
        assert m[key] is not None, key
    assert m["steps"] == 6 and 0 < m["trainable_params"] < m["total_params"]
    assert run["spec"]["method"] == {"name": "lora", "r": 4, "alpha": 16.0, "dropout": 0.0,
                                     "target_modules": "all-linear", "rslora": False}
    rows = read_metrics(out)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_second"] > 0 and r["lr"] > 0 for r in steps)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(math.isfinite(r["eval_loss"]) for r in evals)
    assert "exact_match" in evals[-1]
    # The adapter folder is what peft loads.
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    PeftModel.from_pretrained(base, str(out / "adapter"))
    assert checkpoint.latest_valid(out) is not None


def _toy_batch(model_dir) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return collate(encode(toy_rows(6), "instruction", tok, 64, "toy"), tok.pad_token_id)


def test_chunked_loss_equals_full_cross_entropy(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    batch = _toy_batch(tiny_model)
    expected = model(**batch).loss  # transformers' mean over the same trained positions
    for chunk in (3, 16, 10_000):
        total, n = token_loss_sum(model, batch, chunk)
        torch.testing.assert_close(total / n, expected, rtol=1e-5, atol=1e-6)


def test_chunked_loss_gradients_match(tiny_model):
    from transformers import AutoModelForCausalLM

    batch = _toy_batch(tiny_model)
    grads = []
    for use_chunks in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        if use_chunks:
            total, n = token_loss_sum(model, batch, 5)
            (total / n).backward()
        else:
            model(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_linear_cross_entropy_gradients():
    from jobs.training.loss import _LinearCrossEntropy

    torch.manual_seed(0)
    h = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 10, 3, 7])
    expected = torch.nn.functional.cross_entropy(h @ w.t() + b, y, reduction="sum")
    torch.testing.assert_close(_LinearCrossEntropy.apply(h, w, b, y), expected)
    assert torch.autograd.gradcheck(lambda a, c, d: _LinearCrossEntropy.apply(a, c, d, y), (h, w, b))


def test_loss_under_bf16_autocast_matches_the_plain_head(tiny_model):
    """The fused head and loss compute what head(h) and cross_entropy compute under autocast."""
    import jobs.training.loss as loss_module
    from transformers import AutoModelForCausalLM

    batch = _toy_batch(tiny_model)
    results = []
    for fused in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        if not fused:
            model.lm_head.register_forward_hook(lambda m, a, o: o)  # a hooked head takes the generic path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, n = loss_module.token_loss_sum(model, batch, 7)
        total.backward()
        results.append((total.detach(), model.lm_head.weight.grad.clone(), model.model.norm.weight.grad.clone()))
    (fused_loss, fused_head, fused_norm), (plain_loss, plain_head, plain_norm) = results
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fused_head, plain_head, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(fused_norm, plain_norm, rtol=2e-2, atol=1e-3)


@pytest.mark.slow
def test_resume_gives_the_same_weights(tiny_model, toy_dataset, tmp_path, studio_home):
    settings = dict(max_steps=8, grad_accum=2, batch_size=4, lr_schedule="cosine", warmup_steps=2)
    whole = train(parse_spec(make_spec(tiny_model, toy_dataset, tmp_path / "whole", **settings)))
    spec = parse_spec(make_spec(tiny_model, toy_dataset, tmp_path / "split", **settings))
    first = train(spec, stop=stop_after(3))
    assert first["status"] == "cancelled" and first["step"] == 3
    second = train(spec)
    assert second["status"] == "completed" and second["metrics"]["steps"] == 8
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert whole["metrics"]["train_loss"] == pytest.approx(second["metrics"]["train_loss"], rel=1e-5)
    # The step count continued: one line per step, no step logged twice.
    assert [r["step"] for r in read_metrics(tmp_path / "split") if "loss" in r] == list(range(1, 9))


def test_corrupt_last_checkpoint_falls_back(tiny_model, toy_dataset, tmp_path, studio_home):
    spec = parse_spec(make_spec(tiny_model, toy_dataset, tmp_path / "run", max_steps=8, save_every=2,
                                keep_checkpoints=3))
    assert train(spec, stop=stop_after(5))["status"] == "cancelled"
    newest = checkpoint.all_steps(tmp_path / "run")[0]
    assert newest.name == "step-00000005"
    with open(newest / "trainable.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    assert checkpoint.latest_valid(tmp_path / "run").name == "step-00000004"
    run = train(spec)
    assert run["status"] == "completed" and run["metrics"]["steps"] == 8
    resumed = [r for r in read_metrics(tmp_path / "run") if r.get("event") == "resumed"]
    assert resumed[-1]["checkpoint"] == "step-00000004"


def test_output_folder_is_protected(tiny_model, toy_dataset, tmp_path, studio_home):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(StudioError, match="not empty"):
        train(parse_spec(make_spec(tiny_model, toy_dataset, busy, max_steps=2)))
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    done = tmp_path / "done"
    train(parse_spec(make_spec(tiny_model, toy_dataset, done, max_steps=2)))
    with pytest.raises(StudioError, match="completed run"):
        train(parse_spec(make_spec(tiny_model, toy_dataset, done, max_steps=2)))


def test_bad_dataset_leaves_no_run_folder(tiny_model, tmp_path, studio_home):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": ""}\n' * 10)
    with pytest.raises(StudioError, match="line 1"):
        train(parse_spec(make_spec(tiny_model, bad, tmp_path / "run", max_steps=2)))
    assert not (tmp_path / "run").exists()


def test_prompt_tuning_trains_through_the_loop(tiny_model, toy_dataset, tmp_path, studio_home):
    """Started from known embeddings (the words of init_text), the saved soft prompt must have
    moved, every virtual token of it, after six logged steps; the base model is not trained."""
    init_text = "what is the answer"
    run = train(parse_spec(make_spec(tiny_model, toy_dataset, tmp_path / "run",
                                     method={"name": "prompt", "init": "text", "init_text": init_text},
                                     optimizer={"name": "adamw", "lr": 0.3}, max_steps=6)))
    assert run["status"] == "completed" and run["metrics"]["trainable_params"] == 16 * 32
    steps = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7)) and all(math.isfinite(r["loss"]) for r in steps)
    base = load_file(str(tiny_model / "model.safetensors"))
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model)(init_text, add_special_tokens=False)["input_ids"]
    start = base["model.embed_tokens.weight"][torch.tensor((ids * 4)[:16])]
    (prompt,) = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors")).values()
    assert prompt.shape == start.shape
    assert bool(((prompt - start).abs().amax(dim=1) > 0).all())  # every virtual token was updated


def test_lr_schedules():
    assert lr_at(0, 1.0, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_at(1, 1.0, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_at(2, 1.0, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_at(6, 1.0, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_at(6, 1.0, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_at(9, 1.0, 10, 0, "constant") == 1.0
    assert lr_at(10, 1.0, 10, 0, "linear") == 0.0


def test_run_json_is_valid_json_at_every_step(tiny_model, toy_dataset, tmp_path, studio_home):
    seen = []

    def watch(rec):
        seen.append(json.loads((tmp_path / "run" / "run.json").read_text())["step"])
    train(parse_spec(make_spec(tiny_model, toy_dataset, tmp_path / "run", max_steps=4)), progress=watch)
    assert seen[:4] == [1, 2, 3, 4]
