"""Checkpoints: written to a temporary folder, sealed with a manifest, then renamed.

A checkpoint of a sharded run (``training.sharding: fsdp``) is written through
``torch.distributed.checkpoint``: every process writes its own shard file into the same
temporary folder, and rank 0 seals the folder once all have written (``save_sharded``).

A checkpoint is valid only when its MANIFEST.json exists and every file it lists has the
recorded size and SHA-256, so a checkpoint cut off by a crash, or corrupted later, is
skipped in favour of the one before it. Tensors are stored as safetensors; the optimizer
state (nested dicts of tensors) with ``torch.save`` and read back with
``weights_only=True``, which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from jobs.runfolder import RunFolder
from safetensors.torch import load_file, save_file

MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def step_dir(run_dir: Path, step: int) -> Path:
    return RunFolder(run_dir).checkpoints_dir / f"step-{step:08d}"


def save(run_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: dict, state: dict,
         keep: int = 2) -> Path:
    root = RunFolder(run_dir).checkpoints_dir
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}-", dir=root))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        return _seal(tmp, run_dir, step, state, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _seal(tmp: Path, run_dir: Path, step: int, state: dict, keep: int, sharded: bool = False) -> Path:
    """Write state.json and the manifest into the finished ``tmp``, then rename it into place."""
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "sharded": sharded, "files": files}, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    target = step_dir(run_dir, step)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    prune(run_dir, keep)
    return target


def save_sharded(run_dir: Path, step: int, tensors: dict, state: dict, keep: int, main: bool) -> Path:
    """Every process calls this: each writes its shard of ``tensors`` (DTensors and plain
    tensors, nested), rank 0 also the plan of the whole; rank 0 seals the folder once every
    shard is written. A process lost before the seal leaves only a temporary folder, which the
    next save or resume removes."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    root = RunFolder(run_dir).checkpoints_dir
    tmp = root / f".step-{step:08d}-sharded"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dcp.save(tensors, checkpoint_id=str(tmp))
    dist.barrier()  # every shard written before rank 0 hashes them
    target = step_dir(run_dir, step)
    if main:
        try:
            _seal(tmp, run_dir, step, state, keep, sharded=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    dist.barrier()
    return target


def is_sharded(ckpt: Path) -> bool:
    try:
        return bool(json.loads((ckpt / MANIFEST).read_text()).get("sharded"))
    except (OSError, ValueError):
        return False


def load_sharded(ckpt: Path, tensors: dict) -> dict:
    """Read each process's part of a sharded checkpoint into ``tensors`` in place; the state."""
    import torch.distributed.checkpoint as dcp

    dcp.load(tensors, checkpoint_id=str(ckpt))
    return json.loads((ckpt / "state.json").read_text())


def is_valid(ckpt: Path) -> bool:
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        for name, meta in manifest["files"].items():
            f = ckpt / name
            if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def all_steps(run_dir: Path) -> list[Path]:
    root = RunFolder(run_dir).checkpoints_dir
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")), reverse=True)


def latest_valid(run_dir: Path) -> Path | None:
    """Newest checkpoint that passes its manifest, or None."""
    for ckpt in all_steps(run_dir):
        if is_valid(ckpt):
            return ckpt
    return None


def load(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    trainable = load_file(str(ckpt / "trainable.safetensors"))
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
    state = json.loads((ckpt / "state.json").read_text())
    return trainable, optimizer, state


def prune(run_dir: Path, keep: int) -> None:
    valid = [c for c in all_steps(run_dir)]
    for old in valid[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    root = RunFolder(run_dir).checkpoints_dir
    for stale in root.glob(".step-*"):  # temporary folders left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)


def rng_state() -> dict:
    """The Python and torch generators' state (the CPU's, and this process's GPU's where it has
    one), for a resumed run to draw what an unbroken one would (dropout masks on a GPU come from
    the GPU's generator)."""
    state = {"python": json.dumps(random.getstate()), "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rng(state: dict | None) -> None:
    if not state:
        return
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
