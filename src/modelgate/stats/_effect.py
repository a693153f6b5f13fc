"""Tests over units: mean, proportion, ratio and CUPED, with absolute and relative lifts.

Package-private: import from `modelgate.stats`. Each arm is a `UnitStats` over units (the unit
of randomization), never over requests: requests of one unit are correlated, and treating
them as independent understates the variance (Deng, Lu & Litz 2017; Kohavi et al. ch. 22).
The relative lift and its interval follow gbstats' frequentist engine (GrowthBook), so the
numbers line up with GrowthBook's on the same sums: delta-method variance, t quantile at the
Welch degrees of freedom; with `sequential=True` the intervals are asymptotic confidence
sequences instead, valid at every look.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats as sps  # type: ignore[import-untyped]

from ._common import Result, positive, probability
from ._sequential import DEFAULT_TUNING, cs_halfwidth, cs_p_value
from ._units import UnitStats


@dataclass(frozen=True)
class EffectResult(Result):
    """b - a and (b - a) / |a| for one metric, with intervals and p-values, saying how.

    `method` is the estimator ("mean", "proportion", "ratio", "cuped", "quantile");
    `interval` is "t" (fixed horizon: read once, at the planned sample size) or
    "confidence-sequence" (always valid: read as often as you like). `estimate_*` are the
    arms' means, rates, ratios, CUPED-adjusted means or quantiles; `se` and `rel_se` the
    standard errors; `df` the Welch-Satterthwaite degrees of freedom. `theta` and
    `variance_reduction` (1 - adjusted / unadjusted variance of the difference) are CUPED's,
    NaN otherwise. Relative fields are NaN when the baseline is 0.
    """

    method: str
    interval: str
    estimate_a: float
    estimate_b: float
    n_a: int
    n_b: int
    diff: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    rel_diff: float
    rel_se: float
    rel_ci_low: float
    rel_ci_high: float
    rel_p_value: float
    df: float
    alpha: float
    tuning: float = math.nan
    theta: float = math.nan
    variance_reduction: float = math.nan


def _interval(
    estimate: float, se: float, df: float, n: int, alpha: float, tuning: float | None
) -> tuple[float, float, float]:
    """(low, high, p) for H0: 0, by t at `df` or, with a tuning, by the confidence sequence."""
    if se == 0.0:
        return estimate, estimate, 1.0 if estimate == 0.0 else 0.0
    if tuning is not None:
        half = cs_halfwidth(se, n, alpha, tuning)
        return estimate - half, estimate + half, cs_p_value(estimate, se, n, alpha, tuning)
    half = float(sps.t.isf(alpha / 2, df)) * se
    p = min(1.0, 2.0 * float(sps.t.sf(abs(estimate) / se, df)))
    return estimate - half, estimate + half, p


def effect(
    method: str,
    estimate_a: float,
    estimate_b: float,
    var_a: float,
    var_b: float,
    n_a: int,
    n_b: int,
    alpha: float,
    tuning: float | None,
    *,
    baseline: float | None = None,
    baseline_b: float | None = None,
    rel_var: float | None = None,
    theta: float = math.nan,
    variance_reduction: float = math.nan,
) -> EffectResult:
    """The result for estimates with sampling variances `var_a`, `var_b` (of the estimates,
    not per unit) from n_a, n_b units; `tuning` None means fixed-horizon t intervals.

    Relative lift (b - a) / |baseline| with the delta-method variance
    var_b / baseline^2 + (baseline_b / baseline)^2 var_a / baseline^2 (Deng, Knoblich & Lu
    2018, eq. 3; gbstats `frequentist_variance`); `rel_var` overrides it (CUPED).
    """
    base = estimate_a if baseline is None else baseline
    base_b = estimate_b if baseline_b is None else baseline_b
    diff = estimate_b - estimate_a
    total = var_a + var_b
    if total > 0.0:
        wa, wb = var_a / total, var_b / total
        df = 1.0 / (wa * wa / (n_a - 1) + wb * wb / (n_b - 1))
    else:
        df = math.nan
    n = n_a + n_b
    se = math.sqrt(total)
    low, high, p = _interval(diff, se, df, n, alpha, tuning)
    rel = rel_se = rel_low = rel_high = rel_p = math.nan
    # Products, not `** 2`: float pow raises on overflow where a product gives inf. A baseline
    # whose square underflows to 0 (a tiny mean) has no relative lift worth reporting.
    base_sq = base * base
    if base_sq > 0.0 and math.isfinite(diff / base):
        if rel_var is None:
            ratio = base_b / base
            rel_var = (var_b + ratio * ratio * var_a) / base_sq
        if math.isfinite(rel_var):
            rel = diff / abs(base)
            rel_se = math.sqrt(max(0.0, rel_var))
            rel_low, rel_high, rel_p = _interval(rel, rel_se, df, n, alpha, tuning)
    return EffectResult(
        method=method,
        interval="t" if tuning is None else "confidence-sequence",
        estimate_a=estimate_a,
        estimate_b=estimate_b,
        n_a=n_a,
        n_b=n_b,
        diff=diff,
        se=se,
        ci_low=low,
        ci_high=high,
        p_value=p,
        rel_diff=rel,
        rel_se=rel_se,
        rel_ci_low=rel_low,
        rel_ci_high=rel_high,
        rel_p_value=rel_p,
        df=df,
        alpha=alpha,
        tuning=math.nan if tuning is None else tuning,
        theta=theta,
        variance_reduction=variance_reduction,
    )


def checked(
    a: UnitStats, b: UnitStats, alpha: float, sequential: bool, tuning: float
) -> tuple[float, float | None]:
    """The level and the tuning (None without `sequential`), after checking both arms."""
    for name, arm in (("a", a), ("b", b)):
        if not isinstance(arm, UnitStats):
            raise TypeError(f"{name} must be a UnitStats, got {type(arm).__name__}")
        if arm.count < 2:
            raise ValueError(f"arm {name} needs at least 2 units, got {arm.count}")
    level = probability("alpha", alpha)
    return level, positive("tuning", tuning) if sequential else None


def unit_mean_test(
    a: UnitStats,
    b: UnitStats,
    alpha: float = 0.05,
    *,
    sequential: bool = False,
    tuning: float = DEFAULT_TUNING,
) -> EffectResult:
    """Welch's test of mean_x over units (x = the unit's sum of the metric, e.g. revenue per
    user). The absolute part equals `welch_test` on (count, mean_x, var_x) of each arm."""
    level, tune = checked(a, b, alpha, sequential, tuning)
    return effect(
        "mean",
        a.mean_x,
        b.mean_x,
        a.var_x / a.count,
        b.var_x / b.count,
        a.count,
        b.count,
        level,
        tune,
    )


def unit_proportion_test(
    a: UnitStats,
    b: UnitStats,
    alpha: float = 0.05,
    *,
    sequential: bool = False,
    tuning: float = DEFAULT_TUNING,
) -> EffectResult:
    """The share of units with x != 0 (x = 1 if the unit had any value 1: converted at least
    once), with the Bernoulli variance p (1 - p) as gbstats' ProportionStatistic and the
    t quantile at the Welch df, as its frequentist test does."""
    level, tune = checked(a, b, alpha, sequential, tuning)
    pa, pb = a.nonzero_x / a.count, b.nonzero_x / b.count
    return effect(
        "proportion",
        pa,
        pb,
        pa * (1.0 - pa) / a.count,
        pb * (1.0 - pb) / b.count,
        a.count,
        b.count,
        level,
        tune,
    )


def ratio_estimate(s: UnitStats, name: str = "a", *, events: bool = False) -> tuple[float, float]:
    """sum_x / sum_y of one arm and the variance of that estimate over units by the delta
    method: (var_x - 2 r cov_xy + r^2 var_y) / (n mean_y^2) (Deng, Knoblich & Lu 2018, eq. 4;
    gbstats' RatioStatistic). `events`: x counts 0/1 events among y trials, and the variance
    is at least the binomial one at the smoothed rate (x + 1) / (y + 2) over the trials
    (Laplace's rule): an arm without any event would otherwise have variance 0."""
    if s.mean_y == 0.0:
        raise ValueError(f"arm {name}: the denominator sums to 0 over its units")
    r = s.mean_x / s.mean_y
    v = max(0.0, s.var_x - 2.0 * r * s.cov_xy + r * r * s.var_y) / (s.mean_y * s.mean_y)
    variance = v / s.count
    if events:
        smoothed = (s.sum_x + 1.0) / (s.sum_y + 2.0)
        variance = max(variance, smoothed * (1.0 - smoothed) / s.sum_y)
    return r, variance


def unit_ratio_test(
    a: UnitStats,
    b: UnitStats,
    alpha: float = 0.05,
    *,
    sequential: bool = False,
    tuning: float = DEFAULT_TUNING,
    events: bool = False,
) -> EffectResult:
    """A ratio metric sum(x) / sum(y) across units (clicks per request: x = the unit's
    clicks, y = its requests), its variance by the delta method over units, so that heavy
    units count as the correlated clusters they are.

    `events`: x counts 0/1 events among y trials (errors among requests), with the variance
    floor of `ratio_estimate`: two arms without any event would otherwise give a zero-width
    interval, which would "prove" any limit after a handful of requests."""
    level, tune = checked(a, b, alpha, sequential, tuning)
    ra, va = ratio_estimate(a, "a", events=events)
    rb, vb = ratio_estimate(b, "b", events=events)
    return effect("ratio", ra, rb, va, vb, a.count, b.count, level, tune)


def cuped_test(
    a: UnitStats,
    b: UnitStats,
    alpha: float = 0.05,
    *,
    sequential: bool = False,
    tuning: float = DEFAULT_TUNING,
) -> EffectResult:
    """A mean metric x adjusted by a pre-exposure covariate y per unit (CUPED, Deng, Xu,
    Kohavi & Walker 2013, eq. 4): x - theta (y - mean y), theta = cov(x, y) / var(y) pooled
    over both arms (as gbstats' RegressionAdjustedStatistic), which keeps the estimate
    unbiased since y is independent of the assignment. The variance of the difference falls
    by about corr(x, y)^2; `variance_reduction` says by how much it did. The relative lift
    is over the unadjusted baseline mean, its variance gbstats' delta method for CUPED."""
    level, tune = checked(a, b, alpha, sequential, tuning)
    joint = a.merge(b)
    theta = joint.c_xy / joint.m2_y if joint.m2_y > 0.0 and joint.m2_x > 0.0 else 0.0

    def adjusted(s: UnitStats) -> tuple[float, float]:
        v = s.var_x + theta * theta * s.var_y - 2.0 * theta * s.cov_xy
        return s.mean_x - theta * s.mean_y, max(0.0, v)

    (ma, va), (mb, vb) = adjusted(a), adjusted(b)
    na, nb = a.count, b.count
    base, base_b = a.mean_x, b.mean_x
    rel_var = None
    if base * base > 0.0:  # as in effect(): a baseline whose square underflows has no lift
        ratio = base_b / base
        v_ctrl = a.var_x * ratio * ratio - 2.0 * theta * a.cov_xy * ratio + theta * theta * a.var_y
        rel_var = (vb / nb + v_ctrl / na) / (base * base)
    plain = a.var_x / na + b.var_x / nb
    reduced = va / na + vb / nb
    return effect(
        "cuped",
        ma,
        mb,
        va / na,
        vb / nb,
        na,
        nb,
        level,
        tune,
        baseline=base,
        baseline_b=base_b,
        rel_var=rel_var,
        theta=theta,
        variance_reduction=1.0 - reduced / plain if plain > 0.0 else 0.0,
    )
