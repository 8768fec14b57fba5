"""Two ranks on gloo, DDP against FSDP2, beside one process: per-rank peak memory, step time, and the
per-device estimate's error. Not part of ``python -m bench``'s default suite (minutes per shape).

    python -m bench.distributed                          # Qwen2-0.5B shape, full fine-tuning, AdamW
    python -m bench.distributed --shape smollm2-135m     # the same on a smaller shape (a 2-core machine)
    python -m bench.distributed --shape qwen2-1.5b --method lora --engines fsdp

Every run is a real job: queued in a scratch studio home and started as the scheduler starts one
(``jobs.runner.worker.spawn``: its own session, the job allocator, torchrun for two ranks), on a
random-weight model of a published shape (``bench/random_models.py``). The global batch is the
same for every run: the one process takes both ranks' rows, and gets both ranks' threads.

The peak of every rank is read from outside: the peak resident set (VmHWM) of each rank process,
sampled from /proc while the job runs. The training peak is the last sample taken before the last
step was recorded (load, apply and every step but the last, which repeats the others); the peak
over the whole job (its final checkpoint and save included) is kept beside it. The estimate
(``jobs.estimate``) is for one rank, asked in this process for the same spec.

Targets (issue 23): FSDP2's per-rank peak <= 0.6x DDP's; the estimate within 10% of each
measured per-rank training peak. Writes ``bench/results/distributed-<shape>-<method>.json``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, demo_spec, machine_info, merge, mib, quiet_eval, say, write_result

ENGINES = {"one": (1, "none"), "ddp": (2, "none"), "fsdp": (2, "fsdp")}
FSDP_TARGET, ESTIMATE_TARGET = 0.6, 0.10
SAMPLE_EVERY = 0.05   # seconds between /proc readings
TIMEOUT_S = 3600


def spec_for(model: str, method: str, engine: str, steps: int, rows_per_rank: int, seq: int) -> dict:
    """The job's spec: the demo task on ``model``; ``rows_per_rank`` rows per rank and micro-batch."""
    devices, sharding = ENGINES[engine]
    spec = merge(demo_spec(), quiet_eval())
    spec["model"] = model
    spec["method"] = {"name": method}
    spec["optimizer"] = {"name": "adamw", "lr": 1e-5 if method == "full" else 1e-4}
    spec.pop("output_dir", None)
    return merge(spec, {"training": {
        "max_steps": steps, "batch_size": rows_per_rank * 2 // devices, "grad_accum": 1, "max_seq_len": seq,
        "precision": "fp32", "lr_schedule": "constant", "warmup_steps": 0, "gradient_checkpointing": False,
        "devices": devices, "sharding": sharding}})


def status_bytes(pid: int, field: str) -> int | None:
    """A field of /proc/<pid>/status in bytes (VmHWM: the process's peak resident set), None when gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def training_processes(root_pid: int, distributed: bool) -> list[int]:
    """The processes that train under a job's worker: its torchrun ranks (none before torchrun starts
    them or after they end), or for a one-process job the worker itself."""
    if not distributed:
        return [root_pid]
    import psutil

    def cmdline(p) -> list[str]:
        try:
            return p.cmdline()
        except psutil.Error:  # gone, or a zombie
            return []

    try:
        launchers = [p for p in psutil.Process(root_pid).children(recursive=True)
                     if "torch.distributed.run" in cmdline(p)]
        # torchrun's own children only: a rank's short-lived fork (before it execs a helper) shares its
        # command line but is not a rank.
        ranks = [c.pid for p in launchers for c in p.children() if "--rank" in cmdline(c)]
    except psutil.Error:
        return []
    return ranks


class PeakSampler:
    """VmHWM of every training process of a job, sampled until the job's process ends.

    ``steps_done()`` says how many steps the run has recorded; samples taken while it is below
    ``max_steps`` make the training peak. VmHWM never falls, so a process's last sample holds its
    whole history; only processes seen once a step was recorded count (the ranks that trained, not
    a helper process started and ended before training)."""

    def __init__(self, proc, steps_done, max_steps: int, distributed: bool):
        self.proc, self.steps_done, self.max_steps, self.distributed = proc, steps_done, max_steps, distributed
        self.peak: dict[int, int] = {}
        self.train_peak: dict[int, int] = {}
        self.trained: set[int] = set()
        self.series: dict[int, list] = {}  # per process: (seconds, resident bytes, steps recorded)
        self.started = time.monotonic()

    def sample(self) -> None:
        done = self.steps_done()
        training = done < self.max_steps
        pids = training_processes(self.proc.pid, self.distributed)
        if done:
            self.trained.update(pids)
        for pid in pids:
            value = status_bytes(pid, "VmHWM")
            if value is None:
                continue
            self.peak[pid] = max(self.peak.get(pid, 0), value)
            rss = status_bytes(pid, "VmRSS")
            points = self.series.setdefault(pid, [])
            if rss and (not points or abs(rss - points[-1][1]) > 16 << 20):  # where it moved by 16 MiB
                points.append((round(time.monotonic() - self.started, 2), rss, done))
            if training:
                self.train_peak[pid] = max(self.train_peak.get(pid, 0), value)

    def run(self, timeout: float) -> int | None:
        ends = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > ends:
                self.proc.kill()
                return None
            self.sample()
            time.sleep(SAMPLE_EVERY)
        self.peak = {p: v for p, v in self.peak.items() if p in self.trained}
        self.train_peak = {p: v for p, v in self.train_peak.items() if p in self.trained}
        return self.proc.returncode


def step_seconds(records: list[dict]) -> float | None:
    """The median time of a step, the first (warm-up) left out when there are others."""
    times = [r["tokens"] / r["tokens_per_second"] for r in records if r.get("tokens_per_second")]
    times = times[1:] if len(times) > 1 else times
    return statistics.median(times) if times else None


def run_job(spec: dict, label: str, threads: int, timeout: float = TIMEOUT_S) -> dict:
    """Queue ``spec`` in a scratch home, start it as the scheduler would, and measure its ranks."""
    from adapters.core.errors import StudioError
    from jobs.runfolder import read_metrics
    from jobs.runner.submit import submit_job
    from jobs.runner.store import JobStore, Status
    from jobs.runner.worker import spawn

    home = Path(tempfile.mkdtemp(prefix=f"bench-dist-{label}-"))
    try:
        try:
            job = submit_job(home, spec, name=label)
        except StudioError as e:  # e.g. an engine this build refuses: a row of the table, not a crash
            return {"label": label, "status": "refused", "error": e.message, "ranks": 0, "peak_bytes": [],
                    "train_peak_bytes": [], "losses": [], "step_seconds": None}
        store = JobStore(home)
        store.claim(job.id, "cpu")
        job = store.get(job.id)
        started = time.perf_counter()
        proc = spawn(home, job, {"OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""})
        max_steps = spec["training"]["max_steps"]

        def steps_done() -> int:
            return sum(1 for r in read_metrics(job.run_dir) if "loss" in r)

        sampler = PeakSampler(proc, steps_done, max_steps, spec["training"]["devices"] > 1)
        code = sampler.run(timeout)
        wall = time.perf_counter() - started
        done = store.get(job.id)
        records = [r for r in read_metrics(job.run_dir) if "loss" in r]
        log = Path(job.run_dir) / "log.txt"
        failed = code != 0 or done.status != Status.COMPLETED
        return {"label": label, "status": Status(done.status).value, "exit_code": code,
                "error": (done.error or f"exit code {code}") if failed else None,
                "log_tail": log.read_text(errors="replace")[-3000:] if failed and log.is_file() else None,
                "ranks": len(sampler.peak), "peak_bytes": sorted(sampler.peak.values()),
                "train_peak_bytes": sorted(sampler.train_peak.values()),
                "resident_series": [sampler.series.get(p, []) for p in sorted(sampler.peak, key=sampler.peak.get)],
                "losses": [r["loss"] for r in records], "step_seconds": step_seconds(records),
                "wall_seconds": round(wall, 1)}
    finally:
        shutil.rmtree(home, ignore_errors=True)


def predict(spec: dict) -> dict:
    """The per-rank estimate for ``spec`` (what `studio estimate` prints), or the reason there is none."""
    from jobs.estimate.estimator import estimate
    from jobs.spec import parse_spec

    try:
        result = estimate(parse_spec({**spec, "output_dir": "unused"}), "cpu")
    except Exception as e:  # noqa: BLE001 - a failed estimate is a row of the table
        return {"error": f"{type(e).__name__}: {e}"}
    return {"total_bytes": result["total_bytes"], "breakdown": result["breakdown"], "peak_phase": result["peak_phase"],
            "phases": result["phases"]}


def training_estimate(predicted: dict) -> int | None:
    """The estimate of what the measured training peak covers: loading, applying and training (the
    phases before ``save``, rank 0's gathering of the whole model at the end)."""
    phases = {k: v for k, v in (predicted.get("phases") or {}).items() if k != "save"}
    return max(phases.values()) if phases else predicted.get("total_bytes")


def summarise(runs: dict[str, dict]) -> dict:
    """Ratios and errors from the runs (``one``/``ddp``/``fsdp``: run_job's rows with ``predicted``)."""
    def worst(name: str, key: str = "train_peak_bytes") -> int | None:
        """The highest rank's peak of a run that completed."""
        row = runs.get(name) or {}
        if row.get("error") or not row.get(key):
            return None
        return max(row[key])

    out: dict = {"per_rank_train_peak_bytes": {n: worst(n) for n in runs},
                 "per_rank_peak_bytes": {n: worst(n, "peak_bytes") for n in runs}}
    ddp, fsdp = worst("ddp"), worst("fsdp")
    out["fsdp_over_ddp"] = fsdp / ddp if ddp and fsdp else None
    out["fsdp_target_met"] = out["fsdp_over_ddp"] <= FSDP_TARGET if out["fsdp_over_ddp"] is not None else None
    errors, whole = {}, {}
    for name, row in runs.items():
        predicted = row.get("predicted") or {}
        training = training_estimate(predicted)
        peaks = [] if row.get("error") else row.get("train_peak_bytes") or []
        if training and peaks:  # every rank: the estimate is per device
            errors[name] = max((training / p - 1.0 for p in peaks), key=abs)
        if predicted.get("total_bytes") and worst(name, "peak_bytes"):  # the rank that holds the most
            whole[name] = predicted["total_bytes"] / worst(name, "peak_bytes") - 1.0
    out["estimate_error"] = errors
    out["whole_job_estimate_error"] = whole
    out["estimate_target_met"] = all(abs(e) <= ESTIMATE_TARGET for e in [*errors.values(), *whole.values()]) \
        if errors else None
    one = (runs.get("one") or {}).get("step_seconds")
    out["step_seconds"] = {n: r.get("step_seconds") for n, r in runs.items()}
    out["step_time_vs_one_process"] = {n: r["step_seconds"] / one for n, r in runs.items()
                                       if n != "one" and one and r.get("step_seconds")}
    out["failures"] = {n: r["error"] for n, r in runs.items() if r.get("error")}
    return out


def table(shape: str, method: str, runs: dict, summary: dict) -> str:
    lines = [f"{shape}, {method} + AdamW, fp32, 2 gloo ranks", "",
             "| engine | ranks | per-rank training peak | estimate | error "
             "| whole job (highest rank) | estimate | error | step |",
             "|---|---|---|---|---|---|---|---|---|"]

    def pct(error: float | None) -> str:
        return f"{error:+.1%}" if error is not None else "-"

    for name, row in runs.items():
        peaks = row.get("train_peak_bytes") or []
        predicted = row.get("predicted") or {}
        step = row.get("step_seconds")
        lines.append(f"| {name} | {row.get('ranks', '-')} | {', '.join(mib(p) for p in peaks) or '-'} | "
                     f"{mib(training_estimate(predicted))} | {pct(summary['estimate_error'].get(name))} | "
                     f"{mib(max(row.get('peak_bytes') or [0]))} | {mib(predicted.get('total_bytes'))} | "
                     f"{pct(summary['whole_job_estimate_error'].get(name))} | {f'{step:.2f} s' if step else '-'} |")
    ratio = summary["fsdp_over_ddp"]
    lines += ["", f"FSDP2 / DDP per-rank peak: {f'{ratio:.2f}x' if ratio else '-'} (target <= {FSDP_TARGET}x)"]
    for name, why in summary["failures"].items():
        lines.append(f"failed: {name}: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench import random_models

    p = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen2-0.5b", choices=sorted(random_models.SHAPES))
    p.add_argument("--method", default="full")
    p.add_argument("--engines", default="one,ddp,fsdp", help="comma-separated: one, ddp, fsdp")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rows", type=int, default=2, help="rows per rank and step")
    p.add_argument("--seq", type=int, default=128, help="max_seq_len")
    p.add_argument("--model", help="a model folder instead of the random-weight shape (the harness's test)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        p.error(f"unknown engine(s) {unknown}; choose from {', '.join(ENGINES)}")
    model = args.model or str(random_models.build(args.shape))
    shape = Path(args.model).name if args.model else args.shape
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    runs: dict[str, dict] = {}
    for engine in engines:
        spec = spec_for(model, args.method, engine, args.steps, args.rows, args.seq)
        devices = spec["training"]["devices"]
        say(f"{shape} {args.method} {engine}: {devices} process(es)")
        row = run_job(spec, f"{shape}-{args.method}-{engine}", max(1, cores // devices))
        row["predicted"] = predict(spec)
        say(f"  {row['status']}: per-rank peaks {[mib(p) for p in row['train_peak_bytes']]}, "
            f"estimate {mib(row['predicted'].get('total_bytes'))}" + (f", {row['error']}" if row["error"] else ""))
        runs[engine] = row
    summary = summarise(runs)
    text = table(shape, args.method, runs, summary)
    print(text)
    name = f"distributed-{shape}-{args.method}"
    write_result(name, {"shape": shape, "method": args.method, "steps": args.steps, "rows_per_rank": args.rows,
                        "max_seq_len": args.seq, "runs": runs, "summary": summary}, args.out)
    from jobs.training.allocator import preload_env

    machine = machine_info()
    command = " ".join(["python", "-m", "bench.distributed", *(argv if argv is not None else sys.argv[1:])])
    (args.out / f"{name}.md").write_text(
        f"# {name}\n\n{text}\n\nmachine: {machine['cpu']}, {machine['usable_cores']} usable cores, "
        f"load average {machine['load_average']}, malloc: {preload_env().get('LD_PRELOAD') or 'glibc'}; "
        f"torch {machine['versions']['torch']}; commit {machine['commit']}\ncommand: `{command}`\n")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
