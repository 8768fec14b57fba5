"""The web process's memory across every tab and endpoint: it holds no model and no torch.

The studio runs in a process of its own (``python -m bench.web_memory --serve``: the real
app on a fresh home, with its scheduler), and a gradio_client script drives every named
endpoint as a user would: upload a dataset, estimate (twice: the second from the cache),
launch a LoRA job and follow it, compare, generate in the playground, export the merged
model and the adapter, retry, cancel and delete. The page-only handlers (the dataset
preview, the merge note, the device list) are run inside the served process on request.
After each step the web process's resident memory is sampled; at the end it reports its
peak (``ru_maxrss``) and whether torch, transformers, peft or bitsandbytes were ever
imported into it. Target: peak under 500 MB with SmolLM2, and none of them imported.

``python -m bench.web_memory [--model REF]``; writes bench/results/web_memory.json.
``tests/test_web_process.py`` runs the same drive on a tiny model and asserts the imports.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

TARGET_PEAK_MB = 500.0
HEAVY = ("torch", "transformers", "peft", "bitsandbytes")


# -- the served side ---------------------------------------------------------------------

def serve(home: str, model: str) -> None:
    """Run the studio and answer the driver's commands (one JSON line each) on stdin."""
    from studio.ui.app import launch
    from studio.ui.common import Studio

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo, service = launch(home, port=port, default_model=model, block=False, poll_interval=0.3)
    studio = Studio.at(home, model)
    print(json.dumps({"port": port}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "page":
            print(json.dumps(page_handlers(studio, cmd)), flush=True)
        elif cmd["cmd"] == "report":
            print(json.dumps(report()), flush=True)
        else:
            break
    demo.close()
    if service:
        service.stop()


def page_handlers(studio, cmd: dict) -> dict:
    """What the page alone calls (these are not named endpoints): the same work functions."""
    from studio.ui import datasets, export, train

    shown = datasets.preview(studio, cmd["dataset"], studio.default_model, 64)
    note, can_merge = export.describe(studio, cmd["job"])
    return {"preview_rows": len(shown["rows"]), "can_merge": can_merge, "devices": train.device_choices(studio),
            "note": bool(note)}


def report() -> dict:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
    return {"heavy_modules": loaded[:20], "heavy_count": len(loaded),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# -- the driving side --------------------------------------------------------------------

class Served:
    """The studio in a child process, its commands, and its memory as seen from outside."""

    def __init__(self, home: Path, model: str, env: dict | None = None):
        import os

        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.web_memory", "--serve", str(home), model], cwd=root, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **(env or {}), "STUDIO_HOME": str(home),
                                                                 "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"})
        self.port = self._read()["port"]
        self.url = f"http://127.0.0.1:{self.port}/"

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the studio exited with code {self.proc.wait()}")
        return json.loads(line)

    def ask(self, cmd: str, **args: Any) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self) -> None:
        try:
            self.proc.stdin.write('{"cmd": "stop"}\n')
            self.proc.stdin.close()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def tiny_training(model: str, dataset: str) -> dict:
    return {"model": model, "dataset": {"path": dataset, "eval_fraction": 0.2},
            "method": {"name": "lora", "r": 4}, "optimizer": {"name": "adamw", "lr": 1e-2},
            "training": {"max_steps": 3, "batch_size": 4, "max_seq_len": 64, "eval_samples": 1,
                         "exact_match_rows": 2, "max_new_tokens": 4, "lr_schedule": "constant"}}


def wait_done(client, job_id: int, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = client.predict(job_id, api_name="/job_status")
        if s["status"] not in ("queued", "running"):
            return s
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not finish in {timeout:.0f} s")


def drive(served: Served, model: str, data_file: Path, mark: Callable[[str], None]) -> dict:
    """Call every named endpoint once (estimate twice), marking each step."""
    from gradio_client import Client, handle_file

    client = Client(served.url, verbose=False)
    mark("started")
    entry = client.predict(handle_file(str(data_file)), "web-memory-data", api_name="/upload_dataset")
    client.predict(api_name="/list_datasets")
    mark("upload_dataset")
    spec = tiny_training(model, entry["id"])
    timings = {}
    for label in ("estimate_first", "estimate_again"):
        started = time.perf_counter()
        checked = client.predict(spec, "cpu", api_name="/estimate")
        timings[label] = time.perf_counter() - started
        mark(label)
    job = client.predict(spec, "bench", 0, api_name="/launch")
    client.predict(api_name="/list_jobs")
    done = wait_done(client, job["id"])
    if done["status"] != "completed":
        raise RuntimeError(f"the job {done['status']}: {done['error']}\n{done['log']}")
    mark("launch_and_train")
    client.predict([job["id"]], api_name="/compare")
    mark("compare")
    page = served.ask("page", dataset=entry["id"], job=job["id"])
    mark("page_handlers")
    started = time.perf_counter()
    outputs = client.predict("What is 2 plus 2?", [job["id"]], True, "", 8, 0.0, api_name="/generate")
    timings["generate"] = time.perf_counter() - started
    mark("generate")
    for kind in ("merged", "adapter"):
        started = time.perf_counter()
        client.predict(job["id"], api_name=f"/export_{kind}")
        timings[f"export_{kind}"] = time.perf_counter() - started
        mark(f"export_{kind}")
    again = client.predict(job["id"], api_name="/retry")
    client.predict(again["id"], api_name="/cancel")
    wait_done(client, again["id"])
    client.predict(again["id"], api_name="/resume")
    client.predict(again["id"], api_name="/cancel")
    wait_done(client, again["id"])
    client.predict(again["id"], True, api_name="/delete_job")
    mark("retry_cancel_resume_delete")
    return {"seconds": timings, "estimate": {k: checked.get(k) for k in ("available", "verdict", "total_bytes")},
            "outputs": len(outputs), "page": page}


def measure(model: str, data_file: Path, home: Path) -> dict:
    served = Served(home, model)
    samples = []
    try:
        result = drive(served, model, data_file, lambda step: samples.append({"after": step, "rss": served.rss()}))
        final = served.ask("report")
    finally:
        served.stop()
    peak_mb = final["peak_rss_bytes"] / 2**20
    return {**result, "model": model, "rss_after_each_step_mb": [{**s, "rss": round(s["rss"] / 2**20, 1)}
                                                                for s in samples],
            "peak_rss_mb": round(peak_mb, 1), "heavy_modules": final["heavy_modules"],
            "target_peak_mb": TARGET_PEAK_MB,
            "meets_target": peak_mb < TARGET_PEAK_MB and final["heavy_count"] == 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.web_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="base model (default: the bundled SmolLM2)")
    parser.add_argument("--serve", nargs=2, metavar=("HOME", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return 0
    import os

    from bench.common import HOME, demo_spec, say, write_result

    spec = demo_spec()
    model = args.model or spec["model"]
    home = Path(tempfile.mkdtemp(prefix="web-memory-"))
    # Share the converted bundled model with the other benchmarks instead of converting again.
    (HOME / "models").mkdir(parents=True, exist_ok=True)
    os.symlink(HOME / "models", home / "models")
    try:
        result = measure(model, Path(spec["dataset"]["path"]), home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    path = write_result("web_memory", result)
    say(f"web process peak {result['peak_rss_mb']:.0f} MB (target < {TARGET_PEAK_MB:.0f} MB), heavy modules: "
        f"{result['heavy_modules'] or 'none'} -> {path}")
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
