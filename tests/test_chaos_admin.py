"""Chaos runtime switches on the admin API: GET /chaos with live counters, POST
/chaos/{route}/{rule}/enable|disable taking effect on the next request, in one process and
in every worker of `--workers 2`; unknown rules are 404 JSON."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelgate.mock.server import MockSettings, start_mock

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
CANDIDATES = [u for u in (f"c{i}" for i in range(200)) if variant_of(u) == "candidate"][:12]


def abort_config(**extra: Any) -> dict[str, Any]:
    config = ab_config(**extra)
    config["routes"][0]["chaos"] = [
        {"name": "fail-candidate", "variant": "candidate", "abort": {"status": 503}}
    ]
    return config


SERVED_BY: set[str] = set()  # request-id prefixes: one per process that answered


async def statuses(url: str) -> list[int]:
    """One request per candidate unit, each on a fresh connection (spread over workers)."""

    async def one(unit: str) -> int:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(url, json={}, headers={"x-user-id": unit}) as response:
                SERVED_BY.add(response.headers["x-request-id"].rsplit("-", 1)[0])
                return response.status

    return list(await asyncio.gather(*(one(u) for u in CANDIDATES)))


async def switch(session: aiohttp.ClientSession, admin: str, action: str) -> dict[str, Any]:
    async with session.post(f"{admin}/chaos/predict/fail-candidate/{action}", json={}) as response:
        body: dict[str, Any] = await response.json()
        assert response.status == 200, body
        return body


@async_test
async def test_disable_and_enable_take_effect_on_the_next_request() -> None:
    async with admin_stack(abort_config(), MOCKS) as stack, aiohttp.ClientSession() as session:
        admin, url = stack.admin_url, stack.stack.url + "/predict"
        assert set(await statuses(url)) == {503}
        body = await switch(session, admin, "disable")
        assert body == {
            "route": "predict",
            "rule": "fail-candidate",
            "enabled": False,
            "version": 1,
        }
        assert set(await statuses(url)) == {200}
        status, listing = await get_json(session, admin + "/chaos")
        assert status == 200 and listing["workers"] == 1
        (rule,) = listing["rules"]
        assert (rule["route"], rule["rule"], rule["enabled"]) == (
            "predict",
            "fail-candidate",
            False,
        )
        assert rule["configured_enabled"] is True
        assert rule["counts"] == {"abort": len(CANDIDATES)} and rule["active"] == 0
        await switch(session, admin, "enable")
        assert set(await statuses(url)) == {503}

        for path, code in (
            ("/chaos/predict/nope/disable", "unknown_chaos_rule"),
            ("/chaos/nope/fail-candidate/enable", "unknown_chaos_rule"),
            ("/chaos/predict/fail-candidate/toggle", "not_found"),
        ):
            async with session.post(admin + path, json={}) as response:
                error = await response.json()
                assert response.status == 404, path
                assert error["error"] == code and set(error) == {"error", "detail", "request_id"}
        # A reload that keeps the rule keeps the switch.
        await switch(session, admin, "disable")
        config = stack.complete(abort_config())
        config["routes"][0]["chaos"][0]["probability"] = 0.99
        async with session.post(admin + "/reload", json=config) as response:
            assert response.status == 200
        assert 503 not in await statuses(url)


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")
def test_switches_reach_every_worker(tmp_path: Path) -> None:
    @async_test
    async def run() -> None:
        runner, upstream_port = await start_mock(MockSettings(name="m"))
        try:
            port, admin_port = free_port(), free_port()
            ports = {"model-a": upstream_port, "model-b": upstream_port}
            config = served_config(abort_config(), ports, port, admin_port)
            await serve_ready(processes, config, "--workers", "2")
            admin, url = f"http://127.0.0.1:{admin_port}", f"http://127.0.0.1:{port}/predict"
            async with aiohttp.ClientSession() as session:
                assert set(await statuses(url)) == {503}
                await switch(session, admin, "disable")
                SERVED_BY.clear()
                assert set(await statuses(url)) == {200}
                assert len(SERVED_BY) == 2  # both workers answered, neither faulted
                _, listing = await get_json(session, admin + "/chaos")
                assert listing["workers"] == 2
                (rule,) = listing["rules"]
                assert rule["enabled"] is False and rule["enabled_in"] == 0
                assert rule["counts"] == {"abort": len(CANDIDATES)}  # summed over workers
                await switch(session, admin, "enable")
                assert set(await statuses(url)) == {503}
                _, listing = await get_json(session, admin + "/chaos")
                assert listing["rules"][0]["enabled_in"] == 2
                async with session.get(admin + "/metrics") as response:
                    text = await response.text()
                faults = [
                    s
                    for f in text_string_to_metric_families(text)
                    for s in f.samples
                    if s.name == "modelgate_chaos_faults_total"
                ]
                assert [(s.labels["kind"], s.value) for s in faults] == [
                    ("abort", 2 * len(CANDIDATES))  # two faulted rounds, summed over workers
                ]
        finally:
            await runner.cleanup()

    with ServeProcesses(tmp_path) as processes:
        run()
