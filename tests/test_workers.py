"""`serve --workers 2`: a reload (admin API or SIGHUP) reaches every worker, /status shows each
worker's version and pid, /metrics sums the workers, SIGTERM drains them all."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelgate.mock import MockSettings, start_mock

from .support import (
    ServeProcesses,
    ab_config,
    async_test,
    free_port,
    get_json,
    serve_ready,
    served_config,
    wait_until,
    write_config,
)
from .test_proxy_routing import expected_variant

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="SO_REUSEPORT")

UNITS = [f"w{i}" for i in range(16)]


async def fresh_connection_post(url: str, unit: str) -> tuple[int, str, str]:
    # A new connection per request so the kernel spreads them over the workers.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(url, json={}, headers={"x-user-id": unit}) as response:
            prefix = response.headers["x-request-id"].rsplit("-", 1)[0]
            return response.status, response.headers["x-modelgate-variant"], prefix


async def workers_at(session: aiohttp.ClientSession, admin: str, version: int) -> bool:
    _, status = await get_json(session, admin + "/status")
    versions = [w.get("version") for w in status["workers"]]
    return bool(versions == [version, version] and status["version"] == version)


def test_reloads_reach_every_worker(tmp_path: Path) -> None:
    @async_test
    async def run() -> None:
        runner, upstream_port = await start_mock(MockSettings(name="m", latency_ms=300))
        try:
            port, admin_port = free_port(), free_port()
            ports = {"model-a": upstream_port, "model-b": upstream_port}
            config = served_config(ab_config((50, 50)), ports, port, admin_port)
            proc = await serve_ready(processes, config, "--workers", "2")
            admin, url = f"http://127.0.0.1:{admin_port}", f"http://127.0.0.1:{port}/predict"
            async with aiohttp.ClientSession() as session:
                _, status = await get_json(session, admin + "/status")
                pids = {w["pid"] for w in status["workers"]}
                assert len(pids) == 2 and proc.pid not in pids

                config["routes"][0]["experiment"]["variants"][1]["weight"] = 0
                async with session.post(admin + "/reload", json=config) as response:
                    body = await response.json()
                    assert response.status == 200, body
                    assert body["version"] == 2
                assert await workers_at(session, admin, 2)
                results = await asyncio.gather(*(fresh_connection_post(url, u) for u in UNITS))
                assert {r[1] for r in results} == {"ranker=control"}  # weight 0: nobody
                assert len({r[2] for r in results}) == 2  # both workers answered

                async with session.get(admin + "/metrics") as response:
                    text = await response.text()
                families = {f.name: f for f in text_string_to_metric_families(text)}
                served = [
                    s
                    for s in families["modelgate_requests"].samples
                    if s.name == "modelgate_requests_total"
                ]
                assert sum(s.value for s in served) == len(UNITS)  # summed over both workers
                assert {s.labels["config_version"] for s in served} == {"2"}
                assert families["modelgate_workers"].samples[0].value == 2

                weights = [20.0, 80.0]
                config["routes"][0]["experiment"]["variants"][0]["weight"] = weights[0]
                config["routes"][0]["experiment"]["variants"][1]["weight"] = weights[1]
                write_config(tmp_path, config)
                proc.send_signal(signal.SIGHUP)
                await wait_until(lambda: workers_at(session, admin, 3), "v3 in both workers")
                results = await asyncio.gather(*(fresh_connection_post(url, u) for u in UNITS))
                names = ["control", "candidate"]
                assert [r[1] for r in results] == [
                    f"ranker={names[expected_variant('ranker', u, weights)]}" for u in UNITS
                ]

                # SIGTERM with slow requests in flight on both workers: all complete.
                slow = [asyncio.create_task(fresh_connection_post(url, u)) for u in UNITS]

                async def all_upstream() -> bool:
                    _, status = await get_json(session, admin + "/status")
                    waiting = sum(w["upstream_requests_in_flight"] for w in status["workers"])
                    return bool(waiting == len(UNITS))

                await wait_until(all_upstream, "every slow request in flight upstream")
                proc.send_signal(signal.SIGTERM)
                finished = await asyncio.gather(*slow)
                assert [r[0] for r in finished] == [200] * len(UNITS)
            assert await asyncio.to_thread(proc.wait, 15) == 0
        finally:
            await runner.cleanup()

    with ServeProcesses(tmp_path) as processes:
        run()
