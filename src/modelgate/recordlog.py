"""Append-only logs of fixed-size numpy records (exposures, feedback), written off the event
loop by one thread per log, with a JSON names sidecar per file so a reader needs nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RecordLog", "iter_record_files"]

log = logging.getLogger("modelgate.recordlog")


class RecordLog:
    """Files `<prefix>-<start>-p<pid>-<seq>.bin` (flat arrays of `dtype`) and `.json` sidecars.

    `append()` runs on the event loop and only appends a tuple to a deque (no lock: one
    producer, one consumer); the thread turns queued tuples into records once a second.
    A tuple holds every field of `dtype` except those named `pad*`, in dtype order; the
    fields listed in `names` hold strings that the thread replaces by ids into the sidecar's
    table of that name. The queue is bounded: when the disk is slow the gateway keeps serving
    and counts the drops. `meta` (set from the event loop) is written into every sidecar.
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
    ) -> None:
        self.log_dir = Path(log_dir)
        self.prefix = prefix
        self.dtype = dtype
        self.fields = [f for f in dtype.names or () if not f.startswith("pad")]
        self.named = dict(names)  # field -> sidecar table
        self.queue_size = queue_size
        self.flush_interval_s = flush_interval_s
        self.max_file_bytes = max_file_bytes
        self.meta: dict[str, Any] = {}
        self._queue: deque[tuple[Any, ...]] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tables: dict[str, list[str]] = {table: [] for table in self.named.values()}
        self._ids: dict[str, dict[str, int]] = {table: {} for table in self.named.values()}
        now = time.time_ns()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9))
        self._run = f"{stamp}.{now // 1000 % 10**6:06d}Z-p{os.getpid()}"
        self._seq = 0
        self._size = 0
        self._path: Path | None = None
        self.written = 0
        self.write_errors = 0
        self.dropped: Counter[str] = Counter()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name=f"modelgate-{self.prefix}", daemon=True
            )
            self._thread.start()

    def append(self, row: tuple[Any, ...]) -> None:
        if len(self._queue) >= self.queue_size:
            self.dropped["queue_full"] += 1
            return
        self._queue.append(row)

    def close(self, timeout: float = 2.0) -> None:
        """Stops the thread after a last flush (bounded by `timeout`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def stats(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "write_errors": self.write_errors,
            "dropped": dict(self.dropped),
            "queued": len(self._queue),
        }

    # --- the writer thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self._flush()
        self._flush()

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
        records = np.zeros(count, dtype=self.dtype)
        # zip(*rows) transposes in C; names are mapped once per distinct value, not per row.
        for name, column in zip(self.fields, zip(*rows, strict=True), strict=True):
            table = self.named.get(name)
            if table:
                ids = {value: self._id(table, value) for value in dict.fromkeys(column)}
                records[name] = [ids[value] for value in column]
            else:
                records[name] = column
        try:
            self._write(records)
        except OSError as exc:
            self.write_errors += 1
            self.dropped["write_error"] += count
            log.warning(
                "%s log: cannot write %d records to %s: %s", self.prefix, count, self.log_dir, exc
            )

    def _write(self, records: np.ndarray) -> None:
        if self._path is None or self._size >= self.max_file_bytes:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._seq += 1
            self._path = self.log_dir / f"{self.prefix}-{self._run}-{self._seq:04d}.bin"
            self._size = 0
        with open(self._path, "ab") as out:
            out.write(records.tobytes())
        self._size += records.nbytes
        self.written += len(records)
        sidecar = self._path.with_suffix(".json")
        tmp = sidecar.with_suffix(".json.tmp")
        document = dict(self._tables, dtype=self.dtype.descr, format=self.prefix, meta=self.meta)
        tmp.write_text(json.dumps(document), "utf-8")
        os.replace(tmp, sidecar)  # atomic: a reader never sees half a names table


def iter_record_files(
    path: str | os.PathLike[str], prefix: str, dtype: np.dtype[Any]
) -> Iterator[tuple[Path, np.ndarray, dict[str, Any]]]:
    """Each `<prefix>-*.bin` file of a directory (or the one file given), in name order, as
    (path, records, sidecar). A cut-off tail record (a killed writer) is ignored."""
    root = Path(path)
    files = sorted(root.glob(f"{prefix}-*.bin")) if root.is_dir() else [root]
    for file in files:
        count = file.stat().st_size // dtype.itemsize
        data = np.fromfile(file, dtype=dtype, count=count)
        sidecar: dict[str, Any] = json.loads(file.with_suffix(".json").read_text("utf-8"))
        yield file, data, sidecar
