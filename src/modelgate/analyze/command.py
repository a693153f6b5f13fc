"""`modelgate analyze`: an experiment's results as a table, from a live admin API
(`--admin URL`) or from exposure and feedback files (`--logs DIR`), and as an HTML report.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelgate.analysis.engine import AnalysisEngine
    from modelgate.analysis.spark import SparkAnalysisEngine

__all__ = [
    "AnalyzeError",
    "configure_parser",
    "event_results_from_logs",
    "format_results",
    "format_unit_results",
    "results_from_admin",
    "results_from_logs",
]

TOKEN_ENV = "MODELGATE_ADMIN_TOKEN"
TOKEN_FILE_ENV = "MODELGATE_ADMIN_TOKEN_FILE"


class AnalyzeError(Exception):
    """What stops an analysis; the message names the problem."""


def results_from_admin(url: str, experiment: str | None, token: str | None) -> list[dict[str, Any]]:
    """GET /experiments[/{name}] from a running gateway's admin API."""
    path = f"/experiments/{experiment}" if experiment else "/experiments"
    request = urllib.request.Request(url.rstrip("/") + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", exc.reason)
        except ValueError:
            detail = exc.reason
        hint = f" (give --token or --token-file, or set {TOKEN_ENV})" if exc.code == 401 else ""
        raise AnalyzeError(f"{url}{path}: {exc.code} {detail}{hint}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AnalyzeError(f"cannot reach the admin API at {url}: {reason}") from exc
    if experiment:
        return [body]
    experiments: list[dict[str, Any]] = body["experiments"]
    return experiments


def _designs(log_dir: str, found: dict[str, dict[str, Any]], config: str | None) -> dict[str, Any]:
    """The experiments' designs: from --config when given, else from the files' sidecars."""
    designs = found
    if config is not None:
        from modelgate.config import ConfigError, load_config
        from modelgate.outcomes import experiment_designs

        try:
            designs = experiment_designs(load_config(config))
        except ConfigError as exc:
            raise AnalyzeError(f"--config {config}: " + "; ".join(exc.errors)) from exc
    if not designs:
        raise AnalyzeError(
            f"--logs {log_dir}: no exposure records with experiment designs; give --config"
        )
    return designs


def _names(designs: dict[str, Any], experiment: str | None) -> list[str]:
    names = [experiment] if experiment else sorted(designs)
    for name in names:
        if name not in designs:
            raise AnalyzeError(f"no experiment named {name!r} (in the files: {sorted(designs)})")
    return names


def event_results_from_logs(
    log_dir: str, experiment: str | None, config: str | None
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], dict[str, int]]:
    """The former per-event results (each request and outcome a sample, as the live
    snapshot counts them), their timelines, and the join counts: `--per-event`."""
    from modelgate.analysis.results import experiment_results
    from modelgate.analyze.logs import load_logs, snapshot_of, timeline_of

    if not Path(log_dir).is_dir():
        raise AnalyzeError(f"--logs {log_dir}: not a directory")
    data = load_logs(log_dir)
    designs = _designs(log_dir, data.designs, config)
    names = _names(designs, experiment)
    snapshot = snapshot_of(data)
    results = [experiment_results(designs[name], snapshot) for name in names]
    timelines = {
        name: timeline_of(data, name, float(designs[name]["analysis"]["alpha"])) for name in names
    }
    return results, timelines, dict(data.join)


def _open_engine(
    log_dir: str, engine: str, spark_master: str | None, parquet_out: str | None
) -> AnalysisEngine | SparkAnalysisEngine:
    """The engine over `log_dir`: record files or their Parquet roll-up (an `exposures/`
    subdirectory), on DuckDB or on Spark (which also reads a roll-up at a URI). With
    `parquet_out`, record files are rolled up there first and the roll-up is read."""
    from modelgate.analysis.engine import AnalysisEngine
    from modelgate.analysis.load import write_parquet

    if engine == "spark":
        from modelgate.analysis.spark import DEFAULT_MASTER, SparkAnalysisEngine

        master = spark_master or DEFAULT_MASTER
        return SparkAnalysisEngine.open(log_dir, master=master, parquet_out=parquet_out)
    if not Path(log_dir).is_dir():
        raise AnalyzeError(f"--logs {log_dir}: not a directory")
    if parquet_out is not None and not _is_roll_up(log_dir):
        write_parquet(log_dir, parquet_out)
        return AnalysisEngine.from_parquet(parquet_out)
    if _is_roll_up(log_dir):
        return AnalysisEngine.from_parquet(log_dir)
    return AnalysisEngine.from_logs(log_dir)


def _is_roll_up(path: str) -> bool:
    """A Parquet roll-up (modelgate.analysis.load.write_parquet) rather than a log_dir."""
    return (Path(path) / "exposures").is_dir()


def results_from_logs(
    log_dir: str,
    experiment: str | None,
    config: str | None,
    *,
    timelines: bool = True,
    engine: str = "duckdb",
    spark_master: str | None = None,
    parquet_out: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], dict[str, int]]:
    """Results over units from the files (the analysis engine, issue 13), the timelines of
    the HTML report (per event; only when `timelines` and `log_dir` holds record files),
    and the values no enrolled exposure claims (`excluded`) and those dropped because their
    request id tail was exposed to several units or variants (`ambiguous`), summed over
    metrics. `log_dir`: record files or their Parquet roll-up; `engine`: "duckdb" or
    "spark" (then also a roll-up at a URI Spark reads); `parquet_out`: roll the record
    files up there first and read that."""
    from modelgate.analysis.engine import AnalysisError
    from modelgate.analysis.spark import SparkUnavailable
    from modelgate.analysis.system import system_units
    from modelgate.analysis.unit_results import ratio_pairs, unit_results

    try:
        units_engine = _open_engine(log_dir, engine, spark_master, parquet_out)
    except SparkUnavailable as exc:
        raise AnalyzeError(str(exc)) from exc
    except AnalysisError as exc:
        raise AnalyzeError(f"--logs {exc}") from exc
    try:
        designs = _designs(log_dir, units_engine.designs, config)
        names = _names(designs, experiment)
        results = []
        excluded = ambiguous = 0
        for name in names:
            if name not in units_engine.experiments():
                raise AnalyzeError(f"--logs {log_dir}: no exposure records of experiment {name!r}")
            units = units_engine.query(name, ratio_pairs(designs[name]))
            system = system_units(units_engine, name, units.variants)
            binary = units_engine.binary_metrics(name)
            results.append(unit_results(designs[name], units, binary, system))
            excluded += sum(n for _, n in units.excluded.values())
            ambiguous += sum(units.ambiguous.values())
    finally:
        units_engine.close()
    plots: dict[str, dict[str, Any]] = {}
    if timelines and Path(log_dir).is_dir() and not _is_roll_up(log_dir):
        from modelgate.analyze.logs import load_logs, timeline_of

        data = load_logs(log_dir)
        plots = {
            n: timeline_of(data, n, float(r["alpha"])) for n, r in zip(names, results, strict=True)
        }
    return results, plots, {"excluded": excluded, "ambiguous": ambiguous}


def _num(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:+.1%}"


def _table(rows: list[list[str]], left: int = 2) -> list[str]:
    """Aligned columns: the first `left` to the left (names), the rest to the right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  "
        + "  ".join(
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


_INTERVALS = {"t": "t", "confidence-sequence": "cs"}


def _format_comparisons(result: dict[str, Any], level: str, per_unit: bool) -> list[str]:
    """The treatment-vs-control rows; per unit, each row says how its interval was made."""
    tests = result["multiple_testing"]["tests"]
    head = f"  vs {result['control']} (Holm over {tests} tests; * below alpha"
    if per_unit:
        head += (
            "; interval t: fixed horizon, read once; cs: confidence sequence, valid at every look"
        )
    lines = ["", head + ")"]
    method = ["method", "interval"] if per_unit else ["test"]
    rows = [["metric", "variant", *method, "diff", f"{level} CI", "lift", "lift CI", "p", "p Holm"]]
    for c in result["comparisons"]:
        how = [c["test"]]
        if per_unit:
            how = [c["method"], _INTERVALS.get(c.get("interval", ""), c.get("interval", ""))]
        if c.get("p_value") is None:
            rows.append([c["metric"], c.get("variant", "-"), *how, c.get("error", "")])
            rows[-1] += [""] * (len(rows[0]) - len(rows[-1]))
            continue
        mark = " *" if c.get("significant") else ""
        rows.append(
            [
                c["metric"],
                c["variant"],
                *how,
                _num(c["diff"], "+.4g"),
                f"[{_num(c['ci_low'], '+.4g')}, {_num(c['ci_high'], '+.4g')}]",
                _pct(c["rel_diff"]),
                f"[{_pct(c['rel_ci_low'])}, {_pct(c['rel_ci_high'])}]",
                _num(c["p_value"]),
                _num(c.get("p_value_holm")) + mark,
            ]
        )
    return lines + _table(rows)


def format_unit_results(result: dict[str, Any]) -> str:
    """Per-unit results (modelgate.analysis.unit_results) as text: units, not requests, are the
    samples, and each interval says how it was made."""
    alpha = result["alpha"]
    how = "confidence sequences" if result["sequential"] else "fixed-horizon t intervals"
    lines = [
        f"experiment {result['experiment']} (control: {result['control']}, alpha {alpha:g}"
        + (f", config version {result['version']})" if "version" in result else ")"),
        f"  unit of analysis: the unit (the id the experiment hashes), not the request; {how}",
    ]
    total = sum(v["units"] for v in result["variants"]) or 1
    rows = [["variant", "weight", "units", "share", "exposures", "switched"]]
    for v in result["variants"]:
        share = f"{v['units'] / total:.4f}"
        rows.append(
            [v["name"], _num(v["weight"]), str(v["units"]), share, str(v["exposures"])]
            + [str(v["switched"])]
        )
    lines += _table(rows, left=1)
    srm = result["srm"]
    verdict = "MISMATCH: do not trust these results" if srm["mismatch"] else "ok"
    if srm.get("error"):
        lines.append(f"  SRM over units: {srm['error']}")
    elif srm.get("chi2") is None:
        lines.append(
            f"  SRM over units (sequential, valid at every look): p {_num(srm['p_value'])} "
            f"({verdict})"
        )
    else:
        lines.append(
            f"  SRM over units: chi2 {_num(srm['chi2'])}, p {_num(srm['p_value'])} ({verdict})"
        )
    if result["metrics"]:
        rows = [["metric", "variant", "kind", "units", "values", "estimate", "sd per unit"]]
        for metric, info in sorted(result["metrics"].items()):
            kind = info["method"] + (
                f" / {info['denominator']}" if info["method"] == "ratio" else ""
            )
            for v in result["variants"]:
                s = v["metrics"].get(metric)
                if s is None:
                    continue
                sd = s["variance"] ** 0.5 if s["variance"] is not None else None
                rows.append(
                    [metric, v["name"], kind, str(s["units"]), str(s["values"]), _num(s["mean"])]
                    + [_num(sd)]
                )
        lines += ["", *_table(rows, left=3)]
    if result["comparisons"]:
        lines += _format_comparisons(result, f"{1 - alpha:.0%}", per_unit=True)
    for metric, out in result.get("excluded", {}).items():
        lines.append(
            f"  {metric}: {out['values']} values of {out['units']} units left out "
            "(no enrolled exposure claims them)"
        )
    for metric, n in result.get("ambiguous", {}).items():
        lines.append(
            f"  {metric}: {n} values by request id dropped (their id tail was exposed to "
            "several units or variants)"
        )
    lines += _format_sample_sizes(result, "units")
    lines += _format_guardrails(result)
    return "\n".join(lines)


def _format_guardrails(result: dict[str, Any]) -> list[str]:
    """The gateway's own metrics per arm and against the control, from the records."""
    guard = result.get("guardrails")
    if not guard:
        return []
    lines = ["", "  the gateway's own metrics (per answer, from the exposure records; ms)"]
    rows = [["variant", "units", "requests", "errors", "error rate", "mean", "p50", "p90", "p99"]]
    for name, arm in guard["variants"].items():
        ms = arm["latency_ms"]
        rows.append(
            [name, str(arm["units"]), str(arm["requests"]), str(arm["errors"])]
            + [_num(arm["error_rate"], ".4f")]
            + [_num(ms.get(k), ".4g") for k in ("mean", "p50", "p90", "p99")]
        )
    lines += _table(rows, left=1)
    level = f"{1 - result['alpha']:.0%}"
    for c in guard["comparisons"]:
        if c.get("p_value") is None:
            lines.append(f"  {c['metric']} {c['variant']}: {c.get('error', 'not tested')}")
            continue
        lines.append(
            f"  {c['metric']} {c['variant']} - {c['control']}: {_num(c['diff'], '.4g')} "
            f"[{_num(c['ci_low'], '.4g')}, {_num(c['ci_high'], '.4g')}] ({level}, {c['interval']}"
            f", {c['method']} over {c['n_a']}+{c['n_b']} units), p {_num(c['p_value'])}"
        )
    return lines


def _format_sample_sizes(result: dict[str, Any], what: str = "") -> list[str]:
    if not result["sample_size"]:
        return []
    per = f"{what} per arm" if what else "per arm"
    lines = ["", f"  sample size {per} for the mde (power {result['power']:g})"]
    for s in result["sample_size"]:
        if s.get("n_per_arm") is None:
            lines.append(f"  {s['metric']}: mde {s['mde']:g}: {s.get('error', 'unknown')}")
            continue
        still = ", ".join(f"{k} {n}" for k, n in s["still_needed"].items())
        head = f"  {s['metric']}: mde {s['mde']:g}: {s['n_per_arm']} per arm"
        lines.append(f"{head}; still needed: {still}")
    return lines


def format_results(result: dict[str, Any]) -> str:
    """One experiment's results as the text table `modelgate analyze` prints."""
    if result.get("unit_of_analysis") == "unit":
        return format_unit_results(result)
    alpha = result["alpha"]
    level = f"{1 - alpha:.0%}"
    lines = [
        f"experiment {result['experiment']} (control: {result['control']}, alpha {alpha:g}"
        + (f", config version {result['version']})" if "version" in result else ")")
    ]
    total = sum(v["n"] for v in result["variants"]) or 1
    rows = [["variant", "weight", "n", "share", "errors", "p50 ms", "p99 ms"]]
    for v in result["variants"]:
        latency = v.get("latency_s") or {}
        rows.append(
            [
                v["name"],
                _num(v["weight"]),
                str(v["n"]),
                f"{v['n'] / total:.4f}",
                str(v["errors"]) if latency else "-",
                _num(latency.get("p50") and latency["p50"] * 1000, ".3g"),
                _num(latency.get("p99") and latency["p99"] * 1000, ".3g"),
            ]
        )
    lines += _table(rows, left=1)
    srm = result["srm"]
    verdict = "MISMATCH: do not trust these results" if srm["mismatch"] else "ok"
    lines.append(f"  SRM: chi2 {_num(srm['chi2'])}, p {_num(srm['p_value'])} ({verdict})")
    if result["metrics"]:
        rows = [["metric", "variant", "count", "mean", "sd", "ones"]]
        for metric, info in sorted(result["metrics"].items()):
            for v in result["variants"]:
                s = v["metrics"][metric]
                sd = s["variance"] ** 0.5 if s["variance"] is not None else None
                ones = str(s["ones"]) if info["binary"] else ""
                rows.append([metric, v["name"], str(s["count"]), _num(s["mean"]), _num(sd), ones])
        lines += ["", *_table(rows)]
    if result["comparisons"]:
        lines += _format_comparisons(result, level, per_unit=False)
    lines += _format_sample_sizes(result)
    return "\n".join(lines)


def _engine_commands(ns: argparse.Namespace) -> int | None:
    """`--sql DIALECT` and `--parquet OUT` (issue 13): the SQL engine's side doors; None
    when neither was asked for."""
    from modelgate.analysis.sql import DIALECTS, for_dialect

    if ns.sql is not None:
        if ns.sql not in DIALECTS:
            raise AnalyzeError(f"--sql {ns.sql}: unknown dialect; one of: {', '.join(DIALECTS)}")
        if ns.experiment is None:
            raise AnalyzeError("--sql needs --experiment NAME (the query is per experiment)")
        ratios = []
        for pair in ns.ratio or []:
            metric, _, denominator = pair.partition("/")
            if not metric or not denominator:
                raise AnalyzeError(f"--ratio {pair}: give METRIC/DENOMINATOR")
            ratios.append((metric, denominator))
        try:
            print(for_dialect(ns.sql, ns.experiment, ratios))
        except ImportError as exc:
            raise AnalyzeError(str(exc)) from exc
        return 0
    if ns.parquet is not None and ns.engine is None:  # with --engine: rolled, then analysed
        if ns.logs is None:
            raise AnalyzeError("--parquet OUT needs --logs DIR (the records to roll up)")
        if not Path(ns.logs).is_dir():
            raise AnalyzeError(f"--logs {ns.logs}: not a directory")
        from modelgate.analysis.load import write_parquet

        written = write_parquet(ns.logs, ns.parquet)
        print(
            f"rolled {written['exposures']} exposure and {written['feedback']} feedback records "
            f"into {ns.parquet} (partitioned by experiment and date)"
        )
        return 0
    return None


def run(ns: argparse.Namespace) -> int:
    try:
        done = _engine_commands(ns)
    except AnalyzeError as exc:
        print(f"modelgate analyze: {exc}", file=sys.stderr)
        return 1
    if done is not None:
        return done
    if ns.admin is None and ns.logs is None:
        print("modelgate analyze: give --admin URL or --logs DIR (or both)", file=sys.stderr)
        return 2
    if ns.engine == "spark" and (ns.admin is not None or ns.per_event):
        print(
            "modelgate analyze: --engine spark analyses --logs over units; not with --admin "
            "or --per-event",
            file=sys.stderr,
        )
        return 2
    timelines: dict[str, dict[str, Any]] | None = None
    try:
        if ns.admin is not None:
            from modelgate.admin.token import TokenFileError, client_token

            try:
                token = client_token(ns.token, ns.token_file)
            except TokenFileError as exc:
                raise AnalyzeError(str(exc)) from exc
            results = results_from_admin(ns.admin, ns.experiment, token)
            source = f"live results from {ns.admin}"
            if ns.logs is not None:  # plots over time from the files
                _, timelines, _ = results_from_logs(ns.logs, ns.experiment, ns.config)
        elif ns.per_event:
            results, timelines, join = event_results_from_logs(ns.logs, ns.experiment, ns.config)
            source = (
                f"recomputed per event from {ns.logs}: feedback joined to exposures "
                f"{join.get('joined', 0)}, not joined {join.get('unjoined', 0)}, attributed to "
                f"another variant than logged {join.get('moved', 0)}, dropped as ambiguous "
                f"(a request id tail of several units or variants) {join.get('ambiguous', 0)}"
            )
        else:
            results, timelines, counts = results_from_logs(
                ns.logs,
                ns.experiment,
                ns.config,
                timelines=ns.html is not None,
                engine=ns.engine or "duckdb",
                spark_master=ns.spark_master,
                parquet_out=ns.parquet,
            )
            on = "Spark" if ns.engine == "spark" else "DuckDB"
            source = (
                f"recomputed over units from {ns.logs} ({on}); feedback values that no "
                f"enrolled exposure claims: {counts['excluded']}; dropped as ambiguous (a "
                f"request id tail of several units or variants): {counts['ambiguous']}"
            )
    except AnalyzeError as exc:
        print(f"modelgate analyze: {exc}", file=sys.stderr)
        return 1
    text = "\n\n".join(format_results(r) for r in results) or "no experiments"
    print(text)
    print(f"({source})")
    if ns.html is not None:
        from modelgate.analyze.report import ReportError, write_report

        try:
            write_report(ns.html, results, text, timelines, source)
        except ReportError as exc:
            print(f"modelgate analyze: {exc}", file=sys.stderr)
            return 2
        print(f"report written to {ns.html}")
    return 0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin", metavar="URL", help="a running gateway's admin API")
    parser.add_argument(
        "--logs",
        metavar="DIR",
        help="a log_dir with exposure and feedback files, or their Parquet roll-up (with "
        "--engine spark also at a URI Spark reads: s3a://, hdfs://, file://)",
    )
    parser.add_argument(
        "--engine",
        choices=["duckdb", "spark"],
        default=None,
        help="the SQL engine of the analysis over units: duckdb (embedded, the default) or "
        "spark (needs the 'spark' extra and Java); with --parquet OUT the records are rolled "
        "up into OUT first and the engine reads that",
    )
    parser.add_argument(
        "--spark-master",
        metavar="URL",
        default=None,
        help="with --engine spark: the Spark master (default: local[2], Spark on this machine)",
    )
    parser.add_argument("--experiment", metavar="NAME", help="one experiment (default: all)")
    parser.add_argument("--token", help=f"the admin API's bearer token (default: ${TOKEN_ENV})")
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        help=f"read the bearer token from PATH (default: ${TOKEN_FILE_ENV})",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="with --logs: take the experiments' design from here"
    )
    parser.add_argument("--html", metavar="FILE", help="also write an HTML report with plots")
    parser.add_argument(
        "--per-event",
        action="store_true",
        help="with --logs: the former analysis that counts each request and outcome as a "
        "sample (understates the variance when units come back; for comparison)",
    )
    parser.add_argument(
        "--parquet",
        metavar="OUT",
        help="with --logs: roll the records into Parquet files partitioned by experiment and "
        "date (and only that, unless --engine is given)",
    )
    parser.add_argument(
        "--sql",
        metavar="DIALECT",
        help="print the per-unit query of --experiment for a warehouse: bigquery, snowflake, "
        "clickhouse, spark, trino (needs the 'warehouse' extra)",
    )
    parser.add_argument(
        "--ratio",
        metavar="METRIC/DENOMINATOR",
        action="append",
        help="with --sql: also a ratio of two metrics' per-unit sums (repeatable)",
    )
    parser.set_defaults(func=run)
