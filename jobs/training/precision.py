"""Which device and compute dtype a run uses (``training.precision``), and why.

The training loop, the memory estimate and the benchmarks all ask here, so they agree.

``auto`` on the CPU decides by measurement, not by a list of CPU flags: bf16 pays where the CPU
multiplies bf16 natively (Intel AMX, the ``avx512_bf16`` instructions of AMD Zen 4 and Intel
Cooper Lake, whatever comes next) and costs where it is emulated (AVX2-only CPUs, where TRL's
bf16 default ran more than 10x slower). So on first use per CPU, torch version and kernel caps,
the model's own layer shapes are multiplied in fp32 and in bf16 for a fraction of a second, and
the two rates are kept in the studio home (``cpu_precision.json``) for every later run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from adapters.core.errors import StudioError
from jobs.training import distributed

Shapes = tuple[tuple[int, int, int], ...]       # (tokens, in_features, out_features) per linear layer
Measure = Callable[[Shapes], tuple[float, float]]  # shapes -> (fp32, bf16) GFLOP/s

# bf16 must multiply at least this much faster than fp32 before ``auto`` takes it. A step is not
# all matmul: under autocast the norms, activations and optimizer stay as slow as in fp32 and
# every forward adds casts, so a 1.5x matmul gain makes a step only about 1.3x faster (LoRA on
# SmolLM2 spends about 90% of an fp32 step in matmuls), and less than that is within what a
# neighbour's load does to a measurement on a shared machine. Native bf16 clears it by far (4.4x
# with avx512_bf16, 6.5x with AMX); emulated bf16 runs below 1x.
MARGIN = 1.5
CACHE_FILE = "cpu_precision.json"
BUDGET_S = 0.3      # timing per measurement, both dtypes together, after one warm-up call per shape
MIN_ROUNDS, MAX_ROUNDS = 3, 50
TOKENS = 512        # rows of the timed matmuls: a micro-batch of a few short rows
MAX_FLOP = 2e9      # per timed matmul: fewer rows for big layers keeps the measurement short

# SmolLM2-135M's linear layers (the bundled model): q and o, k and v, gate and up, down.
REPRESENTATIVE = ((576, 576), (576, 192), (576, 1536), (1536, 576))

# Kernel caps without bf16 instructions: oneDNN's ISA names and ATen's capability levels
# (``default`` = no vectors). Under these, bf16 is emulated, whatever the CPU could do.
_NO_BF16_ISA = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")
_NO_BF16_ATEN = ("default", "avx2")
_MEASURED: dict[tuple[str, str], tuple[float, float]] = {}  # (cache file, key) -> rates, per process


def pick_device(world: distributed.World) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


@dataclass(frozen=True)
class Choice:
    """A run's compute dtype, why, and the rates measured for it (GFLOP/s; None when not measured)."""
    dtype: torch.dtype
    reason: str
    fp32_gflops: float | None = None
    bf16_gflops: float | None = None

    def record(self) -> dict:
        """What run.json and the estimate keep."""
        return {"dtype": str(self.dtype).removeprefix("torch."), "reason": self.reason,
                "fp32_gflops": self.fp32_gflops, "bf16_gflops": self.bf16_gflops}


def pick_precision(precision: str, device: torch.device, shapes: Shapes | None = None) -> torch.dtype:
    """The compute dtype for ``training.precision`` (see ``choose_precision``)."""
    return choose_precision(precision, device, shapes).dtype


def choose_precision(precision: str, device: torch.device, shapes: Shapes | None = None, *,
                     measure: Measure | None = None, home: Path | None = None) -> Choice:
    """The compute dtype for ``training.precision`` and the reason for it.

    ``auto`` is bf16 on a GPU that supports it; on the CPU, what the environment says
    (``cpu_bf16_override``), else bf16 where the measured matmul rate at ``shapes`` (default:
    SmolLM2's layers) is at least ``MARGIN`` times fp32's, else fp32. ``measure`` and ``home``
    replace the timing and the cache's folder (tests)."""
    if precision == "fp16" and device.type != "cuda":
        raise StudioError("fp16 training needs a GPU.", "training.precision", "use fp32 (or auto) on the CPU.")
    if precision != "auto":
        return Choice({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision],
                      f"asked for {precision}")
    if device.type == "cuda":
        # Natively only: by default torch also says yes where a GPU can merely hold bf16 (V100, T4).
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Choice(torch.bfloat16, "GPU supports bf16")
        return Choice(torch.float32, "GPU has no native bf16")
    told = cpu_bf16_override()
    if told is not None:
        return Choice(torch.bfloat16 if told[0] else torch.float32, told[1])
    shapes = tuple(shapes or layer_shapes({}))
    rates = None
    if not (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        rates = measured_rates(shapes, measure or measure_rates, home)
    # Under torchrun the first process measures alone (the others would share its cores) and every
    # process takes its rates, so all of them compute in the same dtype.
    fp32, bf16 = distributed.broadcast_floats(rates, 2)
    return decide(fp32, bf16)


def decide(fp32: float, bf16: float) -> Choice:
    """bf16 when it multiplies at least ``MARGIN`` times as fast as fp32, with the rates as the reason."""
    ratio = bf16 / fp32
    rates = f"{bf16:.0f} vs {fp32:.0f} GFLOP/s"
    if ratio >= MARGIN:
        return Choice(torch.bfloat16, f"measured: bf16 {ratio:.1f}x fp32 ({rates})", fp32, bf16)
    return Choice(torch.float32, f"measured: bf16 only {ratio:.2f}x fp32 ({rates}), below the {MARGIN}x "
                                 "that pays for it", fp32, bf16)


def cpu_bf16_override() -> tuple[bool, str] | None:
    """What the environment says about bf16 on this CPU (yes/no and which variable said it), or None.

    ``STUDIO_CPU_BF16=0/1`` decides outright. Otherwise kernels capped below bf16 instructions
    (``ONEDNN_MAX_CPU_ISA=AVX2``, ``ATEN_CPU_CAPABILITY=avx2``, as CI's second leg runs) mean fp32:
    bf16 would be emulated there, slower and coarser than fp32.
    """
    flag = os.environ.get("STUDIO_CPU_BF16", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False, f"STUDIO_CPU_BF16={flag}"
    if flag in ("1", "true", "yes", "on"):
        return True, f"STUDIO_CPU_BF16={flag}"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa in _NO_BF16_ISA:
        return False, f"ONEDNN_MAX_CPU_ISA={isa} (no bf16 instructions)"
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if aten in _NO_BF16_ATEN:
        return False, f"ATEN_CPU_CAPABILITY={aten} (no bf16 instructions)"
    return None


# -- the model's shapes ----------------------------------------------------------------------------

def layer_shapes(config: dict, tokens: int = TOKENS) -> Shapes:
    """The distinct (tokens, in, out) of a decoder's linear layers, from its config.json's fields;
    SmolLM2's when the config does not say (GGUF files, Hub ids not yet downloaded)."""
    if isinstance(config.get("text_config"), dict):  # a multimodal model's language half
        config = config["text_config"]
    h, inter = config.get("hidden_size"), config.get("intermediate_size")
    if not (isinstance(h, int) and isinstance(inter, int) and h > 0 and inter > 0):
        pairs = REPRESENTATIVE
    else:
        heads = config.get("num_attention_heads") or 1
        kv = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or h // heads
        pairs = ((h, heads * head_dim), (h, kv * head_dim), (heads * head_dim, h), (h, inter), (inter, h))
    return tuple((max(64, min(tokens, int(MAX_FLOP // (2 * k * n)))), k, n) for k, n in dict.fromkeys(pairs))


def source_shapes(src) -> Shapes:
    """``layer_shapes`` of a model source (jobs.training.models.ModelSource) from its config.json."""
    path = Path(src.path) / "config.json"
    if src.gguf_file is None and path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(config, dict):
                return layer_shapes(config)
        except (OSError, ValueError):
            pass  # the model load reports a bad config with its own error, right after
    return layer_shapes({})


# -- measuring and the cache ----------------------------------------------------------------------

def measure_rates(shapes: Shapes, budget_s: float = BUDGET_S) -> tuple[float, float]:
    """GFLOP/s of fp32 and of bf16 ``F.linear`` over ``shapes``, on this process's threads.

    Rounds alternate the two dtypes, so a neighbour's load hits both alike, and each shape's
    best time counts."""
    gen = torch.Generator().manual_seed(0)
    dtypes = (torch.float32, torch.bfloat16)
    ops = {dt: [(torch.randn(m, k, generator=gen).to(dt), torch.randn(n, k, generator=gen).to(dt))
                for m, k, n in shapes] for dt in dtypes}
    best = {dt: [math.inf] * len(shapes) for dt in dtypes}
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for dt in dtypes:
            for x, w in ops[dt]:
                torch.nn.functional.linear(x, w)  # warm-up: oneDNN builds its kernels on first use
        start, rounds = time.perf_counter(), 0
        while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS and time.perf_counter() - start < budget_s):
            for dt in dtypes:
                for i, (x, w) in enumerate(ops[dt]):
                    t0 = time.perf_counter()
                    torch.nn.functional.linear(x, w)
                    best[dt][i] = min(best[dt][i], time.perf_counter() - t0)
            rounds += 1
    flop = sum(2 * m * k * n for m, k, n in shapes)
    fp32, bf16 = (flop / max(sum(best[dt]), 1e-12) / 1e9 for dt in dtypes)
    return fp32, bf16


def cache_key(shapes: Shapes) -> str:
    """What a measurement holds for: the CPU (its model name and flags, since a virtual machine
    may call several generations "AMD EPYC"), torch's version and vector level, the kernel caps
    in the environment, and the shapes."""
    name, flags = _cpu_identity()
    caps = ",".join(f"{v}={os.environ.get(v, '')}" for v in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"))
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    dims = ",".join("x".join(map(str, s)) for s in shapes)
    return f"{name} | flags {digest} | torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()} " \
           f"| {caps} | {dims}"


def measured_rates(shapes: Shapes, measure: Measure, home: Path | None = None) -> tuple[float, float]:
    """The (fp32, bf16) rates for ``shapes`` on this CPU: from the home's cache, else measured and kept."""
    path = _cache_path(home)
    key = cache_key(shapes)
    if (str(path), key) in _MEASURED:
        return _MEASURED[(str(path), key)]
    rates = _rates(_read_cache(path).get(key))
    if rates is None:
        rates = tuple(float(r) for r in measure(shapes))
        if _rates({"fp32_gflops": rates[0], "bf16_gflops": rates[1]}) is None:
            raise StudioError(f"the matmul rates measured for training.precision=auto are not usable ({rates}).",
                              "training.precision", "set training.precision to fp32 or bf16.")
        _write_cache(path, key, {"fp32_gflops": rates[0], "bf16_gflops": rates[1],
                                 "threads": torch.get_num_threads(),
                                 "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    _MEASURED[(str(path), key)] = rates
    return rates


def _cache_path(home: Path | None) -> Path:
    from jobs.home import studio_home

    return Path(home or studio_home()) / CACHE_FILE


def _read_cache(path: Path) -> dict:
    """The cache's entries; a missing, unreadable or malformed file reads as empty (and is remeasured)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    return {k: v for k, v in entries.items() if isinstance(v, dict)} if isinstance(entries, dict) else {}


def _rates(entry) -> tuple[float, float] | None:
    if not isinstance(entry, dict):
        return None
    rates = entry.get("fp32_gflops"), entry.get("bf16_gflops")
    if all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0 for r in rates):
        return float(rates[0]), float(rates[1])
    return None


def _write_cache(path: Path, key: str, entry: dict) -> None:
    """Add ``entry`` atomically (a temporary file renamed over the old one), beside what the file
    holds now (another process may have added its own); a home that cannot be written to only
    costs the next run a measurement."""
    entries = {**_read_cache(path), key: entry}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "entries": entries}, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass


def _cpu_identity() -> tuple[str, str]:
    """The CPU's model name and flags (Linux's /proc/cpuinfo; elsewhere what platform says)."""
    name, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            field, _, value = line.partition(":")
            field = field.strip()
            if field == "model name" and not name:
                name = value.strip()
            elif field in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "unknown CPU", flags
