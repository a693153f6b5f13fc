"""The gateway's own metrics of an experiment, per unit, from the exposure records (issue 13):
each record holds its answer's status and latency (exact to 1 us), so error rate and mean
latency are ratio metrics over units, and latency quantiles come from every request, not
from a histogram's buckets. The experiment's results and the canary read the same SQL.

Only measured records count (flag 0x04: not a client that left before its answer, not a
file of the older layout); an error is a 5xx or no answer at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from modelgate.exposure import FLAG_ENROLLED, FLAG_MEASURED

if TYPE_CHECKING:
    from modelgate.stats import QuantileEstimate, UnitStats

__all__ = [
    "ERROR",
    "GUARDRAIL_QUANTILES",
    "MEASURED",
    "ArmQuantiles",
    "ColumnsEngine",
    "SystemUnits",
    "system_units",
]

GUARDRAIL_QUANTILES = (0.5, 0.9, 0.99)  # the latency quantiles every result shows, per arm

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
# The same without bounds in time, from the live engine's partial aggregates per chunk
# (modelgate.analysis.live: per experiment, unit and variant, the enrolled exposures and the
# measured ones' errors and latency summed), summed per unit by _dense_unit_sums.
_UNITS_PARTIAL_SQL = """
SELECT variant, unit_hash, exposures, measured, errors, latency_us
FROM exposure_units WHERE experiment = $experiment
"""
_LATENCY_SQL = f"""
SELECT variant, unit_hash, latency_us FROM exposures
WHERE experiment = $experiment AND ts_ns >= $since
  AND (flags & {FLAG_ENROLLED | FLAG_MEASURED}) = {FLAG_ENROLLED | FLAG_MEASURED}
"""
_LATENCY_UNTIMED_SQL = _LATENCY_SQL.replace(" AND ts_ns >= $since", "")


class ColumnsEngine(Protocol):
    """What the queries need of an engine: DuckDB's (AnalysisEngine) or Spark's
    (modelgate.analysis.spark), which translates the text."""

    partial: bool  # over modelgate.analysis.live's partial aggregates, units as codes
    timed: bool  # its exposures carry ts_ns and status (the live engine's unbounded do not)

    def id_of(self, column: str, name: str) -> str | int: ...

    def fetch_columns(self, sql: str, parameters: dict[str, Any]) -> dict[str, Any]: ...

    def release(self) -> None:
        """Gives back what the engine kept of the queries so far (between reads of 10^7 rows)."""


@dataclass(frozen=True)
class ArmQuantiles:
    """One arm's latency quantiles in ms over its measured requests: per level the estimate
    with its variance clustered by unit (modelgate.stats.quantile_estimates), or why there
    is none (too few requests or units), with then the plain sample quantile in `sample`.
    Estimated as each arm is read, so that no arm's requests (10^7 of them, 150 MB) are
    held while another's are read or while the results are computed."""

    requests: int
    estimates: dict[float, QuantileEstimate | str]
    sample: dict[float, float]

    @classmethod
    def of(
        cls,
        values: npt.ArrayLike,
        units: npt.ArrayLike,
        levels: Sequence[float],
        per_ms: float = 1.0,
    ) -> ArmQuantiles:
        """`values` over `per_ms` are the latencies in ms (per_ms 1000 for whole microseconds,
        which are sorted as integers: less memory than floats); `units`: each request's unit
        as a small non-negative integer (0..k-1, or the live engine's codes) or any id."""
        from modelgate.stats import quantile_estimates

        data = np.asarray(values)
        try:
            found = quantile_estimates(data, units, levels)
        except ValueError as exc:
            found = dict.fromkeys((float(q) for q in levels), str(exc))
        estimates: dict[float, QuantileEstimate | str] = {
            q: e if isinstance(e, str) else e.divided(per_ms) for q, e in found.items()
        }
        sample = {
            q: float(np.quantile(data, q, method="inverted_cdf")) / per_ms
            for q, e in estimates.items()
            if isinstance(e, str) and data.size
        }
        return cls(int(data.size), estimates, sample)

    def at(self, q: float) -> QuantileEstimate | str:
        """The estimate at level q, or why there is none (also: a level not asked for)."""
        return self.estimates.get(q, f"the p{q * 100:g} latency was not read")


@dataclass(frozen=True)
class SystemUnits:
    """Per variant: `errors` (x = the unit's errors, y = its measured requests) and `latency`
    (x = its latency in ms summed, y = its measured requests) over the units with a measured
    request; `quantiles` of the latency per request; since `step`: `step_units` (distinct
    enrolled units) and `step_requests` (measured requests)."""

    errors: dict[str, UnitStats] = field(default_factory=dict)
    latency: dict[str, UnitStats] = field(default_factory=dict)
    quantiles: dict[str, ArmQuantiles] = field(default_factory=dict)
    step_units: dict[str, int] = field(default_factory=dict)
    step_requests: dict[str, int] = field(default_factory=dict)


def system_units(
    engine: ColumnsEngine,
    experiment: str,
    variants: list[str] | tuple[str, ...],
    since_ns: int = 0,
    step_ns: int = 0,
    quantiles: Sequence[float] = GUARDRAIL_QUANTILES,
) -> SystemUnits:
    """Runs the queries on the engine (the caller holds its connection alone); `quantiles`:
    the latency quantiles to estimate per arm."""
    from modelgate.stats import UnitStats

    parameters = {
        "experiment": engine.id_of("experiment", experiment),
        "since": since_ns,
        "step": step_ns,
    }
    unbounded = since_ns == 0 and step_ns == 0
    if not engine.timed and not unbounded:
        raise ValueError("bounds in time need an engine whose exposures carry ts_ns (bounded)")
    if engine.partial and unbounded:
        rows = engine.fetch_columns(_UNITS_PARTIAL_SQL, {"experiment": parameters["experiment"]})
        units = _dense_unit_sums(rows)
        del rows
    else:
        units = engine.fetch_columns(_UNITS_SQL, parameters)
    del parameters["step"]
    if not engine.timed:
        del parameters["since"]
    # One arm at a time: the engine filters on the variant faster than numpy picks its rows
    # out of every arm's (and each arm's arrays are freed before the next arm's are made).
    per_arm = (_LATENCY_SQL if engine.timed else _LATENCY_UNTIMED_SQL) + " AND variant = $variant"
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
        rows = engine.fetch_columns(per_arm, {**parameters, "variant": key})
        us = np.asarray(rows.pop("latency_us"))
        codes = _unit_codes(np.asarray(rows.pop("unit_hash")), dense=engine.partial)
        found.quantiles[variant] = ArmQuantiles.of(us, codes, quantiles, per_ms=1000.0)
        del us, codes
    return found


def _dense_unit_sums(rows: dict[str, Any]) -> dict[str, npt.NDArray[Any]]:
    """_UNITS_SQL's columns from the partial rows of the live engine, whose units are codes
    (small integers): summed per variant and unit by counting into a slot per code, where
    DuckDB's grouping hashed 1.7 million rows (0.24 s of the endpoint's 2)."""
    names = ("step_exposures", "step_measured", "measured", "errors", "latency_us")
    sources = ("exposures", "measured", "measured", "errors", "latency_us")
    parts: dict[str, list[npt.NDArray[Any]]] = {n: [] for n in ("variant", "unit_hash", *names)}
    variant = np.asarray(rows["variant"])
    for key in np.unique(variant):
        mine = variant == key
        unit = np.asarray(rows["unit_hash"][mine], dtype=np.intp)
        present = np.flatnonzero(np.bincount(unit))
        parts["variant"].append(np.full(present.size, key, dtype=variant.dtype))
        parts["unit_hash"].append(present)
        summed: dict[str, npt.NDArray[Any]] = {}
        for name, source in zip(names, sources, strict=True):
            if source not in summed:
                weights = np.asarray(rows[source][mine], dtype=np.float64)
                summed[source] = np.bincount(unit, weights=weights)[present]
            parts[name].append(summed[source])
    return {n: np.concatenate(p) if p else np.zeros(0) for n, p in parts.items()}


def _unit_codes(units: npt.NDArray[Any], dense: bool) -> npt.NDArray[Any]:
    """Each request's unit as a small non-negative integer, so that the quantiles'
    clustering needs no sort of 10^7 ids per call. `dense`: the units are the live engine's
    codes already; else hashes, coded 0..k-1 by a hash table (Arrow's dictionary encoding;
    a binary search per request took 1.5 s for 10^7)."""
    if dense:
        return units
    encoded = pa.array(units.astype(np.int64, copy=False)).dictionary_encode()
    return np.asarray(encoded.indices.to_numpy(), dtype=np.int64)
