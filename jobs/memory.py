"""Peak memory of this process: the CUDA allocator's peak on a GPU, peak resident memory on the CPU."""
from __future__ import annotations

import resource
import sys

import torch


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
                "memory_kind": "cuda_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return {"peak_memory_bytes": int(rss if sys.platform == "darwin" else rss * 1024), "memory_kind": "cpu_peak_rss"}
