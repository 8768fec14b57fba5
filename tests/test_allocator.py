"""Job processes start on tcmalloc (else jemalloc) where the system has one."""
import ctypes.util
import subprocess
import sys

import pytest

from jobs.training import allocator
from adapters.core.errors import StudioError


@pytest.fixture(autouse=True)
def fresh_lookup():
    """The library lookup is cached per process: never let a faked one outlive its test."""
    allocator._installed.cache_clear()
    yield
    allocator._installed.cache_clear()


def test_system_and_missing_libraries_mean_no_preload(monkeypatch):
    assert allocator.preload_env({"STUDIO_ALLOCATOR": "system"}) == {}
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert allocator.preload_env({}) == {}


def test_auto_prefers_tcmalloc_and_keeps_other_preloads(monkeypatch):
    found = {"tcmalloc_minimal": "libtcmalloc_minimal.so.4", "jemalloc": "libjemalloc.so.2"}
    monkeypatch.setattr(ctypes.util, "find_library", found.get)
    env = allocator.preload_env({"LD_PRELOAD": "libother.so"})
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:libother.so"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 2**40  # no stderr line per large tensor
    assert allocator.preload_env({"LD_PRELOAD": env["LD_PRELOAD"]}) == {}  # already preloaded
    del found["tcmalloc_minimal"]
    allocator._installed.cache_clear()  # the system was asked once already in this test
    assert allocator.preload_env({}) == {"LD_PRELOAD": "libjemalloc.so.2"}


def test_a_named_library_file_or_a_clear_error(tmp_path):
    lib = tmp_path / "libmymalloc.so"
    lib.write_bytes(b"")
    assert allocator.preload_env({"STUDIO_ALLOCATOR": str(lib)}) == {"LD_PRELOAD": str(lib)}
    with pytest.raises(StudioError) as e:
        allocator.preload_env({"STUDIO_ALLOCATOR": "fastest"})
    assert e.value.where == "STUDIO_ALLOCATOR" and "system" in e.value.message


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_a_process_started_with_it_runs_on_it():
    env = allocator.preload_env({})
    if not env:
        pytest.skip("no tcmalloc or jemalloc on this system (Debian: apt-get install libtcmalloc-minimal4)")
    code = ("import torch\n"
            "from adapters.core.memory import malloc_trim\n"
            "x = torch.ones(1 << 20); del x\n"
            "malloc_trim()(0)\n"  # the heap-returning hook finds the preloaded allocator's own
            "print(open('/proc/self/maps').read())")
    maps = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, **env},
                          capture_output=True, text=True, check=True).stdout
    assert env["LD_PRELOAD"].split(":")[0].split("/")[-1].split(".so")[0] in maps


def test_running_on_names_the_first_preloaded_library():
    assert allocator.running_on({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4:libother.so"}) \
        == "libtcmalloc_minimal.so.4"
    assert allocator.running_on({}) is None
