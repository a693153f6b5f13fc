"""Fuzzes the feedback endpoint: `python tests/fuzz/fuzz_feedback.py [libFuzzer flags]`,
e.g. `-max_total_time=600 -max_len=2048 corpus_dir`. A crash is a broken property of
tests/fuzz/feedback.py (an exception, a 5xx, a non-finite aggregate, feedback accepted
without its secret or token)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fuzz.runner import fuzz_main  # noqa: E402

if __name__ == "__main__":
    fuzz_main("tests.fuzz.feedback")
