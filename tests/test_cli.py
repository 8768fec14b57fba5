"""The command line end to end on a tiny model: train, export (merged and adapter), generate."""
from __future__ import annotations

import json

import pytest
import yaml
from transformers import AutoModelForCausalLM

from studio.cli import main
from helpers import make_spec


def write_spec(tmp_path, spec: dict):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_train_export_generate(tiny_model, toy_dataset, tmp_path, studio_home, capsys):
    spec = write_spec(tmp_path, make_spec(tiny_model, toy_dataset, tmp_path / "run", max_steps=4))
    assert main(["train", str(spec), "--set", "training.max_steps=5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "status: completed" in out and "eval_loss" in out
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["spec"]["training"]["max_steps"] == 5  # the override landed

    assert main(["export", str(tmp_path / "run"), "--merged", str(tmp_path / "merged")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_logit_diff"] <= 1e-4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in model.named_parameters())
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "merged" / name).is_file(), name

    assert main(["export", str(tmp_path / "run"), "--adapter", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    assert main(["generate", str(tmp_path / "run"), "--prompt", "what is 3 plus 1 ?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_prompt_tuning_cannot_merge(tiny_model, toy_dataset, tmp_path, studio_home, capsys):
    spec = write_spec(tmp_path, make_spec(tiny_model, toy_dataset, tmp_path / "run", method={"name": "prompt"},
                                          max_steps=2))
    assert main(["train", str(spec), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--merged", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "prompt tuning prepends learned embeddings" in err and "--adapter" in err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("override,message", [
    ("training.batch_sizee=4", "training.batch_sizee: unknown key. Valid keys here: max_steps"),
    ("method.name=lorra", "unknown method 'lorra'; use one of:"),
    ("training", "has no '='"),
])
def test_bad_overrides_exit_2_without_traceback(tiny_model, toy_dataset, tmp_path, studio_home, capsys,
                                                override, message):
    spec = write_spec(tmp_path, make_spec(tiny_model, toy_dataset, tmp_path / "run"))
    assert main(["train", str(spec), "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_failed_run_exits_nonzero(tiny_model, toy_dataset, tmp_path, studio_home, capsys):
    spec = write_spec(tmp_path, make_spec(tiny_model, toy_dataset, tmp_path / "run",
                                          method={"name": "full"}, optimizer={"name": "sgd", "lr": 10.0}, max_steps=30))
    code = main(["train", str(spec), "--quiet"])
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert code == 2 and run["status"] == "failed" and "loss became" in run["error"]


def test_an_inline_run_restarts_on_the_jobs_allocator(monkeypatch):
    """`studio train` replaces itself with a process on the malloc queued jobs get, so its peak
    is what `studio estimate` predicts; a caller of main() (argv given) is never replaced."""
    import os
    import sys

    from jobs.training import allocator
    from studio import cli

    execs = []
    monkeypatch.setattr(os, "execve", lambda exe, args, env: execs.append((exe, args, env)))
    monkeypatch.setattr(allocator, "preload_env", lambda environ=None: {"LD_PRELOAD": "libtcmalloc_minimal.so.4"})
    cli._restart_on_job_allocator(["train", "spec.yaml", "--set", "training.max_steps=2"])
    assert execs == [(sys.executable, [sys.executable, "-m", "studio.cli", "train", "spec.yaml", "--set",
                                       "training.max_steps=2"], {**os.environ, "LD_PRELOAD": "libtcmalloc_minimal.so.4"})]

    monkeypatch.setattr(allocator, "preload_env", lambda environ=None: {})  # none, system, or already on it
    cli._restart_on_job_allocator(["train", "spec.yaml"])
    assert len(execs) == 1
    assert cli.build_parser().parse_args(["train", "x.yaml"]).func is cli.cmd_train
