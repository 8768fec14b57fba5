"""Quality ladder: held-out loss and exact match of every registered method at one step budget.

The methods are read from ``adapters.METHODS`` when the benchmark runs, so a method added
to ``adapters/`` joins the ladder without editing this file. Each trains with AdamW at its
own ``suggested_lr`` times one factor: the demo spec's learning rate over the suggested
rate of the demo's method (LoRA: 1e-3 / 2e-4 = 5). The suggested rates are meant for
long runs on real models; the demo spec tunes a short run, and the same factor carries
that tuning over to every method. The untrained base model is the floor.

A method that fails (an error, a diverging loss) is kept in the table with its message.
"""
from __future__ import annotations

from pathlib import Path

from bench.common import (compute_device, demo_spec, device_name, merge, process_peak_memory, run_isolated, say,
                          train_timed, warm_model_cache, with_budget, worker_main, write_result)

# The default must fit a 2-core CPU: a dozen methods x (process start, model load, steps,
# evaluation). 12 steps show which methods learn fastest; --full gives the demo's own budget.
DEFAULT = {"steps": 12, "eval_rows": 16, "timeout": 1800}
FULL = {"steps": None, "eval_rows": 80, "timeout": 3600}  # None: the demo spec's own step count
BASE = "base model (untrained)"


def run(full: bool = False, *, spec: dict | None = None, steps: int | None = None, eval_rows: int | None = None,
        methods: list[str] | None = None, results_dir: Path | None = None) -> dict:
    budget = FULL if full else DEFAULT
    base = spec or demo_spec()
    steps = steps or budget["steps"] or base["training"]["max_steps"]
    eval_rows = eval_rows or budget["eval_rows"]
    listing = run_isolated("bench.quality", "methods", {}, "quality-methods")
    if "error" in listing:
        raise RuntimeError(f"could not list the registered methods: {listing['error']} (see {listing['log']})")
    registered = {m["name"]: m for m in listing["methods"]}
    unknown = sorted(set(methods or []) - set(registered))
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(sorted(registered))}")
    reference = base["method"]["name"]
    scale = base["optimizer"]["lr"] / registered[reference]["suggested_lr"]
    common = with_budget(merge(base, {
        "dataset": {"max_eval_rows": eval_rows},
        "training": {"eval_every": 0, "save_every": 0, "exact_match_rows": eval_rows, "eval_samples": 2,
                     "log_every": 1}}), steps)
    warm_model_cache(common["model"])

    say(f"quality: {BASE}")
    floor = run_isolated("bench.quality", "base", {"spec": common}, "quality-base")
    rows = [{"method": BASE, "lr": None, **_row(floor)}]
    for name in methods or sorted(registered):
        lr = registered[name]["suggested_lr"] * scale
        method = base["method"] if name == reference else {"name": name}
        mspec = merge(common, {"optimizer": {"name": "adamw", "lr": lr}})
        mspec["method"] = method
        say(f"quality: {name} (lr {lr:.2g}, {steps} steps)")
        result = run_isolated("bench.quality", "train", {"spec": mspec}, f"quality-{name}",
                              timeout=budget["timeout"])
        rows.append({"method": name, "lr": lr, "summary": registered[name]["summary"], **_row(result)})
        say("  " + (f"failed: {rows[-1]['error']}" if rows[-1]["status"] == "failed" else
                    f"eval loss {rows[-1]['eval_loss']:.3f}, exact match {rows[-1]['exact_match']:.0%}"))
    device = next((r for r in rows if r.get("device")), {})
    payload = {"settings": {"steps": steps, "eval_rows": eval_rows, "lr_scale": scale, "lr_reference": reference,
                            "optimizer": "adamw", "spec": common},
               "device": device.get("device"), "device_name": device.get("device_name"), "dtype": device.get("dtype"),
               "rows": rows, "failed": [r["method"] for r in rows if r["status"] == "failed"]}
    write_result("quality", payload, results_dir)
    return payload


KEPT = ("eval_loss", "exact_match", "train_loss", "trainable_params", "total_params", "train_seconds",
        "peak_memory_bytes", "memory_kind", "device", "device_name", "dtype", "samples", "wall_seconds")


def _row(result: dict) -> dict:
    if "error" in result:
        return {"status": "failed", "error": result["error"], "log": result.get("log")}
    return {"status": "ok", **{k: result.get(k) for k in KEPT}}


# ---------------------------------------------------------------- workers (one run per process)

def _methods(params: dict) -> dict:
    from adapters import METHODS

    return {"methods": [{"name": name, "suggested_lr": m.suggested_lr, "summary": m.summary}
                        for name, m in METHODS.items()]}


def _train(params: dict) -> dict:
    device, dtype = compute_device()
    record, _ = train_timed(params["spec"], Path(params["scratch"]) / "run")
    m = record["metrics"]
    return {**{k: m.get(k) for k in ("eval_loss", "exact_match", "train_loss", "trainable_params", "total_params",
                                     "train_seconds")},
            "samples": record.get("samples", []), "device": device, "device_name": device_name(device),
            "dtype": dtype, **process_peak_memory(device)}


def _base(params: dict) -> dict:
    """The untrained model, evaluated exactly as the training loop evaluates a finished run."""
    import contextlib

    import torch

    from jobs.training import models
    from jobs.data.examples import collate, prepare
    from jobs.training.evaluate import evaluate
    from jobs.spec import parse_spec

    device, dtype = compute_device()
    spec = parse_spec(merge(params["spec"], {"output_dir": str(Path(params["scratch"]) / "run")}))
    t = spec.training
    src = models.resolve(spec.model)
    tokenizer = models.load_tokenizer(src)
    data = prepare(spec.dataset, tokenizer, t.max_seq_len, t.seed)
    torch_dtype = getattr(torch, dtype)
    model = models.load_model(src, torch_dtype, spec.trust_remote_code).to(device)
    model.config.use_cache = False
    autocast = (contextlib.nullcontext if torch_dtype == torch.float32
                else lambda: torch.autocast(device, dtype=torch_dtype))
    result = evaluate(model, tokenizer, data.eval, lambda ex: collate(ex, tokenizer.pad_token_id), spec,
                      torch.device(device), autocast)
    n_params = sum(p.numel() for p in model.parameters())
    return {"eval_loss": result.get("eval_loss"), "exact_match": result.get("exact_match"),
            "samples": result.get("samples", []), "trainable_params": 0, "total_params": n_params,
            "train_seconds": 0.0, "device": device, "device_name": device_name(device), "dtype": dtype,
            **process_peak_memory(device)}


if __name__ == "__main__":
    worker_main({"methods": _methods, "train": _train, "base": _base})
