"""GET /experiments/{name}: per-variant summaries, Welch and proportion tests against scipy,
Holm, SRM against scipy's chisquare, sample size, 404s; and the same with `--workers 2`."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from scipy import stats as scipy_stats  # type: ignore[import-untyped]

from modelgate.analysis.results import is_binary
from modelgate.mock.server import MockSettings, start_mock
from modelgate.stats import holm, proportion_sample_size, sample_size

from .support import (
    ServeProcesses,
    ab_config,
    admin_stack,
    async_test,
    free_port,
    get_json,
    serve_ready,
    served_config,
)
from .test_outcomes import variant_of

MOCKS = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}
FEEDBACK = "/_modelgate/feedback"
ANALYSIS = {"alpha": 0.05, "power": 0.8, "mde": {"rating": 0.1, "clicked": 0.05}}


def analysis_config(**extra: Any) -> dict[str, Any]:
    config = ab_config(**extra)
    config["routes"][0]["experiment"]["analysis"] = ANALYSIS
    return config


async def drive(
    url: str, units: int, seed: int = 7, *, clicks_by_request_id: bool = True
) -> dict[str, dict[str, list[float]]]:
    """One request per unit, then a rating per unit (by unit) and a click per request (by
    request id, else by unit). Returns the values sent, by metric and variant."""
    rng = random.Random(seed)
    sent: dict[str, dict[str, list[float]]] = {
        "rating": {"control": [], "candidate": []},
        "clicked": {"control": [], "candidate": []},
    }
    connector = aiohttp.TCPConnector(limit=16, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def request(unit: str) -> str:
            async with session.post(
                url + "/predict", json={}, headers={"x-user-id": unit}
            ) as response:
                assert response.status == 200
                return response.headers["x-request-id"]

        names = [f"user-{i}" for i in range(units)]
        ids = await asyncio.gather(*(request(u) for u in names))
        ratings, clicks = [], []
        for unit, rid in zip(names, ids, strict=True):
            variant = variant_of(unit)
            rating = rng.gauss(1.0 if variant == "control" else 1.15, 0.5)
            click = int(rng.random() < (0.3 if variant == "control" else 0.4))
            sent["rating"][variant].append(rating)
            sent["clicked"][variant].append(click)
            ratings.append(
                {"experiment": "ranker", "unit": unit, "metric": "rating", "value": rating}
            )
            key = (
                {"request_id": rid}
                if clicks_by_request_id
                else {"experiment": "ranker", "unit": unit}
            )
            clicks.append({**key, "metric": "clicked", "value": bool(click)})
        for batch in (ratings, clicks):
            for start in range(0, len(batch), 250):
                async with session.post(
                    url + FEEDBACK, json=batch[start : start + 250]
                ) as response:
                    assert response.status == 202, await response.text()
    return sent


def check_results(body: dict[str, Any], sent: dict[str, dict[str, list[float]]]) -> None:
    """The results equal scipy's tests on the very values sent."""
    assert body["experiment"] == "ranker" and body["control"] == "control"
    variants = {v["name"]: v for v in body["variants"]}
    counts = [variants["control"]["n"], variants["candidate"]["n"]]
    assert counts == [len(sent["rating"]["control"]), len(sent["rating"]["candidate"])]
    by_metric = {c["metric"]: c for c in body["comparisons"]}
    assert body["metrics"] == {"clicked": {"binary": True}, "rating": {"binary": False}}

    a, b = sent["rating"]["control"], sent["rating"]["candidate"]
    welch = by_metric["rating"]
    theirs = scipy_stats.ttest_ind(b, a, equal_var=False)
    ci = theirs.confidence_interval(0.95)
    assert welch["test"] == "welch" and welch["variant"] == "candidate"
    assert welch["t"] == pytest.approx(theirs.statistic, rel=1e-9)
    assert welch["p_value"] == pytest.approx(theirs.pvalue, rel=1e-9)
    assert welch["df"] == pytest.approx(theirs.df, rel=1e-9)
    assert welch["diff"] == pytest.approx(np.mean(b) - np.mean(a), rel=1e-9)
    assert (welch["ci_low"], welch["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert welch["rel_diff"] == pytest.approx((np.mean(b) - np.mean(a)) / np.mean(a), rel=1e-9)
    rating = variants["candidate"]["metrics"]["rating"]
    assert rating["count"] == len(b)
    assert rating["mean"] == pytest.approx(np.mean(b), rel=1e-12)
    assert rating["variance"] == pytest.approx(np.var(b, ddof=1), rel=1e-9)

    xa, xb = sent["clicked"]["control"], sent["clicked"]["candidate"]
    prop = by_metric["clicked"]
    table = [[sum(xa), len(xa) - sum(xa)], [sum(xb), len(xb) - sum(xb)]]
    chi2 = scipy_stats.chi2_contingency(table, correction=False)
    assert prop["test"] == "proportion"
    assert prop["p_value"] == pytest.approx(chi2.pvalue, rel=1e-9)
    assert prop["diff"] == pytest.approx(np.mean(xb) - np.mean(xa), rel=1e-12)
    assert variants["control"]["metrics"]["clicked"]["ones"] == sum(xa)

    adjusted = holm([by_metric["clicked"]["p_value"], by_metric["rating"]["p_value"]])
    assert by_metric["clicked"]["p_value_holm"] == pytest.approx(adjusted[0], rel=1e-12)
    assert by_metric["rating"]["p_value_holm"] == pytest.approx(adjusted[1], rel=1e-12)
    assert body["multiple_testing"] == {"method": "holm", "tests": 2}

    expected = [sum(counts) / 2] * 2
    srm = scipy_stats.chisquare(counts, expected)
    assert body["srm"]["p_value"] == pytest.approx(srm.pvalue, rel=1e-9)
    assert body["srm"]["chi2"] == pytest.approx(srm.statistic, rel=1e-9)
    assert body["srm"]["mismatch"] is bool(srm.pvalue < 0.001)

    sizes = {s["metric"]: s for s in body["sample_size"]}
    n_rating = sample_size(0.1, float(np.std(a, ddof=1)), 0.05, 0.8)
    assert sizes["rating"]["n_per_arm"] == int(np.ceil(n_rating))
    assert sizes["rating"]["still_needed"] == {
        "control": max(0, int(np.ceil(n_rating)) - len(a)),
        "candidate": max(0, int(np.ceil(n_rating)) - len(b)),
    }
    p_a = float(np.mean(xa))
    n_clicked = proportion_sample_size(p_a, p_a + 0.05, 0.05, 0.8)
    assert sizes["clicked"]["n_per_arm"] == int(np.ceil(n_clicked))


# Without exposure records the results are the live snapshot's, per event (the former
# analysis): these tests keep it checked. With them, see test_results_over_units_from_logs.
LIVE_ONLY = {"exposures": {"enabled": False}}


@async_test
async def test_results_equal_scipy_on_the_values_posted() -> None:
    async with admin_stack(analysis_config(**LIVE_ONLY), MOCKS) as admin:
        sent = await drive(admin.stack.url, 400)
        async with aiohttp.ClientSession() as session:
            status, body = await get_json(session, admin.admin_url + "/experiments/ranker")
            assert status == 200, body
            check_results(body, sent)
            status, listing = await get_json(session, admin.admin_url + "/experiments")
            assert status == 200
            assert [e["experiment"] for e in listing["experiments"]] == ["ranker"]
            status, missing = await get_json(session, admin.admin_url + "/experiments/nope")
            assert status == 404
            assert missing["error"] == "unknown_experiment"
            assert "'nope'" in missing["detail"] and "ranker" in missing["detail"]
            assert set(missing) == {"error", "detail", "request_id"}


@async_test
async def test_results_before_any_feedback_and_with_an_srm() -> None:
    config = analysis_config(**LIVE_ONLY)
    async with admin_stack(config, MOCKS) as admin, aiohttp.ClientSession() as session:
        # Every unit forced onto the candidate: the observed split is far from 50/50.
        units = [f"u{i}" for i in range(300)]
        candidates = [u for u in units if variant_of(u) == "candidate"][:60]
        for unit in candidates:
            async with session.post(
                admin.stack.url + "/predict", json={}, headers={"x-user-id": unit}
            ) as response:
                assert response.status == 200
        status, body = await get_json(session, admin.admin_url + "/experiments/ranker")
    assert status == 200
    assert [v["n"] for v in body["variants"]] == [0, 60]
    assert body["srm"]["mismatch"] is True and body["srm"]["p_value"] < 1e-9
    assert body["comparisons"] == [] and body["metrics"] == {}
    assert {s["metric"] for s in body["sample_size"]} == {"rating", "clicked"}
    assert all("error" in s for s in body["sample_size"])


def test_binary_detection_from_moments() -> None:
    from modelgate.outcomes import Moments

    rng = random.Random(1)
    for values, binary in (
        ([rng.random() < 0.3 for _ in range(10_000)], True),
        ([1.0] * 50, True),
        ([0.0] * 50, True),
        ([0.0, 1.0, 2.0], False),
        ([0.5, 0.5], False),
        ([1.0, 1.0, -1.0, 1.0], False),
        ([0.0, 1.0, 1.0, 0.25], False),
    ):
        moments = Moments()
        for value in values:
            moments.add(float(value))
        found = is_binary(moments.count, moments.mean, moments.m2, moments.ones)
        assert found is binary, values
    assert is_binary(0, 0.0, 0.0, 0) is False


pytestmark_workers = pytest.mark.skipif(
    not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT"
)


@pytestmark_workers
def test_results_with_two_workers(tmp_path: Path) -> None:
    @async_test
    async def run() -> None:
        runner, upstream_port = await start_mock(MockSettings(name="m"))
        try:
            port, admin_port = free_port(), free_port()
            ports = {"model-a": upstream_port, "model-b": upstream_port}
            config = served_config(analysis_config(log_dir=str(tmp_path)), ports, port, admin_port)
            await serve_ready(processes, config, "--workers", "2")
            admin = f"http://127.0.0.1:{admin_port}"
            async with aiohttp.ClientSession() as session:
                # Request ids are remembered by the worker that served the request, and the
                # feedback may reach the other one: clicks go by unit here.
                url = f"http://127.0.0.1:{port}"
                sent = await drive(url, 300, seed=11, clicks_by_request_id=False)
                _, status = await get_json(session, admin + "/status")
                served = [w["pid"] for w in status["workers"]]
                body = await flushed_results(session, admin, sent)
            assert len(served) == 2
            check_unit_results(body, sent)
        finally:
            await runner.cleanup()

    with ServeProcesses(tmp_path) as processes:
        run()


async def flushed_results(
    session: aiohttp.ClientSession, admin: str, sent: dict[str, dict[str, list[float]]]
) -> dict[str, Any]:
    """GET /experiments/ranker once every value sent is in the files: the writers flush
    once a second, so results from log_dir lag the traffic by up to that (`as_of`)."""
    total = sum(len(v) for v in sent["clicked"].values())
    deadline = time.monotonic() + 10.0
    while True:
        status, body = await get_json(session, admin + "/experiments/ranker")
        assert status == 200, body
        values = [
            sum(v["metrics"].get(m, {}).get("values", 0) for v in body["variants"])
            for m in ("rating", "clicked")
        ]
        if values == [total, total] or time.monotonic() > deadline:
            found: dict[str, Any] = body
            return found
        await asyncio.sleep(0.2)


def check_unit_results(body: dict[str, Any], sent: dict[str, dict[str, list[float]]]) -> None:
    """Results over units (issue 13) from log_dir, one request and one value of each metric
    per unit: the means and Welch test are the per-value ones; the proportion's difference
    too, its interval gbstats' (t at the Welch df)."""
    assert body["unit_of_analysis"] == "unit" and body["source"] == "logs"
    assert body["as_of"] and "flush" in body["as_of_note"]
    variants = {v["name"]: v for v in body["variants"]}
    a, b = sent["rating"]["control"], sent["rating"]["candidate"]
    assert [variants["control"]["units"], variants["candidate"]["units"]] == [len(a), len(b)]
    by_metric = {c["metric"]: c for c in body["comparisons"]}
    welch = by_metric["rating"]
    theirs = scipy_stats.ttest_ind(b, a, equal_var=False)
    ci = theirs.confidence_interval(0.95)
    assert (welch["method"], welch["interval"]) == ("mean", "t")
    assert welch["p_value"] == pytest.approx(theirs.pvalue, rel=1e-9)
    assert (welch["ci_low"], welch["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
    xa, xb = sent["clicked"]["control"], sent["clicked"]["candidate"]
    assert by_metric["clicked"]["method"] == "proportion"
    assert by_metric["clicked"]["diff"] == pytest.approx(np.mean(xb) - np.mean(xa), rel=1e-9)
    srm = scipy_stats.chisquare([len(a), len(b)])
    assert body["srm"]["p_value"] == pytest.approx(srm.pvalue, rel=1e-9)


def test_results_over_units_from_logs(tmp_path: Path) -> None:
    """With exposures recorded, GET /experiments/{name} reads log_dir through the analysis
    engine: per unit, saying when the records were read up to."""

    @async_test
    async def run() -> None:
        async with (
            admin_stack(analysis_config(log_dir=str(tmp_path)), MOCKS) as admin,
            aiohttp.ClientSession() as session,
        ):
            status, empty = await get_json(session, admin.admin_url + "/experiments/ranker")
            assert status == 200 and empty["unit_of_analysis"] == "unit"
            assert [v["units"] for v in empty["variants"]] == [0, 0]
            assert empty["comparisons"] == [] and empty["srm"]["error"] == "no units enrolled yet"
            sent = await drive(admin.stack.url, 300, seed=3)
            check_unit_results(await flushed_results(session, admin.admin_url, sent), sent)
            status, listing = await get_json(session, admin.admin_url + "/experiments")
            assert status == 200 and listing["experiments"][0]["source"] == "logs"

    run()


def test_bad_analysis_settings_name_their_key_paths() -> None:
    from modelgate.config import ConfigError, validate_config

    config = ab_config()
    config["routes"][0]["experiment"]["analysis"] = {
        "alpha": 1.5,
        "power": 0,
        "mde": {"rating": -0.1, "bad name!": 1, "clicked": "big"},
        "tails": 2,
    }
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    where = "routes[0].experiment.analysis"
    got = {error.split(": ")[0] for error in caught.value.errors}
    assert {
        f"{where}.alpha",
        f"{where}.power",
        f"{where}.mde.rating",
        f"{where}.mde.clicked",
        f"{where}.tails",
    } <= got
    assert any(e.startswith(f"{where}.mde.bad name!") for e in caught.value.errors)
