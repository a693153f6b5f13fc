"""Simulated A/A batteries for the per-unit statistics (issue 13), with repeat visitors.

Traffic as on a real site: requests per unit Zipf-like (most units send 1-3, a few dozens),
and a per-unit effect (a lognormal level shared by all requests of the unit), so requests of
one unit are correlated. Each battery uses a fixed seed and checks a rate against binomial
bounds around alpha (a 0.001 two-sided binomial band), and shows the contrast with the
request-level analysis that issue 13 found giving false alarms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats as sps  # type: ignore[import-untyped]

from modelgate.stats import (
    UnitStats,
    cuped_test,
    quantile_estimate,
    quantile_test,
    sequential_srm_test,
    srm_test,
    unit_mean_test,
    unit_proportion_test,
    unit_ratio_test,
    welch_test,
)

ALPHA = 0.05
Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]


def _bounds(reps: int, alpha: float = ALPHA) -> tuple[int, int]:
    """The counts of rejections that a true rate alpha stays within, but once in 1000."""
    return int(sps.binom.ppf(0.0005, reps, alpha)), int(sps.binom.isf(0.0005, reps, alpha))


@dataclass
class Traffic:
    """`reps` A/A experiments of `units` units each, drawn at once (vectorised)."""

    rep: Ints  # per unit: its experiment
    arm: Ints  # per unit: 0 = a, 1 = b, assigned 50/50 at random
    x: Floats  # per unit: the sum of its values
    requests: Floats  # per unit: its requests
    converted: Floats  # per unit: 1 if any of its requests converted
    unit_of: Ints  # per request: its unit
    value: Floats  # per request: its value
    latency: Floats  # per request: its latency
    hit: Floats  # per request: 1 if it converted


def _traffic(seed: int, reps: int, units: int, cap: int = 60) -> Traffic:
    rng = np.random.default_rng(seed)
    total = reps * units
    rep = np.repeat(np.arange(reps), units)
    arm = (rng.random(total) < 0.5).astype(np.int64)
    requests = np.minimum(rng.zipf(1.7, total), cap)
    level = rng.lognormal(0.0, 0.8, total)
    unit_of = np.repeat(np.arange(total), requests)
    value = level[unit_of] * rng.lognormal(0.0, 0.5, unit_of.size)
    hit = rng.random(unit_of.size) < np.minimum(0.05 * level, 0.5)[unit_of]
    latency = 30.0 * np.sqrt(level)[unit_of] * rng.lognormal(0.0, 0.4, unit_of.size)
    return Traffic(
        rep=rep,
        arm=arm,
        x=np.bincount(unit_of, weights=value, minlength=total).astype(np.float64),
        requests=requests.astype(np.float64),
        converted=(np.bincount(unit_of, weights=hit, minlength=total) > 0).astype(np.float64),
        unit_of=unit_of,
        value=value,
        latency=latency,
        hit=hit.astype(np.float64),
    )


def test_aa_per_unit_tests_hold_alpha_where_request_level_tests_do_not() -> None:
    reps, units = 400, 1000
    t = _traffic(20261207, reps, units)
    group = t.rep * 2 + t.arm  # per unit
    req_group = group[t.unit_of]
    n_req = np.bincount(req_group, minlength=2 * reps)
    s1 = np.bincount(req_group, weights=t.value, minlength=2 * reps)
    s2 = np.bincount(req_group, weights=t.value**2, minlength=2 * reps)
    c1 = np.bincount(req_group, weights=t.hit, minlength=2 * reps)
    order = np.argsort(group, kind="stable")
    cuts = np.cumsum(np.bincount(group, minlength=2 * reps))[:-1]
    xs, ys, cs = (np.split(v[order], cuts) for v in (t.x, t.requests, t.converted))
    false = dict.fromkeys(("mean", "ratio", "proportion", "cuped", "req-mean", "req-prop"), 0)
    srm_units = srm_requests = 0
    for r in range(reps):
        a, b = 2 * r, 2 * r + 1
        ua, ub = UnitStats.from_samples(xs[a], ys[a]), UnitStats.from_samples(xs[b], ys[b])
        false["mean"] += unit_mean_test(ua, ub).p_value < ALPHA
        false["ratio"] += unit_ratio_test(ua, ub).p_value < ALPHA
        false["cuped"] += cuped_test(ua, ub).p_value < ALPHA  # y = requests, a stand-in
        pa, pb = UnitStats.from_samples(cs[a]), UnitStats.from_samples(cs[b])
        false["proportion"] += unit_proportion_test(pa, pb).p_value < ALPHA
        # What issue 13 found: every request taken as an independent sample.
        va = (s2[a] - s1[a] ** 2 / n_req[a]) / (n_req[a] - 1)
        vb = (s2[b] - s1[b] ** 2 / n_req[b]) / (n_req[b] - 1)
        w = welch_test(n_req[a], s1[a] / n_req[a], va, n_req[b], s1[b] / n_req[b], vb)
        false["req-mean"] += w.p_value < ALPHA
        pra, prb = c1[a] / n_req[a], c1[b] / n_req[b]
        w = welch_test(n_req[a], pra, pra * (1 - pra), n_req[b], prb, prb * (1 - prb))
        false["req-prop"] += w.p_value < ALPHA
        srm_units += srm_test([ua.count, ub.count], [1, 1], threshold=ALPHA).mismatch
        srm_requests += srm_test([n_req[a], n_req[b]], [1, 1], threshold=ALPHA).mismatch
    low, high = _bounds(reps)
    rates = {k: v / reps for k, v in false.items()}
    print(
        f"A/A n={reps} seed=20261207: {rates}, srm units {srm_units / reps}, "
        f"srm requests {srm_requests / reps}"
    )
    for name in ("mean", "ratio", "proportion", "cuped"):
        assert low <= false[name] <= high, (name, rates)
    assert low <= srm_units <= high
    # The contrast: the request-level analyses are far outside the band.
    assert false["req-mean"] > high and false["req-prop"] > high, rates
    assert srm_requests > high


def test_confidence_sequence_keeps_the_family_wise_rate_over_20_looks() -> None:
    reps, looks, step = 200, 20, 100
    rng = np.random.default_rng(7)
    n = looks * step
    # Per-unit sums with a heavy right tail (a unit's revenue), both arms alike.
    xa = rng.lognormal(0.0, 1.0, (reps, n)) * rng.zipf(2.5, (reps, n)).clip(max=30)
    xb = rng.lognormal(0.0, 1.0, (reps, n)) * rng.zipf(2.5, (reps, n)).clip(max=30)
    ever_cs = ever_fixed = 0
    for r in range(reps):
        hit_cs = hit_fixed = False
        for k in range(1, looks + 1):
            a = UnitStats.from_samples(xa[r, : k * step])
            b = UnitStats.from_samples(xb[r, : k * step])
            cs = unit_mean_test(a, b, sequential=True)
            hit_cs |= not cs.ci_low <= 0.0 <= cs.ci_high
            hit_fixed |= unit_mean_test(a, b).p_value < ALPHA
        ever_cs += hit_cs
        ever_fixed += hit_fixed
    _, high = _bounds(reps)
    print(
        f"20 looks, n={reps}, seed=7: ever significant, CS {ever_cs / reps}, "
        f"fixed-horizon t {ever_fixed / reps}"
    )
    assert ever_cs <= high
    assert ever_fixed > high  # peeking at a fixed-horizon p-value inflates false alarms


def test_cuped_narrows_the_interval_by_sqrt_one_minus_rho_squared() -> None:
    rng = np.random.default_rng(3)
    n, rho = 20000, 0.7
    widths, unrelated = [], []
    for _ in range(5):
        y = rng.normal(10.0, 2.0, (2, n))
        x = 5.0 + rho * (y - 10.0) / 2.0 + math.sqrt(1 - rho**2) * rng.normal(0.0, 1.0, (2, n))
        a, b = UnitStats.from_samples(x[0], y[0]), UnitStats.from_samples(x[1], y[1])
        plain, adj = unit_mean_test(a, b), cuped_test(a, b)
        widths.append((adj.ci_high - adj.ci_low) / (plain.ci_high - plain.ci_low))
        assert abs(adj.variance_reduction - rho**2) < 0.03
        z = rng.normal(0.0, 1.0, (2, n))  # a covariate unrelated to x
        a, b = UnitStats.from_samples(x[0], z[0]), UnitStats.from_samples(x[1], z[1])
        adj = cuped_test(a, b)
        unrelated.append((adj.ci_high - adj.ci_low) / (plain.ci_high - plain.ci_low))
    print(f"CUPED width ratios rho=0.7: {np.round(widths, 4)}, unrelated: {np.round(unrelated, 4)}")
    assert np.allclose(widths, math.sqrt(1 - rho**2), atol=0.015)
    assert max(unrelated) < 1.002


def test_sequential_srm_fires_on_52_48_and_stays_quiet_on_aa() -> None:
    rng = np.random.default_rng(11)
    reps, looks, step = 400, 20, 1000
    fired_aa = 0
    for _ in range(reps):
        b = np.cumsum(rng.binomial(step, 0.5, looks))
        p = 1.0
        for k in range(looks):
            res = sequential_srm_test(
                [(k + 1) * step - b[k], b[k]], [1, 1], 0.05, previous_p_value=p
            )
            p = res.p_value
        fired_aa += res.mismatch
    fired_skew = 0
    for _ in range(100):
        nb = int(rng.binomial(50000, 0.48))
        fired_skew += sequential_srm_test([50000 - nb, nb], [1, 1]).mismatch
    _, high = _bounds(reps)
    print(
        f"sequential SRM: A/A n={reps} x 20 looks fired {fired_aa / reps} (alpha 0.05); "
        f"52/48 of 50000 units fired {fired_skew}/100 at 0.001"
    )
    assert fired_aa <= high
    assert fired_skew >= 99


def test_quantile_interval_holds_alpha_with_repeat_visitors() -> None:
    reps, units = 200, 1000
    t = _traffic(99, reps, units)
    req_group = (t.rep * 2 + t.arm)[t.unit_of]
    order = np.argsort(req_group, kind="stable")
    cuts = np.cumsum(np.bincount(req_group, minlength=2 * reps))[:-1]
    lat, who = np.split(t.latency[order], cuts), np.split(t.unit_of[order], cuts)
    false = {0.5: 0, 0.9: 0, 0.99: 0}
    false_iid = {0.5: 0, 0.9: 0, 0.99: 0}
    z = sps.norm.isf(ALPHA / 2)
    for r in range(reps):
        a, b = 2 * r, 2 * r + 1
        for q in false:
            res = quantile_test(lat[a], who[a], lat[b], who[b], q)
            false[q] += res.p_value < ALPHA
            ea, eb = quantile_estimate(lat[a], who[a], q), quantile_estimate(lat[b], who[b], q)
            false_iid[q] += bool(abs(res.diff) > z * math.sqrt(ea.variance_iid + eb.variance_iid))
    low, high = _bounds(reps)
    print(f"quantile A/A n={reps} seed=99: clustered {false}, iid {false_iid}")
    for q in false:
        assert false[q] <= high, false
        assert false_iid[q] > high, false_iid
