"""Append-only logs of fixed-size numpy records (exposures, feedback), written off the event
loop by one thread per log, with a JSON names sidecar per file so a reader needs nothing else.

Disk trouble (a full disk, EIO) costs the records of the batch that failed, counted, and
nothing else: the file is cut back to whole records (or given up for a new one), the
sidecar is written before the records that need its names, and the thread keeps running
and writes again once there is room. Readers are in modelgate.recordfiles.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modelgate.logfiles import (
    ThrottledLog,
    make_log_dir,
    open_locked,
    truncate_or_close,
    write_all,
    write_atomic,
)
from modelgate.logretention import RETAIN_EVERY_S, Retention, retain
from modelgate.recordfiles import iter_record_files

__all__ = ["RecordLog", "iter_record_files"]

log = logging.getLogger("modelgate.recordlog")


class RecordLog:
    """Files `<prefix>-<start>-p<pid>-<seq>.bin` (flat arrays of `dtype`) and `.json` sidecars.

    `append()` runs on the event loop and only appends a tuple to a deque (no lock: one
    producer, one consumer); the thread turns queued tuples into records once a second.
    A tuple holds every field of `dtype` except those named `pad*`, in dtype order; the
    fields listed in `names` hold strings that the thread replaces by ids into the sidecar's
    table of that name. A table holds as many names as its id field can count (65,536 for
    <u2); a name past that starts a new file whose tables start empty. The queue is bounded:
    when the disk is slow the gateway keeps serving and counts the drops. `meta` (set from
    the event loop) is written into every sidecar; `retention` is applied on each new file.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        prefix: str,
        dtype: np.dtype[Any],
        names: Mapping[str, str],
        *,
        queue_size: int = 262_144,
        flush_interval_s: float = 1.0,
        max_file_bytes: int = 64 << 20,
        retention: Retention | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.prefix = prefix
        self.dtype = dtype
        self.fields = [f for f in dtype.names or () if not f.startswith("pad")]
        self.named = dict(names)  # field -> sidecar table
        self.capacity = {  # table -> how many names its id field can count
            table: int(np.iinfo(dtype[field]).max) + 1 for field, table in self.named.items()
        }
        self.queue_size = queue_size
        self.flush_interval_s = flush_interval_s
        self.max_file_bytes = max_file_bytes
        self.retention = retention or Retention()
        self.meta: dict[str, Any] = {}
        self._queue: deque[tuple[Any, ...]] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dead = False  # the thread ended without being asked to: append() counts drops
        self._tables: dict[str, list[str]] = {}
        self._ids: dict[str, dict[str, int]] = {}
        self._fresh_tables()
        now = time.time_ns()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9))
        self._run = f"{stamp}.{now // 1000 % 10**6:06d}Z-p{os.getpid()}"
        self._seq = 0
        self._size = 0
        self._fd: int | None = None
        self._base = ""
        self._sidecar_state: tuple[Any, ...] = ()
        self._retain_at = 0.0
        self._warn = ThrottledLog(log)
        self.written = 0
        self.write_errors = 0
        self.last_error = ""
        self.dropped: Counter[str] = Counter()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name=f"modelgate-{self.prefix}", daemon=True
            )
            self._thread.start()

    def append(self, row: tuple[Any, ...]) -> None:
        if self._dead:
            self.dropped["writer_dead"] += 1
            return
        if len(self._queue) >= self.queue_size:
            self.dropped["queue_full"] += 1
            return
        self._queue.append(row)

    def close(self, timeout: float = 2.0) -> bool:
        """Stops the thread after a last flush, waiting up to `timeout` s. False when it
        had not finished: what it still held is lost with the process, and logged."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        thread.join(max(timeout, 0.0))
        if thread.is_alive():
            lost = len(self._queue)
            self.dropped["stop_deadline"] += lost
            log.warning(
                "%s log: not flushed within %.1f s at stop: %d records lost",
                self.prefix,
                timeout,
                lost,
            )
            return False
        return True

    def stats(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "write_errors": self.write_errors,
            "last_error": self.last_error,
            "dropped": dict(self.dropped),
            "queued": len(self._queue),
            "alive": self._thread is not None and not self._dead,
        }

    # --- the writer thread ---------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.flush_interval_s):
                self._guarded_flush()
            self._guarded_flush()
        finally:
            self._close_file()
            if not self._stop.is_set():
                self._dead = True
                log.error("%s log: the writer thread ended; records are dropped", self.prefix)

    def _guarded_flush(self) -> None:
        """A bug here must not end the thread: the batch is dropped, counted and logged."""
        try:
            self._flush()
            if time.monotonic() >= self._retain_at:
                self._retain()
        except Exception as exc:
            self.write_errors += 1
            self.last_error = f"internal: {exc!r}"
            log.exception("%s log: writer error", self.prefix)

    def _fresh_tables(self) -> None:
        self._tables = {table: [] for table in self.named.values()}
        self._ids = {table: {} for table in self.named.values()}

    def _fits(self, rows: list[tuple[Any, ...]], columns: list[tuple[Any, ...]]) -> int:
        """How many of `rows` (from the first) the names tables can still take."""
        named = [(self.fields.index(f), t) for f, t in self.named.items()]
        if all(  # the usual case, column by column in C: every new name fits
            len(self._tables[t]) + len(set(columns[i]) - self._ids[t].keys()) <= self.capacity[t]
            for i, t in named
        ):
            return len(rows)
        fresh: dict[str, set[str]] = {table: set() for _, table in named}
        for count, row in enumerate(rows):
            for index, table in named:
                name = row[index]
                if name in self._ids[table] or name in fresh[table]:
                    continue
                if len(self._tables[table]) + len(fresh[table]) >= self.capacity[table]:
                    return count
                fresh[table].add(name)
        return len(rows)

    def _encode(self, columns: list[tuple[Any, ...]]) -> np.ndarray:
        records = np.zeros(len(columns[0]), dtype=self.dtype)
        # Names are mapped once per distinct value, not per row.
        for name, column in zip(self.fields, columns, strict=True):
            table = self.named.get(name)
            if table:
                ids = {value: self._id(table, value) for value in dict.fromkeys(column)}
                records[name] = [ids[value] for value in column]
            else:
                records[name] = column
        return records

    def _id(self, table: str, name: str) -> int:
        ids = self._ids[table]
        found = ids.get(name)
        if found is None:
            found = ids[name] = len(self._tables[table])
            self._tables[table].append(name)
        return found

    def _flush(self) -> None:
        queue = self._queue
        count = len(queue)
        if not count:
            return
        popleft = queue.popleft
        rows = [popleft() for _ in range(count)]
        done = self.written + self.dropped["write_error"]
        try:
            self._write_rows(rows)
        except Exception:  # a bug: what this batch did not write is lost, and counted
            self.dropped["internal_error"] += count - (
                self.written + self.dropped["write_error"] - done
            )
            raise

    def _write_rows(self, rows: list[tuple[Any, ...]]) -> None:
        while rows:
            columns = list(zip(*rows, strict=True))  # transposed in C
            fits = self._fits(rows, columns)
            if fits == 0:  # a table is full: a new file, whose sidecar starts empty tables
                self._close_file()
                self._fresh_tables()
                log.info("%s log: a names table is full; starting a new file", self.prefix)
                continue
            if fits < len(rows):
                rows, columns = rows[fits:], list(zip(*rows[:fits], strict=True))
            else:
                rows = []
            self._write_batch(self._encode(columns))

    def _write_batch(self, records: np.ndarray) -> None:
        try:
            self._write(records)
        except OSError as exc:
            self.write_errors += 1
            self.dropped["write_error"] += len(records)
            self.last_error = f"write: {exc}"
            self._warn.warning(
                "write",
                "%s log: cannot write %d records to %s: %s (dropped and counted)",
                self.prefix,
                len(records),
                self.log_dir,
                exc,
            )
            return
        self.written += len(records)

    def _write(self, records: np.ndarray) -> None:
        if self._fd is None or self._size >= self.max_file_bytes:
            self._open()
        fd = self._fd
        assert fd is not None
        state = (tuple(len(t) for t in self._tables.values()), id(self.meta))
        if state != self._sidecar_state:
            self._write_sidecar()  # before the records that need its names
            self._sidecar_state = state
        try:
            write_all(fd, records.tobytes())
        except OSError:
            # Half a batch may have landed: cut back to whole records, or give the file
            # up, so no later record is written at a misaligned offset.
            if not truncate_or_close(fd, self._size):
                self._fd = None
            raise
        self._size += records.nbytes

    def _open(self) -> None:
        self._close_file()
        make_log_dir(self.log_dir)
        while True:
            self._seq += 1
            base = str(self.log_dir / f"{self.prefix}-{self._run}-{self._seq:04d}")
            try:
                self._fd = open_locked(base + ".bin")  # retention skips it while open
                break
            except FileExistsError:
                continue
        self._base, self._size, self._sidecar_state = base, 0, ()
        self._retain()

    def _retain(self) -> None:
        self._retain_at = time.monotonic() + RETAIN_EVERY_S
        retain(self.log_dir, self.prefix, self.retention, self._base)

    def _write_sidecar(self) -> None:
        document = dict(self._tables, dtype=self.dtype.descr, format=self.prefix, meta=self.meta)
        write_atomic(self._base + ".json", json.dumps(document).encode())

    def _close_file(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
