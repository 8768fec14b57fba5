"""The memory estimator scored out of sample: measured peaks of runs its constants were not fitted on.

    python -m bench.estimator [--full]        (or python -m bench --only estimator)

The estimator's CPU constants (``jobs/estimate/estimator.py``: the allocator slack coefficients and
the process's own bytes) were fitted on the SmolLM2 memory ladder (``bench/memory.py``);
scored on that ladder they are in sample. This benchmark measures two sets of runs, each its
own process on the allocator job processes run on (``bench/_run_one.py``'s ``train``):

  fit             memory-ladder runs on SmolLM2 (bundled model, demo data, 4 rows, sequences
                  capped at 128 tokens, fp32, 2 steps): LoRA, QLoRA, full + AdamW, DoRA, IA3
  out of sample   what the ladder never has: LoRA on batch shapes 1 x 512, 8 x 64 and 16 x 128
                  tokens (conversations of demo questions and answers, truncated to exactly
                  that length), LoRA and full fine-tuning with gradient checkpointing (4 x 256),
                  and a Qwen2-0.5B-shaped model with random weights (LoRA and QLoRA)

Beside each measured peak is the estimator's prediction (``jobs.estimate.estimator.estimate``, computed
in this process while the worker runs). The slack coefficients and a process offset are then
fitted again on the fit set alone (least squares on relative errors, slack coefficients
non-negative) and both the shipped and the refitted constants are scored on both sets:
error = predicted / measured - 1. Target: every out-of-sample run within 10% with the shipped
constants. Writes ``bench/results/estimator.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
from pathlib import Path

from bench import common
from bench.common import (HOME, device_name, merge, mib, run_isolated, say, suite_device, warm_model_cache,
                          write_result)

STEPS, FULL_STEPS = 2, 4
TARGET = 0.10
TIMEOUT_S = 1800
RANDOM_MODEL = "qwen2-0.5b"
# Conversations long enough that every out-of-sample row is truncated to its batch's length.
EXCHANGES = 16
# (name, method, extra spec overrides): the memory ladder's workload (bench/memory.py), no other.
FIT = [("lora", "lora", {}), ("qlora", "qlora", {}), ("full", "full", {}), ("dora", "dora", {}),
       ("ia3", "ia3", {})]
# (name, method, model, (rows, tokens) or None for the demo rows, extra training overrides)
OUT_OF_SAMPLE = [
    ("lora 1x512", "lora", "smollm2", (1, 512), {}),
    ("lora 8x64", "lora", "smollm2", (8, 64), {}),
    ("lora 16x128", "lora", "smollm2", (16, 128), {}),
    ("lora 4x256 checkpointing", "lora", "smollm2", (4, 256), {"gradient_checkpointing": True}),
    ("full 4x256 checkpointing", "full", "smollm2", (4, 256), {"gradient_checkpointing": True}),
    (f"lora {RANDOM_MODEL}", "lora", RANDOM_MODEL, None, {}),
    (f"qlora {RANDOM_MODEL}", "qlora", RANDOM_MODEL, None, {}),
]
# Refit search: slack coefficients on a grid (the prediction is piecewise linear in them: a
# max over phases and a max(0, ...)), the process offset in closed form for each pair.
GRID_STEP, GRID_MAX = 0.01, 2.0


# ---------------------------------------------------------------- the runs

def conversations(dataset: Path, path: Path, exchanges: int | None = None) -> Path:
    """A jsonl of conversations of ``exchanges`` demo questions and answers, every answer trained.

    One conversation starts every ``exchanges // 2`` rows, so there are enough of them for a
    batch of 16 (SmolLM2's template makes one of 16 exchanges about 750 tokens long).
    """
    exchanges = exchanges or EXCHANGES
    rows = [json.loads(line) for line in dataset.read_text(encoding="utf-8").splitlines() if line.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(0, len(rows) - exchanges + 1, max(1, exchanges // 2)):
            messages = []
            for r in rows[i:i + exchanges]:
                question = r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": r["output"]}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return path


def plan(steps: int, fit=None, out_of_sample=None, models: dict | None = None, base: dict | None = None) -> list[dict]:
    """Every run: name, set ("fit" or "out_of_sample"), spec, and the batch shape it must have.

    ``models`` maps the model names used in ``out_of_sample`` to a spec's ``model``; ``base``
    is the fit set's spec (default: the memory ladder's LoRA run).
    """
    from bench.memory import spec_for

    base = base or spec_for({"method": "lora", "optimizer": "adamw", "extra": {}}, steps)
    models = {"smollm2": base["model"], **(models or {})}

    def with_method(spec: dict, method: str) -> dict:
        from adapters import METHODS

        out = merge(spec, {"optimizer": {"lr": METHODS.get(method).suggested_lr}})
        out["method"] = {"name": method}
        return out

    runs = [{"name": name, "set": "fit", "spec": merge(with_method(base, method), {"training": extra}),
             "shape": None} for name, method, extra in (FIT if fit is None else fit)]
    long_rows = None
    for name, method, model, shape, extra in (OUT_OF_SAMPLE if out_of_sample is None else out_of_sample):
        spec = merge(with_method(base, method), {"model": models[model], "training": extra})
        if shape is not None:
            long_rows = long_rows or conversations(Path(base["dataset"]["path"]), common.RAW / "estimator_rows.jsonl")
            spec = merge(spec, {"dataset": {"path": str(long_rows), "eval_path": None},
                                "training": {"batch_size": shape[0], "max_seq_len": shape[1]}})
        runs.append({"name": name, "set": "out_of_sample", "spec": spec, "shape": list(shape) if shape else None})
    return runs


def measure(run: dict, device: str) -> dict:
    """The run in its own process while this one computes the estimator's prediction."""
    from jobs.estimate.estimator import estimate
    from jobs.spec import parse_spec

    box: dict = {}
    label = "estimator-" + run["name"].replace(" ", "-")
    worker = threading.Thread(target=lambda: box.update(
        run_isolated("bench._run_one", "train", {"spec": run["spec"]}, label, TIMEOUT_S, preload=True)))
    worker.start()
    try:
        predicted = estimate(parse_spec(run["spec"]), device)
    except Exception as e:  # noqa: BLE001 - a failed prediction is a row of the table, not a crash
        predicted = {"error": f"{type(e).__name__}: {e}"}
    worker.join()
    peak, guess = box.get("peak_memory_bytes"), predicted.get("total_bytes")
    batch = predicted.get("batch") or {}
    shape_ok = None if run["shape"] is None or not guess else [batch.get("rows"), batch.get("length")] == run["shape"]
    failure = box.get("error") or predicted.get("error")
    if shape_ok is False:
        failure = f"the estimator assumed {batch.get('rows')} x {batch.get('length')}, not {run['shape']}"
    return {"name": run["name"], "set": run["set"], "model": run["spec"]["model"],
            "method": run["spec"]["method"]["name"], "batch_shape": run["shape"],
            "estimated_batch": batch, "shape_as_intended": shape_ok,
            "gradient_checkpointing": run["spec"]["training"].get("gradient_checkpointing", False),
            "measured_peak_bytes": peak, "predicted_bytes": guess,
            "error": guess / peak - 1.0 if peak and guess and shape_ok is not False else None,
            "allocator": box.get("allocator"), "failure": failure,
            "estimate": {k: predicted.get(k) for k in ("breakdown", "phases", "phase_breakdowns", "peak_phase",
                                                       "details", "assumptions")} if guess else None,
            "phases": box.get("phases"), "losses": box.get("losses"), "wall_seconds": box.get("wall_seconds")}


# ---------------------------------------------------------------- the fit

def predict(estimate: dict, coefficients: tuple[float, float], offset: float = 0.0) -> float:
    """The estimate's total with other slack coefficients and ``offset`` more process bytes.

    Only the train phase holds slack; the peak stays the largest phase.
    """
    from jobs.estimate.estimator import allocator_slack

    details = estimate["details"]
    slack = allocator_slack(details["slack_basis"], coefficients) if details["slack_basis"] else 0
    phases = dict(estimate["phases"])
    phases["train"] = phases["train"] - details["allocator_slack"] + slack
    return max(phases.values()) + offset


def refit(rows: list[dict], step: float = GRID_STEP, top: float = GRID_MAX) -> dict:
    """Slack coefficients (non-negative) and a process offset that minimise the squared
    relative errors over ``rows`` (each with ``measured_peak_bytes`` and ``estimate``).

    The prediction is a maximum over phases with a ``max(0, ...)`` inside, so it is not linear
    in the coefficients: both are searched on a grid, and for each pair the offset is the
    weighted least-squares solution, sum((m - p) / m^2) / sum(1 / m^2).
    """
    usable = [r for r in rows if r.get("measured_peak_bytes") and r.get("estimate")]
    if not usable:
        return {"error": "no fit run finished"}
    grid = [round(i * step, 10) for i in range(int(round(top / step)) + 1)]
    best = None
    for a in grid:
        for b in grid:
            guesses = [predict(r["estimate"], (a, b)) for r in usable]
            m = [r["measured_peak_bytes"] for r in usable]
            offset = sum((mi - pi) / mi ** 2 for mi, pi in zip(m, guesses)) / sum(1 / mi ** 2 for mi in m)
            loss = sum(((pi + offset) / mi - 1) ** 2 for mi, pi in zip(m, guesses))
            if best is None or loss < best[0] - 1e-15:
                best = (loss, a, b, offset)
    loss, a, b, offset = best
    return {"activation_slack": a, "rebuilt_weight_slack": b, "process_offset_bytes": int(round(offset)),
            "rms_relative_error": (loss / len(usable)) ** 0.5, "runs": [r["name"] for r in usable],
            "method": f"grid of {step} over [0, {top}] for both slack coefficients, offset in closed form"}


def score(rows: list[dict], fitted: dict) -> dict:
    """Errors of the shipped and the refitted constants, per set."""
    out = {}
    for r in rows:
        if r.get("error") is None:
            r["refit_predicted_bytes"] = r["refit_error"] = None
            continue
        if "error" not in fitted:
            guess = predict(r["estimate"], (fitted["activation_slack"], fitted["rebuilt_weight_slack"]),
                            fitted["process_offset_bytes"])
            r["refit_predicted_bytes"] = int(guess)
            r["refit_error"] = guess / r["measured_peak_bytes"] - 1.0
        else:
            r["refit_predicted_bytes"] = r["refit_error"] = None
    for constants, key in (("shipped", "error"), ("refit", "refit_error")):
        for part in ("fit", "out_of_sample"):
            errors = {r["name"]: r[key] for r in rows if r["set"] == part and r.get(key) is not None}
            out.setdefault(constants, {})[part] = {
                "max_abs_error": max(map(abs, errors.values()), default=None),
                "mean_abs_error": sum(map(abs, errors.values())) / len(errors) if errors else None,
                "outside_target": sorted(n for n, e in errors.items() if abs(e) > TARGET),
                "failed": sorted(r["name"] for r in rows if r["set"] == part and r.get(key) is None)}
    return out


# ---------------------------------------------------------------- the benchmark

def run(full: bool = False, results_dir: Path | None = None, *, fit=None, out_of_sample=None,
        models: dict | None = None, base: dict | None = None) -> dict:
    """Measure, predict, refit, score; write results/estimator.json. The keyword arguments
    replace the default runs (tests use a tiny model)."""
    from jobs.training.allocator import preload_env
    from jobs.estimate.estimator import CPU_SLACK, PEFT_BYTES, PROCESS_BYTES, TOKENIZER_BYTES

    # The predictions must see the models as the workers do: from the bench home.
    os.environ.setdefault("STUDIO_HOME", str(HOME))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps = FULL_STEPS if full else STEPS
    device = suite_device()
    wanted = OUT_OF_SAMPLE if out_of_sample is None else out_of_sample
    models = dict(models or {})
    if any(m == RANDOM_MODEL for _, _, m, _, _ in wanted) and RANDOM_MODEL not in models:
        say(f"estimator: building the {RANDOM_MODEL} random-weight model (once)")
        built = run_isolated("bench.scale", "build", {"name": RANDOM_MODEL}, f"estimator-build-{RANDOM_MODEL}")
        if "error" in built:
            raise RuntimeError(f"could not build {RANDOM_MODEL}: {built['error']}")
        models[RANDOM_MODEL] = built["folder"]
    runs = plan(steps, fit, out_of_sample, models, base)
    for model in dict.fromkeys(r["spec"]["model"] for r in runs):
        warm_model_cache(model)
    rows = []
    for r in runs:
        say(f"estimator: {r['set']}: {r['name']}")
        row = measure(r, device)
        rows.append(row)
        if row["error"] is not None:
            say(f"estimator: {r['name']}: measured {mib(row['measured_peak_bytes'])}, predicted "
                f"{mib(row['predicted_bytes'])} ({row['error']:+.1%})")
        else:
            say(f"estimator: {r['name']}: {row['failure']}")
    fitted = refit([r for r in rows if r["set"] == "fit"])
    scores = score(rows, fitted)
    shipped = scores["shipped"]
    reusing = bool(preload_env())
    payload = {
        "device": device, "device_name": device_name(device), "dtype": "float32", "steps": steps,
        "target_max_abs_error": TARGET,
        "max_abs_error_in_sample": shipped["fit"]["max_abs_error"],
        "max_abs_error_out_of_sample": shipped["out_of_sample"]["max_abs_error"],
        "meets_target": (shipped["out_of_sample"]["max_abs_error"] is not None
                         and shipped["out_of_sample"]["max_abs_error"] <= TARGET
                         and not shipped["out_of_sample"]["failed"]),
        "refit_max_abs_error_in_sample": scores["refit"]["fit"]["max_abs_error"],
        "refit_max_abs_error_out_of_sample": scores["refit"]["out_of_sample"]["max_abs_error"],
        "shipped_constants": {"allocator": "preloaded" if reusing else "glibc",
                              "activation_slack": CPU_SLACK["preloaded" if reusing else "glibc"][0],
                              "rebuilt_weight_slack": CPU_SLACK["preloaded" if reusing else "glibc"][1],
                              "process_bytes": PROCESS_BYTES, "tokenizer_bytes": TOKENIZER_BYTES,
                              "peft_bytes": PEFT_BYTES},
        "refit_constants": fitted, "scores": scores, "runs": rows,
        "settings": {"fit": [r["name"] for r in rows if r["set"] == "fit"],
                     "out_of_sample": [r["name"] for r in rows if r["set"] == "out_of_sample"],
                     "conversation_exchanges": EXCHANGES, "random_model": RANDOM_MODEL}}
    path = write_result("estimator", payload, results_dir)
    say(f"estimator: wrote {path}")
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.estimator", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help=f"{FULL_STEPS} steps per run")
    payload = run(full=parser.parse_args(argv).full)
    return 0 if all(r["error"] is not None for r in payload["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
