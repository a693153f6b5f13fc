"""Exposure records: one compact binary record per assignment, written off the event loop,
so an experiment's analysis can be redone offline from the files alone.

Files in `log_dir`, per writer run and rotation sequence:
  exposure-<start>-p<pid>-<seq>.bin    flat array of EXPOSURE_DTYPE records
  exposure-<start>-p<pid>-<seq>.json   names sidecar: experiment and variant ids -> names

EXPOSURE_DTYPE (little-endian, packed, 40 bytes; `numpy.fromfile(path, dtype=...)`):
  ts_ns          <u8   when the request was assigned, ns since the Unix epoch
  unit_hash      <u8   xxh64(utf8(unit id), seed=0)
  request_id     S16   the request id's last 16 bytes
  experiment_id  <u2   index into the sidecar's "experiments"
  variant_id     <u2   index into the sidecar's "variants" (variant names)
  flags          u1    0x01 enrolled (counted in the analysis), 0x02 forced by header
  pad            V3
The queue is bounded: when the disk is slow the gateway keeps serving and counts the drops.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EXPOSURE_DTYPE", "ExposureLog", "read_exposures"]

log = logging.getLogger("modelgate.exposure")

EXPOSURE_DTYPE = np.dtype(
    [
        ("ts_ns", "<u8"),
        ("unit_hash", "<u8"),
        ("request_id", "S16"),
        ("experiment_id", "<u2"),
        ("variant_id", "<u2"),
        ("flags", "u1"),
        ("pad", "V3"),
    ]
)
assert EXPOSURE_DTYPE.itemsize == 40

FLAG_ENROLLED = 0x01
FLAG_FORCED = 0x02

Record = tuple[int, int, bytes, str, str, int]  # ts_ns, unit_hash, rid, experiment, variant, flags


class ExposureLog:
    """`add()` is called on the event loop and only appends to a deque; a thread does the rest."""

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        queue_size: int = 262_144,
        flush_interval_s: float = 1.0,
        max_file_bytes: int = 64 << 20,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.queue_size = queue_size
        self.flush_interval_s = flush_interval_s
        self.max_file_bytes = max_file_bytes
        self._queue: deque[Record] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._names: dict[str, list[str]] = {"experiments": [], "variants": []}
        self._ids: dict[str, dict[str, int]] = {"experiments": {}, "variants": {}}
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
                target=self._loop, name="modelgate-exposure", daemon=True
            )
            self._thread.start()

    def add(
        self, request_id: bytes, unit_hash: int, experiment: str, variant: str, flags: int
    ) -> None:
        if len(self._queue) >= self.queue_size:
            self.dropped["queue_full"] += 1
            return
        self._queue.append(
            (time.time_ns(), unit_hash, request_id[-16:], experiment, variant, flags)
        )

    def close(self, timeout: float = 2.0) -> None:
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
            found = ids[name] = len(self._names[table])
            self._names[table].append(name)
        return found

    def _flush(self) -> None:
        queue = self._queue
        count = len(queue)
        if not count:
            return
        records = np.zeros(count, dtype=EXPOSURE_DTYPE)
        for i in range(count):
            ts, unit_hash, rid, experiment, variant, flags = queue.popleft()
            records[i] = (
                ts,
                unit_hash,
                rid,
                self._id("experiments", experiment),
                self._id("variants", variant),
                flags,
                b"\0\0\0",
            )
        try:
            self._write(records)
        except OSError as exc:
            self.write_errors += 1
            self.dropped["write_error"] += count
            log.warning("exposure log: cannot write %d records to %s: %s", count, self.log_dir, exc)

    def _write(self, records: np.ndarray) -> None:
        if self._path is None or self._size >= self.max_file_bytes:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._seq += 1
            self._path = self.log_dir / f"exposure-{self._run}-{self._seq:04d}.bin"
            self._size = 0
        with open(self._path, "ab") as out:
            out.write(records.tobytes())
        self._size += records.nbytes
        self.written += len(records)
        sidecar = self._path.with_suffix(".json")
        tmp = sidecar.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dict(self._names, dtype=EXPOSURE_DTYPE.descr)), "utf-8")
        os.replace(tmp, sidecar)  # atomic: a reader never sees half a names table


def read_exposures(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Every exposure file of a directory (or one file) as one array with names resolved:
    returns (records, rows) where rows carry experiment and variant names."""
    root = Path(path)
    files = sorted(root.glob("exposure-*.bin")) if root.is_dir() else [root]
    arrays: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    for file in files:
        size = file.stat().st_size
        count = size // EXPOSURE_DTYPE.itemsize  # a cut-off tail record is ignored
        data = np.fromfile(file, dtype=EXPOSURE_DTYPE, count=count)
        names = json.loads(file.with_suffix(".json").read_text("utf-8"))
        arrays.append(data)
        rows.extend(
            {
                "ts_ns": int(r["ts_ns"]),
                "unit_hash": int(r["unit_hash"]),
                "request_id": bytes(r["request_id"]).rstrip(b"\0").decode("ascii", "replace"),
                "experiment": names["experiments"][int(r["experiment_id"])],
                "variant": names["variants"][int(r["variant_id"])],
                "enrolled": bool(r["flags"] & FLAG_ENROLLED),
            }
            for r in data
        )
    records = np.concatenate(arrays) if arrays else np.zeros(0, dtype=EXPOSURE_DTYPE)
    return records, rows
