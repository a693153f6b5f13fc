"""modelgate.stats against published R output, scipy, formulas written out here, and properties.

R's figures are the ones its documentation and examples print; scipy is the reference where
both compute the same thing. Arm a is the baseline and b the candidate: differences are b - a.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats as sps  # type: ignore[import-untyped]

import modelgate.stats as ms
from modelgate.stats import (
    SummaryStats,
    benjamini_hochberg,
    holm,
    mann_whitney,
    power,
    proportion_power,
    proportion_sample_size,
    proportion_test,
    sample_size,
    srm_test,
    welch_test,
)

FAST = settings(deadline=None, max_examples=150)
SOLVE = settings(deadline=None, max_examples=60)  # each example runs a root search
SRC = Path(ms.__file__).parent

# R's `sleep` data set: extra hours of sleep under two drugs, 10 patients each.
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def summary(values: list[float] | np.ndarray[Any, Any]) -> tuple[int, float, float]:
    s = SummaryStats.from_samples(values)
    return s.count, s.mean, s.variance


# --- the module's boundary ---


def test_all_names_the_public_api() -> None:
    public = {name for name in vars(ms) if not name.startswith("_")}
    assert set(ms.__all__) == public


def test_stats_imports_nothing_else_of_the_package() -> None:
    paths = sorted(SRC.glob("*.py"))  # SRC: the stats package
    assert len(paths) > 5  # the face and its modules
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                own = node.level == 1 or not module.startswith("modelgate")
                assert own, (path.name, module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("modelgate") for a in node.names), path.name


# --- Welch ---


def test_welch_matches_r_t_test_on_the_sleep_data() -> None:
    # R: t.test(extra ~ group, data = sleep) -> t = -1.8608, df = 17.776, p-value = 0.07939,
    # 95 percent CI -3.3654832 0.2054832, means 0.75 and 2.33 (group 1 - group 2; ours is b - a).
    r = welch_test(*summary(SLEEP_1), *summary(SLEEP_2))
    assert (r.mean_a, r.mean_b) == pytest.approx((0.75, 2.33))
    assert r.diff == pytest.approx(1.58)
    assert r.t == pytest.approx(1.8608, abs=5e-5)
    assert r.df == pytest.approx(17.776, abs=5e-4)
    assert r.p_value == pytest.approx(0.07939, abs=5e-6)
    assert r.ci_low == pytest.approx(-0.2054832, abs=5e-8)
    assert r.ci_high == pytest.approx(3.3654832, abs=5e-8)


@pytest.mark.parametrize("seed", range(8))
def test_welch_matches_scipy_ttest_ind(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(10.0, rng.uniform(0.5, 5.0), size=int(rng.integers(2, 400)))
    b = rng.normal(10.3, rng.uniform(0.5, 5.0), size=int(rng.integers(2, 400)))
    alpha = [0.05, 0.01, 0.1, 0.2][seed % 4]
    ref = sps.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(confidence_level=1 - alpha)  # of mean(a) - mean(b)
    r = welch_test(*summary(a), *summary(b), alpha=alpha)
    assert r.t == pytest.approx(-ref.statistic, rel=1e-9)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert r.df == pytest.approx(ref.df, rel=1e-9)
    assert (r.ci_low, r.ci_high) == pytest.approx((-ci.high, -ci.low), rel=1e-9)


def test_welch_relative_ci_is_the_delta_method() -> None:
    # Deng et al. 2018: Var(mean_b / mean_a)
    #   ~= var_b / (n_b mean_a^2) + mean_b^2 var_a / (n_a mean_a^4)
    r = welch_test(1000, 10.0, 4.0, 800, 10.5, 9.0, alpha=0.1)
    var = 9.0 / (800 * 10.0**2) + 10.5**2 * 4.0 / (1000 * 10.0**4)
    half = 1.6448536269514722 * math.sqrt(var)  # normal quantile, not t
    assert r.rel_diff == pytest.approx(0.05)
    assert (r.rel_ci_low, r.rel_ci_high) == pytest.approx((0.05 - half, 0.05 + half), rel=1e-12)


def test_welch_with_one_constant_arm_has_the_other_arms_df() -> None:
    r = welch_test(5, 1.0, 0.0, 12, 2.0, 3.0)
    assert r.df == pytest.approx(11.0)
    assert r.t == pytest.approx(1.0 / math.sqrt(3.0 / 12))


@pytest.mark.parametrize(
    ("mean_b", "t", "p_value"), [(3.0, 0.0, 1.0), (3.5, math.inf, 0.0), (2.5, -math.inf, 0.0)]
)
def test_welch_with_both_variances_zero_knows_the_difference(
    mean_b: float, t: float, p_value: float
) -> None:
    r = welch_test(10, 3.0, 0.0, 20, mean_b, 0.0)
    assert (r.t, r.p_value, r.ci_low, r.ci_high) == (t, p_value, r.diff, r.diff)
    assert math.isnan(r.df)
    assert (r.rel_ci_low, r.rel_ci_high) == (r.rel_diff, r.rel_diff)


def test_welch_relative_fields_are_nan_when_the_baseline_mean_is_zero() -> None:
    r = welch_test(10, 0.0, 1.0, 10, 0.5, 1.0)
    assert all(math.isnan(x) for x in (r.rel_diff, r.rel_ci_low, r.rel_ci_high))
    assert r.p_value == pytest.approx(sps.ttest_ind_from_stats(0.5, 1, 10, 0, 1, 10).pvalue)
    assert json.dumps(r.as_dict(), allow_nan=False)  # NaN becomes null


COUNT = st.integers(2, 10**6)
MEAN = st.floats(-1e6, 1e6)
VAR = st.floats(0.0, 1e6)


@FAST
@given(COUNT, MEAN, VAR, COUNT, MEAN, VAR, st.floats(1e-4, 0.5))
def test_welch_properties(
    n_a: int, m_a: float, v_a: float, n_b: int, m_b: float, v_b: float, alpha: float
) -> None:
    r = welch_test(n_a, m_a, v_a, n_b, m_b, v_b, alpha=alpha)
    assert 0.0 <= r.p_value <= 1.0
    assert r.ci_low <= r.diff <= r.ci_high
    if abs(r.p_value - alpha) > 1e-9 * alpha:  # the CI excludes 0 exactly when p < alpha
        assert (r.p_value < alpha) == (r.ci_low > 0.0 or r.ci_high < 0.0)
    if not math.isnan(r.rel_diff):
        assert r.rel_ci_low <= r.rel_diff <= r.rel_ci_high
    if v_a / n_a + v_b / n_b > 1e-300:
        ref = sps.ttest_ind_from_stats(m_b, math.sqrt(v_b), n_b, m_a, math.sqrt(v_a), n_a, False)
        assert r.t == pytest.approx(ref.statistic, rel=1e-9, abs=1e-12)
        assert r.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)
    json.dumps(r.as_dict(), allow_nan=False)


# --- two proportions ---


def test_proportion_test_by_hand() -> None:
    x_a, n_a, x_b, n_b = 120, 1000, 150, 1000
    p_a, p_b, pooled = 0.12, 0.15, 270 / 2000
    z = (p_b - p_a) / math.sqrt(pooled * (1 - pooled) * (2 / 1000))
    se = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    rel_se = math.sqrt(p_b * (1 - p_b) / n_b + (p_b / p_a) ** 2 * p_a * (1 - p_a) / n_a) / p_a
    r = proportion_test(x_a, n_a, x_b, n_b)
    q = 1.959963984540054
    assert r.z == pytest.approx(z, rel=1e-12)
    assert r.p_value == pytest.approx(2 * sps.norm.sf(z), rel=1e-12)
    assert (r.ci_low, r.ci_high) == pytest.approx((0.03 - q * se, 0.03 + q * se), rel=1e-12)
    assert r.rel_diff == pytest.approx(0.25)
    assert r.rel_ci_high == pytest.approx(0.25 + q * rel_se, rel=1e-12)


@pytest.mark.parametrize(("x_a", "n_a", "x_b", "n_b"), [(5, 40, 12, 37), (300, 10_000, 360, 9_000)])
def test_proportion_p_value_is_the_uncorrected_chi_square(
    x_a: int, n_a: int, x_b: int, n_b: int
) -> None:
    # R's prop.test(correct = FALSE) is the chi-square of the 2x2 table, chi2 = z^2.
    table = [[x_a, n_a - x_a], [x_b, n_b - x_b]]
    chi2, p, _, _ = sps.chi2_contingency(table, correction=False)
    r = proportion_test(x_a, n_a, x_b, n_b)
    assert r.z**2 == pytest.approx(chi2, rel=1e-10)
    assert r.p_value == pytest.approx(p, rel=1e-10)


def test_proportion_test_with_no_variance() -> None:
    r = proportion_test(0, 50, 0, 70)
    assert (r.diff, r.z, r.p_value, r.ci_low, r.ci_high) == (0.0, 0.0, 1.0, 0.0, 0.0)
    assert math.isnan(r.rel_diff)


# --- Mann-Whitney ---


@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_mann_whitney_is_scipy_with_b_first(alternative: ms.MannWhitneyAlternative) -> None:
    rng = np.random.default_rng(7)
    a, b = rng.lognormal(0.0, 1.0, 60), rng.lognormal(0.3, 1.0, 45)
    b[:5] = a[:5]  # ties
    ref = sps.mannwhitneyu(b, a, alternative=alternative)
    r = mann_whitney(a, b, alternative)
    assert (r.statistic, r.p_value) == (ref.statistic, ref.pvalue)
    pairs = b[:, None] - a[None, :]
    assert r.cles == pytest.approx(np.mean(pairs > 0) + 0.5 * np.mean(pairs == 0))
    assert (r.n_a, r.n_b) == (60, 45)


def test_mann_whitney_greater_means_b_is_larger() -> None:
    r = mann_whitney([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], "greater")
    assert r.cles == 1.0
    assert r.p_value < 0.05


def test_mann_whitney_with_all_values_tied() -> None:
    r = mann_whitney([2.0] * 20, [2.0] * 30)
    assert (r.statistic, r.p_value, r.cles) == (300.0, 1.0, 0.5)


# --- sample-ratio mismatch ---


@pytest.mark.parametrize(
    ("counts", "weights"),
    [([5010, 4990], [1, 1]), ([9040, 960], [90, 10]), ([331, 340, 329], [0.2, 0.2, 0.2])],
)
def test_srm_is_scipy_chisquare(counts: list[int], weights: list[float]) -> None:
    expected = np.asarray(weights) / sum(weights) * sum(counts)
    ref = sps.chisquare(counts, expected)
    r = srm_test(counts, weights)
    assert r.chi2 == pytest.approx(ref.statistic, rel=1e-12)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    assert r.df == len(counts) - 1
    assert r.expected == pytest.approx(tuple(expected))
    assert not r.mismatch


def test_srm_flags_a_mismatch() -> None:
    r = srm_test([5200, 4800], [50, 50])
    assert r.p_value == pytest.approx(sps.chisquare([5200, 4800]).pvalue)
    assert r.mismatch
    assert not srm_test([5200, 4800], [50, 50], threshold=1e-6).mismatch


def test_srm_weight_zero_variants() -> None:
    left_out = srm_test([500, 0, 480], [1, 0, 1])
    assert left_out.df == 1
    assert left_out.p_value == pytest.approx(sps.chisquare([500, 480]).pvalue)
    leaked = srm_test([500, 3, 480], [1, 0, 1])
    assert (leaked.chi2, leaked.p_value, leaked.mismatch) == (math.inf, 0.0, True)
    assert json.dumps(leaked.as_dict(), allow_nan=False)


def test_srm_without_units_is_no_evidence() -> None:
    r = srm_test([0, 0], [90, 10])
    assert (r.chi2, r.p_value, r.mismatch, r.expected) == (0.0, 1.0, False, (0.0, 0.0))


# --- multiple testing ---


def test_p_adjust_r_example() -> None:
    p = [0.01, 0.02, 0.03, 0.04, 0.05]
    # R: p.adjust(p, "holm") -> 0.05 0.08 0.09 0.09 0.09; p.adjust(p, "BH") -> 0.05 x 5
    assert holm(p) == pytest.approx([0.05, 0.08, 0.09, 0.09, 0.09], rel=1e-12)
    assert benjamini_hochberg(p) == pytest.approx([0.05] * 5, rel=1e-12)


def test_p_adjust_keeps_the_input_order() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    assert benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02], rel=1e-12)
    assert holm([]).shape == benjamini_hochberg([]).shape == (0,)


P_VALUES = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40)


@FAST
@given(P_VALUES)
def test_p_adjust_properties(p: list[float]) -> None:
    bh, hm = benjamini_hochberg(p), holm(p)
    assert bh == pytest.approx(sps.false_discovery_control(p), rel=1e-12, abs=1e-300)
    raw = np.asarray(p)
    assert np.all(raw <= bh) and np.all(bh <= hm + 1e-15) and np.all(hm <= 1.0)
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(hm[order]) >= 0) and np.all(np.diff(bh[order]) >= 0)
    assert np.all(hm <= np.minimum(1.0, raw * len(p)))  # never worse than Bonferroni


# --- power and sample size ---


def test_power_t_test_r_examples() -> None:
    # R's ?power.t.test examples, as R prints them.
    assert power(20, 1.0, 1.0) == pytest.approx(0.8689528, rel=1e-6)
    assert sample_size(1.0, 1.0, power=0.90) == pytest.approx(22.02110, rel=1e-6)
    assert sample_size(1.0, 1.0, power=0.90, alternative="one-sided") == pytest.approx(
        17.84713, rel=1e-6
    )


def test_power_prop_test_r_examples() -> None:
    # R's ?power.prop.test examples; their comments give n = 76.7 and the rest as below.
    # (76.65294, sometimes quoted for this case, is Cohen's arcsine h method, not R's.)
    assert proportion_power(50, 0.50, 0.75) == pytest.approx(0.7401659, rel=1e-6)
    n = proportion_sample_size(0.50, 0.75, power=0.90)
    assert n == pytest.approx(76.7, abs=0.05)
    assert round(proportion_sample_size(0.5, 0.501, alpha=0.001, power=0.90)) == 10451937
    assert proportion_sample_size(0.90, 1.0, power=0.8) == pytest.approx(73.37, abs=0.005)
    # The non-strict power inverts in closed form (Fleiss): an exact check of the root.
    root = 1.959963984540054 * math.sqrt(2 * 0.625 * 0.375) + sps.norm.ppf(0.9) * math.sqrt(0.4375)
    assert n == pytest.approx((root / 0.25) ** 2, rel=1e-10)


def test_power_is_alpha_at_no_effect_when_strict() -> None:
    assert power(30, 0.0, 1.0) == pytest.approx(0.025, rel=1e-9)  # R's default: one tail
    assert power(30, 0.0, 1.0, strict=True) == pytest.approx(0.05, rel=1e-9)
    assert power(30, 0.3, 1.0, strict=True) > power(30, 0.3, 1.0)
    assert proportion_power(30, 0.4, 0.4, strict=True) == pytest.approx(0.05, rel=1e-9)
    assert power(30, -0.5, 1.0) == power(30, 0.5, 1.0)
    assert power(30, -0.5, 1.0, alternative="one-sided") < 0.05


def test_sample_size_for_tiny_effects_extends_the_search_like_r() -> None:
    n = sample_size(0.001, 1.0)  # beyond R's first bracket of 1e7
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    assert n == pytest.approx(2 * (z / 0.001) ** 2, rel=1e-6)
    assert power(n, 0.001, 1.0) == pytest.approx(0.8, rel=1e-9)


def test_sample_size_refuses_what_has_no_answer() -> None:
    with pytest.raises(ValueError, match="power at n = 2"):
        sample_size(20.0, 1.0, power=0.8)
    with pytest.raises(ValueError, match="delta"):
        sample_size(0.0, 1.0)
    with pytest.raises(ValueError, match="delta"):
        sample_size(-1.0, 1.0, alternative="one-sided")
    with pytest.raises(ValueError, match="p_a and p_b"):
        proportion_sample_size(0.3, 0.3)


N_ARM = st.floats(2.5, 1e4)
DELTA = st.floats(0.01, 3.0)
SD = st.floats(0.1, 10.0)


@FAST
@given(N_ARM, N_ARM, DELTA, SD)
def test_power_increases_with_n(n1: float, n2: float, delta: float, sd: float) -> None:
    lo, hi = sorted((n1, n2))
    assert power(lo, delta, sd) <= power(hi, delta, sd) + 1e-12
    assert proportion_power(lo, 0.1, 0.1 + delta / 10) <= proportion_power(
        hi, 0.1, 0.1 + delta / 10
    )


@SOLVE
@given(N_ARM, st.floats(0.5, 4.0), SD, st.booleans())
def test_sample_size_inverts_power(n: float, ncp: float, sd: float, strict: bool) -> None:
    delta = ncp * sd * math.sqrt(2.0 / n)  # a noncentrality that gives a moderate power
    p = power(n, delta, sd, strict=strict)
    assume(0.05 < p < 0.99)
    assert sample_size(delta, sd, power=p, strict=strict) == pytest.approx(n, rel=1e-6)


@SOLVE
@given(N_ARM, st.floats(0.01, 0.98), st.floats(0.005, 0.5))
def test_proportion_sample_size_inverts_power(n: float, p_a: float, gap: float) -> None:
    p_b = min(1.0, p_a + gap)
    p = proportion_power(n, p_a, p_b)
    assume(0.05 < p < 0.99)
    assert proportion_sample_size(p_a, p_b, power=p) == pytest.approx(n, rel=1e-6)


# --- SummaryStats ---


def test_summary_stats_match_numpy() -> None:
    x = np.random.default_rng(3).normal(5.0, 2.0, 1000)
    s = SummaryStats.from_samples(x)
    assert s.count == 1000
    assert (s.mean, s.variance) == pytest.approx((x.mean(), x.var(ddof=1)), rel=1e-12)
    assert (s.sum, s.sum_sq) == pytest.approx((x.sum(), np.square(x).sum()), rel=1e-12)
    assert SummaryStats(**s.as_dict()) == s


def test_summary_stats_streaming_and_merging_agree() -> None:
    x = np.random.default_rng(4).exponential(3.0, 500)
    streamed = SummaryStats()
    for v in x:
        streamed = streamed.add(float(v))
    merged = SummaryStats.from_samples(x[:123]).merge(SummaryStats.from_samples(x[123:]))
    whole = SummaryStats.from_samples(x)
    for s in (streamed, merged):
        assert s.count == whole.count
        assert s.mean == pytest.approx(whole.mean, rel=1e-12)
        assert s.variance == pytest.approx(whole.variance, rel=1e-10)


def test_summary_stats_keep_precision_for_large_means() -> None:
    # Latencies in ns around 1e9 with an sd of 1: sum/sum-of-squares keeps no digit of it.
    x = 1e9 + np.random.default_rng(5).normal(0.0, 1.0, 10_000)
    streamed = SummaryStats()
    for v in x[:2000]:
        streamed = streamed.add(float(v))
    streamed = streamed.merge(SummaryStats.from_samples(x[2000:]))
    assert streamed.variance == pytest.approx(np.var(x, ddof=1), rel=1e-6)
    naive = SummaryStats.from_sums(len(x), float(x.sum()), float(np.square(x).sum()))
    assert naive.variance != pytest.approx(np.var(x, ddof=1), rel=0.1)


def test_summary_stats_feed_the_tests() -> None:
    clicks_a = SummaryStats.from_samples([0, 1, 0, 0, 1, 0, 0, 0, 1, 0])
    clicks_b = SummaryStats.from_samples([1, 1, 0, 1, 1, 0, 0, 1, 1, 0])
    r = proportion_test(clicks_a.nonzero, clicks_a.count, clicks_b.nonzero, clicks_b.count)
    assert (r.p_a, r.p_b) == (0.3, 0.6)
    w = welch_test(
        clicks_a.count, clicks_a.mean, clicks_a.variance, 10, clicks_b.mean, clicks_b.variance
    )
    assert w.diff == pytest.approx(0.3)


def test_summary_stats_empty_and_single() -> None:
    empty = SummaryStats()
    assert empty.count == 0 and math.isnan(empty.mean) and math.isnan(empty.variance)
    one = empty.add(4.0)
    assert (one.mean, one.nonzero) == (4.0, 1) and math.isnan(one.variance)
    assert empty.merge(one) == one == one.merge(empty)
    assert SummaryStats.from_moments(0, math.nan, 0.0) == empty
    assert SummaryStats.from_samples([]) == empty
    with pytest.raises(ValueError, match="n_a"):
        welch_test(one.count, one.mean, one.variance, 10, 1.0, 1.0)


@FAST
@given(st.lists(st.floats(-1e6, 1e6), max_size=30), st.lists(st.floats(-1e6, 1e6), max_size=30))
def test_summary_stats_merge_is_concatenation(x: list[float], y: list[float]) -> None:
    merged = SummaryStats.from_samples(x).merge(SummaryStats.from_samples(y))
    whole = SummaryStats.from_samples(x + y)
    assert (merged.count, merged.nonzero) == (whole.count, whole.nonzero)
    if whole.count:
        assert merged.mean == pytest.approx(whole.mean, rel=1e-9, abs=1e-6)
    if whole.count >= 2:
        assert merged.variance == pytest.approx(whole.variance, rel=1e-7, abs=1e-6)


# --- bad inputs ---

BAD: list[tuple[Callable[..., object], dict[str, Any], str]] = [
    (welch_test, {"n_a": -1}, "n_a"),
    (welch_test, {"n_b": 1}, "n_b"),
    (welch_test, {"n_a": 10.5}, "n_a"),
    (welch_test, {"n_b": 10**400}, "n_b"),
    (welch_test, {"var_a": -0.1}, "var_a"),
    (welch_test, {"var_b": math.nan}, "var_b"),
    (welch_test, {"mean_a": math.nan}, "mean_a"),
    (welch_test, {"mean_b": math.inf}, "mean_b"),
    (welch_test, {"alpha": 1.0}, "alpha"),
    (proportion_test, {"x_a": 11}, "x_a"),
    (proportion_test, {"x_b": -1}, "x_b"),
    (proportion_test, {"n_b": 0}, "n_b"),
    (proportion_test, {"alpha": 0.0}, "alpha"),
    (mann_whitney, {"sample_a": []}, "sample_a"),
    (mann_whitney, {"sample_b": [1.0, math.nan]}, "sample_b"),
    (mann_whitney, {"alternative": "bigger"}, "alternative"),
    (srm_test, {"counts": [1, -2]}, "counts"),
    (srm_test, {"weights": [1, 2, 3]}, "weights"),
    (srm_test, {"weights": [0, 0]}, "weights"),
    (srm_test, {"threshold": 2.0}, "threshold"),
    (holm, {"p_values": [0.1, 1.5]}, "p_values"),
    (benjamini_hochberg, {"p_values": [[0.1]]}, "p_values"),
    (benjamini_hochberg, {"p_values": [math.nan]}, "p_values"),
    (power, {"n": -3}, "n"),
    (power, {"sd": 0.0}, "sd"),
    (power, {"delta": math.nan}, "delta"),
    (power, {"alternative": "less"}, "alternative"),
    (sample_size, {"power": 1.0}, "power"),
    (proportion_power, {"p_b": 1.2}, "p_b"),
    (proportion_sample_size, {"p_a": -0.1}, "p_a"),
    (SummaryStats, {"count": -1}, "count"),
    (SummaryStats, {"count": 2, "nonzero": 3}, "nonzero"),
    (SummaryStats.from_moments, {"m2": -1.0}, "m2"),
    (SummaryStats.from_samples, {"values": [1.0, math.inf]}, "values"),
]
GOOD: dict[Callable[..., object], dict[str, Any]] = {
    welch_test: dict(n_a=10, mean_a=1.0, var_a=1.0, n_b=10, mean_b=1.2, var_b=1.0),
    proportion_test: dict(x_a=3, n_a=10, x_b=4, n_b=10),
    mann_whitney: dict(sample_a=[1.0, 2.0], sample_b=[3.0, 4.0]),
    srm_test: dict(counts=[10, 12], weights=[1, 1]),
    holm: dict(p_values=[0.1]),
    benjamini_hochberg: dict(p_values=[0.1]),
    power: dict(n=10, delta=1.0, sd=1.0),
    sample_size: dict(delta=1.0, sd=1.0),
    proportion_power: dict(n=10, p_a=0.2, p_b=0.4),
    proportion_sample_size: dict(p_a=0.2, p_b=0.4),
    SummaryStats: dict(count=2, m1=1.0, m2=0.5),
    SummaryStats.from_moments: dict(n=3, mean=1.0, m2=1.0),
    SummaryStats.from_samples: dict(values=[1.0]),
}


@pytest.mark.parametrize(("func", "bad", "name"), BAD, ids=lambda v: str(v)[:40])
def test_bad_inputs_raise_value_error_naming_the_argument(
    func: Callable[..., object], bad: dict[str, Any], name: str
) -> None:
    func(**GOOD[func])  # the baseline is fine
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        func(**{**GOOD[func], **bad})


@pytest.mark.parametrize("value", ["1.5", None, [1.0]])
def test_wrong_types_raise_type_error_naming_the_argument(value: object) -> None:
    with pytest.raises(TypeError, match="mean_b"):
        welch_test(10, 1.0, 1.0, 10, value, 1.0)  # type: ignore[arg-type]


def test_strings_are_not_samples() -> None:
    with pytest.raises(TypeError, match="sample_a"):
        mann_whitney(["1.5", "2"], [1.0])
