"""Benchmarks of the diff log: compare alone (three paths), record encoding alone, and the
writer end to end (submit -> compare -> encode -> write), pinned to one CPU.

Run: python -m pytest benchmarks/bench_difflog.py --benchmark-enable -p no:cacheprovider
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from modelgate.config import CompareSpec
from modelgate.diff import Answer, Verdict, compare
from modelgate.difflog import DIFF_DTYPE, NO_PAYLOAD, RECORD_SIZE, DiffJob, DiffLogWriter
from modelgate.mock.server import predict

JSON = b"application/json"
PAIRS = 100_000  # jobs per end-to-end round
ROUNDS = 5
# Answers as the mock models give them (~150 bytes): the shadow is the same model under
# another name, so only /model differs and every pair agrees.
PRIMARY = orjson.dumps(predict("model-a", b'{"x": 1}', drift=0.0))
SHADOW = orjson.dumps(predict("model-c", b'{"x": 1}', drift=0.0))
WHOLE = CompareSpec(ignore=["/model"])
FIELDS = CompareSpec(fields=["/score", "/label"], abs=1e-6)
pytestmark = pytest.mark.usefixtures("one_cpu")


def _compare(benchmark: Any, shadow_body: bytes, spec: CompareSpec, group: str) -> None:
    benchmark.group = group
    primary, shadow = Answer(200, JSON, PRIMARY, 0.01), Answer(200, JSON, shadow_body, 0.012)
    result = benchmark.pedantic(
        compare, args=(primary, shadow, spec), rounds=200, iterations=1000, warmup_rounds=5
    )
    assert result.verdict is Verdict.EQUAL


def test_compare_byte_equal(benchmark: Any) -> None:
    _compare(benchmark, bytes(PRIMARY), WHOLE, "compare: one agreeing pair")


def test_compare_parsed_fields(benchmark: Any) -> None:
    _compare(benchmark, SHADOW, FIELDS, "compare: one agreeing pair")


def test_compare_parsed_whole_document(benchmark: Any) -> None:
    _compare(benchmark, SHADOW, WHOLE, "compare: one agreeing pair")


def test_encode_4096_records(benchmark: Any) -> None:
    benchmark.group = "encode: 4096 records (np.array of row tuples)"
    row = (1_700_000_000 * 10**9, 2**63 + 5, NO_PAYLOAD, b"3f2a9c1d04be-1f3", 10.0, 12.0)
    rows = [row + (np.nan, 200, 200, 0, 1, 1, 0, 0, 2)] * 4096
    records = benchmark.pedantic(np.array, args=(rows, DIFF_DTYPE), rounds=100, warmup_rounds=3)
    assert records.nbytes == 4096 * RECORD_SIZE


def _jobs(shadow_body: bytes, spec: CompareSpec) -> list[DiffJob]:
    # Built before timing: the gateway builds its pairs on the event loop, not the writer.
    return [
        DiffJob(
            route="predict",
            shadow="model-c",
            primary=Answer(200, JSON, PRIMARY, 0.010),
            shadow_answer=Answer(200, JSON, shadow_body, 0.012),
            compare=spec,
            request_id=f"3f2a9c1d04be-{i:x}".encode(),
            unit=f"user-{i % 5000}",
            experiment="ranker",
            variant="control",
            started_at=1_700_000_000.0 + i * 1e-5,
        )
        for i in range(PAIRS)
    ]


def _end_to_end(benchmark: Any, jobs: list[DiffJob], prefill: bool) -> None:
    """prefill: the queue is full before the thread starts (the writer thread alone);
    otherwise this thread submits while the writer drains (both, sharing the one CPU)."""
    log_dirs: list[Path] = []

    def setup() -> tuple[tuple[DiffLogWriter], dict[str, Any]]:
        log_dirs.append(Path(tempfile.mkdtemp(prefix="bench-difflog-")))
        writer = DiffLogWriter(log_dirs[-1], queue_size=2 * PAIRS, max_file_bytes=1 << 30)
        if prefill:
            writer._accepting = True  # as start() does, but no thread drains the queue yet
            assert all(writer.submit(job) for job in jobs)
        return (writer,), {}

    def run(writer: DiffLogWriter) -> None:
        writer.start()
        if not prefill:
            submit = writer.submit
            for job in jobs:
                submit(job)
        assert writer.close(timeout=600)

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    for log_dir in log_dirs:
        (path,) = log_dir.glob("difflog-*.bin")
        # Agreeing pairs cost exactly one record each on disk, no payload.
        assert path.stat().st_size == PAIRS * RECORD_SIZE
        assert not list(log_dir.glob("*.payloads.jsonl"))
        for file in log_dir.iterdir():
            file.unlink()
        log_dir.rmdir()
    median = benchmark.stats.stats.median
    benchmark.extra_info["records_per_s"] = round(PAIRS / median)
    benchmark.extra_info["bytes_per_record"] = RECORD_SIZE


def test_writer_byte_equal_submit_and_drain(benchmark: Any) -> None:
    benchmark.group = f"writer: {PAIRS} agreeing pairs, end to end"
    _end_to_end(benchmark, _jobs(bytes(PRIMARY), WHOLE), prefill=False)


def test_writer_byte_equal_drain_only(benchmark: Any) -> None:
    benchmark.group = f"writer: {PAIRS} agreeing pairs, end to end"
    _end_to_end(benchmark, _jobs(bytes(PRIMARY), WHOLE), prefill=True)


def test_writer_parsed_fields_submit_and_drain(benchmark: Any) -> None:
    benchmark.group = f"writer: {PAIRS} agreeing pairs, end to end"
    _end_to_end(benchmark, _jobs(SHADOW, FIELDS), prefill=False)


def test_writer_parsed_whole_submit_and_drain(benchmark: Any) -> None:
    benchmark.group = f"writer: {PAIRS} agreeing pairs, end to end"
    _end_to_end(benchmark, _jobs(SHADOW, WHOLE), prefill=False)
