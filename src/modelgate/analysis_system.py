"""The gateway's own metrics of an experiment, per unit, from the exposure records (issue 13):
each record holds its answer's status and latency (exact to 1 us), so error rate and mean
latency are ratio metrics over units, and latency quantiles come from every request, not
from a histogram's buckets. The experiment's results and the canary read the same SQL.

Only measured records count (flag 0x04: not a client that left before its answer, not a
file of the older layout); an error is a 5xx or no answer at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from modelgate.exposure import FLAG_ENROLLED, FLAG_MEASURED

if TYPE_CHECKING:
    from modelgate.stats import UnitStats

__all__ = ["ERROR", "MEASURED", "ColumnsEngine", "Latencies", "SystemUnits", "system_units"]

MEASURED = f"(flags & {FLAG_MEASURED}) <> 0"  # an exposure whose answer was measured
ERROR = "(status >= 500 OR status = 0)"  # a measured answer that failed
# Per unit and variant: measured requests, errors and latency since `since`, and what came
# since `step` (a canary's current step; 0 for an experiment's results).
_UNITS_SQL = f"""
SELECT variant, unit_hash,
  count(*) FILTER (WHERE ts_ns >= $step) AS step_exposures,
  count(*) FILTER (WHERE {MEASURED} AND ts_ns >= $step) AS step_measured,
  count(*) FILTER (WHERE {MEASURED}) AS measured,
  count(*) FILTER (WHERE {MEASURED} AND {ERROR}) AS errors,
  coalesce(sum(latency_us) FILTER (WHERE {MEASURED}), 0)::DOUBLE AS latency_us
FROM exposures
WHERE experiment = $experiment AND (flags & {FLAG_ENROLLED}) <> 0 AND ts_ns >= $since
GROUP BY variant, unit_hash
"""
# The same without bounds in time, over the live engine's partial aggregates per chunk
# (modelgate.analysis_live: per experiment, unit and variant, the enrolled exposures and the
# measured ones' errors and latency summed).
_UNITS_PARTIAL_SQL = """
SELECT variant, unit_hash, sum(exposures) AS step_exposures, sum(measured) AS step_measured,
  sum(measured) AS measured, sum(errors) AS errors, sum(latency_us)::DOUBLE AS latency_us
FROM exposure_units WHERE experiment = $experiment
GROUP BY variant, unit_hash
"""
_LATENCY_SQL = f"""
SELECT variant, unit_hash, latency_us FROM exposures
WHERE experiment = $experiment AND ts_ns >= $since
  AND (flags & {FLAG_ENROLLED | FLAG_MEASURED}) = {FLAG_ENROLLED | FLAG_MEASURED}
"""


class ColumnsEngine(Protocol):
    """What the queries need of an engine: DuckDB's (AnalysisEngine) or Spark's
    (modelgate.analysis_spark), which translates the text."""

    partial: bool  # over modelgate.analysis_live's partial aggregates

    def id_of(self, column: str, name: str) -> str | int: ...

    def fetch_columns(self, sql: str, parameters: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Latencies:
    """One arm's measured requests: latency in ms and the unit of each (the clusters), as a
    code 0..k-1 over the arm's k units."""

    ms: npt.NDArray[np.float64]
    units: npt.NDArray[np.int64]


@dataclass(frozen=True)
class SystemUnits:
    """Per variant: `errors` (x = the unit's errors, y = its measured requests) and `latency`
    (x = its latency in ms summed, y = its measured requests) over the units with a measured
    request; `latencies` per request; since `step`: `step_units` (distinct enrolled units)
    and `step_requests` (measured requests)."""

    errors: dict[str, UnitStats] = field(default_factory=dict)
    latency: dict[str, UnitStats] = field(default_factory=dict)
    latencies: dict[str, Latencies] = field(default_factory=dict)
    step_units: dict[str, int] = field(default_factory=dict)
    step_requests: dict[str, int] = field(default_factory=dict)


def system_units(
    engine: ColumnsEngine,
    experiment: str,
    variants: list[str] | tuple[str, ...],
    since_ns: int = 0,
    step_ns: int = 0,
) -> SystemUnits:
    """Runs both queries on the engine (the caller holds its connection alone)."""
    from modelgate.stats import UnitStats

    parameters = {
        "experiment": engine.id_of("experiment", experiment),
        "since": since_ns,
        "step": step_ns,
    }
    partial = engine.partial and since_ns == 0 and step_ns == 0
    units = engine.fetch_columns(
        _UNITS_PARTIAL_SQL if partial else _UNITS_SQL,
        {"experiment": parameters["experiment"]} if partial else parameters,
    )
    del parameters["step"]
    rows = engine.fetch_columns(_LATENCY_SQL, parameters)
    found = SystemUnits()
    for variant in variants:
        key = engine.id_of("variant", variant)
        mine = units["variant"] == key
        measured = np.asarray(units["measured"][mine], dtype=np.float64)
        seen = measured > 0
        if seen.sum():
            errors = np.asarray(units["errors"][mine][seen], dtype=np.float64)
            total = np.asarray(units["latency_us"][mine][seen], dtype=np.float64) / 1000.0
            found.errors[variant] = UnitStats.from_samples(errors, measured[seen])
            found.latency[variant] = UnitStats.from_samples(total, measured[seen])
        else:
            found.errors[variant] = found.latency[variant] = UnitStats()
        found.step_units[variant] = int((units["step_exposures"][mine] > 0).sum())
        found.step_requests[variant] = int(units["step_measured"][mine].sum())
        picked = rows["variant"] == key
        found.latencies[variant] = Latencies(
            np.asarray(rows["latency_us"][picked], dtype=np.float64) / 1000.0,
            _unit_codes(np.asarray(rows["unit_hash"][picked], dtype=np.int64)),
        )
    return found


def _unit_codes(units: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Each request's unit as a code 0..k-1 over its k units, in the order of their hashes,
    so the quantiles' clustering needs no sort of 10^7 ids per call: a hash table's codes
    (Arrow's dictionary encoding; a binary search per request took 1.5 s for 10^7), then
    the k distinct hashes sorted."""
    encoded = pa.array(units).dictionary_encode()
    order = np.argsort(encoded.dictionary.to_numpy())
    rank = np.empty(order.size, np.int64)
    rank[order] = np.arange(order.size)
    return np.asarray(rank[encoded.indices.to_numpy()], dtype=np.int64)
