"""The analysis engine (issue 13): its per-variant numbers over units equal a hand-written
pandas groupby (per unit, then per variant) on the same raw records, from the log files and
from their Parquet roll-up; damaged files are skipped as modelgate.recordfiles skips them;
bad inputs get clear errors; the query prints for each warehouse dialect."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from modelgate.analysis.engine import AnalysisEngine, AnalysisError, ExperimentUnits
from modelgate.analysis.load import write_parquet
from modelgate.analysis.sql import DIALECTS, for_dialect
from modelgate.analysis.synth import Synthetic, write_synthetic
from modelgate.cli import main
from modelgate.exposure import EXPOSURE_DTYPE, EXPOSURE_NAMES, FLAG_ENROLLED
from modelgate.feedbacklog import FEEDBACK_DTYPE, FEEDBACK_NAMES, FLAG_BY_REQUEST_ID
from modelgate.recordfiles import iter_record_files
from modelgate.stats import UnitStats

# The small version of the benchmark's path: 100k records of each kind, 10k units.
SMALL = Synthetic(units=10_000, exposures=100_000, feedback=100_000, records_per_file=30_000)
RATIOS = [("clicks", "views"), ("revenue", "clicks")]


def _frame(path: Path, prefix: str, dtype: Any, tables: dict[str, str]) -> pd.DataFrame:
    """The records of every readable file, names resolved file by file (the reference reads
    through the same damage-skipping reader, nothing else)."""
    parts = []
    for _, data, sidecar in iter_record_files(path, prefix, dtype, tables):
        unit = data["unit_hash"].view(np.int64)  # exact 64-bit keys, nullable below
        frame = pd.DataFrame({"ts_ns": data["ts_ns"], "unit_hash": unit})
        frame["request_id"] = [bytes(r) for r in data["request_id"]]
        frame["flags"] = data["flags"]
        for field, table in tables.items():
            frame[field.removesuffix("_id")] = np.asarray(sidecar[table])[data[field]]
        if "value" in (dtype.names or ()):
            frame["value"] = data["value"]
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def _reference(path: Path, experiment: str) -> dict[str, Any]:
    """Per unit first, then per variant over units, in plain pandas."""
    ex = _frame(path, "exposure", EXPOSURE_DTYPE, EXPOSURE_NAMES)
    ex = ex[ex.experiment == experiment]
    # An id tail exposed (enrolled or not) with more than one (unit, variant) is ambiguous:
    # its feedback by request id is dropped and counted, never attributed (issue 12 review).
    claims = ex.groupby("request_id")[["unit_hash", "variant"]].nunique()
    ambiguous = set(claims[(claims.unit_hash > 1) | (claims.variant > 1)].index)
    ex = ex[(ex["flags"] & FLAG_ENROLLED) != 0]
    ex = ex.sort_values("ts_ns", kind="stable")
    units = ex.groupby("unit_hash").agg(
        variant=("variant", "first"), exposures=("ts_ns", "size"), kinds=("variant", "nunique")
    )
    fb = _frame(path, "feedback", FEEDBACK_DTYPE, FEEDBACK_NAMES)
    fb = fb[fb.experiment == experiment].copy()
    by_request = (fb["flags"] & FLAG_BY_REQUEST_ID) != 0
    dropped = by_request & fb.request_id.isin(ambiguous)
    ambiguous_values = fb[dropped].groupby("metric").size()
    fb, by_request = fb[~dropped], by_request[~dropped]
    first = dict(zip(ex.request_id, ex.unit_hash.tolist(), strict=True))
    for request_id, unit in zip(ex.request_id[::-1], ex.unit_hash[::-1].tolist(), strict=True):
        first[request_id] = unit  # an id seen twice: its first exposure's unit
    units_of = [
        first.get(r) if asked else u
        for r, u, asked in zip(fb.request_id, fb.unit_hash.tolist(), by_request, strict=True)
    ]
    fb["unit"] = pd.array(units_of, dtype="Int64")
    claimed = fb.unit.isin(units.index)
    excluded = (
        fb[~claimed].groupby("metric").agg(units=("unit", "nunique"), values=("value", "size"))
    )
    sums = fb[claimed].groupby(["unit", "metric"]).value.agg(["sum", "count"]).unstack(fill_value=0)
    sums.columns = [f"{stat}:{metric}" for stat, metric in sums.columns]
    sums.index = sums.index.astype(np.int64)
    per_unit = units.join(sums, how="left").fillna(0)
    out: dict[str, Any] = {
        "units": units.groupby("variant").size().to_dict(),
        "switched": units[units.kinds > 1].groupby("variant").size().to_dict(),
        "excluded": {m: (int(r.units), int(r["values"])) for m, r in excluded.iterrows()},
        "ambiguous": {m: int(n) for m, n in ambiguous_values.items()},
        "metrics": {},
    }
    metrics = sorted(fb.metric.unique())
    for variant, group in per_unit.groupby("variant"):
        for metric in metrics:
            x = group[f"sum:{metric}"]
            denominators = {
                "exposures": group.exposures,
                "values": group[f"count:{metric}"],
                **{d: group[f"sum:{d}"] for m, d in RATIOS if m == metric},
            }
            for name, y in denominators.items():
                out["metrics"][(metric, name, variant)] = {
                    "count": len(x),
                    "mean_x": x.mean(),
                    "mean_y": y.mean(),
                    "m2_x": x.var(ddof=1) * (len(x) - 1),
                    "m2_y": y.var(ddof=1) * (len(x) - 1),
                    "c_xy": x.cov(y) * (len(x) - 1),
                    "nonzero_x": int((x != 0).sum()),
                }
    return out


def _assert_equal(result: ExperimentUnits, reference: dict[str, Any]) -> None:
    assert result.units == reference["units"]
    assert {v: n for v, n in result.switched.items() if n} == reference["switched"]
    assert result.excluded == reference["excluded"]
    assert result.ambiguous == reference["ambiguous"]
    seen = {(m, d, v): s for (m, d), by in result.metrics.items() for v, s in by.items()}
    assert seen.keys() == reference["metrics"].keys()
    for key, expected in reference["metrics"].items():
        got: UnitStats = seen[key]
        assert got.count == expected["count"] and got.nonzero_x == expected["nonzero_x"], key
        for name in ("mean_x", "mean_y", "m2_x", "m2_y", "c_xy"):
            assert getattr(got, name) == pytest.approx(expected[name], rel=1e-9, abs=1e-9), (
                key,
                name,
            )


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("logs"), SMALL)


def test_engine_equals_a_pandas_groupby_per_unit_then_per_variant(logs: Path) -> None:
    engine = AnalysisEngine.from_logs(logs, threads=1)
    result = engine.query("ranker", RATIOS)
    reference = _reference(logs, "ranker")
    _assert_equal(result, reference)
    # Repeat visitors are what the test is about: many units came back, and posted again.
    per_unit = result.exposures["control"]
    assert per_unit.mean_x > 2 and per_unit.m2_x / per_unit.count > 10
    assert result.excluded["revenue"][0] > 0  # feedback of units never exposed, counted
    assert sum(result.ambiguous.values()) > 0  # reused ids: their feedback dropped, counted
    assert sum(reference["switched"].values()) > 0
    assert result.variants == ["control", "candidate"]  # the design's order


def test_parquet_roll_up_gives_the_same_numbers(logs: Path, tmp_path: Path) -> None:
    written = write_parquet(logs, tmp_path / "pq")
    assert written == {"exposures": SMALL.exposures, "feedback": SMALL.feedback}
    assert sorted(p.name for p in (tmp_path / "pq" / "exposures").iterdir()) == [
        "experiment=other",
        "experiment=ranker",
    ]
    dates = sorted(p.name for p in (tmp_path / "pq" / "exposures" / "experiment=ranker").iterdir())
    assert dates == ["date=2026-11-30", "date=2026-12-01"]
    raw = AnalysisEngine.from_logs(logs, threads=1).query("ranker", RATIOS)
    rolled = AnalysisEngine.from_parquet(tmp_path / "pq", threads=1)
    assert rolled.experiments() == ["other", "ranker"]
    again = rolled.query("ranker", RATIOS)
    _assert_equal(again, _reference(logs, "ranker"))
    assert again.values == raw.values and again.variants == raw.variants
    write_parquet(logs, tmp_path / "pq")  # redone: partitions replaced, not doubled
    assert AnalysisEngine.from_parquet(tmp_path / "pq").query("ranker").units == raw.units


def _damage(logs: Path, tmp_path: Path) -> Path:
    """A copy of the logs with a torn tail, a file without sidecar and ids past a table."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in sorted(logs.iterdir()):
        (damaged / file.name).write_bytes(file.read_bytes())
    exposure = sorted(damaged.glob("exposure-*.bin"))
    with exposure[0].open("ab") as out:
        out.write(b"\x01" * 17)  # a killed writer's torn last record
    Path(str(exposure[1])[:-4] + ".json").unlink()  # its names are lost: skipped whole
    feedback = sorted(damaged.glob("feedback-*.bin"))[0]
    records = np.fromfile(feedback, dtype=FEEDBACK_DTYPE)
    records["metric_id"][:5] = 999  # ids no sidecar names: those records are skipped
    records.tofile(feedback)
    return damaged


def test_damaged_files_are_skipped_as_recordfiles_skips_them(
    logs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    damaged = _damage(logs, tmp_path)
    with caplog.at_level(logging.WARNING, logger="modelgate.recordlog"):
        engine = AnalysisEngine.from_logs(damaged, threads=1)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "torn last record" in messages and "no sidecar" in messages
    assert "5 records whose ids are not in the sidecar" in messages
    _assert_equal(engine.query("ranker", RATIOS), _reference(damaged, "ranker"))


def test_bad_inputs_are_named(logs: Path, tmp_path: Path) -> None:
    with pytest.raises(AnalysisError, match="not a directory"):
        AnalysisEngine.from_logs(tmp_path / "missing")
    with pytest.raises(AnalysisError, match="no Parquet roll-up"):
        AnalysisEngine.from_parquet(tmp_path)
    engine = AnalysisEngine.from_logs(logs)
    with pytest.raises(AnalysisError, match="no experiment named 'nope'.*found: other, ranker"):
        engine.query("nope")


def test_an_empty_log_dir_has_no_experiments(tmp_path: Path) -> None:
    assert AnalysisEngine.from_logs(tmp_path).experiments() == []


@pytest.mark.parametrize("dialect", DIALECTS)
def test_the_query_prints_for_each_warehouse(
    dialect: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sql = for_dialect(dialect, "it's", RATIOS)
    assert "var" in sql.lower() and "covar_samp" in sql.lower()
    assert main(["analyze", "--sql", dialect, "--experiment", "ranker", "--ratio", "a/b"]) == 0
    printed = capsys.readouterr().out
    assert "'ranker'" in printed and "'a'" in printed and "'b'" in printed


def test_sql_flag_errors_name_the_problem(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["analyze", "--sql", "oracle", "--experiment", "x"]) == 1
    assert "unknown dialect; one of: bigquery" in capsys.readouterr().err
    assert main(["analyze", "--sql", "trino"]) == 1
    assert "needs --experiment" in capsys.readouterr().err
    assert main(["analyze", "--sql", "trino", "--experiment", "x", "--ratio", "a"]) == 1
    assert "METRIC/DENOMINATOR" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "sqlglot", None)
    assert main(["analyze", "--sql", "trino", "--experiment", "x"]) == 1
    assert "pip install 'modelgate[warehouse]'" in capsys.readouterr().err


def test_parquet_flag(logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--logs", str(logs), "--parquet", str(tmp_path / "out")]) == 0
    assert "rolled 100000 exposure and 100000 feedback records" in capsys.readouterr().out
    assert main(["analyze", "--parquet", str(tmp_path / "out")]) == 1
    assert "needs --logs" in capsys.readouterr().err
    assert main(["analyze", "--logs", str(tmp_path / "nope"), "--parquet", "x"]) == 1
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("by_request", [0.0, 1.0])
def test_feedback_of_one_kind_only_is_read(tmp_path: Path, by_request: float) -> None:
    """Files with feedback only by unit (or only by request id): the other kind's table is
    empty, not an error (a strided view of no records failed before, found by issue 13's
    results through the demo)."""
    write_synthetic(
        tmp_path, Synthetic(units=50, exposures=300, feedback=200, by_request=by_request)
    )
    engine = AnalysisEngine.from_logs(tmp_path)
    units = engine.query("ranker")
    assert sum(units.values["revenue"].values()) > 0
    assert set(engine.binary_metrics("ranker")) == {"clicks", "revenue", "views"}
    assert (
        engine.binary_metrics("ranker")["clicks"] and not engine.binary_metrics("ranker")["views"]
    )
    engine.close()
