"""`modelgate serve` as a user runs it: a real process, signals, start-up errors, workers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from modelgate.mock.server import MockSettings, start_mock

from .support import (
    ServeProcesses,
    ab_config,
    async_test,
    free_port,
    get_json,
    raw_upstream,
    read_request_head,
    served_config,
    simple_config,
    wait_listening,
    wait_until,
    write_config,
)
from .test_proxy_routing import expected_variant

Start = Callable[..., subprocess.Popen[bytes]]


def not_ready_probe(
    session: aiohttp.ClientSession, admin_port: int
) -> Callable[[], Awaitable[bool]]:
    async def not_ready() -> bool:
        status, _ = await get_json(session, f"http://127.0.0.1:{admin_port}/readyz")
        return status == 503

    return not_ready


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Start]:
    processes = ServeProcesses(tmp_path)
    yield processes.start
    processes.close()


def test_sigterm_drains_in_flight_requests(serve_process: Start) -> None:
    @async_test
    async def run() -> None:
        runner, upstream_port = await start_mock(MockSettings(name="slow", latency_ms=800))
        try:
            port, admin_port = free_port(), free_port()
            config = served_config(simple_config(), {"model-a": upstream_port}, port, admin_port)
            proc = serve_process(config)
            await asyncio.to_thread(wait_listening, port, proc)
            async with aiohttp.ClientSession() as session:

                async def slow_request() -> tuple[int, str]:
                    async with session.post(f"http://127.0.0.1:{port}/p", json={"i": 1}) as r:
                        return r.status, (await r.json())["model"]

                tasks = [asyncio.create_task(slow_request()) for _ in range(8)]
                await asyncio.sleep(0.3)  # all eight are in flight upstream
                proc.send_signal(signal.SIGTERM)

                # While it drains, the admin API still answers, and says it is not ready.
                await wait_until(not_ready_probe(session, admin_port), "/readyz 503 (draining)")
                results = await asyncio.gather(*tasks)
            assert results == [(200, "slow")] * 8
            code = await asyncio.to_thread(proc.wait, 15)
            assert code == 0
        finally:
            await runner.cleanup()

    run()


def test_start_up_fails_fast_on_taken_port(serve_process: Start) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = simple_config()
        config["listen"] = f"127.0.0.1:{port}"
        proc = serve_process(config)
        code = proc.wait(timeout=15)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in stderr


def test_start_up_fails_on_bad_config(serve_process: Start) -> None:
    config = simple_config()
    config["routes"][0]["upstream"] = "nope"
    proc = serve_process(config)
    assert proc.wait(timeout=15) == 1
    assert proc.stderr is not None
    assert "routes[0].upstream: unknown upstream 'nope'" in proc.stderr.read().decode()


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")
def test_workers_share_one_port(serve_process: Start) -> None:
    @async_test
    async def run() -> None:
        runner, upstream_port = await start_mock(MockSettings(name="m"))
        try:
            port = free_port()
            config = simple_config()
            config["upstreams"]["model-a"]["url"] = f"http://127.0.0.1:{upstream_port}"
            config["listen"] = f"127.0.0.1:{port}"
            config["admin"] = f"127.0.0.1:{free_port()}"
            proc = serve_process(config, "--workers", "2")
            await asyncio.to_thread(wait_listening, port, proc)
            await asyncio.sleep(0.5)  # let the second worker bind too
            request_ids: set[str] = set()
            for _ in range(60):
                # A new connection each time so the kernel spreads them over the workers.
                connector = aiohttp.TCPConnector(force_close=True)
                async with aiohttp.ClientSession(connector=connector) as session:
                    async with session.get(f"http://127.0.0.1:{port}/x") as response:
                        assert response.status == 200
                        request_ids.add(response.headers["x-request-id"].rsplit("-", 1)[0])
            # Each worker has its own request-id prefix: two prefixes means two workers served.
            assert len(request_ids) == 2
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 15) == 0
        finally:
            await runner.cleanup()

    run()


def test_python_m_modelgate_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "modelgate", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ},
    )
    assert out.stdout.startswith("modelgate ")


def stderr_of(proc: subprocess.Popen[bytes]) -> str:
    return proc.stderr.read().decode() if proc.stderr is not None else ""


def test_start_up_fails_fast_on_a_taken_admin_port(serve_process: Start) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        admin_port = taken.getsockname()[1]
        config = {**simple_config(), "listen": f"127.0.0.1:{free_port()}"}
        proc = serve_process({**config, "admin": f"127.0.0.1:{admin_port}"})
        assert proc.wait(timeout=15) == 1
    assert f"admin API: cannot listen on 127.0.0.1:{admin_port}" in stderr_of(proc)


def test_start_up_refuses_an_exposed_admin_api_without_a_token(serve_process: Start) -> None:
    config = {**simple_config(), "listen": f"127.0.0.1:{free_port()}", "admin": "0.0.0.0:0"}
    proc = serve_process(config)
    assert proc.wait(timeout=15) == 1
    assert "is not a loopback address, so the admin API needs a bearer token" in stderr_of(proc)


async def unit_variants(session: aiohttp.ClientSession, url: str) -> list[str]:
    out = []
    for i in range(12):
        async with session.post(url, json={}, headers={"x-user-id": f"u{i}"}) as response:
            assert response.status == 200
            out.append(response.headers["x-modelgate-variant"])
    return out


def formula_variants(weights: list[float]) -> list[str]:
    names = ["control", "candidate"]
    return [f"ranker={names[expected_variant('ranker', f'u{i}', weights)]}" for i in range(12)]


async def version_is(session: aiohttp.ClientSession, admin: str, version: int) -> bool:
    _, status = await get_json(session, admin + "/status")
    return bool(status["version"] == version)


def test_sighup_reloads_the_file_and_a_bad_file_keeps_serving(
    serve_process: Start, tmp_path: Path
) -> None:
    @async_test
    async def run() -> None:
        runners = [await start_mock(MockSettings(name=n)) for n in ("model-a", "model-b")]
        try:
            port, admin_port = free_port(), free_port()
            ports = {name: p for name, (_, p) in zip(("model-a", "model-b"), runners, strict=True)}
            config = served_config(ab_config((50, 50)), ports, port, admin_port)
            proc = serve_process(config)
            await asyncio.to_thread(wait_listening, port, proc)
            admin, url = f"http://127.0.0.1:{admin_port}", f"http://127.0.0.1:{port}/predict"
            async with aiohttp.ClientSession() as session:
                await wait_until(lambda: version_is(session, admin, 1), "the admin API up")
                assert await unit_variants(session, url) == formula_variants([50, 50])
                config["routes"][0]["experiment"]["variants"][1]["weight"] = 0
                write_config(tmp_path, config)
                proc.send_signal(signal.SIGHUP)
                await wait_until(lambda: version_is(session, admin, 2), "version 2 after SIGHUP")
                assert await unit_variants(session, url) == formula_variants([50, 0])

                config["routes"][0]["experiment"]["variants"][1]["upstream"] = "model-x"
                write_config(tmp_path, config)
                proc.send_signal(signal.SIGHUP)

                async def refused() -> bool:
                    _, status = await get_json(session, admin + "/status")
                    return status["last_reload_error"] is not None

                await wait_until(refused, "the refused reload in /status")
                _, status = await get_json(session, admin + "/status")
                assert status["version"] == 2
                assert status["last_reload_error"]["errors"] == [
                    "routes[0].experiment.variants[1].upstream: unknown upstream 'model-x'"
                ]
                assert status["last_reload_error"]["source"] == "SIGHUP"
                assert status["config_file"]["error"] is not None
                assert await unit_variants(session, url) == formula_variants([50, 0])
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 15) == 0
            log = stderr_of(proc)
            # Every log line carries the version serving when it was written.
            assert " v1 serving on " in log
            assert " v2 reloaded from SIGHUP: version 1 -> 2" in log
            assert " v2 reload from SIGHUP refused (invalid), still serving version 2" in log
            assert "  routes[0].experiment.variants[1].upstream: unknown upstream 'model-x'" in log
        finally:
            for runner, _ in runners:
                await runner.cleanup()

    run()


def test_watch_reloads_when_the_file_is_replaced(serve_process: Start, tmp_path: Path) -> None:
    @async_test
    async def run() -> None:
        runner, upstream_port = await start_mock(MockSettings(name="model-a"))
        try:
            port, admin_port = free_port(), free_port()
            ports = {"model-a": upstream_port, "model-b": upstream_port}
            config = served_config(ab_config((50, 50)), ports, port, admin_port)
            proc = serve_process(config, "--watch")
            await asyncio.to_thread(wait_listening, port, proc)
            admin = f"http://127.0.0.1:{admin_port}"
            async with aiohttp.ClientSession() as session:
                await wait_until(lambda: version_is(session, admin, 1), "the admin API up")
                config["routes"][0]["experiment"]["variants"][0]["weight"] = 10
                write_config(tmp_path, config)  # an atomic rename, as deploy tools do
                await wait_until(lambda: version_is(session, admin, 2), "version 2 on rename")
                _, status = await get_json(session, admin + "/status")
                assert status["last_reload"]["source"].startswith("--watch ")
                assert status["config_file"]["differs_from_running"] is False
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 15) == 0
        finally:
            await runner.cleanup()

    run()


def test_a_second_stop_signal_exits_at_once(serve_process: Start) -> None:
    async def never_answers(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        await reader.read()  # until the gateway goes away

    @async_test
    async def run() -> None:
        async with raw_upstream(never_answers) as upstream_port:
            port, admin_port = free_port(), free_port()
            config = served_config(simple_config(), {"model-a": upstream_port}, port, admin_port)
            proc = serve_process(config)
            await asyncio.to_thread(wait_listening, port, proc)
            async with aiohttp.ClientSession() as session:
                stuck = asyncio.create_task(session.get(f"http://127.0.0.1:{port}/p"))

                async def in_flight() -> bool:
                    _, status = await get_json(session, f"http://127.0.0.1:{admin_port}/status")
                    return bool(status["workers"][0]["upstream_requests_in_flight"] == 1)

                await wait_until(in_flight, "the stuck request upstream")
                proc.send_signal(signal.SIGTERM)  # would wait drain_timeout_ms (30 s) for it
                await wait_until(not_ready_probe(session, admin_port), "draining")
                proc.send_signal(signal.SIGINT)
                assert await asyncio.to_thread(proc.wait, 15) == 1
                with pytest.raises(aiohttp.ClientError):
                    await stuck
            assert "second stop signal: exiting at once" in stderr_of(proc)

    run()
