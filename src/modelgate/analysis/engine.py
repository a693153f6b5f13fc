"""The embedded SQL engine of the analysis (issue 13): DuckDB groups the exposure and feedback
records per unit, then per variant over units, in one query per experiment (the text is in
modelgate.analysis.sql); modelgate.stats does the statistics on what it returns.

The engine reads either a log directory (every worker's record files, via Arrow, without a
copy of the columns) or a Parquet roll-up of them (modelgate.analysis.load.write_parquet),
through the same SQL. The records hold no status or latency, so the gateway's error rate and
latency per request are not among the metrics here: the exposure format would have to grow.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from modelgate.analysis.load import FEEDBACK_COLUMNS, load_tables
from modelgate.analysis.sql import SINCE, experiment_query, quote
from modelgate.stats import UnitStats

__all__ = ["AnalysisEngine", "AnalysisError", "ExperimentUnits", "experiment_units"]


# What the query reads of the feedback, held as two tables (by unit, by request id) that
# one view joins: 3 bytes a record less than the files hold, 16 more for most records.
ENGINE_FEEDBACK_COLUMNS = tuple(c for c in FEEDBACK_COLUMNS if c not in ("variant", "flags"))
_FEEDBACK_VIEW = """CREATE VIEW feedback AS
SELECT experiment, metric, ts_ns, unit_hash, 0::BIGINT AS rid_hi, 0::BIGINT AS rid_lo, value,
  0::UTINYINT AS flags
FROM feedback_by_unit
UNION ALL
SELECT experiment, metric, ts_ns, 0::BIGINT, rid_hi, rid_lo, value, 2::UTINYINT
FROM feedback_by_request
"""


class AnalysisError(ValueError):
    """A bad input to the engine (a missing directory, an unknown experiment); the message
    names it."""


@dataclass(frozen=True)
class ExperimentUnits:
    """What the query returns for one experiment, per variant (every variant of the design,
    with zeros where no unit came). `exposures[v]`: x = exposures per unit (y unused), so
    `.count` is the SRM input; `metrics[(metric, denominator)][v]`: x = the unit's sum of the
    metric, y = its exposures (`"exposures"`), its number of values (`"values"`) or another
    metric's sum (that metric's name); `values[metric][v]`: values counted; `excluded[metric]`:
    (units, values) that no enrolled exposure claims; `ambiguous[metric]`: values by request
    id dropped because their id tail was exposed to several units or variants;
    `switched[v]`: units exposed to several variants (they count in their first)."""

    experiment: str
    variants: list[str]
    exposures: dict[str, UnitStats]
    metrics: dict[tuple[str, str], dict[str, UnitStats]] = field(default_factory=dict)
    values: dict[str, dict[str, int]] = field(default_factory=dict)
    excluded: dict[str, tuple[int, int]] = field(default_factory=dict)
    ambiguous: dict[str, int] = field(default_factory=dict)
    switched: dict[str, int] = field(default_factory=dict)

    @property
    def units(self) -> dict[str, int]:
        """Distinct enrolled units per variant: the sample-ratio check counts these."""
        return {variant: stats.count for variant, stats in self.exposures.items()}


def _stats(row: dict[str, Any]) -> UnitStats:
    """SQL's avg/var_samp/covar_samp (NULL for one unit) as UnitStats."""
    n = int(row["units"])
    return UnitStats.from_moments(
        n,
        float(row["mean_x"] or 0.0),
        float(row["mean_y"] or 0.0),
        float(row["var_x"] or 0.0) * (n - 1),
        float(row["var_y"] or 0.0) * (n - 1),
        float(row["cov_xy"] or 0.0) * (n - 1),
        nonzero_x=int(row["nonzero_x"] or 0),
    )


class AnalysisEngine:
    """One DuckDB connection over `exposures` and `feedback`; `threads` bounds its cores."""

    def __init__(
        self,
        connection: duckdb.DuckDBPyConnection,
        designs: dict[str, dict[str, Any]],
        source: str,
        names: dict[str, list[str]] | None = None,
        partial: bool = False,
        timed: bool = True,
    ) -> None:
        self.connection = connection
        self.partial = partial  # over partial aggregates (experiment_query's `partial`)
        self.timed = timed  # its exposures carry ts_ns and status (not the live engine's)
        self.designs = designs
        self.source = source
        self.names = names or {}  # column -> names by id, where the tables hold ids
        self._known: list[str] | None = None
        # How to open the connection again over the same in-memory tables (release()).
        self._reopen: tuple[Callable[[], duckdb.DuckDBPyConnection], dict[str, pa.Table]] | None
        self._reopen = None

    def _name(self, column: str, value: Any) -> Any:
        """A name the query returned, from its id where the tables hold ids."""
        table = self.names.get(column)
        return table[value] if table is not None and value is not None else value

    def id_of(self, column: str, name: str) -> str | int:
        """What the tables hold for a name (a query's parameter): its id, or the name."""
        return self._id(column, name)

    def fetch_columns(self, sql: str, parameters: dict[str, Any]) -> dict[str, Any]:
        """A query's result as numpy columns (modelgate.analysis.system's queries, which the
        Spark engine runs too)."""
        columns: dict[str, Any] = self.connection.execute(sql, parameters).fetchnumpy()
        return columns

    def _id(self, column: str, name: str) -> str | int:
        """What the tables hold for a name: its id (-1, matching nothing, when unknown)."""
        table = self.names.get(column)
        if table is None:
            return name
        return table.index(name) if name in table else -1

    @staticmethod
    def _connect(threads: int | None, memory_limit: str | None) -> duckdb.DuckDBPyConnection:
        # Row order is never relied on: without it DuckDB needs less memory.
        config: dict[str, str | bool | int | float | list[str]] = {
            "preserve_insertion_order": False
        }
        if threads:
            config["threads"] = threads
        if memory_limit:  # DuckDB's own working memory (beyond it, it spills to disk)
            config["memory_limit"] = memory_limit
        return duckdb.connect(":memory:", config=config)

    @classmethod
    def from_logs(
        cls,
        path: str | os.PathLike[str],
        threads: int | None = None,
        memory_limit: str | None = None,
    ) -> AnalysisEngine:
        """Over the record files of a log directory (damaged parts skipped and logged)."""
        if not Path(path).is_dir():
            raise AnalysisError(f"{path}: not a directory")
        tables = load_tables(path, feedback_columns=ENGINE_FEEDBACK_COLUMNS, split_feedback=True)
        exposures, by_unit, by_request, names = tables.as_ids()  # sharing its buffers
        assert by_request is not None
        source = f"{tables.files} record files in {path}"
        return cls.from_tables(
            exposures, by_unit, by_request, names, tables.designs, source, threads, memory_limit
        )

    @classmethod
    def from_tables(
        cls,
        exposures: pa.Table,
        by_unit: pa.Table,
        by_request: pa.Table,
        names: dict[str, list[str]],
        designs: dict[str, dict[str, Any]],
        source: str,
        threads: int | None = None,
        memory_limit: str | None = None,
    ) -> AnalysisEngine:
        """Over Arrow tables whose name columns hold ids into `names` (DuckDB reads them in
        place, no copy): the exposures and the feedback by unit and by request id, as
        `load_tables(..., split_feedback=True).as_ids()` gives them."""
        connection = cls._connect(threads, memory_limit)
        connection.register("exposures", exposures)
        connection.register("feedback_by_unit", by_unit)
        connection.register("feedback_by_request", by_request)
        connection.execute(_FEEDBACK_VIEW)
        return cls(connection, designs, source, names)

    @classmethod
    def from_partials(
        cls,
        tables: dict[str, pa.Table],
        names: dict[str, list[str]],
        designs: dict[str, dict[str, Any]],
        source: str,
        threads: int | None = None,
        memory_limit: str | None = None,
        *,
        timed: bool = False,
        exposed: Sequence[str] | None = None,
    ) -> AnalysisEngine:
        """Over the partial aggregates that modelgate.analysis.live keeps (`exposure_units`,
        `feedback_units`), the exposures (`exposures`: with ts_ns and status when `timed`),
        `feedback_by_request` and `resolved_requests`, name columns as ids into `names`;
        read in place."""
        connection = cls._connect(threads, memory_limit)
        for name, table in tables.items():
            connection.register(name, table)
        engine = cls(connection, designs, source, names, partial=True, timed=timed)
        engine._reopen = lambda: cls._connect(threads, memory_limit), tables
        if exposed is not None:  # the experiments the exposures name, known to the caller
            engine._known = sorted(set(designs) | set(exposed))
        return engine

    @classmethod
    def from_parquet(
        cls,
        path: str | os.PathLike[str],
        threads: int | None = None,
        memory_limit: str | None = None,
    ) -> AnalysisEngine:
        """Over a Parquet roll-up (`exposures/` and `feedback/`, hive-partitioned)."""
        root = Path(path)
        if not (root / "exposures").is_dir():
            raise AnalysisError(f"{path}: no Parquet roll-up here (no exposures/ directory)")
        connection = cls._connect(threads, memory_limit)
        for name in ("exposures", "feedback"):
            files = quote(str(root / name / "**" / "*.parquet"))
            if any((root / name).glob("**/*.parquet")):
                connection.execute(
                    f"CREATE VIEW {name} AS SELECT * FROM read_parquet({files}, "
                    "hive_partitioning = true, hive_types_autocast = false)"  # '123' stays text
                )
            else:  # an empty table of the right shape: no feedback yet is no error
                connection.execute(f"CREATE TABLE {name} AS {_EMPTY[name]}")
        designs: dict[str, dict[str, Any]] = {}
        try:
            designs = json.loads((root / "designs.json").read_text())
        except (OSError, ValueError):
            pass  # the experiments are still found in the records; only the order is lost
        return cls(connection, designs, f"Parquet roll-up in {path}")

    def experiments(self) -> list[str]:
        """The experiments with a design or with exposure records, sorted."""
        if self._known is None:
            rows = self.connection.execute("SELECT DISTINCT experiment FROM exposures").fetchall()
            found = {str(self._name("experiment", row[0])) for row in rows}
            self._known = sorted(set(self.designs) | found)
        return self._known

    def query(
        self,
        experiment: str,
        ratios: Sequence[tuple[str, str]] = (),
        since_ns: int | None = None,
    ) -> ExperimentUnits:
        """Runs the experiment's query; `ratios`: (metric, denominator metric) pairs;
        `since_ns`: only the records with ts_ns >= it (a canary's, since it started)."""
        if experiment not in self.experiments():
            raise AnalysisError(
                f"no experiment named {experiment!r} in {self.source} "
                f"(found: {', '.join(self.experiments()) or 'none'})"
            )
        pairs = [(self._id("metric", m), self._id("metric", d)) for m, d in ratios]
        parameter: dict[str, Any] = {"experiment": self._id("experiment", experiment)}
        if since_ns is not None:
            parameter["since"] = since_ns
        if since_ns is not None and self.partial:
            raise AnalysisError("this engine's records are bounded in time when read")
        sql = experiment_query(
            pairs, since=None if since_ns is None else SINCE, partial=self.partial
        )
        cursor = self.connection.execute(sql, parameter)
        columns = [d[0] for d in cursor.description or ()]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
        for row in rows:
            row["variant"] = self._name("variant", row["variant"])
            row["metric"] = self._name("metric", row["metric"])
            if row["denominator"] not in (None, "exposures", "values") and "metric" in self.names:
                row["denominator"] = self._name("metric", int(row["denominator"]))
        return experiment_units(experiment, self.designs.get(experiment, {}), rows)

    def binary_metrics(self, experiment: str, since_ns: int | None = None) -> dict[str, bool]:
        """Per metric of the experiment's feedback: True when every value is 0 or 1. A
        metric without a declared kind is then analysed as a proportion (modelgate.analysis.results
        decides the same from the live moments)."""
        parameter: dict[str, Any] = {"experiment": self._id("experiment", experiment)}
        bound = ""
        if since_ns is not None:
            if self.partial:
                raise AnalysisError("this engine's records are bounded in time when read")
            parameter["since"], bound = since_ns, f" AND ts_ns >= {SINCE}"
        source, test = "feedback", "bool_and(value = 0 OR value = 1)"
        if self.partial:  # each partial says whether its values were all 0 or 1
            source = (
                "(SELECT experiment, metric, zero_one FROM feedback_units UNION ALL "
                "SELECT experiment, metric, value = 0 OR value = 1 FROM feedback_by_request) AS f"
            )
            test = "bool_and(zero_one)"
        cursor = self.connection.execute(
            f"SELECT metric, {test} FROM {source} "
            f"WHERE experiment = $experiment{bound} GROUP BY metric",
            parameter,
        )
        return {str(self._name("metric", m)): bool(b) for m, b in cursor.fetchall()}

    def release(self) -> None:
        """Gives back the memory DuckDB kept after the queries so far (its allocator holds
        what a query freed, ~200 MB after one over 10^7 records, until its database
        closes): a new connection over the same tables, where the engine reads its tables
        in place; else nothing."""
        if self._reopen is None:
            return
        connect, tables = self._reopen
        self.connection.close()
        self.connection = connect()
        for name, table in tables.items():
            self.connection.register(name, table)

    def close(self) -> None:
        self.connection.close()


def experiment_units(
    experiment: str, design: dict[str, Any], rows: Sequence[dict[str, Any]]
) -> ExperimentUnits:
    """The rows of `experiment_query` (names resolved) as ExperimentUnits: one function for
    every engine that runs the query (DuckDB here, Spark in modelgate.analysis.spark), so
    their results cannot differ in how they are read."""
    seen = sorted({str(r["variant"]) for r in rows if r["variant"] is not None})
    variants = list(design.get("variants", [])) + [
        v for v in seen if v not in design.get("variants", [])
    ]
    result = ExperimentUnits(experiment, variants, {v: UnitStats() for v in variants})
    result.switched.update({v: 0 for v in variants})
    for row in rows:
        kind, variant, metric = row["kind"], row["variant"], row["metric"]
        if kind == "units":
            result.exposures[variant] = _stats(row)
            result.switched[variant] = int(row["nonzero_x"])
        elif kind == "excluded":
            result.excluded[metric] = (int(row["units"]), int(row["n_values"]))
        elif kind == "ambiguous":
            result.ambiguous[metric] = int(row["n_values"])
        else:
            key = (metric, row["denominator"])
            per_variant = result.metrics.setdefault(key, {v: UnitStats() for v in variants})
            per_variant[variant] = _stats(row)
            counted = result.values.setdefault(metric, {v: 0 for v in variants})
            counted[variant] = int(row["n_values"])
    return result


_EMPTY = {
    "exposures": "SELECT NULL::VARCHAR AS experiment, NULL::VARCHAR AS variant, "
    "0::BIGINT AS ts_ns, 0::BIGINT AS unit_hash, 0::BIGINT AS rid_hi, 0::BIGINT AS rid_lo, "
    "0::UTINYINT AS flags LIMIT 0",
    "feedback": "SELECT NULL::VARCHAR AS experiment, NULL::VARCHAR AS variant, "
    "NULL::VARCHAR AS metric, 0::BIGINT AS ts_ns, 0::BIGINT AS unit_hash, 0::BIGINT AS rid_hi, "
    "0::BIGINT AS rid_lo, 0.0::DOUBLE AS value, 0::UTINYINT AS flags LIMIT 0",
}
