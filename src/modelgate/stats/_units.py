"""Mergeable sufficient statistics of one arm over units, for a per-unit pair (x, y).

Package-private: import from `modelgate.stats`. The unit of analysis is the unit of
randomization (Kohavi et al., "Trustworthy Online Controlled Experiments", ch. 22): each unit
contributes one x (its metric: the sum of its values, or 1 if any value was 1 for a
proportion) and one y (the denominator of a ratio metric, or the pre-exposure covariate for
CUPED). Every per-unit test (mean, proportion, ratio, CUPED) needs only these moments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ._common import Result, at_least, count, real, vector

# Slack allowed on Cauchy-Schwarz, c_xy^2 <= m2_x m2_y, for rounding in merges and SQL sums.
_CS_SLACK = 1e-9


@dataclass(frozen=True)
class UnitStats(Result):
    """Count, means, M2s and co-moment of (x, y) over the units of one arm, mergeable.

    `m2_x` = sum((x - mean_x)^2), `m2_y` likewise, `c_xy` = sum((x - mean_x)(y - mean_y)),
    kept centred as `SummaryStats` keeps M2 (Welford 1962), and merged by Chan, Golub &
    LeVeque (1979) extended to the co-moment (Pebay 2008, eq. 3.8). `nonzero_x` counts the
    units with x != 0: for a 0/1 "any value 1" metric, the converted units. With no y
    (`from_samples(x)`), y is 0 for every unit and its moments are 0.
    Frozen: `merge` returns a new value, so a snapshot can cross threads.
    """

    count: int = 0
    mean_x: float = 0.0
    mean_y: float = 0.0
    m2_x: float = 0.0
    m2_y: float = 0.0
    c_xy: float = 0.0
    nonzero_x: int = 0

    def __post_init__(self) -> None:
        n = count("count", self.count)
        real("mean_x", self.mean_x)
        real("mean_y", self.mean_y)
        m2x, m2y = at_least("m2_x", self.m2_x, 0.0), at_least("m2_y", self.m2_y, 0.0)
        c = real("c_xy", self.c_xy)
        if not 0 <= count("nonzero_x", self.nonzero_x) <= n:
            raise ValueError(f"nonzero_x must be in [0, count={n}], got {self.nonzero_x}")
        if n == 0 and any(
            v != 0.0 for v in (self.mean_x, self.mean_y, self.m2_x, self.m2_y, self.c_xy)
        ):
            raise ValueError("an empty UnitStats must have all means and moments 0")
        if abs(c) > math.sqrt(m2x) * math.sqrt(m2y) * (1.0 + _CS_SLACK) + 1e-300:
            raise ValueError(
                f"c_xy must satisfy c_xy^2 <= m2_x * m2_y (Cauchy-Schwarz), got c_xy={c:g}, "
                f"m2_x={m2x:g}, m2_y={m2y:g}"
            )

    @classmethod
    def from_samples(cls, x: npt.ArrayLike, y: npt.ArrayLike | None = None) -> UnitStats:
        """From one value of x (and y) per unit, by two passes: exact to ~1 ulp."""
        xs = vector("x", x)
        ys = np.zeros_like(xs) if y is None else vector("y", y)
        if ys.size != xs.size:
            raise ValueError(f"x and y must have one value per unit: {xs.size} x, {ys.size} y")
        if xs.size == 0:
            return cls()
        mx, my = float(xs.mean()), float(ys.mean())
        dx, dy = xs - mx, ys - my
        m2x, m2y = float(np.dot(dx, dx)), float(np.dot(dy, dy))
        return cls(
            count=int(xs.size),
            mean_x=mx,
            mean_y=my,
            m2_x=m2x,
            m2_y=m2y,
            c_xy=_clamp(float(np.dot(dx, dy)), m2x, m2y),
            nonzero_x=int(np.count_nonzero(xs)),
        )

    @classmethod
    def from_moments(
        cls,
        count: int,
        mean_x: float,
        mean_y: float = 0.0,
        m2_x: float = 0.0,
        m2_y: float = 0.0,
        c_xy: float = 0.0,
        *,
        nonzero_x: int = 0,
    ) -> UnitStats:
        """From centred moments, e.g. SQL's avg, var_samp and covar_samp over units:
        m2 = var_samp * (count - 1), c_xy = covar_samp * (count - 1). SQL gives NULL
        variances for one unit; pass 0 then. `c_xy` a few ulps past Cauchy-Schwarz from the
        engine's rounding is clamped to the bound."""
        n = _count("count", count)
        if n == 0:
            return cls(nonzero_x=_count("nonzero_x", nonzero_x))
        m2x, m2y = at_least("m2_x", m2_x, 0.0), at_least("m2_y", m2_y, 0.0)
        return cls(
            count=n,
            mean_x=real("mean_x", mean_x),
            mean_y=real("mean_y", mean_y),
            m2_x=m2x,
            m2_y=m2y,
            c_xy=_clamp(real("c_xy", c_xy), m2x, m2y, strict=True),
            nonzero_x=nonzero_x,
        )

    @classmethod
    def from_sums(
        cls,
        count: int,
        sum_x: float,
        sum_x2: float,
        sum_y: float = 0.0,
        sum_y2: float = 0.0,
        sum_xy: float = 0.0,
        *,
        nonzero_x: int = 0,
    ) -> UnitStats:
        """From raw power sums over units (what any SQL engine can sum, and merge by adding).

        Precision: M2 = sum_x2 - sum_x^2 / n cancels, losing about log10(mean^2 / variance)
        of the 16 digits (see `SummaryStats`); prefer `from_moments` when the engine has
        var_samp/covar_samp. A slightly negative M2 from that rounding is clamped to 0, and
        the co-moment to the Cauchy-Schwarz bound."""
        n = _count("count", count)
        sx, sy = real("sum_x", sum_x), real("sum_y", sum_y)
        sxx, syy = at_least("sum_x2", sum_x2, 0.0), at_least("sum_y2", sum_y2, 0.0)
        sxy = real("sum_xy", sum_xy)
        if n == 0:
            return cls(nonzero_x=_count("nonzero_x", nonzero_x))
        mx, my = sx / n, sy / n
        m2x, m2y = max(0.0, sxx - sx * mx), max(0.0, syy - sy * my)
        return cls(
            count=n,
            mean_x=mx,
            mean_y=my,
            m2_x=m2x,
            m2_y=m2y,
            c_xy=_clamp(sxy - sx * my, m2x, m2y),
            nonzero_x=nonzero_x,
        )

    @property
    def var_x(self) -> float:
        """Sample variance of x over units, M2 / (n - 1); NaN below 2 units."""
        return self.m2_x / (self.count - 1) if self.count >= 2 else math.nan

    @property
    def var_y(self) -> float:
        return self.m2_y / (self.count - 1) if self.count >= 2 else math.nan

    @property
    def cov_xy(self) -> float:
        """Sample covariance of x and y over units, c_xy / (n - 1); NaN below 2 units."""
        return self.c_xy / (self.count - 1) if self.count >= 2 else math.nan

    @property
    def sum_x(self) -> float:
        return self.count * self.mean_x

    @property
    def sum_y(self) -> float:
        return self.count * self.mean_y

    @property
    def corr(self) -> float:
        """Pearson correlation of x and y over units; NaN when either is constant."""
        den = math.sqrt(self.m2_x) * math.sqrt(self.m2_y)
        return max(-1.0, min(1.0, self.c_xy / den)) if den > 0.0 else math.nan

    def merge(self, other: UnitStats) -> UnitStats:
        """Both sets of units (disjoint): Chan et al.'s pairwise update, with d = mean_b - mean_a,
        M2 = M2_a + M2_b + d^2 n_a n_b / n and C = C_a + C_b + d_x d_y n_a n_b / n.
        Associative and commutative up to rounding; a unit split across two parts would be
        counted twice, so merge per-unit aggregates only after grouping by unit."""
        if not isinstance(other, UnitStats):
            raise TypeError(f"other must be a UnitStats, got {type(other).__name__}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        dx, dy = other.mean_x - self.mean_x, other.mean_y - self.mean_y
        w = self.count * (other.count / n)
        m2x = self.m2_x + other.m2_x + dx * dx * w
        m2y = self.m2_y + other.m2_y + dy * dy * w
        return UnitStats(
            count=n,
            mean_x=self.mean_x + dx * (other.count / n),
            mean_y=self.mean_y + dy * (other.count / n),
            m2_x=m2x,
            m2_y=m2y,
            c_xy=_clamp(self.c_xy + other.c_xy + dx * dy * w, m2x, m2y),
            nonzero_x=self.nonzero_x + other.nonzero_x,
        )


def _count(name: str, value: object) -> int:
    """`count` under another name: the constructors' `count` argument shadows it."""
    return count(name, value)


def _clamp(c: float, m2x: float, m2y: float, *, strict: bool = False) -> float:
    """The co-moment within Cauchy-Schwarz: rounding may put it a few ulps past the bound.
    With `strict`, more than the slack past it is an error (a caller's mistake)."""
    sx, sy = math.sqrt(m2x), math.sqrt(m2y)
    bound = sx * sy
    # Squares underflow where products do not: an m2 read as 0 may stand for up to ~1e-308,
    # a spread of ~1e-154, so a co-moment that small beside it is rounding, not a mistake.
    slack = bound * 1e-6 + (sx + sy) * 1e-150 + 1e-300
    if strict and abs(c) > bound + slack:
        raise ValueError(
            f"c_xy must satisfy c_xy^2 <= m2_x * m2_y (Cauchy-Schwarz), got c_xy={c:g}, "
            f"m2_x={m2x:g}, m2_y={m2y:g}"
        )
    return max(-bound, min(bound, c))
