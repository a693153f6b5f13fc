"""Mergeable sufficient statistics of one metric in one arm: count, mean, M2, count of non-zeros.

Package-private: import from `modelgate.stats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ._common import Result, at_least, count, real, vector


@dataclass(frozen=True)
class SummaryStats(Result):
    """What a Welch or proportion test needs of one arm, kept as it streams in and mergeable.

    Stored as count, running mean `m1` and M2 = sum((x - mean)^2) (Welford 1962; merged by
    Chan, Golub & LeVeque 1979), not as sum and sum of squares: the textbook
    (sum_sq - sum^2 / n) / (n - 1) loses about log10(mean^2 / variance) of the 16 digits
    (a latency of 1e9 ns with an sd of 1e3 keeps 4), and can even go negative.
    `sum` and `sum_sq` are still offered, and `from_sums` takes them from SQL-style
    aggregates, with that loss. `nonzero` counts the observations != 0: for a 0/1 metric the
    successes, so `proportion_test(a.nonzero, a.count, b.nonzero, b.count)` needs no rounding.
    Frozen: `add` and `merge` return a new value, so a snapshot can be handed to another thread.
    """

    count: int = 0
    m1: float = 0.0
    m2: float = 0.0
    nonzero: int = 0

    def __post_init__(self) -> None:
        # Direct construction, e.g. SummaryStats(**as_dict()) from another worker, is checked
        # as strictly as from_moments.
        n = count("count", self.count)
        at_least("m2", self.m2, 0.0)
        real("m1", self.m1)
        if not 0 <= count("nonzero", self.nonzero) <= n:
            raise ValueError(f"nonzero must be in [0, count={n}], got {self.nonzero}")
        if n == 0 and (self.m1 != 0.0 or self.m2 != 0.0):
            raise ValueError("an empty SummaryStats must have m1 = m2 = 0")

    @classmethod
    def from_samples(cls, values: npt.ArrayLike) -> SummaryStats:
        """From raw observations, by two passes (mean, then squared deviations): exact to ~1 ulp."""
        x = vector("values", values)
        if x.size == 0:
            return cls()
        mean = float(x.mean())
        return cls(
            count=int(x.size),
            m1=mean,
            m2=float(np.square(x - mean).sum()),
            nonzero=int(np.count_nonzero(x)),
        )

    @classmethod
    def from_moments(cls, n: int, mean: float, m2: float, *, nonzero: int = 0) -> SummaryStats:
        """From a count, a mean and M2 = (n - 1) * sample variance, e.g. another Welford."""
        size = count("n", n)
        if size == 0:
            return cls(nonzero=count("nonzero", nonzero))
        return cls(count=size, m1=real("mean", mean), m2=at_least("m2", m2, 0.0), nonzero=nonzero)

    @classmethod
    def from_sums(cls, n: int, total: float, total_sq: float, *, nonzero: int = 0) -> SummaryStats:
        """From count, sum and sum of squares (SQL aggregates). Loses precision when the mean
        is large against the sd (see the class docstring); a slightly negative M2 from that
        rounding is clamped to 0."""
        size = count("n", n)
        s, ss = real("total", total), at_least("total_sq", total_sq, 0.0)
        if size == 0:
            return cls(nonzero=count("nonzero", nonzero))
        mean = s / size
        return cls(count=size, m1=mean, m2=max(0.0, ss - s * mean), nonzero=nonzero)

    @property
    def mean(self) -> float:
        """The sample mean; NaN when empty."""
        return self.m1 if self.count else math.nan

    @property
    def variance(self) -> float:
        """The sample variance M2 / (n - 1), as `welch_test` takes it; NaN below 2 observations."""
        return self.m2 / (self.count - 1) if self.count >= 2 else math.nan

    @property
    def sum(self) -> float:
        return self.count * self.m1

    @property
    def sum_sq(self) -> float:
        return self.m2 + self.count * self.m1 * self.m1

    def add(self, value: float) -> SummaryStats:
        """These statistics with one more observation (Welford's update)."""
        x = real("value", value)
        return self.merge(SummaryStats(count=1, m1=x, nonzero=int(x != 0.0)))

    def merge(self, other: SummaryStats) -> SummaryStats:
        """The statistics of both sets of observations (Chan et al.'s pairwise combination):
        M2 = M2_a + M2_b + delta^2 n_a n_b / n, delta = mean_b - mean_a. Exact for counts,
        associative and commutative up to rounding, so workers can merge in any order."""
        if not isinstance(other, SummaryStats):
            raise TypeError(f"other must be a SummaryStats, got {type(other).__name__}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.m1 - self.m1
        return SummaryStats(
            count=n,
            m1=self.m1 + delta * (other.count / n),
            m2=self.m2 + other.m2 + delta * delta * (self.count * (other.count / n)),
            nonzero=self.nonzero + other.nonzero,
        )
