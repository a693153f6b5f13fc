"""A canary's checks as tests over units with always-valid intervals (issue 13).

Every check is a one-sided test at a stated level, read at every look: the intervals are
asymptotic confidence sequences (`modelgate.stats`, `sequential=True`) over the evidence
since the canary began, so looking every few seconds for an hour costs no more false
rollbacks than looking once. The canary's `alpha` is its whole false-rollback rate: it is
split evenly over the checks (Bonferroni), and each check fails only when its interval lies
wholly beyond the limit (a two-sided 1 - 2a sequence is a one-sided 1 - a bound).

- error rate: errors over measured requests, a ratio over units (delta method);
- latency p50/p90/p99: the quantiles' difference with the clustered variance of Deng,
  Knoblich & Lu (2018), so a slow user's many requests count as one correlated sample;
- feedback: the metric's values over their count, a ratio over units; non-inferiority.
The sample-ratio guard counts the distinct units of the step with Lindon & Malek's sequential
test: heavy users, who send many requests, cannot trip it.
"""

from __future__ import annotations

import math
from typing import Any

from modelgate.config import CanaryCheck, CanarySpec
from modelgate.release.judge import (
    CheckResult,
    ExperimentView,
    Outcome,
    against,
    checks_of,
    worst,
)
from modelgate.release.records import Evidence
from modelgate.stats import (
    EffectResult,
    UnitStats,
    cs_halfwidth,
    quantile_difference,
    ratio_estimate,
    sequential_srm_test,
    unit_ratio_test,
)

__all__ = [
    "SRM_CONCENTRATION",
    "feedback_metrics",
    "latency_quantiles",
    "judge_evidence",
    "unit_srm_guard",
]

# The sequential SRM test's prior concentration: a step sees hundreds to thousands of units,
# and at 1000 a 70/30 split against 80/20 alarms (p < 1e-6) within 1000 units, where the
# experiment's 10000 (tuned for 52/48 over a million) would still be at p = 0.06.
SRM_CONCENTRATION = 1000.0


def feedback_metrics(spec: CanarySpec) -> list[str]:
    """The feedback metrics the checks read (the records' other metrics are not loaded)."""
    return [c.metric for c in checks_of(spec) if c.metric != "error_rate" and not c.is_system]


def latency_quantiles(spec: CanarySpec) -> list[float]:
    """The latency quantiles the checks judge (each arm's are estimated as it is read)."""
    return sorted({q for c in checks_of(spec) if (q := c.latency_quantile) is not None})


def unit_srm_guard(
    view: ExperimentView, spec: CanarySpec, evidence: Evidence, previous_p: float
) -> dict[str, Any] | None:
    """Sequential sample-ratio check of the step's distinct enrolled units per variant
    against the weights in force; `previous_p` carries the running minimum within the step.
    Segments assign by their own weights: no expectation to test, so None."""
    if view.segments:
        return None
    counts = [evidence.system.step_units.get(v, 0) for v in view.variants]
    weights = [view.weights[v] for v in view.variants]
    if sum(counts) == 0 or sum(weights) <= 0:
        return None
    result = sequential_srm_test(
        counts,
        weights,
        threshold=spec.srm_threshold,
        concentration=SRM_CONCENTRATION,
        previous_p_value=previous_p,
    )
    return {
        "unit": "units",
        "method": result.method,
        "counts": dict(zip(view.variants, counts, strict=True)),
        "expected": dict(zip(view.variants, (round(e, 1) for e in result.expected), strict=True)),
        "p_value": result.p_value,
        "threshold": result.threshold,
        "mismatch": result.mismatch,
    }


def judge_evidence(spec: CanarySpec, evidence: Evidence) -> list[CheckResult]:
    """Each check's verdict on the evidence since the canary began."""
    checks = checks_of(spec)
    level = 2.0 * spec.alpha / len(checks)  # two-sided level of each one-sided test
    results = []
    for check in checks:
        if check.metric == "error_rate":
            a, b = (
                evidence.system.errors.get(v, UnitStats()) for v in (spec.baseline, spec.candidate)
            )
            results.append(_ratio_check(check, a, b, spec, level, "rate"))
        elif check.is_system:
            results.append(_quantile_check(check, evidence, spec, level))
        else:
            arms = evidence.feedback.get(check.metric, {})
            a, b = (arms.get(v, UnitStats()) for v in (spec.baseline, spec.candidate))
            results.append(_feedback_check(check, a, b, spec, level))
    return results


def _numbers(test: EffectResult, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "test": test.method,
        "interval": test.interval,
        "diff": _round(test.diff),
        "ci": [_round(test.ci_low), _round(test.ci_high)],
        "rel_ci": [_round(test.rel_ci_low), _round(test.rel_ci_high)],
        "p_value": test.p_value,
        "level": round(test.alpha / 2.0, 6),
        "units": [test.n_a, test.n_b],
        **extra,
    }


def _round(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def _wait(check: CanaryCheck, why: str, a: float = math.nan, b: float = math.nan) -> CheckResult:
    return CheckResult(check.metric, "wait", a, b, why)


def _enough(a: UnitStats, b: UnitStats) -> str | None:
    if a.count < 2 or b.count < 2 or a.sum_y <= 0 or b.sum_y <= 0:
        return f"{a.count} and {b.count} units measured; 2 per arm needed"
    return None


def _verdicts(
    check: CanaryCheck,
    test: EffectResult,
    candidate_high: float,
    candidate_low: float,
    scale: float = 1.0,
    unit: str = "",
) -> tuple[Outcome, str]:
    """The limits of one check against the intervals of the difference (`ci`), the relative
    difference (`rel_ci`) and the candidate's own value: all within passes, any wholly
    beyond fails, else wait."""
    verdicts: list[tuple[str, Outcome]] = []
    if check.max_increase is not None:
        limit = check.max_increase
        outcome = against(test.ci_low * scale, test.ci_high * scale, limit)
        verdicts.append((f"increase <= {limit:g}{unit}", outcome))
    if check.max_ratio is not None:
        limit = check.max_ratio - 1.0
        if math.isfinite(test.rel_ci_low) and math.isfinite(test.rel_ci_high):
            outcome = against(test.rel_ci_low, test.rel_ci_high, limit)
        else:  # a baseline of 0: any candidate above 0 is an infinite ratio
            outcome = against(test.ci_low, test.ci_high, 0.0)
        verdicts.append((f"ratio <= {check.max_ratio:g}", outcome))
    if check.max_value is not None:
        outcome = against(candidate_low * scale, candidate_high * scale, check.max_value)
        verdicts.append((f"value <= {check.max_value:g}{unit}", outcome))
    return worst([v for _, v in verdicts]), ", ".join(f"{what}: {v}" for what, v in verdicts)


def _ratio_check(
    check: CanaryCheck, a: UnitStats, b: UnitStats, spec: CanarySpec, level: float, what: str
) -> CheckResult:
    short = _enough(a, b)
    if short is not None:
        return _wait(check, short)
    test = unit_ratio_test(a, b, level, sequential=True, tuning=spec.sequential_tuning, events=True)
    half = _one_arm_halfwidth(b, level, spec.sequential_tuning)
    outcome, detail = _verdicts(
        check, test, test.estimate_b + half, test.estimate_b - half, unit=""
    )
    return CheckResult(
        check.metric,
        outcome,
        test.estimate_a,
        test.estimate_b,
        f"{what} over units, confidence sequence: {detail}",
        _numbers(test, {"requests": [round(a.sum_y), round(b.sum_y)]}),
    )


def _one_arm_halfwidth(s: UnitStats, level: float, tuning: float) -> float:
    """Half-width of the candidate's own rate's confidence sequence."""
    _, variance = ratio_estimate(s, "candidate", events=True)
    return cs_halfwidth(math.sqrt(variance), s.count, level, tuning) if variance > 0.0 else 0.0


def _quantile_check(
    check: CanaryCheck, evidence: Evidence, spec: CanarySpec, level: float
) -> CheckResult:
    q = check.latency_quantile
    base = evidence.system.quantiles.get(spec.baseline)
    cand = evidence.system.quantiles.get(spec.candidate)
    if q is None or base is None or cand is None or not base.requests or not cand.requests:
        return _wait(check, "no latency measured yet")
    baseline, own = base.at(q), cand.at(q)
    if isinstance(baseline, str) or isinstance(own, str):  # too few requests or units
        return _wait(check, baseline if isinstance(baseline, str) else str(own))
    test = quantile_difference(baseline, own, level, sequential=True, tuning=spec.sequential_tuning)
    half = cs_halfwidth(math.sqrt(own.variance), own.units, level, spec.sequential_tuning)
    outcome, detail = _verdicts(check, test, own.estimate + half, own.estimate - half, unit=" ms")
    return CheckResult(
        check.metric,
        outcome,
        test.estimate_a,
        test.estimate_b,
        f"p{q * 100:g} over units (clustered), confidence sequence: {detail}",
        _numbers(test, {"requests": [base.requests, cand.requests]}),
    )


def _feedback_check(
    check: CanaryCheck, a: UnitStats, b: UnitStats, spec: CanarySpec, level: float
) -> CheckResult:
    if a.count < max(spec.min_samples, 2) or b.count < max(spec.min_samples, 2):
        need = max(spec.min_samples, 2)
        return _wait(check, f"{a.count} and {b.count} units with values; {need} per arm needed")
    test = unit_ratio_test(a, b, level, sequential=True, tuning=spec.sequential_tuning)
    margin = check.margin or 0.0
    # "Worse" is the baseline minus the candidate when higher is better, else the reverse.
    low, high = test.ci_low, test.ci_high
    worse = (-high, -low) if check.higher_is_better else (low, high)
    outcome = against(worse[0], worse[1], margin)
    direction = "higher" if check.higher_is_better else "lower"
    return CheckResult(
        check.metric,
        outcome,
        test.estimate_a,
        test.estimate_b,
        f"non-inferiority over units ({direction} is better, margin {margin:g}), "
        f"confidence sequence: {outcome}",
        _numbers(test, {"margin": margin, "values": [round(a.sum_y), round(b.sum_y)]}),
    )
