"""The feedback fuzz harness: its seeds hold its properties, it catches unbounded values and
a secret that is not checked when they are planted, and a short coverage-guided run
(atheris) finds nothing. A longer run:
`python tests/fuzz/fuzz_feedback.py -max_total_time=3600 -max_len=4096 CORPUS_DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from modelgate.feedback_checks import MetricGate
from modelgate.feedback_tokens import Credential, FeedbackKeys

from .fuzz.feedback import SEEDS, check_input
from .fuzz.front_door import FuzzFailure
from .fuzz.runner import short_run


@pytest.mark.parametrize("variation", [0, 1, 2, 4, 6, 0x20, 0x40])
@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_seed_inputs_hold_every_property(seed: int, variation: int) -> None:
    data = bytes([SEEDS[seed][0] ^ variation]) + SEEDS[seed][1:]
    assert check_input(data).startswith(b"HTTP/1.1 ")


def test_the_harness_catches_unbounded_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 5's 1e308 pair, with the bound planted away."""

    def unbounded(spec: Any, metric: str, item: dict[str, Any]) -> float:
        return float(item["value"])

    monkeypatch.setattr(MetricGate, "value", staticmethod(unbounded))
    with pytest.raises(FuzzFailure, match="non-finite aggregate"):
        for seed in SEEDS:
            if b"1e308" in seed and seed[0] & 1:
                check_input(seed)


def test_the_harness_catches_an_unchecked_unit_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FeedbackKeys, "credential", lambda self, header: Credential.VALID)
    with pytest.raises(FuzzFailure, match="by unit accepted without the secret"):
        check_input(SEEDS[0])


@pytest.mark.fuzz
def test_a_short_coverage_guided_run_finds_nothing(tmp_path: Path) -> None:
    short_run("fuzz_feedback.py", SEEDS, tmp_path)
