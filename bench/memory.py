"""The memory ladder: the peak memory of every method and update rule, beside the estimator's prediction.

    python -m bench.memory [--full]        (or python -m bench --only memory)

Same model (SmolLM2-135M-Instruct), data (the bundled date task), batch (4 rows), sequence
cap (128 tokens) and precision (fp32, as the targets are stated) for every run; each run is its own
process (``bench/_run_one.py``), so its peak is its own. The floor is an inference-only
pass over the same first batch. Methods and update rules come from the registries at run
time: what is not registered, or is an invalid combination, is listed as skipped with the
reason. Writes ``bench/results/memory.json``.
"""
from __future__ import annotations

import argparse
import os
import threading

from bench.common import (HOME, demo_spec, device_name, merge, mib, quiet_eval, run_isolated, say, suite_device,
                          warm_model_cache, write_result)

# Two steps: AdamW's moments exist from the first update, so step 2's backward is the
# first to hold weights, moments, gradients and activations together.
STEPS, FULL_STEPS = 2, 6
WORKLOAD = {"training": {"batch_size": 4, "max_seq_len": 128, "grad_accum": 1, "precision": "fp32",
                         "lr_schedule": "constant", "warmup_steps": 0, "gradient_checkpointing": False}}
# Beside every method with AdamW: the update rules on full fine-tuning and on LoRA.
RULE_RUNS = [("full", "sgd"), ("full", "lomo"), ("full", "adalomo"), ("full", "mezo"), ("lora", "mezo"),
             ("lora", "adamw_8bit")]
FULL_EXTRA = [("lora", "paged_adamw_8bit", {}), ("prefix", "mezo", {}), ("lora", "lomo", {}),
              ("lora", "adamw", {"training": {"gradient_checkpointing": True}}),
              ("full", "adamw", {"training": {"gradient_checkpointing": True}}),
              ("qlora", "adamw", {"method": {"bits": 8}})]
TIMEOUT_S = 1800
TUNED_RULES = ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd")  # methods' suggested_lr is for these


def ladder(full: bool) -> list[dict]:
    """The runs (name, method, optimizer, spec overrides), with the methods registered now."""
    from adapters import METHODS

    runs = [{"name": f"{m}+adamw", "method": m, "optimizer": "adamw", "extra": {}} for m in METHODS.names()]
    runs += [{"name": f"{m}+{r}", "method": m, "optimizer": r, "extra": {}} for m, r in RULE_RUNS]
    if full:
        runs += [{"name": f"{m}+{r}" + "".join(f" {k}={v}" for part in extra.values() for k, v in part.items()),
                  "method": m, "optimizer": r, "extra": extra} for m, r, extra in FULL_EXTRA]
    return runs


def spec_for(run: dict, steps: int) -> dict:
    from adapters import METHODS

    optimizer = {"name": run["optimizer"]}
    if run["optimizer"] in TUNED_RULES:
        optimizer["lr"] = METHODS.get(run["method"]).suggested_lr  # the other rules' defaults suit them better
    extra = run["extra"]
    spec = merge(demo_spec(), merge(quiet_eval(), WORKLOAD))
    spec["method"] = {"name": run["method"], **extra.get("method", {})}
    spec["optimizer"] = optimizer
    return merge(spec, {"training": {"max_steps": steps, **extra.get("training", {})}, "output_dir": "unused"})


def measure(name: str, kind: str, spec: dict, predict) -> dict:
    """Run the worker in its own process while this one computes the prediction."""
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(
        run_isolated("bench._run_one", kind, {"spec": spec}, f"memory-{name}", TIMEOUT_S)))
    worker.start()
    try:
        predicted = predict()
    except Exception as e:  # noqa: BLE001 - a failed prediction is a row of the table, not a crash
        predicted = {"error": f"{type(e).__name__}: {e}"}
    worker.join()
    peak, guess = box.get("peak_memory_bytes"), predicted.get("total_bytes")
    return {"name": name, "measured_peak_bytes": peak, "predicted_bytes": guess,
            "error": guess / peak - 1.0 if peak and guess else None, "base_weight_bytes": box.get("base_weight_bytes"),
            "trainable_params": box.get("trainable_params"),
            "predicted_trainable_params": predicted.get("trainable_params"),
            "failure": box.get("error") or predicted.get("error"), "breakdown": predicted.get("breakdown"),
            "phases": box.get("phases")}


def run(full: bool = False) -> dict:
    from adapters import METHODS, UPDATE_RULES
    from adapters.core.errors import StudioError
    from jobs.estimate.estimator import estimate, estimate_inference
    from jobs.spec import check_combination, parse_spec

    # The predictions must see the model as the workers do: from the bench home's converted copy.
    os.environ.setdefault("STUDIO_HOME", str(HOME))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps = FULL_STEPS if full else STEPS
    base = spec_for({"method": "lora", "optimizer": "adamw", "extra": {}}, steps)
    warm_model_cache(base["model"])
    say("memory: inference floor")
    floor = measure("inference", "inference", base, lambda: estimate_inference(parse_spec(base), suite_device()))
    rows, skipped = [], []
    for entry in ladder(full):
        if entry["method"] not in METHODS or entry["optimizer"] not in UPDATE_RULES:
            skipped.append({"name": entry["name"], "reason": "not registered"})
            continue
        spec = spec_for(entry, steps)
        try:
            check_combination(parse_spec(spec))
        except StudioError as e:
            skipped.append({"name": entry["name"], "reason": e.message})
            continue
        say(f"memory: {entry['name']}")
        row = measure(entry["name"], "train", spec, lambda: estimate(parse_spec(spec), suite_device()))
        rows.append({"name": row.pop("name"), "method": entry["method"], "optimizer": entry["optimizer"], **row})
        if row["error"] is not None:
            say(f"memory: {entry['name']}: measured {mib(row['measured_peak_bytes'])}, "
                f"predicted {mib(row['predicted_bytes'])} ({row['error']:+.1%})")
        else:
            say(f"memory: {entry['name']}: {row['failure']}")
    found = ratios(floor, rows)
    device = suite_device()
    payload = {"device": device, "device_name": device_name(device),
               "dtype": "float32" if device == "cpu" else "bfloat16", "steps": steps,
               "batch_size": WORKLOAD["training"]["batch_size"], "max_seq_len": WORKLOAD["training"]["max_seq_len"],
               "inference_peak_bytes": floor["measured_peak_bytes"],
               "inference_predicted_bytes": floor["predicted_bytes"],
               **{name: r["value"] for name, r in found.items()},
               "runs": rows, "inference": floor, "skipped": skipped, "ratios": found,
               "settings": {"model": base["model"], "dataset": base["dataset"]["path"], **WORKLOAD["training"]}}
    path = write_result("memory", payload)
    say(f"memory: wrote {path}")
    return payload


def ratios(floor: dict, rows: list[dict]) -> dict:
    """The issue's targets, each as measured/measured in this invocation, and the estimator's accuracy."""
    peak = {r["name"]: r["measured_peak_bytes"] for r in rows}
    held = {r["name"]: r["base_weight_bytes"] for r in rows}

    def ratio(a, b):
        return a / b if a and b else None

    errors = {r["name"]: r["error"] for r in rows if r["error"] is not None}
    return {
        "full_mezo_over_inference": {"value": ratio(peak.get("full+mezo"), floor["measured_peak_bytes"]),
                                     "target_at_most": 1.15},
        "full_lomo_over_full_adamw": {"value": ratio(peak.get("full+lomo"), peak.get("full+adamw")),
                                      "target_at_most": 0.5},
        "qlora_base_over_lora_base": {"value": ratio(held.get("qlora+adamw"), held.get("lora+adamw")),
                                      "target_at_most": 0.35,
                                      "measured_as": "bytes of the frozen weights the applied model holds"},
        "qlora_peak_over_lora_peak": {"value": ratio(peak.get("qlora+adamw"), peak.get("lora+adamw"))},
        "estimator_max_abs_error": {"value": max(map(abs, errors.values()), default=None), "target_at_most": 0.15,
                                    "outside_target": sorted(n for n, e in errors.items() if abs(e) > 0.15)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help=f"{FULL_STEPS} steps per run and more combinations")
    args = parser.parse_args(argv)
    payload = run(full=args.full)
    return 0 if all(r["measured_peak_bytes"] for r in [payload["inference"], *payload["runs"]]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
