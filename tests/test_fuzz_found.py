"""Inputs the fuzzers found (tests/fuzz/found/<target>-<what it found>), replayed on every run
through the harness of the target that found them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from .fuzz import config_loading, feedback, front_door

FOUND_DIR = Path(__file__).resolve().parent / "fuzz" / "found"
# Each harness raises on a broken property; what it returns says the input went through.
HARNESSES: dict[str, Callable[[bytes], bool]] = {
    "front_door": lambda data: front_door.check_input(data).startswith(b"HTTP/1.1 "),
    "feedback": lambda data: feedback.check_input(data).startswith(b"HTTP/1.1 "),
    "config": lambda data: config_loading.check_input(data) in ("accepted", "refused"),
}


def _target(path: Path) -> str:
    return next((name for name in HARNESSES if path.name.startswith(name + "-")), "")


def test_every_found_input_names_a_known_target() -> None:
    found = sorted(FOUND_DIR.iterdir())
    assert found, "the front door's finding at least is kept"
    assert [p.name for p in found if not _target(p)] == []


@pytest.mark.parametrize("found", sorted(FOUND_DIR.iterdir()), ids=lambda path: path.name)
def test_inputs_the_fuzzers_found_hold_every_property(found: Path) -> None:
    assert HARNESSES[_target(found)](found.read_bytes())
