"""Speed and memory against ``transformers.Trainer`` + peft as the model grows.

    python -m bench.scale [--full] [--sizes NAME ...] [--methods lora qlora] [--steps N]
    (or python -m bench --only scale)

The same pair as ``bench/speed.py`` (our loop against Trainer with peft's ``get_peft_model``),
on random-weight models of three published shapes (``bench/random_models.py``: SmolLM2-135M,
Qwen2-0.5B, Qwen2-1.5B) and for two methods:

- LoRA as the demo spec has it (r 8, alpha 16, all linear layers);
- QLoRA: ours is the ``qlora`` method (its NF4 base, double quantization and compute dtype
  as its defaults resolve); Trainer's side loads the model with transformers'
  ``BitsAndBytesConfig`` set to the same quant type, double quantization and compute dtype
  (``device_map`` on the run's device), calls ``peft.prepare_model_for_kbit_training`` as
  peft's QLoRA guide does (with gradient checkpointing as the spec has it, off here, since
  checkpointing is a setting both systems share), then ``get_peft_model`` with the same
  LoRA config.

Both get the demo rows (one ``jobs.data.examples.prepare``), 4 rows per step, the same learning rate,
schedule, steps, seed and precision (``precision: auto``: bf16 on a GPU or an AMX CPU,
fp32 elsewhere). Every run is its own process, and BOTH systems start on the allocator job
processes use (``jobs.training.allocator``, tcmalloc where installed), so the allocator is not part
of the difference here. The two systems alternate which goes first from one pair to the
next. A run that fails (out of memory, an unsupported method) stays in the results with
its error. Writes ``bench/results/scale.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from bench.speed import compare
from bench.common import (compute_device, demo_spec, merge, quiet_eval, run_isolated, say, sync, train_timed,
                          with_budget, worker_main, write_result)

SIZES = ("smollm2-135m", "qwen2-0.5b", "qwen2-1.5b")
METHODS = ("lora", "qlora")
SYSTEMS = ("ours", "trainer")
# Optimizer steps per run by size (the first is not timed): fewer for the larger models, whose
# steps take longer, so that the default run aims at about 12 minutes on 2 cores in fp32, most
# of it the 1.5B runs. A model folder of one's own gets "other".
DEFAULT = {"steps": {"smollm2-135m": 10, "qwen2-0.5b": 5, "qwen2-1.5b": 4, "other": 5}, "repeats": 1}
FULL = {"steps": {"smollm2-135m": 30, "qwen2-0.5b": 16, "qwen2-1.5b": 10, "other": 16}, "repeats": 2}
WORKLOAD = {"training": {"batch_size": 4, "grad_accum": 1}}
TIMEOUT_S = 3600
# A ratio that moves by less than this (relative) from the smallest model to the largest "holds":
# one run per system at a few steps cannot resolve finer changes.
TREND_TOLERANCE = 0.10


def scale_spec(folder: str, method: str, steps: int, base: dict | None = None) -> dict:
    """``base`` (the demo spec) on ``folder``'s model with ``method`` (the base's LoRA settings), cut to ``steps``."""
    base = base or demo_spec()
    spec = with_budget(merge(merge(base, quiet_eval()), WORKLOAD), steps)
    spec["model"] = folder
    spec["method"] = {**base["method"], "name": method}
    return spec


def run(full: bool = False, results_dir: Path | None = None, *, sizes: tuple[str, ...] | None = None,
        methods: tuple[str, ...] | None = None, steps: int | None = None, repeats: int | None = None,
        spec: dict | None = None, folders: dict[str, str] | None = None) -> dict:
    """``sizes``: shapes of ``bench.random_models`` (built on first use); ``folders`` maps further
    names to model folders of one's own, measured after them. ``spec``: the base spec (the demo's)."""
    budget = FULL if full else DEFAULT
    repeats = repeats or budget["repeats"]
    sizes = tuple(SIZES if sizes is None and not folders else sizes or ())
    methods = tuple(methods or METHODS)
    wanted = [(size, {"name": size}) for size in sizes] + [(n, {"folder": str(f)}) for n, f in (folders or {}).items()]
    sizes = tuple(name for name, _ in wanted)
    step_count = {size: steps or budget["steps"].get(size, budget["steps"]["other"]) for size in sizes}
    runs, models, pair = [], {}, 0
    for size, where in wanted:
        say(f"scale: {size}: building (or finding) the model")
        built = run_isolated("bench.scale", "build", where, f"scale-build-{size}", TIMEOUT_S, preload=False)
        models[size] = built
        for method in methods:
            if "error" in built:
                say(f"  {size} {method}: model build failed: {built['error']}")
                runs += [{"size": size, "method": method, "system": system, "repeat": 1,
                          "error": f"model build failed: {built['error']}", "log": built.get("log")}
                         for system in SYSTEMS]
                continue
            mspec = scale_spec(built["folder"], method, step_count[size], spec)
            for repeat in range(1, repeats + 1):
                order = SYSTEMS if (pair + repeat) % 2 else SYSTEMS[::-1]
                for system in order:
                    say(f"scale: {size} {method}: {system}, repeat {repeat}/{repeats}, {step_count[size]} steps")
                    result = run_isolated("bench.scale", system, {"spec": mspec},
                                          f"scale-{size}-{method}-{system}-{repeat}", TIMEOUT_S, preload=True)
                    result.update(size=size, method=method, system=system, repeat=repeat, max_steps=step_count[size],
                                  parameters=built["parameters"])
                    runs.append(result)
                    say("  " + (f"failed: {result['error']}" if "error" in result else
                                f"{result['trained_tokens_per_second']:.1f} trained tok/s, "
                                f"peak {result['peak_memory_bytes'] / 2**20:.0f} MiB"))
            pair += 1
    rows = summarise(runs, sizes, methods, models)
    for row in rows:
        row["steps"] = step_count[row["size"]]
    first = next((r for r in runs if "error" not in r), {})
    trainer_args = next((r["trainer_arguments"] for r in runs if "trainer_arguments" in r), None)
    payload = {
        "settings": {"steps": step_count, "repeats": repeats, "sizes": list(sizes), "methods": list(methods),
                     "order": "ours and Trainer alternate which goes first from one pair to the next",
                     "allocator": "both systems on the job processes' allocator (preload)",
                     # one pair's spec; the model folder, method and steps vary
                     "spec": scale_spec("<model folder>", methods[0], max(step_count.values()), spec)
                     if methods and sizes else None,
                     "trainer_arguments": trainer_args,
                     "trainer_qlora": next((r["quantization"] for r in runs if "quantization" in r), None),
                     "trend_tolerance": TREND_TOLERANCE},
        "device": first.get("device"), "device_name": first.get("device_name"), "dtype": first.get("dtype"),
        "memory_kind": first.get("memory_kind"),
        "models": {size: {k: v for k, v in m.items() if k != "wall_seconds"} for size, m in models.items()},
        "rows": rows, "finding": " ".join(filter(None, [finding(rows), load_note(runs, _cores())])),
        "trends": {m: trends(rows, m) for m in methods},
        "failures": [f"{r['size']} {r['method']} {r['system']} #{r['repeat']}: {r['error']}"
                     for r in runs if "error" in r],
        "runs": runs,
    }
    path = write_result("scale", payload, results_dir)
    say(f"scale: wrote {path}")
    say(f"scale: {payload['finding']}")
    return payload


# ---------------------------------------------------------------- summary

def summarise(runs: list[dict], sizes, methods, models: dict) -> list[dict]:
    """One row per size and method: medians per system and the ratios ours / Trainer."""
    rows = []
    for size in sizes:
        for method in methods:
            mine = [r for r in runs if r["size"] == size and r["method"] == method]
            row = {"size": size, "method": method, "parameters": (models.get(size) or {}).get("parameters"),
                   "errors": {s: r["error"] for s in SYSTEMS for r in mine if r["system"] == s and "error" in r}}
            ok_runs = {system: [r for r in mine if r["system"] == system and "error" not in r] for system in SYSTEMS}
            for system, ok in ok_runs.items():
                row[system] = None if not ok else {
                    "trained_tokens_per_second": statistics.median(r["trained_tokens_per_second"] for r in ok),
                    "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in ok),
                    "trainable_params": ok[0].get("trainable_params"), "runs": len(ok)}
            both = row["ours"] and row["trainer"]
            row["speedup_vs_trainer"] = (row["ours"]["trained_tokens_per_second"] /
                                         row["trainer"]["trained_tokens_per_second"]) if both else None
            # The range the runs' extremes allow, and a tie where the two systems' runs overlap
            # (known only with two runs or more per system: one run has no spread to overlap).
            row["speed_range"], row["speed_tie"] = None, None
            if both:
                ours, theirs = ok_runs["ours"], ok_runs["trainer"]
                c = compare(ours, theirs, "trained_tokens_per_second")
                row["speed_range"] = [c["ratio_min"], c["ratio_max"]]
                row["speed_tie"] = c["tie"] if min(len(ours), len(theirs)) >= 2 else None
            row["memory_ratio_vs_trainer"] = (row["ours"]["peak_memory_bytes"] /
                                              row["trainer"]["peak_memory_bytes"]) if both else None
            # What skipping the vocabulary projection at untrained positions alone would give
            # (model FLOPs; our runs' token counts).
            bounds = [r["projection_speedup"] for r in mine
                      if r["system"] == "ours" and r.get("projection_speedup")]
            row["projection_speedup"] = statistics.median(bounds) if bounds else None
            row["head_share"] = next((r["head_share"] for r in mine if r.get("head_share") is not None), None)
            rows.append(row)
    return rows


def trends(rows: list[dict], method: str) -> dict:
    """How each ratio moves from the smallest model to the largest that both systems finished."""
    done = sorted((r for r in rows if r["method"] == method and r["speedup_vs_trainer"] is not None
                   and r["parameters"]), key=lambda r: r["parameters"])
    out = {"sizes": [r["size"] for r in done]}
    for key, better in (("speedup_vs_trainer", "higher"), ("memory_ratio_vs_trainer", "lower")):
        values = [r[key] for r in done]
        out[key] = {"values": values, "trend": _trend(values, better)}
    return out


def _trend(values: list[float], better: str) -> str:
    """'grows', 'shrinks' or 'holds': what happens to the advantage the ratio states."""
    if len(values) < 2:
        return "unknown"
    change = values[-1] / values[0] - 1.0
    if abs(change) <= TREND_TOLERANCE:
        return "holds"
    return "grows" if (change > 0) == (better == "higher") else "shrinks"


def finding(rows: list[dict]) -> str:
    """A plain-language sentence per method, from the numbers."""
    parts = []
    for method in dict.fromkeys(r["method"] for r in rows):
        t = trends(rows, method)
        done = [r for r in rows if r["method"] == method and r["speedup_vs_trainer"] is not None]
        missing = [r["size"] for r in rows if r["method"] == method and r["speedup_vs_trainer"] is None]
        label = "LoRA" if method == "lora" else "QLoRA" if method == "qlora" else method
        if len(done) < 2:
            parts.append(f"{label}: too few sizes finished on both systems to say how the advantage changes"
                         + (f" (no ratio for {', '.join(missing)})" if missing else "") + ".")
            continue
        done.sort(key=lambda r: r["parameters"])
        speed = t["speedup_vs_trainer"]
        memory = t["memory_ratio_vs_trainer"]
        series = ", ".join(f"{r['speedup_vs_trainer']:.2f}x at {_count(r['parameters'])}" for r in done)
        mems = ", ".join(f"{r['memory_ratio_vs_trainer']:.2f}x" for r in done)
        best = max(done, key=lambda r: r["speedup_vs_trainer"])
        ties = [r["size"] for r in done if r.get("speed_tie")]
        if len(ties) == len(done):  # no size separates the two systems: no trend to read
            text = (f"{label}: ours and Trainer tie on speed at every size (each pair's runs overlap; medians "
                    f"{series} trained tokens/s of Trainer's)")
        else:
            text = (f"{label}: the speed advantage {_verb(speed['trend'])} with size ({series} trained tokens/s of "
                    f"Trainer's)")
            if ties:
                text += f" (a tie at {', '.join(ties)}: the runs overlap)"
            ends = [done[0]["speedup_vs_trainer"], done[-1]["speedup_vs_trainer"]]
            worst = min(done, key=lambda r: r["speedup_vs_trainer"])
            if best["speedup_vs_trainer"] / max(ends) - 1.0 > TREND_TOLERANCE:  # a peak between the ends
                text += f", largest at {best['size']}"
            elif 1.0 - worst["speedup_vs_trainer"] / min(ends) > TREND_TOLERANCE:  # a dip between them
                text += f", smallest at {worst['size']}"
            if min(r["speedup_vs_trainer"] for r in done) < 1.0:
                text += " (below 1x Trainer was the faster)"
        text += (f"; the memory advantage {_verb(memory['trend'])} (peak {mems} of Trainer's)")
        if missing:
            text += f"; no ratio for {', '.join(missing)} (a run failed)"
        parts.append(text + ".")
    return " ".join(parts) or "No runs."


def load_note(runs: list[dict], cores: int | None) -> str | None:
    """A warning when other programs shared the machine while the runs were timed."""
    loads = [r["load_average"][0] for r in runs if r.get("load_average")]
    if not loads or not cores or max(loads) <= cores:
        return None
    return (f"Runs ended at a 1-minute load average of up to {max(loads):.1f} on {cores} cores: other programs "
            "shared the machine, so the speed ratios are rough.")


def _verb(trend: str) -> str:
    return {"holds": f"holds (within {TREND_TOLERANCE:.0%})", "grows": "grows", "shrinks": "shrinks"}.get(trend, trend)


def _cores() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n:,}"


# ---------------------------------------------------------------- workers (one run per process)

def _build(params: dict) -> dict:
    """A random-weight shape's folder (written on first use), or a given folder; its parameter count."""
    from bench.random_models import build, parameters

    started = time.perf_counter()
    if "folder" in params:
        return {"folder": params["folder"], "parameters": _count_parameters(params["folder"])}
    folder = build(params["name"])
    return {"folder": str(folder), "parameters": parameters(params["name"]),
            "build_or_find_seconds": time.perf_counter() - started}


def _count_parameters(folder: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return sum(p.numel() for p in model.parameters())


def _precision(params: dict) -> str:
    return params["spec"].get("training", {}).get("precision", "auto")


def _projection(spec_data: dict, trainable: int, tokens: list[int], trained: list[int]) -> dict:
    """The vocabulary head's share of our run's model FLOPs, and the speedup that projecting only
    the trained positions gives by itself (Trainer's path projects every position)."""
    from bench.efficiency import model_counts, training_flops
    from jobs.spec import parse_spec

    spec = parse_spec(merge(spec_data, {"output_dir": "unused"}))
    counts = {**model_counts(spec), "adapter": trainable}
    rows = spec.training.batch_size * spec.training.grad_accum
    steps = list(zip(tokens, trained))[1:]
    ours = sum(training_flops("lora", counts, t, p, rows) for t, p in steps)
    every = sum(training_flops("lora", counts, t, t, rows) for t, _ in steps)
    head = sum(4 * counts["head"] * t for t, _ in steps)
    return {"projection_speedup": every / ours if ours else None, "head_share": head / every if every else None}


def _ours(params: dict) -> dict:
    from bench.speed import _measure

    device, dtype = compute_device(_precision(params))
    record, c = train_timed(params["spec"], Path(params["scratch"]) / "run")
    losses = c["loss"]
    trainable = (record.get("metrics") or {}).get("trainable_params")
    return {**_measure(c["marks"], c["cpu"], c["trained"], c["tokens"], sum(losses) / max(len(losses), 1),
                       device, dtype),
            "trainable_params": trainable, **_projection(params["spec"], trainable or 0, c["tokens"], c["trained"]),
            "process_cpu_seconds": time.process_time()}


def _quantization(cfg, method_name: str, dtype: str) -> tuple[object, dict]:
    """transformers' BitsAndBytesConfig matching our qlora config (bits, quant type, double
    quantization, compute dtype), and a description for the results."""
    import torch
    from transformers import BitsAndBytesConfig

    from adapters.qlora import DTYPES

    compute = getattr(torch, dtype) if cfg.compute_dtype == "auto" else DTYPES[cfg.compute_dtype]
    if cfg.bits == 8:
        args = {"load_in_8bit": True}
    else:
        args = {"load_in_4bit": True, "bnb_4bit_quant_type": cfg.quant_type,
                "bnb_4bit_use_double_quant": cfg.double_quant, "bnb_4bit_compute_dtype": compute}
    shown = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v) for k, v in args.items()}
    return BitsAndBytesConfig(**args), {"method": method_name, "BitsAndBytesConfig": shown,
                                        "prepare_model_for_kbit_training": True}


def _trainer(params: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from adapters.lora import lora_peft_config
    from bench.speed import _CountingCollator, _measure, trainer_arguments
    from jobs.training import models
    from jobs.data.examples import prepare
    from jobs.spec import parse_spec

    device, dtype = compute_device(_precision(params))
    out = Path(params["scratch"]) / "trainer"
    spec = parse_spec(merge(params["spec"], {"output_dir": str(out)}))
    t = spec.training
    method, mcfg = spec.method_config()
    _, rcfg = spec.optimizer_config()
    src = models.resolve(spec.model)
    tokenizer = models.load_tokenizer(src)
    data = prepare(spec.dataset, tokenizer, t.max_seq_len, t.seed)
    rows = Dataset.from_dict({"input_ids": [e.input_ids for e in data.train],
                              "labels": [e.labels for e in data.train]})
    weights = models.weights_for(src, getattr(torch, dtype))
    quantized = spec.method_name == "qlora"
    extra, described = {}, None
    if quantized:
        bnb_config, described = _quantization(mcfg, spec.method_name, dtype)
        extra = {"quantization_config": bnb_config, "device_map": {"": device}}
    elif spec.method_name != "lora":
        raise ValueError(f"the Trainer side runs lora and qlora, not {spec.method_name}")
    model = AutoModelForCausalLM.from_pretrained(weights.path, dtype=getattr(torch, dtype), **weights.kwargs(),
                                                 **extra)
    model.config.use_cache = False
    if quantized:  # as peft's QLoRA guide has it; checkpointing as the spec says, like ours
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
    torch.manual_seed(t.seed)
    model = get_peft_model(model, lora_peft_config(mcfg))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    collator = _CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    marks, cpu = [], []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            marks.append(time.perf_counter())
            cpu.append(time.process_time())

    arguments = trainer_arguments(spec, rcfg, device, dtype, str(out))
    args = TrainingArguments(**arguments)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[StepClock()])
    output = trainer.train()
    accum = t.grad_accum
    trained = [sum(collator.trained[k * accum:(k + 1) * accum]) for k in range(len(marks))]
    tokens = [sum(collator.tokens[k * accum:(k + 1) * accum]) for k in range(len(marks))]
    result = {**_measure(marks, cpu, trained, tokens, output.training_loss, device, dtype),
              "trainable_params": trainable, "process_cpu_seconds": time.process_time(),
              "trainer_arguments": {**{k: v for k, v in arguments.items() if k != "output_dir"},
                                    "optim": str(args.optim.value if hasattr(args.optim, "value") else args.optim)}}
    if described:
        result["quantization"] = described
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help=f"more steps per run ({', '.join(f'{k}: {v}' for k, v in FULL['steps'].items())}) and "
                             f"{FULL['repeats']} runs each")
    parser.add_argument("--sizes", nargs="+", choices=SIZES, help="model shapes (default: all)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="methods (default: both)")
    default = ", ".join(f"{k}: {v}" for k, v in DEFAULT["steps"].items())
    parser.add_argument("--steps", type=int,
                        help=f"optimizer steps per run for every size (the first is not timed; default {default})")
    parser.add_argument("--repeats", type=int, help="runs per system, size and method")
    parser.add_argument("--results-dir", type=Path, help="where scale.json goes (default bench/results)")
    args = parser.parse_args(argv)
    payload = run(full=args.full, results_dir=args.results_dir, sizes=args.sizes, methods=args.methods,
                  steps=args.steps, repeats=args.repeats)
    return 0 if not payload["failures"] else 1


if __name__ == "__main__":
    if "--worker" in __import__("sys").argv:
        worker_main({"build": _build, "ours": _ours, "trainer": _trainer})
    else:
        raise SystemExit(main())
