"""An experiment analysis redone offline from exposure and feedback files: feedback joined to
its exposure by request id or by unit hash, per-variant statistics recomputed in the shape of
a live OutcomeStore snapshot (for modelgate.analysis.results), and their course over time for plots.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps  # type: ignore[import-untyped]

from modelgate.exposure import EXPOSURE_DTYPE, EXPOSURE_NAMES, FLAG_ENROLLED
from modelgate.feedbacklog import FEEDBACK_DTYPE, FEEDBACK_NAMES, FLAG_BY_REQUEST_ID
from modelgate.feedbacklog import FLAG_ENROLLED as FEEDBACK_ENROLLED
from modelgate.recordlog import iter_record_files

__all__ = ["LogData", "load_logs", "snapshot_of", "timeline_of"]

TIME_BINS = 20


@dataclass
class LogData:
    """Exposures and feedback of a log directory, names resolved, feedback attributed."""

    designs: dict[str, dict[str, Any]]  # from the newest sidecar that has them
    exposures: dict[str, np.ndarray] = field(default_factory=dict)  # column -> array
    feedback: dict[str, np.ndarray] = field(default_factory=dict)
    join: Counter[str] = field(default_factory=Counter)  # joined, unjoined, moved, ambiguous


def _columns(
    path: str | os.PathLike[str], prefix: str, dtype: np.dtype[Any], tables: Mapping[str, str]
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Every file's records as columns, the id fields replaced by their names."""
    parts: dict[str, list[np.ndarray]] = {}
    designs: dict[str, dict[str, Any]] = {}
    for _, data, sidecar in iter_record_files(path, prefix, dtype, tables):
        designs.update(sidecar.get("meta", {}).get("experiments", {}))
        for name in dtype.names or ():
            if name.startswith("pad"):
                continue
            column = data[name]
            if name in tables:
                names = np.asarray(sidecar[tables[name]] or [""], dtype=object)
                column = names[column]
                name = name.removesuffix("_id")
            parts.setdefault(name, []).append(column)
    columns = {name: np.concatenate(arrays) for name, arrays in parts.items()}
    return columns, designs


def load_logs(path: str | os.PathLike[str]) -> LogData:
    """Reads a log directory and attributes each feedback record to the variant of the
    exposure it joins: the request's own exposure (feedback by request id) or the unit's
    first enrolled exposure in that experiment (feedback by unit). A record that joins no
    exposure keeps the variant the gateway attributed when it accepted it. Without a change
    of weights or salt in between, this is exactly what the live results counted.

    The records keep only the request id's last 16 bytes, so two requests can share one
    (`victim-…0123456789abcdef` and `attacker-0-0123456789abcdef`, or one id reused). A
    tail whose exposures in an experiment show more than one (unit hash, variant) is
    ambiguous: its feedback by request id is dropped and counted (`ambiguous`), never
    attributed to one of them (issue 12 review, finding 2)."""
    exposures, designs = _columns(path, "exposure", EXPOSURE_DTYPE, EXPOSURE_NAMES)
    feedback, _ = _columns(path, "feedback", FEEDBACK_DTYPE, FEEDBACK_NAMES)
    data = LogData(designs, exposures, feedback)
    if not feedback:
        return data
    by_request: dict[tuple[str, bytes], tuple[str, bool]] = {}
    claimant: dict[tuple[str, bytes], tuple[int, str]] = {}  # (unit hash, variant) of a tail
    ambiguous: set[tuple[str, bytes]] = set()
    by_unit: dict[tuple[str, int], str] = {}
    if exposures:
        order = np.argsort(exposures["ts_ns"], kind="stable")
        for i in order.tolist():
            experiment, variant = exposures["experiment"][i], exposures["variant"][i]
            enrolled = bool(exposures["flags"][i] & FLAG_ENROLLED)
            unit_hash = int(exposures["unit_hash"][i])
            key = (experiment, bytes(exposures["request_id"][i]))
            if claimant.setdefault(key, (unit_hash, variant)) != (unit_hash, variant):
                ambiguous.add(key)
            by_request[key] = (variant, enrolled)
            if enrolled:
                by_unit.setdefault((experiment, unit_hash), variant)
    variants = feedback["variant"].copy()
    enrolled = (feedback["flags"] & FEEDBACK_ENROLLED) != 0
    kept = np.ones(len(variants), dtype=bool)
    for i in range(len(variants)):
        experiment = feedback["experiment"][i]
        found: tuple[str, bool] | None
        if feedback["flags"][i] & FLAG_BY_REQUEST_ID:
            key = (experiment, bytes(feedback["request_id"][i]))
            if key in ambiguous:
                data.join["ambiguous"] += 1
                kept[i] = False
                continue
            found = by_request.get(key)
        else:
            unit_variant = by_unit.get((experiment, int(feedback["unit_hash"][i])))
            found = (unit_variant, True) if unit_variant is not None else None
        if found is None:
            data.join["unjoined"] += 1
            continue
        data.join["joined"] += 1
        if found[0] != variants[i]:
            data.join["moved"] += 1
        variants[i], enrolled[i] = found
    feedback["variant"], feedback["enrolled"] = variants, enrolled
    if not kept.all():
        data.feedback = {name: column[kept] for name, column in feedback.items()}
    return data


def _moments(values: np.ndarray) -> dict[str, Any]:
    """count, mean, M2 (two passes) and the count of ones, as Moments.as_dict gives them."""
    if values.size == 0:
        return {"count": 0, "mean": 0.0, "m2": 0.0, "ones": 0}
    mean = float(values.mean())
    return {
        "count": int(values.size),
        "mean": mean,
        "m2": float(np.square(values - mean).sum()),
        "ones": int(np.count_nonzero(values == 1.0)),
    }


def snapshot_of(data: LogData) -> dict[str, Any]:
    """The files as an OutcomeStore snapshot: n from enrolled exposures (no latency: the
    files do not hold it), outcomes from the enrolled, attributed feedback."""
    system = []
    if data.exposures:
        enrolled = (data.exposures["flags"] & FLAG_ENROLLED) != 0
        pairs = Counter(
            zip(
                data.exposures["experiment"][enrolled].tolist(),
                data.exposures["variant"][enrolled].tolist(),
                strict=True,
            )
        )
        system = [
            {"experiment": e, "variant": v, "requests": n, "errors": 0, "buckets": None}
            for (e, v), n in sorted(pairs.items())
        ]
    outcomes = []
    fb = data.feedback
    if fb:
        keep = fb["enrolled"]
        keys = sorted(
            set(
                zip(
                    fb["experiment"][keep].tolist(),
                    fb["variant"][keep].tolist(),
                    fb["metric"][keep].tolist(),
                    strict=True,
                )
            )
        )
        for experiment, variant, metric in keys:
            chosen = (
                keep
                & (fb["experiment"] == experiment)
                & (fb["variant"] == variant)
                & (fb["metric"] == metric)
            )
            outcomes.append(
                {
                    "experiment": experiment,
                    "variant": variant,
                    "metric": metric,
                    **_moments(fb["value"][chosen].astype(np.float64)),
                }
            )
    return {"outcomes": outcomes, "system": system, "counts": dict(data.join)}


def _cumulative_ci(
    ts: np.ndarray, values: np.ndarray, edges: np.ndarray, alpha: float
) -> dict[str, list[float | None]]:
    """Mean and its 1 - alpha t interval of the values seen up to each bin's end."""
    order = np.argsort(ts, kind="stable")
    ts, values = ts[order], values[order]
    out: dict[str, list[float | None]] = {"n": [], "mean": [], "low": [], "high": []}
    for end in edges[1:]:
        seen = values[: int(np.searchsorted(ts, end, side="right"))]
        n = int(seen.size)
        mean = float(seen.mean()) if n else None
        half = None
        if n >= 2:
            half = float(sps.t.isf(alpha / 2, n - 1)) * math.sqrt(float(seen.var(ddof=1)) / n)
        out["n"].append(n)
        out["mean"].append(mean)
        out["low"].append(mean - half if mean is not None and half is not None else None)
        out["high"].append(mean + half if mean is not None and half is not None else None)
    return out


def timeline_of(data: LogData, experiment: str, alpha: float = 0.05) -> dict[str, Any]:
    """Per time bin: enrolled exposures per variant (the split), and per metric and variant
    the cumulative mean with its confidence interval. Times in seconds from the first."""
    ex, fb = data.exposures, data.feedback
    ex_mask = (
        (ex["experiment"] == experiment) & ((ex["flags"] & FLAG_ENROLLED) != 0) if ex else None
    )
    fb_mask = (fb["experiment"] == experiment) & fb["enrolled"] if fb else None
    stamps = [a["ts_ns"][m] for a, m in ((ex, ex_mask), (fb, fb_mask)) if m is not None]
    all_ts = np.concatenate(stamps) if stamps else np.zeros(0, dtype=np.uint64)
    if all_ts.size == 0:
        return {"start_ns": None, "edges_s": [], "split": {}, "metrics": {}}
    start, end = int(all_ts.min()), int(all_ts.max())
    edges = np.linspace(start, max(end, start + 1), TIME_BINS + 1)
    split: dict[str, list[int]] = {}
    if ex_mask is not None:
        for variant in sorted(set(ex["variant"][ex_mask].tolist())):
            chosen = ex["ts_ns"][ex_mask & (ex["variant"] == variant)].astype(np.float64)
            split[variant] = np.histogram(chosen, bins=edges)[0].tolist()
    metrics: dict[str, dict[str, Any]] = {}
    if fb_mask is not None:
        for metric in sorted(set(fb["metric"][fb_mask].tolist())):
            for variant in sorted(set(fb["variant"][fb_mask].tolist())):
                chosen = fb_mask & (fb["metric"] == metric) & (fb["variant"] == variant)
                if chosen.any():
                    metrics.setdefault(metric, {})[variant] = _cumulative_ci(
                        fb["ts_ns"][chosen].astype(np.float64),
                        fb["value"][chosen].astype(np.float64),
                        edges,
                        alpha,
                    )
    return {
        "start_ns": start,
        "edges_s": ((edges - start) / 1e9).tolist(),
        "split": split,
        "metrics": metrics,
    }
