"""What every fuzz target shares: the atheris entry point, and the time-bounded run the
suite makes of it (MODELGATE_FUZZ_SECONDS, 20 by default)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["fuzz_main", "short_run"]


def fuzz_main(module: str, instrument: tuple[str, ...] = ("modelgate",)) -> None:
    """Runs libFuzzer over `module`'s check_input, `instrument` (modelgate) instrumented for
    coverage."""
    import atheris

    with atheris.instrument_imports(include=list(instrument)):
        check_input = importlib.import_module(module).check_input
    atheris.Setup(sys.argv, check_input)
    atheris.Fuzz()


def short_run(
    script: str, seeds: list[bytes], tmp_path: Path, flags: tuple[str, ...] = ("-max_len=2048",)
) -> None:
    """A coverage-guided run of tests/fuzz/`script` from `seeds` with libFuzzer `flags`;
    fails on any finding (a crash, or a timeout when `-timeout` is among the flags)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(seed)
    seconds = os.environ.get("MODELGATE_FUZZ_SECONDS", "20")
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "fuzz" / script),
            f"-max_total_time={seconds}",
            *flags,
            "-seed=12345",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=int(seconds) + 120,
        cwd=ROOT,
    )
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, tail
    assert "Done" in tail and "runs in" in tail, tail
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*")), tail
