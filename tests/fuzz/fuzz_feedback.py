"""Fuzzes the feedback endpoint: `python tests/fuzz/fuzz_feedback.py [libFuzzer flags]`,
e.g. `-max_total_time=600 -max_len=2048 corpus_dir`. A crash is a broken property of
tests/fuzz/feedback.py (an exception, a 5xx, a non-finite aggregate, feedback accepted
without its secret or token)."""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["modelgate"]):
    from tests.fuzz.feedback import check_input


def test_one_input(data: bytes) -> None:
    check_input(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
