"""The load driver (`modelgate bench`) against mock models, tiny servers and a gateway."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import pickle
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import xxhash
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from modelgate.bench.run import BenchConfig, FeedbackSpec, format_report, run_bench
from modelgate.bench.traffic import RequestFactory
from modelgate.cli import main
from modelgate.mock.server import MockSettings, start_mock
from modelgate.telemetry.histogram import RELATIVE_ERROR, LatencyHistogram

from .support import (
    ab_config,
    async_test,
    gateway_stack,
    raw_upstream,
    read_request_head,
)

SRC = Path(__file__).resolve().parents[1] / "src"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def tiny_server(handler: Handler) -> AsyncIterator[str]:
    """An aiohttp app answering every path with `handler`; yields its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def mock_url(settings: MockSettings) -> AsyncIterator[str]:
    runner, port = await start_mock(settings)
    try:
        yield f"http://127.0.0.1:{port}/predict"
    finally:
        await runner.cleanup()


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads a request head and closes the connection without an answer."""
    await read_request_head(reader)


def variant_of(unit: str) -> str:
    bucket = xxhash.xxh64_intdigest(f"ranker:{unit}".encode()) % 10000
    return "control" if bucket < 5000 else "candidate"


# --- the histogram -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(min_value=1e-6, max_value=60.0), min_size=1, max_size=300),
    st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=5),
)
def test_histogram_quantiles_are_within_the_relative_error(
    samples: list[float], qs: list[float]
) -> None:
    hist = LatencyHistogram()
    for value in samples:
        hist.record(value)
    data = np.array(samples)
    # Ours is the order statistic of rank ceil(q * n); numpy's interpolating percentile lies
    # between the same two neighbouring order statistics, "lower" and "higher".
    tolerance = RELATIVE_ERROR + 1e-6
    for q, got in zip(qs, hist.quantiles(qs), strict=True):
        low = float(np.percentile(data, 100 * q, method="lower"))
        high = float(np.percentile(data, 100 * q, method="higher"))
        assert low * (1 - tolerance) <= got <= high * (1 + tolerance)
        exact = float(np.percentile(data, 100 * q, method="inverted_cdf"))
        if low == high:
            assert abs(got - exact) <= tolerance * exact
    assert hist.count == len(samples)
    assert hist.max == pytest.approx(max(samples), rel=1e-6, abs=1e-9)
    assert hist.mean == pytest.approx(float(np.mean(data)), rel=1e-6, abs=1e-9)


def test_histogram_merges_across_pickles_like_one_histogram() -> None:
    rng = np.random.default_rng(3)
    samples = rng.lognormal(-5, 1.5, 20_000)
    whole, parts = LatencyHistogram(), [LatencyHistogram() for _ in range(3)]
    whole.record_many(samples)
    for i, value in enumerate(samples):
        parts[i % 3].record(float(value))
    merged = LatencyHistogram.merged(pickle.loads(pickle.dumps(p)) for p in parts)
    qs = [0.0, 0.5, 0.9, 0.99, 0.999, 1.0]
    assert merged.quantiles(qs) == whole.quantiles(qs)
    assert merged.count == whole.count == len(samples)
    assert math.isnan(LatencyHistogram().quantile(0.5))
    with pytest.raises(ValueError):
        whole.quantile(1.5)


# --- request bodies ----------------------------------------------------------------------


def test_request_factory_fills_templates_unit_headers_and_body_files(tmp_path: Path) -> None:
    config = BenchConfig(
        "http://127.0.0.1:9/p?q=1",
        body='{"user": "{unit}", "x": {rand}, "n": {seq}}',
        unit_header="x-user-id",
        units=5,
        headers=(("x-extra", "1"),),
    )
    factory = RequestFactory(config, random.Random(1))
    for seq in range(20):
        data, unit = factory.make(seq)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0] == "POST /p?q=1 HTTP/1.1"
        assert "host: 127.0.0.1:9" in lines and "x-extra: 1" in lines
        assert f"x-user-id: {unit}" in lines and f"content-length: {len(body)}" in lines
        parsed = orjson.loads(body)
        assert parsed["user"] == unit and unit in {f"user-{i}" for i in range(5)}
        assert 0.0 <= parsed["x"] < 1.0 and parsed["n"] == seq

    builtin = RequestFactory(BenchConfig("http://h/"), random.Random(2))
    data, unit = builtin.make(0)
    body = orjson.loads(data.partition(b"\r\n\r\n")[2])
    assert body["unit"] == unit and len(body["features"]) == 8

    get = RequestFactory(BenchConfig("http://h/", method="GET"), random.Random(2))
    data, unit = get.make(0)
    assert data.endswith(b"\r\n\r\n") and b"content-length" not in data and unit is None

    jsonl = tmp_path / "bodies.jsonl"
    jsonl.write_text('{"a": 1}\n\n{"a": 2}\n')
    from_file = RequestFactory(BenchConfig("http://h/", body_file=str(jsonl)), random.Random(3))
    bodies = [from_file.make(i)[0].partition(b"\r\n\r\n")[2] for i in range(4)]
    assert bodies == [b'{"a": 1}', b'{"a": 2}', b'{"a": 1}', b'{"a": 2}']


# --- latency -----------------------------------------------------------------------------


@async_test
async def test_p50_matches_a_mock_with_a_fixed_delay() -> None:
    async with mock_url(MockSettings(latency_ms=50)) as url:
        report = await run_bench(BenchConfig(url, rate=40, duration_s=1.5))
    assert report.mode == "open" and report.sent == 60 and report.responses == 60
    assert report.errors == {} and report.overall.status_classes["2xx"] == 60
    assert 0.045 <= report.overall.latency_s["p50"] <= 0.150
    assert set(report.variants) == {"-"}
    assert report.schedule_lag_s is not None and report.schedule_lag_s["max"] < 1.0
    assert 20 <= report.overall.throughput_rps <= 60


@async_test
async def test_open_loop_shows_queueing_that_closed_loop_hides() -> None:
    lock = asyncio.Lock()

    async def serialized(request: web.Request) -> web.Response:
        await request.read()
        async with lock:  # one request at a time: capacity is exactly 1 / 50 ms = 20/s
            await asyncio.sleep(0.05)
        return web.Response(text="ok")

    async with tiny_server(serialized) as url:
        # 40/s for 1.5 s is twice the capacity: the backlog grows by 20 requests a second.
        open_loop = await run_bench(BenchConfig(url, rate=40, duration_s=1.5, timeout_s=20))
        # One connection: the backlog waits in the driver, and still counts from its slot.
        queued = await run_bench(
            BenchConfig(url, rate=40, duration_s=1.0, timeout_s=20, max_connections=1)
        )
        closed = await run_bench(BenchConfig(url, concurrency=1, duration_s=1.0))
    assert open_loop.responses == 60 and queued.responses == 40 and closed.responses >= 10
    assert closed.schedule_lag_s is None
    closed_p90 = closed.overall.latency_s["p90"]
    assert 0.045 <= closed_p90 <= 0.200
    assert open_loop.overall.latency_s["p90"] > 5 * closed_p90  # about 1.4 s against 50 ms
    assert queued.overall.latency_s["p90"] > 5 * closed_p90  # about 0.9 s
    assert open_loop.overall.throughput_rps < 30  # the server's pace, not the offered 40/s


@async_test
async def test_lag_behind_the_schedule_is_reported() -> None:
    blocked: list[bool] = []

    async def blocking_once(request: web.Request) -> web.Response:
        if not blocked:
            blocked.append(True)
            time.sleep(0.15)  # stalls the one event loop, the driver's included
        return web.Response(text="ok")

    async with tiny_server(blocking_once) as url:
        report = await run_bench(BenchConfig(url, rate=100, duration_s=0.5))
    assert report.schedule_lag_s is not None and report.schedule_lag_s["max"] >= 0.1
    assert any("behind its schedule" in w for w in report.warnings)
    assert report.overall.latency_s["max"] >= 0.15


@async_test
async def test_stop_ends_a_bench_early_with_a_report() -> None:
    async with mock_url(MockSettings(latency_ms=20)) as url:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.3, stop.set)
        report = await run_bench(BenchConfig(url, rate=50, duration_s=30), stop=stop)
    assert report.stopped_early and "(stopped early)" in format_report(report)
    assert 5 <= report.sent <= 40 and report.responses == report.sent


# --- what responses say ------------------------------------------------------------------


@async_test
async def test_variants_are_split_by_the_gateway_header() -> None:
    mocks = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}
    async with gateway_stack(ab_config(), mocks) as stack:
        config = BenchConfig(
            stack.url + "/predict", rate=400, requests=400, unit_header="x-user-id", units=1000
        )
        report = await run_bench(config)
        other = await run_bench(BenchConfig(stack.url + "/other", concurrency=2, requests=10))
    assert set(report.variants) == {"ranker=control", "ranker=candidate"}
    counts = {name: g.responses for name, g in report.variants.items()}
    assert sum(counts.values()) == report.overall.responses == 400
    assert 0.35 <= counts["ranker=control"] / 400 <= 0.65
    assert all(g.status_classes["2xx"] == g.responses for g in report.variants.values())
    assert set(other.variants) == {"-"} and other.responses == 10
    text = format_report(report)
    assert "ranker=candidate" in text and "p99.9 ms" in text and "\nall " in text


@async_test
async def test_faulted_responses_are_counted_per_rule() -> None:
    async def sometimes_faulted(request: web.Request) -> web.Response:
        seq = orjson.loads(await request.read())["seq"]
        if seq % 3 == 0:
            headers = {"x-modelgate-chaos": "slow,fail", "x-modelgate-variant": "exp=b"}
            return web.Response(status=503, headers=headers)
        return web.Response(text="ok", headers={"x-modelgate-variant": "exp=a"})

    async with tiny_server(sometimes_faulted) as url:
        config = BenchConfig(url, concurrency=3, requests=30, body='{"seq": {seq}}')
        report = await run_bench(config)
    faulted, clean = report.variants["exp=b"], report.variants["exp=a"]
    assert faulted.faulted == 10 and faulted.faults == {"fail": 10, "slow": 10}
    assert faulted.status_classes["5xx"] == 10 and clean.faulted == 0
    assert report.overall.faulted == 10 and report.overall.status_classes["2xx"] == 20
    as_json = orjson.loads(orjson.dumps(report.as_dict()))
    assert as_json["overall"]["faults"] == {"fail": 10, "slow": 10}
    assert as_json["variants"]["exp=b"]["status_classes"]["5xx"] == 10


@async_test
async def test_connection_errors_are_counted_by_kind() -> None:
    async with raw_upstream(hang_up) as closing:
        closed = await run_bench(
            BenchConfig(f"http://127.0.0.1:{closing}/", concurrency=2, requests=6)
        )

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        await asyncio.sleep(5)

    async with raw_upstream(silent) as port:
        slow = await run_bench(
            BenchConfig(f"http://127.0.0.1:{port}/", rate=20, requests=4, timeout_s=0.3)
        )
    async with raw_upstream(silent) as port:
        pass  # a port that was just closed: nothing listens there
    refused = await run_bench(BenchConfig(f"http://127.0.0.1:{port}/", concurrency=1, requests=3))
    assert closed.errors == {"closed": 6} and closed.responses == 0
    assert slow.errors == {"timeout": 4}
    assert refused.errors == {"refused": 3}
    assert "no response at all" in refused.warnings[-1]


# --- feedback ----------------------------------------------------------------------------


@async_test
async def test_feedback_posts_carry_the_variants_outcome() -> None:
    received: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.Response:
        received.append(orjson.loads(await request.read()))
        return web.Response(status=202)

    mocks = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}
    async with gateway_stack(ab_config(), mocks) as stack, tiny_server(record) as sink:
        spec = FeedbackSpec.parse("conversion:control=0,candidate=1")
        config = BenchConfig(
            stack.url + "/predict",
            concurrency=4,
            requests=100,
            unit_header="x-user-id",
            feedback=(spec,),
            feedback_kind="binary",
            feedback_url=sink + "/_modelgate/feedback",
        )
        report = await run_bench(config)
    assert report.feedback is not None
    assert report.feedback.posted == report.feedback.accepted == len(received) == 100
    for post in received:
        assert post["experiment"] == "ranker" and post["metric"] == "conversion"
        assert post["value"] == (1.0 if variant_of(post["unit"]) == "candidate" else 0.0)
    candidates = sum(1 for p in received if p["value"] == 1.0)
    assert candidates == report.variants["ranker=candidate"].responses


@async_test
async def test_feedback_reaches_the_gateways_own_endpoint_by_default() -> None:
    mocks = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}
    async with gateway_stack(ab_config(), mocks) as stack:
        config = BenchConfig(
            stack.url + "/predict",
            rate=200,
            requests=100,
            unit_header="x-user-id",
            feedback=(FeedbackSpec.parse("clicked:control=0.2,candidate=0.4"),),
            feedback_kind="binary",
        )
        report = await run_bench(config)
        store = stack.gateway.outcomes.outcomes
        counted = {v: store[("ranker", v, "clicked")].count for v in ("control", "candidate")}
    assert report.feedback is not None and report.feedback.accepted == 100
    assert counted == {v: report.variants[f"ranker={v}"].responses for v in counted}


@async_test
async def test_feedback_failures_are_counted_and_never_fatal() -> None:
    async with raw_upstream(hang_up) as dead:
        pass
    async with mock_url(MockSettings()) as url:
        config = BenchConfig(
            url,
            concurrency=2,
            requests=20,
            feedback=(FeedbackSpec.parse("score:-=0.5"), FeedbackSpec.parse("x:other=1")),
            feedback_url=f"http://127.0.0.1:{dead}/",
        )
        report = await run_bench(config)
    # The mock sends no variant header: every response is skipped, none posted.
    assert report.responses == 20 and report.feedback is not None
    assert report.feedback.skipped == 20 and report.feedback.posted == 0
    async with gateway_stack(ab_config(), {"model-a": MockSettings()}) as stack:
        spec = FeedbackSpec.parse("revenue:control=3.5,candidate=4")
        # GET without a unit header: the gateway picks a variant, but the unit is unknown.
        config = BenchConfig(
            stack.url + "/predict", method="GET", concurrency=2, requests=10, feedback=(spec,)
        )
        no_unit = await run_bench(config)
        config = BenchConfig(
            stack.url + "/predict",
            concurrency=2,
            requests=20,
            unit_header="x-user-id",
            feedback=(spec,),
            feedback_url=f"http://127.0.0.1:{dead}/",
        )
        refused = await run_bench(config)
    assert no_unit.feedback is not None and no_unit.feedback.skipped == 10
    assert refused.responses == 20 and refused.feedback is not None
    assert refused.feedback.failed == {"refused": 20} and refused.feedback.accepted == 0


# --- command line ------------------------------------------------------------------------


@async_test
async def test_cli_json_report_from_two_processes_parses() -> None:
    async with mock_url(MockSettings(latency_ms=5)) as url:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        }
        argv = [sys.executable, "-m", "modelgate", "bench", url, "--json"]
        argv += ["--concurrency", "4", "--requests", "41", "--processes", "2"]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 45)
    assert proc.returncode == 0, stderr.decode()
    report = orjson.loads(stdout)
    assert report["processes"] == 2 and report["mode"] == "closed"
    assert report["sent"] == report["responses"] == 41
    assert report["overall"]["status_classes"]["2xx"] == 41
    assert report["overall"]["latency_ms"]["p50"] >= 4.5
    assert set(report["variants"]) == {"-"} and report["errors"] == {}
    assert stderr == b""  # no progress line when stderr is not a terminal


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--rate", "0"], "--rate"),
        (["--rate", "5", "--concurrency", "2"], "--concurrency"),
        (["--duration", "1", "--requests", "2"], "--requests"),
        (["--concurrency", "x"], "--concurrency"),
        (["--feedback", "no-colon"], "--feedback"),
        (["--header", "bad header"], "--header"),
        (["--timeout", "-1"], "--timeout"),
        (["--feedback-kind", "poisson"], "--feedback-kind"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(
    args: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "http://127.0.0.1:1/", *args])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_checks_across_flags_exit_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["bench", "http://127.0.0.1:1/"]
    assert main([*base, "--feedback-kind", "binary", "--feedback", "m:a=2"]) == 2
    assert "--feedback m:a=2.0" in capsys.readouterr().err
    assert main([*base, "--concurrency", "2", "--processes", "3"]) == 2
    assert "--processes" in capsys.readouterr().err
    assert main([*base, "--body-file", "/nonexistent.jsonl"]) == 2
    assert "--body-file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "ftp://127.0.0.1/"])
    assert "http://" in capsys.readouterr().err
