"""The bake-off's report: every number read back from the runs' own run.json, a noise
floor from the seeds, the Pareto fronts, and a recommendation in plain words.

Written to the bake-off's folder: ``report.json`` (for tools), ``report.md`` (for people)
and ``pareto.png`` (quality against peak memory and against train time). No torch here:
the UI reads these files, and the functions below are plain arithmetic over rows.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from adapters.core.errors import StudioError
from jobs.bakeoff.plan import landing
from jobs.runfolder import RunFolder, read_run, write_json_atomic
from jobs.runner.store import JobStore

# Per-run fields copied from run.json's metrics (names as the training loop writes them).
RUN_METRICS = ("eval_loss", "exact_match", "train_loss", "peak_memory_bytes", "memory_kind", "train_seconds",
               "tokens_per_second", "trained_tokens_per_second", "trainable_params", "total_params", "steps")
SUMMARY_METRICS = ("eval_loss", "exact_match", "peak_memory_bytes", "train_seconds", "trained_tokens_per_second")
LOWER_IS_BETTER = {"eval_loss": True, "exact_match": False}


def dir_bytes(path: Path) -> int | None:
    if not path.is_dir():
        return None
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def collect(home: Path, manifest: dict) -> list[dict]:
    """One row per final run, its numbers from its own run folder."""
    store = JobStore(home)
    cands = {c["key"]: c for c in manifest["candidates"]}
    rows = []
    for entry in manifest["final"]:
        cand = cands[entry["key"]]
        row = {"candidate": entry["key"], "method": cand["method"], "rule": cand["rule"], "seed": entry["seed"],
               "lr": entry["lr"], "job_id": entry["job_id"], "predicted_peak_bytes": cand["predicted_peak_bytes"],
               "merges": cand["merges"], "run_dir": None, "status": "deleted", "error": None,
               **{k: None for k in RUN_METRICS}, "adapter_bytes": None}
        try:
            job = store.get(entry["job_id"])
        except StudioError:
            rows.append(row)
            continue
        try:
            run = read_run(job.run_dir) or {}
        except ValueError:
            run = {}
        metrics = run.get("metrics") or {}
        row.update(run_dir=job.run_dir, status=job.status.value, error=job.error,
                   **{k: metrics.get(k) for k in RUN_METRICS},
                   adapter_bytes=dir_bytes(RunFolder(job.run_dir).adapter_dir))
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per candidate over its completed seeds: the mean of each metric and its spread (max - min;
    None with fewer than two seeds)."""
    out: dict[str, dict] = {}
    for row in rows:
        s = out.setdefault(row["candidate"], {"candidate": row["candidate"], "method": row["method"],
                                              "rule": row["rule"], "lr": row["lr"], "merges": row["merges"],
                                              "predicted_peak_bytes": row["predicted_peak_bytes"], "runs": 0,
                                              "completed": 0, "_values": {k: [] for k in SUMMARY_METRICS}})
        s["runs"] += 1
        if row["status"] != "completed":
            continue
        s["completed"] += 1
        for k in SUMMARY_METRICS:
            if isinstance(row.get(k), (int, float)) and math.isfinite(row[k]):
                s["_values"][k].append(float(row[k]))
        for k in ("trainable_params", "adapter_bytes"):
            s[k] = row.get(k) if s.get(k) is None else s[k]
    for s in out.values():
        values = s.pop("_values")
        for k, v in values.items():
            s[k] = statistics.fmean(v) if v else None
            s[f"{k}_spread"] = max(v) - min(v) if len(v) >= 2 else None
    return list(out.values())


def quality_metric(summary: list[dict]) -> str:
    """Exact match where every finished candidate has one and they do not all tie (a coarse
    score with few rows often does), else the held-out loss."""
    done = [s for s in summary if s["completed"]]
    scores = [s["exact_match"] for s in done]
    if done and all(v is not None for v in scores) and len(set(scores)) > 1:
        return "exact_match"
    return "eval_loss"


def pareto_front(points: list[dict], quality: str, cost: str) -> list[str]:
    """Candidates no other candidate beats on both quality and cost (equal on both: both stay)."""
    sign = -1 if LOWER_IS_BETTER[quality] else 1
    pts = [(p["candidate"], sign * p[quality], p[cost]) for p in points
           if p.get(quality) is not None and p.get(cost) is not None]
    front = []
    for name, q, c in pts:
        dominated = any(q2 >= q and c2 <= c and (q2 > q or c2 < c) for _, q2, c2 in pts)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: next(c for m, _, c in pts if m == n))


def different(a: dict, b: dict, metric: str) -> bool | None:
    """True when the gap in ``metric`` exceeds both candidates' seed spread; None without spreads."""
    sa, sb = a.get(f"{metric}_spread"), b.get(f"{metric}_spread")
    if a.get(metric) is None or b.get(metric) is None or sa is None or sb is None:
        return None
    return abs(a[metric] - b[metric]) > max(sa, sb)


def mark_against_best(done: list[dict], metric: str) -> None:
    """Each candidate's standing against the best one: best, within noise, worse, or unknown
    (fewer than two seeds on either side)."""
    scored = [s for s in done if s.get(metric) is not None]
    if not scored:
        return
    sign = 1 if LOWER_IS_BETTER[metric] else -1
    best = min(scored, key=lambda s: sign * s[metric])
    for s in scored:
        verdict = different(best, s, metric)
        s["vs_best"] = "best" if s is best else {None: "no noise floor", False: "within noise", True: "worse"}[verdict]


def fmt_quality(s: dict, metric: str) -> str:
    return f"{s[metric]:.0%} exact match" if metric == "exact_match" else f"held-out loss {s[metric]:.3f}"


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def recommend(summary: list[dict], metric: str, budget_bytes: int | None, landed: dict | None = None) -> str:
    """The best candidate within the budget, its peers within noise, and a warning when its
    learning rate stayed at the edge of its grid (``landed``: jobs.bakeoff.plan.landing)."""
    ok = [s for s in summary if s.get(metric) is not None and s.get("peak_memory_bytes") is not None]
    where = f"within {gb(budget_bytes)}" if budget_bytes else "with no memory limit"
    fitting = [s for s in ok if not budget_bytes or s["peak_memory_bytes"] <= budget_bytes]
    if not fitting:
        low = min(ok, key=lambda s: s["peak_memory_bytes"], default=None)
        return (f"{where}: no candidate finished" if low is None else
                f"{where}: no candidate fits; the smallest peak was {low['candidate']} at {gb(low['peak_memory_bytes'])}")
    sign = 1 if LOWER_IS_BETTER[metric] else -1
    best = min(fitting, key=lambda s: (sign * s[metric], s["peak_memory_bytes"]))
    text = f"{where}: {best['candidate']}, {fmt_quality(best, metric)}, {gb(best['peak_memory_bytes'])} peak"
    peers = [s for s in fitting if s is not best and different(best, s, metric) is False]
    if peers:
        text += "; " + ", ".join(s["candidate"] for s in peers) + (" is" if len(peers) == 1 else " are") + \
            " within noise of it"
        cheaper = min(peers, key=lambda s: s["peak_memory_bytes"])
        if cheaper["peak_memory_bytes"] < best["peak_memory_bytes"]:
            text += f" ({cheaper['candidate']} needs only {gb(cheaper['peak_memory_bytes'])})"
    elif best.get(f"{metric}_spread") is None:
        text += "; one seed only, so no noise floor: rerun with --seeds 2 or more before trusting small gaps"
    if (landed or {}).get(best["candidate"]) == "edge":
        text += (f". Its learning rate {best['lr']:.2g} stayed at the edge of its grid after one more rate: "
                 "a better rate may lie further out")
    return text + "."


def build_report(manifest: dict, rows: list[dict], home: Path | None = None) -> dict:
    summary = summarize(rows)
    metric = quality_metric(summary)
    done = [s for s in summary if s["completed"]]
    budget = manifest.get("memory_budget_bytes")
    front_memory = pareto_front(done, metric, "peak_memory_bytes")
    mark_against_best(done, metric)
    search = search_table(manifest, home)
    ladder = [recommend(summary, metric, next(s["peak_memory_bytes"] for s in done if s["candidate"] == k),
                        search["landing"]) for k in front_memory]
    return {
        "id": manifest["id"], "created_at": manifest["created_at"], "written_at": time.time(),
        "device": manifest.get("device"), "memory_budget_bytes": budget,
        "budget": {"steps": manifest["request"]["budget_steps"], "minutes": manifest["request"]["budget_minutes"],
                   "search_steps": manifest.get("search_steps"), "lr_factors": manifest["request"]["lr_factors"],
                   "seeds": manifest.get("seeds"),
                   "data_order": "replicate k of every candidate uses training.seed = seeds[k]: same batches, same order"},
        "rows": rows_note(manifest.get("data")),
        "quality_metric": metric, "candidates": rows, "summary": summary,
        "pareto": front_memory, "pareto_time": pareto_front(done, metric, "train_seconds"),
        "recommendation": recommend(summary, metric, budget, search["landing"]), "recommendations_by_memory": ladder,
        "noise_floor": {m: max((s[f"{m}_spread"] for s in done if s.get(f"{m}_spread") is not None), default=None)
                        for m in SUMMARY_METRICS},
        "skipped": [{"candidate": c["key"], "reason": c["skipped"], "predicted_peak_bytes": c["predicted_peak_bytes"]}
                    for c in manifest["candidates"] if c["skipped"]],
        "lr_search": search,
        # What the answer cost: planning (one memory estimate per candidate) and the whole bake-off so far.
        "plan_seconds": manifest.get("plan_seconds"), "wall_seconds": time.time() - manifest["created_at"],
        "memory_note": ("runs shared one process (inline): peak memory is not per run"
                        if any(r.get("memory_kind") == "cpu_peak_rss" for r in rows) and manifest.get("inline")
                        else None),
    }


def search_table(manifest: dict, home: Path | None) -> dict:
    """What the learning-rate search tried, chose and cost (its runs read from ``home``'s store)."""
    store = JobStore(home) if home else None
    runs, seconds, wall = [], 0.0, 0.0
    for s in manifest["search"]:
        m, job = {}, None
        if store is not None:
            try:
                job = store.get(s["job_id"])
                m = (read_run(job.run_dir) or {}).get("metrics") or {}
            except (StudioError, ValueError):
                pass
        seconds += m.get("train_seconds") or 0.0
        if job is not None and job.started_at and job.finished_at:
            wall += job.finished_at - job.started_at
        runs.append({"candidate": s["key"], "lr": s["lr"], "job_id": s["job_id"], "eval_loss": m.get("eval_loss"),
                     "status": job.status.value if job else "deleted"})
    live = [c for c in manifest["candidates"] if not c["skipped"]]
    chosen = {c["key"]: c["lr"] for c in live}
    # Where each rate landed (jobs.bakeoff.plan.landing); "edge" even after one extension: the
    # best of those tried, not necessarily a good one.
    landed = {c["key"]: c.get("lr_landing") or landing(c) for c in live}
    return {"runs": runs, "chosen": chosen, "landing": landed,
            "extra": {c["key"]: c["lr_extra"] for c in live if c.get("lr_extra") is not None},
            "at_edge": sorted(k for k, v in landed.items() if v == "edge"),
            "train_seconds": seconds, "wall_seconds": wall, "steps_per_run": manifest.get("search_steps")}


def rows_note(data: dict | None) -> dict:
    """Which rows did what, from the manifest's split (``jobs.bakeoff.split``)."""
    if not data:
        return {"split": "the base spec's own, per seed (a bake-off planned before the fixed split)"}
    n = data["rows"]
    return {**n, "split_seed": data["split_seed"],
            "split": (f"fixed for every run (split once with seed {data['split_seed']}): {n['train']} rows train, "
                      f"{n['search']} pick the learning rates, {n['score']} score the candidates; the three sets "
                      "are disjoint, so the seeds' spread is initialisation and data order only")}


def write_report(home: Path, manifest: dict) -> Path:
    out = Path(home) / "bakeoffs" / manifest["id"]
    rows = collect(Path(home), manifest)
    report = build_report(manifest, rows, Path(home))
    png = plot(report, out / "pareto.png")
    report["plot"] = png.name if png else None
    write_json_atomic(out / "report.json", report)
    from jobs.bakeoff.page import markdown

    tmp = out / ".report.md.tmp"
    tmp.write_text(markdown(report), encoding="utf-8")
    tmp.replace(out / "report.md")
    return out


def plot(report: dict, path: Path) -> Path | None:
    """Quality against peak memory and against train time, one point per candidate (seed mean,
    bars: the seeds' spread), the Pareto front joined. None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metric = report["quality_metric"]
    done = [s for s in report["summary"] if s.get(metric) is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, cost, front, label, scale in (
            (axes[0], "peak_memory_bytes", report["pareto"], "peak memory (MB)", 1e6),
            (axes[1], "train_seconds", report["pareto_time"], "train time (s)", 1.0)):
        pts = [s for s in done if s.get(cost) is not None]
        for s in pts:
            on = s["candidate"] in front
            ax.errorbar(s[cost] / scale, s[metric], yerr=(s.get(f"{metric}_spread") or 0) / 2,
                        xerr=(s.get(f"{cost}_spread") or 0) / scale / 2, fmt="o", color="C3" if on else "C0",
                        alpha=1.0 if on else 0.6, capsize=3)
            ax.annotate(s["candidate"], (s[cost] / scale, s[metric]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        line = sorted((s for s in pts if s["candidate"] in front), key=lambda s: s[cost])
        ax.plot([s[cost] / scale for s in line], [s[metric] for s in line], "--", color="C3", label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel(metric.replace("_", " ") + (" (lower is better)" if LOWER_IS_BETTER[metric] else ""))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"bake-off {report['id']} on {report['device']}: mean of {len(report['budget']['seeds'] or [])} "
                 f"seed(s), bars = spread")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
