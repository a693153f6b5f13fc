"""The diff log's bounds (issue 12, finding 10): a queue capped by the bytes its pairs hold,
a backlog drained within the process's stop deadline (what is not is counted and logged),
owner-only files, and retention applied on rotation."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from modelgate import diff, difflog
from modelgate.config import validate_config
from modelgate.difflog import DiffLogWriter, read_difflog
from modelgate.plan import compile_plan
from modelgate.server import Gateway

from .support import async_test, simple_config
from .test_difflog import job, wait_for, write

BIG = 200_000  # bytes of each of a pair's three bodies


def big_job(i: int) -> difflog.DiffJob:
    pair = job(i)
    pair.request_body = b"x" * BIG
    return pair


@pytest.fixture
def blocked(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The writer thread blocks in its first comparison until the event is set."""
    release = threading.Event()
    real = diff.compare

    def slow_compare(*args: Any) -> Any:
        release.wait(30)
        return real(*args)

    monkeypatch.setattr(difflog, "compare", slow_compare)
    return release


def test_the_queue_is_capped_by_bytes(tmp_path: Path, blocked: threading.Event) -> None:
    cap = 2 << 20
    writer = DiffLogWriter(tmp_path, queue_max_bytes=cap, flush_interval_s=0.01)
    writer.start()
    accepted = sum(writer.submit(big_job(i)) for i in range(40))
    # 40 pairs of ~200 KB would hold 8 MB; at most 2 MiB of them are kept (the one the
    # writer holds in its hands counts until it is done).
    assert 0 < accepted <= cap // BIG + 1
    stats = writer.stats()
    assert stats["dropped"] == {"queue_bytes": 40 - accepted}
    assert stats["queue_bytes"] <= cap
    blocked.set()
    assert writer.close(timeout=30)
    assert writer.stats()["written"] == accepted and writer.stats()["queue_bytes"] == 0
    assert writer.submit(big_job(99)) is False  # closed: refused as not_running


def slow_compares(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    real = diff.compare

    def slow_compare(*args: Any) -> Any:
        time.sleep(seconds)
        return real(*args)

    monkeypatch.setattr(difflog, "compare", slow_compare)


def test_a_stopping_gateway_drains_the_backlog_within_its_drain_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3,000 pairs at >= 1 ms each take more than the 2 s the old stop allowed; the drain
    timeout (20 s here) leaves the writer the time it needs."""
    slow_compares(monkeypatch, 0.001)

    @async_test
    async def run() -> DiffLogWriter:
        gateway = Gateway(compile_plan(validate_config(simple_config())))
        writer = DiffLogWriter(tmp_path, flush_interval_s=0.05)
        writer.start()
        gateway.shadows.writer = writer
        gateway.shadows.sink = writer
        for i in range(3000):
            assert writer.submit(job(i))
        await gateway.drain(20.0)
        return writer

    writer = run()
    stats = writer.stats()
    assert stats["written"] == 3000 and stats["dropped"] == {}
    records, _ = read_difflog(tmp_path)
    assert len(records) == 3000


def test_what_cannot_be_written_by_the_deadline_is_counted_and_logged(
    tmp_path: Path, blocked: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    writer = DiffLogWriter(tmp_path, flush_interval_s=0.01)
    writer.start()
    for i in range(50):
        assert writer.submit(job(i))
    wait_for(lambda: writer.stats()["queue_depth"] < 50, "the writer to take the first batch")
    with caplog.at_level(logging.WARNING):
        assert writer.close(timeout=0.05) is False
    lost = writer.stats()["dropped"]["stop_deadline"]
    assert lost == 50 and f"{lost} pairs lost" in caplog.text
    blocked.set()


def test_diff_log_files_are_owner_only(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write(tmp_path / "logs", [job(0), job(1, differs=True)])
    finally:
        os.umask(old)
    files = list((tmp_path / "logs").iterdir())
    assert {f.suffix for f in files} == {".bin", ".json", ".jsonl"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((tmp_path / "logs").stat().st_mode) == 0o700


def test_retention_bounds_the_diff_log_on_rotation(tmp_path: Path) -> None:
    from modelgate.logretention import Retention

    record_files = 640  # ten records per file
    writer = write(
        tmp_path,
        [job(i, differs=True) for i in range(500)],
        max_file_bytes=record_files,
        retention=Retention(max_bytes=20_000),
        batch_size=10,
        flush_interval_s=0.001,
    )
    assert writer.stats()["written"] == 500
    total = sum(f.stat().st_size for f in tmp_path.iterdir())
    groups = {f.name.split(".")[1] for f in tmp_path.glob("*.bin")}
    assert total <= 20_000 + 2 * record_files * 20  # the open file and its payloads beside
    assert 1 < len(groups) < 50
    records, _ = read_difflog(tmp_path)
    # what is left is the newest, in order, ending with the last pair
    ids = [int(r[4:]) for r in records["request_id"].astype(str)]
    assert ids == list(range(ids[0], 500))


def test_a_reload_applies_new_log_bounds_to_the_running_diff_writer(tmp_path: Path) -> None:
    from modelgate.logretention import Retention
    from modelgate.shadow import ShadowDispatcher

    config = simple_config()
    config["log_dir"] = str(tmp_path)
    dispatcher = ShadowDispatcher()
    dispatcher.sync(compile_plan(validate_config(config), 1))
    dispatcher.writer = writer = DiffLogWriter(tmp_path)  # as the first pair opens it
    assert writer.queue_max_bytes == 64 << 20 and not writer.retention.active
    config["logs"] = {"diff_queue_max_bytes": 1 << 20, "retention": {"max_age_h": 1}}
    dispatcher.sync(compile_plan(validate_config(config), 2))
    assert writer.queue_max_bytes == 1 << 20
    assert writer.retention == Retention(None, 3600.0)


def test_a_directory_read_skips_a_file_without_its_sidecar_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, [job(i) for i in range(5)])
    write(tmp_path, [job(i) for i in range(5, 8)])
    first, second = sorted(tmp_path.glob("difflog-*.bin"))
    first.with_suffix(".json").unlink()  # a crash, or a sidecar deleted by hand
    with open(second, "ab") as f:
        f.write(b"\x07" * 9)  # a torn last record
    with caplog.at_level(logging.WARNING):
        records, _ = read_difflog(tmp_path)
    assert records["request_id"].tolist() == [b"req-5", b"req-6", b"req-7"]
    assert f"{first}: not a modelgate diff log (no sidecar" in caplog.text
    assert f"{second}: ignored a torn last record (9 bytes" in caplog.text


def test_retention_leaves_another_diff_writers_open_files(tmp_path: Path) -> None:
    """Review finding 3: the files a diff-log writer has open (records and payloads) are
    locked, so a retention pass of another writer in this process, whose pid is the same,
    or of another host, leaves them; once closed they are deleted like any other."""
    from modelgate.logretention import Retention, enforce_retention

    writer = DiffLogWriter(tmp_path, flush_interval_s=0.01)
    writer.start()
    for i in range(5):
        assert writer.submit(job(i, differs=True))
    wait_for(lambda: writer.stats()["payloads_written"] == 5, "payloads written")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n.rsplit(".", 1)[-1] for n in names] == ["bin", "json", "jsonl"]
    assert enforce_retention(tmp_path, "difflog", Retention(max_bytes=1)) == (0, 0)
    assert writer.close(timeout=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert len(read_difflog(tmp_path)[0]) == 5
    assert enforce_retention(tmp_path, "difflog", Retention(max_bytes=1))[0] == 1
    assert not list(tmp_path.iterdir())
