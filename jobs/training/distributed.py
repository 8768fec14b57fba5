"""The processes of a run as torchrun sets them up: one per device, and the few collectives the
recipe itself needs (a loss to report, a stop flag). Gradients are not summed here: the engines
(jobs/training/engines.py) hand them to torch's DistributedDataParallel or FSDP2.

The recipe calls ``setup()`` once; when torchrun's variables are absent it is a single process
and every collective below is a no-op.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from adapters.core.errors import StudioError

GROUP_TIMEOUT = datetime.timedelta(minutes=60)  # nccl's collectives; see setup()


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup() -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        # gloo on the CPU (tests here), nccl between GPUs.
        if torch.cuda.is_available():
            bind_gpu(local_rank)
            # nccl's own default waits 10 minutes, gloo's 30. Under FSDP2 from converted weights rank 0
            # alone loads the model (a download, a conversion) while the others wait in a collective.
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank), timeout=GROUP_TIMEOUT)
        else:
            dist.init_process_group(backend="gloo")
        _owned.append(True)
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def bind_gpu(local_rank: int) -> None:
    """Make GPU ``local_rank`` this process's current device, before anything touches CUDA.

    FSDP2's default mesh, nccl's communicator and ``_device`` below all take the *current* device;
    without this every rank of a machine would put its shards and collectives on GPU 0."""
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise StudioError(f"this process is local rank {local_rank}, but its machine has {count} GPU(s) visible: "
                          f"each rank needs a GPU of its own.", "training.devices",
                          f"set training.devices to at most {count} (or make more GPUs visible: "
                          f"CUDA_VISIBLE_DEVICES).")
    torch.cuda.set_device(local_rank)


_owned: list[bool] = []  # whether setup() made the process group (a caller's own group is left alone)


def teardown() -> None:
    if dist.is_initialized() and _owned:
        _owned.clear()
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over every process (a copy; ``value`` alone in a single process)."""
    if not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def sum_scalar(value: float) -> float:
    return float(all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64, device=_device())))


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (so every rank stops at the same step)."""
    return sum_scalar(1.0 if flag else 0.0) > 0


def broadcast_floats(values: tuple[float, ...] | None, count: int, src: int = 0) -> tuple[float, ...]:
    """``src``'s ``count`` numbers on every process (``values`` itself in a single process; the
    other ranks pass None). A tensor, not a pickled object: ranks exchange numbers only."""
    if not dist.is_initialized():
        return tuple(values)
    box = torch.zeros(count, dtype=torch.float64, device=_device())
    if dist.get_rank() == src:
        box += torch.tensor(values, dtype=torch.float64, device=box.device)
    dist.broadcast(box, src=src)
    return tuple(box.tolist())


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every process with ``src``'s, in place: one collective per dtype,
    the tensors flattened into one buffer on the collective's device. Every process passes
    tensors of the same shapes and dtypes in the same order."""
    if not dist.is_initialized() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1).to(_device()) for t in group])
            dist.broadcast(flat, src=src)
            for t, part in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(part.view_as(t))


def least(values: list[int]) -> list[int]:
    """Each of ``values`` at its smallest over every process (``values`` in a single process)."""
    if not dist.is_initialized():
        return list(values)
    box = torch.tensor(values, dtype=torch.int64, device=_device())
    dist.all_reduce(box, op=dist.ReduceOp.MIN)
    return box.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _device() -> torch.device:
    # nccl reduces only tensors on the process's GPU; gloo only CPU tensors.
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
