"""Statistical and algebraic properties of assignment, and the golden vectors of the contract.

Inputs are fixed ids, so every p-value here is deterministic: a failure means a formula changed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats  # type: ignore[import-untyped]

GOLDEN = Path(__file__).parent / "data" / "golden_buckets.json"
N = 100_000
P_MIN = 1e-4
FAST = settings(deadline=None, max_examples=300)

# Weights as configs write them: ints or floats, a few variants, zeros allowed.
WEIGHT = st.one_of(st.integers(0, 10_000), st.floats(0, 1e6, allow_nan=False, allow_infinity=False))
WEIGHTS = st.lists(WEIGHT, min_size=1, max_size=8).filter(lambda ws: sum(ws) > 0)


@pytest.fixture(scope="module")
def ids() -> list[str]:
    return [f"user-{i}" for i in range(N)]


def ref_boundaries(weights: Sequence[float]) -> list[int]:
    total = 0.0
    sums = []
    for w in weights:
        total += float(w)
        sums.append(total)
    return [math.floor(10000 * s / total + 0.5) for s in sums]


def shares(counts: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    result: npt.NDArray[np.float64] = counts / counts.sum()
    return result


# --- buckets ---


def test_buckets_are_uniform(core_module: ModuleType, ids: list[str]) -> None:
    buckets = core_module.bucket_many("uniformity", ids)
    observed = np.bincount(buckets // 100, minlength=100)  # 100 groups of 100 buckets
    assert observed.sum() == N
    assert stats.chisquare(observed).pvalue > P_MIN


def test_salts_reshuffle_units(core_module: ModuleType, ids: list[str]) -> None:
    # Two salts give independent buckets: a new salt really re-randomizes.
    a = core_module.bucket_many("ranker", ids) // 1000
    b = core_module.bucket_many("ranker-2", ids) // 1000
    table = np.zeros((10, 10), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    assert stats.chi2_contingency(table).pvalue > P_MIN


# --- splits ---


@pytest.mark.parametrize(
    "weights",
    [[50, 50], [90, 10], [99, 1], [1, 1, 1], [0.1, 0.2, 0.7], [33.3, 33.3, 33.4], [0, 5, 0, 5]],
)
def test_split_matches_the_weights(
    core_module: ModuleType, ids: list[str], weights: list[float]
) -> None:
    table = core_module.VariantTable(weights)
    counts = np.bincount(table.assign_many("split", ids), minlength=len(weights))
    expected = np.diff([0, *table.boundaries]) / 10000
    # Within 5 binomial standard deviations of the share the boundaries promise.
    tolerance = 5 * np.sqrt(expected * (1 - expected) / N)
    assert np.all(np.abs(shares(counts) - expected) <= tolerance), (counts, expected)
    assert np.all(counts[np.asarray(weights) == 0] == 0)


@pytest.mark.parametrize(
    "weights",
    [
        [1, 1, 1],
        [0.1, 0.2, 0.7],
        [33.3, 33.3, 33.4],
        [0, 5, 0, 5],
        [1e-300, 1],
        [1, 1e-300],
        [3] * 7,
        [2**53 + 1, 1],
        [0.3, 0.3, 0.3, 0.1],
        [1] * 10_001,
        [5e-5, 5e-5, 1],
    ],
)
def test_boundaries_formula_with_tricky_weights(
    core_module: ModuleType, weights: list[float]
) -> None:
    bounds = core_module.VariantTable(weights).boundaries
    assert list(bounds) == ref_boundaries(weights)
    assert bounds[-1] == 10000
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))


@FAST
@given(weights=WEIGHTS)
def test_boundaries_formula(core_module: ModuleType, weights: list[float]) -> None:
    table = core_module.VariantTable(weights)
    bounds = list(table.boundaries)
    assert bounds == ref_boundaries(weights)
    assert bounds[-1] == 10000
    assert bounds == sorted(bounds)
    # choose() lands every bucket in its range, and a zero weight gets an empty range.
    for i, (lo, hi) in enumerate(zip([0, *bounds[:-1]], bounds, strict=True)):
        if weights[i] == 0:
            assert lo == hi
        if lo < hi:
            assert table.choose(lo) == table.choose(hi - 1) == i


# --- ramping ---


@FAST
@given(weights=st.lists(WEIGHT, min_size=1, max_size=6), last=st.lists(WEIGHT, min_size=2))
def test_ramping_the_last_variant_is_monotone(
    core_module: ModuleType, weights: list[float], last: list[float]
) -> None:
    # Only the last weight changes. Its range is [C_(n-1), 10000): when the weight grows,
    # C_(n-1) never rises (no unit leaves); when it shrinks, it never falls (none joins).
    steps = [w for w in last if sum(weights) + w > 0]
    starts = [core_module.VariantTable([*weights, w]).boundaries[-2] for w in steps]
    pairs = list(zip(steps, starts, strict=True))
    for (w1, c1), (w2, c2) in zip(pairs, pairs[1:], strict=False):
        if w2 >= w1:
            assert c2 <= c1
        else:
            assert c2 >= c1


@pytest.mark.parametrize(
    "ramp",
    [
        [[90, w] for w in (0, 1, 5, 10, 25, 50, 90, 1000)],
        [[40, 50, w] for w in (0, 0.5, 3, 10, 33.3, 100)],
        [[100 - s, s] for s in (0, 1, 10, 50, 100)],  # canary steps in percent
    ],
)
def test_ramping_never_moves_a_unit_out_of_the_growing_arm(
    core_module: ModuleType, ids: list[str], ramp: list[list[float]]
) -> None:
    arms = [core_module.VariantTable(w).assign_many("canary", ids) == len(w) - 1 for w in ramp]
    for before, after in zip(arms, arms[1:], strict=False):
        assert not np.any(before & ~after)  # growing: nobody leaves the last arm
    for before, after in zip(arms[::-1], arms[-2::-1], strict=False):
        assert not np.any(~before & after)  # shrinking (read backwards): nobody joins it


# --- layers ---


def test_experiments_in_a_layer_are_disjoint(core_module: ModuleType, ids: list[str]) -> None:
    layer = core_module.Layer("homepage", [("hero", 0.3), ("search", 0.5), ("footer", 0.1)])
    index = layer.experiment_for_many(ids)
    members = [set(np.flatnonzero(index == j).tolist()) for j in range(3)]
    for j in range(3):
        for k in range(j + 1, 3):
            assert members[j].isdisjoint(members[k])
    # Each slice gets its share; 10% of units are in no experiment of this layer.
    counts = np.array([len(m) for m in members] + [int(np.sum(index == -1))])
    expected = np.array([0.3, 0.5, 0.1, 0.1])
    assert np.all(np.abs(shares(counts) - expected) <= 5 * np.sqrt(expected * (1 - expected) / N))
    # Inside its slice an experiment still splits by its own salt, evenly.
    hero = [ids[i] for i in sorted(members[0])]
    arms = np.bincount(core_module.VariantTable([1, 1]).assign_many("hero", hero), minlength=2)
    assert stats.chisquare(arms).pvalue > P_MIN


def test_layers_are_independent(core_module: ModuleType, ids: list[str]) -> None:
    a = core_module.Layer("layer-a", [("a1", 0.25), ("a2", 0.25), ("a3", 0.25)])
    b = core_module.Layer("layer-b", [("b1", 0.4), ("b2", 0.4)])
    # -1 ("none") is a category of its own: shift the indices to 0..m.
    ia = a.experiment_for_many(ids) + 1
    ib = b.experiment_for_many(ids) + 1
    table = np.zeros((4, 3), dtype=np.int64)
    np.add.at(table, (ia, ib), 1)
    assert table.min() > 0
    assert stats.chi2_contingency(table).pvalue > P_MIN


def test_variant_does_not_depend_on_the_layer_slice(
    core_module: ModuleType, ids: list[str]
) -> None:
    layer = core_module.Layer("layer-c", [("x", 0.5), ("y", 0.5)])
    variants = core_module.VariantTable([1, 1, 1]).assign_many("x", ids)
    table = np.zeros((2, 3), dtype=np.int64)
    np.add.at(table, (layer.experiment_for_many(ids), variants), 1)
    assert stats.chi2_contingency(table).pvalue > P_MIN


# --- golden vectors (generated once with the xxhash package; never regenerate) ---


def _golden() -> dict[str, list[dict[str, object]]]:
    doc: dict[str, list[dict[str, object]]] = json.loads(GOLDEN.read_text(encoding="utf-8"))
    return doc


def test_golden_buckets(core_module: ModuleType) -> None:
    vectors = _golden()["buckets"]
    assert len(vectors) >= 200
    for v in vectors:
        assert core_module.bucket(v["salt"], v["unit"]) == v["bucket"], v
    for salt in sorted({str(v["salt"]) for v in vectors}):
        group = [(str(v["unit"]), v["bucket"]) for v in vectors if v["salt"] == salt]
        units = [u for u, _ in group]
        assert core_module.bucket_many(salt, units).tolist() == [b for _, b in group]
        # A numpy str array cannot hold a trailing NUL, so those units stay out of it.
        kept = [(u, b) for u, b in group if not u.endswith("\x00")]
        array = np.array([u for u, _ in kept], dtype=str)
        assert core_module.bucket_many(salt, array).tolist() == [b for _, b in kept]


def test_golden_xxh64(core_module: ModuleType) -> None:
    vectors = _golden()["xxh64"]
    assert vectors
    for v in vectors:
        assert core_module.xxh64(bytes.fromhex(str(v["data_hex"])), v["seed"]) == v["digest"], v
