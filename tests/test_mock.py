"""Tests of the fake model server (modelgate.mock.server) over real loopback sockets."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest

from modelgate.mock.server import (
    LABELS,
    LatencyDist,
    MockSettings,
    build_app,
    configure_parser,
    predict,
    run_from_args,
    sample_latency_ms,
    settings_from_args,
    start_mock,
)

T = TypeVar("T")
SRC = Path(__file__).resolve().parents[1] / "src"


def run_with_mock(
    settings: MockSettings, body: Callable[[aiohttp.ClientSession, str], Awaitable[T]]
) -> T:
    """Starts a mock on an ephemeral loopback port, runs `body(session, base_url)`, stops it."""

    async def main() -> T:
        runner, port = await start_mock(settings)
        try:
            timeout = aiohttp.ClientTimeout(total=10)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                return await body(session, f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()

    return asyncio.run(main())


# --- the prediction function -------------------------------------------------------------


def test_predict_is_deterministic_and_well_formed() -> None:
    first = predict("model-a", b'{"x": 1}')
    assert predict("model-a", b'{"x": 1}') == first
    assert first["model"] == "model-a"
    assert 0.0 <= first["score"] < 1.0
    assert first["label"] in LABELS
    assert first["label"] == LABELS[min(int(first["score"] * 3), 2)]
    assert len(first["probs"]) == 3
    assert math.fsum(first["probs"]) == pytest.approx(1.0, abs=1e-12)
    assert LABELS[first["probs"].index(max(first["probs"]))] == first["label"]
    assert sorted(first["ranking"]) == list(range(5))


def test_two_names_disagree_on_some_labels_but_not_all() -> None:
    rng = random.Random(7)
    inputs = [rng.randbytes(16) for _ in range(4000)]
    differ = sum(predict("v1", x)["label"] != predict("v2", x)["label"] for x in inputs)
    # drift 0.2 makes about 20% of labels differ; 4000 draws keep it well inside 10-30%.
    assert 0.10 < differ / len(inputs) < 0.30


def test_drift_zero_makes_every_name_agree() -> None:
    for i in range(200):
        data = f"input-{i}".encode()
        a, b = predict("v1", data, drift=0.0), predict("v2", data, drift=0.0)
        assert {**a, "model": None} == {**b, "model": None}


def test_labels_are_spread_over_all_classes() -> None:
    labels = {predict("m", str(i).encode())["label"] for i in range(300)}
    assert labels == set(LABELS)


# --- settings and options ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"latency_ms": -1.0}, "--latency-ms"),
        ({"latency_ms": math.nan}, "--latency-ms"),
        ({"error_rate": 1.5}, "--error-rate"),
        ({"error_rate": -0.1}, "--error-rate"),
        ({"latency_std_ms": -2.0, "latency_dist": "normal"}, "--latency-std-ms"),
        ({"latency_std_ms": 2.0}, "--latency-std-ms"),
        ({"chunks": 0}, "--chunks"),
        ({"chunk_delay_ms": -5.0}, "--chunk-delay-ms"),
        ({"error_status": 200}, "--error-status"),
        ({"drift": 2.0}, "--drift"),
        ({"name": ""}, "--name"),
    ],
)
def test_bad_settings_name_the_flag(kwargs: dict[str, Any], flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        MockSettings(**kwargs)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--latency-ms", "-3"], "--latency-ms"),
        (["--error-rate", "1.2"], "--error-rate"),
        (["--error-rate", "often"], "--error-rate"),
        (["--chunks", "0"], "--chunks"),
        (["--port", "70000"], "--port"),
    ],
)
def test_bad_options_are_rejected_by_the_parser(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="mock-model")
    configure_parser(parser)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_options_that_do_not_go_together_exit_2_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    ns = parser.parse_args(["--latency-std-ms", "3"])  # std needs a distribution that has one
    assert run_from_args(ns) == 2
    assert "--latency-std-ms" in capsys.readouterr().err


def test_options_become_settings() -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    argv = "--name m2 --latency-ms 5 --latency-dist lognormal --latency-std-ms 2"
    argv += " --error-rate 0.1 --seed 3 --stream sse --chunks 6 --chunk-delay-ms 1"
    ns = parser.parse_args(argv.split())
    assert ns.host == "127.0.0.1"
    settings = settings_from_args(ns)
    assert settings == MockSettings(
        name="m2",
        latency_ms=5.0,
        latency_dist="lognormal",
        latency_std_ms=2.0,
        error_rate=0.1,
        seed=3,
        stream="sse",
        chunks=6,
        chunk_delay_ms=1.0,
    )


@pytest.mark.parametrize("dist", ["uniform", "normal", "lognormal", "exponential"])
def test_latency_distributions_have_the_requested_mean(dist: LatencyDist) -> None:
    std = 0.0 if dist == "exponential" else 3.0
    settings = MockSettings(latency_ms=20.0, latency_dist=dist, latency_std_ms=std)
    rng = random.Random(11)
    draws = [sample_latency_ms(settings, rng) for _ in range(20000)]
    assert min(draws) >= 0.0
    expected_std = 20.0 if dist == "exponential" else 3.0
    mean = sum(draws) / len(draws)
    # 6 standard errors: a seeded draw, so this never flakes, yet a wrong formula fails.
    assert abs(mean - 20.0) < 6 * expected_std / math.sqrt(len(draws))
    sd = math.sqrt(sum((d - mean) ** 2 for d in draws) / (len(draws) - 1))
    assert sd == pytest.approx(expected_std, rel=0.05)


def test_fixed_latency_is_constant() -> None:
    settings = MockSettings(latency_ms=7.5)
    rng = random.Random(0)
    assert {sample_latency_ms(settings, rng) for _ in range(10)} == {7.5}


# --- over the network --------------------------------------------------------------------


def test_same_body_same_prediction_over_http() -> None:
    async def body(session: aiohttp.ClientSession, url: str) -> None:
        payloads = [b'{"user": 1}', b'{"user": 2}', b"x" * 5000]
        for payload in payloads:
            answers = []
            for _ in range(2):
                async with session.post(f"{url}/predict", data=payload) as resp:
                    assert resp.status == 200
                    assert resp.headers["x-mock-model"] == "model-a"
                    assert resp.content_type == "application/json"
                    answers.append(orjson.loads(await resp.read()))
            assert answers[0] == answers[1] == predict("model-a", payload)

    run_with_mock(MockSettings(name="model-a"), body)


def test_get_predicts_on_path_and_query_any_method_accepted() -> None:
    async def body(session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(f"{url}/v1/models/x:predict?user_id=42") as resp:
            assert resp.status == 200
            got = orjson.loads(await resp.read())
        assert got == predict("m", b"/v1/models/x:predict?user_id=42")
        for method in ("PUT", "PATCH", "DELETE", "OPTIONS"):
            async with session.request(method, f"{url}/anything", data=b"in") as resp:
                assert resp.status == 200
                assert orjson.loads(await resp.read()) == predict("m", b"in")

    run_with_mock(MockSettings(name="m"), body)


def test_two_servers_disagree_on_some_inputs() -> None:
    async def main() -> list[tuple[str, str]]:
        runner_a, port_a = await start_mock(MockSettings(name="v1"))
        runner_b, port_b = await start_mock(MockSettings(name="v2"))
        try:
            async with aiohttp.ClientSession() as session:
                labels = []
                for i in range(60):
                    data = f'{{"i": {i}}}'.encode()
                    pair = []
                    for port in (port_a, port_b):
                        async with session.post(f"http://127.0.0.1:{port}/p", data=data) as r:
                            pair.append(orjson.loads(await r.read())["label"])
                    labels.append((pair[0], pair[1]))
                return labels
        finally:
            await runner_a.cleanup()
            await runner_b.cleanup()

    labels = asyncio.run(main())
    assert any(a == b for a, b in labels)
    assert any(a != b for a, b in labels)


def test_error_rate_is_respected_and_seeded() -> None:
    n, rate = 400, 0.25

    async def body(session: aiohttp.ClientSession, url: str) -> list[int]:
        statuses = []
        for i in range(n):
            async with session.post(f"{url}/p", data=str(i).encode()) as resp:
                payload = orjson.loads(await resp.read())
                if resp.status == 503:
                    assert payload["error"] == "mock_error"
                    assert payload["model"] == "flaky"
                statuses.append(resp.status)
        async with session.get(f"{url}/_mock/stats") as resp:
            stats = orjson.loads(await resp.read())
        assert stats["requests"] == n
        assert stats["errors"] == statuses.count(503)
        return statuses

    settings = MockSettings(name="flaky", error_rate=rate, error_status=503, seed=42)
    first = run_with_mock(settings, body)
    errors = first.count(503)
    assert set(first) == {200, 503}
    sigma = math.sqrt(n * rate * (1 - rate))
    assert abs(errors - n * rate) < 5 * sigma
    # Same seed and the same sequential requests: the same outcomes, request by request.
    assert run_with_mock(settings, body) == first


def test_fixed_latency_delays_the_answer() -> None:
    async def body(session: aiohttp.ClientSession, url: str) -> float:
        start = time.perf_counter()
        async with session.get(f"{url}/p") as resp:
            await resp.read()
            assert resp.headers["x-mock-latency-ms"] == "60.000"
        return time.perf_counter() - start

    # A lower bound only: sleep never returns early, but a busy machine may be slow.
    assert run_with_mock(MockSettings(latency_ms=60.0), body) >= 0.055


async def _read_timed(resp: aiohttp.ClientResponse) -> list[tuple[float, bytes]]:
    arrivals = []
    async for data in resp.content.iter_any():
        arrivals.append((time.perf_counter(), data))
    return arrivals


def test_chunked_stream_arrives_incrementally() -> None:
    chunks, delay_ms = 4, 80.0

    async def body(session: aiohttp.ClientSession, url: str) -> list[tuple[float, bytes]]:
        async with session.post(f"{url}/p", data=b"stream me") as resp:
            assert resp.status == 200
            assert resp.headers["transfer-encoding"] == "chunked"
            assert resp.headers["x-mock-stream"] == "chunked"
            return await _read_timed(resp)

    settings = MockSettings(name="s", stream="chunked", chunks=chunks, chunk_delay_ms=delay_ms)
    arrivals = run_with_mock(settings, body)
    assert orjson.loads(b"".join(d for _, d in arrivals)) == predict("s", b"stream me")
    assert len(arrivals) >= 2
    # The first piece was read while the server was still sleeping before the last one:
    # the spread of arrival times is a relative measure, not a wall-clock deadline.
    spread = arrivals[-1][0] - arrivals[0][0]
    assert spread >= 0.5 * (chunks - 1) * delay_ms / 1000.0


def test_sse_stream_sends_events_with_pauses() -> None:
    events, delay_ms = 3, 60.0

    async def body(session: aiohttp.ClientSession, url: str) -> list[tuple[float, bytes]]:
        async with session.get(f"{url}/generate?prompt=hi") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/event-stream"
            return await _read_timed(resp)

    settings = MockSettings(name="llm", stream="sse", chunks=events, chunk_delay_ms=delay_ms)
    arrivals = run_with_mock(settings, body)
    raw = b"".join(d for _, d in arrivals)
    assert raw.endswith(b"\n\n")
    parsed = [orjson.loads(block.removeprefix(b"data: ")) for block in raw.split(b"\n\n")[:-1]]
    assert [e["index"] for e in parsed] == list(range(events + 1))
    assert all(e["model"] == "llm" for e in parsed)
    final = parsed[-1]
    assert final.pop("done") is True
    final.pop("index")
    assert final == predict("llm", b"/generate?prompt=hi")
    assert len(arrivals) >= 2
    assert arrivals[-1][0] - arrivals[0][0] >= 0.5 * events * delay_ms / 1000.0


def test_echo_reports_headers_and_body_hash() -> None:
    payload = os.urandom(100_000)

    async def body(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
        headers = {"x-user-id": "u-17", "x-request-id": "abc", "Content-Type": "image/png"}
        async with session.put(
            f"{url}/_echo/a%2Fb/c?q=1&r=x%20y", data=payload, headers=headers
        ) as resp:
            assert resp.status == 200
            assert resp.headers["x-mock-model"] == "echo"
            echoed: dict[str, Any] = orjson.loads(await resp.read())
        async with session.get(f"{url}/_mock/last-headers") as resp:
            assert orjson.loads(await resp.read()) == echoed
        return echoed

    echoed = run_with_mock(MockSettings(name="echo", error_rate=1.0, latency_ms=500.0), body)
    # error_rate=1 and a 500 ms latency above: the echo is never failed (and not delayed).
    assert echoed["method"] == "PUT"
    assert echoed["path"] == "/_echo/a%2Fb/c"
    assert echoed["query"] == "q=1&r=x%20y"
    assert echoed["headers"]["x-user-id"] == "u-17"
    assert echoed["headers"]["x-request-id"] == "abc"
    assert echoed["headers"]["content-type"] == "image/png"
    assert ["x-user-id", "u-17"] in echoed["raw_headers"]
    assert echoed["body_len"] == len(payload)
    assert echoed["body_sha256"] == hashlib.sha256(payload).hexdigest()


def test_echo_joins_repeated_headers_and_keeps_them_raw() -> None:
    async def main() -> dict[str, Any]:
        runner, port = await start_mock(MockSettings())
        try:
            # A raw request: HTTP clients merge repeated headers before sending them.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"GET /_echo HTTP/1.1\r\nHost: t\r\nX-Tag: one\r\nx-tag: two\r\n"
                b"Connection: close\r\n\r\n"
            )
            raw = await reader.read()
            writer.close()
            await writer.wait_closed()
        finally:
            await runner.cleanup()
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        result: dict[str, Any] = orjson.loads(payload)
        return result

    echoed = asyncio.run(main())
    assert echoed["headers"]["x-tag"] == "one, two"
    tags = [pair for pair in echoed["raw_headers"] if pair[0].lower() == "x-tag"]
    assert tags == [["X-Tag", "one"], ["x-tag", "two"]]
    assert echoed["body_len"] == 0


def test_stats_last_headers_and_reset() -> None:
    async def body(session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(f"{url}/_mock/last-headers") as resp:
            assert resp.status == 404
        for _ in range(3):
            async with session.post(f"{url}/p", data=b"1", headers={"x-k": "v"}) as resp:
                await resp.read()
        async with session.get(f"{url}/_mock/stats") as resp:
            stats = orjson.loads(await resp.read())
        assert stats["name"] == "counted"
        assert stats["requests"] == 3
        assert stats["by_method"] == {"POST": 3}
        assert stats["in_flight"] == 0
        async with session.get(f"{url}/_mock/last-headers") as resp:
            last = orjson.loads(await resp.read())
        assert last["headers"]["x-k"] == "v"
        assert last["body_len"] == 1
        async with session.post(f"{url}/_mock/reset") as resp:
            assert resp.status == 200
        async with session.get(f"{url}/_mock/stats") as resp:
            assert orjson.loads(await resp.read())["requests"] == 0
        async with session.get(f"{url}/_mock/nope") as resp:
            assert resp.status == 404

    run_with_mock(MockSettings(name="counted"), body)


def test_build_app_returns_a_fresh_application() -> None:
    first, second = build_app(MockSettings()), build_app(MockSettings())
    assert first is not second
    assert not first.frozen


def test_command_line_serves_until_sigterm() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    code = "import sys; from modelgate.mock.server import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0", "--name", "cli-model"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "listening on http://127.0.0.1:" in line, line
        url = line.split()[-1]

        async def fetch() -> dict[str, Any]:
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{url}/p", data=b"q") as resp:
                    result: dict[str, Any] = orjson.loads(await resp.read())
                    return result

        assert asyncio.run(fetch()) == predict("cli-model", b"q")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
