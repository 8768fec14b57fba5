"""Data parallelism as torchrun sets it up: one process per device, gradients summed.

The training loop calls ``setup()`` once; when torchrun's variables are absent it is a
single process and every collective below is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    if not dist.is_initialized():
        # gloo on the CPU (tests here), nccl between GPUs.
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum tensors over workers in place, as one flat buffer (one collective, not one per tensor)."""
    if not dist.is_initialized() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def sum_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the parameters' gradients over workers in place (a no-op alone)."""
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is None:  # a rank with no rows this step still joins the collective
            p.grad = torch.zeros_like(p)
    all_reduce_sum([p.grad for p in params])


def sum_scalar(value: float) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    all_reduce_sum([tensor])
    return float(tensor)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (so every rank stops at the same step)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0])
    all_reduce_sum([tensor])
    return float(tensor) > 0


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
