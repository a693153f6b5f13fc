"""The HTML report of `modelgate analyze --html`: the results table and plots (matplotlib,
inline PNGs) of per-variant means with confidence intervals over time, and the split over time.
"""

from __future__ import annotations

import base64
import html
import io
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scipy import stats as sps  # type: ignore[import-untyped]

__all__ = ["ReportError", "write_report"]

INSTALL_HINT = "pip install 'modelgate[demo]'"


class ReportError(Exception):
    """The report cannot be written (matplotlib missing, a path not writable)."""


def _figure_png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _means_over_time(plt: Any, timeline: dict[str, Any], metric: str, order: list[str]) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    edges = timeline["edges_s"][1:]
    series_by_variant = timeline["metrics"][metric]
    for variant in [v for v in order if v in series_by_variant]:
        series = series_by_variant[variant]
        shown = [
            (t, m, lo, hi)
            for t, m, lo, hi in zip(
                edges, series["mean"], series["low"], series["high"], strict=True
            )
            if m is not None
        ]
        if not shown:
            continue
        t, mean, low, high = zip(*shown, strict=True)
        below = [m - lo if lo is not None else math.nan for m, lo in zip(mean, low, strict=True)]
        above = [hi - m if hi is not None else math.nan for m, hi in zip(mean, high, strict=True)]
        bars = ax.errorbar(t, mean, yerr=[below, above], marker="o", markersize=3, capsize=3)
        bars.set_label(variant)
        banded = [(x, lo, hi) for x, _, lo, hi in shown if lo is not None and hi is not None]
        if len(banded) > 1:
            bx, blo, bhi = zip(*banded, strict=True)
            ax.fill_between(bx, blo, bhi, alpha=0.15, color=bars.lines[0].get_color())
    ax.set_title(f"{metric}: cumulative mean and confidence interval")
    ax.set_xlabel("seconds since the first exposure")
    ax.legend()
    png = _figure_png(fig)
    plt.close(fig)
    return png


def _split_over_time(plt: Any, timeline: dict[str, Any], result: dict[str, Any]) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    edges = timeline["edges_s"]
    mids = [(a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)]
    split = timeline["split"]
    totals = [sum(counts) for counts in zip(*split.values(), strict=True)] if split else []
    weights = {v["name"]: v["weight"] for v in result["variants"]}
    total_weight = sum(weights.values()) or 1.0
    for variant in [v["name"] for v in result["variants"] if v["name"] in split]:
        counts = split[variant]
        shares = [c / t if t else math.nan for c, t in zip(counts, totals, strict=True)]
        (line,) = ax.plot(mids, shares, marker="o", markersize=3, label=variant)
        expected = weights.get(variant, 0.0) / total_weight
        ax.axhline(expected, linestyle="--", linewidth=1, color=line.get_color())
    ax.set_ylim(0, 1)
    ax.set_title("split over time: share of enrolled exposures (dashed: configured)")
    ax.set_xlabel("seconds since the first exposure")
    ax.legend()
    png = _figure_png(fig)
    plt.close(fig)
    return png


def _means_now(plt: Any, result: dict[str, Any], metric: str) -> str:
    """Without files, the current means with their t intervals, one point per variant."""
    fig, ax = plt.subplots(figsize=(5, 2.8))
    alpha = result["alpha"]
    for index, variant in enumerate(result["variants"]):
        summary = variant["metrics"].get(metric) or {}
        n, mean, var = summary.get("count", 0), summary.get("mean"), summary.get("variance")
        if mean is None:
            continue
        half = float(sps.t.isf(alpha / 2, n - 1)) * math.sqrt(var / n) if n > 1 and var else 0
        ax.errorbar([index], [mean], yerr=[half], fmt="o", capsize=6, label=variant["name"])
    ax.set_xticks(range(len(result["variants"])), [v["name"] for v in result["variants"]])
    ax.set_title(f"{metric}: mean and {1 - alpha:.0%} confidence interval")
    png = _figure_png(fig)
    plt.close(fig)
    return png


def write_report(
    path: str | Path,
    results: list[dict[str, Any]],
    text: str,
    timelines: dict[str, dict[str, Any]] | None,
    source: str,
) -> None:
    """Writes one self-contained HTML file. `timelines` (by experiment) come from log files;
    without them the plots show the current means only."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ReportError(
            f"--html needs matplotlib, which is not installed ({exc}): {INSTALL_HINT}"
        ) from exc
    sections = []
    for result in results:
        name = result["experiment"]
        timeline = (timelines or {}).get(name)
        images: list[tuple[str, str]] = []
        if timeline and timeline["edges_s"]:
            for metric in sorted(timeline["metrics"]):
                order = [v["name"] for v in result["variants"]]
                png = _means_over_time(plt, timeline, metric, order)
                images.append((f"means-{metric}", png))
            images.append(("split", _split_over_time(plt, timeline, result)))
        else:
            for metric in sorted(result["metrics"]):
                images.append((f"means-{metric}", _means_now(plt, result, metric)))
        figures = "\n".join(
            f'<figure class="{html.escape(kind)}"><img alt="{html.escape(kind)}" '
            f'src="data:image/png;base64,{png}"></figure>'
            for kind, png in images
        )
        note = "" if timeline else "<p>Plots over time need the log files (--logs).</p>"
        sections.append(f"<section><h2>{html.escape(name)}</h2>{note}\n{figures}</section>")
    made = datetime.now(UTC).isoformat(timespec="seconds")
    document = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>modelgate analysis</title>
<style>body{{font-family:sans-serif;margin:2em}} pre{{background:#f6f6f6;padding:1em}}
figure{{display:inline-block;margin:0.5em}}</style></head>
<body><h1>modelgate analysis</h1>
<p>{html.escape(source)}, {made}</p>
<pre>{html.escape(text)}</pre>
{"".join(sections)}
</body></html>
"""
    try:
        Path(path).write_text(document, encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror or exc}") from exc
