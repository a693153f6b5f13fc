"""Always-valid inference: asymptotic confidence sequences and a sequential SRM test.

Package-private: import from `modelgate.stats`. A fixed-horizon p-value read at every look
inflates false alarms (Johari et al. 2017); these stay valid however often they are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import special  # type: ignore[import-untyped]

from ._common import Result, counts_and_weights, positive, probability

DEFAULT_TUNING = 5000.0


def cs_rho(alpha: float, tuning: float) -> float:
    """The mixture's rho for a two-sided asymptotic confidence sequence that is tightest near
    n = `tuning` units (Waudby-Smith et al. 2023, arXiv:2103.06476v7, eq. 161); `tuning` is
    GrowthBook's `sequential_tuning_parameter` (default 5000)."""
    log_a = -2.0 * math.log(alpha)
    return math.sqrt((log_a + math.log(log_a + 1.0)) / tuning)


def cs_halfwidth(se: float, n: int, alpha: float, tuning: float) -> float:
    """Half-width of the two-sided 1 - alpha asymptotic confidence sequence of an estimate with
    standard error `se` after `n` units in all (Waudby-Smith et al. 2023, eq. 9):
    sigma sqrt(2 (n rho^2 + 1) / (n rho)^2 log(sqrt(n rho^2 + 1) / alpha)), sigma^2 = n se^2.
    Wider than the fixed-horizon interval: the price of reading it at every look."""
    rho = cs_rho(alpha, tuning)
    t = n * rho * rho + 1.0
    return se * math.sqrt(n) * math.sqrt(2.0 * t * math.log(math.sqrt(t) / alpha)) / (n * rho)


def cs_p_value(estimate: float, se: float, n: int, alpha: float, tuning: float) -> float:
    """Always-valid p-value of H0: effect = 0, 1 / e-value of the normal mixture
    (Waudby-Smith et al. 2023, eq. 155; as gbstats): e = exp(rho^2 S / (2 t)) / sqrt(t), with
    S = n (estimate / se)^2 and t = n rho^2 + 1. Computed in logs so it cannot overflow."""
    if se == 0.0:
        return 1.0 if estimate == 0.0 else 0.0
    rho = cs_rho(alpha, tuning)
    t = n * rho * rho + 1.0
    z = estimate / se
    z2n = z * z * n  # inf when se is tiny: then e is inf and p is 0, never an OverflowError
    log_e = rho * rho * z2n / (2.0 * t) - 0.5 * math.log(t)
    return math.exp(min(0.0, -log_e))


@dataclass(frozen=True)
class SequentialSRMResult(Result):
    """Sequential sample-ratio-mismatch test (Lindon & Malek 2022) over unit counts.

    `bayes_factor` is the Dirichlet-multinomial mixture against the configured split (an
    e-value under H0); `p_value` = min(previous p, 1 / bayes_factor) is always valid, so the
    canary may check it at every window and alarm when it drops below `threshold`.
    """

    log_bayes_factor: float
    p_value: float
    expected: tuple[float, ...]
    mismatch: bool
    threshold: float
    concentration: float
    method: str = "srm-dirichlet-multinomial"


def sequential_srm_test(
    counts: npt.ArrayLike,
    weights: npt.ArrayLike,
    threshold: float = 0.001,
    *,
    concentration: float = 10000.0,
    previous_p_value: float = 1.0,
) -> SequentialSRMResult:
    """Are the units per variant what the weights promise, tested at every look?

    Lindon & Malek (2022), "Anytime-valid inference for multinomial count data", eq. 3:
    BF = B(alpha0 + x) / B(alpha0) / prod(p0^x) with prior Dirichlet(alpha0 = concentration p0),
    p0 = weights / sum(weights), B the multivariate beta. Under H0 the BF is a nonnegative
    martingale, so P(ever BF >= 1/threshold) <= threshold (Ville's inequality). A large
    `concentration` puts the prior near p0 and detects small mismatches (a 52/48 split) at the
    cost of slower detection of gross ones. Counts must be cumulative (units, not requests);
    pass the last p-value back as `previous_p_value` to keep the running minimum.
    A variant with weight 0 that received units is a mismatch (p = 0).
    """
    x, w = counts_and_weights(counts, weights)
    if not np.all(x == np.floor(x)):
        raise ValueError(f"counts must be whole numbers (units), got {x.tolist()}")
    level = probability("threshold", threshold)
    conc = positive("concentration", concentration)
    prev = probability("previous_p_value", previous_p_value, open_interval=False)
    p0 = w / w.sum()
    expected = tuple(float(e) for e in x.sum() * p0)
    live = p0 > 0.0
    if (x[~live] > 0).any():
        log_bf = math.inf
    else:
        xs, a0 = x[live], conc * p0[live]
        log_bf = float(
            special.gammaln(a0.sum())
            - special.gammaln(a0.sum() + xs.sum())
            + (special.gammaln(a0 + xs) - special.gammaln(a0)).sum()
            - (xs * np.log(p0[live])).sum()
        )
    p = min(prev, math.exp(min(0.0, -log_bf)))
    return SequentialSRMResult(
        log_bayes_factor=log_bf,
        p_value=p,
        expected=expected,
        mismatch=p < level,
        threshold=level,
        concentration=conc,
    )
