"""The front-door fuzz harness: its seeds hold its properties, it catches a framing bug when
one is planted, and a short coverage-guided run (atheris) finds nothing. A longer run:
`python tests/fuzz/fuzz_front_door.py -max_total_time=3600 -max_len=4096 CORPUS_DIR`."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelgate.exchange import Exchange

from .fuzz.front_door import SEEDS, FuzzFailure, check_input
from .fuzz.runner import short_run


@pytest.mark.parametrize("split", range(8))
@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_seed_inputs_hold_every_property(seed: int, split: int) -> None:
    out = check_input(bytes([split]) + SEEDS[seed])
    assert out.startswith(b"HTTP/1.1 ")


def test_the_harness_catches_a_length_forwarded_without_its_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The smuggling of finding 1, planted: a head announcing more body than is sent."""
    monkeypatch.setattr(Exchange, "_framing", lambda self: b"content-length: 99\r\n")
    with pytest.raises(FuzzFailure, match="pooled upstream connection is inside"):
        check_input(b"\x04" + SEEDS[1])  # upstreams answering at the head, as in the issue


def test_the_harness_catches_a_request_the_gateway_did_not_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = Exchange._request_head

    def smuggling(self: Exchange, *args: bytes) -> bytes:
        head = original(self, *args)
        return head + b"GET /smuggled HTTP/1.1\r\nhost: x\r\nx-request-id: forged\r\n\r\n"

    monkeypatch.setattr(Exchange, "_request_head", smuggling)
    with pytest.raises(FuzzFailure, match="never parsed"):
        check_input(b"\x00" + SEEDS[0])


@pytest.mark.fuzz
def test_a_short_coverage_guided_run_finds_nothing(tmp_path: Path) -> None:
    short_run("fuzz_front_door.py", [b"\x00" + seed for seed in SEEDS], tmp_path)
