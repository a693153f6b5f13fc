"""The Spark engine (issue 13): on the same Parquet files, Spark's ExperimentUnits and the
results made from them equal DuckDB's to 1e-9; `modelgate analyze --engine spark` rolls a
log directory up and prints what DuckDB prints; a missing pyspark or Java is named with what
to install; `--logs` also takes a Parquet roll-up. One local Spark session for the module."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelgate.analysis.engine import AnalysisEngine, AnalysisError, ExperimentUnits
from modelgate.analysis.load import write_parquet
from modelgate.analysis.spark import SparkAnalysisEngine, local_session, roll_up_of
from modelgate.analysis.synth import Synthetic, write_synthetic
from modelgate.analysis.system import system_units
from modelgate.analysis.unit_results import ratio_pairs, unit_results
from modelgate.analyze.command import results_from_logs
from modelgate.cli import main
from modelgate.exposure import EXPOSURE_DTYPE, FLAG_MEASURED
from modelgate.stats import UnitStats

pytestmark = pytest.mark.spark

# Repeat visitors (heavy-tailed exposures per unit), feedback by unit and by request id,
# orphans, reused request ids, units that switched variants: what the query must get right.
SPEC = Synthetic(units=4_000, exposures=40_000, feedback=40_000, records_per_file=15_000)
DESIGN: dict[str, Any] = {
    "name": "ranker",
    "variants": ["control", "candidate"],
    "weights": [1, 1],
    "control": "control",
    "analysis": {
        "alpha": 0.05,
        "metrics": {
            "clicks": {"kind": "ratio", "denominator": "views"},  # clicks per view
            "revenue": {"kind": "mean", "covariate": "views"},  # CUPED
            "views": {"kind": "mean"},
        },
    },
}
REL = 1e-9


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    session = local_session("local[2]")
    yield session
    session.stop()
    # stop() leaves the JVM running (~1 GB) until Python exits; the rest of the suite does
    # not need it. pyspark's gateway JVM exits when its stdin closes.
    from pyspark import SparkContext

    gateway: Any = SparkContext._gateway
    if gateway is not None:
        gateway.shutdown()
        gateway.proc.stdin.close()
        gateway.proc.wait(timeout=60)
        SparkContext._gateway = SparkContext._jvm = None


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic records, with the gateway's own measurements added: a status (2% 5xx)
    and a heavy-tailed latency per answer, 3% of requests unmeasured (the client left)."""
    out = write_synthetic(tmp_path_factory.mktemp("logs"), SPEC)
    rng = np.random.default_rng(7)
    for path in sorted(out.glob("exposure-*.bin")):
        records = np.fromfile(path, dtype=EXPOSURE_DTYPE)
        n = len(records)
        records["status"] = np.where(rng.random(n) < 0.02, 503, 200)
        records["latency_us"] = np.minimum(rng.lognormal(10.0, 0.6, n), 2**32 - 1)
        measured = rng.random(n) >= 0.03
        records["flags"] = records["flags"] | np.where(measured, FLAG_MEASURED, 0)
        records.tofile(path)
    return out


@pytest.fixture(scope="module")
def rolled(logs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parquet")
    write_parquet(logs, out)
    return out


def _close(a: Any, b: Any, where: str) -> None:
    """Equal, floats to REL relative (a float that is 0 on one side must be 0 on both)."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, float | int) and isinstance(b, float | int), where
        assert math.isclose(a, b, rel_tol=REL) or (math.isnan(a) and math.isnan(b)), (
            where,
            a,
            b,
        )
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _moments(stats: UnitStats) -> dict[str, float | int]:
    return {name: getattr(stats, name) for name in _MOMENTS}


_MOMENTS = ("count", "mean_x", "mean_y", "m2_x", "m2_y", "c_xy", "nonzero_x")


def _units_equal(duck: ExperimentUnits, spark: ExperimentUnits) -> None:
    assert spark.variants == duck.variants and spark.units == duck.units
    assert spark.switched == duck.switched and spark.values == duck.values
    assert spark.excluded == duck.excluded and spark.ambiguous == duck.ambiguous
    assert spark.exposures.keys() == duck.exposures.keys()
    for variant, stats in duck.exposures.items():
        _close(_moments(stats), _moments(spark.exposures[variant]), f"exposures[{variant}]")
    assert spark.metrics.keys() == duck.metrics.keys()
    for key, per_variant in duck.metrics.items():
        assert spark.metrics[key].keys() == per_variant.keys()
        for variant, stats in per_variant.items():
            _close(_moments(stats), _moments(spark.metrics[key][variant]), f"{key}[{variant}]")


def test_spark_equals_duckdb_on_the_same_parquet_files(spark: Any, rolled: Path) -> None:
    duck_engine = AnalysisEngine.from_parquet(rolled, threads=1)
    duck = duck_engine.query("ranker", ratio_pairs(DESIGN))
    # A URI, as a fleet's roll-up on hdfs:// or s3a:// would be given: Spark reads all of it,
    # designs.json included.
    engine = SparkAnalysisEngine.open(rolled.as_uri(), session=spark)
    assert engine.experiments() == duck_engine.experiments() == ["other", "ranker"]
    assert engine.designs == duck_engine.designs and engine.designs["ranker"]["variants"]
    ours = engine.query("ranker", ratio_pairs(DESIGN))
    _units_equal(duck, ours)
    # The data exercise what they should: repeat visitors, orphans, reused ids, switchers.
    assert duck.exposures["control"].mean_x > 2
    assert sum(n for _, n in duck.excluded.values()) > 0 and sum(duck.ambiguous.values()) > 0
    assert sum(duck.switched.values()) > 0 and ("clicks", "views") in duck.metrics
    binary = engine.binary_metrics("ranker")
    assert binary == duck_engine.binary_metrics("ranker")
    assert binary == {"clicks": True, "revenue": False, "views": False}
    # The gateway's own metrics (error rate, latency, its quantiles) through the same SQL.
    duck_system = system_units(duck_engine, "ranker", duck.variants)
    system = system_units(engine, "ranker", ours.variants)
    for variant in duck.variants:
        _close(_moments(duck_system.errors[variant]), _moments(system.errors[variant]), "err")
        _close(_moments(duck_system.latency[variant]), _moments(system.latency[variant]), "ms")
        mine, theirs = system.quantiles[variant], duck_system.quantiles[variant]
        assert mine.requests == theirs.requests > 0
        _close(mine.sample, theirs.sample, "sample")
        for q, estimate in theirs.estimates.items():
            found = mine.estimates[q]
            assert not isinstance(estimate, str), estimate  # enough requests for intervals
            assert not isinstance(found, str), found
            _close(dataclasses.asdict(found), dataclasses.asdict(estimate), f"p{q}")
    assert system.step_units == duck_system.step_units
    assert system.step_requests == duck_system.step_requests
    assert duck_system.errors["control"].mean_x > 0  # the data have errors to count
    expected = unit_results(DESIGN, duck, binary, duck_system)
    got = unit_results(DESIGN, ours, binary, system)
    _close(expected, got, "results")
    methods = {c["metric"]: c["method"] for c in got["comparisons"]}
    assert methods == {"clicks": "ratio", "revenue": "cuped", "views": "mean"}
    assert len(got["guardrails"]["comparisons"]) == 5  # error rate, mean latency, 3 quantiles
    engine.close()  # the caller's session stays
    assert spark.sql("SELECT 1").collect()[0][0] == 1
    duck_engine.close()


def test_analyze_engine_spark_rolls_a_log_dir_up_and_prints_what_duckdb_prints(
    spark: Any, logs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = set(Path(tempfile.gettempdir()).glob("modelgate-parquet-*"))
    assert main(["analyze", "--logs", str(logs), "--experiment", "ranker"]) == 0
    duck = capsys.readouterr().out
    spark_args = ["--engine", "spark", "--logs", str(logs), "--experiment", "ranker"]
    assert main(["analyze", *spark_args]) == 0
    ours = capsys.readouterr().out
    assert "(Spark)" in ours and "(DuckDB)" in duck
    assert ours.replace("(Spark)", "(DuckDB)") == duck
    assert set(Path(tempfile.gettempdir()).glob("modelgate-parquet-*")) == before  # removed
    assert spark.sql("SELECT 1").collect()[0][0] == 1  # the running session was not stopped


def test_roll_up_of_reads_uris_as_they_are_and_rolls_log_dirs(
    logs: Path, rolled: Path, tmp_path: Path
) -> None:
    assert roll_up_of("s3a://bucket/modelgate") == ("s3a://bucket/modelgate", None)
    assert roll_up_of(str(rolled)) == (str(rolled.resolve()), None)
    assert roll_up_of(str(logs), tmp_path / "kept") == (str((tmp_path / "kept").resolve()), None)
    assert (tmp_path / "kept" / "exposures" / "experiment=ranker").is_dir()
    root, temporary = roll_up_of(str(logs))
    assert temporary == root and (Path(root) / "designs.json").exists()
    shutil.rmtree(root)
    with pytest.raises(AnalysisError, match="not a directory"):
        roll_up_of(str(tmp_path / "missing"))


def test_a_uri_without_a_roll_up_is_named(spark: Any, tmp_path: Path) -> None:
    with pytest.raises(AnalysisError, match="no Parquet roll-up here"):
        SparkAnalysisEngine.open(tmp_path.as_uri(), session=spark)


def test_without_pyspark_the_message_names_the_extra(
    logs: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyspark", None)
    monkeypatch.setitem(sys.modules, "pyspark.sql", None)
    assert main(["analyze", "--engine", "spark", "--logs", str(logs)]) == 1
    assert "needs pyspark: pip install 'modelgate[spark]'" in capsys.readouterr().err


def test_without_java_the_message_says_how_to_install_it(
    logs: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    assert main(["analyze", "--engine", "spark", "--logs", str(logs)]) == 1
    err = capsys.readouterr().err
    assert "needs Java" in err and "apt-get install default-jre-headless" in err


def test_logs_takes_a_parquet_roll_up(
    logs: Path, rolled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--logs` on a roll-up reads it (it failed before: no record files there)."""
    raw, _, raw_counts = results_from_logs(str(logs), "ranker", None, timelines=False)
    up, plots, counts = results_from_logs(str(rolled), "ranker", None)
    _close(up, raw, "results")  # the sums' order differs: the last bits may too
    assert counts == raw_counts and plots == {}  # no timelines from a roll-up
    assert main(["analyze", "--logs", str(logs)]) == 0
    from_logs = capsys.readouterr().out
    assert main(["analyze", "--logs", str(rolled)]) == 0
    assert capsys.readouterr().out.replace(str(rolled), str(logs)) == from_logs
    # --engine with --parquet OUT: rolled into OUT, then analysed from there.
    out = tmp_path / "out"
    assert main(["analyze", "--engine", "duckdb", "--logs", str(logs), "--parquet", str(out)]) == 0
    assert capsys.readouterr().out == from_logs
    assert (out / "exposures").is_dir() and (out / "designs.json").exists()
    assert os.listdir(out / "feedback")
