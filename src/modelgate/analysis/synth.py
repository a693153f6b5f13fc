"""Synthetic exposure and feedback record files in the real format, with repeat visitors:
heavy-tailed requests per unit, several feedback values per unit, feedback by unit and by
request id, feedback nobody was exposed for, a few units moved between variants. For the
analysis engine's tests and benchmark (issue 13): vectorised, so 10 million records take
seconds, written by several "workers" whose sidecars list the names in different orders.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelgate.exposure import EXPOSURE_DTYPE, FLAG_ENROLLED, FLAG_FORCED, FLAG_MEASURED
from modelgate.feedbacklog import FEEDBACK_DTYPE, FLAG_BY_REQUEST_ID

__all__ = ["Synthetic", "write_synthetic"]

T0_NS = 1_795_996_800 * 10**9  # 2026-11-30T00:00Z: the records span two UTC dates


@dataclass(frozen=True)
class Synthetic:
    """What to generate; shares are of the exposures or of the feedback records."""

    units: int = 1000
    exposures: int = 10_000
    feedback: int = 10_000
    experiment: str = "ranker"
    variants: tuple[str, ...] = ("control", "candidate")
    metrics: tuple[str, ...] = ("clicks", "revenue", "views")
    by_request: float = 0.2  # feedback by request id
    orphans: float = 0.01  # feedback of units never exposed, or of unknown request ids
    unenrolled: float = 0.01  # exposures forced by header (not enrolled)
    switched: float = 0.01  # exposures whose variant is not the unit's first
    reused_ids: float = 0.01  # exposures whose request id another request had too
    workers: int = 2
    records_per_file: int = 1 << 20
    other_experiment: bool = True  # a second experiment the query must leave out
    seed: int = 13


def _sidecar(prefix: str, dtype: np.dtype[Any], tables: dict[str, list[str]]) -> bytes:
    meta: dict[str, Any] = {"experiments": {}}
    return json.dumps(dict(tables, dtype=dtype.descr, format=prefix, meta=meta)).encode()


def _write(
    out: Path, prefix: str, records: np.ndarray, tables: dict[str, list[str]], spec: Synthetic
) -> None:
    """Splits the records over workers and files; each worker lists names in its own order
    (reversed for odd workers), so a reader must map each file's ids through its sidecar."""
    worker = np.arange(len(records)) % spec.workers
    for w in range(spec.workers):
        mine = records[worker == w]
        order = {t: (names[::-1] if w % 2 else names) for t, names in tables.items()}
        for field, table in (("experiment_id", "experiments"), ("variant_id", "variants")):
            remap = np.array([order[table].index(n) for n in tables[table]], dtype=np.uint16)
            mine[field] = remap[mine[field]]
        if "metrics" in tables:
            remap = np.array([order["metrics"].index(n) for n in tables["metrics"]], np.uint16)
            mine["metric_id"] = remap[mine["metric_id"]]
        for seq, start in enumerate(range(0, max(len(mine), 1), spec.records_per_file)):
            base = str(out / f"{prefix}-20261130T000000.{w:06d}Z-p{1000 + w}-{seq + 1:04d}")
            mine[start : start + spec.records_per_file].tofile(base + ".bin")
            Path(base + ".json").write_bytes(_sidecar(prefix, records.dtype, order))


def write_synthetic(out: str | os.PathLike[str], spec: Synthetic = Synthetic()) -> Path:
    """Writes the files into `out` (created) and returns it; the experiments' designs go into
    the exposure sidecars as the gateway writes them."""
    rng = np.random.default_rng(spec.seed)
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    experiments = [spec.experiment] + (["other"] if spec.other_experiment else [])
    n_variants = len(spec.variants)
    hashes = rng.integers(1, 2**63, size=spec.units, dtype=np.int64).astype(np.uint64) * 2 + 1
    weights = 1.0 / (np.arange(spec.units) + 5.0) ** 1.1  # a few heavy units, many light ones
    unit_of = rng.choice(spec.units, size=spec.exposures, p=weights / weights.sum())
    ex = np.zeros(spec.exposures, dtype=EXPOSURE_DTYPE)
    ex["ts_ns"] = T0_NS + rng.integers(0, 2 * 86_400 * 10**9, size=spec.exposures)
    ex["unit_hash"] = hashes[unit_of]
    ex["request_id"] = rng.integers(0, 256, size=(spec.exposures, 16), dtype=np.uint8).view("S16")[
        :, 0
    ]
    again = np.flatnonzero(rng.random(spec.exposures) < spec.reused_ids)  # a client's fixed id
    ex["request_id"][again] = ex["request_id"][rng.integers(0, spec.exposures, again.size)]
    variant = ((hashes[unit_of] >> np.uint64(7)) % np.uint64(n_variants)).astype(np.uint16)
    moved = rng.random(spec.exposures) < spec.switched
    variant[moved] = (variant[moved] + 1) % n_variants
    ex["variant_id"] = variant
    ex["experiment_id"] = (rng.random(spec.exposures) < 0.05) if spec.other_experiment else 0
    forced = rng.random(spec.exposures) < spec.unenrolled
    ex["flags"] = np.where(forced, FLAG_FORCED, FLAG_ENROLLED)
    # The answer: 1% errors, latency log-normal around 20 ms; 1% of clients left before it.
    measured = rng.random(spec.exposures) >= 0.01
    ex["flags"] |= np.where(measured, FLAG_MEASURED, 0).astype(np.uint8)
    ex["status"] = np.where(measured, np.where(rng.random(spec.exposures) < 0.01, 503, 200), 0)
    ex["latency_us"] = np.where(measured, rng.lognormal(np.log(20_000), 0.5, spec.exposures), 0)

    fb = np.zeros(spec.feedback, dtype=FEEDBACK_DTYPE)
    source = rng.integers(0, spec.exposures, size=spec.feedback)  # heavy units post more
    by_request = rng.random(spec.feedback) < spec.by_request
    fb["ts_ns"] = ex["ts_ns"][source] + rng.integers(0, 60 * 10**9, size=spec.feedback)
    fb["unit_hash"] = np.where(by_request, 0, ex["unit_hash"][source])
    fb["request_id"] = np.where(by_request, ex["request_id"][source], b"")
    fb["experiment_id"] = ex["experiment_id"][source]
    fb["variant_id"] = ex["variant_id"][source]
    metric = rng.integers(0, len(spec.metrics), size=spec.feedback).astype(np.uint16)
    fb["metric_id"] = metric
    values = np.round(rng.lognormal(0.0, 1.0, size=spec.feedback), 3)
    fb["value"] = np.where(metric == 0, rng.random(spec.feedback) < 0.3, values)
    fb["flags"] = np.where(by_request, FLAG_BY_REQUEST_ID, 0) | FLAG_ENROLLED
    orphan = rng.random(spec.feedback) < spec.orphans
    fake = rng.integers(1, 2**62, size=spec.feedback, dtype=np.int64).astype(np.uint64) * 2
    fb["unit_hash"] = np.where(orphan & ~by_request, fake, fb["unit_hash"])
    fb["request_id"] = np.where(
        orphan & by_request, fake.view("S8").astype("S16"), fb["request_id"]
    )

    names = {"experiments": experiments, "variants": list(spec.variants)}
    _write(target, "exposure", ex, names, spec)
    _write(target, "feedback", fb, dict(names, metrics=list(spec.metrics)), spec)
    design = {
        "name": spec.experiment,
        "variants": list(spec.variants),
        "weights": [1] * n_variants,
        "control": spec.variants[0],
    }
    for side in target.glob("exposure-*.json"):  # the designs, as the gateway writes them
        document = json.loads(side.read_bytes())
        document["meta"] = {"experiments": {spec.experiment: design}}
        side.write_bytes(json.dumps(document).encode())
    return target
