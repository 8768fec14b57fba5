"""The bake-off report as a Markdown page (``report.md``), from ``report.json``'s contents."""
from __future__ import annotations


def _num(x, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "-"


def _spread(s: dict, key: str, fmt: str = "{:.3f}") -> str:
    value, spread = s.get(key), s.get(f"{key}_spread")
    if value is None:
        return "-"
    return fmt.format(value) + ("" if spread is None else f" ± {fmt.format(spread / 2)}")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


LANDINGS = {"interior": "inside the grid", "extended": "at an edge, then bracketed by one more rate",
            "edge": "at the edge even after one more rate", "single": "one rate, no search"}


def landings(search: dict) -> str:
    """'2 inside the grid (a, b); 1 at the edge even after one more rate (c)', in that order."""
    landed = search.get("landing") or {}
    parts = []
    for kind, words in LANDINGS.items():
        names = sorted(k for k, v in landed.items() if v == kind)
        if names:
            parts.append(f"{len(names)} {words} ({', '.join(names)})")
    return "; ".join(parts) or "-"


def markdown(report: dict) -> str:
    b, metric = report["budget"], report["quality_metric"]
    budget = f"{b['steps']} optimizer steps" if b["steps"] else \
        f"{b['minutes']} minutes of training each (steps from each candidate's measured step time)" \
        if b["minutes"] else "the base spec's steps"
    lines = [f"# Bake-off {report['id']}", "",
             f"- device: {report['device']}; budget: {budget}, the same for every candidate",
             f"- seeds: {', '.join(map(str, b['seeds'] or []))}; {b['data_order']}",
             f"- rows: {(report.get('rows') or {}).get('split', '-')}",
             f"- learning rate: each candidate's own, searched over {', '.join(f'{f:g}' for f in b['lr_factors'])} "
             f"x its suggested rate on {b['search_steps']} steps, picked by the loss on the search rows; "
             "a winner at the edge of the grid got one more rate beyond it",
             f"- where the rates landed: {landings(report['lr_search'])}",
             f"- quality measure: {metric.replace('_', ' ')}",
             f"- cost: {report['wall_seconds'] / 60:.1f} min in all, of which planning (a memory estimate per "
             f"candidate) {(report.get('plan_seconds') or 0) / 60:.1f} min and the learning-rate search "
             f"{report['lr_search']['wall_seconds'] / 60:.1f} min of job time", "",
             "## Recommendation", "", report["recommendation"], ""]
    if report["recommendations_by_memory"]:
        lines += ["At each point of the memory front:", ""] + [f"- {r}" for r in report["recommendations_by_memory"]]
        lines.append("")
    lines += ["Two candidates count as different only when their gap exceeds the spread of both over the seeds "
              "(± shows half the spread, max - min).", ""]
    if report.get("memory_note"):
        lines += [f"Note: {report['memory_note']}.", ""]
    if report.get("plot"):
        lines += [f"![Pareto fronts]({report['plot']})", ""]
    lines += ["## Candidates (mean over seeds)", ""]
    landed = report["lr_search"].get("landing", {})
    lines += _table(["candidate", "lr", "lr landed", "held-out loss", "exact match", "peak memory", "predicted", "train time",
                     "trained tok/s", "trainable params", "adapter on disk", "merges", "runs ok", "vs best"],
                    [[s["candidate"], _num(s["lr"], "{:.2g}"), landed.get(s["candidate"]) or "-",
                      _spread(s, "eval_loss"),
                      _spread(s, "exact_match", "{:.0%}") if s.get("exact_match") is not None else "-",
                      _bytes(s.get("peak_memory_bytes")), _bytes(s.get("predicted_peak_bytes")),
                      _spread(s, "train_seconds", "{:.1f}s"), _num(s.get("trained_tokens_per_second"), "{:.0f}"),
                      _num(s.get("trainable_params"), "{:,}"), _bytes(s.get("adapter_bytes")),
                      "yes" if s["merges"] else "no", f"{s['completed']}/{s['runs']}", s.get("vs_best", "-")]
                     for s in report["summary"]])
    lines += ["", f"Pareto front, {metric.replace('_', ' ')} against peak memory: "
              f"{', '.join(report['pareto']) or '-'}",
              f"Pareto front, {metric.replace('_', ' ')} against train time: {', '.join(report['pareto_time']) or '-'}",
              "", "## Runs", ""]
    lines += _table(["candidate", "seed", "lr", "status", "held-out loss", "exact match", "peak memory",
                     "train time", "run folder"],
                    [[r["candidate"], r["seed"], _num(r["lr"], "{:.2g}"), r["status"], _num(r["eval_loss"]),
                      _num(r["exact_match"], "{:.0%}"), _bytes(r["peak_memory_bytes"]),
                      _num(r["train_seconds"], "{:.1f}s"), f"`{r['run_dir']}`"] for r in report["candidates"]])
    search = report["lr_search"]
    lines += ["", "## Learning-rate search", "",
              f"{len(search['runs'])} runs of {search['steps_per_run']} steps: {search['train_seconds']:.0f} s "
              f"of training, {search['wall_seconds']:.0f} s wall time (process start, loading, evaluation).", ""]
    if search["runs"]:
        extra = search.get("extra", {})
        lines += _table(["candidate", "lr", "loss on the search rows", "status", "chosen"],
                        [[r["candidate"], f"{r['lr']:.2g}" + (" (extension)" if extra.get(r["candidate"]) == r["lr"]
                                                              else ""),
                          _num(r["eval_loss"]), r["status"],
                          "yes" if search["chosen"].get(r["candidate"]) == r["lr"] else ""] for r in search["runs"]])
    if search.get("at_edge"):
        lines += ["", f"Still at the edge of the grid after extending it once: {', '.join(search['at_edge'])}. "
                  "The best rate may lie further out; a wider `--lr-factors` would tell."]
    if report["skipped"]:
        lines += ["", "## Skipped", ""]
        lines += _table(["candidate", "predicted peak", "why"],
                        [[s["candidate"], _bytes(s["predicted_peak_bytes"]), s["reason"].replace("|", "/")]
                         for s in report["skipped"]])
    return "\n".join(lines) + "\n"
