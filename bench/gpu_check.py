"""``make gpu-check``: everything that needs a GPU, run the moment one is at hand (under 10 minutes).

    python -m bench.gpu_check            # exit 0: all passed; 1: something broke; 3: no CUDA device

1. the CUDA-marked tests (``pytest -m cuda``): it fails when none ran or any skipped, since where
   CUDA is present a skip hides a break (tests/conftest.py turns such a skip into a failure too);
2. one LoRA and one QLoRA job in bf16 on the bundled SmolLM2 model, each through the training
   loop as ``studio train`` runs it, in its own process; its peak (``torch.cuda.max_memory_allocated``)
   beside the estimate for the same spec (``jobs.estimate``): the error is reported, and an error
   beyond ``ESTIMATE_TOLERANCE`` fails;
3. the LoRA run exported merged (``studio export --merged``), which refuses unless the merged model
   matches the trained fingerprint; a run without a fingerprint fails here;
4. with two or more GPUs, a two-rank job under each engine (``training.sharding`` none and fsdp) on
   NCCL, through the job runner; with one GPU the summary says that this was not possible.

Nothing is skipped: a check that cannot run is a failure with its reason. The summary goes to
``bench/results/gpu-check-<gpu name>.md`` and ``.json``. On a machine without CUDA it prints
"no CUDA device: nothing checked", writes nothing and exits with ``NO_CUDA``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import RESULTS, ROOT, demo_spec, machine_info, merge, mib, quiet_eval, say, worker_env

NO_CUDA = 3
ESTIMATE_TOLERANCE = 0.25   # |predicted / measured - 1| beyond this is a broken estimate on a GPU
STEPS = 10
TIMEOUT_S = 240             # per job; the whole check stays under 10 minutes on one GPU
NO_CUDA_MESSAGE = "no CUDA device: nothing checked"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0
    data: dict = field(default_factory=dict)


# -- the verdict and the summary (no GPU needed) ---------------------------------------------

def verdict(checks: list[Check]) -> int:
    """0 when there were checks and every one passed, else 1."""
    return 0 if checks and all(c.ok for c in checks) else 1


def slug(gpu_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-") or "gpu"


def markdown(gpu_name: str, gpu_count: int, checks: list[Check], machine: dict) -> str:
    code = verdict(checks)
    lines = [f"# GPU check on {gpu_name} (x{gpu_count})", "",
             f"**{'PASSED' if code == 0 else 'FAILED'}**: {sum(c.ok for c in checks)} of {len(checks)} checks passed.",
             "", "| check | result | seconds | detail |", "|---|---|---|---|"]
    for c in checks:
        detail = c.detail.replace("|", "/").replace("\n", " ")
        lines.append(f"| {c.name} | {'pass' if c.ok else 'FAIL'} | {c.seconds:.0f} | {detail} |")
    lines += ["", f"command: `{machine.get('command')}`; commit {machine.get('commit')}; "
              f"torch {machine.get('versions', {}).get('torch')}; {machine.get('date')}"]
    return "\n".join(lines) + "\n"


def write_summary(gpu_name: str, gpu_count: int, checks: list[Check], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    base = out / f"gpu-check-{slug(gpu_name)}"
    md, js = base.with_suffix(".md"), base.with_suffix(".json")
    md.write_text(markdown(gpu_name, gpu_count, checks, machine))
    js.write_text(json.dumps({"gpu": gpu_name, "gpu_count": gpu_count, "passed": verdict(checks) == 0,
                              "checks": [asdict(c) for c in checks], "machine": machine}, indent=2) + "\n")
    return md, js


def run_checks(steps: list[tuple[str, object]]) -> list[Check]:
    """Run every (name, step): a step returns a Check or a list of them; one that raises is a failure."""
    checks: list[Check] = []
    for name, step in steps:
        started = time.perf_counter()
        try:
            got = step()
        except Exception as e:  # noqa: BLE001 - every break is reported, none stops the others
            got = Check(name, False, f"{type(e).__name__}: {e}", data={"traceback": traceback.format_exc()[-4000:]})
        for c in got if isinstance(got, list) else [got]:
            c.seconds = c.seconds or round(time.perf_counter() - started, 1)
            checks.append(c)
            say(f"{c.name}: {'pass' if c.ok else 'FAIL'}: {c.detail}")
    return checks


# -- 1. the CUDA-marked tests --------------------------------------------------------------------

def junit_counts(path: Path) -> dict:
    """Tests, failures, errors and skips from a pytest junit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
    counts["skipped_names"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                               if c.find("skipped") is not None]
    return counts


def judge_tests(counts: dict, returncode: int) -> Check:
    ran = counts["tests"] - counts["skipped"]
    problems = []
    if counts["tests"] == 0:
        problems.append("no CUDA-marked test was collected")
    if counts["skipped"]:
        problems.append(f"{counts['skipped']} skipped ({', '.join(counts['skipped_names'][:5])})")
    if counts["failures"] or counts["errors"]:
        problems.append(f"{counts['failures']} failed, {counts['errors']} errors")
    if returncode not in (0,) and not problems:
        problems.append(f"pytest exited with {returncode}")
    detail = "; ".join(problems) if problems else f"{ran} passed"
    return Check("cuda_tests", not problems, detail, data=counts)


def check_cuda_tests() -> Check:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        done = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                               f"--junitxml={report}", "tests"], cwd=ROOT, env=worker_env(preload=False),
                              capture_output=True, text=True, timeout=600)
        if not report.is_file():
            return Check("cuda_tests", False, f"pytest wrote no report (exit {done.returncode}): "
                                              f"{(done.stdout + done.stderr)[-500:]}")
        check = judge_tests(junit_counts(report), done.returncode)
        if not check.ok:
            check.data["output_tail"] = done.stdout[-4000:]
        return check


# -- 2. and 3. one LoRA and one QLoRA job, the estimate, the merged export ---------------------------

def job_spec(method: str, steps: int = STEPS, model: str | None = None) -> dict:
    """The demo task (on the bundled SmolLM2 unless ``model`` names another) in bf16."""
    spec = merge(demo_spec(), quiet_eval())
    spec["method"] = {"name": method}
    if model:
        spec["model"] = model
    return merge(spec, {"training": {"max_steps": steps, "batch_size": 8, "max_seq_len": 128, "precision": "bf16",
                                     "warmup_steps": 0, "gradient_checkpointing": False}})


def estimate_error(predicted: int | None, measured: int | None) -> float | None:
    return predicted / measured - 1.0 if predicted and measured else None


def judge_job(method: str, result: dict, predicted: dict) -> Check:
    measured, guess = result.get("peak_memory_bytes"), predicted.get("total_bytes")
    error = estimate_error(guess, measured)
    data = {"measured_peak_bytes": measured, "predicted_bytes": guess, "error": error,
            "losses": result.get("losses"), "breakdown": predicted.get("breakdown")}
    if result.get("error") or result.get("status") != "completed":
        return Check(f"{method}_bf16", False, f"the job failed: {result.get('error') or result.get('status')}", data=data)
    if result.get("device") != "cuda":
        return Check(f"{method}_bf16", False, f"the job trained on {result.get('device')}, not on CUDA", data=data)
    if predicted.get("error"):
        return Check(f"{method}_bf16", False, f"no estimate: {predicted['error']}", data=data)
    if error is None:
        return Check(f"{method}_bf16", False, "no measured peak to compare the estimate with", data=data)
    ok = abs(error) <= ESTIMATE_TOLERANCE
    return Check(f"{method}_bf16", ok, f"peak {mib(measured)} (max_memory_allocated), estimate {mib(guess)}, "
                                       f"error {error:+.1%}" + ("" if ok else f" (beyond {ESTIMATE_TOLERANCE:.0%})"),
                 data=data)


def train_job(method: str, scratch: Path, steps: int = STEPS, model: str | None = None) -> tuple[dict, dict]:
    """Train in a process of its own (bench/_run_one.py keeps its run folder under ``scratch``)."""
    from jobs.estimate.estimator import estimate
    from jobs.spec import parse_spec

    spec = job_spec(method, steps, model)
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "in.json").write_text(json.dumps({"spec": spec, "scratch": str(scratch)}))
    out = scratch / "out.json"
    try:
        done = subprocess.run([sys.executable, "-m", "bench._run_one", "--worker", "train", str(scratch / "in.json"),
                               str(out)], cwd=ROOT, env=worker_env(), capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        output = f"timed out after {TIMEOUT_S} s"
    result = json.loads(out.read_text()) if out.is_file() else {"error": output[-1500:]}
    try:
        predicted = estimate(parse_spec({**spec, "output_dir": str(scratch / "run")}), "cuda")
    except Exception as e:  # noqa: BLE001 - reported as the check's failure
        predicted = {"error": f"{type(e).__name__}: {e}"}
    return result, predicted


def check_export(run_dir: Path, out: Path) -> Check:
    done = subprocess.run([sys.executable, "-m", "studio.cli", "export", str(run_dir), "--merged", str(out)],
                          cwd=ROOT, env=worker_env(preload=False), capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
        return Check("merged_export", False, f"export refused or failed: {(done.stderr or done.stdout)[-800:]}")
    report = json.loads(done.stdout[done.stdout.index("{"):])
    diff = report.get("max_abs_logit_diff_vs_trained")
    if diff is None:
        return Check("merged_export", False, f"the fingerprint was not checked: {report.get('fingerprint')}", data=report)
    return Check("merged_export", True, f"matches the trained fingerprint: largest logit difference {diff:.3g} "
                                        f"(allowed {report.get('allowed_diff_vs_trained')})", data=report)


def check_jobs(scratch: Path, steps: int = STEPS, model: str | None = None) -> list[Check]:
    checks = []
    for method in ("lora", "qlora"):
        started = time.perf_counter()
        result, predicted = train_job(method, scratch / method, steps, model)
        check = judge_job(method, result, predicted)
        check.seconds = round(time.perf_counter() - started, 1)
        checks.append(check)
    started = time.perf_counter()
    run_dir = scratch / "lora" / "run"
    if checks[0].ok or (run_dir / "run.json").is_file():
        export = check_export(run_dir, scratch / "merged")
    else:
        export = Check("merged_export", False, "the LoRA job did not leave a run to export")
    export.seconds = round(time.perf_counter() - started, 1)
    return checks + [export]


# -- 4. both engines on NCCL -----------------------------------------------------------------------

def check_engines(gpu_count: int) -> list[Check]:
    if gpu_count < 2:
        return [Check("nccl_engines", True, f"not possible here: {gpu_count} GPU (two or more run DDP and FSDP2 on NCCL)",
                      data={"not_applicable": True})]
    from jobs.runfolder import read_run
    from jobs.runner.submit import submit_job
    from jobs.runner.store import JobStore, Status
    from jobs.runner.worker import spawn

    checks = []
    for sharding in ("none", "fsdp"):
        started = time.perf_counter()
        home = Path(tempfile.mkdtemp(prefix=f"gpu-check-{sharding}-"))
        spec = job_spec("lora")
        spec.pop("output_dir", None)
        spec["training"].update(devices=2, sharding=sharding)
        try:
            job = submit_job(home, spec, name=f"nccl-{sharding}")
        except Exception as e:  # noqa: BLE001 - refused before launch: this engine's failure, not the other's
            checks.append(Check(f"nccl_{sharding}", False, f"refused: {e}", round(time.perf_counter() - started, 1)))
            continue
        store = JobStore(home)
        store.claim(job.id, "0,1")
        proc = spawn(home, store.get(job.id), {"CUDA_VISIBLE_DEVICES": "0,1"})
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
        done, run = store.get(job.id), read_run(store.get(job.id).run_dir) or {}
        ok = (done.status == Status.COMPLETED and run.get("world_size") == 2
              and str(run.get("device", "")).startswith("cuda"))
        detail = (f"2 ranks on NCCL completed, loss {run.get('metrics', {}).get('train_loss')}" if ok else
                  f"status {Status(done.status).value}, world size {run.get('world_size')}, device "
                  f"{run.get('device')}: {done.error}")
        checks.append(Check(f"nccl_{sharding}", ok, detail, round(time.perf_counter() - started, 1),
                            {"log_tail": _log(done.run_dir)[-3000:]} if not ok else {}))
    return checks


def _log(run_dir: str) -> str:
    path = Path(run_dir) / "log.txt"
    return path.read_text(errors="replace") if path.is_file() else ""


# -- the command -------------------------------------------------------------------------------------

def cuda_devices() -> tuple[int, str]:
    """How many CUDA devices this process sees, and the first one's name."""
    import torch

    if not torch.cuda.is_available():
        return 0, ""
    return torch.cuda.device_count(), torch.cuda.get_device_name(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS, help="where the summary goes")
    args = p.parse_args(argv)
    count, name = cuda_devices()
    if not count:
        print(NO_CUDA_MESSAGE, file=sys.stderr, flush=True)
        return NO_CUDA
    say(f"{count} x {name}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        checks = run_checks([("cuda_tests", check_cuda_tests), ("jobs", lambda: check_jobs(Path(tmp))),
                             ("nccl_engines", lambda: check_engines(count))])
    md, _ = write_summary(name, count, checks, args.out)
    print(md.read_text())
    return verdict(checks)


if __name__ == "__main__":
    sys.exit(main())
