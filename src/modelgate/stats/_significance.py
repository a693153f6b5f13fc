"""Two-sample tests of an A/B metric (Welch, proportions, Mann-Whitney), SRM, p-value adjustment.

Package-private: import from `modelgate.stats`. Arm a is the baseline, b the candidate: b - a.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import stats as sps  # type: ignore[import-untyped]

from ._common import (
    FloatArray,
    Result,
    at_least,
    count,
    counts_and_weights,
    probability,
    real,
    vector,
)

MannWhitneyAlternative = Literal["two-sided", "less", "greater"]
_MW_ALTERNATIVES = ("two-sided", "less", "greater")


@dataclass(frozen=True)
class WelchResult(Result):
    """Welch's two-sample t-test of mean_b - mean_a, with absolute and relative CIs.

    `ci_*` is the two-sided 1 - alpha interval of `diff` from the t distribution with the
    Welch-Satterthwaite `df`; `rel_*` is diff / mean_a with a delta-method interval that uses
    the normal quantile (NaN when mean_a == 0). With both variances 0, `df` is NaN (0/0) and
    the difference is known exactly: p = 1 when it is 0, else p = 0 and t = +-inf.
    """

    diff: float
    ci_low: float
    ci_high: float
    t: float
    df: float
    p_value: float
    rel_diff: float
    rel_ci_low: float
    rel_ci_high: float
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    alpha: float


@dataclass(frozen=True)
class ProportionResult(Result):
    """Two-proportion z-test of p_b - p_a: pooled SE for `z`/`p_value`, unpooled for the CIs."""

    diff: float
    ci_low: float
    ci_high: float
    z: float
    p_value: float
    rel_diff: float
    rel_ci_low: float
    rel_ci_high: float
    n_a: int
    n_b: int
    p_a: float
    p_b: float
    alpha: float


@dataclass(frozen=True)
class MannWhitneyResult(Result):
    """Mann-Whitney U test of b against a; `statistic` is U of sample b.

    `cles` is the common-language effect size U_b / (n_a * n_b) = P(B > A) + P(B = A) / 2
    (McGraw & Wong 1992): 0.5 means no shift, above 0.5 means b tends to be larger.
    """

    statistic: float
    p_value: float
    cles: float
    n_a: int
    n_b: int
    alternative: str


@dataclass(frozen=True)
class SRMResult(Result):
    """Sample-ratio-mismatch check: chi-square goodness of fit of counts to the weights."""

    chi2: float
    df: int
    p_value: float
    expected: tuple[float, ...]
    mismatch: bool
    threshold: float


def _relative(
    diff: float, mean_a: float, mean_b: float, var_mean_a: float, var_mean_b: float, alpha: float
) -> tuple[float, float, float]:
    """diff / mean_a and its 1 - alpha CI by the delta method, with the normal quantile.

    Var(mean_b / mean_a) ~= var_b / (n_b mean_a^2) + mean_b^2 var_a / (n_a mean_a^4)
    (Deng, Knoblich & Lu 2018, "Applying the Delta Method in Metric Analytics"; Kohavi et al.,
    "Trustworthy Online Controlled Experiments", ch. 18), written here as
    (Var(mean_b) + ratio^2 Var(mean_a)) / mean_a^2 so that mean_a^4 cannot overflow.
    The ratio has no t distribution to borrow a df from, hence the normal quantile.
    """
    if mean_a == 0.0:
        return math.nan, math.nan, math.nan
    rel = diff / mean_a
    if math.isinf(rel):  # mean_a so near 0 that the ratio overflows: no bound to give
        return rel, -math.inf, math.inf
    sd_a = math.sqrt(var_mean_a)
    spread = math.hypot(math.sqrt(var_mean_b), mean_b / mean_a * sd_a if sd_a else 0.0)
    half = float(sps.norm.isf(alpha / 2)) * spread / abs(mean_a)
    return rel, rel - half, rel + half


def welch_test(
    n_a: int,
    mean_a: float,
    var_a: float,
    n_b: int,
    mean_b: float,
    var_b: float,
    alpha: float = 0.05,
) -> WelchResult:
    """Welch's unequal-variance t-test of mean_b - mean_a from summary statistics.

    The variances are sample variances (divisor n - 1), as `SummaryStats.variance` gives.
    df = (s_a + s_b)^2 / (s_a^2 / (n_a - 1) + s_b^2 / (n_b - 1)) with s = var / n (Welch 1947,
    Satterthwaite 1946), computed from the shares s / (s_a + s_b) so tiny variances do not
    underflow to 0/0. Matches R's `t.test(b, a)` and scipy's `ttest_ind(b, a, equal_var=False)`.
    Each arm needs n >= 2 (a sample variance needs two observations): fewer is a ValueError,
    not a NaN that would compare as "not significant".
    """
    na, nb = count("n_a", n_a, low=2), count("n_b", n_b, low=2)
    ma, mb = real("mean_a", mean_a), real("mean_b", mean_b)
    va, vb = at_least("var_a", var_a, 0.0), at_least("var_b", var_b, 0.0)
    level = probability("alpha", alpha)
    diff = mb - ma
    sa, sb = va / na, vb / nb
    se = math.sqrt(sa + sb)
    if se > 0.0:
        wa, wb = sa / (sa + sb), sb / (sa + sb)
        df = 1.0 / (wa * wa / (na - 1) + wb * wb / (nb - 1))
        t = diff / se
        p = min(1.0, 2.0 * float(sps.t.sf(abs(t), df)))
        half = float(sps.t.isf(level / 2, df)) * se
    else:
        df = math.nan
        t = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
        p = 1.0 if diff == 0.0 else 0.0
        half = 0.0
    rel, rel_low, rel_high = _relative(diff, ma, mb, sa, sb, level)
    return WelchResult(
        diff=diff,
        ci_low=diff - half,
        ci_high=diff + half,
        t=t,
        df=df,
        p_value=p,
        rel_diff=rel,
        rel_ci_low=rel_low,
        rel_ci_high=rel_high,
        n_a=na,
        n_b=nb,
        mean_a=ma,
        mean_b=mb,
        alpha=level,
    )


def wilson_interval(
    successes: float, n: float, z: float = 1.959963984540054
) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default, `z` for another level);
    (nan, nan) when n is 0. Kept in [0, 1], where the plain normal interval is not."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion_test(
    x_a: int, n_a: int, x_b: int, n_b: int, alpha: float = 0.05
) -> ProportionResult:
    """Two-proportion z-test of x_b/n_b - x_a/n_a (successes x out of n trials per arm).

    z uses the pooled SE sqrt(p(1 - p)(1/n_a + 1/n_b)), p = (x_a + x_b)/(n_a + n_b): under
    H0 both arms share one rate. Its two-sided p-value equals R's `prop.test(correct = FALSE)`
    (chi-square = z^2). The CI of the difference uses the unpooled (Wald) SE
    sqrt(p_a(1 - p_a)/n_a + p_b(1 - p_b)/n_b), since there H0 is not assumed; the relative
    CI is the delta method with Bernoulli variances. When both arms are all 0 or all 1 the
    rates are equal and known: z = 0, p = 1.
    """
    na, nb = count("n_a", n_a, low=1), count("n_b", n_b, low=1)
    xa, xb = count("x_a", x_a), count("x_b", x_b)
    if xa > na:
        raise ValueError(f"x_a must be <= n_a, got x_a={xa} and n_a={na}")
    if xb > nb:
        raise ValueError(f"x_b must be <= n_b, got x_b={xb} and n_b={nb}")
    level = probability("alpha", alpha)
    pa, pb = xa / na, xb / nb
    diff = pb - pa
    pooled = (xa + xb) / (na + nb)
    se0 = math.sqrt(pooled * (1.0 - pooled) * (1.0 / na + 1.0 / nb))
    if se0 > 0.0:
        z = diff / se0
        p = min(1.0, 2.0 * float(sps.norm.sf(abs(z))))
    else:
        z, p = 0.0, 1.0
    va, vb = pa * (1.0 - pa) / na, pb * (1.0 - pb) / nb
    half = float(sps.norm.isf(level / 2)) * math.sqrt(va + vb)
    rel, rel_low, rel_high = _relative(diff, pa, pb, va, vb, level)
    return ProportionResult(
        diff=diff,
        ci_low=diff - half,
        ci_high=diff + half,
        z=z,
        p_value=p,
        rel_diff=rel,
        rel_ci_low=rel_low,
        rel_ci_high=rel_high,
        n_a=na,
        n_b=nb,
        p_a=pa,
        p_b=pb,
        alpha=level,
    )


def mann_whitney(
    sample_a: npt.ArrayLike,
    sample_b: npt.ArrayLike,
    alternative: MannWhitneyAlternative = "two-sided",
) -> MannWhitneyResult:
    """Mann-Whitney U test that b is shifted from a, for skewed metrics such as latency.

    This is `scipy.stats.mannwhitneyu(sample_b, sample_a, alternative=...)` (its defaults:
    continuity correction, exact p-value for small samples without ties): b comes first so
    that "greater" means b tends to be larger, as diff = b - a everywhere in this module.
    The effect size is the common-language one (see `MannWhitneyResult`), chosen over the
    Hodges-Lehmann shift because it comes from U at no cost, where Hodges-Lehmann needs all
    n_a * n_b pairwise differences.
    """
    a = vector("sample_a", sample_a, min_size=1)
    b = vector("sample_b", sample_b, min_size=1)
    if alternative not in _MW_ALTERNATIVES:
        raise ValueError(f"alternative must be one of {_MW_ALTERNATIVES}, got {alternative!r}")
    res = sps.mannwhitneyu(b, a, alternative=alternative)
    u = float(res.statistic)
    return MannWhitneyResult(
        statistic=u,
        p_value=float(res.pvalue),
        cles=u / (a.size * b.size),
        n_a=int(a.size),
        n_b=int(b.size),
        alternative=alternative,
    )


def srm_test(counts: npt.ArrayLike, weights: npt.ArrayLike, threshold: float = 0.001) -> SRMResult:
    """Sample-ratio mismatch: are the units per variant what the configured weights promise?

    Pearson's chi-square goodness of fit against total * weight / sum(weights), df = variants
    - 1; equals `scipy.stats.chisquare(counts, expected)`. An SRM means the assignment or the
    logging is broken and the experiment's results are not to be trusted (Kohavi et al., ch. 21);
    the low default threshold (p < 0.001) keeps false alarms rare over many daily checks.
    A variant with weight 0 is left out of the test (its expected count is 0), unless it
    received units: then chi2 = inf and p = 0. No units at all is no evidence: p = 1.
    """
    observed, w = counts_and_weights(counts, weights)
    level = probability("threshold", threshold)
    total = float(observed.sum())
    expected = total * (w / w.sum())
    live = w > 0.0
    df = int(live.sum()) - 1
    if (observed[~live] > 0.0).any():
        chi2, p = math.inf, 0.0
    elif total == 0.0 or df == 0:
        chi2, p = 0.0, 1.0
    else:
        o, e = observed[live], expected[live]
        chi2 = float(((o - e) ** 2 / e).sum())
        p = float(sps.chi2.sf(chi2, df))
    return SRMResult(
        chi2=chi2,
        df=df,
        p_value=p,
        expected=tuple(float(e) for e in expected),
        mismatch=p < level,
        threshold=level,
    )


def _p_values(p_values: npt.ArrayLike) -> FloatArray:
    p = vector("p_values", p_values)
    if ((p < 0.0) | (p > 1.0)).any():
        raise ValueError(f"p_values must be in [0, 1], got {p.tolist()}")
    return p


def holm(p_values: npt.ArrayLike) -> FloatArray:
    """Holm's step-down adjusted p-values (family-wise error rate), as R's `p.adjust("holm")`.

    R: o <- order(p); pmin(1, cummax((n + 1 - i) * p[o]))[order(o)]. Uniformly more powerful
    than Bonferroni, valid under any dependence (Holm 1979). NaN is refused, not dropped.
    """
    p = _p_values(p_values)
    n = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((n - np.arange(n)) * p[order]))
    out = np.empty(n)
    out[order] = adjusted
    return out


def benjamini_hochberg(p_values: npt.ArrayLike) -> FloatArray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), as R's `p.adjust("BH")`.

    R: o <- order(p, decreasing = TRUE); pmin(1, cummin(n / i * p[o]))[order(o)], i = n..1.
    Controls the FDR for independent or positively dependent tests (Benjamini & Hochberg
    1995): for many metrics of one experiment, where Holm would be too strict.
    """
    p = _p_values(p_values)
    n = p.size
    order = np.argsort(-p, kind="stable")
    rank = np.arange(n, 0, -1)
    adjusted = np.minimum(1.0, np.minimum.accumulate((n / rank) * p[order]))
    out = np.empty(n)
    out[order] = adjusted
    return out
