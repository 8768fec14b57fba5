"""UI responsiveness while a job trains: latency of the studio's ``list_jobs`` endpoint.

The studio runs as a user starts it (``python app.py`` in its own process, with its
in-process scheduler); a LoRA job on the bundled model trains on the same machine, and a
gradio_client script calls ``list_jobs`` (and ``job_status``) in a loop, as a script or a
page polling the queue would. Latency is measured at the client, end to end: HTTP, the
queue, reading the store and every run folder. Idle latency (no job) is measured first,
so the two can be compared. Target: 95th percentile under 300 ms while the job trains.

``python -m bench.ui_latency [--calls N] [--model REF]``; writes bench/results/ui_latency.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import HOME, ROOT, demo_spec, merge, quiet_eval, say, warm_model_cache, worker_env, write_result

TARGET_P95_MS = 300.0
DEFAULT = {"calls": 200, "idle_calls": 50, "pause": 0.05}
FULL = {"calls": 600, "idle_calls": 150, "pause": 0.05}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(ms: list[float]) -> dict:
    return {"calls": len(ms), "p50_ms": percentile(ms, 0.5), "p95_ms": percentile(ms, 0.95),
            "p99_ms": percentile(ms, 0.99), "max_ms": max(ms), "mean_ms": statistics.fmean(ms)}


def timed_calls(client, endpoint: str, args: tuple, n: int, pause: float) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        client.predict(*args, api_name=endpoint)
        out.append((time.perf_counter() - started) * 1000)
        time.sleep(pause)
    return out


def start_studio(home: Path, port: int) -> subprocess.Popen:
    log = open(home / "studio.log", "w", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--home", str(home), "--port", str(port)],
                            cwd=ROOT, env={**worker_env(), "STUDIO_HOME": str(home)}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the studio exited with code {proc.returncode}; see {home / 'studio.log'}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise TimeoutError("the studio did not answer within 180 s")


def wait_status(client, job_id: int, ok, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = client.predict(job_id, api_name="/job_status")
        if ok(s):
            return s
        if s["status"] in ("failed", "interrupted"):
            raise RuntimeError(f"the job {s['status']}: {s['error']}")
        time.sleep(1.0)
    raise TimeoutError(f"job {job_id} not ready after {timeout:.0f} s")


def measure(model: str | None, calls: int, idle_calls: int, pause: float) -> dict:
    from gradio_client import Client

    spec = merge(demo_spec(**quiet_eval()), {"training": {"max_steps": 100_000}})
    if model:
        spec["model"] = model
    warm_model_cache(spec["model"])
    home = Path(tempfile.mkdtemp(prefix="ui-latency-"))
    # Share the converted bundled model with the other benchmarks instead of converting again.
    (HOME / "models").mkdir(parents=True, exist_ok=True)
    os.symlink(HOME / "models", home / "models")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    say(f"studio on port {port}, home {home}")
    app = start_studio(home, port)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    job = None
    try:
        idle = timed_calls(client, "/list_jobs", (), idle_calls, pause)
        say(f"idle list_jobs p95 {percentile(idle, 0.95):.1f} ms")
        job = client.predict(spec, "latency-bench", 0, api_name="/launch")
        state = wait_status(client, job["id"], lambda s: s["status"] == "running" and (s["step"] or 0) >= 2, 900)
        say(f"job {job['id']} training (step {state['step']}); measuring {calls} calls")
        busy = timed_calls(client, "/list_jobs", (), calls, pause)
        detail = timed_calls(client, "/job_status", (job["id"],), max(calls // 4, 10), pause)
        after = client.predict(job["id"], api_name="/job_status")
        if after["status"] != "running":
            raise RuntimeError(f"the job stopped during the measurement ({after['status']})")
        steps = (state["step"], after["step"])
    finally:
        if job is not None:
            try:
                client.predict(job["id"], api_name="/cancel")
                wait_status(client, job["id"], lambda s: s["status"] not in ("queued", "running"), 180)
            except Exception as e:  # still stop the studio below
                say(f"could not stop the job cleanly: {e}")
        app.terminate()
        app.wait(30)
        shutil.rmtree(home, ignore_errors=True)
    return {"idle_list_jobs": summary(idle), "training_list_jobs": summary(busy), "training_job_status":
            summary(detail), "job_steps_during_measurement": list(steps), "model": spec["model"],
            "target_p95_ms": TARGET_P95_MS, "meets_target": percentile(busy, 0.95) < TARGET_P95_MS}


def run(full: bool = False, model: str | None = None, calls: int | None = None) -> dict:
    cfg = dict(FULL if full else DEFAULT)
    if calls:
        cfg["calls"] = calls
    result = measure(model, cfg["calls"], cfg["idle_calls"], cfg["pause"])
    path = write_result("ui_latency", result)
    busy = result["training_list_jobs"]
    say(f"list_jobs while training: p50 {busy['p50_ms']:.1f} ms, p95 {busy['p95_ms']:.1f} ms "
        f"(target < {TARGET_P95_MS:.0f} ms) -> {path.relative_to(ROOT)}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ui_latency", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more calls")
    parser.add_argument("--calls", type=int, help="list_jobs calls while the job trains")
    parser.add_argument("--model", help="base model (default: the demo spec's bundled SmolLM2)")
    args = parser.parse_args(argv)
    result = run(args.full, args.model, args.calls)
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
