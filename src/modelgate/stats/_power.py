"""Power and sample size per arm of two-sample tests, computed as R's power.t.test/power.prop.test.

Package-private: import from `modelgate.stats`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from scipy import optimize as spo  # type: ignore[import-untyped]
from scipy import stats as sps

from ._common import positive, probability, real

PowerAlternative = Literal["two-sided", "one-sided"]
_POWER_ALTERNATIVES = ("two-sided", "one-sided")
_N_HIGH = 1e7  # R's first upper bracket for n
_N_LIMIT = 1e15  # beyond this, no experiment: the effect is too small to size


def _sides(alternative: str) -> int:
    if alternative not in _POWER_ALTERNATIVES:
        raise ValueError(f"alternative must be one of {_POWER_ALTERNATIVES}, got {alternative!r}")
    return 2 if alternative == "two-sided" else 1


def _t_power(n: float, delta: float, sd: float, alpha: float, sides: int, strict: bool) -> float:
    # R: nu <- pmax(1e-07, n - 1) * tsample; ncp <- sqrt(n / tsample) * delta / sd.
    nu = max(1e-7, n - 1.0) * 2.0
    ncp = math.sqrt(n / 2.0) * delta / sd
    qu = float(sps.t.isf(alpha / sides, nu))
    p = float(sps.nct.sf(qu, nu, ncp))
    if strict and sides == 2:
        # P(T < -qu) as P(T' > qu) with ncp negated: scipy's far lower tail can be NaN.
        p += float(sps.nct.sf(qu, nu, -ncp))
    return p


def _prop_power(n: float, p_a: float, p_b: float, alpha: float, sides: int, strict: bool) -> float:
    # R's p.body: the z-test's rejection boundary uses the pooled variance 2 pbar qbar, the
    # spread of the estimate the unpooled p_a q_a + p_b q_b; |p_a - p_b| even when one-sided.
    qu = float(sps.norm.isf(alpha / sides))
    null_sd = math.sqrt((p_a + p_b) * (1.0 - (p_a + p_b) / 2.0))
    alt_sd = math.sqrt(p_a * (1.0 - p_a) + p_b * (1.0 - p_b))
    shift = math.sqrt(n) * abs(p_a - p_b)
    p = float(sps.norm.cdf((shift - qu * null_sd) / alt_sd))
    if strict and sides == 2:
        p += float(sps.norm.sf((shift + qu * null_sd) / alt_sd))
    return p


def _solve_n(excess: Callable[[float], float], low: float, target: float) -> float:
    """The n >= low where the increasing `excess` (power(n) - target) crosses 0.

    R: uniroot(f, c(low, 1e7), tol = .Machine$double.eps^0.25, extendInt = "upX"). We keep
    its bracket and its upward extension (doubling here) but solve to brentq's default
    xtol = 2e-12 rather than R's 1.2e-4, so R's printed n can differ in the 6th-7th digit.
    """
    if excess(low) > 0.0:
        raise ValueError(
            f"power must exceed {excess(low) + target:.6g}, the power at n = {low:g} per arm;"
            f" got {target:g}"
        )
    high = _N_HIGH
    while excess(high) < 0.0:
        high *= 2.0
        if high > _N_LIMIT:
            raise ValueError(f"the effect is too small: more than {_N_LIMIT:g} per arm needed")
    return float(spo.brentq(excess, low, high))


def power(
    n: float,
    delta: float,
    sd: float,
    alpha: float = 0.05,
    *,
    alternative: PowerAlternative = "two-sided",
    strict: bool = False,
) -> float:
    """Power of the two-sample t-test with n per arm to detect a true difference of means delta.

    As R's power.t.test(n=, delta=, sd=, sig.level=alpha, type="two.sample"): the noncentral
    t with df = 2(n - 1) and ncp = sqrt(n/2) delta / sd, P(T > t_{1-alpha/2}). Two-sided, R
    uses |delta| and by default (strict=False) ignores the rejections in the wrong tail, so
    delta = 0 gives alpha / 2; strict=True adds P(T < -t_{1-alpha/2}), as R's strict = TRUE.
    One-sided tests "b > a": a negative delta has power below alpha. n is real, not rounded.
    """
    size = positive("n", n)
    d, s = real("delta", delta), positive("sd", sd)
    level = probability("alpha", alpha)
    sides = _sides(alternative)
    return _t_power(size, abs(d) if sides == 2 else d, s, level, sides, strict)


def sample_size(
    delta: float,
    sd: float,
    alpha: float = 0.05,
    power: float = 0.8,
    *,
    alternative: PowerAlternative = "two-sided",
    strict: bool = False,
) -> float:
    """n per arm (not rounded: take the ceiling) for the t-test to reach `power`; see `power`.

    As R's power.t.test(power=, delta=, sd=, sig.level=alpha). The search starts at n = 2, as
    R's does; where n = 2 already exceeds the power we raise, where R extends below 2 into
    df < 2, a range where the power is not monotone in n and has no use as a sample size.
    """
    raw, s = real("delta", delta), positive("sd", sd)
    level, target = probability("alpha", alpha), probability("power", power)
    sides = _sides(alternative)
    d = abs(raw) if sides == 2 else raw
    if d <= 0.0:
        raise ValueError(f"delta must be {'non-zero' if sides == 2 else '> 0'}, got {raw:g}")
    return _solve_n(lambda n: _t_power(n, d, s, level, sides, strict) - target, 2.0, target)


def _proportions(p_a: float, p_b: float) -> tuple[float, float]:
    pa = probability("p_a", p_a, open_interval=False)
    pb = probability("p_b", p_b, open_interval=False)
    if pa * (1.0 - pa) + pb * (1.0 - pb) == 0.0:
        raise ValueError(f"p_a and p_b must not both be 0 or 1 (no variance), got {pa:g}, {pb:g}")
    return pa, pb


def proportion_power(
    n: float,
    p_a: float,
    p_b: float,
    alpha: float = 0.05,
    *,
    alternative: PowerAlternative = "two-sided",
    strict: bool = False,
) -> float:
    """Power of the two-proportion z-test with n per arm, as R's power.prop.test(n=, p1=, p2=).

    Phi((sqrt(n) |p_a - p_b| - z_{1-alpha/2} sqrt(2 pbar qbar)) / sqrt(p_a q_a + p_b q_b)),
    pbar = (p_a + p_b) / 2 (Fleiss, "Statistical Methods for Rates and Proportions"); R's
    default again ignores the wrong tail (strict=True counts it). R uses |p_a - p_b| for a
    one-sided test too, and so do we.
    """
    size = positive("n", n)
    pa, pb = _proportions(p_a, p_b)
    level = probability("alpha", alpha)
    return _prop_power(size, pa, pb, level, _sides(alternative), strict)


def proportion_sample_size(
    p_a: float,
    p_b: float,
    alpha: float = 0.05,
    power: float = 0.8,
    *,
    alternative: PowerAlternative = "two-sided",
    strict: bool = False,
) -> float:
    """n per arm (not rounded) for the two-proportion z-test to reach `power`.

    As R's power.prop.test(p1=, p2=, power=, sig.level=alpha). R brackets from n = 1 and
    extends below it; the power is monotone in n >= 0 here, so we search from 0 (same root).
    """
    pa, pb = _proportions(p_a, p_b)
    if pa == pb:
        raise ValueError(f"p_a and p_b must differ, got {pa:g} for both")
    level, target = probability("alpha", alpha), probability("power", power)
    sides = _sides(alternative)
    return _solve_n(lambda n: _prop_power(n, pa, pb, level, sides, strict) - target, 0.0, target)
