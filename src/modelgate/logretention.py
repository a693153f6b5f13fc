"""Retention for log_dir: the oldest closed log files go first, by total size and by age.

Why: without it the exposure, feedback and diff logs (the last holds request and response
bodies) grow until the disk is full and stay forever. A writer enforces it on its own thread
each time it opens a new file, so the event loop never waits on a directory scan.

A file group is one `<prefix>-<run>-p<pid>-<seq>` with its .bin, .json and .payloads.jsonl.
Only groups that no running writer holds are deleted: this process's files other than the
one it writes, and files of processes that are gone. Another live worker's files count
toward the size but are left to that worker.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from modelgate.config import RetentionSpec
from modelgate.logfiles import ThrottledLog

__all__ = ["RETAIN_EVERY_S", "Retention", "enforce_retention", "retain", "retention_of"]

RETAIN_EVERY_S = 60.0  # besides each new file: a writer that rarely rotates still ages out
log = logging.getLogger("modelgate.logretention")
_warn = ThrottledLog(log)

_SUFFIXES = (".payloads.jsonl", ".json.tmp", ".json", ".bin")
_PID = re.compile(r"-p(\d+)-\d+$")


@dataclass(frozen=True, slots=True)
class Retention:
    """Limits for one log's files in log_dir; None: no limit."""

    max_bytes: int | None = None
    max_age_s: float | None = None

    @property
    def active(self) -> bool:
        return self.max_bytes is not None or self.max_age_s is not None


def retention_of(spec: RetentionSpec) -> Retention:
    """The writers' form of the config's `logs.retention`."""
    age = spec.max_age_h * 3600.0 if spec.max_age_h is not None else None
    return Retention(spec.max_bytes, age)


@dataclass(slots=True)
class _Group:
    base: str
    files: list[Path]
    size: int
    mtime: float
    deletable: bool


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def _groups(log_dir: Path, prefix: str, keep: Collection[str]) -> list[_Group]:
    found: dict[str, _Group] = {}
    for path in log_dir.glob(f"{prefix}-*"):
        name = path.name
        base = next((name[: -len(s)] for s in _SUFFIXES if name.endswith(s)), None)
        if base is None:
            continue
        try:
            stat = path.stat()
        except OSError:
            continue  # deleted meanwhile
        group = found.get(base)
        if group is None:
            match = _PID.search(base)
            mine = match is not None and int(match.group(1)) == os.getpid()
            deletable = base not in keep and (
                mine or (match is not None and not _pid_alive(int(match.group(1))))
            )
            group = found[base] = _Group(base, [], 0, 0.0, deletable)
        group.files.append(path)
        group.size += stat.st_size
        group.mtime = max(group.mtime, stat.st_mtime)
    return sorted(found.values(), key=lambda g: (g.mtime, g.base))


def _delete(group: _Group) -> None:
    # The records first: a .bin is never left without the sidecar that names its ids.
    for path in sorted(group.files, key=lambda p: not p.name.endswith(".bin")):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def enforce_retention(
    log_dir: Path,
    prefix: str,
    retention: Retention,
    keep: Collection[str] = (),
    now: float | None = None,
) -> tuple[int, int]:
    """Deletes the oldest deletable file groups of `prefix` older than max_age_s, then until
    the total size fits max_bytes. `keep`: base paths (without suffix) never deleted, the
    files being written. Returns (groups deleted, bytes freed); raises OSError on a scan error.
    """
    if not retention.active:
        return 0, 0
    now = time.time() if now is None else now
    keep_names = {Path(base).name for base in keep}
    groups = _groups(log_dir, prefix, keep_names)
    total = sum(group.size for group in groups)
    deleted = freed = 0
    for group in groups:  # oldest first
        too_old = retention.max_age_s is not None and now - group.mtime > retention.max_age_s
        too_big = retention.max_bytes is not None and total > retention.max_bytes
        if not (too_old or too_big):
            if retention.max_age_s is None:
                break
            continue
        if not group.deletable:
            continue
        _delete(group)
        deleted += 1
        freed += group.size
        total -= group.size
    return deleted, freed


def retain(log_dir: Path, prefix: str, retention: Retention, open_base: str) -> None:
    """enforce_retention for a writer thread: logs what it deleted; a failure is a
    (throttled) warning, never an exception, since retention must not stop the writing."""
    if not retention.active:
        return
    try:
        deleted, freed = enforce_retention(log_dir, prefix, retention, keep=[open_base])
    except OSError as exc:
        _warn.warning(prefix, "%s log: retention in %s: %s", prefix, log_dir, exc)
        return
    if deleted:
        log.info("%s log: retention deleted %d files (%d bytes)", prefix, deleted, freed)
