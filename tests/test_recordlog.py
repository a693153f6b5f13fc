"""The exposure and feedback record logs under disk trouble (issue 12, findings 5 and 9):
whole records only, sidecar first, readers that skip damage with a warning, id tables that
never overflow, a writer thread that never dies unnoticed. These use only the API main had,
so each can be run against main's code to see it fail."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from modelgate.analyze.logs import load_logs
from modelgate.exposure import EXPOSURE_DTYPE, ExposureLog, read_exposures
from modelgate.feedbacklog import FeedbackLog, read_feedback

SIZE = EXPOSURE_DTYPE.itemsize


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def add(log: ExposureLog, start: int, stop: int, variant: str = "v") -> None:
    for i in range(start, stop):
        log.add(b"req-%d" % i, i, "e", variant, 1)


def settled(log: ExposureLog | FeedbackLog, n: int) -> Callable[[], bool]:
    return lambda: log.written + sum(log.dropped.values()) >= n


def started_with_ten(log_dir: Path) -> ExposureLog:
    """A running exposure log that has written its first ten records."""
    log = ExposureLog(log_dir, flush_interval_s=0.01)
    log.start()
    add(log, 0, 10)
    wait_for(settled(log, 10), "the first batch")
    return log


class DiskFault:
    """os.write on files under `root` writes part of its data, then fails with ENOSPC,
    while `armed`: a full disk as the writer sees it, without mount rights."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = str(root)
        self.armed = False
        self.hits = 0
        real = os.write

        def write(fd: int, data: bytes | memoryview) -> int:
            if self.armed and os.readlink(f"/proc/self/fd/{fd}").startswith(self.root):
                self.hits += 1
                view = memoryview(data).cast("B")
                if len(view) > 7 and self.hits % 2:
                    return real(fd, view[: len(view) // 2 + 3])  # a short write first
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data)

        monkeypatch.setattr(os, "write", write)


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DiskFault]:
    yield DiskFault(tmp_path, monkeypatch)


def test_a_full_disk_leaves_only_whole_records_and_writing_resumes(
    tmp_path: Path, disk: DiskFault, caplog: pytest.LogCaptureFixture
) -> None:
    log = started_with_ten(tmp_path)
    disk.armed = True
    add(log, 10, 20, variant="w")  # a new name: the sidecar write fails too
    wait_for(settled(log, 20), "the failing batch")
    add(log, 20, 30)
    wait_for(settled(log, 30), "the next failing batch")
    disk.armed = False
    add(log, 30, 40, variant="w")
    wait_for(lambda: log.written == 20, "writing to resume once there is room")
    log.close()
    assert disk.hits >= 2
    stats = log.stats()
    assert stats["write_errors"] >= 2 and stats["dropped"] == {"write_error": 20}
    assert "No space left" in stats["last_error"]
    assert "dropped and counted" in caplog.text
    for file in tmp_path.glob("exposure-*.bin"):
        assert file.stat().st_size % SIZE == 0, file
    records, rows = read_exposures(tmp_path)
    assert [r["request_id"] for r in rows] == [f"req-{i}" for i in (*range(10), *range(30, 40))]
    assert [r["variant"] for r in rows] == ["v"] * 10 + ["w"] * 10


def test_when_truncating_fails_too_the_file_is_given_up(
    tmp_path: Path, disk: DiskFault, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = started_with_ten(tmp_path)

    def no_truncate(fd: int, size: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "ftruncate", no_truncate)
    disk.armed = True
    add(log, 10, 20)
    wait_for(settled(log, 20), "the failing batch")
    disk.armed = False
    monkeypatch.undo()
    add(log, 20, 30)
    wait_for(lambda: log.written == 20, "a new file")
    log.close()
    files = sorted(tmp_path.glob("exposure-*.bin"))
    assert len(files) == 2 and files[0].stat().st_size % SIZE != 0  # the torn one, left
    _, rows = read_exposures(tmp_path)
    # The whole records of the cut batch that landed stay readable (counted as dropped:
    # the writer cannot tell); the torn one is skipped and the next file is aligned.
    ids = [r["request_id"] for r in rows]
    cut = len(ids) - 20
    assert 0 <= cut < 10
    assert ids == [f"req-{i}" for i in (*range(10 + cut), *range(20, 30))]


def test_70000_distinct_names_start_new_files_and_every_record_keeps_its_name(
    tmp_path: Path,
) -> None:
    log = FeedbackLog(tmp_path, flush_interval_s=0.05)
    log.start()
    for i in range(70_000):
        log.add(i, float(i), b"", "e", "v", f"metric_{i}", 1)
    wait_for(settled(log, 70_000), "70,000 records")
    assert log.stats()["alive"]
    log.add(1, 1.0, b"", "e", "v", "after", 1)  # the thread still takes records
    log.close()
    assert log.written == 70_001 and not log.dropped and log.write_errors == 0
    assert len(list(tmp_path.glob("feedback-*.bin"))) >= 2
    rows = read_feedback(tmp_path)
    assert len(rows) == 70_001
    assert all(r["metric"] == f"metric_{int(r['value'])}" for r in rows[:-1])
    assert rows[-1]["metric"] == "after"


def test_a_bug_in_the_writer_is_counted_and_the_thread_lives_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = ExposureLog(tmp_path, flush_interval_s=0.01)
    real = log._encode
    calls = {"n": 0}

    def broken_once(columns: list[tuple[object, ...]]) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OverflowError("a bug")
        return real(columns)

    monkeypatch.setattr(log, "_encode", broken_once)
    log.start()
    add(log, 0, 5)
    wait_for(lambda: log.write_errors == 1, "the error counted")
    add(log, 5, 10)
    wait_for(lambda: log.written == 5, "the next batch")
    assert log.stats()["alive"] and "a bug" in log.stats()["last_error"]
    assert log.dropped == {"internal_error": 5}
    log.close()


def test_a_dead_writer_thread_is_noticed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = ExposureLog(tmp_path, flush_interval_s=0.01)

    def die() -> None:
        raise SystemExit  # not an Exception: gets past the per-flush guard

    monkeypatch.setattr(log, "_guarded_flush", die)
    monkeypatch.setattr(threading, "excepthook", lambda _: None)  # expected: no report
    log.start()
    wait_for(lambda: not log.stats()["alive"], "the thread to end")
    add(log, 0, 3)
    assert log.dropped == {"writer_dead": 3}


# --- readers ---------------------------------------------------------------------------------


def written(tmp_path: Path, n: int = 10) -> Path:
    log = ExposureLog(tmp_path, flush_interval_s=0.01)
    log.start()
    add(log, 0, n)
    log.close()
    (file,) = tmp_path.glob("exposure-*.bin")
    return file


def test_a_torn_tail_is_skipped_with_a_warning_naming_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = written(tmp_path)
    with open(file, "r+b") as f:
        f.truncate(9 * SIZE + 13)
    _, rows = read_exposures(tmp_path)
    assert len(rows) == 9
    assert f"{file}: ignored a torn last record (13 bytes" in caplog.text


def test_ids_past_the_sidecar_tables_are_never_misattributed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = written(tmp_path)
    # A record naming variant id 1 when the sidecar lists one variant: what a kill -9
    # between the records and their sidecar left with the old writer.
    extra = np.zeros(1, dtype=EXPOSURE_DTYPE)
    extra["variant_id"], extra["request_id"] = 1, b"orphan"
    with open(file, "ab") as f:
        f.write(extra.tobytes())
    _, rows = read_exposures(tmp_path)
    assert [r["request_id"] for r in rows] == [f"req-{i}" for i in range(10)]
    data = load_logs(tmp_path)  # the analysis reads the same, no IndexError
    assert list(data.exposures["variant"]) == ["v"] * 10
    assert "skipped 1 records whose ids are not in the sidecar's tables" in caplog.text


@pytest.mark.parametrize("damage", ["missing", "torn", "not_an_object", "no_table"])
def test_a_file_without_a_usable_sidecar_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    file = written(tmp_path)
    sidecar = file.with_suffix(".json")
    good = sidecar.read_text()
    if damage == "missing":
        sidecar.unlink()
    elif damage == "torn":
        sidecar.write_text(good[: len(good) // 2])
    elif damage == "not_an_object":
        sidecar.write_text("[]")
    else:
        sidecar.write_text(
            json.dumps({k: v for k, v in json.loads(good).items() if k != "variants"})
        )
    other = tmp_path / "b"
    other.mkdir()
    second = written(other, 4)
    second.rename(tmp_path / ("exposure-z" + second.name.removeprefix("exposure-")))
    second.with_suffix(".json").rename(
        tmp_path / ("exposure-z" + second.with_suffix(".json").name.removeprefix("exposure-"))
    )
    with caplog.at_level(logging.WARNING):
        records, _ = read_exposures(tmp_path)
    assert records["unit_hash"].tolist() == [0, 1, 2, 3]
    assert f"{file}: skipped:" in caplog.text
    assert load_logs(tmp_path).exposures["unit_hash"].tolist() == [0, 1, 2, 3]
