"""The text of the analysis query: per unit first, then per variant over units (issue 13).

One query per experiment over two tables (or views) named `exposures` and `feedback`, with
the columns that modelgate.analysis.load gives them (the record files' fields, names
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
# The same query over partial aggregates (modelgate.analysis.live keeps them per chunk of a
# record file): per (experiment, unit, variant) the enrolled exposures and the first one's
# ts_ns; per (experiment, unit, metric) the sum and number of values by unit. The raw rows
# are the partials of one record each.
_EXPOSED_PARTIAL = """(SELECT unit_hash, variant, ts_ns, exposures FROM exposure_units
    WHERE experiment = {experiment})"""
_BY_UNIT_PARTIAL = """(SELECT metric, unit_hash, value, n FROM feedback_units
    WHERE experiment = {experiment})"""
_ASKED_RAW = "(rid_hi, rid_lo) IN (SELECT rid_hi, rid_lo FROM {by_request} AS f)"
# The live engine resolves each value by request id as records come (modelgate.analysis.live:
# REQUEST_UNITS of the tails that new records touch), and keeps the outcome beside it:
# `state` 0 no enrolled exposure claims its id (excluded), 1 `unit_hash` claims it, 2
# ambiguous. The raw query resolves them all in request_units.
_ATTRIBUTED_RAW = """SELECT f.metric, r.unit_hash, f.value
  FROM {by_request} AS f LEFT JOIN request_units AS r
    ON f.rid_hi = r.rid_hi AND f.rid_lo = r.rid_lo
  WHERE coalesce(r.ambiguous, 0) = 0"""
_AMBIGUOUS_RAW = """SELECT 'ambiguous', NULL, f.metric, NULL, 0, NULL, NULL, NULL, NULL, NULL, NULL,
  count(*)
FROM {by_request} AS f JOIN request_units AS r ON f.rid_hi = r.rid_hi AND f.rid_lo = r.rid_lo
WHERE r.ambiguous = 1 GROUP BY f.metric"""
_ATTRIBUTED_PARTIAL = """SELECT metric, CASE WHEN state = 1 THEN unit_hash END AS unit_hash,
    value, 1 AS n
  FROM feedback_by_request WHERE experiment = {experiment} AND state <> 2"""
_AMBIGUOUS_PARTIAL = """SELECT 'ambiguous', NULL, metric, NULL, 0, NULL, NULL, NULL, NULL, NULL,
  NULL, count(*)
FROM feedback_by_request WHERE experiment = {experiment} AND state = 2 GROUP BY metric"""
_RAW = {"exposure_count": "count(*)", "n": ""}
_PARTIAL = {
    "exposure_count": "sum(exposures)",
    "n": ", n",
}

# Feedback by request id: the unit of the id tail's exposures, which must all be one (unit,
# variant); otherwise the tail is ambiguous (the logs keep 16 bytes). A tail that only
# unenrolled exposures claim resolves to no unit. `{ids}`: the columns that identify a
# request: its tail's halves, or `experiment, rid_key` in the live engine (modelgate.analysis.live).
REQUEST_UNITS = """SELECT {ids}, min(unit_hash) AS unit_hash,
    CASE WHEN min(unit_hash) <> max(unit_hash) OR min(variant) <> max(variant)
      THEN 1 ELSE 0 END AS ambiguous
  FROM {claims} AS e
  WHERE {asked}
  GROUP BY {ids}
  HAVING max(flags & 1) = 1 OR min(unit_hash) <> max(unit_hash) OR min(variant) <> max(variant)"""

_HEAD = """WITH units AS (  -- enrolled units; a unit's variant is its first enrolled exposure's
  SELECT unit_hash, arg_min(variant, ts_ns) AS variant, {exposure_count} AS exposures,
    CASE WHEN min(variant) <> max(variant) THEN 1 ELSE 0 END AS switched
  FROM {exposed} AS e GROUP BY unit_hash
),
{request_units}attributed AS (
  SELECT metric, unit_hash, value{n} FROM {by_unit} AS f
  UNION ALL
  {attributed}
),
unit_values AS (
  SELECT unit_hash, metric, sum(value) AS x, {value_count} AS n
  FROM attributed GROUP BY unit_hash, metric
),
metrics AS (SELECT DISTINCT metric FROM unit_values),
{per_unit_cte}unit_variants AS (  -- per variant, over all its units
  SELECT variant, count(*) AS k, avg(exposures) AS mean_e, var_samp(exposures) AS var_e
  FROM units GROUP BY variant
),
valued AS (  -- per variant and metric, over its units with values: sums of squared deviations
  SELECT u.variant, v.metric, count(*) AS k, avg(v.x) AS mx, avg(v.n) AS mn,
    avg(u.exposures) AS me, var_pop(v.x) * count(*) AS sxx, var_pop(v.n) * count(*) AS snn,
    covar_pop(v.x, v.n) * count(*) AS sxn, covar_pop(v.x, u.exposures) * count(*) AS sxe,
    sum(CASE WHEN v.x <> 0 THEN 1 ELSE 0 END) AS nonzero_x, sum(v.n) AS n_values
  FROM unit_values v JOIN units u ON u.unit_hash = v.unit_hash
  GROUP BY u.variant, v.metric
),
-- Over every unit of the variant, those without values counting x = n = 0: the two groups'
-- moments merged (Chan, Golub and LeVeque's pairwise update, stable where sums of squares
-- are not), without a row per unit and metric. w = k_a k_b / k.
merged AS (
  SELECT t.variant, m.metric, t.k, t.mean_e, t.var_e, coalesce(a.k, 0) AS k_a,
    coalesce(a.mx, 0) AS mx, coalesce(a.mn, 0) AS mn, coalesce(a.sxx, 0) AS sxx,
    coalesce(a.snn, 0) AS snn, coalesce(a.sxn, 0) AS sxn, coalesce(a.sxe, 0) AS sxe,
    CASE WHEN t.k > coalesce(a.k, 0)  -- the mean exposures of the units without values
      THEN (t.k * t.mean_e - coalesce(a.k * a.me, 0)) / (t.k - coalesce(a.k, 0))
      ELSE 0 END AS me_b,
    coalesce(a.me, 0) AS me, coalesce(a.k, 0) * CAST(t.k - coalesce(a.k, 0) AS DOUBLE) / t.k AS w,
    coalesce(a.nonzero_x, 0) AS nonzero_x, coalesce(a.n_values, 0) AS n_values
  FROM unit_variants t CROSS JOIN metrics m
  LEFT JOIN valued a ON a.variant = t.variant AND a.metric = m.metric
),
per_variant AS (
  SELECT variant, metric, k AS units, k_a * mx / k AS mean_x,
    CASE WHEN k > 1 THEN (sxx + mx * mx * w) / (k - 1) END AS var_x,
    mean_e, var_e,
    CASE WHEN k > 1 THEN (sxe + mx * (me - me_b) * w) / (k - 1) END AS cov_xe,
    k_a * mn / k AS mean_n,
    CASE WHEN k > 1 THEN (snn + mn * mn * w) / (k - 1) END AS var_n,
    CASE WHEN k > 1 THEN (sxn + mx * mn * w) / (k - 1) END AS cov_xn,
    nonzero_x, n_values
  FROM merged
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

# Every unit and metric, a unit without values with x = n = 0: what the ratio pairs read (the
# per-variant moments merge two groups instead, which needs no row per unit and metric).
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
{ambiguous}"""


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
    `partial`: over the partial aggregates `exposure_units` and `feedback_units` and the
    values by request id with their units resolved (`feedback_by_request`, _ATTRIBUTED_PARTIAL)
    instead of the raw `exposures` and `feedback` (no ts_ns: such tables are bounded when
    they are read)."""
    if partial and since is not None:
        raise ValueError("partial aggregates are bounded in time when read, not in the query")
    bound = f" AND ts_ns >= {since}" if since is not None else ""
    if partial:
        exposed = _EXPOSED_PARTIAL.format(experiment=experiment)
        by_unit = _BY_UNIT_PARTIAL.format(experiment=experiment)
        request_units = ""
        attributed = _ATTRIBUTED_PARTIAL.format(experiment=experiment)
        ambiguous = _AMBIGUOUS_PARTIAL.format(experiment=experiment)
        forms = dict(_PARTIAL, value_count="sum(n)")
    else:
        by_request = _FEEDBACK.format(experiment=experiment, by_request=2, since=bound)
        exposed = _EXPOSED.format(experiment=experiment, since=bound)
        by_unit = _FEEDBACK.format(experiment=experiment, by_request=0, since=bound)
        resolve = REQUEST_UNITS.format(
            ids="rid_hi, rid_lo",
            claims=_CLAIMS.format(experiment=experiment, since=bound),
            asked=_ASKED_RAW.format(by_request=by_request),
        )
        request_units = f"request_units AS ({resolve}),\n"
        attributed = _ATTRIBUTED_RAW.format(by_request=by_request)
        ambiguous = _AMBIGUOUS_RAW.format(by_request=by_request)
        forms = dict(_RAW, value_count="count(*)")
    sql = _HEAD.format(
        exposed=exposed,
        request_units=request_units,
        attributed=attributed,
        by_unit=by_unit,
        per_unit_cte=f"per_unit AS {_PER_UNIT},\n" if ratios else "",
        **forms,
    )
    if ratios:
        pairs = " OR ".join(
            f"(p.metric = {quote(metric)} AND q.metric = {quote(denominator)})"
            for metric, denominator in ratios
        )
        sql += _RATIO.format(moments=_MOMENTS, pairs=pairs)
    return sql + _EXCLUDED.format(ambiguous=ambiguous)


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
