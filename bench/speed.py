"""Speed and memory against ``transformers.Trainer`` + peft, on the same LoRA run.

Both systems get the same tokenized rows (``jobs.data.prepare``), the same LoRA config, the
same hyperparameters, micro-batch, accumulation, sequence cap and number of steps, and the
same device and precision. Trainer gets the rows as a ``datasets.Dataset`` of input_ids and
labels with ``DataCollatorForSeq2Seq`` padding, as a user would write it, with evaluation,
saving, logging and progress bars switched off and length-grouped sampling on (our loop
groups by length too).

Every run is its own process and the two systems alternate (ABBA...), so drift in machine
load falls on both. Trained tokens are counted alike: positions whose next-token label is
not -100. Throughput is measured from the end of step 1 to the end of the last step.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from bench import common
from bench.common import (compute_device, demo_spec, device_name, merge, process_peak_memory, quiet_eval,
                          run_isolated, say, steady_rate, sync, train_timed, warm_model_cache, with_budget, worker_main,
                          write_result)

SPEEDUP_TARGET = 1.3   # trained tokens per second, ours / Trainer
MEMORY_TARGET = 0.6    # peak memory, ours / Trainer
DEFAULT = {"steps": 12, "repeats": 2}
FULL = {"steps": 40, "repeats": 4}
LONG, LONG_FULL = {"steps": 6, "repeats": 2}, {"steps": 20, "repeats": 4}
LONG_ROWS = {"exchanges": 8, "batch_size": 4, "max_seq_len": 512}
SYSTEMS = ("ours", "trainer")
# Our loop again, on the system's malloc like Trainer: where job processes run on another
# allocator (jobs.allocator), this leg shows how much of the difference is the allocator's.
SAME_MALLOC = "ours_system_malloc"


def legs() -> list[tuple[str, str, bool]]:
    """(system, worker, preload) of each run in a round: ours as the studio starts a job,
    Trainer as a script of one's own runs."""
    from jobs.allocator import preload_env

    out = [("ours", "ours", True), ("trainer", "trainer", False)]
    return out + [(SAME_MALLOC, "ours", False)] if preload_env() else out


def speed_spec(steps: int, base: dict | None = None) -> dict:
    spec = base or demo_spec()
    return with_budget(merge(spec, quiet_eval()), steps)


def run(full: bool = False, *, spec: dict | None = None, steps: int | None = None, repeats: int | None = None,
        results_dir: Path | None = None, long_rows: bool = True) -> dict:
    budget = FULL if full else DEFAULT
    steps, repeats = steps or budget["steps"], repeats or budget["repeats"]
    spec = speed_spec(steps, spec)
    warm_model_cache(spec["model"])
    runs = _pair(spec, steps, repeats, "speed")
    trainer_args = next((r["trainer_arguments"] for r in runs if "trainer_arguments" in r), None)
    payload = {"settings": {"steps": steps, "repeats": repeats, "order": "alternating, ABBA",
                            "spec": spec, "trainer_arguments": trainer_args},
               "runs": runs, **summarise(runs)}
    if long_rows:
        long = LONG_FULL if full else LONG
        long_spec = speed_spec(long["steps"], long_rows_spec(spec, common.RAW / "long_rows.jsonl"))
        long_runs = _pair(long_spec, long["steps"], long["repeats"], "speed-long")
        payload["long_rows"] = {"settings": {"steps": long["steps"], "repeats": long["repeats"], "spec": long_spec,
                                             "rows": LONG_ROWS},
                                "runs": long_runs, **summarise(long_runs)}
    write_result("speed", payload, results_dir)
    return payload


def _pair(spec: dict, steps: int, repeats: int, label: str) -> list[dict]:
    runs = []
    rounds = legs()
    for repeat in range(1, repeats + 1):
        for system, worker, preload in (rounds if repeat % 2 else rounds[::-1]):
            say(f"{label}: {system}, repeat {repeat}/{repeats}, {steps} steps")
            result = run_isolated("bench.speed", worker, {"spec": spec}, f"{label}-{system}-{repeat}",
                                  preload=preload)
            result.update(system=system, repeat=repeat)
            runs.append(result)
            say("  " + (f"failed: {result['error']}" if "error" in result else
                        f"{result['trained_tokens_per_second']:.1f} trained tok/s, "
                        f"peak {result['peak_memory_bytes'] / 2**20:.0f} MiB"))
    return runs


def long_rows_spec(spec: dict, path: Path, exchanges: int = 8) -> dict:
    """The same run on longer rows: conversations of ``exchanges`` demo questions and answers.

    The demo's rows are about 60 tokens, so a step is dominated by fixed per-layer costs and
    both processes by the libraries and the weights. Fine-tuning data is usually longer;
    these conversations (every answer trained, as chat data is) run to about 400 tokens.
    """
    rows = [json.loads(line) for line in Path(spec["dataset"]["path"]).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(0, len(rows) - exchanges + 1, exchanges):
            messages = []
            for r in rows[i:i + exchanges]:
                question = r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": r["output"]}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return merge(spec, {"dataset": {"path": str(path), "eval_path": None},
                        "training": {"batch_size": LONG_ROWS["batch_size"], "max_seq_len": LONG_ROWS["max_seq_len"]}})


def summarise(runs: list[dict]) -> dict:
    systems = [s for s in (*SYSTEMS, SAME_MALLOC) if any(r.get("system") == s for r in runs)]
    ok = {s: [r for r in runs if r.get("system") == s and "error" not in r] for s in systems}
    failed = [f"{r['system']} #{r['repeat']}: {r['error']}" for r in runs if "error" in r]
    if not ok["ours"] or not ok["trainer"]:
        return {"speedup_vs_trainer": None, "memory_ratio_vs_trainer": None, "failures": failed}

    def med(system: str, key: str) -> float:
        return statistics.median(r[key] for r in ok[system])

    speedup = med("ours", "trained_tokens_per_second") / med("trainer", "trained_tokens_per_second")
    memory = med("ours", "peak_memory_bytes") / med("trainer", "peak_memory_bytes")
    cpu = med("ours", "trained_tokens_per_cpu_second") / med("trainer", "trained_tokens_per_cpu_second")
    fast = _fast_steps(ok["ours"]) / _fast_steps(ok["trainer"])
    first = ok["ours"][0]
    same = {}
    if ok.get(SAME_MALLOC):
        same = {"same_malloc": {
            "speedup_vs_trainer": med(SAME_MALLOC, "trained_tokens_per_second") / med("trainer", "trained_tokens_per_second"),
            "memory_ratio_vs_trainer": med(SAME_MALLOC, "peak_memory_bytes") / med("trainer", "peak_memory_bytes")}}
    return {
        "speedup_vs_trainer": speedup,
        "memory_ratio_vs_trainer": memory,
        # Per CPU-second of the process: less sensitive to other processes sharing the machine.
        "cpu_time_speedup_vs_trainer": cpu,
        # The steps least disturbed by other processes: an estimate for a machine of one's own.
        "fast_step_speedup_vs_trainer": fast,
        "speedup_target": SPEEDUP_TARGET, "memory_target": MEMORY_TARGET,
        "meets_speed_target": speedup >= SPEEDUP_TARGET, "meets_memory_target": memory <= MEMORY_TARGET,
        "median": {s: {k: med(s, k) for k in ("trained_tokens_per_second", "tokens_per_second",
                                               "peak_memory_bytes", "trained_tokens_per_cpu_second")}
                   for s in systems if ok[s]},
        "allocator": {s: ok[s][0].get("allocator", "system") for s in systems if ok[s]}, **same,
        "device": first["device"], "device_name": first["device_name"], "dtype": first["dtype"],
        "memory_kind": first["memory_kind"], "failures": failed,
    }


def _fast_steps(runs: list[dict]) -> float:
    """The 90th percentile of per-step trained tokens per second over all of a system's runs."""
    rates = sorted(rate for r in runs for rate in r.get("step_rates") or [r["trained_tokens_per_second"]])
    return rates[min(len(rates) - 1, int(0.9 * len(rates)))]


# ---------------------------------------------------------------- workers (one run per process)

def _measure(marks: list[float], cpu: list[float], trained: list[int], tokens: list[int], mean_loss: float,
             device: str, dtype: str) -> dict:
    rate, seconds, steps = steady_rate(marks, trained)
    cpu_rate, _, _ = steady_rate(cpu, trained)
    token_rate, _, _ = steady_rate(marks, tokens)
    step_rates = [n / max(b - a, 1e-9) for a, b, n in zip(marks, marks[1:], trained[1:])]
    return {"trained_tokens_per_second": rate, "tokens_per_second": token_rate, "step_rates": step_rates,
            "mean_train_loss": mean_loss,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "trained_tokens_per_cpu_second": cpu_rate, "measured_seconds": seconds, "measured_steps": steps,
            "trained_tokens": sum(trained), "tokens": sum(tokens), "steps": len(marks),
            "device": device, "device_name": device_name(device), "dtype": dtype, **process_peak_memory(device)}


def _precision(params: dict) -> str:
    return params["spec"].get("training", {}).get("precision", "auto")


def _ours(params: dict) -> dict:
    device, dtype = compute_device(_precision(params))
    record, c = train_timed(params["spec"], Path(params["scratch"]) / "run")
    losses = c["loss"]
    return _measure(c["marks"], c["cpu"], c["trained"], c["tokens"], sum(losses) / max(len(losses), 1),
                    device, dtype)


class _CountingCollator:
    """Pads like the wrapped collator and notes each micro-batch's trained and real tokens."""

    def __init__(self, inner):
        self.inner, self.trained, self.tokens = inner, [], []

    def __call__(self, features):
        batch = self.inner(features)
        self.trained.append(int((batch["labels"][:, 1:] != -100).sum()))
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch


def trainer_arguments(spec, rcfg, device: str, dtype: str, output_dir: str) -> dict:
    """TrainingArguments matching the spec, with the overhead a timed run would switch off."""
    t = spec.training
    return {
        "output_dir": output_dir, "max_steps": t.max_steps, "per_device_train_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum, "learning_rate": rcfg.lr,
        "lr_scheduler_type": "constant_with_warmup" if t.lr_schedule == "constant" else t.lr_schedule,
        "warmup_steps": t.warmup_steps, "weight_decay": rcfg.weight_decay, "adam_beta1": rcfg.beta1,
        "adam_beta2": rcfg.beta2, "adam_epsilon": rcfg.eps, "max_grad_norm": rcfg.max_grad_norm,
        "seed": t.seed, "gradient_checkpointing": t.gradient_checkpointing,
        "bf16": dtype == "bfloat16", "use_cpu": device == "cpu",
        "train_sampling_strategy": "group_by_length",
        "eval_strategy": "no", "save_strategy": "no", "logging_strategy": "no", "report_to": "none",
        "disable_tqdm": True, "dataloader_num_workers": 0, "dataloader_pin_memory": device == "cuda",
    }


def _trainer(params: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from jobs import models
    from jobs.data import prepare
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
    weights = models.weights_for(src, getattr(torch, dtype))  # the file our loop loads too
    model = AutoModelForCausalLM.from_pretrained(weights.path, dtype=getattr(torch, dtype), **weights.kwargs())
    model.config.use_cache = False
    torch.manual_seed(t.seed)  # the adapter starts from the same draw as in our loop
    model = get_peft_model(model, method.to_peft_config(mcfg))
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
    # Trainer's training_loss is the mean of its step losses, as mean_train_loss is for ours.
    return {**_measure(marks, cpu, trained, tokens, output.training_loss, device, dtype),
            "trainer_arguments": {**{k: v for k, v in arguments.items() if k != "output_dir"},
                                  "optim": str(args.optim.value if hasattr(args.optim, "value") else args.optim)}}


if __name__ == "__main__":
    worker_main({"ours": _ours, "trainer": _trainer})
