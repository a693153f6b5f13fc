"""UnitStats (issue 13): the per-unit sufficient statistics, their constructors and merge."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelgate.stats import UnitStats

FAST = settings(deadline=None, max_examples=150)
PAIRS = st.lists(st.tuples(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4)), max_size=25)


def _close(a: UnitStats, b: UnitStats, rel: float = 1e-9) -> None:
    assert a.count == b.count and a.nonzero_x == b.nonzero_x
    scale_x = math.sqrt(max(a.m2_x, b.m2_x, 1e-300) / max(a.count, 1))
    scale_y = math.sqrt(max(a.m2_y, b.m2_y, 1e-300) / max(a.count, 1))
    tol_x = rel * (abs(a.mean_x) + scale_x) + 1e-9
    tol_y = rel * (abs(a.mean_y) + scale_y) + 1e-9
    assert a.mean_x == pytest.approx(b.mean_x, abs=tol_x)
    assert a.mean_y == pytest.approx(b.mean_y, abs=tol_y)
    n = max(a.count, 1)
    assert a.m2_x == pytest.approx(b.m2_x, abs=n * tol_x * (tol_x + 2 * scale_x) * 10)
    assert a.m2_y == pytest.approx(b.m2_y, abs=n * tol_y * (tol_y + 2 * scale_y) * 10)
    assert a.c_xy == pytest.approx(
        b.c_xy, abs=n * 10 * (tol_x * (tol_y + scale_y) + tol_y * (tol_x + scale_x))
    )


def _split(pairs: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    arr = np.array(pairs, dtype=float).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def test_from_samples_matches_numpy() -> None:
    rng = np.random.default_rng(7)
    x = rng.lognormal(1.0, 1.0, 500)
    y = 0.3 * x + rng.normal(0, 1, 500)
    s = UnitStats.from_samples(x, y)
    assert s.count == 500 and s.nonzero_x == 500
    assert s.mean_x == pytest.approx(x.mean(), rel=1e-14)
    assert s.var_x == pytest.approx(x.var(ddof=1), rel=1e-12)
    assert s.var_y == pytest.approx(y.var(ddof=1), rel=1e-12)
    assert s.cov_xy == pytest.approx(np.cov(x, y)[0, 1], rel=1e-12)
    assert s.corr == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    assert s.sum_x == pytest.approx(x.sum(), rel=1e-13)
    assert s.sum_y == pytest.approx(y.sum(), rel=1e-12)


def test_without_y_the_y_moments_are_zero() -> None:
    s = UnitStats.from_samples([0.0, 1.0, 1.0, 0.0, 1.0])
    assert (s.mean_y, s.m2_y, s.c_xy, s.nonzero_x) == (0.0, 0.0, 0.0, 3)
    assert math.isnan(s.corr)
    assert UnitStats.from_samples([]) == UnitStats()
    assert math.isnan(UnitStats.from_samples([2.0]).var_x)


@FAST
@given(PAIRS, PAIRS, PAIRS)
def test_merge_is_associative_and_commutative(
    p: list[tuple[float, float]], q: list[tuple[float, float]], r: list[tuple[float, float]]
) -> None:
    a, b, c = (UnitStats.from_samples(*_split(v)) for v in (p, q, r))
    _close(a.merge(b).merge(c), a.merge(b.merge(c)))
    _close(a.merge(b), b.merge(a))
    _close(a.merge(b).merge(c), UnitStats.from_samples(*_split(p + q + r)))


@FAST
@given(PAIRS)
def test_constructors_agree(p: list[tuple[float, float]]) -> None:
    x, y = _split(p)
    exact = UnitStats.from_samples(x, y)
    n, nz = x.size, int(np.count_nonzero(x))
    sums = UnitStats.from_sums(
        n, x.sum(), (x * x).sum(), y.sum(), (y * y).sum(), (x * y).sum(), nonzero_x=nz
    )
    # The power sums cancel: compare at the precision they keep (values up to 1e4).
    assert sums.count == exact.count and sums.nonzero_x == exact.nonzero_x
    assert sums.mean_x == pytest.approx(exact.mean_x, abs=1e-9)
    assert sums.m2_x == pytest.approx(exact.m2_x, abs=1e-6 * max(1.0, (x * x).sum()))
    assert sums.c_xy == pytest.approx(exact.c_xy, abs=1e-6 * max(1.0, np.abs(x * y).sum()))
    if n >= 2:
        moments = UnitStats.from_moments(
            n,
            x.mean(),
            y.mean(),
            x.var(ddof=1) * (n - 1),
            y.var(ddof=1) * (n - 1),
            np.cov(x, y)[0, 1] * (n - 1),
            nonzero_x=nz,
        )
        _close(moments, exact, rel=1e-9)


def test_from_sums_keeps_what_it_can_of_large_means() -> None:
    # A latency of 1e9 ns with an sd of ~1e3: the power sums keep about 4 digits of M2.
    rng = np.random.default_rng(3)
    x = 1e9 + rng.normal(0, 1e3, 1000)
    exact = UnitStats.from_samples(x)
    sums = UnitStats.from_sums(x.size, x.sum(), (x * x).sum())
    assert sums.m2_x == pytest.approx(exact.m2_x, rel=0.05)


def test_validation_names_the_argument() -> None:
    with pytest.raises(ValueError, match="nonzero_x"):
        UnitStats(count=2, nonzero_x=3)
    with pytest.raises(ValueError, match="m2_x"):
        UnitStats(count=2, m2_x=-1.0)
    with pytest.raises(ValueError, match="empty"):
        UnitStats(count=0, mean_x=1.0)
    with pytest.raises(ValueError, match="Cauchy-Schwarz"):
        UnitStats(count=3, m2_x=1.0, m2_y=1.0, c_xy=2.0)
    with pytest.raises(ValueError, match="Cauchy-Schwarz"):
        UnitStats.from_moments(3, 0.0, 0.0, 1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="finite"):
        UnitStats.from_moments(3, math.nan)
    with pytest.raises(TypeError, match="count"):
        UnitStats.from_sums("3", 1.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one value per unit"):
        UnitStats.from_samples([1.0, 2.0], [1.0])
    with pytest.raises(TypeError, match="UnitStats"):
        UnitStats().merge(object())  # type: ignore[arg-type]
    # Rounding a hair past the bound, as SQL's covar_samp can, is clamped, not refused.
    s = UnitStats.from_moments(3, 0.0, 0.0, 1.0, 1.0, 1.0 + 1e-12)
    assert s.c_xy == 1.0
    assert UnitStats(**s.as_dict()) == s
