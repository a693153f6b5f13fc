"""modelgate.difflog: the writer under load, rotation, crash safety, disk errors, the reader."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from modelgate import difflog, difflog_cli
from modelgate.config import CompareSpec
from modelgate.diff import Answer, Verdict
from modelgate.difflog import (
    DIFF_DTYPE,
    FLAG_ARGMAX_CHANGED,
    FLAG_RANKED,
    FLAG_REQUEST_ID_CUT,
    FLAG_VECTORS,
    NO_PAYLOAD,
    RECORD_SIZE,
    VERDICT_CODES,
    DiffJob,
    DiffLogError,
    DiffLogWriter,
    iter_payloads,
    read_difflog,
    read_payload,
)
from modelgate.stats import wilson_interval

JSON = b"application/json"
SPEC = CompareSpec(ignore=["/model"])


def job(i: int, *, differs: bool = False, route: str = "predict", shadow: str = "v3") -> DiffJob:
    body = orjson.dumps({"label": "pos", "probs": [0.2, 0.8]})
    other = orjson.dumps({"label": "neg", "probs": [0.8, 0.2]}) if differs else body
    return DiffJob(
        route=route,
        shadow=shadow,
        primary=Answer(200, JSON, body, 0.010),
        shadow_answer=Answer(200, JSON, other, 0.012),
        compare=SPEC,
        request_id=f"req-{i}",
        unit=f"user-{i % 100}",
        experiment="ranker",
        variant="control",
        request_body=b'{"x": %d}' % i,
        started_at=1_700_000_000.0 + i,
    )


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Polls a condition; a bound against hangs, not a timing assertion."""
    deadline = time.monotonic() + 30
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def write(log_dir: Path, jobs: list[DiffJob], **options: object) -> DiffLogWriter:
    writer = DiffLogWriter(log_dir, **options)  # type: ignore[arg-type]
    writer.start()
    for item in jobs:
        assert writer.submit(item)
    assert writer.close(timeout=30)
    return writer


def test_records_round_trip_with_names_and_payloads(tmp_path: Path) -> None:
    writer = write(tmp_path, [job(0), job(1, differs=True), job(2)])
    records, names = read_difflog(tmp_path)
    assert len(records) == 3 and records.dtype == DIFF_DTYPE
    assert records["request_id"].tolist() == [b"req-0", b"req-1", b"req-2"]
    verdicts = [names.verdicts[code] for code in records["verdict"]]
    assert verdicts == ["equal", "differs", "equal"]
    assert {names.routes[i] for i in records["route_id"]} == {"predict"}
    assert {names.variants[i] for i in records["variant_id"]} == {"ranker=control"}
    assert {names.shadows[i] for i in records["shadow_id"]} == {"v3"}
    assert records["primary_ms"].tolist() == pytest.approx([10.0] * 3)
    assert records["ts_ns"][0] == 1_700_000_000 * 10**9
    assert records["n_diff"].tolist() == [0, 3, 0]
    assert records["flags"][1] & FLAG_VECTORS
    # only the differing pair keeps a payload, and the record points at it
    offsets = records["payload_offset"].tolist()
    assert offsets[0] == offsets[2] == NO_PAYLOAD
    payload = read_payload(names, 1, offsets[1])
    assert payload is not None and payload["request_id"] == "req-1"
    assert {d["pointer"] for d in payload["differences"]} == {"/label", "/probs/0", "/probs/1"}
    assert payload["request"]["body"] == '{"x": 1}'
    assert writer.stats()["verdicts"] == {("predict", "v3"): {"equal": 2, "differs": 1}}
    assert writer.stats()["written"] == 3


def test_a_file_reads_with_plain_numpy(tmp_path: Path) -> None:
    write(tmp_path, [job(i) for i in range(10)])
    (path,) = tmp_path.glob("difflog-*.bin")
    records = np.fromfile(path, dtype=DIFF_DTYPE)
    assert len(records) == 10
    assert path.stat().st_size == 10 * RECORD_SIZE


def test_writer_under_load_from_several_threads(tmp_path: Path) -> None:
    threads, per_thread = 4, 25_000
    writer = DiffLogWriter(tmp_path, queue_size=1 << 20)
    writer.start()

    def produce(base: int) -> None:
        for i in range(base, base + per_thread):
            assert writer.submit(job(i, differs=i % 100 == 0))

    workers = [threading.Thread(target=produce, args=(n * per_thread,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert writer.close(timeout=60)
    total = threads * per_thread
    stats = writer.stats()
    assert stats["written"] == total and stats["dropped"] == {}
    assert stats["bytes_written"] == total * RECORD_SIZE
    (path,) = tmp_path.glob("difflog-*.bin")
    records = np.fromfile(path, dtype=DIFF_DTYPE)
    assert len(records) == total
    assert len(set(records["request_id"].tolist())) == total
    counts = np.bincount(records["verdict"], minlength=len(Verdict))
    assert counts[VERDICT_CODES[Verdict.DIFFERS]] == total // 100
    assert counts[VERDICT_CODES[Verdict.EQUAL]] == total - total // 100
    assert stats["payloads_written"] == total // 100


def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    writer = DiffLogWriter(tmp_path, queue_size=10)  # not started: nothing drains the queue
    writer._accepting = True  # as start() would, without the thread
    accepted = sum(writer.submit(job(i)) for i in range(25))
    assert accepted == 10
    assert writer.stats()["dropped"] == {"queue_full": 15}


def test_submit_after_close_is_refused(tmp_path: Path) -> None:
    writer = write(tmp_path, [job(0)])
    assert not writer.submit(job(1))
    assert writer.stats()["dropped"] == {"not_running": 1}


def test_rotation_by_size_reads_back_in_order(tmp_path: Path) -> None:
    write(tmp_path, [job(i) for i in range(95)], max_file_bytes=10 * RECORD_SIZE)
    files = sorted(tmp_path.glob("difflog-*.bin"))
    assert len(files) == 10
    assert all(f.stat().st_size <= 10 * RECORD_SIZE for f in files)
    records, names = read_difflog(tmp_path)
    assert records["request_id"].tolist() == [f"req-{i}".encode() for i in range(95)]
    assert [s.stop - s.start for s in names.segments] == [10] * 9 + [5]


def test_payload_offsets_survive_rotation(tmp_path: Path) -> None:
    write(tmp_path, [job(i, differs=True) for i in range(30)], max_file_bytes=8 * RECORD_SIZE)
    records, names = read_difflog(tmp_path)
    for row, offset in enumerate(records["payload_offset"].tolist()):
        payload = read_payload(names, row, offset)
        assert payload is not None and payload["request_id"] == f"req-{row}"
    assert len(list(iter_payloads(names))) == 30


def test_payloads_are_sampled_and_capped(tmp_path: Path) -> None:
    jobs = [job(i, differs=True) for i in range(200)]
    write(tmp_path / "none", jobs, payload_sample=0.0)
    records, _ = read_difflog(tmp_path / "none")
    assert (records["payload_offset"] == NO_PAYLOAD).all()
    write(tmp_path / "half", jobs, payload_sample=0.5, seed=1)
    records, _ = read_difflog(tmp_path / "half")
    assert 50 < int((records["payload_offset"] != NO_PAYLOAD).sum()) < 150
    write(tmp_path / "capped", jobs[:1], payload_max_bytes=5)
    _, names = read_difflog(tmp_path / "capped")
    (payload,) = iter_payloads(names)
    assert payload["primary"]["body"] == '{"lab' and payload["primary"]["truncated"]


def test_long_request_ids_keep_their_tail_and_are_flagged(tmp_path: Path) -> None:
    long_id = "0123456789abcdef-ffff1"
    item = job(0)
    item.request_id = long_id.encode()
    write(tmp_path, [item])
    records, _ = read_difflog(tmp_path)
    assert records["request_id"][0] == long_id[-16:].encode()
    assert records["flags"][0] & FLAG_REQUEST_ID_CUT


def test_flags_say_what_was_compared(tmp_path: Path) -> None:
    reordered = job(0)
    reordered.compare = CompareSpec(ranked=["/r"])
    reordered.primary.body = b'{"r": [1, 2, 3], "p": [0.2, 0.8]}'
    assert reordered.shadow_answer is not None
    reordered.shadow_answer.body = b'{"r": [2, 1, 3], "p": [0.8, 0.2]}'
    write(tmp_path, [reordered, job(1)])
    records, names = read_difflog(tmp_path)
    assert records["flags"].tolist() == [FLAG_VECTORS | FLAG_ARGMAX_CHANGED | FLAG_RANKED, 0]
    assert names.verdicts[records["verdict"][0]] == "differs"  # the probabilities moved


def test_errors_and_timeouts_are_logged(tmp_path: Path) -> None:
    timed_out, failed = job(0), job(1)
    timed_out.shadow_answer = None
    failed.shadow_answer = Answer(error="connect_failed", latency_s=0.001)
    write(tmp_path, [timed_out, failed])
    records, names = read_difflog(tmp_path)
    assert [names.verdicts[v] for v in records["verdict"]] == ["shadow_timeout", "shadow_error"]
    assert np.isnan(records["shadow_ms"][0]) and records["shadow_status"].tolist() == [0, 0]


def test_a_cut_off_log_still_reads(tmp_path: Path) -> None:
    write(tmp_path, [job(i) for i in range(50)])
    (path,) = tmp_path.glob("difflog-*.bin")
    with open(path, "r+b") as f:
        f.truncate(49 * RECORD_SIZE + 17)  # the last record is cut in the middle
    records, _ = read_difflog(path)
    assert len(records) == 49
    assert records["request_id"][-1] == b"req-48"


_KILLED_WRITER = """
import sys, time
from modelgate.diff import Answer
from modelgate.difflog import DiffJob, DiffLogWriter
writer = DiffLogWriter(sys.argv[1], flush_interval_s=0.01)
writer.start()
body = b'{"label": "pos"}'
i = 0
while True:
    job = DiffJob("predict", "v3", Answer(200, b"application/json", body, 0.01),
                  Answer(200, b"application/json", body if i % 7 else b'{"label": "neg"}', 0.02),
                  request_id=f"req-{i}")
    if writer.submit(job):
        i += 1
    if i % 1000 == 0:
        time.sleep(0.001)
"""


def test_a_writer_killed_with_sigkill_leaves_a_readable_log(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), str(tmp_path)]
    )
    try:

        def enough_written() -> bool:
            return sum(f.stat().st_size for f in tmp_path.glob("*.bin")) >= 2000 * RECORD_SIZE

        wait_for(enough_written, "the subprocess writer to write 2000 records")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    records, names = read_difflog(tmp_path)
    assert len(records) >= 2000
    # every whole record is intact and in order: request ids count up from 0
    assert records["request_id"].tolist() == [f"req-{i}".encode() for i in range(len(records))]
    verdicts = {names.verdicts[v] for v in records["verdict"]}
    assert verdicts == {"equal", "differs"}


def test_an_unusable_log_dir_counts_errors_and_recovers(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file where the log directory should be")
    log_dir = blocker / "logs"
    writer = DiffLogWriter(log_dir, flush_interval_s=0.01, retry_interval_s=0.01)
    writer.start()
    for i in range(10):
        assert writer.submit(job(i))
    wait_for(lambda: writer.stats()["dropped"].get("write_error", 0) == 10, "10 write errors")
    stats = writer.stats()
    assert stats["write_errors"] >= 1 and "open" in stats["last_error"]
    blocker.unlink()  # the disk is usable again: the writer keeps trying and recovers
    for i in range(10, 15):
        assert writer.submit(job(i))
    wait_for(lambda: writer.stats()["written"] == 5, "the writer to recover")
    assert writer.close(timeout=30)
    records, _ = read_difflog(log_dir)
    assert records["request_id"].tolist() == [f"req-{i}".encode() for i in range(10, 15)]
    assert writer.stats()["written"] == 5


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """A directory nobody may write to: mode 0500, or for root (who writes through modes) a
    read-only tmpfs mounted on it."""
    if os.geteuid() != 0:
        path.chmod(0o500)
        try:
            yield path
        finally:
            path.chmod(0o700)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_read_only_log_dir_does_not_raise(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    with read_only(tmp_path / "logs") as log_dir:
        writer = write(log_dir, [job(0)])
    assert writer.stats()["write_errors"] >= 1
    assert writer.stats()["dropped"] == {"write_error": 1}


def test_a_failing_write_keeps_the_file_aligned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write_all = difflog._write_all
    calls = {"n": 0}

    def full_disk_once(fd: int, data: memoryview | bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # half a batch lands, then the disk is full
            view = memoryview(data).cast("B")
            os.write(fd, view[: len(view) // 2 + 3])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fd, data)

    monkeypatch.setattr(difflog, "_write_all", full_disk_once)
    writer = DiffLogWriter(tmp_path, flush_interval_s=0.01)
    writer.start()
    for batch in range(3):
        for i in range(batch * 10, batch * 10 + 10):
            assert writer.submit(job(i))

        def handled(n: int = batch * 10 + 10) -> bool:
            stats = writer.stats()
            return bool(stats["written"] + stats["dropped"].get("write_error", 0) == n)

        wait_for(handled, "a flush")  # one batch per flush: the second one fails
    assert writer.close(timeout=30)
    stats = writer.stats()
    assert stats["write_errors"] == 1 and stats["dropped"] == {"write_error": 10}
    (path,) = tmp_path.glob("difflog-*.bin")
    assert path.stat().st_size % RECORD_SIZE == 0
    records, _ = read_difflog(path)
    assert len(records) == stats["written"] == 20


def test_names_tables_overflow_into_other(tmp_path: Path) -> None:
    write(tmp_path, [job(i, shadow=f"s{i}") for i in range(300)])
    records, names = read_difflog(tmp_path)
    shadows = [names.shadows[i] for i in records["shadow_id"]]
    assert shadows[:255] == [f"s{i}" for i in range(255)]
    assert set(shadows[255:]) == {"(other)"}


def test_reading_two_runs_merges_their_names(tmp_path: Path) -> None:
    write(tmp_path, [job(0, route="a", shadow="x")])
    write(tmp_path, [job(1, route="b", shadow="y"), job(2, route="a", shadow="x")])
    records, names = read_difflog(tmp_path)
    pairs = [(names.routes[r], names.shadows[s]) for r, s in records[["route_id", "shadow_id"]]]
    assert pairs == [("a", "x"), ("b", "y"), ("a", "x")]


def test_reader_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DiffLogError, match="no such file"):
        read_difflog(tmp_path / "missing")
    with pytest.raises(DiffLogError, match="no diff log files"):
        read_difflog(tmp_path)
    stray = tmp_path / "notes.txt"
    stray.write_text("hello")
    with pytest.raises(DiffLogError, match="not a diff log file"):
        read_difflog(stray)
    orphan = tmp_path / "difflog-x.bin"
    orphan.write_bytes(b"\0" * 64)
    with pytest.raises(DiffLogError, match="no sidecar"):
        read_difflog(orphan)
    (tmp_path / "difflog-x.json").write_text('{"format": "something-else"}')
    with pytest.raises(DiffLogError, match="not a modelgate diff log"):
        read_difflog(orphan)


# --- modelgate difflog (the command line) -----------------------------------------------------


@pytest.fixture
def sample_log(tmp_path: Path) -> Path:
    jobs = [job(i, differs=i % 4 == 0) for i in range(40)]
    late = job(40)
    late.shadow_answer = None
    write(tmp_path, [*jobs, late], max_file_bytes=16 * RECORD_SIZE)
    return tmp_path


def test_wilson_interval() -> None:
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert all(np.isnan(v) for v in wilson_interval(0, 0))


def test_summarize_json(sample_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert difflog_cli.main(["summarize", str(sample_log), "--json"]) == 0
    summary = orjson.loads(capsys.readouterr().out)
    assert summary["records"] == 41 and len(summary["files"]) == 3
    (pair,) = summary["pairs"]
    assert (pair["route"], pair["shadow"]) == ("predict", "v3")
    assert pair["verdicts"]["equal"] == 30 and pair["verdicts"]["differs"] == 10
    assert pair["verdicts"]["shadow_timeout"] == 1 and pair["compared"] == 40
    assert pair["agreement"] == 0.75
    low, high = pair["agreement_ci95"]
    assert low < 0.75 < high
    assert pair["argmax_agreement"] == 0.75  # every differing pair flipped its argmax
    assert pair["latency_ms"]["shadow_minus_primary"]["p50"] == pytest.approx(2.0, abs=1e-3)
    top = {(f["pointer"], f["kind"]): f["count"] for f in summary["fields"]}
    assert top[("/label", "value_changed")] == 10


def test_summarize_in_a_subprocess(sample_log: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "modelgate", "difflog", "summarize", str(sample_log)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "41 records" in result.stdout
    assert "75.00%" in result.stdout and "/label" in result.stdout


def test_show_prints_examples_with_bodies(
    sample_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert difflog_cli.main(["show", str(sample_log), "--verdict", "differs", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("10 records with verdict differs; showing 2")
    assert "req-0" in out and "req-4" in out and "req-8" not in out
    assert '/label  value_changed  "pos" -> "neg"' in out
    assert 'request: {"x": 0}' in out and '"label":"neg"' in out
    assert difflog_cli.main(["show", str(sample_log), "--verdict", "equal", "--limit", "1"]) == 0
    assert "no payload kept" in capsys.readouterr().out


def test_export_jsonl_and_csv(sample_log: Path, tmp_path: Path) -> None:
    out = tmp_path / "export.jsonl"
    assert difflog_cli.main(["export", str(sample_log), "--output", str(out)]) == 0
    rows = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 41
    assert rows[0]["verdict"] == "differs" and rows[0]["route"] == "predict"
    assert rows[0]["payload_offset"] is not None and rows[1]["payload_offset"] is None
    assert rows[-1]["shadow_ms"] is None and rows[-1]["verdict"] == "shadow_timeout"
    csv_out = tmp_path / "export.csv"
    assert (
        difflog_cli.main(["export", str(sample_log), "--format", "csv", "--output", str(csv_out)])
        == 0
    )
    lines = csv_out.read_text().splitlines()
    header = lines[0].split(",")
    assert header[:4] == ["ts_ns", "unit_hash", "payload_offset", "request_id"]
    assert len(lines) == 42
    assert lines[-1].split(",")[header.index("shadow_ms")] == ""  # the timed-out pair


def test_cli_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert difflog_cli.main(["summarize", str(tmp_path / "missing")]) == 1
    assert "no such file or directory" in capsys.readouterr().err
    stray = tmp_path / "difflog-fake.bin"
    stray.write_bytes(b"x" * 100)
    assert difflog_cli.main(["show", str(stray)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("modelgate difflog: error:") and "not a modelgate diff log" in err
