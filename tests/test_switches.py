"""Blue/green switch and kill switch through the admin API, checked by end-to-end requests:
the switch swaps a 100/0 pair at once and back; kill sends everyone to the default variant
and unkill puts the same units back in the same variants. The file is not rewritten."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from modelgate.mock.server import MockSettings

from .support import AdminStack, ab_config, admin_stack, async_test, get_json, write_config

MOCKS = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}
UNITS = [f"user-{i}" for i in range(60)]


async def served(session: aiohttp.ClientSession, admin: AdminStack) -> dict[str, tuple[str, str]]:
    """Each unit's (variant header, model that answered)."""
    out = {}
    for unit in UNITS:
        async with session.post(
            admin.stack.url + "/predict", json={}, headers={"x-user-id": unit}
        ) as response:
            assert response.status == 200
            model = (await response.json())["model"]
            out[unit] = (response.headers["x-modelgate-variant"], model)
    return out


async def post(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with session.post(url, json={}) as response:
        return response.status, await response.json()


@async_test
async def test_switch_swaps_blue_and_green_at_once_and_back(tmp_path: Path) -> None:
    config = ab_config((100, 0))
    path = tmp_path / "gateway.yaml"
    async with admin_stack(config, MOCKS, config_path=path) as admin:
        write_config(tmp_path, admin.complete(config))
        url = admin.admin_url + "/experiments/ranker/switch"
        async with aiohttp.ClientSession() as session:
            assert set((await served(session, admin)).values()) == {("ranker=control", "model-a")}
            status, body = await post(session, url)
            assert status == 200, body
            assert body["weights"] == {"control": 0, "candidate": 100}
            assert body["source"] == "POST /experiments/ranker/switch"
            assert set((await served(session, admin)).values()) == {("ranker=candidate", "model-b")}
            _, state = await get_json(session, admin.admin_url + "/status")
            assert state["config_file"]["differs_from_running"] is True
            assert state["history"][-1]["source"] == "POST /experiments/ranker/switch"

            status, body = await post(session, url)  # switch back
            assert status == 200 and body["weights"] == {"control": 100, "candidate": 0}
            assert set((await served(session, admin)).values()) == {("ranker=control", "model-a")}
            _, state = await get_json(session, admin.admin_url + "/status")
            assert state["config_file"]["differs_from_running"] is False  # as the file again


@async_test
async def test_switch_refuses_what_is_not_blue_green() -> None:
    async with admin_stack(ab_config((90, 10)), MOCKS) as admin:
        async with aiohttp.ClientSession() as session:
            status, body = await post(session, admin.admin_url + "/experiments/ranker/switch")
            assert (status, body["error"]) == (409, "not_blue_green")
            assert "a switch needs exactly two variants, one of them at weight 0" in body["detail"]
            assert "{'control': 90.0, 'candidate': 10.0}" in body["detail"]
            status, body = await post(session, admin.admin_url + "/experiments/nope/switch")
            assert (status, body["error"]) == (404, "unknown_experiment")
            status, body = await post(session, admin.admin_url + "/experiments/nope/kill")
            assert (status, body["error"]) == (404, "unknown_experiment")
            assert admin.control.version == 1


@async_test
async def test_kill_sends_everyone_to_the_default_and_unkill_restores_them() -> None:
    config = ab_config((50, 50))
    config["routes"][0]["experiment"]["default"] = "control"
    async with admin_stack(config, MOCKS) as admin:
        url = admin.admin_url + "/experiments/ranker"
        async with aiohttp.ClientSession() as session:
            before = await served(session, admin)
            assert {v for v, _ in before.values()} == {"ranker=control", "ranker=candidate"}

            status, body = await post(session, url + "/kill")
            assert status == 200 and body["killed"] is True and body["default"] == "control"
            assert set((await served(session, admin)).values()) == {("ranker=control", "model-a")}
            status, body = await post(session, url + "/kill")
            assert (status, body["result"]) == (200, "unchanged")

            status, body = await post(session, url + "/unkill")
            assert status == 200 and body["killed"] is False
            assert await served(session, admin) == before  # same units, same variants
