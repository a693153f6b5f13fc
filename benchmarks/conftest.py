"""Fixtures of the pytest-benchmark suites (one section per concern, each marked by a comment)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import pytest

# --- core twins ---
# Both twins run in one table. The compiled one is marked c_extension; a missing build fails
# unless MODELGATE_NO_EXTENSIONS is set (then only the pure-Python twin is measured).


@pytest.fixture(
    scope="session",
    params=[pytest.param("cython", marks=pytest.mark.c_extension), "python"],
)
def core_module(request: pytest.FixtureRequest) -> ModuleType:
    """modelgate._core (the compiled twin) or modelgate._core_py (the pure-Python twin)."""
    if request.param == "python":
        return importlib.import_module("modelgate._core_py")
    if os.environ.get("MODELGATE_NO_EXTENSIONS"):
        pytest.skip("MODELGATE_NO_EXTENSIONS is set: the compiled core is left out")
    try:
        return importlib.import_module("modelgate._core")
    except ImportError as exc:
        pytest.fail(f"the compiled core is missing ({exc}): pip install -e . --no-build-isolation")


# --- one CPU ---
# Suites that report per-core figures use it: `pytestmark = pytest.mark.usefixtures("one_cpu")`.


@pytest.fixture
def one_cpu() -> Iterator[None]:
    """Every thread of the process on one CPU: the figures are per core, not per machine."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    yield
    os.sched_setaffinity(0, before)
