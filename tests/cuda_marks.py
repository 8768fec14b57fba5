"""The ``cuda`` marker's rule: a CUDA test is skipped where there is no CUDA device, and where there
is one it never skips silently: a skip (a missing kernel, a skipif, an importorskip) is a failure.

tests/conftest.py wires these into pytest; ``make gpu-check`` runs ``pytest -m cuda`` and fails
when nothing ran or anything skipped.
"""
from __future__ import annotations

import functools

import pytest

REASON = "needs a CUDA device"


@functools.cache
def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def skip_without_cuda(item, present: bool | None = None) -> None:
    """Called before each test: a CUDA-marked test skips where there is no CUDA device."""
    if item.get_closest_marker("cuda") and not (cuda_present() if present is None else present):
        pytest.skip(REASON)


def forbid_skip(item, report, present: bool | None = None) -> None:
    """Called on each report: where CUDA is present, a CUDA-marked test's skip becomes a failure."""
    if not (report.skipped and item.get_closest_marker("cuda")) or hasattr(report, "wasxfail"):
        return
    if cuda_present() if present is None else present:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"a CUDA test skipped on a machine with CUDA ({reason}); "
                           "where CUDA is present these tests must run")
