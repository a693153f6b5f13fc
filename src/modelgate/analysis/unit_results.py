"""An experiment's results over units (issue 13): the design (variants, control, weights,
analysis settings) and the engine's per-variant `UnitStats` become the results JSON: per
metric and arm against the control, the per-unit test of the metric's kind (mean,
proportion, ratio, CUPED) with absolute and relative lifts, Holm over the metrics, SRM over
distinct enrolled units, the sample size in units. The shape follows modelgate.analysis.results (the
per-event results of the live snapshot) wherever the concepts match, so the text table and
the HTML report read both; `unit_of_analysis` tells them apart.

Why units: the gateway randomizes units, and the requests and outcomes of one unit are
correlated; counting them as independent samples understates every variance.
"""

from __future__ import annotations

from typing import Any

from modelgate.analysis.engine import ExperimentUnits
from modelgate.analysis.results import per_arm_needed, with_still_needed
from modelgate.analysis.system import GUARDRAIL_QUANTILES, SystemUnits
from modelgate.stats import (
    DEFAULT_TUNING,
    EffectResult,
    QuantileEstimate,
    UnitStats,
    cuped_test,
    holm,
    quantile_difference,
    ratio_estimate,
    sequential_srm_test,
    srm_test,
    unit_mean_test,
    unit_proportion_test,
    unit_ratio_test,
)

__all__ = ["QUANTILES", "guardrails", "metric_plan", "ratio_pairs", "unit_results"]

QUANTILES = GUARDRAIL_QUANTILES  # the latency quantiles every result shows, per arm

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
                estimate, of_estimate = ratio_estimate(stats)
                variance = of_estimate * n if n > 1 else None
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


def _test(run: Any, analysis: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """One guardrail test, or why it could not run (too few units or requests)."""
    try:
        found: EffectResult = run(
            *args,
            alpha=float(analysis.get("alpha", 0.05)),
            sequential=bool(analysis.get("sequential", False)),
            tuning=float(analysis.get("sequential_tuning", DEFAULT_TUNING)),
            **kwargs,
        )
    except ValueError as exc:
        return {"error": str(exc), "p_value": None}
    return found.as_dict()


def guardrails(
    system: SystemUnits, variants: list[str], control: str, analysis: dict[str, Any]
) -> dict[str, Any]:
    """The gateway's own metrics per arm from the exposure records, and each arm against the
    control: error rate and mean latency as ratios over units (delta method), the latency
    quantiles with the clustered interval of Deng, Knoblich & Lu (2018). Tested each at the
    experiment's alpha, outside the Holm family of the feedback metrics: they guard the
    release, they are not its goal."""
    arms: dict[str, dict[str, Any]] = {}
    # Per variant and quantile: the clustered estimate, or why the arm is too small for one;
    # each arm's is taken once, for its row and for its comparisons.
    estimates: dict[tuple[str, float], QuantileEstimate | str] = {}
    for variant in variants:
        errors = system.errors.get(variant, UnitStats())
        latency = system.latency.get(variant, UnitStats())
        per_request = system.quantiles.get(variant)
        out: dict[str, Any] = {
            "units": errors.count,
            "requests": round(errors.sum_y),
            "errors": round(errors.sum_x),
            "error_rate": errors.mean_x / errors.mean_y if errors.mean_y else None,
            "latency_ms": {"mean": latency.mean_x / latency.mean_y if latency.mean_y else None},
        }
        for q in QUANTILES:
            key = f"p{q * 100:g}"
            if per_request is None:
                estimates[variant, q] = "no measured request"
                out["latency_ms"][key] = None
                continue
            estimate = per_request.at(q)
            if isinstance(estimate, str):
                estimates[variant, q] = estimate
                out["latency_ms"][key] = per_request.sample.get(q)
                continue
            estimates[variant, q] = estimate
            out["latency_ms"][key] = estimate.estimate
            out["latency_ms"][f"{key}_se"] = estimate.variance**0.5
        arms[variant] = out
    comparisons: list[dict[str, Any]] = []
    base_e, base_l = system.errors.get(control), system.latency.get(control)
    for variant in variants:
        if variant == control or base_e is None or base_l is None:
            continue
        head = {"variant": variant, "control": control}
        arm_e, arm_l = system.errors.get(variant, UnitStats()), system.latency.get(variant)
        comparisons.append(
            {
                "metric": "error_rate",
                **head,
                **_test(unit_ratio_test, analysis, base_e, arm_e, events=True),
            }
        )
        comparisons.append(
            {
                "metric": "latency_ms",
                **head,
                **_test(unit_ratio_test, analysis, base_l, arm_l or UnitStats()),
            }
        )
        for q in QUANTILES:
            ea, eb = estimates[control, q], estimates[variant, q]
            tested = (
                _test(quantile_difference, analysis, ea, eb)
                if isinstance(ea, QuantileEstimate) and isinstance(eb, QuantileEstimate)
                else {"error": ea if isinstance(ea, str) else eb, "p_value": None}
            )
            comparisons.append({"metric": f"latency_p{q * 100:g}_ms", **head, **tested})
    return {
        "variants": arms,
        "comparisons": comparisons,
        "note": "from the exposure records: each answer's status and latency (exact to 1 us); "
        "an error is a 5xx or no answer; each test at the experiment's alpha, outside Holm",
    }


def unit_results(
    design: dict[str, Any],
    units: ExperimentUnits,
    binary: dict[str, bool] | None = None,
    system: SystemUnits | None = None,
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
    guard = guardrails(system, variants, control, analysis) if system is not None else None
    per_arm = []
    for variant, weight, n in zip(variants, design["weights"], counts, strict=True):
        exposed = units.exposures.get(variant, UnitStats())
        arm = guard["variants"][variant] if guard is not None else None
        per_arm.append(
            {
                "name": variant,
                "weight": weight,
                "n": n,
                "units": n,
                "exposures": round(exposed.sum_x),
                "switched": units.switched.get(variant, 0),
                "errors": arm["errors"] if arm else 0,
                "error_rate": arm["error_rate"] if arm else None,
                "latency_s": _seconds(arm["latency_ms"]) if arm and arm["requests"] else None,
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
        "guardrails": guard,
        "srm": _srm(design, counts),
        "excluded": {m: {"units": u, "values": n} for m, (u, n) in sorted(units.excluded.items())},
        "ambiguous": dict(sorted(units.ambiguous.items())),
        "sample_size": [
            _sample_size(m, float(mde[m]), summaries.get(m, {}), control, analysis)
            for m in sorted(mde)
        ],
    }


def _seconds(latency_ms: dict[str, Any]) -> dict[str, Any]:
    """The arm's latency as the per-event results show it (seconds, p50 and p99 at least)."""
    return {k: v / 1000.0 for k, v in latency_ms.items() if v is not None and not k.endswith("_se")}


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
