"""A canary's evidence per unit, read from the exposure and feedback records (issue 13).

The records are the source of truth for a `source: local` canary, as for the experiment's
results: each exposure carries its unit, variant, status and latency, so the checks can be
tests over units, the unit of randomization, instead of over requests (a user who sends
dozens of requests is one correlated sample, not dozens). Reading runs in a thread, never
on the loop that serves requests; each canary reads a time-bounded engine of the directory
(since it began), refreshed at most once per `REFRESH_S`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from modelgate.analysis.system import SystemUnits, system_units

if TYPE_CHECKING:
    from modelgate.release.judge import ExperimentView
    from modelgate.stats import UnitStats

__all__ = ["REFRESH_S", "Evidence", "EvidenceSource", "RecordEvidence", "warm_up"]

REFRESH_S = 1.0  # the records are flushed once a second: reading more often shows nothing new


@dataclass(frozen=True)
class Evidence:
    """What a canary judges: `system`, the gateway's own metrics per unit since the canary
    began (and, since the step began, the distinct units and measured requests: the
    sample-ratio counts and min_samples), and per feedback metric and variant the units'
    sums of values over their number of values (x = sum, y = count)."""

    system: SystemUnits
    feedback: dict[str, dict[str, UnitStats]] = field(default_factory=dict)
    as_of: float = 0.0
    source: str = ""


class EvidenceSource(Protocol):
    def evidence(
        self,
        view: ExperimentView,
        metrics: Sequence[str],
        since: float,
        step: float,
        quantiles: Sequence[float] = (),
    ) -> Evidence:
        """Blocking (call it in a thread): the evidence of records stamped at or after
        `since` (the canary's start, unix s), with `step` the current step's start; the
        feedback `metrics` and the latency `quantiles` that the checks judge."""


class RecordEvidence:
    """The records of one log directory (every worker's files), through the time-bounded
    engine of the canary's start (LiveEngine.bounded of the process's live engine for the
    directory, modelgate.analysis.live): it holds only what came since, read incrementally
    (only new files and the new tails of grown ones) and refreshed at most once per
    REFRESH_S however often the canary looks. The feedback is held there as per-unit
    partial sums, which no query could cut at the canary's start; its exposures keep their
    time, which the counts since the current step need."""

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self.log_dir = str(log_dir)

    def evidence(
        self,
        view: ExperimentView,
        metrics: Sequence[str],
        since: float,
        step: float,
        quantiles: Sequence[float] = (),
    ) -> Evidence:
        from modelgate.analysis.engine import AnalysisError
        from modelgate.analysis.live import live_engine

        if not os.path.isdir(self.log_dir):
            raise AnalysisError(f"{self.log_dir}: no records yet (not a directory)")
        since_ns, step_ns = int(since * 1e9), int(step * 1e9)
        live = live_engine(self.log_dir).bounded(since_ns)
        last = live.last
        stale = last is None or time.time() - last.started >= REFRESH_S
        feedback: dict[str, dict[str, UnitStats]] = {}
        with live.snapshot(refresh=stale) as (engine, _):
            as_of, source = time.time(), engine.source
            system = system_units(engine, view.name, view.variants, since_ns, step_ns, quantiles)
            if metrics:
                try:
                    found = engine.query(view.name)
                except AnalysisError:
                    found = None  # no record of the experiment since the canary began
                for metric in metrics:
                    stats = found.metrics.get((metric, "values")) if found else None
                    feedback[metric] = dict(stats) if stats else {}
        return Evidence(system, feedback, as_of, source)

    def close(self) -> None:
        """The live engine is the process's (close_live_engines drops it)."""


def warm_up() -> None:
    """Imports what the first look needs: the engine (DuckDB) and pandas, which pyarrow
    imports the first time it converts an array (~0.4 s). Called at start-up; else the first
    judgement imports them in its thread, holding the GIL and the import lock for most of
    that time while the loop serves requests (the proxy bench's max latency showed it)."""
    import numpy as np
    import pyarrow as pa

    import modelgate.analysis.engine  # noqa: F401

    pa.array(np.zeros(1, np.int64))
