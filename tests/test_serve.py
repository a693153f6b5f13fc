"""`modelgate serve` as a user runs it: a real process, signals, start-up errors, workers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from modelgate.mock import MockSettings, start_mock

from .support import async_test, simple_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"gateway exited early: {proc.stderr.read() if proc.stderr else ''!r}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")


def write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: dict[str, Any], *extra: str) -> subprocess.Popen[bytes]:
        path = write_config(tmp_path, config)
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelgate", "serve", "--config", str(path), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_sigterm_drains_in_flight_requests(serve_process: Any) -> None:
    @async_test
    async def run() -> None:
        runner, upstream_port = await start_mock(MockSettings(name="slow", latency_ms=800))
        try:
            port = free_port()
            config = simple_config()
            config["upstreams"]["model-a"]["url"] = f"http://127.0.0.1:{upstream_port}"
            config["listen"] = f"127.0.0.1:{port}"
            config["admin"] = f"127.0.0.1:{free_port()}"
            proc = serve_process(config)
            await asyncio.to_thread(wait_listening, port, proc)
            async with aiohttp.ClientSession() as session:

                async def slow_request() -> tuple[int, str]:
                    async with session.post(f"http://127.0.0.1:{port}/p", json={"i": 1}) as r:
                        return r.status, (await r.json())["model"]

                tasks = [asyncio.create_task(slow_request()) for _ in range(8)]
                await asyncio.sleep(0.3)  # all eight are in flight upstream
                proc.send_signal(signal.SIGTERM)
                results = await asyncio.gather(*tasks)
            assert results == [(200, "slow")] * 8
            code = await asyncio.to_thread(proc.wait, 15)
            assert code == 0
        finally:
            await runner.cleanup()

    run()


def test_start_up_fails_fast_on_taken_port(serve_process: Any) -> None:
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


def test_start_up_fails_on_bad_config(serve_process: Any) -> None:
    config = simple_config()
    config["routes"][0]["upstream"] = "nope"
    proc = serve_process(config)
    assert proc.wait(timeout=15) == 1
    assert proc.stderr is not None
    assert "routes[0].upstream: unknown upstream 'nope'" in proc.stderr.read().decode()


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")
def test_workers_share_one_port(serve_process: Any) -> None:
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
