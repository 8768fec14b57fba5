"""Efficiency: achieved training FLOP/s of full fine-tuning and LoRA against this machine's matmul rate.

The matmul rate is measured in the same invocation (square ``torch.mm``, in its own
process): fp32 always, and the training dtype too when it differs (bf16 on a GPU).

Model FLOPs count the work a step needs, not the work it happens to do (recomputation in
backward is not counted). Per optimizer step, with T real (non-padding) tokens, P trained
positions, R rows, L = T / R the mean row length:

- a linear weight of N elements costs 2N per token forward, 2N backward for the input
  gradient and 2N for the weight gradient; a frozen weight skips the last;
- the output projection (N_head = vocab x hidden) runs only on trained positions in our
  loss (``jobs/training/loss.py``), so it counts P tokens, not T;
- causal attention costs 2·L·d per token and layer forward, twice that backward.

    full:  6·N_body·T + 6·N_head·P + 6·layers·d·L·T
    LoRA:  4·N_body·T + 4·N_head·P + 6·N_adapter·T + 6·layers·d·L·T

N_body is every linear weight of the decoder except the output projection; embeddings are
lookups and cost nothing. For reference the result also gives the conventional 6·N·T with
N every parameter of the base model.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench.common import (compute_device, demo_spec, device_name, merge, process_peak_memory, quiet_eval,
                          run_isolated, say, sync, train_timed, warm_model_cache, with_budget, worker_main,
                          write_result)

DEFAULT = {"steps": 6, "matmul_seconds": 4.0}
FULL = {"steps": 20, "matmul_seconds": 10.0}
MEASURED = ("full", "lora")


def run(full: bool = False, *, spec: dict | None = None, steps: int | None = None,
        matmul_size: int | None = None, results_dir: Path | None = None) -> dict:
    budget = FULL if full else DEFAULT
    steps = steps or budget["steps"]
    base = with_budget(merge(spec or demo_spec(), quiet_eval()), steps)
    warm_model_cache(base["model"])
    say("efficiency: matmul rate")
    peak = run_isolated("bench.efficiency", "matmul",
                        {"seconds": budget["matmul_seconds"], "size": matmul_size}, "efficiency-matmul")
    rows = []
    for name in MEASURED:
        mspec = dict(base)
        if name != base["method"]["name"]:
            mspec["method"] = {"name": name}
        say(f"efficiency: {name}, {steps} steps")
        result = run_isolated("bench.efficiency", "train", {"spec": mspec}, f"efficiency-{name}")
        rows.append({"method": name, **result})
        if "error" in result or "error" in peak:
            say(f"  failed: {result.get('error') or peak.get('error')}")
            continue
        rate = peak["rates"][result["dtype"]]["best_flops_per_second"]
        result = rows[-1]
        result["peak_flops_per_second"] = rate
        result["fraction_of_peak"] = result["model_flops_per_second"] / rate
        # The rate the issue states its target against, whatever dtype the run trained in.
        result["fraction_of_fp32_matmul"] = result["model_flops_per_second"] / \
            peak["rates"]["float32"]["best_flops_per_second"]
        say(f"  {result['model_flops_per_second'] / 1e9:.1f} GFLOP/s = {result['fraction_of_peak']:.0%} "
            f"of the measured {result['dtype']} matmul rate")
    payload = {"settings": {"steps": steps, "spec": base}, "device": peak.get("device"),
               "device_name": peak.get("device_name"), "dtype": next((r["dtype"] for r in rows if "dtype" in r), None),
               "matmul": peak, "rows": rows}
    write_result("efficiency", payload, results_dir)
    return payload


def training_flops(method: str, counts: dict, tokens: int, trained: int, rows: int) -> float:
    mean_len = tokens / max(rows, 1)
    attention = 6 * counts["layers"] * counts["attention_width"] * mean_len * tokens
    if method == "full":
        return 6 * counts["body"] * tokens + 6 * counts["head"] * trained + attention
    return 4 * counts["body"] * tokens + 4 * counts["head"] * trained + 6 * counts["adapter"] * tokens + attention


def model_counts(spec) -> dict:
    """Weight counts of the base model, read from its config on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from jobs.training import models

    src = models.resolve(spec.model)
    config = AutoConfig.from_pretrained(src.path, trust_remote_code=spec.trust_remote_code, **src.kwargs())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return {"body": body, "head": head.weight.numel(), "layers": text.num_hidden_layers,
            "attention_width": text.num_attention_heads * head_dim,
            "all": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------- workers (one run per process)

def _train(params: dict) -> dict:
    from adapters import METHODS
    from jobs.spec import parse_spec

    device, dtype = compute_device()
    data = params["spec"]
    # The method's own usual rate: step time does not depend on it, a sane loss does.
    data = merge(data, {"optimizer": {"lr": METHODS.get(data["method"]["name"]).suggested_lr}})
    spec = parse_spec(merge(data, {"output_dir": "unused"}))
    counts = model_counts(spec)
    record, c = train_timed(data, Path(params["scratch"]) / "run")
    metrics = record["metrics"]
    counts["adapter"] = metrics["trainable_params"] if spec.method_name != "full" else 0
    rows = spec.training.batch_size * spec.training.grad_accum
    steps = list(zip(c["tokens"], c["trained"]))[1:]  # step 1 is left out, as in every timed benchmark
    seconds = c["marks"][-1] - c["marks"][0] if len(c["marks"]) > 1 else 0.0
    flops = sum(training_flops(spec.method_name, counts, t, p, rows) for t, p in steps)
    tokens = sum(t for t, _ in steps)
    return {"model_flops": flops, "measured_seconds": seconds, "measured_steps": len(steps), "tokens": tokens,
            "trained_tokens": sum(p for _, p in steps),
            "model_flops_per_second": flops / max(seconds, 1e-9),
            "flops_6nt_per_second": 6 * counts["all"] * tokens / max(seconds, 1e-9),
            "tokens_per_second": tokens / max(seconds, 1e-9), "counts": counts,
            "trainable_params": metrics["trainable_params"], "device": device, "device_name": device_name(device),
            "dtype": dtype, **process_peak_memory(device)}


def _matmul(params: dict) -> dict:
    import torch

    device, dtype = compute_device()
    size = params.get("size") or (8192 if device == "cuda" else 2048)
    rates = {name: matmul_rate(size, getattr(torch, name), device, params["seconds"])
             for name in dict.fromkeys(["float32", dtype])}
    return {"device": device, "device_name": device_name(device), "threads": torch.get_num_threads(),
            "size": size, "rates": rates}


def matmul_rate(size: int, dtype, device: str, seconds: float) -> dict:
    import torch

    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    for _ in range(2):  # first calls pick kernels and fault in pages
        torch.mm(a, b, out=out)
    sync(device)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        times.append(time.perf_counter() - started)
    work = 2 * size ** 3
    return {"best_flops_per_second": work / min(times), "median_flops_per_second": work / statistics.median(times),
            "repeats": len(times)}


if __name__ == "__main__":
    worker_main({"train": _train, "matmul": _matmul})
