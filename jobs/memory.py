"""Peak memory of this process: the CUDA allocator's peak on a GPU, peak resident memory on the CPU."""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch


def peak_rss_bytes() -> int:
    """This process's own peak resident set.

    Linux's ru_maxrss carries the parent's peak across fork and exec, so a job started by a
    large scheduler or UI process would report at least that process's size; VmHWM belongs
    to the current address space alone.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux kilobytes


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
                "memory_kind": "cuda_allocated"}
    return {"peak_memory_bytes": peak_rss_bytes(), "memory_kind": "cpu_peak_rss"}
