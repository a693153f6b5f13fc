"""Shared pytest options and fixtures (one section per concern, each marked by a comment)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
from hypothesis import settings

# --- hypothesis ---
# Property tests explore the same examples on every run (derandomize) and have no per-example
# deadline: a suite that passes must pass again on a loaded 2-core CI machine. Exploring new
# examples is a local choice: HYPOTHESIS_PROFILE=explore.
settings.register_profile("repeatable", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# --- core twins ---
# Every core test runs on the compiled core and on its pure-Python twin through `core_module`.
# The compiled side is marked c_extension. A missing build FAILS those tests; leaving them out
# takes an explicit --no-c-extensions or MODELGATE_NO_EXTENSIONS=1 (the pure-Python CI run).


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-c-extensions",
        action="store_true",
        default=False,
        help="skip tests of the compiled core (modelgate._core), on purpose",
    )


def no_c_extensions(config: pytest.Config) -> bool:
    """Whether this run leaves out the compiled core (flag or MODELGATE_NO_EXTENSIONS)."""
    return bool(config.getoption("--no-c-extensions")) or bool(
        os.environ.get("MODELGATE_NO_EXTENSIONS")
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not no_c_extensions(config):
        return
    skip = pytest.mark.skip(
        reason="compiled core left out (--no-c-extensions or MODELGATE_NO_EXTENSIONS)"
    )
    for item in items:
        if "c_extension" in item.keywords:
            item.add_marker(skip)


def import_compiled_core() -> ModuleType:
    """modelgate._core, or a test failure (never a skip) saying how to build it."""
    try:
        return importlib.import_module("modelgate._core")
    except ImportError as exc:
        pytest.fail(
            f"the compiled core is missing ({exc}): build it with "
            "`pip install -e . --no-build-isolation`, or leave it out on purpose with "
            "--no-c-extensions / MODELGATE_NO_EXTENSIONS=1"
        )


# Session scope: hypothesis tests may use it (function-scoped fixtures are reset per example).
@pytest.fixture(
    scope="session",
    params=[pytest.param("cython", marks=pytest.mark.c_extension), "python"],
)
def core_module(request: pytest.FixtureRequest) -> ModuleType:
    """modelgate._core (the compiled twin) or modelgate._core_py (the pure-Python twin)."""
    if request.param == "cython":
        return import_compiled_core()
    return importlib.import_module("modelgate._core_py")


@pytest.fixture(scope="session")
def compiled_core() -> ModuleType:
    """modelgate._core alone, for tests that compare the twins (mark them c_extension)."""
    return import_compiled_core()


@pytest.fixture(scope="session")
def python_core() -> ModuleType:
    """modelgate._core_py alone."""
    return importlib.import_module("modelgate._core_py")
