"""Fuzzes the gateway's front door: `python tests/fuzz/fuzz_front_door.py [libFuzzer flags]`,
e.g. `-max_total_time=600 -max_len=2048 corpus_dir`. A crash is a broken property of
tests/fuzz/front_door.py (an exception, a request the gateway did not frame, a leak)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fuzz.runner import fuzz_main  # noqa: E402

if __name__ == "__main__":
    fuzz_main("tests.fuzz.front_door")
