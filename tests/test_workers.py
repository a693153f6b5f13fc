"""`serve --workers 2`: a reload (admin API or SIGHUP) reaches every worker, /status shows each
worker's version and pid, /metrics sums the workers, SIGTERM drains them all."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from modelgate.mock.server import MockSettings, start_mock

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


async def admin_post_yaml(
    session: aiohttp.ClientSession, url: str, config: dict[str, Any]
) -> tuple[int, Any]:
    """A reload as an operator sends one: a YAML body with its content type, no Origin."""
    body = yaml.safe_dump(config).encode()
    headers = {"Content-Type": "application/yaml"}
    async with session.post(url, data=body, headers=headers) as response:
        return response.status, await response.json()


async def variants_by_worker(url: str) -> dict[str, set[str]]:
    """The variants each worker answers with (keyed by its request-id prefix), asking on
    fresh connections until both workers answered (bounded)."""
    seen: dict[str, set[str]] = {}
    for _ in range(8):
        results = await asyncio.gather(*(fresh_connection_post(url, u) for u in UNITS))
        for status, variant, prefix in results:
            assert status == 200
            seen.setdefault(prefix, set()).add(variant)
        if len(seen) == 2:
            break
    return seen


def test_a_stopped_worker_never_ends_on_a_refused_reload(tmp_path: Path) -> None:
    """Issue 12, finding 11: one worker SIGSTOPped during a reload. The reload is refused in
    bounded time; after SIGCONT that worker still serves the old config (it had prepared the
    new one, never committed it); the next reload reaches both."""

    @async_test
    async def run() -> None:
        runner, upstream_port = await start_mock(MockSettings(name="m"))
        try:
            port, admin_port = free_port(), free_port()
            ports = {"model-a": upstream_port, "model-b": upstream_port}
            config = served_config(ab_config((100, 0)), ports, port, admin_port)
            config["limits"] = {"worker_reply_timeout_ms": 500}
            proc = await serve_ready(processes, config, "--workers", "2")
            admin, url = f"http://127.0.0.1:{admin_port}", f"http://127.0.0.1:{port}/predict"
            candidate = copy.deepcopy(config)
            for variant, weight in zip(
                candidate["routes"][0]["experiment"]["variants"], (0, 100), strict=True
            ):
                variant["weight"] = weight
            async with aiohttp.ClientSession() as session:
                _, status = await get_json(session, admin + "/status")
                stopped = status["workers"][1]["pid"]
                os.kill(stopped, signal.SIGSTOP)
                try:
                    code, body = await admin_post_yaml(session, admin + "/reload", candidate)
                    assert code == 500 and body["error"] == "apply_failed", body
                    assert f"worker {stopped}" in str(body), body
                    _, status = await get_json(session, admin + "/status")
                    assert status["version"] == 1
                    by_pid = {w["pid"]: w for w in status["workers"]}
                    assert by_pid[stopped]["responding"] is False
                    running = next(w for pid, w in by_pid.items() if pid != stopped)
                    assert running["version"] == 1 and running["current"], running
                finally:
                    os.kill(stopped, signal.SIGCONT)

                async def both_answer_at(version: int) -> bool:
                    _, status = await get_json(session, admin + "/status")
                    return all(
                        w["responding"] and w["version"] == version and w["current"]
                        for w in status["workers"]
                    ) and bool(status["workers_current"])

                # The stopped worker reads prepare, then abort: it stays on version 1.
                await wait_until(lambda: both_answer_at(1), "both workers answering, on v1")
                seen = await variants_by_worker(url)
                assert seen == {prefix: {"ranker=control"} for prefix in seen}
                assert len(seen) == 2, seen

                code, body = await admin_post_yaml(session, admin + "/reload", candidate)
                assert code == 200 and body["version"] == 2, body
                assert await both_answer_at(2)
                seen = await variants_by_worker(url)
                assert seen == {prefix: {"ranker=candidate"} for prefix in seen}
                assert len(seen) == 2, seen

                async with session.get(admin + "/metrics") as response:
                    families = {
                        f.name: f for f in text_string_to_metric_families(await response.text())
                    }
                generations = families["modelgate_worker_config_generation"].samples
                assert sorted(s.value for s in generations) == [2, 2]
            proc.terminate()
            assert await asyncio.to_thread(proc.wait, 15) == 0
        finally:
            await runner.cleanup()

    with ServeProcesses(tmp_path) as processes:
        run()
