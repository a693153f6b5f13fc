"""Spark equals DuckDB on the engine benchmark's records (issue 13): rolls a log directory up
to Parquet once, runs the experiment's query and the gateway's own metrics on both engines
over the same files, and checks every count and moment to 1e-9 (the comparison of
tests/test_analysis_spark.py). Prints the times.

    python benchmarks/spark_equality.py /tmp/engine-bench/logs-10000000 [EXPERIMENT]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelgate.analysis.engine import AnalysisEngine  # noqa: E402
from modelgate.analysis.load import write_parquet  # noqa: E402
from modelgate.analysis.spark import SparkAnalysisEngine  # noqa: E402
from modelgate.analysis.system import system_units  # noqa: E402
from tests.test_analysis_spark import _close, _moments, _units_equal  # noqa: E402


def main(log_dir: str, experiment: str = "ranker") -> None:
    rolled = Path(log_dir).with_name(Path(log_dir).name + "-parquet")
    if not (rolled / "exposures").is_dir():
        started = time.perf_counter()
        written = write_parquet(log_dir, rolled)
        print(f"rolled up {written} in {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    duck_engine = AnalysisEngine.from_parquet(rolled, threads=1)
    duck = duck_engine.query(experiment)
    duck_system = system_units(duck_engine, experiment, duck.variants)
    print(f"duckdb: {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    spark = SparkAnalysisEngine.open(rolled)
    ours = spark.query(experiment)
    system = system_units(spark, experiment, ours.variants)
    print(f"spark: {time.perf_counter() - started:.1f} s", flush=True)
    _units_equal(duck, ours)
    for variant in duck.variants:
        _close(_moments(duck_system.errors[variant]), _moments(system.errors[variant]), "err")
        _close(_moments(duck_system.latency[variant]), _moments(system.latency[variant]), "ms")
        mine, theirs = system.quantiles[variant], duck_system.quantiles[variant]
        assert mine.requests == theirs.requests
        _close(
            {q: getattr(e, "estimate", e) for q, e in mine.estimates.items()},
            {q: getattr(e, "estimate", e) for q, e in theirs.estimates.items()},
            "quantiles",
        )
    units = sum(s.count for s in duck.exposures.values())
    print(f"equal to 1e-9: {experiment}, {units} units, {len(duck.metrics)} metric rows")
    spark.close()
    duck_engine.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
