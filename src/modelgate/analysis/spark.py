"""The analysis on Apache Spark (issue 13): the same query as the embedded engine, for a
fleet of gateways whose logs were collected in one place.

The SQL is modelgate.analysis.sql's DuckDB text translated by sqlglot to Spark's dialect (no
second copy of the grouping to drift), run over the Parquet roll-up (`exposures/`,
`feedback/`, hive-partitioned, and `designs.json`) wherever Spark reads it: a local path,
file://, hdfs://, s3a://. A local log directory of raw record files is rolled up first
(modelgate.analysis.load.write_parquet, into a temporary directory unless told where). The
rows become ExperimentUnits through modelgate.analysis.engine.experiment_units, so
modelgate.analysis.unit_results gives the same results as over DuckDB.

pyspark is the optional extra `spark`; Spark runs on Java (17 or later for pyspark 4).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from modelgate.analysis.engine import AnalysisError, ExperimentUnits, experiment_units
from modelgate.analysis.load import write_parquet
from modelgate.analysis.sql import experiment_query, quote

__all__ = ["SparkAnalysisEngine", "SparkUnavailable", "local_session", "roll_up_of"]

INSTALL_HINT = "pip install 'modelgate[spark]'"
DEFAULT_MASTER = "local[2]"

# The columns of an empty feedback table (a roll-up before any feedback arrived).
_EMPTY_FEEDBACK = (
    "experiment STRING, variant STRING, metric STRING, ts_ns BIGINT, unit_hash BIGINT, "
    "rid_hi BIGINT, rid_lo BIGINT, value DOUBLE, flags SMALLINT, date STRING"
)


class SparkUnavailable(AnalysisError):
    """pyspark or Java is missing; the message says what to install."""


def _pyspark() -> Any:
    """The pyspark.sql module, or a message naming the extra (imported late: a 300 MB
    dependency that most users never need)."""
    try:
        import pyspark.sql
    except ImportError as exc:
        raise SparkUnavailable(f"the Spark engine needs pyspark: {INSTALL_HINT}") from exc
    return pyspark.sql


def _sqlglot() -> Any:
    try:
        import sqlglot
    except ImportError as exc:  # a dependency of pyspark's extra, but installable alone
        raise SparkUnavailable(f"the Spark engine needs sqlglot: {INSTALL_HINT}") from exc
    return sqlglot


def _java_missing() -> bool:
    home = os.environ.get("JAVA_HOME")
    if home and Path(home, "bin", "java").exists():
        return False
    return shutil.which("java") is None


def local_session(master: str = DEFAULT_MASTER) -> Any:
    """A SparkSession for the analysis on `master`. On a local master (the default, 2
    cores): a shuffle partition per core (not 200: the per-variant rows are tiny), no
    adaptive execution, no UI, no progress bars; on any master Spark's logs at ERROR and
    partition values kept as text (an experiment named '123' is not a number). A session
    that is running already is reused (getOrCreate), with the partition setting applied."""
    sql = _pyspark()
    if _java_missing():
        raise SparkUnavailable(
            "the Spark engine needs Java (17 or later for pyspark 4): no `java` on PATH and "
            "JAVA_HOME unset; on Debian or Ubuntu: apt-get install default-jre-headless"
        )
    # Spark's own logging at ERROR, so `modelgate analyze` prints results, not JVM chatter.
    log4j = Path(__file__).with_name("spark_log4j2.properties")
    builder = (
        sql.SparkSession.builder.master(master)
        .appName("modelgate-analysis")
        .config("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
        .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile={log4j.as_uri()}")
    )
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # no warning about the hostname
        builder = (
            builder.config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.shuffle.partitions", str(_local_cores(master)))
            # Adaptive execution runs each stage as a job of its own: on one machine that
            # overhead, not the data, is the time (a query took 50-65 s with it, 28-38 without).
            .config("spark.sql.adaptive.enabled", "false")
        )
    try:
        with warnings.catch_warnings():  # pyspark's own notice about pandas versions
            warnings.simplefilter("ignore", FutureWarning)
            session = builder.getOrCreate()
    except Exception as exc:  # pyspark raises its own errors when the JVM cannot start
        raise SparkUnavailable(
            f"Spark did not start ({exc}); it needs Java 17 or later (pyspark 4) on PATH or "
            "in JAVA_HOME"
        ) from exc
    session.sparkContext.setLogLevel("ERROR")
    logging.getLogger("py4j").setLevel(logging.WARNING)  # its INFO lines on every stop
    session.conf.set("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
    return session


def _local_cores(master: str) -> int:
    """The cores of a local master: local, local[N], local[*], local[N,F]."""
    inside = master.partition("[")[2].partition("]")[0].partition(",")[0]
    if inside == "*":
        return os.cpu_count() or 1
    return int(inside) if inside.isdigit() else 1


def _is_local(path: str) -> bool:
    """A plain path (rolled up here if it holds record files); a URI, file:// included,
    is Spark's to read and must be a roll-up."""
    return urlparse(path).scheme == ""


def roll_up_of(path: str, out: str | os.PathLike[str] | None = None) -> tuple[str, str | None]:
    """Where Spark reads `path` from: a Parquet roll-up (any URI, or a directory with an
    `exposures/` subdirectory) as it is; a local log directory of record files rolled up
    first, into `out` or a new temporary directory. Returns (the roll-up, the temporary
    directory to delete afterwards or None)."""
    if not _is_local(path):
        return path, None  # a roll-up where the fleet's logs were collected
    local = Path(path)
    if not local.is_dir():
        raise AnalysisError(f"{path}: not a directory")
    if (local / "exposures").is_dir():
        return str(local.resolve()), None
    temporary = None
    if out is None:
        temporary = tempfile.mkdtemp(prefix="modelgate-parquet-")
        out = temporary
    write_parquet(local, out)
    return str(Path(out).resolve()), temporary


class SparkAnalysisEngine:
    """AnalysisEngine's face (experiments, query, binary_metrics, fetch_columns, id_of,
    designs, source, close) over a Parquet roll-up read by Spark. One query per experiment,
    as over DuckDB, and the gateway's own metrics (modelgate.analysis.system) too."""

    partial = False  # reads the raw records, never partial aggregates
    timed = True  # its exposures carry ts_ns and status

    def __init__(
        self,
        session: Any,
        root: str,
        designs: dict[str, dict[str, Any]],
        source: str,
        *,
        owns_session: bool = False,
        temporary: str | None = None,
    ) -> None:
        self.session = session
        self.root = root
        self.designs = designs
        self.source = source
        self._owns_session = owns_session
        self._temporary = temporary
        self._known: list[str] | None = None
        self._tables = {name: self._read(name) for name in ("exposures", "feedback")}

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        session: Any = None,
        master: str = DEFAULT_MASTER,
        parquet_out: str | os.PathLike[str] | None = None,
    ) -> SparkAnalysisEngine:
        """Over `path`: a Parquet roll-up (local or any URI Spark reads) or a local log
        directory (rolled up first, into `parquet_out` or a temporary directory). `session`:
        a SparkSession of the caller's (kept open by close), else a local one on `master`."""
        _sqlglot()
        # A session that was running already (a notebook's, spark-submit's, a test's) is
        # used and left running; one started here is stopped by close().
        owns = session is None and _pyspark().SparkSession.getActiveSession() is None
        if session is None:
            session = local_session(master)
        temporary = None
        try:
            root, temporary = roll_up_of(os.fspath(path), parquet_out)
            designs = _read_designs(session, root)
            source = f"Parquet roll-up in {root} (Spark)"
            if temporary is not None or parquet_out is not None:
                source = f"record files in {path}, rolled up to {root} (Spark)"
            return cls(session, root, designs, source, owns_session=owns, temporary=temporary)
        except BaseException:
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)
            if owns:
                session.stop()
            raise

    def _read(self, name: str) -> Any:
        """One table of the roll-up; a missing feedback table is an empty one (no feedback
        yet is no error), a missing exposures table is."""
        from pyspark.errors import AnalysisException

        location = self.root.rstrip("/") + "/" + name
        try:
            return self.session.read.option("basePath", location).parquet(location)
        except AnalysisException as exc:
            if name == "exposures":
                raise AnalysisError(
                    f"{self.root}: no Parquet roll-up here (no readable exposures/: {exc})"
                ) from exc
            return self.session.createDataFrame([], schema=_EMPTY_FEEDBACK)

    def _frame(self, duckdb_sql: str, parameters: dict[str, Any] | None = None) -> Any:
        """DuckDB-dialect text as a Spark DataFrame: `$name` parameters made literals, then
        translated by sqlglot, over this engine's tables (registered again each time, so
        engines can share one session)."""
        sqlglot = _sqlglot()
        values = parameters or {}

        def literal(match: re.Match[str]) -> str:
            value = values[match.group(1)]
            return quote(value) if isinstance(value, str) else str(int(value))

        text = sqlglot.transpile(
            re.sub(r"\$(\w+)", literal, duckdb_sql), read="duckdb", write="spark"
        )[0]
        for name, frame in self._tables.items():
            frame.createOrReplaceTempView(name)
        return self.session.sql(text)

    def _sql(self, duckdb_sql: str) -> list[dict[str, Any]]:
        return [row.asDict() for row in self._frame(duckdb_sql).collect()]

    def id_of(self, column: str, name: str) -> str:
        """What the tables hold for a name: the name (Parquet keeps names, not ids)."""
        return name

    def fetch_columns(self, sql: str, parameters: dict[str, Any]) -> dict[str, Any]:
        """A DuckDB-dialect query's result as numpy columns, as AnalysisEngine.fetch_columns
        (modelgate.analysis.system's queries): through Arrow where pyspark has it (4.0+),
        since the per-request latencies are a row per request."""
        frame = self._frame(sql, parameters)
        if hasattr(frame, "toArrow"):
            table = frame.toArrow()
            return {name: table.column(name).to_numpy() for name in table.column_names}
        rows = frame.collect()
        return {name: np.array([row[name] for row in rows]) for name in frame.columns}

    def release(self) -> None:
        """Nothing to give back: Spark's memory is its executors'."""

    def experiments(self) -> list[str]:
        """The experiments with a design or with exposure records, sorted."""
        if self._known is None:
            rows = self._sql("SELECT DISTINCT experiment FROM exposures")
            found = {str(row["experiment"]) for row in rows}
            self._known = sorted(set(self.designs) | found)
        return self._known

    def query(self, experiment: str, ratios: Sequence[tuple[str, str]] = ()) -> ExperimentUnits:
        """Runs the experiment's query; `ratios`: (metric, denominator metric) pairs."""
        if experiment not in self.experiments():
            raise AnalysisError(
                f"no experiment named {experiment!r} in {self.source} "
                f"(found: {', '.join(self.experiments()) or 'none'})"
            )
        rows = self._sql(experiment_query(ratios, quote(experiment)))
        return experiment_units(experiment, self.designs.get(experiment, {}), rows)

    def binary_metrics(self, experiment: str) -> dict[str, bool]:
        """Per metric: True when every value is 0 or 1, as AnalysisEngine.binary_metrics
        says (the test holds them equal)."""
        rows = self._sql(
            "SELECT metric, bool_and(value = 0 OR value = 1) AS zero_one FROM feedback "
            f"WHERE experiment = {quote(experiment)} GROUP BY metric"
        )
        return {str(row["metric"]): bool(row["zero_one"]) for row in rows}

    def close(self) -> None:
        """Stops the session if this engine started it; deletes a temporary roll-up."""
        if self._owns_session:
            self.session.stop()
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)


def _read_designs(session: Any, root: str) -> dict[str, dict[str, Any]]:
    """The roll-up's designs.json, read through Spark (so from any URI it reads); without it
    the experiments are still found in the records, only the variants' order is lost."""
    if _is_local(root):
        try:
            found: Any = json.loads((Path(root) / "designs.json").read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}
    from pyspark.errors import AnalysisException

    try:
        rows = session.read.text(root.rstrip("/") + "/designs.json", wholetext=True).collect()
        found = json.loads(rows[0][0]) if rows else {}
    except (AnalysisException, ValueError):
        return {}
    return found if isinstance(found, dict) else {}
