"""Retention for log_dir: the oldest closed log files go first, by total size and by age.

Why: without it the exposure, feedback and diff logs (the last holds request and response
bodies) grow until the disk is full and stay forever. A writer enforces it on its own thread
each time it opens a new file, so the event loop never waits on a directory scan.

A file group is one `<prefix>-<run>-p<pid>-<seq>` with its .bin, .json and .payloads.jsonl.
Only groups that no running writer holds are deleted. A writer holds an exclusive flock on
each file it has open for writing (the .bin from before any other file of the group exists),
and a group is deleted only while this pass holds those locks itself, taken without waiting:
a pid says nothing about a writer on another host or in another container sharing log_dir,
nor about another writer in this process. The pid is only a first filter: the files of
another live process on this host are left to it (a writer of an older version may not
lock). All files count toward the size.
"""

from __future__ import annotations

import fcntl
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
_WRITTEN = (".bin", ".payloads.jsonl")  # the files a writer holds open, and locked
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
    """kill(pid, 0) in our pid namespace: a first filter only (see the module doc)."""
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
            pid = int(match.group(1)) if match is not None else None
            # Ours or not running here: the locks decide. A live local other: its own.
            deletable = (
                base not in keep and pid is not None and (pid == os.getpid() or not _pid_alive(pid))
            )
            group = found[base] = _Group(base, [], 0, 0.0, deletable)
        group.files.append(path)
        group.size += stat.st_size
        group.mtime = max(group.mtime, stat.st_mtime)
    return sorted(found.values(), key=lambda g: (g.mtime, g.base))


def _lock(path: Path) -> int | None:
    """An fd of `path` holding its exclusive flock, taken without waiting; None when a writer
    holds it (or locks are not supported here: then nothing proves it closed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # gone meanwhile, or a symlink (never a writer's): left alone
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EWOULDBLOCK: being written; ENOLCK and the like: cannot tell
        os.close(fd)
        return None
    return fd


def _delete(group: _Group) -> bool:
    """Deletes the group if this pass can lock every file a writer would hold open; False
    (nothing deleted) when one is locked: its writer is alive, wherever it runs."""
    held: list[int] = []
    try:
        for path in group.files:
            if path.name.endswith(_WRITTEN):
                fd = _lock(path)
                if fd is None:
                    return False
                held.append(fd)
        # The records first: a .bin is never left without the sidecar that names its ids.
        for path in sorted(group.files, key=lambda p: not p.name.endswith(".bin")):
            try:
                path.unlink()  # while still locked: no writer can take the file over
            except FileNotFoundError:
                pass
        return True
    finally:
        for fd in held:
            os.close(fd)


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
        if not group.deletable or not _delete(group):
            continue
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
