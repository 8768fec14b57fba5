"""Model work the web process hands to a child: ``studio ...`` in its own process, its JSON report read back.

The web process imports no torch and holds no model (GGUF export, lm-eval); the child's
one-line ``error:`` becomes the page's message.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from adapters.core.errors import StudioError

PROJECT = Path(__file__).resolve().parents[2]


def run_cli(args: list[str], timeout: float = 3600) -> dict:
    """``studio ARGS`` in a child process; its JSON report, or its one-line error as a StudioError."""
    try:
        done = subprocess.run([sys.executable, "-m", "studio.cli", *args], cwd=PROJECT, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise StudioError(f"studio {args[0]} took longer than {timeout:.0f} s and was stopped.", args[1],
                          f"run it from a shell instead: studio {' '.join(args)}") from None
    if done.returncode != 0:
        lines = [x for x in done.stderr.splitlines() if x.strip()]
        said = next((x.removeprefix("error: ") for x in reversed(lines) if x.startswith("error: ")), None)
        if said:  # already says what, where and how to fix
            raise StudioError(said)
        raise StudioError(f"studio {args[0]} failed: {lines[-1] if lines else done.returncode}", args[1],
                          "run the same command in a shell to see all of it: studio " + " ".join(args))
    return json.loads(done.stdout)
