"""Log files are private and bounded (issue 12, finding 10): owner-only modes, retention
deleting the oldest closed files, never an open one or a live writer's; throttled warnings."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelgate.exposure import ExposureLog, read_exposures
from modelgate.logfiles import ThrottledLog, open_append, write_atomic
from modelgate.logretention import Retention, enforce_retention

from .test_recordlog import add, settled, wait_for, written


def test_record_files_and_sidecars_are_owner_only(tmp_path: Path) -> None:
    os.umask(old := os.umask(0))  # the most permissive umask: the mode is the code's own
    try:
        file = written(tmp_path / "logs")
    finally:
        os.umask(old)
    for path in (file, file.with_suffix(".json")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(file.parent.stat().st_mode) == 0o700


def group(log_dir: Path, name: str, size: int, age_s: float) -> Path:
    base = log_dir / name
    for suffix, n in ((".bin", size), (".json", 10)):
        path = base.with_name(base.name + suffix)
        path.write_bytes(b"\0" * n)
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return base


def test_retention_deletes_the_oldest_closed_files_never_the_open_or_a_live_writers(
    tmp_path: Path,
) -> None:
    dead_pid = 32768 + 7  # above the default pid_max: never a running process
    if Path("/proc/sys/kernel/pid_max").read_text().strip() != "32768":
        dead_pid = 2**22 + 7
    old = [
        group(tmp_path, f"exposure-r1-p{dead_pid}-{i:04d}", 1000, 3600 * (10 - i)) for i in range(5)
    ]
    live = group(tmp_path, f"exposure-r2-p{os.getppid()}-0001", 1000, 7200)
    mine = group(tmp_path, f"exposure-r3-p{os.getpid()}-0001", 1000, 1)
    keep = str(mine)
    deleted, freed = enforce_retention(
        tmp_path, "exposure", Retention(max_age_s=7.5 * 3600), [keep]
    )
    assert deleted == 3 and freed == 3 * 1010  # 10, 9 and 8 hours old; not 7, not 6
    assert not any(p.exists() for p in (old[0].with_suffix(".bin"), Path(f"{old[0]}.bin")))
    assert Path(f"{old[3]}.bin").exists() and Path(f"{live}.bin").exists()
    deleted, _ = enforce_retention(tmp_path, "exposure", Retention(max_bytes=2500), [keep])
    assert deleted == 2  # the two dead-process groups left; the live worker's is not ours
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{b.name}{s}" for b in (live, mine) for s in (".bin", ".json")
    )
    assert enforce_retention(tmp_path, "exposure", Retention(max_bytes=1), [keep]) == (0, 0)


HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as our writers do
os.write(fd, b"\\0" * 4000)
print("ready", flush=True)
sys.stdin.read()
"""


def test_retention_never_deletes_a_file_another_writer_holds_open(tmp_path: Path) -> None:
    """Review finding 3: log_dir shared with another host or container, whose pids mean
    nothing here, and two writers in one process: a pid in a name never makes an open file
    deletable; the writer's lock keeps it. Closed files still go."""
    foreign = tmp_path / f"exposure-r0-p{2**22 + 7}-0001"  # no process here has this pid
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, f"{foreign}.bin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        Path(f"{foreign}.json").write_text("{}")
        closed = [
            group(tmp_path, f"exposure-r{i}-p{pid}-0001", 100, 3600)
            for i, pid in ((1, os.getpid()), (2, 2**22 + 8))
        ]
        before = set(tmp_path.glob("*.bin"))
        first = ExposureLog(tmp_path, flush_interval_s=0.01)  # our pid, another instance
        first.start()
        add(first, 0, 10)
        wait_for(settled(first, 10), "the first writer's records")
        (open_file,) = set(tmp_path.glob("*.bin")) - before
        assert enforce_retention(tmp_path, "exposure", Retention(max_bytes=1)) == (2, 200 + 20)
        # A second writer in this process, opening its file, applies retention too.
        second = ExposureLog(tmp_path, flush_interval_s=0.01, retention=Retention(max_bytes=1))
        second.start()
        add(second, 10, 20)
        second.close()
        assert Path(f"{foreign}.bin").stat().st_size == 4000 and open_file.exists()
        assert not any(Path(f"{base}.bin").exists() for base in closed)
        add(first, 20, 30)
        first.close()  # its records went into a file that still has a name, all of them
        ids = {row["request_id"] for row in read_exposures(tmp_path)[1]}
        assert {f"req-{i}" for i in range(30)} <= ids
    finally:
        holder.communicate(timeout=10)  # closes its stdin: it exits and its lock goes
    # Now closed: the foreign file goes like any other.
    enforce_retention(tmp_path, "exposure", Retention(max_bytes=1))
    assert not Path(f"{foreign}.bin").exists()


@pytest.mark.parametrize("race", ["locked", "deleted"])
def test_a_new_file_that_a_retention_pass_took_first_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    """Between a writer's O_EXCL open and its flock, another process's retention may lock
    the empty file (and then delete it): the writer must not write into it."""
    real = fcntl.flock
    raced: list[str] = []

    def racing(fd: int, operation: int) -> None:
        if not raced:
            raced.append(os.readlink(f"/proc/self/fd/{fd}"))
            if race == "locked":
                raise BlockingIOError(errno.EWOULDBLOCK, "locked")
            os.unlink(raced[0])
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", racing)
    log = ExposureLog(tmp_path, flush_interval_s=0.01)
    log.start()
    add(log, 0, 10)
    log.close()
    assert log.written == 10 and raced and raced[0].endswith("-0001.bin")
    (file,) = (p for p in tmp_path.glob("*.bin") if p.stat().st_size)
    assert file.name.endswith("-0002.bin") and len(read_exposures(tmp_path)[1]) == 10


def test_a_writer_applies_retention_when_it_opens_a_file(tmp_path: Path) -> None:
    stale = group(tmp_path, f"exposure-r0-p{os.getpid()}-0001", 4000, 100)
    log = ExposureLog(tmp_path, flush_interval_s=0.01, retention=Retention(max_bytes=2000))
    log.start()
    add(log, 0, 10)
    log.close()
    assert not Path(f"{stale}.bin").exists()
    assert len(read_exposures(tmp_path)[1]) == 10


def test_no_more_warnings_than_one_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    throttled = ThrottledLog(logging.getLogger("t"), interval_s=3600)
    for _ in range(1000):
        throttled.warning("k", "disk full")
    assert caplog.text.count("disk full") == 1


def test_a_writer_that_does_not_rotate_still_ages_files_out(tmp_path: Path) -> None:
    stale = group(tmp_path, f"exposure-r0-p{os.getpid()}-0009", 100, 7200)
    log = ExposureLog(tmp_path, flush_interval_s=0.01, retention=Retention(max_age_s=3600))
    log.start()
    wait_for(lambda: not Path(f"{stale}.bin").exists(), "the periodic retention pass")
    log.close()
    assert not Path(f"{stale}.json").exists()


def test_a_planted_symlink_is_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "log.json"
    (tmp_path / "log.json.tmp").symlink_to(victim)
    write_atomic(str(target), b"{}")
    assert victim.read_text() == "precious" and target.read_bytes() == b"{}"
    (tmp_path / "log.bin").symlink_to(victim)
    with pytest.raises(FileExistsError):
        open_append(str(tmp_path / "log.bin"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_log_settings_that_make_no_sense_are_refused_by_key() -> None:
    from modelgate.config import ConfigError, validate_config
    from modelgate.logretention import retention_of

    from .support import simple_config

    config = simple_config()
    config["logs"] = {
        "retention": {"max_bytes": 4096, "max_age_h": 0, "max_files": 3},
        "diff_queue_max_bytes": 10,
    }
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    errors = "\n".join(caught.value.errors)
    assert "logs.retention.max_bytes: Input should be greater than or equal to 1048576" in errors
    assert "logs.retention.max_age_h: Input should be greater than 0" in errors
    assert "logs.retention.max_files: unknown key" in errors
    assert "logs.diff_queue_max_bytes: Input should be greater than or equal to 65536" in errors
    config["logs"] = {"retention": {"max_bytes": 1 << 30, "max_age_h": 48}}
    spec = validate_config(config).logs
    assert retention_of(spec.retention) == Retention(1 << 30, 48 * 3600.0)
    assert spec.diff_queue_max_bytes == 64 << 20
