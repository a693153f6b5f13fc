"""A canary's evidence per unit, read from the exposure and feedback records (issue 13).

The records are the source of truth for a `source: local` canary, as for the experiment's
results: each exposure carries its unit, variant, status and latency, so the checks can be
tests over units, the unit of randomization, instead of over requests (a user who sends
dozens of requests is one correlated sample, not dozens). Reading runs in a thread, never
on the loop that serves requests; the engine is shared by the canaries of a gateway and
refreshed at most once per `REFRESH_S`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from modelgate.exposure import FLAG_ENROLLED, FLAG_MEASURED

if TYPE_CHECKING:
    from modelgate.analysis_engine import AnalysisEngine
    from modelgate.canary_judge import ExperimentView
    from modelgate.stats import UnitStats

__all__ = ["REFRESH_S", "Evidence", "EvidenceSource", "RecordEvidence"]

REFRESH_S = 1.0  # the records are flushed once a second: reading more often shows nothing new

# Per unit and variant of one experiment since the canary began: its measured requests,
# errors (5xx or no answer) and latency, and what of it came since the step began.
_UNITS_SQL = f"""
SELECT variant, unit_hash,
  count(*) FILTER (WHERE ts_ns >= $step) AS step_exposures,
  count(*) FILTER (WHERE (flags & {FLAG_MEASURED}) <> 0 AND ts_ns >= $step) AS step_measured,
  count(*) FILTER (WHERE (flags & {FLAG_MEASURED}) <> 0) AS measured,
  count(*) FILTER (WHERE (flags & {FLAG_MEASURED}) <> 0 AND (status >= 500 OR status = 0))
    AS errors,
  coalesce(sum(latency_us) FILTER (WHERE (flags & {FLAG_MEASURED}) <> 0), 0)::DOUBLE
    AS latency_us
FROM exposures
WHERE experiment = $experiment AND (flags & {FLAG_ENROLLED}) <> 0 AND ts_ns >= $since
GROUP BY variant, unit_hash
"""
_LATENCY_SQL = f"""
SELECT variant, unit_hash, latency_us FROM exposures
WHERE experiment = $experiment AND ts_ns >= $since
  AND (flags & {FLAG_ENROLLED | FLAG_MEASURED}) = {FLAG_ENROLLED | FLAG_MEASURED}
"""


@dataclass(frozen=True)
class Latencies:
    """One arm's measured requests: latency in ms and the unit of each (the clusters)."""

    ms: npt.NDArray[np.float64]
    units: npt.NDArray[np.int64]


@dataclass(frozen=True)
class Evidence:
    """What a canary judges, per variant. Since the canary began: `errors` (x = the unit's
    errors, y = its measured requests) and `latency` (x = its latency in ms summed, y = its
    measured requests) over units, `latencies` per request, `feedback[metric]` (x = the
    unit's sum of values, y = its number of values). Since the step began: `step_units`
    (distinct enrolled units, the sample-ratio counts) and `step_requests` (measured)."""

    errors: dict[str, UnitStats]
    latency: dict[str, UnitStats]
    latencies: dict[str, Latencies]
    step_units: dict[str, int]
    step_requests: dict[str, int]
    feedback: dict[str, dict[str, UnitStats]] = field(default_factory=dict)
    as_of: float = 0.0
    source: str = ""


class EvidenceSource(Protocol):
    def evidence(
        self, view: ExperimentView, metrics: Sequence[str], since: float, step: float
    ) -> Evidence:
        """Blocking (call it in a thread): the evidence of records stamped at or after
        `since` (the canary's start, unix s), with `step` the current step's start."""


class RecordEvidence:
    """The records of one log directory (every worker's files), through the analysis
    engine. `open_engine` builds an engine over the directory as it is now."""

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        open_engine: Callable[[str], AnalysisEngine] | None = None,
    ) -> None:
        self.log_dir = str(log_dir)
        self._open = open_engine or _fresh_engine
        self._lock = threading.Lock()
        self._engine: AnalysisEngine | None = None
        self._read_at = -REFRESH_S
        self._as_of = 0.0

    def _current(self) -> tuple[AnalysisEngine, float]:
        """The engine, refreshed when older than REFRESH_S (under the lock: one refresh for
        every canary that asks at once)."""
        with self._lock:
            now = time.monotonic()
            if self._engine is None or now - self._read_at >= REFRESH_S:
                engine = self._open(self.log_dir)
                if self._engine is not None:
                    self._engine.close()
                self._engine, self._read_at = engine, now
                self._as_of = time.time()
            return self._engine, self._as_of

    def evidence(
        self, view: ExperimentView, metrics: Sequence[str], since: float, step: float
    ) -> Evidence:
        from modelgate.analysis_engine import AnalysisError

        engine, as_of = self._current()
        with self._lock:  # a DuckDB connection runs one query at a time
            parameters = {
                "experiment": engine.id_of("experiment", view.name),
                "since": int(since * 1e9),
                "step": int(step * 1e9),
            }
            units = engine.connection.execute(_UNITS_SQL, parameters).fetchnumpy()
            del parameters["step"]
            per_request = engine.connection.execute(_LATENCY_SQL, parameters).fetchnumpy()
            feedback: dict[str, dict[str, UnitStats]] = {}
            if metrics:
                try:
                    found = engine.query(view.name)
                except AnalysisError:
                    found = None  # no record of the experiment yet
                for metric in metrics:
                    stats = found.metrics.get((metric, "values")) if found else None
                    feedback[metric] = dict(stats) if stats else {}
        names = {variant: engine.id_of("variant", variant) for variant in view.variants}
        errors, latency, latencies = {}, {}, {}
        step_units, step_requests = {}, {}
        for variant, key in names.items():
            mine = units["variant"] == key
            measured = units["measured"][mine].astype(np.float64)
            seen = measured > 0
            errors[variant] = _stats(units["errors"][mine][seen], measured[seen])
            latency[variant] = _stats(units["latency_us"][mine][seen] / 1000.0, measured[seen])
            step_units[variant] = int((units["step_exposures"][mine] > 0).sum())
            step_requests[variant] = int(units["step_measured"][mine].sum())
            rows = per_request["variant"] == key
            latencies[variant] = Latencies(
                per_request["latency_us"][rows].astype(np.float64) / 1000.0,
                per_request["unit_hash"][rows].astype(np.int64),
            )
        return Evidence(
            errors, latency, latencies, step_units, step_requests, feedback, as_of, engine.source
        )

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None


def _stats(x: npt.ArrayLike, y: npt.ArrayLike) -> UnitStats:
    from modelgate.stats import UnitStats

    xs = np.asarray(x, dtype=np.float64)
    return UnitStats.from_samples(xs, np.asarray(y, dtype=np.float64)) if xs.size else UnitStats()


def _fresh_engine(log_dir: str) -> AnalysisEngine:
    from modelgate.analysis_engine import AnalysisEngine

    return AnalysisEngine.from_logs(log_dir, threads=1)
