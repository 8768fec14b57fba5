"""One change to our loop, measured step by step against the loop without it, in one process.

    python -m bench.ab [--changes NAME ...] [--rounds N] [--steps K] [--long-rows] [--name NAME]
    (or python -m bench --only ab)

``bench.speed`` compares systems that cannot share a process, so each run is its own process
and the machine's drift between runs (on a shared VM, up to 1.6x within minutes) widens the
ranges until a real difference can read as a tie. A change to our own loop does not need
that: both variants are built in one process the way a job builds its model
(``jobs.training.trainee.build_trainee``), from the same seed, and take turns on the same batches:
``steps`` optimizer steps of one, then the same steps of the other, the order alternating
from round to round (ABBA). Each round gives one paired ratio, taken seconds apart, so drift
falls on both sides of it. The result is the median ratio with its min-max over the rounds;
a change whose rounds do not all fall on the same side of 1 is called a tie.

Speed only: the two variants share the process, so its peak memory belongs to neither
(``bench.speed``'s process legs and ``bench.memory`` measure memory). Because both start
from the same weights and see the same batches at the same learning rate, each round also
records both variants' losses: a change that should leave the maths alone shows it.

The changes (``CHANGES``): the shared prefix, the lean activation functions, and
``torch.compile`` of the decoder layers, which the loop does not use. Compiling needs the
lean functions and the shared prefix off (their custom autograd functions, and the prefix's
first, key/value-cache version, made dynamo recompile for every layer), so it is measured
twice: against the same loop uncompiled (what compiling buys), and against the loop as it ships.

Writes ``bench/results/ab.json`` (``--name`` for another file name).
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench import common
from bench.common import (compute_device, demo_spec, merge, quiet_eval, run_isolated, say, sync, warm_model_cache,
                          worker_main, write_result)
from bench.speed import spread

# A variant is the demo spec's training section with these settings, compiled or not.
VARIANTS = {
    "shipped": {},
    "no_share_prefix": {"share_prefix": False},
    "no_lean": {"lean_activations": False},
    "plain": {"share_prefix": False, "lean_activations": False},
    "compiled": {"share_prefix": False, "lean_activations": False},
}
COMPILED = {"compiled"}


@dataclass(frozen=True)
class Change:
    about: str
    with_it: str      # the variant that has the change
    without: str      # the variant that does not


CHANGES = {
    "share_prefix": Change("the shared prefix (training.share_prefix)", "shipped", "no_share_prefix"),
    "lean_activations": Change("the lean norm, SwiGLU and attention functions (training.lean_activations)",
                               "shipped", "no_lean"),
    "compile": Change("torch.compile of each decoder layer, lean functions and shared prefix off, against the "
                      "same loop uncompiled", "compiled", "plain"),
    "compile_vs_shipped": Change("torch.compile of each decoder layer (lean functions and shared prefix off) "
                                 "against the loop as it ships", "compiled", "shipped"),
}
DEFAULT = {"rounds": 8, "steps": 3, "changes": ("share_prefix", "lean_activations", "compile", "compile_vs_shipped")}
TIMEOUT_S = 1800
WARMUP_BATCHES = 3


def run(full: bool = False, results_dir: Path | None = None, *, changes: tuple[str, ...] | None = None,
        rounds: int | None = None, steps: int | None = None, long_rows: bool = False, spec: dict | None = None,
        name: str = "ab", compile_backend: str = "inductor") -> dict:
    """``compile_backend``: torch.compile's backend for the compiled variant (``inductor`` generates
    kernels; ``aot_eager`` traces the same graphs, forward and backward, without generating any)."""
    changes = tuple(changes or DEFAULT["changes"])
    unknown = sorted(set(changes) - set(CHANGES))
    if unknown:
        raise SystemExit(f"unknown change(s) {', '.join(unknown)}; known: {', '.join(CHANGES)}")
    rounds = rounds or DEFAULT["rounds"] * (2 if full else 1)
    steps = steps or DEFAULT["steps"]
    if rounds < 2 or steps < 1:
        raise SystemExit("--rounds must be at least 2 (the order alternates) and --steps at least 1")
    spec = merge(spec or demo_spec(), quiet_eval())
    if long_rows:
        from bench.speed import long_rows_spec
        spec = long_rows_spec(spec, common.RAW / "long_rows.jsonl")
    started = time.perf_counter()
    warm_model_cache(spec["model"])
    results = {}
    for change in changes:
        c = CHANGES[change]
        say(f"ab: {change}: {c.with_it} against {c.without}, {rounds} rounds of {steps} steps each")
        result = run_isolated("bench.ab", "pair", {"spec": spec, "with_it": c.with_it, "without": c.without,
                                                   "rounds": rounds, "steps": steps,
                                                   "compile_backend": compile_backend},
                              f"ab-{change}", TIMEOUT_S, preload=True)
        results[change] = {"about": c.about, "with_it": c.with_it, "without": c.without,
                           **(result if "error" in result else summarise(result))}
        say("  " + (f"failed: {result['error']}" if "error" in result else verdict_text(results[change])))
    first = next((r for r in results.values() if "error" not in r), {})
    payload = {"settings": {"rounds": rounds, "steps_per_round": steps, "order": "ABBA by round, same batches",
                            "rows": "conversations" if long_rows else "demo", "spec": spec,
                            "compile_backend": compile_backend,
                            "variants": {v: {"training": VARIANTS[v], "compiled": v in COMPILED} for v in VARIANTS}},
               "device": first.get("device"), "device_name": first.get("device_name"), "dtype": first.get("dtype"),
               "changes": results,
               "failures": [f"{k}: {r['error']}" for k, r in results.items() if "error" in r],
               "suite_seconds": time.perf_counter() - started}
    path = write_result(name, payload, results_dir)
    say(f"ab: wrote {path}")
    return payload


# ---------------------------------------------------------------- summary

def summarise(result: dict) -> dict:
    """Per-round speedups (the variant without the change's seconds over the one with it) and their spread."""
    a, b = result["seconds"]["with_it"], result["seconds"]["without"]
    ratios = [without / with_it for with_it, without in zip(a, b)]
    low, high = min(ratios), max(ratios)
    return {**result,  # the rounds' own seconds and losses stay in the file
            "seconds_per_step": {side: spread([s / result["steps"] for s in result["seconds"][side]])
                                 for side in ("with_it", "without")},
            "round_speedups": ratios,
            "speedup": statistics.median(ratios), "speedup_min": low, "speedup_max": high,
            "verdict": "faster" if low > 1.0 else "slower" if high < 1.0 else "tie"}


def verdict_text(r: dict) -> str:
    return (f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) with the change: {r['verdict']}; "
            f"largest loss difference {r['max_loss_difference']:.2g} (relative)")


# ---------------------------------------------------------------- worker (both variants in one process)

def _pair(params: dict) -> dict:
    import torch

    from jobs.training import models
    from jobs.data.examples import collate, plan_batches, prepare
    from jobs.spec import parse_spec
    from jobs.training.trainee import build_trainee

    scratch = Path(params["scratch"])
    names = {"with_it": params["with_it"], "without": params["without"]}
    specs = {side: parse_spec(merge(params["spec"], {"output_dir": str(scratch / side),
                                                     "training": VARIANTS[variant]}))
             for side, variant in names.items()}
    base = specs["with_it"]
    device, dtype_name = compute_device(base.training.precision)
    dev, dtype = torch.device(device), getattr(torch, dtype_name)
    src = models.resolve(base.model)
    tokenizer = models.load_tokenizer(src)
    data = prepare(base.dataset, tokenizer, base.training.max_seq_len, base.training.seed)
    trainees, warmup, compiled = {}, {}, None
    for side, spec in specs.items():
        method, mcfg = spec.method_config()
        rule, rcfg = spec.optimizer_config()
        trainees[side] = (rcfg, build_trainee(spec, method, mcfg, rule, rcfg, dev, dtype, src, tokenizer))
        if names[side] in COMPILED:
            compiled = compile_layers(trainees[side][1].model, params.get("compile_backend", "inductor"))

    lengths = [len(e.input_ids) for e in data.train]
    plan = plan_batches(lengths, base.training.batch_size, base.training.seed, 0)

    def one_step(side: str, rows: list[int]) -> float:
        rcfg, trainee = trainees[side]
        batch = {k: v.to(dev) for k, v in collate([data.train[i] for i in rows], tokenizer.pad_token_id).items()}
        count = sum(data.train[i].trained for i in rows)
        return float(trainee.stepper.step([batch], trainee.loss_fn(count), rcfg.lr))

    # Warm-up, untimed: the first batches, once per side. The first is the plan's longest, so
    # the allocator has grown to its size; compilation happens here (dynamic shapes: a second
    # length makes the graph shape-generic, and later lengths reuse it).
    rounds, steps = params["rounds"], params["steps"]
    used = [plan[i % len(plan)] for i in range(rounds * steps)]
    for side in trainees:
        started = time.perf_counter()
        for rows in used[:WARMUP_BATCHES]:
            one_step(side, rows)
        sync(device)
        warmup[side] = time.perf_counter() - started
    # Both sides trained on the same batches from the same start: they stay together exactly as
    # far as the change leaves the maths alone, which the losses recorded below show.
    seconds = {"with_it": [], "without": []}
    losses = {"with_it": [], "without": []}
    for r in range(rounds):
        batch_rows = used[r * steps:(r + 1) * steps]
        for side in (("with_it", "without") if r % 2 == 0 else ("without", "with_it")):
            sync(device)
            started = time.perf_counter()
            losses[side] += [one_step(side, rows) for rows in batch_rows]
            sync(device)
            seconds[side].append(time.perf_counter() - started)
    differences = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses["with_it"], losses["without"])]
    return {"device": device, "device_name": common.device_name(device), "dtype": dtype_name,
            "rounds": rounds, "steps": steps, "seconds": seconds, "losses": losses,
            "max_loss_difference": max(differences), "warmup_seconds": warmup, "compiled_layers": compiled,
            "warmup_batches": min(WARMUP_BATCHES, len(used)), "rows_per_batch": base.training.batch_size}


def compile_layers(model, backend: str = "inductor") -> int:
    """``torch.compile`` each decoder layer (regional compilation: the layers share one compiled
    graph, so compiling costs one layer's time, not the model's); how many were compiled."""
    import torch

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # Past the limit dynamo would quietly run the layers eagerly, and the "compiled" side would not be.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise RuntimeError("no decoder layers found to compile")
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return len(layers)


# ---------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    parser.add_argument("--changes", nargs="+", choices=sorted(CHANGES), help="default: all")
    parser.add_argument("--rounds", type=int, help=f"paired rounds (default {DEFAULT['rounds']})")
    parser.add_argument("--steps", type=int, help=f"optimizer steps per side and round (default {DEFAULT['steps']})")
    parser.add_argument("--long-rows", action="store_true", help="the speed benchmark's conversations, not the demo rows")
    parser.add_argument("--name", default="ab", help="result file name (default ab)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled variant (default inductor)")
    parser.add_argument("--results-dir", type=Path, help="where the result goes (default bench/results)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    run(changes=tuple(args.changes or ()) or None, rounds=args.rounds, steps=args.steps, long_rows=args.long_rows,
        name=args.name, results_dir=args.results_dir, compile_backend=args.compile_backend)


if __name__ == "__main__":
    import sys

    if "--worker" in sys.argv:
        worker_main({"pair": _pair})
    else:
        main()
