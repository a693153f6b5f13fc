"""Benchmark of the analysis engine (issue 13): one experiment's per-unit query over 10
million exposure and 10 million feedback records of 1 million units, in the real record-file
format (modelgate.analysis.synth), with DuckDB on one thread pinned to one CPU; the time of the
query and the process's peak memory (VmHWM, reset before the engine loads). The target is
under 2 s and 1 GiB. The same path at 100k records is a test (tests/test_analysis_engine.py).
The live engine (modelgate.analysis.live, what GET /experiments/{name} uses) is measured as
that endpoint runs it (a refresh, the query, the binary-metrics scan, the gateway's own
metrics and latency quantiles, the statistics), with nothing new and with new records before
each call, and its refresh after 1% more records (a new file of each kind, then grown),
against its full load in the same run.

Run: python -m pytest benchmarks/bench_analysis_engine.py --benchmark-enable -p no:cacheprovider -s
(MODELGATE_BENCH_SCALE=0.1 for a tenth of the records; the files are generated once, in a
child process so that its memory does not count, into MODELGATE_BENCH_DIR or a temp dir.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from modelgate.analysis.engine import AnalysisEngine
from modelgate.analysis.live import close_live_engines, live_engine
from modelgate.exposure import EXPOSURE_DTYPE
from modelgate.feedbacklog import FEEDBACK_DTYPE

SCALE = float(os.environ.get("MODELGATE_BENCH_SCALE", "1"))
RECORDS, UNITS = int(10_000_000 * SCALE), int(1_000_000 * SCALE)
pytestmark = pytest.mark.usefixtures("one_cpu")


def _child(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = Path(os.environ.get("MODELGATE_BENCH_DIR") or tmp_path_factory.mktemp("engine"))
    logs = root / f"logs-{RECORDS}"
    if not (logs / "done").exists():
        _child(
            "from modelgate.analysis.synth import Synthetic, write_synthetic\n"
            f"write_synthetic({str(logs)!r}, Synthetic(units={UNITS}, exposures={RECORDS}, "
            f"feedback={RECORDS}, records_per_file=1 << 20))\n"
        )
        (logs / "done").touch()
    return logs


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS


def _measure(benchmark: Any, engine_of: Any, source: Path, label: str) -> None:
    _reset_peak()
    start = time.perf_counter()
    engine = engine_of(source, threads=1)
    loaded = time.perf_counter() - start
    result = benchmark.pedantic(engine.query, args=("ranker",), rounds=3, iterations=1)
    peak = _peak_kib()
    benchmark.extra_info.update(
        {"load_s": round(loaded, 3), "peak_rss_mib": round(peak / 1024), "records": RECORDS}
    )
    print(
        f"\n{label}: {RECORDS} exposures + {RECORDS} feedback, {UNITS} units: load "
        f"{loaded:.2f} s, query min {benchmark.stats.stats.min:.2f} s, peak RSS "
        f"{peak / 1024:.0f} MiB; units per variant {result.units}"
    )
    assert sum(result.units.values()) > 0.5 * UNITS
    engine.close()


def test_engine_query_over_record_files(benchmark: Any, record_dir: Path) -> None:
    benchmark.group = "analysis engine: one experiment"
    _measure(benchmark, AnalysisEngine.from_logs, record_dir, "record files")


def test_engine_query_over_parquet(benchmark: Any, record_dir: Path) -> None:
    benchmark.group = "analysis engine: one experiment"
    rolled = record_dir.with_name(record_dir.name + "-parquet")
    if not (rolled / "designs.json").exists():
        _child(
            "from modelgate.analysis.load import write_parquet\n"
            f"write_parquet({str(record_dir)!r}, {str(rolled)!r})\n"
        )
    _measure(benchmark, AnalysisEngine.from_parquet, rolled, "Parquet roll-up")


def _grow(source: Path, target: Path, dtype: Any, records: int, day_ns: int) -> None:
    """Appends `records` records like those of `source` (a day later) to `target`, created
    with `source`'s sidecar: as a writer's open file grows."""
    import numpy as np

    data = np.fromfile(source, dtype=dtype, count=records)
    data["ts_ns"] += np.uint64(day_ns)
    if not target.exists():
        target.with_suffix(".json").write_bytes(source.with_suffix(".json").read_bytes())
    with open(target, "ab") as out:
        out.write(data.tobytes())


def test_live_engine_as_the_endpoint_runs_it(benchmark: Any, record_dir: Path) -> None:
    """GET /experiments/{name} as the admin API runs it (admin.results._from_logs: a refresh,
    the per-unit query, the binary-metrics scan, the gateway's own metrics with their latency
    quantiles per arm, the statistics). Peak memory apart for the first load and for the
    calls after it, each from a reset of VmHWM; then the calls with new records between
    them, as a gateway in traffic sees them (a new file of each kind, grown by 0.1% of the
    records before each call)."""
    benchmark.group = "analysis engine: one experiment"
    from modelgate.admin.results import _from_logs

    _reset_peak()
    live = live_engine(record_dir, threads=1)  # the one GET /experiments uses
    start = time.perf_counter()
    full = live.refresh()
    loaded = time.perf_counter() - start
    load_peak = _peak_kib()
    design = {"name": "ranker", "variants": ["control", "candidate"], "weights": [1, 1]}

    def endpoint() -> Any:  # GET /experiments/{name}: refresh, queries, statistics
        return _from_logs(str(record_dir), [dict(design, control="control", analysis={})])

    _reset_peak()
    benchmark.pedantic(endpoint, rounds=5, iterations=1)
    cpu = time.process_time()
    found = endpoint()
    cpu = time.process_time() - cpu
    peak = _peak_kib()
    assert found[0]["guardrails"]["comparisons"]  # the gateway's own metrics were computed
    query_s = []
    for _ in range(3):  # the per-unit query alone, as the raw engine's figures above
        start = time.perf_counter()
        result = live.query("ranker")
        query_s.append(time.perf_counter() - start)

    added = {
        (record_dir / f"{p}-20261202T000000.000000Z-p9999-0001.bin", d): p
        for p, d in (("exposure", EXPOSURE_DTYPE), ("feedback", FEEDBACK_DTYPE))
    }

    def grow(records: int) -> None:
        for (target, dtype), prefix in added.items():
            source = sorted(record_dir.glob(f"{prefix}-*.bin"))[0]
            _grow(source, target, dtype, records, 86_400 * 10**9)

    steps, live_calls = [], []
    try:
        # 1% more records: a new file of each kind, read; then those files grow, read again.
        for _ in range(2):
            grow(RECORDS // 200)
            start = time.perf_counter()
            step = live.refresh()
            steps.append(time.perf_counter() - start)
            assert step.records == 2 * (RECORDS // 200) and step.read == 2
        after = live.query("ranker")
        _reset_peak()
        for _ in range(5):  # in traffic: 0.1% more records before each call
            grow(RECORDS // 1000)
            start = time.perf_counter()
            endpoint()
            live_calls.append(time.perf_counter() - start)
        live_peak = _peak_kib()
    finally:
        for target, _ in added:
            target.unlink(missing_ok=True)
            target.with_suffix(".json").unlink(missing_ok=True)
    assert sum(after.units.values()) >= sum(result.units.values())
    ratio = sum(steps) / loaded
    stats = benchmark.stats.stats
    benchmark.extra_info.update(
        {
            "load_s": round(loaded, 3),
            "load_peak_rss_mib": round(load_peak / 1024),
            "endpoint_median_s": round(stats.median, 3),
            "endpoint_cpu_s": round(cpu, 3),
            "endpoint_peak_rss_mib": round(peak / 1024),
            "endpoint_in_traffic_s": [round(s, 3) for s in live_calls],
            "endpoint_in_traffic_peak_rss_mib": round(live_peak / 1024),
            "query_s": round(min(query_s), 3),
            "records": RECORDS,
            "refresh_1pct_s": [round(s, 3) for s in steps],
            "refresh_1pct_over_load": round(ratio, 4),
        }
    )
    print(
        f"\nlive engine: {RECORDS} exposures + {RECORDS} feedback, {UNITS} units: load "
        f"{loaded:.2f} s ({full.files} files, peak RSS {load_peak / 1024:.0f} MiB); endpoint "
        f"min {stats.min:.2f} s, median {stats.median:.2f} s, max {stats.max:.2f} s "
        f"(CPU {cpu:.2f} s), peak RSS {peak / 1024:.0f} MiB; with 0.1% new records before "
        f"each call: {', '.join(f'{s:.2f}' for s in live_calls)} s, peak RSS "
        f"{live_peak / 1024:.0f} MiB; query alone min {min(query_s):.2f} s; +1% records: "
        f"refresh {steps[0]:.3f} s (new files) + {steps[1]:.3f} s (grown) = {ratio:.1%} of "
        f"the load; units per variant {result.units}"
    )
    assert sum(result.units.values()) > 0.5 * UNITS
    close_live_engines()
