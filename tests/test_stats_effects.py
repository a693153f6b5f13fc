"""Per-unit tests (issue 13) against GrowthBook's gbstats and a hand-written reference.

gbstats vectors: the ones its own test file prints (packages/stats/tests/frequentist/
test_tests.py, rounded there to 5 decimals), and full-precision ones from running gbstats'
TwoSidedTTest / SequentialTwoSidedTTest on the inputs written here (its statistics are the
same sums: SampleMeanStatistic(sum, sum_squares, n) is `UnitStats.from_sums`).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps  # type: ignore[import-untyped]

from modelgate.stats import (
    EffectResult,
    UnitStats,
    cs_halfwidth,
    cuped_test,
    quantile_estimate,
    quantile_test,
    sequential_srm_test,
    unit_mean_test,
    unit_proportion_test,
    unit_ratio_test,
    welch_test,
)

# gbstats' SampleMeanStatistic pair of its frequentist tests, n_a = 3407 or 3000.
A_SUM, A_SS, B_SUM, B_SS, B_N = 1396.87, 52377.9767, 2422.7, 134698.29, 3461


def _binary(ones: int, n: int) -> UnitStats:
    return UnitStats.from_samples([1.0] * ones + [0.0] * (n - ones))


def _rel(r: EffectResult) -> tuple[float, float, float, float, float]:
    return r.rel_diff, r.rel_ci_low, r.rel_ci_high, r.rel_se, r.rel_p_value


def _abs(r: EffectResult) -> tuple[float, float, float, float, float]:
    return r.diff, r.ci_low, r.ci_high, r.se, r.p_value


def test_mean_matches_gbstats_two_sided_ttest() -> None:
    a, b = UnitStats.from_sums(3407, A_SUM, A_SS), UnitStats.from_sums(B_N, B_SUM, B_SS)
    r = unit_mean_test(a, b)
    assert (r.method, r.interval) == ("mean", "t")
    assert _rel(r) == pytest.approx((0.70732, -0.03526, 1.44989, 0.37879, 0.06191), abs=5e-6)
    assert _abs(r) == pytest.approx((0.29, 0.04538, 0.53462, 0.12478, 0.02016), abs=5e-6)


def test_mean_matches_gbstats_one_sided_at_full_precision() -> None:
    # gbstats' one-sided tests at alpha = 0.05 are the two-sided bounds at alpha = 0.1 and
    # half the two-sided p-values (the estimate is positive); gbstats prints them unrounded.
    a, b = UnitStats.from_sums(3000, A_SUM, A_SS), UnitStats.from_sums(B_N, B_SUM, B_SS)
    r = unit_mean_test(a, b, alpha=0.1)
    assert r.rel_diff == pytest.approx(0.5033610858562358, abs=1e-12)
    assert r.rel_se == pytest.approx(0.3334122146400735, abs=1e-12)
    assert r.rel_ci_low == pytest.approx(-0.045136675850396046, abs=1e-9)
    assert r.rel_ci_high == pytest.approx(1.0518588475628676, abs=1e-9)
    assert r.rel_p_value / 2 == pytest.approx(0.06558262868467746, abs=1e-9)
    assert r.diff == pytest.approx(0.23437666666666668, abs=1e-12)
    assert r.se == pytest.approx(0.12983081254184736, abs=1e-12)
    assert r.ci_low == pytest.approx(0.020791480063255735, abs=1e-9)
    assert r.ci_high == pytest.approx(0.44796185327007765, abs=1e-9)
    assert r.p_value / 2 == pytest.approx(0.03554272489873023, abs=1e-9)


def test_mean_absolute_part_is_welch_test() -> None:
    a, b = UnitStats.from_sums(3000, A_SUM, A_SS), UnitStats.from_sums(B_N, B_SUM, B_SS)
    r = unit_mean_test(a, b)
    w = welch_test(a.count, a.mean_x, a.var_x, b.count, b.mean_x, b.var_x)
    assert (r.diff, r.ci_low, r.ci_high, r.p_value, r.df) == pytest.approx(
        (w.diff, w.ci_low, w.ci_high, w.p_value, w.df), rel=1e-12
    )


def test_proportion_matches_gbstats() -> None:
    r = unit_proportion_test(_binary(14, 28), _binary(16, 30))
    assert r.method == "proportion"
    assert _rel(r) == pytest.approx((0.06667, -0.47767, 0.61101, 0.2717, 0.80707), abs=5e-6)


def test_sequential_matches_gbstats() -> None:
    a, b = UnitStats.from_sums(3000, A_SUM, A_SS), UnitStats.from_sums(B_N, B_SUM, B_SS)
    r = unit_mean_test(a, b, sequential=True, tuning=1000)
    assert (r.interval, r.tuning) == ("confidence-sequence", 1000)
    assert _rel(r) == pytest.approx(
        (0.5033610858562358, -0.5584405051077315, 1.5651626768202032, 0.3334122146400735, 1.0),
        abs=1e-9,
    )
    r = unit_mean_test(a, b, sequential=True)  # the default tuning, 5000
    assert _abs(r)[:3] == pytest.approx(
        (0.23437666666666668, -0.16011652842982782, 0.6288698617631612), abs=1e-9
    )
    assert r.p_value == pytest.approx(0.7601250075467714, abs=1e-9)
    r = unit_proportion_test(_binary(1396, 3000), _binary(2422, 3461), sequential=True)
    assert _rel(r)[:4] == pytest.approx((0.50386, 0.40098, 0.60675, 0.03386), abs=5e-6)
    assert r.rel_p_value < 5e-6


def test_cuped_matches_gbstats() -> None:
    # gbstats' test_sequential_test_runs_ra: pre-period sums and a sum of products of 1.
    a = UnitStats.from_sums(3000, A_SUM, A_SS, 16.87, 527.9767, 1.0)
    b = UnitStats.from_sums(B_N, B_SUM, B_SS, 22.7, 1348.29, 1.0)
    r = cuped_test(a, b, sequential=True)
    assert _rel(r)[:3] == pytest.approx((0.50338, -0.50969, 1.51646), abs=5e-6)
    assert _rel(r) == pytest.approx(
        (0.503383995601997, -0.509694174070741, 1.516462165274735, 0.33341199182116854, 1.0),
        abs=1e-9,
    )
    r = cuped_test(a, b)
    assert _rel(r) == pytest.approx(
        (
            0.503383995601997,
            -0.15022145744574444,
            1.1569894486497385,
            0.33341199182116854,
            0.13114746054543458,
        ),
        abs=1e-9,
    )
    assert _abs(r) == pytest.approx(
        (
            0.2343873339788538,
            -0.020126810876695933,
            0.48890147883440355,
            0.12983072216925332,
            0.07107240110004032,
        ),
        abs=1e-9,
    )
    assert r.method == "cuped" and r.theta < 0 and 0 < r.variance_reduction < 1e-5


def test_ratio_matches_gbstats() -> None:
    # RatioStatistic(m = (sum 300, ss 2000), d = (500, 3000), sum of products 1800, n 100)
    # against (330, 2300), (520, 3100), 1900, n 110.
    a = UnitStats.from_sums(100, 300.0, 2000.0, 500.0, 3000.0, 1800.0)
    b = UnitStats.from_sums(110, 330.0, 2300.0, 520.0, 3100.0, 1900.0)
    r = unit_ratio_test(a, b)
    assert r.method == "ratio" and r.estimate_a == 0.6
    assert _rel(r) == pytest.approx(
        (
            0.057692307692307675,
            -0.24348040258002826,
            0.3588650179646436,
            0.15276800373334257,
            0.7060783832901674,
        ),
        abs=1e-9,
    )
    assert _abs(r) == pytest.approx(
        (
            0.0346153846153846,
            -0.14127875427888642,
            0.21050952350965563,
            0.08922121942248662,
            0.6984332342149022,
        ),
        abs=1e-9,
    )
    r = unit_ratio_test(a, b, sequential=True)
    assert (r.rel_ci_low, r.rel_ci_high) == pytest.approx(
        (-0.7079388116344044, 0.8233234270190198), abs=1e-9
    )


# -- a hand-written reference on raw records ----------------------------------------------


def _records(seed: int) -> list[tuple[str, int, float, float]]:
    """(arm, unit, value, latency) per request: repeat visitors with per-unit effects."""
    rng = np.random.default_rng(seed)
    out = []
    for arm, lift in (("a", 1.0), ("b", 1.1)):
        for unit in range(300):
            level = rng.lognormal(0.0, 0.7)
            for _ in range(int(min(rng.zipf(1.8), 60))):
                value = float(rng.random() < 0.2 * min(level, 3.0)) * lift
                out.append((arm, unit, value, float(40 * level * rng.lognormal(0, 0.3))))
    return out


def _per_unit(records: list[tuple[str, int, float, float]]) -> dict[str, dict[int, list[float]]]:
    """arm -> unit -> [sum of values, requests, any value 1]: a plain groupby."""
    groups: dict[str, dict[int, list[float]]] = defaultdict(dict)
    for arm, unit, value, _ in records:
        row = groups[arm].setdefault(unit, [0.0, 0.0, 0.0])
        row[0] += value
        row[1] += 1.0
        row[2] = max(row[2], float(value > 0))
    return groups


def test_against_a_hand_written_reference_on_raw_records() -> None:
    groups = _per_unit(_records(11))
    cols = {arm: np.array(list(units.values())) for arm, units in groups.items()}
    xa, xb = cols["a"], cols["b"]
    stats = {arm: UnitStats.from_samples(c[:, 0], c[:, 1]) for arm, c in cols.items()}

    # mean: Welch over units, as scipy computes it on the per-unit sums.
    r = unit_mean_test(stats["a"], stats["b"])
    ref = sps.ttest_ind(xb[:, 0], xa[:, 0], equal_var=False)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    assert r.diff / r.se == pytest.approx(ref.statistic, rel=1e-10)

    # ratio: the textbook delta method, Var(X/Y) ~ (s_x^2 - 2 R s_xy + R^2 s_y^2) / (n mu_y^2).
    def ratio(c: np.ndarray) -> tuple[float, float]:
        n, rr = len(c), c[:, 0].sum() / c[:, 1].sum()
        s = np.cov(c[:, 0], c[:, 1])
        return rr, (s[0, 0] - 2 * rr * s[0, 1] + rr * rr * s[1, 1]) / (n * c[:, 1].mean() ** 2)

    (ra, va), (rb, vb) = ratio(xa), ratio(xb)
    r = unit_ratio_test(stats["a"], stats["b"])
    assert (r.estimate_a, r.estimate_b) == pytest.approx((ra, rb), rel=1e-12)
    assert r.se == pytest.approx(math.sqrt(va + vb), rel=1e-10)
    df = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert (r.ci_low, r.ci_high) == pytest.approx((rb - ra - half, rb - ra + half), rel=1e-10)
    rel_sd = math.sqrt(vb / ra**2 + va * rb**2 / ra**4)
    assert r.rel_se == pytest.approx(rel_sd, rel=1e-10)

    # proportion: units with any 1.
    r = unit_proportion_test(
        UnitStats.from_samples(xa[:, 2]), UnitStats.from_samples(xb[:, 2]), alpha=0.1
    )
    pa, pb = xa[:, 2].mean(), xb[:, 2].mean()
    assert (r.estimate_a, r.estimate_b) == pytest.approx((pa, pb), rel=1e-14)
    assert r.se == pytest.approx(
        math.sqrt(pa * (1 - pa) / len(xa) + pb * (1 - pb) / len(xb)), rel=1e-12
    )


def test_quantile_against_a_hand_written_reference() -> None:
    recs = [r for r in _records(5) if r[0] == "a"]
    lat = np.array([r[3] for r in recs])
    units = np.array([r[1] for r in recs])
    e = quantile_estimate(lat, units, 0.9)
    ordered = sorted(lat)
    assert e.estimate == ordered[math.ceil(0.9 * len(lat)) - 1]
    # Deng et al.: the share of requests at or below the estimate, per unit, by the delta method.
    below: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for u, x in zip(units.tolist(), lat.tolist(), strict=True):
        below[u][0] += x <= e.estimate
        below[u][1] += 1
    s, m = np.array(list(below.values())).T
    k, rr = len(s), s.sum() / m.sum()
    c = np.cov(s, m)
    sd = math.sqrt((c[0, 0] - 2 * rr * c[0, 1] + rr * rr * c[1, 1]) / (k * m.mean() ** 2))
    z = sps.norm.ppf(0.975)
    lo = ordered[math.ceil(len(lat) * (0.9 - z * sd)) - 1]
    hi = ordered[math.ceil(len(lat) * (0.9 + z * sd)) - 1]
    assert e.variance == pytest.approx(((hi - lo) / (2 * z)) ** 2, rel=1e-12)
    assert e.units == k and e.events == len(lat) and e.variance > e.variance_iid


def test_cs_is_wider_than_the_fixed_interval_and_tightest_near_the_tuning() -> None:
    a, b = UnitStats.from_sums(3000, A_SUM, A_SS), UnitStats.from_sums(B_N, B_SUM, B_SS)
    fixed, seq = unit_mean_test(a, b), unit_mean_test(a, b, sequential=True)
    assert seq.ci_high - seq.ci_low > fixed.ci_high - fixed.ci_low
    widths = [cs_halfwidth(1.0 / math.sqrt(6461), 6461, 0.05, t) for t in (10, 6461, 1e5)]
    assert widths[1] < widths[0] and widths[1] < widths[2]


def test_edge_cases_and_validation() -> None:
    one = UnitStats.from_samples([1.0])
    two = UnitStats.from_samples([1.0, 2.0])
    with pytest.raises(ValueError, match="arm a needs at least 2 units"):
        unit_mean_test(one, two)
    with pytest.raises(TypeError, match="UnitStats"):
        unit_mean_test(two, object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="denominator sums to 0"):
        unit_ratio_test(two, two)
    with pytest.raises(ValueError, match="tuning"):
        unit_mean_test(two, two, sequential=True, tuning=0.0)
    same = UnitStats.from_samples([3.0, 3.0])
    r = unit_mean_test(same, same)
    assert (r.diff, r.p_value, r.ci_low, r.ci_high) == (0.0, 1.0, 0.0, 0.0)
    zero = UnitStats.from_samples([0.0, 0.0, 1.0, -1.0])
    assert math.isnan(unit_mean_test(zero, two).rel_diff)
    r = cuped_test(two, UnitStats.from_samples([1.0, 4.0]))  # no covariate: plain Welch
    assert r.theta == 0.0 and r.variance_reduction == 0.0
    assert r.p_value == unit_mean_test(two, UnitStats.from_samples([1.0, 4.0])).p_value
    assert r.as_dict()["tuning"] is None
    with pytest.raises(ValueError, match="one unit id per value"):
        quantile_estimate([1.0, 2.0], [1], 0.5)
    with pytest.raises(ValueError, match="too few"):
        quantile_estimate(np.arange(10.0), np.arange(10) % 3, 0.99)
    with pytest.raises(ValueError, match="at least 2 units"):
        quantile_estimate(np.arange(100.0), np.zeros(100), 0.5)
    lat = np.arange(200.0)
    r = quantile_test(lat, np.arange(200) % 50, lat + 1.0, np.arange(200) % 40, 0.5)
    assert r.method == "quantile" and r.diff == 1.0 and (r.n_a, r.n_b) == (50, 40)
    with pytest.raises(ValueError, match="weights"):
        sequential_srm_test([1, 2], [1])
    with pytest.raises(ValueError, match="whole numbers"):
        sequential_srm_test([1.5, 2], [1, 1])
    assert sequential_srm_test([5, 1], [1, 0]).p_value == 0.0
    assert sequential_srm_test([0, 0], [1, 1]).p_value == 1.0
    assert sequential_srm_test([500, 500], [1, 1], previous_p_value=0.01).p_value == 0.01


# -- properties ----------------------------------------------------------------------------

UNITS = st.lists(
    st.tuples(st.floats(-1e3, 1e3), st.floats(0.5, 1e3)), min_size=3, max_size=30
).filter(lambda v: len({x for x, _ in v}) > 1)


def _stats(v: list[tuple[float, float]]) -> UnitStats:
    arr = np.array(v)
    return UnitStats.from_samples(arr[:, 0], arr[:, 1])


@settings(deadline=None, max_examples=100)
@given(UNITS, UNITS, st.integers(1, 29), st.booleans(), st.floats(0.01, 0.3))
def test_test_properties(
    va: list[tuple[float, float]],
    vb: list[tuple[float, float]],
    cut: int,
    sequential: bool,
    alpha: float,
) -> None:
    a, b = _stats(va), _stats(vb)
    cut = min(cut, len(va) - 1)
    a_parts = _stats(va[:cut]).merge(_stats(va[cut:]))
    for test in (unit_mean_test, unit_ratio_test, cuped_test):
        r = test(a, b, alpha, sequential=sequential)
        # Merged parts give the same answer as the whole; swapping the arms negates diff.
        m = test(a_parts, b, alpha, sequential=sequential)
        assert m.diff == pytest.approx(r.diff, rel=1e-7, abs=1e-9)
        # Absolute slack at the scale of the data: when y explains x exactly, CUPED's residual
        # variance is pure rounding of sums of values up to 1e3, and its square root shows it.
        noise = 1e-6 * math.sqrt(max(1.0, a.var_x + b.var_x))
        assert m.se == pytest.approx(r.se, rel=1e-6, abs=noise)
        s = test(b, a, alpha, sequential=sequential)
        assert s.diff == pytest.approx(-r.diff, rel=1e-9, abs=1e-12)
        if test is not cuped_test:  # CUPED's theta is pooled: symmetric too, but not bitwise
            assert s.p_value == pytest.approx(r.p_value, rel=1e-9, abs=1e-12)
        # The p-value and the interval agree: p < alpha exactly when 0 is outside it.
        if r.se > 1e-9 * max(1.0, abs(r.diff)) and abs(r.p_value - alpha) > 1e-9:
            assert (r.p_value < alpha) == (not r.ci_low <= 0.0 <= r.ci_high)
        assert r.ci_low <= r.diff <= r.ci_high
