"""Start ``python -m MODULE`` as a child process that imports this same source tree.

The studio runs its jobs, its model process and its bake-off driver as child modules. Each
must import the tree its parent runs from, whatever the child's working folder and the
caller's PYTHONPATH, and must write its lines unbuffered (logs are followed as they grow).
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

# The folder that holds ``adapters``, ``jobs`` and ``studio``.
CODE_ROOT = Path(__file__).resolve().parents[2]


def module_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with this tree first on PYTHONPATH and
    output unbuffered."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CODE_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn_module(module: str, *args: str | os.PathLike, env: Mapping[str, str] | None = None,
                 **popen) -> subprocess.Popen:
    """``python -m module args`` on this interpreter with ``module_env(env)``; ``popen`` goes to
    ``subprocess.Popen`` as is (stdin, stdout, cwd, start_new_session, ...)."""
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], env=module_env(env), **popen)
