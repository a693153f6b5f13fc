"""Feedback records: one compact binary record per accepted feedback item and experiment it
counts for, written off the event loop beside the exposure records (see modelgate.recordlog).

Files in `log_dir`: feedback-<start>-p<pid>-<seq>.bin (flat FEEDBACK_DTYPE records) and .json
(experiment, variant and metric ids -> names, the dtype).

FEEDBACK_DTYPE (little-endian, packed, 48 bytes; `numpy.fromfile(path, dtype=...)`):
  ts_ns          <u8   when the gateway accepted it, ns since the Unix epoch
  unit_hash      <u8   xxh64(utf8(unit id), seed=0) for feedback by unit; 0 by request id
  value          <f8   the value posted (true/false as 1.0/0.0)
  request_id     S16   for feedback by request id, the id's last 16 bytes; else empty
  experiment_id  <u2   index into the sidecar's "experiments"
  variant_id     <u2   index into "variants": the variant the gateway attributed it to
  metric_id      <u2   index into "metrics"
  flags          u1    0x01 enrolled (counted in the live results), 0x02 by request id
  pad            V1
An offline analysis joins these to the exposure records by request id (flag 0x02) or by
(experiment, unit_hash), as `modelgate analyze --logs` does.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from modelgate.recordlog import RecordLog, iter_record_files

__all__ = [
    "FEEDBACK_DTYPE",
    "FEEDBACK_NAMES",
    "FLAG_BY_REQUEST_ID",
    "FLAG_ENROLLED",
    "FeedbackLog",
    "read_feedback",
]

FEEDBACK_DTYPE = np.dtype(
    [
        ("ts_ns", "<u8"),
        ("unit_hash", "<u8"),
        ("value", "<f8"),
        ("request_id", "S16"),
        ("experiment_id", "<u2"),
        ("variant_id", "<u2"),
        ("metric_id", "<u2"),
        ("flags", "u1"),
        ("pad", "V1"),
    ]
)
assert FEEDBACK_DTYPE.itemsize == 48

FLAG_ENROLLED = 0x01
FLAG_BY_REQUEST_ID = 0x02
FEEDBACK_NAMES = {"experiment_id": "experiments", "variant_id": "variants", "metric_id": "metrics"}


class FeedbackLog(RecordLog):
    """`add()` is called on the event loop and only appends to a deque; a thread does the rest."""

    def __init__(self, log_dir: str | os.PathLike[str], **options: Any) -> None:
        super().__init__(log_dir, "feedback", FEEDBACK_DTYPE, FEEDBACK_NAMES, **options)

    def add(
        self,
        unit_hash: int,
        value: float,
        request_id: bytes,
        experiment: str,
        variant: str,
        metric: str,
        flags: int,
    ) -> None:
        self.append(
            (time.time_ns(), unit_hash, value, request_id[-16:], experiment, variant, metric, flags)
        )


def read_feedback(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every feedback file of a directory (or one file) as rows with names resolved."""
    rows: list[dict[str, Any]] = []
    for _, data, names in iter_record_files(path, "feedback", FEEDBACK_DTYPE, FEEDBACK_NAMES):
        experiments, variants, metrics = names["experiments"], names["variants"], names["metrics"]
        rows.extend(
            {
                "ts_ns": int(r["ts_ns"]),
                "unit_hash": int(r["unit_hash"]),
                "value": float(r["value"]),
                "request_id": bytes(r["request_id"]).rstrip(b"\0").decode("ascii", "replace"),
                "experiment": experiments[int(r["experiment_id"])],
                "variant": variants[int(r["variant_id"])],
                "metric": metrics[int(r["metric_id"])],
                "enrolled": bool(r["flags"] & FLAG_ENROLLED),
                "by_request_id": bool(r["flags"] & FLAG_BY_REQUEST_ID),
            }
            for r in data
        )
    return rows
