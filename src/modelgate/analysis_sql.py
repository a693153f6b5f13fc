"""The text of the analysis query: per unit first, then per variant over units (issue 13).

One query per experiment over two tables (or views) named `exposures` and `feedback`, with
the columns that modelgate.analysis_load gives them (the record files' fields, names
resolved, the request id's tail as two int64 halves, unit hashes as int64: the same bits as
the records' uint64, so warehouses without unsigned types can hold them). Written in
DuckDB's dialect; `for_dialect` translates it with sqlglot for a warehouse.

The rows it returns (column `kind`):
  units     per variant: enrolled units (the SRM input), x = exposures per unit,
            nonzero_x = units whose enrolled exposures span several variants (a ramp or a
            change of salt moved them; they stay in their first variant)
  metric    per variant, metric and denominator: the moments over units of x (the unit's
            sum of the metric) and y (its exposures, its number of values, or another
            metric's sum); a unit without values has x = 0
  excluded  per metric: values (and distinct units) that no enrolled exposure of the
            experiment claims: units never exposed, request ids never seen
  ambiguous per metric: values by request id whose 16-byte id tail the experiment's
            exposures show for more than one (unit hash, variant) (two ids with one tail,
            or one id reused): dropped, never attributed to either (n_values; issue 12)
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "DIALECTS",
    "PARAMETER",
    "REQUEST_UNITS",
    "SINCE",
    "experiment_query",
    "for_dialect",
    "quote",
]

DIALECTS = ("bigquery", "snowflake", "clickhouse", "spark", "trino")
PARAMETER = "$experiment"  # DuckDB's named parameter; a literal in printed queries

_MOMENTS = """count(*) AS units,
    avg(x) AS mean_x, avg(y) AS mean_y, var_samp(x) AS var_x, var_samp(y) AS var_y,
    covar_samp(x, y) AS cov_xy, sum(CASE WHEN x <> 0 THEN 1 ELSE 0 END) AS nonzero_x,
    sum(n) AS n_values"""

# Subqueries, not CTEs: a CTE read twice is materialized (DuckDB), which costs more than
# scanning the Arrow columns again.
_EXPOSED = """(SELECT unit_hash, variant, ts_ns, rid_hi, rid_lo FROM exposures
    WHERE experiment = {experiment} AND (flags & 1) = 1{since})"""
_CLAIMS = """(SELECT unit_hash, variant, rid_hi, rid_lo, flags FROM exposures
    WHERE experiment = {experiment}{since})"""
_FEEDBACK = """(SELECT metric, unit_hash, rid_hi, rid_lo, value FROM feedback
    WHERE experiment = {experiment} AND (flags & 2) = {by_request}{since})"""
SINCE = "$since"  # DuckDB's named parameter of the optional lower bound on ts_ns
# The same query over partial aggregates (modelgate.analysis_live keeps them per chunk of a
# record file): per (experiment, unit, variant) the enrolled exposures and the first one's
# ts_ns; per (experiment, unit, metric) the sum and number of values by unit. The raw rows
# are the partials of one record each.
_EXPOSED_PARTIAL = """(SELECT unit_hash, variant, ts_ns, exposures FROM exposure_units
    WHERE experiment = {experiment})"""
_BY_UNIT_PARTIAL = """(SELECT metric, unit_hash, value, n FROM feedback_units
    WHERE experiment = {experiment})"""
_BY_REQUEST_TABLE = """(SELECT metric, rid_hi, rid_lo, value FROM feedback_by_request
    WHERE experiment = {experiment})"""
_ASKED_RAW = "(rid_hi, rid_lo) IN (SELECT rid_hi, rid_lo FROM {by_request} AS f)"
# The live engine keeps REQUEST_UNITS of every experiment as a table (`resolved_requests`),
# updated as records come (modelgate.analysis_live): the query reads the experiment's rows.
_REQUEST_UNITS_TABLE = """SELECT rid_hi, rid_lo, unit_hash, ambiguous FROM resolved_requests
  WHERE experiment = {experiment}"""
_RAW = {"exposure_count": "count(*)", "low": "variant", "high": "variant", "n": "", "one": ""}
_PARTIAL = {
    "exposure_count": "sum(exposures)",
    "low": "variant",
    "high": "variant",
    "n": ", n",
    "one": ", 1 AS n",
}

# Feedback by request id: the unit of the id tail's exposures, which must all be one (unit,
# variant); otherwise the tail is ambiguous (the logs keep 16 bytes). A tail that only
# unenrolled exposures claim resolves to no unit. `{group}`: the columns grouped on before the
# id's halves (none for one experiment's query; `experiment, ` for the live engine's table).
REQUEST_UNITS = """SELECT {group}rid_hi, rid_lo, min(unit_hash) AS unit_hash,
    CASE WHEN min(unit_hash) <> max(unit_hash) OR min(variant) <> max(variant)
      THEN 1 ELSE 0 END AS ambiguous
  FROM {claims} AS e
  WHERE {asked}
  GROUP BY {group}rid_hi, rid_lo
  HAVING max(flags & 1) = 1 OR min(unit_hash) <> max(unit_hash) OR min(variant) <> max(variant)"""

_HEAD = """WITH units AS (  -- enrolled units; a unit's variant is its first enrolled exposure's
  SELECT unit_hash, arg_min(variant, ts_ns) AS variant, {exposure_count} AS exposures,
    CASE WHEN min({low}) <> max({high}) THEN 1 ELSE 0 END AS switched
  FROM {exposed} AS e GROUP BY unit_hash
),
request_units AS ({request_units}),
attributed AS (
  SELECT metric, unit_hash, value{n} FROM {by_unit} AS f
  UNION ALL
  SELECT f.metric, r.unit_hash, f.value{one}
  FROM {by_request} AS f LEFT JOIN request_units AS r
    ON f.rid_hi = r.rid_hi AND f.rid_lo = r.rid_lo
  WHERE coalesce(r.ambiguous, 0) = 0
),
unit_values AS (
  SELECT unit_hash, metric, sum(value) AS x, {value_count} AS n
  FROM attributed GROUP BY unit_hash, metric
),
metrics AS (SELECT DISTINCT metric FROM unit_values),
{per_unit_cte}per_variant AS (
  SELECT variant, metric, count(*) AS units, avg(x) AS mean_x, var_samp(x) AS var_x,
    avg(exposures) AS mean_e, var_samp(exposures) AS var_e, covar_samp(x, exposures) AS cov_xe,
    avg(n) AS mean_n, var_samp(n) AS var_n, covar_samp(x, n) AS cov_xn,
    sum(CASE WHEN x <> 0 THEN 1 ELSE 0 END) AS nonzero_x, sum(n) AS n_values
  FROM {per_unit} GROUP BY variant, metric
)
SELECT 'units' AS kind, variant, NULL AS metric, NULL AS denominator, count(*) AS units,
  avg(exposures) AS mean_x, NULL AS mean_y, var_samp(exposures) AS var_x, NULL AS var_y,
  NULL AS cov_xy, sum(switched) AS nonzero_x, sum(exposures) AS n_values
FROM units GROUP BY variant
UNION ALL
SELECT 'metric', variant, metric, 'exposures', units, mean_x, mean_e, var_x, var_e, cov_xe,
  nonzero_x, n_values
FROM per_variant
UNION ALL
SELECT 'metric', variant, metric, 'values', units, mean_x, mean_n, var_x, var_n, cov_xn,
  nonzero_x, n_values
FROM per_variant"""

# Every unit and metric, a unit without values with x = n = 0. A CTE when the ratio pairs read
# it again, else a subquery: DuckDB materializes every CTE, 1.9M rows for the benchmark's.
_PER_UNIT = """(
  SELECT u.variant, u.unit_hash, u.exposures, m.metric, coalesce(v.x, 0) AS x,
    coalesce(v.n, 0) AS n
  FROM units u CROSS JOIN metrics m
  LEFT JOIN unit_values v ON v.unit_hash = u.unit_hash AND v.metric = m.metric
)"""

_RATIO = """
UNION ALL
SELECT 'metric', variant, metric, denominator, {moments}
FROM (
  SELECT p.variant, p.metric, CAST(q.metric AS VARCHAR) AS denominator, p.x, q.x AS y, p.n
  FROM per_unit p JOIN per_unit q ON q.unit_hash = p.unit_hash
  WHERE {pairs}
) AS pair
GROUP BY variant, metric, denominator"""

_EXCLUDED = """
UNION ALL
SELECT 'excluded', NULL, v.metric, NULL, count(v.unit_hash), NULL, NULL, NULL, NULL, NULL,
  NULL, sum(v.n)
FROM unit_values v LEFT JOIN units u ON u.unit_hash = v.unit_hash
WHERE u.unit_hash IS NULL GROUP BY v.metric
UNION ALL
SELECT 'ambiguous', NULL, f.metric, NULL, 0, NULL, NULL, NULL, NULL, NULL, NULL, count(*)
FROM {by_request} AS f JOIN request_units AS r ON f.rid_hi = r.rid_hi AND f.rid_lo = r.rid_lo
WHERE r.ambiguous = 1 GROUP BY f.metric"""


def quote(name: str | int) -> str:
    """A SQL literal: a string's quotes doubled (names come from configs and files), or an
    integer id (the engine's in-memory tables hold names as ids)."""
    if isinstance(name, int):
        return str(name)
    return "'" + name.replace("'", "''") + "'"


def experiment_query(
    ratios: Sequence[tuple[str | int, str | int]] = (),
    experiment: str = PARAMETER,
    since: str | None = None,
    partial: bool = False,
) -> str:
    """The query for one experiment; `ratios` adds (metric, denominator metric) pairs beside
    the per-exposure and per-value rows every metric gets. `experiment`: the parameter, or
    a quoted literal for a query printed for another engine. `since` (SINCE, or a literal):
    only records with `ts_ns >= since`, exposures and feedback alike (a canary judges the
    traffic since it started; feedback by request id of an earlier exposure is excluded).
    `partial`: over the partial aggregates `exposure_units` and `feedback_units`, the
    resolved request ids `resolved_requests` (REQUEST_UNITS per experiment) and
    `feedback_by_request`, instead of the raw `exposures` and `feedback` (no ts_ns: such
    tables are bounded when they are read)."""
    if partial and since is not None:
        raise ValueError("partial aggregates are bounded in time when read, not in the query")
    bound = f" AND ts_ns >= {since}" if since is not None else ""
    if partial:
        by_request = _BY_REQUEST_TABLE.format(experiment=experiment)
        exposed = _EXPOSED_PARTIAL.format(experiment=experiment)
        by_unit = _BY_UNIT_PARTIAL.format(experiment=experiment)
        request_units = _REQUEST_UNITS_TABLE.format(experiment=experiment)
        forms = dict(_PARTIAL, value_count="sum(n)")
    else:
        by_request = _FEEDBACK.format(experiment=experiment, by_request=2, since=bound)
        exposed = _EXPOSED.format(experiment=experiment, since=bound)
        by_unit = _FEEDBACK.format(experiment=experiment, by_request=0, since=bound)
        request_units = REQUEST_UNITS.format(
            group="",
            claims=_CLAIMS.format(experiment=experiment, since=bound),
            asked=_ASKED_RAW.format(by_request=by_request),
        )
        forms = dict(_RAW, value_count="count(*)")
    sql = _HEAD.format(
        exposed=exposed,
        request_units=request_units,
        by_unit=by_unit,
        by_request=by_request,
        per_unit_cte=f"per_unit AS {_PER_UNIT},\n" if ratios else "",
        per_unit="per_unit" if ratios else f"{_PER_UNIT} AS per_unit",
        **forms,
    )
    if ratios:
        pairs = " OR ".join(
            f"(p.metric = {quote(metric)} AND q.metric = {quote(denominator)})"
            for metric, denominator in ratios
        )
        sql += _RATIO.format(moments=_MOMENTS, pairs=pairs)
    return sql + _EXCLUDED.format(by_request=by_request)


def for_dialect(dialect: str, experiment: str, ratios: Sequence[tuple[str, str]] = ()) -> str:
    """The query in a warehouse's dialect (sqlglot, the `warehouse` extra)."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r}; one of: {', '.join(DIALECTS)}")
    try:
        import sqlglot
    except ImportError as exc:
        raise ImportError(
            "printing the query for a warehouse needs sqlglot: pip install 'modelgate[warehouse]'"
        ) from exc
    sql = experiment_query(ratios, quote(experiment))
    return str(sqlglot.transpile(sql, read="duckdb", write=dialect, pretty=True)[0]) + ";"
