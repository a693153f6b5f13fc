"""The config-loading fuzz harness (tests/fuzz/config_loading.py): its seeds hold every
property (what it found replays in test_fuzz_found.py), it catches the loader's old failures
when they are planted back, and a short coverage-guided run (atheris) finds nothing. A longer run:
`python tests/fuzz/fuzz_config.py -max_total_time=3600 -max_len=8192 -timeout=10 CORPUS_DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from modelgate import config as config_module

from .fuzz.config_loading import SEEDS, FuzzFailure, check_input
from .fuzz.runner import short_run


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_seed_inputs_hold_every_property(seed: int) -> None:
    assert check_input(SEEDS[seed]) in ("accepted", "refused")


def test_the_example_configs_are_accepted_on_every_path() -> None:
    assert [check_input(SEEDS[i]) for i in range(3)] == ["accepted"] * 3


def test_the_harness_catches_the_unbounded_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    """main's loader, planted back: yaml.safe_load let a ValueError out of a long number."""

    def unbounded(text: str, source: str = "") -> Any:
        return yaml.safe_load(text)

    monkeypatch.setattr(config_module, "load_yaml", unbounded)
    with pytest.raises(FuzzFailure, match="ValueError"):
        check_input(b"\x00workers: " + b"9" * 5000)


def test_the_harness_catches_an_error_without_its_place(monkeypatch: pytest.MonkeyPatch) -> None:
    original = config_module._pydantic_errors
    monkeypatch.setattr(
        config_module, "_pydantic_errors", lambda exc: [e.split(": ", 1)[1] for e in original(exc)]
    )
    with pytest.raises(FuzzFailure, match="not 'place: problem'"):
        check_input(SEEDS[0].replace(b"weight: 90", b"weight: -90"))


@pytest.mark.fuzz
def test_a_short_coverage_guided_run_finds_nothing(tmp_path: Path) -> None:
    short_run("fuzz_config.py", SEEDS, tmp_path, ("-max_len=4096", "-timeout=10"))
