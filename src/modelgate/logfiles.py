"""File primitives shared by the log writers (exposure, feedback, diff log): files only their
owner can read, written whole or not at all, and warnings that a full disk cannot flood.

Why here: a full disk or an I/O error in the middle of a write must never leave half a record
that shifts every later one, and a log of requests (bodies, unit hashes) is nobody else's to
read. Every writer goes through these few functions, so each rule is kept in one place.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from pathlib import Path

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "ThrottledLog",
    "make_log_dir",
    "open_append",
    "open_locked",
    "truncate_or_close",
    "write_all",
    "write_atomic",
]

FILE_MODE = 0o600  # records, payloads and sidecars: the owner only
DIR_MODE = 0o700  # a log_dir the gateway creates itself
_APPEND = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC


def write_all(fd: int, data: memoryview | bytes) -> None:
    """os.write until done; a short write followed by an error raises (ENOSPC, EIO)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def make_log_dir(path: Path) -> None:
    """Creates the directory (owner-only) if missing; an existing one is left as it is."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)


def open_append(path: str) -> int:
    """A new owner-only file opened for appending (O_EXCL: never someone else's file, never
    through a symlink); FileExistsError when the name is taken."""
    return os.open(path, _APPEND | os.O_EXCL, FILE_MODE)


_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)  # a filesystem without flock
log = logging.getLogger("modelgate.logfiles")


def open_locked(path: str) -> int:
    """open_append, holding an exclusive flock for as long as the fd is open: retention (ours,
    another worker's, another host's sharing log_dir) deletes only files it can lock, so
    never one being written, whatever the pid in its name says. FileExistsError when the
    name is taken, or when retention got the new file first (the caller tries the next name).
    """
    fd = open_append(path)
    try:
        _lock_new(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_new(fd: int, path: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # a retention pass locked it between our open and our flock
        raise FileExistsError(errno.EEXIST, "locked by another process", path) from None
    except OSError as exc:
        if exc.errno not in _NO_LOCKS:
            raise
        # Writing matters more than retention; retention cannot lock it either, so keeps it.
        _warn.warning("flock", "log file %s: no flock on this filesystem: %s", path, exc)
    opened = os.fstat(fd)
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        named = None
    if named is None or (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
        # deleted by a retention pass that locked it before we did
        raise FileExistsError(errno.EEXIST, "deleted before it was locked", path)


def write_atomic(path: str, data: bytes) -> None:
    """Replaces `path` by `data` at once (temp file + rename): a reader, or a writer killed
    half-way, never leaves half a file; on failure the old content stays and this raises."""
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)  # a stale one, left by a killed writer (or planted: never followed)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def truncate_or_close(fd: int, size: int) -> bool:
    """After a failed write: cut the file back to `size` (whole records). False when even
    that fails; the fd is then closed and the caller must start a new file."""
    try:
        os.ftruncate(fd, size)
        return True
    except OSError:
        try:
            os.close(fd)
        except OSError:
            pass
        return False


class ThrottledLog:
    """Warnings at most once per `interval_s` per key, saying how many were held back:
    a disk that stays full for an hour writes a few hundred lines, not millions."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._held[key] = self._held.get(key, 0) + 1
                return
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            message += f" ({held} more like it in the last {self.interval_s:g} s)"
        self.logger.warning(message, *args)


_warn = ThrottledLog(log)
