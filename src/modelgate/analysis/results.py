"""An experiment's results from its per-variant sufficient statistics: summaries, each treatment
against the control (Welch or two proportions, Holm-adjusted), SRM, and the sample size still
needed. The admin API and `modelgate analyze` (live or from files) share this one function.
"""

from __future__ import annotations

import math
from typing import Any

from modelgate.outcomes import latency_quantile
from modelgate.stats import (
    holm,
    proportion_sample_size,
    proportion_test,
    sample_size,
    srm_test,
    welch_test,
)

__all__ = [
    "BINARY_TOLERANCE",
    "experiment_results",
    "is_binary",
    "per_arm_needed",
    "with_still_needed",
]

# A metric is binary when its moments are exactly those of 0/1 values (see is_binary).
BINARY_TOLERANCE = 1e-9


def is_binary(count: int, mean: float, m2: float, ones: int) -> bool:
    """True when every value was 0 or 1, decided from the moments alone.

    `ones` counts the values equal to 1. With p = ones / count, the values are all 0 or 1
    exactly when mean = p and M2 = count p (1 - p): then the values other than 1 sum to 0
    and so do their squares, so they are all 0. Both equalities are checked to a relative
    BINARY_TOLERANCE (Welford's rounding); values such as 1e-6 could pass for 0, which no
    real metric does.
    """
    if count <= 0:
        return False
    p = ones / count
    bernoulli_m2 = count * p * (1.0 - p)
    return abs(mean - p) <= BINARY_TOLERANCE and abs(m2 - bernoulli_m2) <= BINARY_TOLERANCE * max(
        1.0, float(count)
    )


def _summary(row: dict[str, Any] | None) -> dict[str, Any]:
    if row is None:
        return {"count": 0, "mean": None, "variance": None, "ones": 0, "m2": 0.0}
    count = int(row["count"])
    return {
        "count": count,
        "mean": float(row["mean"]) if count else None,
        "variance": float(row["m2"]) / (count - 1) if count > 1 else None,
        "ones": int(row["ones"]),
        "m2": float(row["m2"]),
    }


def _system(row: dict[str, Any] | None) -> dict[str, Any]:
    """n (enrolled requests), errors and latency of one variant, as the gateway measured."""
    if row is None:
        return {"n": 0, "errors": 0, "error_rate": None, "latency_s": None}
    n, errors = int(row["requests"]), int(row["errors"])
    latency = None
    buckets = row.get("buckets")
    if buckets is not None and n:
        latency = {
            "mean": float(row["latency"]["mean"]),
            **{f"p{q}": latency_quantile(list(buckets), q / 100) for q in (50, 95, 99)},
        }
    return {
        "n": n,
        "errors": errors,
        "error_rate": errors / n if n else None,
        "latency_s": latency,
    }


def _compare(
    binary: bool, control: dict[str, Any], arm: dict[str, Any], alpha: float
) -> dict[str, Any]:
    head = {"test": "proportion" if binary else "welch"}
    try:
        if binary:
            result = proportion_test(
                control["ones"], control["count"], arm["ones"], arm["count"], alpha
            ).as_dict()
        else:
            result = welch_test(
                control["count"],
                control["mean"] if control["count"] else 0.0,
                control["variance"] if control["count"] > 1 else 0.0,
                arm["count"],
                arm["mean"] if arm["count"] else 0.0,
                arm["variance"] if arm["count"] > 1 else 0.0,
                alpha,
            ).as_dict()
    except ValueError as exc:
        need = "1 observation" if binary else "2 observations"
        return {**head, "error": f"needs at least {need} per arm ({exc})", "p_value": None}
    return {**head, **result}


def _sample_size(
    metric: str,
    mde: float,
    binary: bool,
    arms: dict[str, dict[str, Any]],
    control: str,
    alpha: float,
    power: float,
) -> dict[str, Any]:
    base = arms[control]
    out: dict[str, Any] = {"metric": metric, "mde": mde, "n_per_arm": None, "still_needed": None}
    try:
        if binary and not base["count"]:
            raise ValueError("no control observations to estimate the base rate from")
        n = per_arm_needed(
            binary,
            base["ones"] / base["count"] if binary else 0.0,
            base["variance"] if base["count"] >= 2 else None,
            mde,
            alpha,
            power,
            "observations",
        )
    except ValueError as exc:
        out["error"] = str(exc)
        return out
    return with_still_needed(out, n, arms)


def per_arm_needed(
    proportion: bool,
    base_rate: float,
    variance: float | None,
    mde: float,
    alpha: float,
    power: float,
    what: str,
) -> float:
    """Sample size per arm to detect `mde`: for a proportion from the control's rate (the
    alternative `mde` above it, or below when that passes 1), else from its variance."""
    if proportion:
        other = base_rate + mde if base_rate + mde <= 1.0 else base_rate - mde
        return proportion_sample_size(base_rate, other, alpha, power)
    if not variance:
        raise ValueError(f"needs 2 control {what} that differ, for the sd")
    return sample_size(mde, math.sqrt(variance), alpha, power)


def with_still_needed(
    out: dict[str, Any], n: float, arms: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """`out` with the sample size per arm and what each arm (its `count`) still lacks."""
    needed = math.ceil(n)
    out["n_per_arm"] = needed
    out["still_needed"] = {name: max(0, needed - arm["count"]) for name, arm in arms.items()}
    out["still_needed_per_arm"] = max(out["still_needed"].values())
    return out


def experiment_results(design: dict[str, Any], snapshot: dict[str, Any]) -> dict[str, Any]:
    """Results of one experiment. `design` is `outcomes.experiment_designs(config)[name]`;
    `snapshot` is a (merged) OutcomeStore snapshot, live or rebuilt from log files."""
    name, variants, control = design["name"], list(design["variants"]), design["control"]
    analysis = design["analysis"]
    alpha, power = float(analysis["alpha"]), float(analysis["power"])
    system = {r["variant"]: r for r in snapshot["system"] if r["experiment"] == name}
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for row in snapshot["outcomes"]:
        if row["experiment"] == name and row["variant"] in variants:
            rows.setdefault(row["metric"], {})[row["variant"]] = row
    metrics = sorted(rows)
    summaries = {m: {v: _summary(rows[m].get(v)) for v in variants} for m in metrics}
    binary = {
        m: any(s["count"] for s in summaries[m].values())
        and all(
            is_binary(s["count"], s["mean"], s["m2"], s["ones"])
            for s in summaries[m].values()
            if s["count"]
        )
        for m in metrics
    }
    per_variant = []
    for variant, weight in zip(variants, design["weights"], strict=True):
        entry = {"name": variant, "weight": weight, **_system(system.get(variant))}
        entry["metrics"] = {
            m: {k: v for k, v in summaries[m][variant].items() if k != "m2"} for m in metrics
        }
        per_variant.append(entry)
    comparisons = []
    for metric in metrics:
        for variant in variants:
            if variant == control:
                continue
            found = _compare(
                binary[metric], summaries[metric][control], summaries[metric][variant], alpha
            )
            comparisons.append({"metric": metric, "variant": variant, "control": control, **found})
    tested = [c for c in comparisons if c.get("p_value") is not None]
    if tested:
        for comparison, adjusted in zip(tested, holm([c["p_value"] for c in tested]), strict=True):
            comparison["p_value_holm"] = float(adjusted)
            comparison["significant"] = bool(adjusted < alpha)
    counts = [entry["n"] for entry in per_variant]
    srm = srm_test(counts, design["weights"]).as_dict()
    srm.update(counts=counts, weights=list(design["weights"]))
    if design.get("segments"):
        srm["note"] = "segments change the weights per request: this checks the default weights"
    mde = analysis.get("mde") or {}
    sizes = [
        _sample_size(m, float(mde[m]), binary.get(m, False), summaries[m], control, alpha, power)
        if m in summaries
        else {"metric": m, "mde": mde[m], "error": "no feedback for this metric yet"}
        for m in sorted(mde)
    ]
    return {
        "experiment": name,
        "control": control,
        "alpha": alpha,
        "power": power,
        "variants": per_variant,
        "metrics": {m: {"binary": binary[m]} for m in metrics},
        "comparisons": comparisons,
        "multiple_testing": {"method": "holm", "tests": len(tested)},
        "srm": srm,
        "sample_size": sizes,
    }
