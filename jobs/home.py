"""The studio's home folder: job store, uploaded datasets, run folders, model cache.

One folder holds everything a studio instance owns, so tests and scripts can point a
whole studio at a temporary folder (``--home`` or ``STUDIO_HOME``) and a user can move
or back it up as a unit.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

ENV_VAR = "STUDIO_HOME"
# The web server's login (user:password). Job processes never inherit it: a job runs
# code from models and data, and has no business with the server's password.
AUTH_ENV = "STUDIO_AUTH"
# Hidden folder in the user's home, like ~/.cache or ~/.ollama: out of the way, per user.
DEFAULT_HOME = Path("~/.studio")
SUBFOLDERS = ("runs", "datasets", "models")
STORE_FILE = "jobs.sqlite"
LOCK_FILE = "scheduler.lock"


def studio_home(override: str | os.PathLike | None = None) -> Path:
    """Resolve and create the home folder: ``override`` > ``$STUDIO_HOME`` > ``~/.studio``."""
    raw = override or os.environ.get(ENV_VAR) or DEFAULT_HOME
    home = Path(raw).expanduser().resolve()
    for name in SUBFOLDERS:
        (home / name).mkdir(parents=True, exist_ok=True)
    return home


def runs_dir(home: Path) -> Path:
    return home / "runs"


def datasets_dir(home: Path) -> Path:
    return home / "datasets"


def models_dir(home: Path) -> Path:
    """Cache of downloaded or converted base models."""
    return home / "models"


def uploads_dir(home: Path) -> Path:
    """Where the web server keeps files as they arrive (Gradio's upload cache)."""
    return home / "uploads"


def store_path(home: Path) -> Path:
    return home / STORE_FILE


def lock_path(home: Path) -> Path:
    return home / LOCK_FILE


@contextmanager
def home_env(home: str | os.PathLike):
    """Point ``$STUDIO_HOME`` at ``home`` while the block runs (the model cache and whatever reads
    the variable follow it), then put back what was there, or nothing."""
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = str(home)
    try:
        yield Path(home)
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous
