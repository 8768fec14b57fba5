"""Loss curves drawn as inline SVG: train losses as lines, evaluations as lines with a
marker on every point (a run evaluated once is a single dot that must still show), and a
legend. Plain markup, so a tick that changes nothing redraws nothing and no plotting
library is needed in the UI process."""
from __future__ import annotations

import html
import math
from collections import defaultdict

WIDTH, HEIGHT = 900, 300
HIST_WIDTH = 560  # drawn half as wide on the page as the loss charts
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 12, 36
PALETTE = ("#4f46e5", "#f97316", "#10b981", "#e11d48", "#0ea5e9", "#a855f7", "#84cc16", "#f59e0b")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round numbers spanning [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 0.1
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def loss_chart(points: list[dict], empty: str = "No loss logged yet.") -> str:
    """``points`` are {step, loss, series}; a series whose name ends in "eval" gets markers."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for p in points:
        if p.get("loss") is not None and math.isfinite(p["loss"]):
            series[p["series"]].append((float(p["step"]), float(p["loss"])))
    if not series:
        return f'<div class="chart-empty">{html.escape(empty)}</div>'
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    pad = (max(ys) - min(ys)) * 0.05 or abs(ys[0]) * 0.05 or 0.1
    y_lo, y_hi = min(ys) - pad, max(ys) + pad

    def sx(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * (WIDTH - LEFT - RIGHT)

    def sy(y: float) -> float:
        return TOP + (y_hi - y) / (y_hi - y_lo) * (HEIGHT - TOP - BOTTOM)

    parts = [f'<svg class="loss-chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="loss curves">']
    for t in nice_ticks(y_lo, y_hi):
        y = sy(t)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in nice_ticks(x_lo, x_hi, 6):
        if float(t).is_integer() or x_hi - x_lo < 6:
            x = sx(t)
            parts.append(f'<text class="tick" x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{t:g}</text>')
    parts.append(f'<text class="axis" x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 4}" text-anchor="middle">step</text>')
    legend = []
    runs = list(dict.fromkeys(name.rpartition(" ")[0] for name in series))
    # Runs in the order given; within a run its train curve before its eval curve.
    ordered = sorted(series.items(), key=lambda kv: (runs.index(kv[0].rpartition(" ")[0]), kv[0].endswith("eval")))
    for i, (name, pts) in enumerate(ordered):
        color = PALETTE[i % len(PALETTE)]
        pts.sort()
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        dash = ' stroke-dasharray="5 3"' if name.endswith("eval") else ""
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{path}">'
                     f'<title>{html.escape(name)}</title></polyline>')
        if name.endswith("eval") or len(pts) == 1:
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}">'
                      f'<title>{html.escape(name)}: step {x:g}, loss {y:.4f}</title></circle>' for x, y in pts]
        last = pts[-1][1]
        legend.append(f'<span class="legend-item"><span class="legend-swatch" style="background:{color}"></span>'
                      f'{html.escape(name)} <span class="legend-last">{last:.4f}</span></span>')
    parts.append("</svg>")
    return f'<div class="chart">{"".join(parts)}<div class="legend">{"".join(legend)}</div></div>'



def length_histogram(lengths: list[int], limit: int | None = None, bins: int = 24) -> str:
    """Rows per token length, with ``limit`` (max_seq_len) drawn where truncation starts."""
    if not lengths:
        return '<div class="chart-empty">No rows.</div>'
    lo, hi = min(lengths), max(lengths)
    width = max(1, math.ceil((hi - lo + 1) / bins))
    counts = [0] * ((hi - lo) // width + 1)
    for n in lengths:
        counts[(n - lo) // width] += 1
    x_lo, x_hi = lo, lo + len(counts) * width
    if limit is not None and limit < x_hi:
        x_hi = max(x_hi, limit + 1)
    top = max(counts)
    width_px = HIST_WIDTH
    plot_w, plot_h = width_px - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x_lo) / max(x_hi - x_lo, 1) * plot_w

    parts = [f'<svg class="loss-chart" viewBox="0 0 {width_px} {HEIGHT}" role="img" aria-label="token lengths">']
    for t in nice_ticks(0, top, 4):
        y = TOP + plot_h - t / top * plot_h
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{width_px - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    for i, c in enumerate(counts):
        if c:
            x0, x1 = sx(lo + i * width), sx(lo + (i + 1) * width)
            h = c / top * plot_h
            parts.append(f'<rect class="bar" x="{x0 + 1:.1f}" y="{TOP + plot_h - h:.1f}" width="{max(x1 - x0 - 2, 1):.1f}" '
                         f'height="{h:.1f}"><title>{lo + i * width}-{lo + (i + 1) * width - 1} tokens: {c} rows'
                         f'</title></rect>')
    for t in (t for t in nice_ticks(x_lo, x_hi, 5) if float(t).is_integer()):  # lengths are whole tokens
        parts.append(f'<text class="tick" x="{sx(t):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{t:g}</text>')
    if limit is not None and x_lo <= limit <= x_hi:
        x = sx(limit)
        parts.append(f'<line class="limit" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>'
                     f'<text class="tick" x="{x - 4:.1f}" y="{TOP + 12}" text-anchor="end">max_seq_len {limit}</text>')
    parts.append(f'<text class="axis" x="{(LEFT + width_px - RIGHT) / 2}" y="{HEIGHT - 4}" text-anchor="middle">'
                 'tokens per row</text></svg>')
    return f'<div class="chart">{"".join(parts)}</div>'
