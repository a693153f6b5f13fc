"""`modelgate analyze`: from files it recomputes what the live admin API says; it prints the
table from a live admin URL; --html writes a report with the plots, or names the install."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from modelgate.analysis.results import experiment_results
from modelgate.analyze.command import event_results_from_logs, results_from_logs
from modelgate.cli import main
from modelgate.mock.server import MockSettings
from modelgate.outcomes import experiment_designs

from .support import admin_stack, async_test, free_port
from .test_results import analysis_config, drive, flushed_results

MOCKS = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}


def live_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Traffic and feedback through a gateway logging to tmp_path; returns GET
    /experiments/ranker (over units, from the files once flushed), the per-event results of
    the live snapshot, and what `modelgate analyze --admin` printed meanwhile."""

    @async_test
    async def run() -> tuple[dict[str, Any], dict[str, Any], str]:
        config = analysis_config(log_dir=str(tmp_path))
        async with admin_stack(config, MOCKS) as admin:
            sent = await drive(admin.stack.url, 300, seed=5)
            async with aiohttp.ClientSession() as session:
                body = await flushed_results(session, admin.admin_url, sent)
            design = experiment_designs(admin.control.config)["ranker"]
            events = experiment_results(design, await admin.control.outcomes())
            argv = ["analyze", "--admin", admin.admin_url, "--experiment", "ranker"]
            code = await asyncio.to_thread(main, argv)
            assert code == 0
            return body, events, capsys.readouterr().out

    return run()


def test_files_give_the_live_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body, live, printed = live_run(tmp_path, capsys)
    assert "experiment ranker (control: control" in printed
    assert "unit of analysis: the unit" in printed and "SRM over units: chi2" in printed
    assert "  rating   candidate        mean         t" in printed

    # The per-event analysis of the files equals the live snapshot's, value for value.
    (offline,), timelines, join = event_results_from_logs(str(tmp_path), "ranker", None)
    assert join == {"joined": 600}  # every rating and click found its exposure
    assert [(v["name"], v["n"]) for v in offline["variants"]] == [
        (v["name"], v["n"]) for v in live["variants"]
    ]
    for mine, theirs in zip(offline["variants"], live["variants"], strict=True):
        for metric, summary in theirs["metrics"].items():
            got = mine["metrics"][metric]
            assert (got["count"], got["ones"]) == (summary["count"], summary["ones"])
            assert got["mean"] == pytest.approx(summary["mean"], rel=1e-9)
            assert got["variance"] == pytest.approx(summary["variance"], rel=1e-9)
    assert offline["metrics"] == live["metrics"]
    for mine, theirs in zip(offline["comparisons"], live["comparisons"], strict=True):
        assert (mine["metric"], mine["variant"], mine["test"]) == (
            theirs["metric"],
            theirs["variant"],
            theirs["test"],
        )
        for key in ("diff", "ci_low", "ci_high", "p_value", "p_value_holm", "rel_diff"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-9), key
    assert offline["srm"]["p_value"] == pytest.approx(live["srm"]["p_value"], rel=1e-12)
    assert offline["sample_size"] == live["sample_size"]

    timeline = timelines["ranker"]
    assert len(timeline["edges_s"]) == 21
    assert sum(sum(c) for c in timeline["split"].values()) == 300
    rating = timeline["metrics"]["rating"]["candidate"]
    assert rating["n"][-1] == offline["variants"][1]["metrics"]["rating"]["count"]
    assert rating["mean"][-1] == pytest.approx(offline["variants"][1]["metrics"]["rating"]["mean"])

    # Over units (the default of --logs, issue 13): with one request and one value of each
    # metric per unit, the per-unit numbers are the per-event ones: the same units, means,
    # variances and Welch test; the proportion's difference is the same, its interval
    # gbstats' (t at the Welch df) instead of the normal one, so equal to about 1%.
    (units,), _, excluded = results_from_logs(str(tmp_path), "ranker", None)
    assert units["unit_of_analysis"] == "unit" and excluded == {"excluded": 0, "ambiguous": 0}
    # The admin API reads the same engine (with one DuckDB thread: sums in another order).
    for mine, theirs in zip(units["comparisons"], body["comparisons"], strict=True):
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            if isinstance(value, float):
                assert value == pytest.approx(theirs[key], rel=1e-9), key
            else:
                assert value == theirs[key], key
    assert [v["units"] for v in body["variants"]] == [v["units"] for v in units["variants"]]
    assert body["srm"] == units["srm"]
    assert [v["units"] for v in units["variants"]] == [v["n"] for v in live["variants"]]
    assert units["srm"]["p_value"] == pytest.approx(live["srm"]["p_value"], rel=1e-12)
    for mine, theirs in zip(units["variants"], live["variants"], strict=True):
        for metric, summary in theirs["metrics"].items():
            got = mine["metrics"][metric]
            assert (got["units"], got["values"]) == (summary["count"], summary["count"])
            assert got["mean"] == pytest.approx(summary["mean"], rel=1e-9)
    assert units["variants"][0]["metrics"]["rating"]["variance"] == pytest.approx(
        live["variants"][0]["metrics"]["rating"]["variance"], rel=1e-9
    )
    assert {m: i["method"] for m, i in units["metrics"].items()} == {
        "clicked": "proportion",
        "rating": "mean",
    }
    for mine, theirs in zip(units["comparisons"], live["comparisons"], strict=True):
        assert mine["interval"] == "t" and mine["diff"] == pytest.approx(theirs["diff"], rel=1e-9)
        rel = 1e-9 if mine["method"] == "mean" else 2e-2
        width = mine["ci_high"] - mine["ci_low"]
        assert width == pytest.approx(theirs["ci_high"] - theirs["ci_low"], rel=rel)
        assert mine["p_value"] == pytest.approx(theirs["p_value"], rel=rel, abs=rel)


def test_html_report_from_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    logs = tmp_path / "logs"
    live_run(logs, capsys)
    report = tmp_path / "report.html"
    assert main(["analyze", "--logs", str(logs), "--html", str(report)]) == 0
    out = capsys.readouterr().out
    assert "experiment ranker" in out and "recomputed over units" in out
    page = report.read_text()
    for figure in ("means-clicked", "means-rating", "split"):
        assert f'<figure class="{figure}"><img alt="{figure}" src="data:image/png;base64,' in page
    assert "experiment ranker" in page


def test_html_without_matplotlib_names_the_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    logs = tmp_path / "logs"
    live_run(logs, capsys)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert main(["analyze", "--logs", str(logs), "--html", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "--html needs matplotlib" in err and "pip install 'modelgate[demo]'" in err
    assert not (tmp_path / "r.html").exists()


def test_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["analyze", "--admin", url]) == 1
    assert f"cannot reach the admin API at {url}" in capsys.readouterr().err
    assert main(["analyze", "--logs", str(tmp_path / "missing")]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert main(["analyze", "--logs", str(tmp_path)]) == 1
    assert "no exposure records with experiment designs" in capsys.readouterr().err
    assert main(["analyze"]) == 2
    assert "give --admin URL or --logs DIR" in capsys.readouterr().err

    @async_test
    async def unknown() -> None:
        async with admin_stack(analysis_config(), MOCKS) as admin:
            argv = ["analyze", "--admin", admin.admin_url, "--experiment", "nope"]
            assert await asyncio.to_thread(main, argv) == 1

    unknown()
    assert "404 no experiment named 'nope'" in capsys.readouterr().err


def test_a_reader_that_leaves_early_gets_no_traceback() -> None:
    """`modelgate analyze --sql ... | head`: the reader is gone before the query is written (a
    pipe whose read end is closed makes every write fail, as a finished `head` does)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "modelgate", "analyze", "--sql", "bigquery"]
            + ["--experiment", "ranker"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 141
