"""The difference of a quantile (latency p50/p90/p99) between arms, for clustered requests.

Package-private: import from `modelgate.stats`. Requests are the samples of a latency
quantile, but the gateway randomizes units, and one unit's requests are correlated (a slow
client is slow every time). The textbook interval of a quantile, which treats the n requests
as independent, is then too narrow; Deng, Knoblich & Lu (KDD 2018, "Applying the Delta Method
in Metric Analytics", section 4.2) correct it with the delta method over units, as GrowthBook's
`QuantileClusteredStatistic` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
from scipy import stats as sps  # type: ignore[import-untyped]

from ._common import FloatArray, Result, positive, probability, vector
from ._effect import EffectResult, effect
from ._sequential import DEFAULT_TUNING

# The density-free interval below is taken at 95%, whatever the test's alpha: it only
# measures the slope of the empirical quantile function (as gbstats' fixed 0.975 quantile).
_Z = float(sps.norm.isf(0.025))


@dataclass(frozen=True)
class QuantileEstimate(Result):
    """One arm's sample quantile and the variance of that estimate over its units.

    `variance_iid` is what treating the requests as independent would give; the ratio
    variance / variance_iid is the design effect of the clustering (1 when every unit sends
    one request).
    """

    quantile: float
    estimate: float
    variance: float
    variance_iid: float
    events: int
    units: int

    def divided(self, by: float) -> QuantileEstimate:
        """The same estimate in other units (values divided by `by`: us to ms by 1000)."""
        return replace(
            self,
            estimate=self.estimate / by,
            variance=self.variance / (by * by),
            variance_iid=self.variance_iid / (by * by),
        )


def _unit_slots(
    units: npt.ArrayLike, size: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Each value's unit as a slot number, and the values per slot (0 for a slot no unit
    holds). Small non-negative integer ids (a caller's codes: the live engine's, which
    number every unit it saw) are their own slots, without a sort of 10^7 ids; other ids
    are numbered 0..k-1."""
    raw = np.asarray(units)
    if raw.ndim != 1 or raw.size != size:
        raise ValueError(f"units must give one unit id per value: {raw.size} ids, {size} values")
    if size and raw.dtype.kind in "iu" and 0 <= raw.min() and raw.max() < 4 * size + 1024:
        codes = raw.astype(np.intp, copy=False)
    else:
        codes = np.unique(raw, return_inverse=True)[1].reshape(-1).astype(np.intp)
    return codes, np.bincount(codes)


def _order_stat(sorted_x: FloatArray, level: float) -> float:
    """The ceil(n level)-th smallest value (the inverted empirical CDF), clipped to [1, n]."""
    n = sorted_x.size
    k = min(n, max(1, math.ceil(n * level - 1e-9)))
    return float(sorted_x[k - 1])


def quantile_estimate(values: npt.ArrayLike, units: npt.ArrayLike, q: float) -> QuantileEstimate:
    """The sample `q`-quantile of per-request `values` and its variance clustered by `units`.

    With S_i the requests of unit i at or below the estimate and N_i its requests, the share
    p = sum S / sum N has the delta-method variance over K units
    (var S - 2 r cov(S, N) + r^2 var N) / (K mean(N)^2), r = mean S / mean N (Deng et al.
    2018, eq. 4). The quantile's interval is then read off the order statistics at
    q -+ z sd(p) (the density-free outer interval, section 4.2), and its variance is
    ((upper - lower) / 2z)^2. Raises ValueError when the values are too few for it.
    """
    found = quantile_estimates(values, units, [q])[probability("q", q)]
    if isinstance(found, str):
        raise ValueError(found)
    return found


def quantile_estimates(
    values: npt.ArrayLike, units: npt.ArrayLike, qs: Sequence[float]
) -> dict[float, QuantileEstimate | str]:
    """quantile_estimate at each of `qs` (p50, p90 and p99 of one arm: its values sorted and
    its units counted once for all), or why the values are too few for that quantile.
    Integer values (latencies in us) are kept as they are: sorted at their own width, a
    quarter of the memory of float64 for 32-bit ones."""
    raw = np.asarray(values)
    whole = raw.dtype.kind in "iu" and raw.ndim == 1
    x = raw if whole else vector("values", values, copy=False)  # only read
    levels = [probability("q", q) for q in qs]
    codes, counts = _unit_slots(units, x.size)
    present = counts > 0
    k, n = int(present.sum()), x.size
    if k < 2:
        return {nu: f"a quantile's variance needs at least 2 units, got {k}" for nu in levels}
    xs = np.sort(x)
    found: dict[float, QuantileEstimate | str] = {}
    for nu in levels:
        needed = _Z * _Z * max(nu / (1.0 - nu), (1.0 - nu) / nu)
        if n <= needed:
            found[nu] = (
                f"{n} values are too few to put an interval on the {nu:g} quantile "
                f"(more than {needed:.0f} needed)"
            )
        else:
            found[nu] = _estimate(x, xs, codes, counts, present, nu)
    return found


def _estimate(
    x: FloatArray,
    xs: FloatArray,
    codes: npt.NDArray[np.intp],
    counts: npt.NDArray[np.intp],
    present: npt.NDArray[np.bool_],
    nu: float,
) -> QuantileEstimate:
    n = x.size
    estimate = _order_stat(xs, nu)
    # S_i as the unit's requests less those above the estimate: the fewer (a tenth for p90)
    above = np.bincount(codes[x > estimate], minlength=counts.size)
    s = (counts - above)[present].astype(np.float64)
    m = counts[present].astype(np.float64)
    k = m.size
    ms, mn = float(s.mean()), float(m.mean())
    r = ms / mn
    cov = np.cov(s, m)
    var_p = max(0.0, float(cov[0, 0] - 2.0 * r * cov[0, 1] + r * r * cov[1, 1])) / (k * mn * mn)
    var_iid = nu * (1.0 - nu) / n

    def spread(var: float) -> float:
        sd = math.sqrt(var)
        width = _order_stat(xs, nu + _Z * sd) - _order_stat(xs, nu - _Z * sd)
        return (width / (2.0 * _Z)) ** 2

    return QuantileEstimate(
        quantile=nu,
        estimate=estimate,
        variance=spread(var_p),
        variance_iid=spread(var_iid),
        events=n,
        units=k,
    )


def quantile_test(
    values_a: npt.ArrayLike,
    units_a: npt.ArrayLike,
    values_b: npt.ArrayLike,
    units_b: npt.ArrayLike,
    q: float = 0.5,
    alpha: float = 0.05,
    *,
    sequential: bool = False,
    tuning: float = DEFAULT_TUNING,
) -> EffectResult:
    """The difference of the `q`-quantile (e.g. 0.99 for p99 latency) between arms b and a,
    with absolute and relative intervals from `quantile_estimate`'s clustered variances.
    Degrees of freedom and the confidence sequence's n count units, not requests."""
    ea = quantile_estimate(values_a, units_a, q)
    eb = quantile_estimate(values_b, units_b, q)
    return quantile_difference(ea, eb, alpha, sequential=sequential, tuning=tuning)


def quantile_difference(
    ea: QuantileEstimate,
    eb: QuantileEstimate,
    alpha: float = 0.05,
    *,
    sequential: bool = False,
    tuning: float = DEFAULT_TUNING,
) -> EffectResult:
    """`quantile_test` from the arms' estimates, when they are at hand already (one arm's
    estimate serves its comparison with every other arm)."""
    level = probability("alpha", alpha)
    tune = positive("tuning", tuning) if sequential else None
    return effect(
        "quantile",
        ea.estimate,
        eb.estimate,
        ea.variance,
        eb.variance,
        ea.units,
        eb.units,
        level,
        tune,
    )
