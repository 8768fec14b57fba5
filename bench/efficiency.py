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

Those are the FLOPs a step needs. The FLOPs it does differ: padding positions are computed
too, and a prefix every row of a batch shares is computed once (``jobs/training/prefix.py``). The
same formulas over the positions actually computed, ``R·W`` per micro-batch of R rows padded to
W, or ``W + (R-1)·(W-n)`` with a shared prefix of n, give the FLOPs done.

The square ``torch.mm`` rate is not what a step's matmuls can reach: they run at the model's own
shapes (a micro-batch's positions by each linear layer), where small products run below the
square peak. So each training worker also times, after its run and in its dtype and fp32, every
linear layer's forward, input-gradient and (for trained weights) weight-gradient product at the
mean micro-batch's positions (the output projection at its trained positions): the layer rate,
the limit a step can reach, and the step's FLOP/s are also given as a fraction of that.

``profile=True`` (and ``--full``) also runs a few LoRA steps under ``torch.profiler`` and lists
where the time that is not a matrix product goes.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

from bench.common import (compute_device, demo_spec, device_name, merge, process_peak_memory, quiet_eval,
                          run_isolated, say, sync, train_timed, warm_model_cache, with_budget, worker_main,
                          write_result)

DEFAULT = {"steps": 6, "matmul_seconds": 4.0}
FULL = {"steps": 20, "matmul_seconds": 10.0}
MEASURED = ("full", "lora")


LAYER_RATE_SECONDS = 1.0  # per dtype: each product's best of the repeats that fit
PROFILE_STEPS = 4         # profiled after one untimed step
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math")


def run(full: bool = False, *, spec: dict | None = None, steps: int | None = None,
        matmul_size: int | None = None, results_dir: Path | None = None, profile: bool | None = None,
        name: str = "efficiency", layer_seconds: float = LAYER_RATE_SECONDS) -> dict:
    budget = FULL if full else DEFAULT
    steps = steps or budget["steps"]
    base = with_budget(merge(spec or demo_spec(), quiet_eval()), steps)
    warm_model_cache(base["model"])
    say("efficiency: matmul rate")
    peak = run_isolated("bench.efficiency", "matmul",
                        {"seconds": budget["matmul_seconds"], "size": matmul_size}, "efficiency-matmul")
    rows = []
    for method in MEASURED:
        mspec = dict(base)
        if method != base["method"]["name"]:
            mspec["method"] = {"name": method}
        say(f"efficiency: {method}, {steps} steps")
        result = run_isolated("bench.efficiency", "train", {"spec": mspec, "layer_seconds": layer_seconds},
                              f"efficiency-{method}")
        rows.append({"method": method, **result})
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
        layer = result["layer_rates"][result["dtype"]]
        result["fraction_of_layer_rate"] = result["model_flops_per_second"] / layer
        result["done_fraction_of_layer_rate"] = result["done_flops_per_second"] / layer
        say(f"  {result['model_flops_per_second'] / 1e9:.1f} GFLOP/s = {result['fraction_of_peak']:.0%} "
            f"of the measured {result['dtype']} matmul rate, {result['fraction_of_layer_rate']:.0%} of its rate at "
            f"the model's shapes ({layer / 1e9:.0f} GFLOP/s); FLOPs done / needed "
            f"{result['done_flops'] / result['model_flops']:.2f}")
    payload = {"settings": {"steps": steps, "spec": base}, "device": peak.get("device"),
               "device_name": peak.get("device_name"), "dtype": next((r["dtype"] for r in rows if "dtype" in r), None),
               "matmul": peak, "rows": rows}
    if full if profile is None else profile:
        lora = merge(base, {"training": {"max_steps": PROFILE_STEPS + 1}})
        say(f"efficiency: profiling {PROFILE_STEPS} steps of {lora['method']['name']}")
        payload["profile"] = run_isolated("bench.efficiency", "profile", {"spec": lora}, "efficiency-profile")
    write_result(name, payload, results_dir)
    return payload


def done_flops(method: str, counts: dict, rows: int, width: int, shared: int, trained: int) -> float:
    """FLOPs a micro-batch's step does: ``training_flops`` over the positions computed (padding
    included, a shared prefix once), each attending to at most ``width`` positions."""
    positions = width + (rows - 1) * (width - shared) if shared else rows * width
    return training_flops(method, counts, positions, trained, positions / width)


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
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    body = sum(m.weight.numel() for m in linears)
    shapes: dict[tuple[int, int], int] = {}
    for m in linears:
        shapes[(m.in_features, m.out_features)] = shapes.get((m.in_features, m.out_features), 0) + 1
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return {"body": body, "head": head.weight.numel(), "layers": text.num_hidden_layers,
            "attention_width": text.num_attention_heads * head_dim,
            "all": sum(p.numel() for p in model.parameters()),
            "linears": [[k, n, c] for (k, n), c in shapes.items()],
            "head_shape": [head.in_features, head.out_features]}


# ---------------------------------------------------------------- workers (one run per process)

def _train(params: dict) -> dict:
    import torch

    from adapters import METHODS
    from jobs.spec import parse_spec

    device, dtype = compute_device()
    data = params["spec"]
    # The method's own usual rate: step time does not depend on it, a sane loss does.
    data = merge(data, {"optimizer": {"lr": METHODS.get(data["method"]["name"]).suggested_lr}})
    spec = parse_spec(merge(data, {"output_dir": "unused"}))
    counts = model_counts(spec)
    with _recording_batches() as batches:
        record, c = train_timed(data, Path(params["scratch"]) / "run")
    memory = process_peak_memory(device)  # before the layer rates' operands
    metrics = record["metrics"]
    counts["adapter"] = metrics["trainable_params"] if spec.method_name != "full" else 0
    rows = spec.training.batch_size * spec.training.grad_accum
    steps = list(zip(c["tokens"], c["trained"]))[1:]  # step 1 is left out, as in every timed benchmark
    seconds = c["marks"][-1] - c["marks"][0] if len(c["marks"]) > 1 else 0.0
    flops = sum(training_flops(spec.method_name, counts, t, p, rows) for t, p in steps)
    tokens = sum(t for t, _ in steps)
    timed = batches[spec.training.grad_accum:spec.training.grad_accum * len(c["marks"])]  # micro-batches of steps 2..
    done = sum(done_flops(spec.method_name, counts, *b) for b in timed)
    positions = [b[1] + (b[0] - 1) * (b[1] - b[2]) if b[2] else b[0] * b[1] for b in timed] or [1]
    trained = [b[3] for b in timed] or [1]
    shape = (round(sum(positions) / len(positions)), round(sum(trained) / len(trained)))
    layer_rates = {name: layer_rate(counts, *shape, spec.method_name == "full", getattr(torch, name), device,
                                    params.get("layer_seconds", LAYER_RATE_SECONDS))
                   for name in dict.fromkeys(["float32", dtype])}
    return {"model_flops": flops, "done_flops": done, "done_flops_per_second": done / max(seconds, 1e-9),
            "micro_batches": [list(b) for b in timed], "layer_shape_tokens": shape, "layer_rates": layer_rates,
            "measured_seconds": seconds, "measured_steps": len(steps), "tokens": tokens,
            "trained_tokens": sum(p for _, p in steps),
            "model_flops_per_second": flops / max(seconds, 1e-9),
            "flops_6nt_per_second": 6 * counts["all"] * tokens / max(seconds, 1e-9),
            "tokens_per_second": tokens / max(seconds, 1e-9), "counts": counts,
            "trainable_params": metrics["trainable_params"], "device": device, "device_name": device_name(device),
            "dtype": dtype, **memory}


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


@contextlib.contextmanager
def _recording_batches():
    """(rows, width, shared prefix, trained positions) of every micro-batch the loop trains on
    (forward passes under autograd; evaluation runs without it)."""
    import torch

    from jobs.training import loss, prefix

    seen: list[tuple[int, int, int, int]] = []
    inner = loss.final_hidden

    def final_hidden(model, batch, saved=None, share_prefix=True, call=None):
        if torch.is_grad_enabled():
            rows, width = batch["input_ids"].shape
            shared = prefix.shared_prefix(model, batch) if share_prefix else 0
            seen.append((rows, width, shared, int(loss.trained_positions(batch["labels"]).sum())))
        return inner(model, batch, saved, share_prefix, call)
    loss.final_hidden = final_hidden
    try:
        yield seen
    finally:
        loss.final_hidden = inner


def layer_rate(counts: dict, tokens: int, trained: int, full: bool, dtype, device: str,
               seconds: float = LAYER_RATE_SECONDS) -> float:
    """FLOP/s of a step's matrix products at the model's shapes: each linear layer's forward
    ``x @ W^T`` and input gradient ``g @ W`` over ``tokens`` positions, and its weight gradient
    ``g^T @ x`` when the weights train (``full``); the output projection over ``trained``
    positions. Each product's best time of the repeats that fit in ``seconds``, weighted by how
    many layers have its shape. (LoRA's rank-r products are left out: a few percent of the FLOPs.)"""
    import torch

    products = []  # (a, b, layers): a @ b
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)
    for (k, n, layers), m, trains in [*((tuple(s), tokens, full) for s in counts["linears"]),
                                      ((*counts["head_shape"], 1), trained, full)]:
        x, w, g = rand(m, k), rand(n, k), rand(m, n)
        products += [(x, w.t(), layers), (g, w, layers)] + ([(g.t(), x, layers)] if trains else [])
    best = [float("inf")] * len(products)
    with torch.no_grad():
        for a, b, _ in products:
            torch.mm(a, b)  # first calls pick kernels
        sync(device)
        deadline, rounds = time.perf_counter() + seconds, 0
        while rounds < 3 or time.perf_counter() < deadline:
            for i, (a, b, _) in enumerate(products):
                started = time.perf_counter()
                torch.mm(a, b)
                sync(device)
                best[i] = min(best[i], time.perf_counter() - started)
            rounds += 1
    work = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] * layers for a, b, layers in products)
    return work / sum(t * layers for t, (_, _, layers) in zip(best, products))


def _profile(params: dict) -> dict:
    """Where the time of a few training steps goes, by the profiler's self time per operator: the
    matrix products (and attention) against everything else, whose top items are listed."""
    from torch.profiler import ProfilerActivity, profile

    from jobs.spec import parse_spec
    from jobs.training.recipe import train

    device, dtype = compute_device()
    prof = profile(activities=[ProfilerActivity.CPU])
    spec = parse_spec(merge(params["spec"], {"output_dir": str(Path(params["scratch"]) / "run")}))
    steps: list[float] = []

    def progress(record):
        if record.get("event"):
            return
        steps.append(time.perf_counter())
        if len(steps) == 1:
            prof.start()
        elif len(steps) == PROFILE_STEPS + 1:
            prof.stop()
    train(spec, progress=progress)
    if 1 <= len(steps) <= PROFILE_STEPS:  # the run ended early
        prof.stop()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    others = sorted((e for e in events if e.key not in MATMUL_OPS), key=lambda e: -e.self_cpu_time_total)
    return {"device": device, "dtype": dtype, "method": spec.method_name, "steps": PROFILE_STEPS,
            "wall_seconds_profiled": steps[-1] - steps[0], "self_seconds": total / 1e6,
            "matmul_seconds": matmul / 1e6, "matmul_share": matmul / max(total, 1),
            "top_other": [{"op": e.key, "seconds": e.self_cpu_time_total / 1e6, "calls": e.count,
                           "share": e.self_cpu_time_total / max(total, 1)} for e in others[:15]]}


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.efficiency [--full] [--profile] [--long-rows] [--name NAME]``: this benchmark
    alone, written to results/NAME.json (``python -m bench --only efficiency`` writes efficiency.json)."""
    import argparse

    from bench import common

    parser = argparse.ArgumentParser(prog="python -m bench.efficiency")
    parser.add_argument("--full", action="store_true", help="more steps and a longer matmul measurement")
    parser.add_argument("--profile", action="store_true", help="also profile a few LoRA steps")
    parser.add_argument("--long-rows", action="store_true",
                        help="the speed benchmark's conversations (about 200 tokens) instead of the demo rows")
    parser.add_argument("--name", default="efficiency", help="results file name (default: efficiency)")
    args = parser.parse_args(argv)
    spec = None
    if args.long_rows:
        from bench.speed import long_rows_spec

        spec = long_rows_spec(demo_spec(), common.RAW / "long_rows.jsonl")
    run(args.full, spec=spec, profile=args.profile or None, name=args.name)
    return 0


if __name__ == "__main__":
    import sys

    if "--worker" in sys.argv:
        worker_main({"train": _train, "matmul": _matmul, "profile": _profile})
    else:
        sys.exit(main())
