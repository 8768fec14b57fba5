"""The Markdown report (results/REPORT.md) and its PNG plots, from the JSON files in results/.

Only the JSON files are read, so the report can be rewritten at any time
(``python -m bench --only report``). Each section says when, on which machine and with
which command its numbers were measured. Plots need matplotlib; without it the report is
written with tables only and says so.
"""
from __future__ import annotations

import json
from pathlib import Path

import bench.common

ORDER = ("speed", "speed-secondary", "speed-prefix", "ab", "memory", "estimator", "quality", "efficiency", "scale")
TITLES = {"speed": "Speed and memory against Trainer and TRL",
          "speed-secondary": "Speed: the other legs (trained-positions loss, both on the system's malloc)",
          "speed-prefix": "Speed: what the shared prefix buys (ours with and without it)",
          "ab": "Speed: one change at a time, both variants in one process",
          "memory": "Memory ladder", "quality": "Quality ladder",
          "efficiency": "Efficiency", "estimator": "Memory estimator out of sample",
          "scale": "Against Trainer by model size"}


def load_results(results_dir: Path | None = None) -> dict[str, dict]:
    results_dir = results_dir or bench.common.RESULTS
    found = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            found[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return found


def write_report(results: dict[str, dict] | None = None, results_dir: Path | None = None) -> Path:
    results_dir = results_dir or bench.common.RESULTS
    results = load_results(results_dir) if results is None else results
    results_dir.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    lines = ["# Benchmark report", ""]
    if not results:
        lines += ["No results yet: run `make bench` (or `python -m bench`).", ""]
    else:
        lines += _machine_section(results)
    if plt is None:
        lines += ["> matplotlib is not installed, so this report has tables only "
                  "(`pip install matplotlib` and rerun `python -m bench --only report` for the plots).", ""]
    sections = {"speed": _speed, "ab": _ab, "memory": _memory, "quality": _quality, "efficiency": _efficiency,
                "estimator": _estimator, "scale": _scale}
    for name in [*ORDER, *sorted(set(results) - set(ORDER))]:
        if name not in results:
            continue
        data = results[name]
        lines += [f"## {TITLES.get(name, name.replace('_', ' ').capitalize())}", "", _provenance(data), ""]
        # A file a benchmark wrote under another name (``--name speed-prefix``) gets its benchmark's section.
        body, plot = sections.get(name, sections.get(name.split("-")[0], _generic))(data)
        lines += body
        if plt is not None and plot is not None:
            image = results_dir / f"{name}.png"
            plot(plt, image)
            lines += [f"![{name}]({image.name})", ""]
    path = results_dir / "REPORT.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- sections

def _machine_section(results: dict) -> list[str]:
    machine = max((r.get("machine") or {} for r in results.values()), key=lambda m: m.get("date", ""))
    v = machine.get("versions") or {}
    gpus = ", ".join(machine.get("gpus") or []) or "none"
    return ["Latest machine:", "",
            table(["CPU", "cores", "RAM", "GPU", "torch", "transformers", "peft", "bitsandbytes"],
                  [[machine.get("cpu"), machine.get("usable_cores"), fmt_bytes(machine.get("ram_bytes")), gpus,
                    v.get("torch"), v.get("transformers"), v.get("peft"), v.get("bitsandbytes")]]), ""]


def _provenance(data: dict) -> str:
    m = data.get("machine") or {}
    device = data.get("device")
    load = m.get("load_average")
    parts = [f"Measured {m.get('date', '?')} on {m.get('cpu', '?')} ({m.get('usable_cores', '?')} cores"
             + (f", GPU: {', '.join(m['gpus'])}" if m.get("gpus") else "") + ")",
             f"device {device} ({data.get('device_name')}, {data.get('dtype')})" if device else None,
             f"load average {load[0]:.1f}" if load else None,
             f"command `{m['command']}`" if m.get("command") else None]
    return "_" + "; ".join(p for p in parts if p) + "._"


NAMES = {"trainer": "Trainer + peft", "trl": "TRL SFTTrainer", "trainer_trained_loss": "Trainer, trained-positions loss",
         "trl_defaults": "TRL SFTTrainer, its own defaults", "trainer_liger": "Trainer + Liger kernels",
         "unsloth": "Unsloth", "both_glibc": "Trainer + peft, both on the system's malloc",
         "shared_prefix": "ours with the shared prefix off (training.share_prefix: false)"}


def _range(c: dict) -> str:
    """A ratio of medians with its range over the runs, and "tie" where the runs overlap."""
    return f"{c['ratio']:.2f}x ({c['ratio_min']:.2f}-{c['ratio_max']:.2f})" + (" tie" if c["tie"] else "")


def _comparison_rows(data: dict) -> list[list]:
    rows = []
    for name, c in (data.get("comparisons") or {}).items():
        if c.get("failed"):
            rows.append([NAMES.get(name, name), "failed", "", "", ""])
            continue
        s, m = c["speed"], c["memory"]
        rows.append([NAMES.get(name, name), _range(s), _range(m),
                     f"{fmt(s['theirs']['median'])} ({fmt(s['theirs']['min'])}-{fmt(s['theirs']['max'])})",
                     f"{fmt_bytes(m['theirs']['median'])} ({fmt_bytes(m['theirs']['min'])}-"
                     f"{fmt_bytes(m['theirs']['max'])})"])
    return rows


def _comparisons(data: dict) -> list[str]:
    ours = (data.get("spread") or {}).get("ours")
    head = [f"Ours: {fmt(ours['trained_tokens_per_second']['median'])} trained tokens/s "
            f"({fmt(ours['trained_tokens_per_second']['min'])}-{fmt(ours['trained_tokens_per_second']['max'])}), "
            f"peak {fmt_bytes(ours['peak_memory_bytes']['median'])} "
            f"({fmt_bytes(ours['peak_memory_bytes']['min'])}-{fmt_bytes(ours['peak_memory_bytes']['max'])}), "
            f"on `{(data.get('allocator') or {}).get('ours', 'system')}`.", ""] if ours else []
    return head + [table(["against", "speed, ours / theirs (min-max)", "peak memory, ours / theirs (min-max)",
                          "their trained tok/s", "their peak"], _comparison_rows(data)), ""]


def _speed(data: dict):
    s = data.get("settings") or {}
    spec = s.get("spec") or {}
    t = spec.get("training") or {}
    lines = []
    for anchor in ("trainer", "trl"):
        speed, memory = data.get(f"speedup_vs_{anchor}"), data.get(f"memory_ratio_vs_{anchor}")
        if anchor not in {r.get("system") for r in data.get("runs") or []}:
            continue  # a run of other legs (python -m bench.speed --systems ...)
        if speed is None:
            lines.append(f"- against {NAMES[anchor]}: no ratio (a run failed or the leg did not run)")
            continue
        lines.append(f"- **speedup_vs_{anchor}: {speed:.2f}x** (target >= {data['speedup_target']}x: "
                     f"{_verdict(data[f'meets_speed_target_vs_{anchor}'])}); **memory_ratio_vs_{anchor}: "
                     f"{memory:.2f}x** (target <= {data['memory_target']}x: "
                     f"{_verdict(data[f'meets_memory_target_vs_{anchor}'])})")
    lines += ["", *_comparisons(data)]
    systems = s.get("systems") or {}
    lines += [f"LoRA ({_method_text(spec.get('method'))}) on `{spec.get('model')}`, {s.get('steps')} steps "
              f"({s.get('measured_steps')} measured) of {t.get('batch_size')} rows x {t.get('grad_accum', 1)} "
              f"accumulation, sequences capped at {t.get('max_seq_len')} tokens, {s.get('repeats')} runs of each "
              "system in alternating order, each its own process. Ratios are of medians; the range pairs each "
              "side's extremes; a tie means the two systems' runs overlap. Every comparison but the last row's "
              "is on the same allocator.", "",
              "Systems: " + "; ".join(f"`{k}`: {v['about']}" for k, v in systems.items()) + ".", ""]
    if data.get("suite_seconds"):
        lines += [f"The whole run of this file took {data['suite_seconds'] / 60:.0f} minutes on this machine.", ""]
    runs = data.get("runs") or []
    lines += [table(["system", "run", "trained tok/s", "tokens/s", "peak memory", "mean train loss", "allocator",
                     "load"],
                    [[r["system"], r["repeat"], *(["failed: " + r["error"], "", "", "", "", ""] if "error" in r else
                      [fmt(r["trained_tokens_per_second"]), fmt(r["tokens_per_second"]),
                       fmt_bytes(r["peak_memory_bytes"]), fmt(r.get("mean_train_loss"), 3), r.get("allocator"),
                       fmt((r.get("load_average") or [None])[0])])] for r in runs]), "",
              "Mean train loss is the mean of the step losses (per trained token): a check that every system "
              "trained. It differs a little because the samplers order rows differently and Trainer's warmup "
              "starts from a learning rate of 0. Load is the machine's 1-minute load average when the run "
              "ended.", ""]
    long = data.get("long_rows")
    if long:
        lt = ((long.get("settings") or {}).get("spec") or {}).get("training") or {}
        rows = (long.get("settings") or {}).get("rows") or {}
        lines += [f"**Longer rows**: the same run on conversations of {rows.get('exchanges')} demo questions and "
                  f"answers, every answer trained; {lt.get('batch_size')} rows per step, capped at "
                  f"{lt.get('max_seq_len')} tokens, {long['settings'].get('steps')} steps, "
                  f"{long['settings'].get('repeats')} runs each.", "", *_comparisons(long),
                  table(["system", "run", "trained tok/s", "tokens/s", "peak memory"],
                        [[r["system"], r["repeat"], *(["failed: " + r["error"], "", ""] if "error" in r else
                          [fmt(r["trained_tokens_per_second"]), fmt(r["tokens_per_second"]),
                           fmt_bytes(r["peak_memory_bytes"])])] for r in long.get("runs") or []]), ""]
    for name, args in (s.get("anchor_arguments") or {}).items():
        shown = ", ".join(f"`{k}={v}`" for k, v in args.items())
        lines += [f"`{name}` settings: {shown}.", ""]

    def plot(plt, path):
        sets = [("demo rows", runs)] + ([("longer rows", long.get("runs") or [])] if long else [])
        fig, axes = plt.subplots(len(sets), 2, figsize=(11, 3.6 * len(sets)), squeeze=False)
        for row, (title, chosen) in enumerate(sets):
            ok = [r for r in chosen if "error" not in r]
            names = list(dict.fromkeys(r["system"] for r in ok))
            for ax, key, label, scale in ((axes[row][0], "trained_tokens_per_second", "trained tokens / s", 1),
                                          (axes[row][1], "peak_memory_bytes", "peak memory (MiB)", 2 ** 20)):
                values = [[r[key] / scale for r in ok if r["system"] == n] for n in names]
                medians = [sorted(v)[len(v) // 2] if v else 0 for v in values]
                ax.bar(range(len(names)), medians, color=["#2b7bba" if n.startswith("ours") else "#999999"
                                                          for n in names])
                for i, v in enumerate(values):
                    ax.scatter([i] * len(v), v, color="black", s=10, zorder=3)
                ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
                ax.set_ylabel(label)
                ax.set_title(title, fontsize=9)
        fig.suptitle("LoRA on the same data (bars: medians, dots: single runs)")
        _save(fig, path)
    return lines, (plot if runs else None)


def _ab(data: dict):
    """bench.ab: per change, the paired rounds' speedup with its range and the losses' agreement."""
    s = data.get("settings") or {}
    lines = [f"Our loop with and without each change, built in one process, alternating on the same "
             f"{s.get('rows', '?')} batches: {s.get('rounds', '?')} rounds of {s.get('steps_per_round', '?')} "
             "optimizer steps per side (ABBA). Speedup: the variant without the change's seconds over the "
             "variant with it, per round; a tie where the rounds fall on both sides of 1. Speed only: both "
             "share the process's memory.", ""]
    rows = []
    for name, c in (data.get("changes") or {}).items():
        if "error" in c:
            rows.append([name, c.get("about", ""), "failed", c["error"], "", "", ""])
            continue
        sps = c["seconds_per_step"]
        ahead = sum(1 for r in c["round_speedups"] if r > 1.0)
        rows.append([name, c["about"], f"{c['speedup']:.2f}x ({c['speedup_min']:.2f}-{c['speedup_max']:.2f})",
                     f"{c['verdict']} ({ahead} of {len(c['round_speedups'])} rounds faster with it)", f"{sps['with_it']['median']:.2f} ({sps['with_it']['min']:.2f}-{sps['with_it']['max']:.2f})",
                     f"{sps['without']['median']:.2f} ({sps['without']['min']:.2f}-{sps['without']['max']:.2f})",
                     f"{c['max_loss_difference']:.1e}"])
    lines += [table(["change", "what", "speedup (min-max)", "verdict", "s/step with it", "s/step without",
                     "largest relative loss difference"], rows), ""]
    return lines, None


def _memory(data: dict):
    runs = data.get("runs") or []
    floor = data.get("inference") or {}
    lines = [f"Peak memory of each method and update rule over {data.get('steps')} steps of "
             f"{data.get('batch_size')} rows (sequences capped at {data.get('max_seq_len')} tokens), beside the "
             "estimator's prediction; error = predicted / measured - 1.", ""]
    for name, r in (data.get("ratios") or {}).items():
        if "value" in r:
            target = r.get("target_at_most")
            verdict = "" if target is None or r["value"] is None else \
                f" (target <= {target}: {_verdict(r['value'] <= target)})"
            lines.append(f"- {name}: {fmt(r['value'], 2)}{verdict}")
    rows = [{"name": "inference (floor)", **floor}, *runs] if floor else runs
    lines += ["", table(["run", "measured peak", "predicted", "error", "trainable params", "failure"],
                        [[r.get("name"), fmt_bytes(r.get("measured_peak_bytes")), fmt_bytes(r.get("predicted_bytes")),
                          fmt_pct(r.get("error"), 1), fmt_count(r.get("trainable_params")), r.get("failure") or ""]
                         for r in rows]), ""]
    if data.get("skipped"):
        lines += ["Skipped: " + "; ".join(f"{s.get('name')} ({s.get('reason')})" for s in data["skipped"]), ""]

    def plot(plt, path):
        shown = [r for r in rows if r.get("measured_peak_bytes")]
        fig, ax = plt.subplots(figsize=(9, 0.32 * len(shown) + 1.6))
        ys = range(len(shown))
        ax.barh([y - 0.2 for y in ys], [r["measured_peak_bytes"] / 2 ** 20 for r in shown], height=0.4,
                label="measured peak", color="#2b7bba")
        ax.barh([y + 0.2 for y in ys], [(r.get("predicted_bytes") or 0) / 2 ** 20 for r in shown], height=0.4,
                label="predicted", color="#f0a030")
        ax.set_yticks(list(ys), [str(r.get("name")) for r in shown])
        ax.invert_yaxis()
        ax.set_xlabel("MiB")
        ax.legend(fontsize=8)
        ax.set_title("Memory ladder: measured peak and the estimator's prediction")
        _save(fig, path)
    return lines, (plot if rows else None)


def _estimator(data: dict):
    runs = data.get("runs") or []
    scores = data.get("scores") or {}
    shipped, refit = data.get("shipped_constants") or {}, data.get("refit_constants") or {}
    target = data.get("target_max_abs_error")

    def worst(constants: str, part: str) -> str:
        s = (scores.get(constants) or {}).get(part) or {}
        failed = f", failed: {', '.join(s['failed'])}" if s.get("failed") else ""
        return f"{fmt_pct(s.get('max_abs_error'), 1)} (mean {fmt_pct(s.get('mean_abs_error'), 1)}{failed})"

    lines = [f"Peak memory of runs the estimator's CPU constants were fitted on (**fit**: the memory ladder's "
             f"workload) and of runs they were not (**out of sample**: other batch shapes, gradient "
             f"checkpointing, another architecture), {data.get('steps')} steps each, every run its own process on "
             f"the job processes' allocator ({shipped.get('allocator')}); error = predicted / measured - 1. The "
             "refit fits the allocator slack coefficients and a process offset again on the fit set alone.", "",
             f"- **shipped constants, out of sample: largest error {worst('shipped', 'out_of_sample')}** "
             f"(target <= {fmt_pct(target)}: {_verdict(bool(data.get('meets_target')))}); in sample: "
             f"{worst('shipped', 'fit')}",
             f"- refitted constants: in sample {worst('refit', 'fit')}, "
             f"out of sample {worst('refit', 'out_of_sample')}",
             f"- shipped: activation slack {shipped.get('activation_slack')}, rebuilt-weight slack "
             f"{shipped.get('rebuilt_weight_slack')}, process {fmt_bytes(shipped.get('process_bytes'))} + tokenizer "
             f"{fmt_bytes(shipped.get('tokenizer_bytes'))} (+ {fmt_bytes(shipped.get('peft_bytes'))} with peft); refit: "
             + ("failed: " + refit["error"] if "error" in refit else
                f"activation slack {refit.get('activation_slack')}, rebuilt-weight slack "
                f"{refit.get('rebuilt_weight_slack')}, process "
                f"{refit.get('process_offset_bytes', 0) / 2 ** 20:+.0f} MiB"),
             ""]

    def shape(r: dict) -> str:
        b = r.get("estimated_batch") or {}
        return f"{b.get('rows')} x {b.get('length')}" if b.get("rows") else "-"

    lines += [table(["set", "run", "batch (rows x tokens)", "measured peak", "predicted", "error", "refit error",
                     "failure"],
                    [[r.get("set", "").replace("_", " "), r.get("name"), shape(r),
                      fmt_bytes(r.get("measured_peak_bytes")), fmt_bytes(r.get("predicted_bytes")),
                      fmt_pct(r.get("error"), 1), fmt_pct(r.get("refit_error"), 1), r.get("failure") or ""]
                     for r in runs]), ""]

    def plot(plt, path):
        shown = [r for r in runs if r.get("error") is not None]
        fig, ax = plt.subplots(figsize=(8, 0.32 * len(shown) + 1.8))
        ys = list(range(len(shown)))
        colors = ["#2b7bba" if r["set"] == "fit" else "#f0a030" for r in shown]
        ax.barh(ys, [100 * r["error"] for r in shown], color=colors)
        ax.scatter([100 * r["refit_error"] for r in shown if r.get("refit_error") is not None],
                   [y for y, r in zip(ys, shown) if r.get("refit_error") is not None], color="black", s=14, zorder=3,
                   label="refitted constants")
        if target:
            for x in (-100 * target, 100 * target):
                ax.axvline(x, color="#c0392b", linestyle="--", linewidth=1)
        ax.set_yticks(ys, [f"{r['name']} ({'fit' if r['set'] == 'fit' else 'out of sample'})" for r in shown])
        ax.invert_yaxis()
        ax.set_xlabel("error of the prediction, % (bars: shipped constants)")
        ax.legend(fontsize=8)
        ax.set_title("Memory estimator: in sample and out of sample")
        _save(fig, path)
    return lines, (plot if any(r.get("error") is not None for r in runs) else None)


def _quality(data: dict):
    s = data.get("settings") or {}
    rows = data.get("rows") or []
    lines = [f"Every registered method, {s.get('steps')} AdamW steps on the demo task, evaluated on "
             f"{s.get('eval_rows')} held-out rows (loss per trained token; greedy exact match). Learning rate: "
             f"the method's suggested rate x {s.get('lr_scale', 0):g} (the demo spec's rate over "
             f"{s.get('lr_reference')}'s suggested rate).", ""]
    lines += [table(["method", "lr", "trained params", "eval loss", "exact match", "train s", "peak memory"],
                    [[r["method"], "-" if r.get("lr") is None else f"{r['lr']:.2g}", *(["failed: " + str(r.get("error")), "", "", "", ""]
                      if r["status"] == "failed" else
                      [fmt_count(r.get("trainable_params")), fmt(r.get("eval_loss"), 3), fmt_pct(r.get("exact_match")),
                       fmt(r.get("train_seconds"), 1), fmt_bytes(r.get("peak_memory_bytes"))])] for r in rows]), ""]
    if data.get("failed"):
        lines += [f"Failed: {', '.join(data['failed'])} (messages above; logs in results/raw/).", ""]

    def plot(plt, path):
        ok = [r for r in rows if r["status"] == "ok" and r.get("eval_loss") is not None]
        names = [r["method"] for r in ok]
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.35 * len(ok) + 1.6), sharey=True)
        axes[0].barh(names, [r["eval_loss"] for r in ok], color="#2b7bba")
        axes[0].set_xlabel("held-out loss (lower is better)")
        axes[1].barh(names, [100 * (r.get("exact_match") or 0) for r in ok], color="#3a9d5d")
        axes[1].set_xlabel("exact match % (higher is better)")
        axes[0].invert_yaxis()
        fig.suptitle(f"Quality at {s.get('steps')} steps")
        _save(fig, path)
    return lines, (plot if rows else None)


def _efficiency(data: dict):
    peak = data.get("matmul") or {}
    rows = data.get("rows") or []
    lines = []
    if "error" in peak:
        lines += [f"Matmul measurement failed: {peak['error']}", ""]
    else:
        lines += [f"Measured matmul rate ({peak.get('size')}x{peak.get('size')} `torch.mm`, "
                  f"{peak.get('threads')} threads on {peak.get('device_name')}):", "",
                  table(["dtype", "best GFLOP/s", "median GFLOP/s"],
                        [[k, fmt(v["best_flops_per_second"] / 1e9), fmt(v["median_flops_per_second"] / 1e9)]
                         for k, v in (peak.get("rates") or {}).items()]), ""]
    fp32 = ((peak.get("rates") or {}).get("float32") or {}).get("best_flops_per_second")
    lines += [table(["method", "dtype", "model GFLOP/s", "of its dtype's best matmul rate", "of the fp32 matmul rate",
                     "6NT GFLOP/s", "tokens/s", "peak memory"],
                    [[r["method"], *(["failed: " + r["error"], "", "", "", "", "", ""] if "error" in r else
                      [r.get("dtype"), fmt(r["model_flops_per_second"] / 1e9), fmt_pct(r.get("fraction_of_peak"), 1),
                       fmt_pct(r["model_flops_per_second"] / fp32 if fp32 else None, 1),
                       fmt(r["flops_6nt_per_second"] / 1e9), fmt(r["tokens_per_second"]),
                       fmt_bytes(r["peak_memory_bytes"])])] for r in rows]), "",
              "Model FLOPs per step (T real tokens, P trained positions, L mean row length; recomputation not "
              "counted): full `6·N_body·T + 6·N_head·P + 6·layers·d·L·T`; LoRA `4·N_body·T + 4·N_head·P + "
              "6·N_adapter·T + 6·layers·d·L·T` (frozen weights need no weight gradient; our loss projects only "
              "trained positions onto the vocabulary). 6NT is the conventional `6 x all parameters x tokens`.", ""]

    def plot(plt, path):
        ok = [r for r in rows if "error" not in r and r.get("peak_flops_per_second")]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.bar([r["method"] for r in ok], [r["model_flops_per_second"] / 1e9 for r in ok], color="#2b7bba",
               label="achieved (model FLOPs)")
        if ok:
            ax.axhline(ok[0]["peak_flops_per_second"] / 1e9, color="#c0392b", linestyle="--",
                       label=f"measured {ok[0]['dtype']} matmul rate")
        ax.set_ylabel("GFLOP/s")
        ax.legend(loc="center right", fontsize=8)
        ax.set_title("Training FLOP/s against the machine's matmul rate")
        _save(fig, path)
    return lines, (plot if rows and "error" not in peak else None)


def _scale_finding(data: dict) -> str:
    """The finding as the current rules read the stored rows and runs (a file written before a
    rule changed still reads as today's code would say it), with the load warning."""
    from bench import scale

    if not data.get("rows"):
        return data.get("finding") or "No runs."
    cores = (data.get("machine") or {}).get("usable_cores")
    return " ".join(filter(None, [scale.finding(data["rows"]), scale.load_note(data.get("runs") or [], cores)]))


def _scale(data: dict):
    s = data.get("settings") or {}
    t = (s.get("spec") or {}).get("training") or {}
    rows = data.get("rows") or []
    lines = [f"**{_scale_finding(data)}**", "",
             f"LoRA ({_method_text((s.get('spec') or {}).get('method'))}) and QLoRA on random-weight models of "
             f"published shapes, ours against transformers.Trainer + peft: steps of {t.get('batch_size')} demo "
             f"rows (step 1 not timed; the steps column), {s.get('repeats')} run(s) of each system per "
             "size and method, each its own process, both on the job processes' allocator. A ratio that moves by "
             f"at most {100 * (s.get('trend_tolerance') or 0):.0f}% from the smallest model to the largest "
             "counts as holding. 'Projection alone' is the speedup that projecting only the trained positions "
             "onto the vocabulary gives by itself in model FLOPs (Trainer's path projects every position); "
             "'head share' is the vocabulary projection's share of Trainer's model FLOPs.", ""]
    lines += [table(["model", "parameters", "method", "steps", "ours trained tok/s", "Trainer trained tok/s",
                     "speedup", "ours peak", "Trainer peak", "memory ratio", "projection alone", "head share",
                     "failed"],
                    [[r["size"], fmt_count(r.get("parameters")), r["method"], r.get("steps", "-"),
                      fmt((r.get("ours") or {}).get("trained_tokens_per_second")),
                      fmt((r.get("trainer") or {}).get("trained_tokens_per_second")),
                      _ratio(r.get("speedup_vs_trainer")) + _scale_range(r),
                      fmt_bytes((r.get("ours") or {}).get("peak_memory_bytes")),
                      fmt_bytes((r.get("trainer") or {}).get("peak_memory_bytes")),
                      _ratio(r.get("memory_ratio_vs_trainer")), _ratio(r.get("projection_speedup")),
                      fmt_pct(r.get("head_share")),
                      "; ".join(f"{k}: {v}" for k, v in (r.get("errors") or {}).items())] for r in rows]), ""]
    if s.get("trainer_qlora"):
        q = s["trainer_qlora"]
        config = ", ".join(f"{k}={v}" for k, v in (q.get("BitsAndBytesConfig") or {}).items())
        lines += [f"Trainer's QLoRA: `BitsAndBytesConfig({config})`"
                  + (", then `prepare_model_for_kbit_training`" if q.get("prepare_model_for_kbit_training") else "")
                  + ", then `get_peft_model` with the same LoRA config.", ""]

    def plot(plt, path):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        styles = {("ours", "lora"): ("#2b7bba", "-", "o"), ("trainer", "lora"): ("#999999", "-", "o"),
                  ("ours", "qlora"): ("#2b7bba", "--", "s"), ("trainer", "qlora"): ("#999999", "--", "s")}
        for ax, key, label, scale in ((axes[0], "trained_tokens_per_second", "trained tokens / s", 1),
                                      (axes[1], "peak_memory_bytes", "peak memory (GiB)", 2 ** 30)):
            for (system, method), (color, line, marker) in styles.items():
                points = sorted((r["parameters"], r[system][key] / scale) for r in rows
                                if r["method"] == method and r.get(system) and r.get("parameters"))
                if points:
                    ax.plot(*zip(*points), color=color, linestyle=line, marker=marker,
                            label=f"{'ours' if system == 'ours' else 'Trainer'} {method}")
            ax.set_xscale("log")
            if key == "trained_tokens_per_second":
                from matplotlib.ticker import FuncFormatter

                ax.set_yscale("log")
                for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                    axis(FuncFormatter(lambda v, _: f"{v:g}"))
            sizes = sorted({r["parameters"] for r in rows if r.get("parameters")})
            ax.set_xticks(sizes, [_params_label(n) for n in sizes])
            ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
            ax.set_xlabel("parameters")
            ax.set_ylabel(label)
            ax.legend(fontsize=8)
        fig.suptitle("Ours vs transformers.Trainer + peft by model size (failed runs: see the table)")
        _save(fig, path)
    return lines, (plot if any(r.get("ours") or r.get("trainer") for r in rows) else None)


def _scale_range(row: dict) -> str:
    """A scale row's speed range over its runs, and "tie" where the two systems' runs overlap."""
    low_high = row.get("speed_range")
    if not low_high or low_high[0] == low_high[1]:
        return ""
    return f" ({low_high[0]:.2f}-{low_high[1]:.2f})" + (" tie" if row.get("speed_tie") else "")


def _params_label(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _generic(data: dict):
    """A result this module has no section for (e.g. the memory ladder): its scalars and its rows."""
    scalars = {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool)) and k != "benchmark"}
    lines = [f"- {k}: {fmt_value(k, v)}" for k, v in scalars.items()]
    rows = next((v for v in data.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)), [])
    if rows:
        keys = [k for k in dict.fromkeys(k for r in rows for k in r)
                if all(isinstance(r.get(k), (int, float, str, bool, type(None))) for r in rows)]
        lines += ["", table(keys, [[fmt_value(k, r.get(k)) for k in keys] for r in rows])]
    name_key = next((k for k in ("name", "label", "method", "run") if rows and k in rows[0]), None)
    byte_keys = [k for k in (rows[0] if rows else {}) if k.endswith("_bytes")]

    def plot(plt, path):
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.6))
        height = 0.8 / len(byte_keys)
        for i, key in enumerate(byte_keys):
            ax.barh([j + i * height for j in range(len(rows))], [(r.get(key) or 0) / 2 ** 20 for r in rows],
                    height=height, label=key)
        ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))], [str(r[name_key]) for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel("MiB")
        ax.legend(fontsize=8)
        _save(fig, path)
    return lines + [""], (plot if name_key and byte_keys else None)


# ---------------------------------------------------------------- formatting

def table(headers: list, rows: list[list]) -> str:
    cells = [[("" if c is None else str(c)).replace("|", "\\|").replace("\n", " ") for c in row] for row in rows]
    out = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(out)


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (abs(value) >= 1e5 or (0 < abs(value) < 10 ** -digits)):
        return f"{value:.{max(digits, 1)}g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def fmt_bytes(value) -> str:
    if not value:
        return "-"
    return f"{value / 2 ** 30:.2f} GiB" if value >= 2 ** 30 else f"{value / 2 ** 20:.0f} MiB"


def fmt_count(value) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{value:,}"


def fmt_pct(value, digits: int = 0) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def fmt_value(key: str, value) -> str:
    if key.endswith("_bytes") and isinstance(value, (int, float)):
        return fmt_bytes(value)
    return fmt(value, 3) if isinstance(value, float) else ("-" if value is None else str(value))


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _method_text(method: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (method or {}).items() if k != "name")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt
    plt.close(fig)
