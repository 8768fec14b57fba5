"""Speed and memory against the tools users pick directly: transformers.Trainer + peft, and TRL.

The same LoRA run through our loop (``jobs.training.recipe.train``) and through each anchor:

- ``trainer``: ``transformers.Trainer`` with peft's ``get_peft_model``, as a script of one's own;
- ``trainer_trained_loss``: the same with a ``compute_loss`` that projects only the trained
  positions (a dozen lines a user could write), which shows how much of the difference is the
  loss and how much is everything else;
- ``trl``: TRL's ``SFTTrainer`` with completion-only loss on the same prompt/completion rows,
  set up as a TRL user would on this device (``padding_free`` where the attention supports
  it: FlashAttention on a GPU; TRL's own chunked log-probability head in every case);
- on a GPU also ``trainer_liger`` (Trainer with ``use_liger_kernel``) and ``unsloth``.

**Equal footing.** Every headline pair runs on the same allocator: each process starts as the
studio starts a job (``jobs.training.allocator``: tcmalloc where the system has it), anchors included.
The pair on the system's malloc (``ours_glibc`` against ``trainer_glibc``) is reported beside
it. Precision, data (one ``jobs.data.examples.prepare`` call), batch, sequence cap, learning rate,
schedule, optimizer settings, gradient checkpointing, seed and steps are the same for all.

**Spread.** Every system runs ``repeats`` times in alternating order (ABBA...), each run its
own process, so drift in the machine's load falls on all. Medians are reported with their
min-max; a pair whose per-run ranges overlap is called a tie. Throughput counts trained
tokens (positions whose next-token label is not -100, counted alike for every system) from
the end of step 1 to the end of the last step.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import common
from bench.common import (compute_device, demo_spec, device_name, merge, process_peak_memory, quiet_eval,
                          run_isolated, say, steady_rate, sync, train_timed, warm_model_cache, with_budget, worker_main,
                          write_result)

SPEEDUP_TARGET = 2.0   # trained tokens per second, ours / each anchor, equal footing, median of repeats
MEMORY_TARGET = 0.5    # peak memory, ours / each anchor
PRECISIONS = ("auto", "bf16", "fp32")  # --precision: every leg trains in it (auto: as the studio picks)
# 21 steps: step 1 is left out of every rate, so 20 are measured.
DEFAULT = {"steps": 21, "repeats": 4}
FULL = {"steps": 41, "repeats": 6}
LONG, LONG_FULL = {"steps": 21, "repeats": 4}, {"steps": 41, "repeats": 6}
# 2 conversations of about 200 tokens per step (the length of much chat data), so that a step
# costs about what a demo step does and 4 repeats of 20 measured steps stay affordable on two cores.
LONG_ROWS = {"exchanges": 4, "batch_size": 2, "max_seq_len": 512}
ANCHORS = ("trainer", "trl")   # the headline comparisons, each against "ours"


@dataclass(frozen=True)
class Leg:
    """One system of a round: its name in the results, its worker, and how its process starts."""
    system: str
    worker: str
    preload: bool                  # on the allocator job processes use (jobs.training.allocator)
    about: str
    options: dict = field(default_factory=dict)
    headline: bool = False         # in the default suite, on both row sets (the rest: --full or --systems)


def legs(device: str = "cpu", full: bool = False) -> list[Leg]:
    """The systems of one round. ``device`` is where the runs will train ("cuda" adds the GPU anchors)."""
    from jobs.training.allocator import preload_env

    out = [Leg("ours", "ours", True, "our loop (jobs.training.recipe), as a job runs it", headline=True),
           Leg("trainer", "trainer", True, "transformers.Trainer + peft", headline=True),
           Leg("trainer_trained_loss", "trainer", True,
               "Trainer + peft with a compute_loss that projects only trained positions", {"trained_loss": True}),
           Leg("trl", "trl", True, "TRL SFTTrainer, completion-only loss", headline=True)]
    if device == "cuda":
        out += [Leg("trainer_liger", "trainer", True, "Trainer + peft with use_liger_kernel", {"liger": True}, True),
                Leg("unsloth", "unsloth", True, "Unsloth's FastLanguageModel + Trainer", headline=True)]
    out.append(Leg("ours_unshared", "ours", True, "our loop with training.share_prefix off",
                   {"spec": {"training": {"share_prefix": False}}}))
    if full:
        out.append(Leg("trl_defaults", "trl", True,
                       "TRL SFTTrainer with its own defaults for precision and gradient checkpointing",
                       {"defaults": True}))
    if preload_env():  # the both-glibc pair, where jobs run on another malloc than a script does
        out += [Leg("ours_glibc", "ours", False, "our loop on the system's malloc"),
                Leg("trainer_glibc", "trainer", False, "Trainer + peft on the system's malloc")]
    return out


# Each comparison: (ours, theirs). The headline ones are on equal footing.
COMPARISONS = {"trainer": ("ours", "trainer"), "trl": ("ours", "trl"), "shared_prefix": ("ours", "ours_unshared"),
               "trainer_trained_loss": ("ours", "trainer_trained_loss"), "trl_defaults": ("ours", "trl_defaults"),
               "trainer_liger": ("ours", "trainer_liger"), "unsloth": ("ours", "unsloth"),
               "both_glibc": ("ours_glibc", "trainer_glibc")}


def speed_spec(steps: int, base: dict | None = None) -> dict:
    spec = base or demo_spec()
    return with_budget(merge(spec, quiet_eval()), steps)


def run(full: bool = False, *, spec: dict | None = None, steps: int | None = None, repeats: int | None = None,
        results_dir: Path | None = None, long_rows: bool = True, systems: list[str] | None = None,
        name: str = "speed") -> dict:
    """The headline legs (ours against each anchor) by default, every leg with ``full``; ``systems``
    names the legs to run instead. The result is written as ``name``.json."""
    budget = FULL if full else DEFAULT
    steps, repeats = steps or budget["steps"], repeats or budget["repeats"]
    spec = speed_spec(steps, spec)
    device = "cuda" if common.gpus() else "cpu"
    every = legs(device, full=True)
    unknown = sorted(set(systems or ()) - {leg.system for leg in every})
    if unknown:
        raise SystemExit(f"unknown system(s) {', '.join(unknown)}; this device has: "
                         f"{', '.join(leg.system for leg in every)}")
    rounds = [leg for leg in every if (leg.system in systems if systems else full or leg.headline)]
    started = time.perf_counter()
    warm_model_cache(spec["model"])
    maths = same_maths(rounds, spec, "speed")
    floor = common_floor(spec, "speed")
    runs = with_working_memory(_rounds(rounds, spec, steps, repeats, "speed"), floor)
    payload = {"settings": {"steps": steps, "measured_steps": steps - 1, "repeats": repeats,
                            "order": "alternating, ABBA", "spec": spec,
                            "systems": {leg.system: {"about": leg.about, "on_job_allocator": leg.preload}
                                        for leg in rounds},
                            **_arguments(runs)},
               "same_maths": maths, "floor": floor, "runs": runs, **summarise(runs, maths)}
    if long_rows:
        long = LONG_FULL if full else LONG
        long_spec = speed_spec(long["steps"], long_rows_spec(spec, common.RAW / "long_rows.jsonl"))
        long_legs = rounds
        long_maths = same_maths(long_legs, long_spec, "speed-long")
        long_floor = common_floor(long_spec, "speed-long")
        long_runs = with_working_memory(_rounds(long_legs, long_spec, long["steps"], long["repeats"], "speed-long"),
                                        long_floor)
        payload["long_rows"] = {"settings": {"steps": long["steps"], "measured_steps": long["steps"] - 1,
                                             "repeats": long["repeats"], "spec": long_spec, "rows": LONG_ROWS},
                                "same_maths": long_maths, "floor": long_floor, "runs": long_runs,
                                **summarise(long_runs, long_maths)}
    payload["suite_seconds"] = time.perf_counter() - started
    write_result(name, payload, results_dir)
    return payload


def _arguments(runs: list[dict]) -> dict:
    """The anchors' exact arguments, as their first run recorded them."""
    found = {}
    for r in runs:
        for key in ("trainer_arguments", "trl_arguments"):
            if key in r and f"{r['system']}" not in found:
                found[r["system"]] = r[key]
    return {"anchor_arguments": found}


def same_maths(legs_: list[Leg], spec: dict, label: str) -> dict:
    """``bench.same_maths``: every leg's loss on our loop's first batch from the same weights,
    against ours, in one process of its own. Its verdict decides which ratios are reported."""
    from bench.same_maths import with_rounding

    say(f"{label}: same-maths check of {', '.join(leg.system for leg in legs_)}")
    legs_data = [{"system": leg.system, "worker": leg.worker, "options": leg.options} for leg in legs_]
    _, dtype = compute_device(spec.get("training", {}).get("precision", "auto"))
    if dtype == "float32":
        out = run_isolated("bench.same_maths", "check", {"spec": spec, "legs": legs_data}, f"{label}-same-maths")
    else:  # the maths in fp32, then each system's own rounding in the dtype it trains in
        exact = run_isolated("bench.same_maths", "check", {"spec": merge(spec, {"training": {"precision": "fp32"}}),
                                                           "legs": legs_data}, f"{label}-same-maths")
        low = run_isolated("bench.same_maths", "check", {"spec": spec, "legs": legs_data},
                           f"{label}-same-maths-{dtype}")
        out = with_rounding(exact, low, dtype)
    for name, c in (out.get("systems") or {}).items():
        say(f"  {name}: " + (f"loss {c['loss']:.6f}" if "loss" in c else "") +
            ("" if c["same"] else f" NOT THE SAME: {c['why']}"))
    if "error" in out:
        say(f"  the check failed: {out['error']}; no ratio will be reported")
    return out


def common_floor(spec: dict, label: str) -> dict:
    """What every leg holds before it trains, and no loop can change: a process on the job
    allocator that imports torch, transformers and peft and loads the base weights in the run's
    dtype, its resident set then (``floor_bytes``)."""
    say(f"{label}: the common floor (libraries and weights)")
    out = run_isolated("bench.speed", "floor", {"spec": spec}, f"{label}-floor", preload=True)
    if "error" in out:
        say(f"  failed: {out['error']}; no working memory will be reported")
    else:
        say(f"  {out['floor_bytes'] / 2**20:.0f} MiB")
    return out


def with_working_memory(runs: list[dict], floor: dict) -> list[dict]:
    """Each run's working memory: its peak less the common floor (what a training loop can change)."""
    if "floor_bytes" in floor:
        for r in runs:
            if "peak_memory_bytes" in r:
                r["working_memory_bytes"] = r["peak_memory_bytes"] - floor["floor_bytes"]
    return runs


def _rounds(rounds: list[Leg], spec: dict, steps: int, repeats: int, label: str) -> list[dict]:
    runs = []
    for repeat in range(1, repeats + 1):
        for leg in (rounds if repeat % 2 else rounds[::-1]):
            say(f"{label}: {leg.system}, repeat {repeat}/{repeats}, {steps} steps")
            result = run_isolated("bench.speed", leg.worker, {"spec": spec, "options": leg.options},
                                  f"{label}-{leg.system}-{repeat}", preload=leg.preload)
            result.update(system=leg.system, repeat=repeat)
            runs.append(result)
            say("  " + (f"failed: {result['error']}" if "error" in result else
                        f"{result['trained_tokens_per_second']:.1f} trained tok/s, "
                        f"peak {result['peak_memory_bytes'] / 2**20:.0f} MiB ({result.get('allocator')})"))
    return runs


def long_rows_spec(spec: dict, path: Path, exchanges: int = LONG_ROWS["exchanges"]) -> dict:
    """The same run on longer rows: conversations of ``exchanges`` demo questions and answers.

    The demo's rows are about 60 tokens, so a step is dominated by fixed per-layer costs and
    both processes by the libraries and the weights. Fine-tuning data is usually longer;
    these conversations (every answer trained, as chat data is) run to about 200 tokens.
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


# ---------------------------------------------------------------- summary

def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def compare(ours: list[dict], theirs: list[dict], key: str) -> dict:
    """Ratio of medians (ours / theirs), its range over the runs, and whether the runs overlap (a tie)."""
    a, b = [r[key] for r in ours], [r[key] for r in theirs]
    return {"ratio": statistics.median(a) / statistics.median(b), "ratio_min": min(a) / max(b),
            "ratio_max": max(a) / min(b), "tie": min(a) <= max(b) and min(b) <= max(a),
            "ours": spread(a), "theirs": spread(b)}


def refusal(maths: dict | None, systems: tuple[str, str]) -> str | None:
    """Why a pair's ratio is not reported: a system whose loss on the same batch from the same
    weights differs from ours (or was not checked). None: the same maths, or no check asked
    (``maths`` None: summaries of hand-made runs)."""
    if maths is None:
        return None
    checked, reasons = maths.get("systems") or {}, []
    for system in systems:
        c = checked.get(system) or {}
        if not c.get("same"):
            reasons.append(f"{system}: {c.get('why') or 'not checked (' + (maths.get('error') or 'no result') + ')'}")
    return "; ".join(reasons) or None


def summarise(runs: list[dict], maths: dict | None = None) -> dict:
    """Ratios of medians per comparison; with ``maths`` (bench.same_maths's verdict), a pair that
    does not compute the same loss gets no ratio, only the reason."""
    systems = list(dict.fromkeys(r["system"] for r in runs))
    ok = {s: [r for r in runs if r["system"] == s and "error" not in r] for s in systems}
    failed = [f"{r['system']} #{r['repeat']}: {r['error']}" for r in runs if "error" in r]
    comparisons = {}
    for name, (mine, theirs) in COMPARISONS.items():
        why = refusal(maths, (mine, theirs)) if mine in systems and theirs in systems else None
        if why:
            comparisons[name] = {"systems": [mine, theirs], "failed": True, "refused": why}
        elif ok.get(mine) and ok.get(theirs):
            comparisons[name] = {"systems": [mine, theirs],
                                 "speed": compare(ok[mine], ok[theirs], "trained_tokens_per_second"),
                                 "memory": compare(ok[mine], ok[theirs], "peak_memory_bytes"),
                                 "cpu_time_speed": compare(ok[mine], ok[theirs], "trained_tokens_per_cpu_second")}
            if all("working_memory_bytes" in r for r in ok[mine] + ok[theirs]):
                comparisons[name]["working_memory"] = compare(ok[mine], ok[theirs], "working_memory_bytes")
        elif mine in systems and theirs in systems:
            comparisons[name] = {"systems": [mine, theirs], "failed": True}
    out = {"comparisons": comparisons, "failures": failed,
           "speedup_target": SPEEDUP_TARGET, "memory_target": MEMORY_TARGET,
           "spread": {s: {k: spread([r[k] for r in ok[s]]) for k in ("trained_tokens_per_second",
                                                                     "peak_memory_bytes")}
                      for s in systems if ok[s]},
           "allocator": {s: ok[s][0].get("allocator", "system") for s in systems if ok[s]}}
    for anchor in ANCHORS:
        c = comparisons.get(anchor) or {}
        speed, memory = c.get("speed"), c.get("memory")
        if c.get("refused"):
            out[f"refused_vs_{anchor}"] = c["refused"]
        out[f"speedup_vs_{anchor}"] = speed["ratio"] if speed else None
        out[f"memory_ratio_vs_{anchor}"] = memory["ratio"] if memory else None
        if c.get("working_memory"):
            out[f"working_memory_ratio_vs_{anchor}"] = c["working_memory"]["ratio"]
        if speed:
            out[f"meets_speed_target_vs_{anchor}"] = speed["ratio"] >= SPEEDUP_TARGET and not speed["tie"]
            out[f"meets_memory_target_vs_{anchor}"] = memory["ratio"] <= MEMORY_TARGET and not memory["tie"]
    first = next((r for s in systems for r in ok[s]), None)
    if first:
        out.update(device=first["device"], device_name=first["device_name"], dtype=first["dtype"],
                   memory_kind=first["memory_kind"])
    return out


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


def _floor(params: dict) -> dict:
    import peft  # noqa: F401  (every leg trains a peft adapter or imports it)
    import psutil
    import torch

    from jobs.training.allocator import running_on

    s = _setup(params, "floor")
    model = _base_model(s)
    with torch.no_grad():  # a memory-mapped weight is resident only once read, as every leg's forward reads it
        for p in model.parameters():
            p.sum()
    return {"floor_bytes": psutil.Process().memory_info().rss, "dtype": s.dtype, "device": s.device,
            "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "allocator": running_on() or "system"}


def _ours(params: dict) -> dict:
    device, dtype = compute_device(_precision(params))
    spec = merge(params["spec"], (params.get("options") or {}).get("spec") or {})  # a leg's own settings
    record, c = train_timed(spec, Path(params["scratch"]) / "run")
    losses = c["loss"]
    out = _measure(c["marks"], c["cpu"], c["trained"], c["tokens"], sum(losses) / max(len(losses), 1),
                   device, dtype)
    # The peak when training ended, as an anchor's is read when its trainer.train() returns: ours
    # then records the trained model's fingerprint, whose fp32 upcast of a bf16 base comes after.
    trained_peak = (record.get("metrics") or {}).get("peak_memory_bytes")
    if trained_peak:
        out.update(process_peak_memory_bytes=out["peak_memory_bytes"], peak_memory_bytes=trained_peak)
    return out


class _CountingCollator:
    """Pads like the wrapped collator and notes each micro-batch's trained and real tokens."""

    def __init__(self, inner):
        self.inner, self.trained, self.tokens = inner, [], []

    def __call__(self, features):
        batch = self.inner(features)
        self.trained.append(int((batch["labels"][:, 1:] != -100).sum()))
        mask = batch.get("attention_mask")
        self.tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
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


@dataclass
class _Setup:
    """What every anchor's worker starts from: the parsed spec, the same rows, the same base file."""
    spec: object
    device: str
    dtype: str
    method: object
    mcfg: object
    rcfg: object
    tokenizer: object
    data: object
    weights: object
    out: Path


def _setup(params: dict, name: str) -> _Setup:
    import torch

    from jobs.training import models
    from jobs.data.examples import prepare
    from jobs.spec import parse_spec

    device, dtype = compute_device(_precision(params))
    out = Path(params["scratch"]) / name
    spec = parse_spec(merge(params["spec"], {"output_dir": str(out)}))
    method, mcfg = spec.method_config()
    _, rcfg = spec.optimizer_config()
    src = models.resolve(spec.model)
    tokenizer = models.load_tokenizer(src)
    data = prepare(spec.dataset, tokenizer, spec.training.max_seq_len, spec.training.seed)
    weights = models.weights_for(src, getattr(torch, dtype))  # the file our loop loads too
    return _Setup(spec, device, dtype, method, mcfg, rcfg, tokenizer, data, weights, out)


def _base_model(s: _Setup, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(s.weights.path, dtype=getattr(torch, s.dtype),
                                                 **{**s.weights.kwargs(), **overrides})
    model.config.use_cache = False
    return model


def _step_clock(device: str):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        marks: list[float] = []
        cpu: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.marks.append(time.perf_counter())
            self.cpu.append(time.process_time())

    clock = StepClock()
    clock.marks, clock.cpu = [], []
    return clock


def _finish(s: _Setup, trainer, collator, clock, arguments: dict, key: str, extra: dict | None = None) -> dict:
    output = trainer.train()
    accum = s.spec.training.grad_accum
    steps = len(clock.marks)
    trained = [sum(collator.trained[k * accum:(k + 1) * accum]) for k in range(steps)]
    tokens = [sum(collator.tokens[k * accum:(k + 1) * accum]) for k in range(steps)]
    args = trainer.args
    # training_loss is the mean of the step losses, as mean_train_loss is for ours.
    return {**_measure(clock.marks, clock.cpu, trained, tokens, output.training_loss, s.device, s.dtype),
            key: {**{k: v for k, v in arguments.items() if k != "output_dir"},
                  "optim": str(args.optim.value if hasattr(args.optim, "value") else args.optim), **(extra or {})}}


def _trained_positions_loss(model, inputs, num_items_in_batch=None):
    """Cross-entropy over the trained positions only: the hidden states of those positions go
    through the output layer, the rest never become logits (what a user's compute_loss can do)."""
    import torch
    import torch.nn.functional as F

    from adapters.core import compat

    base = compat.bare_model(model)
    labels = inputs["labels"]
    hidden = base.model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = base.lm_head(hidden[:, :-1][keep])
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()  # the softmax in fp32, as Trainer's loss does
    total = F.cross_entropy(logits, targets[keep], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return total / count


@dataclass
class Built:
    """An anchor ready to train (what its timed run and the same-maths check both start from)."""
    setup: _Setup
    trainer: object
    collator: _CountingCollator
    clock: object
    arguments: dict
    extra: dict = field(default_factory=dict)


def _trainer(params: dict) -> dict:
    b = build_trainer(params)
    return _finish(b.setup, b.trainer, b.collator, b.clock, b.arguments, "trainer_arguments")


def build_trainer(params: dict) -> Built:
    """The Trainer leg (``options``: trained_loss, liger) as its timed run starts it."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    options = params.get("options") or {}
    s = _setup(params, "trainer")
    rows = Dataset.from_dict({"input_ids": [e.input_ids for e in s.data.train],
                              "labels": [e.labels for e in s.data.train]})
    model = _base_model(s)
    torch.manual_seed(s.spec.training.seed)  # the adapter starts from the same draw as in our loop
    model = get_peft_model(model, s.method.to_peft_config(s.mcfg))
    collator = _CountingCollator(DataCollatorForSeq2Seq(s.tokenizer, padding=True, label_pad_token_id=-100))
    clock = _step_clock(s.device)
    arguments = trainer_arguments(s.spec, s.rcfg, s.device, s.dtype, str(s.out))
    if options.get("liger"):
        arguments["use_liger_kernel"] = True  # needs liger-kernel; its ImportError is the leg's recorded error
    cls = Trainer
    if options.get("trained_loss"):
        class TrainedPositionsTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                return _trained_positions_loss(model, inputs, num_items_in_batch)
        cls = TrainedPositionsTrainer
    trainer = cls(model=model, args=TrainingArguments(**arguments), train_dataset=rows, data_collator=collator,
                  callbacks=[clock])
    return Built(s, trainer, collator, clock, arguments)


def trl_padding_free(attn_implementation: str | None) -> bool:
    """TRL supports padding-free batches only with FlashAttention's variable-length kernels; with
    other attention the flattened rows would attend across each other, so a user leaves it off."""
    return bool(attn_implementation) and "flash" in attn_implementation


def _trl(params: dict) -> dict:
    b = build_trl(params)
    return _finish(b.setup, b.trainer, b.collator, b.clock, b.arguments, "trl_arguments", b.extra)


def build_trl(params: dict) -> Built:
    """The TRL leg (``options``: defaults) as its timed run starts it."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    options = params.get("options") or {}
    s = _setup(params, "trl")
    # Prompt/completion rows, tokenized once (the same ids as every other system): TRL builds the
    # labels from the completion mask when completion_only_loss is on.
    rows = Dataset.from_dict({"input_ids": [e.input_ids for e in s.data.train],
                              "completion_mask": [[int(x != -100) for x in e.labels] for e in s.data.train]})
    attn = None
    if s.device == "cuda":
        try:
            import flash_attn  # noqa: F401
            attn = "flash_attention_2"
        except ImportError:
            attn = None
    model = _base_model(s, **({"attn_implementation": attn} if attn else {}))
    attn = getattr(model.config, "_attn_implementation", attn)
    padding_free = trl_padding_free(attn)
    arguments = trainer_arguments(s.spec, s.rcfg, s.device, s.dtype, str(s.out))
    arguments.update(completion_only_loss=True, max_length=s.spec.training.max_seq_len, packing=False,
                     padding_free=padding_free, dataset_num_proc=None)
    if options.get("defaults"):
        for key in ("bf16", "gradient_checkpointing"):  # TRL's own defaults (SFTConfig's docstring)
            arguments.pop(key)
    collator = _CountingCollator(DataCollatorForLanguageModeling(pad_token_id=s.tokenizer.pad_token_id,
                                                                 padding_free=padding_free))
    clock = _step_clock(s.device)
    torch.manual_seed(s.spec.training.seed)
    config = SFTConfig(**arguments)
    trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=s.tokenizer,
                         data_collator=collator, peft_config=s.method.to_peft_config(s.mcfg), callbacks=[clock])
    return Built(s, trainer, collator, clock, arguments,
                 {"attn_implementation": attn, "padding_free": padding_free, "bf16": config.bf16,
                  "gradient_checkpointing": config.gradient_checkpointing})


def _unsloth(params: dict) -> dict:
    """Unsloth's patched model and LoRA with a plain Trainer (GPU only; its ImportError is the leg's error)."""
    import unsloth  # noqa: F401  (must come before transformers to patch it)
    from unsloth import FastLanguageModel
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    s = _setup(params, "unsloth")
    model, _ = FastLanguageModel.from_pretrained(model_name=s.weights.path, dtype=getattr(torch, s.dtype),
                                                 load_in_4bit=False, max_seq_length=s.spec.training.max_seq_len)
    peft = s.method.to_peft_config(s.mcfg)
    torch.manual_seed(s.spec.training.seed)
    model = FastLanguageModel.get_peft_model(model, r=peft.r, lora_alpha=peft.lora_alpha, lora_dropout=0,
                                             target_modules=sorted(peft.target_modules) if not
                                             isinstance(peft.target_modules, str) else peft.target_modules,
                                             use_gradient_checkpointing=s.spec.training.gradient_checkpointing)
    rows = Dataset.from_dict({"input_ids": [e.input_ids for e in s.data.train],
                              "labels": [e.labels for e in s.data.train]})
    collator = _CountingCollator(DataCollatorForSeq2Seq(s.tokenizer, padding=True, label_pad_token_id=-100))
    clock = _step_clock(s.device)
    arguments = trainer_arguments(s.spec, s.rcfg, s.device, s.dtype, str(s.out))
    trainer = Trainer(model=model, args=TrainingArguments(**arguments), train_dataset=rows, data_collator=collator,
                      callbacks=[clock])
    return _finish(s, trainer, collator, clock, arguments, "trainer_arguments")


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.speed [--full] [--systems a,b] [--no-long-rows] [--steps N] [--repeats N] [--name N]``:
    the speed benchmark alone, or some of its legs (``python -m bench --only speed`` is the default suite)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.speed", description=main.__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--systems", help="comma-separated legs to run (default: every leg for this device)")
    parser.add_argument("--no-long-rows", action="store_true", help="the demo rows only")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the precision every leg trains in (default auto: as the studio picks on this machine)")
    parser.add_argument("--name", help="results/<name>.json (default: speed, or speed-<precision> with --precision)")
    args = parser.parse_args(argv)
    spec = None if args.precision == "auto" else merge(demo_spec(), {"training": {"precision": args.precision}})
    name = args.name or ("speed" if args.precision == "auto" else f"speed-{args.precision}")
    run(args.full, spec=spec, steps=args.steps, repeats=args.repeats, long_rows=not args.no_long_rows,
        systems=args.systems.split(",") if args.systems else None, name=name)


if __name__ == "__main__":
    import sys

    if "--worker" in sys.argv:
        worker_main({"ours": _ours, "trainer": _trainer, "trl": _trl, "unsloth": _unsloth, "floor": _floor})
    else:
        main()
