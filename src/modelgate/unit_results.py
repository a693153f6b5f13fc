"""An experiment's results over units (issue 13): the design (variants, control, weights,
analysis settings) and the engine's per-variant `UnitStats` become the results JSON: per
metric and arm against the control, the per-unit test of the metric's kind (mean,
proportion, ratio, CUPED) with absolute and relative lifts, Holm over the metrics, SRM over
distinct enrolled units, the sample size in units. The shape follows modelgate.results (the
per-event results of the live snapshot) wherever the concepts match, so the text table and
the HTML report read both; `unit_of_analysis` tells them apart.

Why units: the gateway randomizes units, and the requests and outcomes of one unit are
correlated; counting them as independent samples understates every variance.
"""

from __future__ import annotations

from typing import Any

from modelgate.analysis_engine import ExperimentUnits
from modelgate.results import per_arm_needed, with_still_needed
from modelgate.stats import (
    DEFAULT_TUNING,
    EffectResult,
    UnitStats,
    cuped_test,
    holm,
    sequential_srm_test,
    srm_test,
    unit_mean_test,
    unit_proportion_test,
    unit_ratio_test,
)

__all__ = ["metric_plan", "ratio_pairs", "unit_results"]

_TESTS = {
    "mean": unit_mean_test,
    "proportion": unit_proportion_test,
    "ratio": unit_ratio_test,
    "cuped": cuped_test,
}


def metric_plan(
    analysis: dict[str, Any], seen: list[str], binary: dict[str, bool]
) -> dict[str, tuple[str, str]]:
    """Per metric to test: (method, the engine's denominator key). Declared kinds win; a
    covariate makes a mean CUPED; otherwise a metric whose values are all 0/1 is a
    proportion, any other a mean. A covariate without a kind of its own is not tested: it
    was measured before exposure, so it differs between arms by chance alone."""
    declared: dict[str, dict[str, Any]] = analysis.get("metrics") or {}
    covariates = {s["covariate"] for s in declared.values() if s.get("covariate")}
    plan: dict[str, tuple[str, str]] = {}
    for metric in seen:
        spec = declared.get(metric, {})
        kind = spec.get("kind")
        if kind is None and metric in covariates:
            continue
        if spec.get("covariate"):
            plan[metric] = ("cuped", spec["covariate"])
        elif kind == "ratio":
            plan[metric] = ("ratio", spec["denominator"])
        elif kind is None:
            plan[metric] = ("proportion" if binary.get(metric) else "mean", "exposures")
        else:
            plan[metric] = (kind, "exposures")
    return plan


def _arm_summary(method: str, stats: UnitStats, values: int) -> dict[str, Any]:
    """One arm of one metric: units, values, the estimate (mean per unit, share of units
    converted, or ratio) and a per-unit variance such that variance / count is the
    estimate's squared standard error, as the report's plot of means expects."""
    n = stats.count
    out: dict[str, Any] = {"count": n, "units": n, "values": values, "ones": stats.nonzero_x}
    estimate: float | None = None
    variance: float | None = None
    if n:
        if method == "proportion":
            estimate = stats.nonzero_x / n
            variance = estimate * (1.0 - estimate)
        elif method == "ratio":
            if stats.mean_y != 0.0:
                estimate = stats.mean_x / stats.mean_y
                if n > 1:
                    r = estimate
                    v = stats.var_x - 2.0 * r * stats.cov_xy + r * r * stats.var_y
                    variance = max(0.0, v) / stats.mean_y**2
        else:
            estimate = stats.mean_x
            variance = stats.var_x if n > 1 else None
    return {**out, "mean": estimate, "variance": variance}


def _compare(
    method: str, control: UnitStats, arm: UnitStats, analysis: dict[str, Any]
) -> dict[str, Any]:
    head = {"test": method, "method": method}
    sequential = bool(analysis.get("sequential", False))
    try:
        found: EffectResult = _TESTS[method](
            control,
            arm,
            float(analysis.get("alpha", 0.05)),
            sequential=sequential,
            tuning=float(analysis.get("sequential_tuning", DEFAULT_TUNING)),
        )
    except ValueError as exc:
        return {**head, "error": str(exc), "p_value": None}
    return {**head, **found.as_dict()}


def _srm(design: dict[str, Any], counts: list[int]) -> dict[str, Any]:
    """Distinct enrolled units against the weights: chi-square read once, or the sequential
    test (valid at every look) when the experiment's results are sequential."""
    weights = list(design["weights"])
    out: dict[str, Any]
    if sum(counts) == 0:
        out = {"p_value": None, "chi2": None, "mismatch": False, "error": "no units enrolled yet"}
    elif design.get("analysis", {}).get("sequential"):
        out = {"chi2": None, **sequential_srm_test(counts, weights).as_dict()}
    else:
        out = {"method": "chi-square", **srm_test(counts, weights).as_dict()}
    out.update(counts=counts, weights=weights, unit="distinct enrolled units")
    if design.get("segments"):
        out["note"] = "segments change the weights per request: this checks the default weights"
    return out


def _sample_size(
    metric: str, mde: float, summaries: dict[str, dict[str, Any]], control: str, ana: dict[str, Any]
) -> dict[str, Any]:
    """Units per arm to detect `mde` at the experiment's alpha and power (fixed horizon)."""
    alpha, power = float(ana.get("alpha", 0.05)), float(ana.get("power", 0.8))
    base = summaries.get(control)
    out: dict[str, Any] = {"metric": metric, "mde": mde, "n_per_arm": None, "still_needed": None}
    try:
        if base is None or base["mean"] is None:
            raise ValueError("no feedback for this metric in the control yet")
        proportion = base["kind"] == "proportion"
        n = per_arm_needed(proportion, base["mean"], base["variance"], mde, alpha, power, "units")
    except ValueError as exc:
        out["error"] = str(exc)
        return out
    return with_still_needed(out, n, summaries)


def unit_results(
    design: dict[str, Any], units: ExperimentUnits, binary: dict[str, bool] | None = None
) -> dict[str, Any]:
    """Results of one experiment over units. `design`: the sidecar's (or
    `outcomes.experiment_designs`') entry; `units`: `AnalysisEngine.query` with the pairs of
    `ratio_pairs(design, ...)`; `binary`: `AnalysisEngine.binary_metrics`, for the default kinds."""
    name, control = design["name"], design["control"]
    variants = list(design["variants"])
    analysis: dict[str, Any] = dict(design.get("analysis") or {})
    alpha, power = float(analysis.get("alpha", 0.05)), float(analysis.get("power", 0.8))
    plan = metric_plan(analysis, sorted(units.values), binary or {})
    summaries: dict[str, dict[str, dict[str, Any]]] = {}
    comparisons: list[dict[str, Any]] = []
    for metric, (method, denominator) in plan.items():
        per_variant = units.metrics.get((metric, denominator))
        if per_variant is None:
            comparisons.append(
                {
                    "metric": metric,
                    "test": method,
                    "method": method,
                    "p_value": None,
                    "error": f"{denominator!r} has no values yet for this metric's units",
                }
            )
            continue
        stats = {v: per_variant.get(v, UnitStats()) for v in variants}
        counted = units.values.get(metric, {})
        summaries[metric] = {
            v: {"kind": method, **_arm_summary(method, stats[v], counted.get(v, 0))}
            for v in variants
        }
        for variant in variants:
            if variant != control:
                found = _compare(method, stats[control], stats[variant], analysis)
                comparisons.append(
                    {"metric": metric, "variant": variant, "control": control, **found}
                )
    tested = [c for c in comparisons if c.get("p_value") is not None]
    for comparison, adjusted in zip(tested, holm([c["p_value"] for c in tested]), strict=True):
        comparison["p_value_holm"] = float(adjusted)
        comparison["significant"] = bool(adjusted < alpha)
    counts = [units.exposures[v].count if v in units.exposures else 0 for v in variants]
    per_arm = []
    for variant, weight, n in zip(variants, design["weights"], counts, strict=True):
        exposed = units.exposures.get(variant, UnitStats())
        per_arm.append(
            {
                "name": variant,
                "weight": weight,
                "n": n,
                "units": n,
                "exposures": round(exposed.sum_x),
                "switched": units.switched.get(variant, 0),
                "errors": 0,
                "error_rate": None,
                "latency_s": None,
                "metrics": {m: summaries[m][variant] for m in summaries},
            }
        )
    mde = analysis.get("mde") or {}
    return {
        "experiment": name,
        "control": control,
        "alpha": alpha,
        "power": power,
        "unit_of_analysis": "unit",
        "sequential": bool(analysis.get("sequential", False)),
        "variants": per_arm,
        "metrics": {
            m: {
                "binary": plan[m][0] == "proportion",
                "method": plan[m][0],
                "denominator": plan[m][1],
            }
            for m in plan
        },
        "comparisons": comparisons,
        "multiple_testing": {"method": "holm", "tests": len(tested)},
        "srm": _srm(design, counts),
        "excluded": {m: {"units": u, "values": n} for m, (u, n) in sorted(units.excluded.items())},
        "ambiguous": dict(sorted(units.ambiguous.items())),
        "sample_size": [
            _sample_size(m, float(mde[m]), summaries.get(m, {}), control, analysis)
            for m in sorted(mde)
        ],
    }


def ratio_pairs(design: dict[str, Any]) -> list[tuple[str, str]]:
    """The (metric, other metric) pairs the engine must group for this design: ratio
    denominators and CUPED covariates that are metrics."""
    declared: dict[str, dict[str, Any]] = (design.get("analysis") or {}).get("metrics") or {}
    pairs = []
    for metric, spec in sorted(declared.items()):
        other = spec.get("covariate") or spec.get("denominator")
        if other and other != "exposures":
            pairs.append((metric, other))
    return pairs
