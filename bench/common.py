"""What every benchmark shares: the workload, isolated worker processes, machine facts, result files.

Each measurement runs in a fresh Python process (``run_isolated``) so that its peak memory
and its timings belong to that run alone. The suite's own process never loads a model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RAW = RESULTS / "raw"  # worker logs: kept out of git, read when a run fails
# A fixed studio home, so the bundled model is converted once and reused by every run.
HOME = ROOT / "bench" / ".home"
DEMO_SPEC = ROOT / "assets" / "specs" / "demo_lora.yaml"
VERSIONED = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")


# ---------------------------------------------------------------- the workload

def demo_spec(**overrides) -> dict:
    """The bundled demo spec (SmolLM2 on the date task) with absolute paths, deep-merged with overrides.

    Every benchmark starts from it, so speed, quality and efficiency share model, data,
    tokenization and hyperparameters unless a benchmark says otherwise.
    """
    data = yaml.safe_load(DEMO_SPEC.read_text(encoding="utf-8"))
    for key in ("path", "eval_path"):
        if data["dataset"].get(key):
            data["dataset"][key] = str((DEMO_SPEC.parent / data["dataset"][key]).resolve())
    return merge(data, overrides)


def merge(base: dict, overrides: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def with_budget(spec: dict, steps: int) -> dict:
    """The spec cut to ``steps`` optimizer steps, its warmup shortened in the same proportion."""
    t = spec.get("training", {})
    full = t.get("max_steps") or steps
    warmup = round(t.get("warmup_steps", 0) * min(steps / full, 1.0))
    return merge(spec, {"training": {"max_steps": steps, "warmup_steps": warmup}})


def quiet_eval() -> dict:
    """Training overrides that make the loop's closing evaluation negligible (timed runs)."""
    return {"dataset": {"max_eval_rows": 1},
            "training": {"eval_every": 0, "save_every": 0, "exact_match_rows": 0, "eval_samples": 0,
                         "log_every": 1}}


# ---------------------------------------------------------------- isolated workers

def worker_env(preload: bool = True) -> dict:
    """A benchmark process's environment; ``preload``: on the allocator job processes use."""
    from jobs.training.allocator import preload_env

    env = dict(os.environ)
    if preload:
        env.update(preload_env(env))
    env.setdefault("STUDIO_HOME", str(HOME))
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_isolated(module: str, kind: str, params: dict, label: str, timeout: float | None = None,
                 preload: bool = True) -> dict:
    """Run ``kind`` of ``module``'s worker in a new process; its result dict, or ``{"error": ...}``.

    The process starts as the studio starts a job's (``jobs.training.allocator``), unless ``preload``
    is false: then on the system's malloc, as a script of one's own would run.

    A scratch folder is handed to the worker as ``params["scratch"]`` and deleted afterwards
    (run folders of full fine-tuning hold gigabytes of checkpoint). The worker's log is kept
    in results/raw/<label>.log.
    """
    RAW.mkdir(parents=True, exist_ok=True)
    log = RAW / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.log"
    scratch = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        (scratch / "in.json").write_text(json.dumps({**params, "scratch": str(scratch)}))
        out = scratch / "out.json"
        cmd = [sys.executable, "-m", module, "--worker", kind, str(scratch / "in.json"), str(out)]
        started = time.perf_counter()
        with open(log, "w", encoding="utf-8") as fh:
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(preload), stdout=fh, stderr=subprocess.STDOUT,
                                      timeout=timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = None
        wall = time.perf_counter() - started
        if code == 0 and out.is_file():
            return {**json.loads(out.read_text()), "wall_seconds": wall}
        reason = f"timed out after {timeout:.0f} s" if code is None else last_error(log)
        shown = log.relative_to(ROOT) if log.is_relative_to(ROOT) else log
        return {"error": reason, "log": str(shown), "wall_seconds": wall}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def last_error(log: Path) -> str:
    """The exception line of a worker's traceback (or its last line)."""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line) or line.startswith("adapters.core.errors."):
            return line[:400]
    return (lines[-1] if lines else "worker exited without output")[:400]


def worker_main(handlers: dict[str, Callable[[dict], dict]]) -> None:
    """Entry point of ``python -m bench.X --worker KIND IN.json OUT.json``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=sorted(handlers), required=True)
    parser.add_argument("params")
    parser.add_argument("out")
    args = parser.parse_args()
    params = json.loads(Path(args.params).read_text())
    result = handlers[args.worker](params)
    Path(args.out).write_text(json.dumps(result))


# ---------------------------------------------------------------- inside a worker

def compute_device(precision: str = "auto") -> tuple[str, str]:
    """(device, dtype) as the training loop picks them for a spec's ``training.precision``."""
    import torch

    from jobs.training.precision import pick_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device.type, str(pick_precision(precision, device)).removeprefix("torch.")


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else cpu_model()


def process_peak_memory(device: str) -> dict:
    """This process's own peak, measured exactly as training records it in run.json, and the
    malloc it ran on."""
    import torch

    from jobs.training.allocator import running_on
    from jobs.training.memory import peak_memory

    return {**peak_memory(torch.device(device)), "allocator": running_on() or "system"}


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def train_timed(spec_data: dict, output_dir: Path) -> tuple[dict, dict]:
    """Run our training loop on a spec dict; (run record, per-step clocks and token counts)."""
    from jobs.spec import parse_spec
    from jobs.training.recipe import train

    device, _ = compute_device()
    spec = parse_spec(merge(spec_data, {"output_dir": str(output_dir)}))
    clocks: dict[str, list] = {"marks": [], "cpu": [], "trained": [], "tokens": [], "loss": []}

    def progress(record: dict) -> None:
        if record.get("event"):
            return
        sync(device)  # the loop already waits for the loss each step; this keeps the clock honest
        clocks["marks"].append(time.perf_counter())
        clocks["cpu"].append(time.process_time())
        clocks["trained"].append(record["trained_tokens"])
        clocks["tokens"].append(record["tokens"])
        clocks["loss"].append(record["loss"])

    return train(spec, progress=progress), clocks


def steady_rate(marks: list[float], amounts: list[int]) -> tuple[float, float, int]:
    """(amount per second, seconds, steps) over steps 2..N.

    ``marks[k]`` is when step k+1 ended and ``amounts[k]`` what it processed. The first step
    is left out for every system alike: it pays one-time costs (allocator growth, kernel
    selection) that a longer run amortises.
    """
    if len(marks) < 2:
        return 0.0, 0.0, 0
    seconds = marks[-1] - marks[0]
    amount = sum(amounts[1:len(marks)])
    return amount / max(seconds, 1e-9), seconds, len(marks) - 1


# ---------------------------------------------------------------- machine and results

def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def ram_bytes() -> int | None:
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        match = re.search(r"^MemTotal:\s+(\d+) kB", meminfo.read_text(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    return None


def gpus() -> list[str]:
    """GPU names from nvidia-smi, so the suite's own process never creates a CUDA context."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def versions() -> dict:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine_info(command: list[str] | None = None) -> dict:
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": ram_bytes(),
        "gpus": gpus(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(command if command is not None else invocation()),
        "commit": commit(),
        "cpu_flags": cpu_flags(),
    }


def commit() -> str | None:
    """The checkout's commit, with ``-dirty`` when tracked files other than the benchmarks' own
    results differ from it (what was measured: one benchmark's result written before the next
    one runs does not change the code)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (head + ("-dirty" if dirty else "")) or None


def cpu_flags() -> list[str]:
    """The CPU features that choose torch's kernels (AMX and AVX-512 for bf16; AVX2 otherwise)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return []
    match = re.search(r"^flags\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
    flags = set(match.group(1).split()) if match else set()
    return sorted(f for f in flags if f.startswith(("amx", "avx512f", "avx512_bf16", "avx2")))


def invocation() -> list[str]:
    """How this process was started, as a user would retype it (``python -m bench --full``)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    if argv0.name == "__main__.py":
        return ["python", "-m", argv0.parent.name, *sys.argv[1:]]
    if argv0.suffix == ".py" and argv0.resolve().parent == ROOT / "bench":
        return ["python", "-m", f"bench.{argv0.stem}", *sys.argv[1:]]
    return list(sys.argv)


def write_result(name: str, payload: dict, results_dir: Path | None = None) -> Path:
    """results/<name>.json: the payload beside the machine, versions, date and command that produced it."""
    folder = results_dir or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": name, "machine": machine_info(), **payload}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def warm_model_cache(model: str) -> dict:
    """Convert the bundled model once, outside any timed or measured run, into fp32 and the
    compute dtype (local folders need nothing)."""
    if Path(model).expanduser().exists():
        return {"kind": "local"}
    return run_isolated("bench.common", "warm", {"model": model}, "warm-model-cache")


def _warm(params: dict) -> dict:
    from jobs.training import models

    import torch

    src = models.resolve(params["model"])
    if src.kind == "bundled":
        models.load_model(src)  # writes the fp32 safetensors cache
    src = models.resolve(params["model"])
    if src.kind == "bundled-cache":
        # and the copy in the compute dtype, which every bf16 run (ours and Trainer's) then maps
        models.load_model(src, getattr(torch, compute_device()[1]))
    return {"kind": src.kind}


def suite_device() -> str:
    """Where the runs will train, as the estimates for them are asked in the suite's process."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def mib(value) -> str:
    return f"{value / 2**20:.0f} MiB" if value else "-"


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


if __name__ == "__main__":
    worker_main({"warm": _warm})
