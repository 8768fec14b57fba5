"""The three small helpers that several modules share: starting a child module, pointing
``$STUDIO_HOME`` at a home for a while, and the one-line text of an error."""
from __future__ import annotations

import os
import subprocess

import pytest

from adapters.core.errors import StudioError, describe
from adapters.core.spawn import CODE_ROOT, spawn_module
from jobs.home import ENV_VAR, home_env


def test_a_child_module_imports_this_tree_from_any_folder(tmp_path):
    """Run from an unrelated folder with a PYTHONPATH pointing elsewhere: the child still finds this
    tree first, keeps the caller's path after it, and writes unbuffered."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import os, adapters, sys; print(adapters.__file__); print(os.environ['PYTHONPATH']); "
            "print(os.environ['PYTHONUNBUFFERED']); print(sys.argv[1:])")
    (tmp_path / "probe_mod.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # where probe_mod lives
    proc = spawn_module("probe_mod", "a", tmp_path / "b", env=env, cwd=elsewhere, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    adapters_file, path, unbuffered, argv = out.splitlines()
    assert proc.returncode == 0
    assert adapters_file.startswith(str(CODE_ROOT / "adapters"))
    assert path.split(os.pathsep) == [str(CODE_ROOT), str(tmp_path)]
    assert unbuffered == "1" and argv == str(["a", str(tmp_path / "b")])


def test_home_env_sets_and_restores_the_home(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, "/before")
    with home_env(tmp_path):
        assert os.environ[ENV_VAR] == str(tmp_path)
    assert os.environ[ENV_VAR] == "/before"
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(RuntimeError):
        with home_env(tmp_path):
            raise RuntimeError("the block failed")
    assert ENV_VAR not in os.environ  # none before, none after, even when the block raised


def test_describe_gives_a_user_error_as_written_and_anything_else_with_its_type():
    assert describe(StudioError("bad rank.", "lora.r", "use 1 or more.")) == "lora.r: bad rank. Fix: use 1 or more."
    assert describe(KeyError("x")) == "KeyError: 'x'"
