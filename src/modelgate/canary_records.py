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

from modelgate.analysis_system import Latencies, system_units

if TYPE_CHECKING:
    from modelgate.analysis_engine import AnalysisEngine
    from modelgate.canary_judge import ExperimentView
    from modelgate.stats import UnitStats

__all__ = ["REFRESH_S", "Evidence", "EvidenceSource", "Latencies", "RecordEvidence", "warm_up"]

REFRESH_S = 1.0  # the records are flushed once a second: reading more often shows nothing new


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
        """The engine, refreshed when older than REFRESH_S (the caller holds the lock)."""
        now = time.monotonic()
        if self._engine is None or now - self._read_at >= REFRESH_S:
            engine = self._open(self.log_dir)
            if self._engine is not None:
                self._engine.close()
            self._engine, self._read_at, self._as_of = engine, now, time.time()
        return self._engine, self._as_of

    def evidence(
        self, view: ExperimentView, metrics: Sequence[str], since: float, step: float
    ) -> Evidence:
        from modelgate.analysis_engine import AnalysisError

        # One lock over the refresh and the queries: a DuckDB connection runs one query at
        # a time, and no other caller may close the engine under this one.
        with self._lock:
            engine, as_of = self._current()
            system = system_units(
                engine, view.name, view.variants, int(since * 1e9), int(step * 1e9)
            )
            feedback: dict[str, dict[str, UnitStats]] = {}
            if metrics:
                try:
                    found = engine.query(view.name)
                except AnalysisError:
                    found = None  # no record of the experiment yet
                for metric in metrics:
                    stats = found.metrics.get((metric, "values")) if found else None
                    feedback[metric] = dict(stats) if stats else {}
        return Evidence(
            system.errors,
            system.latency,
            system.latencies,
            system.step_units,
            system.step_requests,
            feedback,
            as_of,
            engine.source,
        )

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None


def warm_up() -> None:
    """Imports what the first look needs: the engine (DuckDB) and pandas, which pyarrow
    imports the first time it converts an array (~0.4 s). Called at start-up; else the first
    judgement imports them in its thread, holding the GIL and the import lock for most of
    that time while the loop serves requests (the proxy bench's max latency showed it)."""
    import numpy as np
    import pyarrow as pa

    import modelgate.analysis_engine  # noqa: F401

    pa.array(np.zeros(1, np.int64))


def _fresh_engine(log_dir: str) -> AnalysisEngine:
    from modelgate.analysis_engine import AnalysisEngine

    return AnalysisEngine.from_logs(log_dir, threads=1)
