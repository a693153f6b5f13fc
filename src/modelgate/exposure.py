"""Exposure records: one compact binary record per assignment, written off the event loop once
the response is done (so it carries the response's status and latency), so an experiment's
analysis, the gateway's own error rate and latency quantiles included, can be redone offline
from the files alone.

Files in `log_dir`, per writer run and rotation sequence (see modelgate.recordlog):
  exposure-<start>-p<pid>-<seq>.bin    flat array of EXPOSURE_DTYPE records
  exposure-<start>-p<pid>-<seq>.json   sidecar: experiment and variant ids -> names, the dtype,
                                       and `meta.experiments` (variants, weights, control and
                                       analysis settings of the last config the writer saw)

EXPOSURE_DTYPE (little-endian, packed, 48 bytes; `numpy.fromfile(path, dtype=...)`):
  ts_ns          <u8   when the request was assigned, ns since the Unix epoch
  unit_hash      <u8   xxh64(utf8(unit id), seed=0)
  request_id     S16   the request id's last 16 bytes
  experiment_id  <u2   index into the sidecar's "experiments"
  variant_id     <u2   index into the sidecar's "variants" (variant names)
  flags          u1    0x01 enrolled (counted in the analysis), 0x02 forced by header,
                       0x04 measured: status and latency_us hold the response's
  pad            V1
  status         <u2   the status answered (0: none, the connection was reset or failed)
  latency_us     <u4   from the request's head to its last byte answered, in microseconds
                       (exact to 1 us, capped at 2^32-1: 71 minutes)
  pad2           V4
Without the measured flag (the client left before the answer; files of the 40-byte layout
that came before, read as LEGACY_EXPOSURE_DTYPE) status and latency are unknown, and the
record counts in the sample-ratio check and the feedback join but not in the latency and
error metrics. The queue is bounded: when the disk is slow the gateway keeps serving and
counts the drops.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from modelgate.recordfiles import LEGACY_LAYOUTS
from modelgate.recordlog import RecordLog, iter_record_files

__all__ = [
    "EXPOSURE_DTYPE",
    "EXPOSURE_NAMES",
    "FLAG_ENROLLED",
    "FLAG_FORCED",
    "FLAG_MEASURED",
    "LEGACY_EXPOSURE_DTYPE",
    "ExposureLog",
    "read_exposures",
]

EXPOSURE_DTYPE = np.dtype(
    [
        ("ts_ns", "<u8"),
        ("unit_hash", "<u8"),
        ("request_id", "S16"),
        ("experiment_id", "<u2"),
        ("variant_id", "<u2"),
        ("flags", "u1"),
        ("pad", "V1"),
        ("status", "<u2"),
        ("latency_us", "<u4"),
        ("pad2", "V4"),
    ]
)
assert EXPOSURE_DTYPE.itemsize == 48
# The layout before status and latency (read, converted, never written).
LEGACY_EXPOSURE_DTYPE = np.dtype(
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

LEGACY_LAYOUTS["exposure"] = (LEGACY_EXPOSURE_DTYPE,)

FLAG_ENROLLED = 0x01
FLAG_FORCED = 0x02
FLAG_MEASURED = 0x04
MAX_LATENCY_US = 2**32 - 1
EXPOSURE_NAMES = {"experiment_id": "experiments", "variant_id": "variants"}  # id -> table


class ExposureLog(RecordLog):
    """`add()` is called on the event loop and only appends to a deque; a thread does the rest."""

    def __init__(self, log_dir: str | os.PathLike[str], **options: Any) -> None:
        super().__init__(log_dir, "exposure", EXPOSURE_DTYPE, EXPOSURE_NAMES, **options)

    def add(
        self,
        request_id: bytes,
        unit_hash: int,
        experiment: str,
        variant: str,
        flags: int,
        status: int = 0,
        latency_us: int = 0,
        ts_ns: int | None = None,
    ) -> None:
        self.append(
            (
                time.time_ns() if ts_ns is None else ts_ns,
                unit_hash,
                request_id[-16:],
                experiment,
                variant,
                flags,
                status,
                min(latency_us, MAX_LATENCY_US),
            )
        )


def read_exposures(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Every exposure file of a directory (or one file) as one array with names resolved:
    returns (records, rows) where rows carry experiment and variant names."""
    arrays: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    for _, data, names in iter_record_files(path, "exposure", EXPOSURE_DTYPE, EXPOSURE_NAMES):
        arrays.append(data)
        rows.extend(
            {
                "ts_ns": int(r["ts_ns"]),
                "unit_hash": int(r["unit_hash"]),
                "request_id": bytes(r["request_id"]).rstrip(b"\0").decode("ascii", "replace"),
                "experiment": names["experiments"][int(r["experiment_id"])],
                "variant": names["variants"][int(r["variant_id"])],
                "enrolled": bool(r["flags"] & FLAG_ENROLLED),
                "status": int(r["status"]) if r["flags"] & FLAG_MEASURED else None,
                "latency_us": int(r["latency_us"]) if r["flags"] & FLAG_MEASURED else None,
            }
            for r in data
        )
    records = np.concatenate(arrays) if arrays else np.zeros(0, dtype=EXPOSURE_DTYPE)
    return records, rows
