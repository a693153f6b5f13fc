"""Benchmarks of the assignment core: compiled and pure-Python twins side by side per group.

Run: python -m pytest benchmarks/bench_core.py --benchmark-enable -p no:cacheprovider
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

IDS = 1_000_000
SALT = "ranker"
WEIGHTS = [90, 10]
# One call takes ~0.1-0.3 s on the twin: a fixed, small number of rounds keeps the suite short.
BATCH_ROUNDS = 7
# A single call takes well under a microsecond: time 1000 per round so the timer's own cost
# (reading the clock once per round) does not dominate. The loop that pytest-benchmark runs
# the calls in adds ~25 ns per call to both twins alike.
SINGLE_ITERATIONS = 1000
SINGLE_ROUNDS = 300


@pytest.fixture(scope="module")
def ids() -> list[str]:
    """User ids as a gateway sees them: "user-0" .. "user-999999" (6-11 ASCII chars)."""
    return [f"user-{i}" for i in range(IDS)]


@pytest.fixture(scope="module")
def ids_array(ids: list[str]) -> npt.NDArray[np.str_]:
    return np.array(ids)  # dtype '<U11'


def _single(benchmark: Any, fn: Any, group: str) -> Any:
    benchmark.group = group
    return benchmark.pedantic(
        fn,
        args=(SALT, "user-123456"),
        rounds=SINGLE_ROUNDS,
        iterations=SINGLE_ITERATIONS,
        warmup_rounds=10,
    )


def test_assign(benchmark: Any, core_module: ModuleType) -> None:
    table = core_module.VariantTable(WEIGHTS)
    assert _single(benchmark, table.assign, "assign: one unit (the per-request path)") in (0, 1)


def test_bucket(benchmark: Any, core_module: ModuleType) -> None:
    assert 0 <= _single(benchmark, core_module.bucket, "bucket: one unit") < 10000


def _batch(benchmark: Any, core_module: ModuleType, units: Any, group: str) -> None:
    benchmark.group = group
    table = core_module.VariantTable(WEIGHTS)
    out = benchmark.pedantic(
        table.assign_many, args=(SALT, units), rounds=BATCH_ROUNDS, iterations=1, warmup_rounds=1
    )
    assert out.shape == (IDS,)
    benchmark.extra_info["million_assignments_per_s"] = round(
        IDS / benchmark.stats.stats.min / 1e6, 1
    )


def test_assign_many_list(benchmark: Any, core_module: ModuleType, ids: list[str]) -> None:
    _batch(benchmark, core_module, ids, "assign_many: 1,000,000 ids, list of str")


def test_assign_many_numpy(
    benchmark: Any, core_module: ModuleType, ids_array: npt.NDArray[np.str_]
) -> None:
    _batch(benchmark, core_module, ids_array, "assign_many: 1,000,000 ids, numpy '<U11' array")
