"""Fuzzes config loading: `python tests/fuzz/fuzz_config.py [libFuzzer flags]`, e.g.
`-max_total_time=3600 -max_len=8192 -timeout=10 corpus_dir`. A crash is a broken property of
tests/fuzz/config_loading.py (a stray exception, an error without its place, an accepted config
a worker would read differently); a timeout is a document the bounds let through."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fuzz.runner import fuzz_main  # noqa: E402

if __name__ == "__main__":
    fuzz_main("tests.fuzz.config_loading", instrument=("modelgate", "yaml"))
