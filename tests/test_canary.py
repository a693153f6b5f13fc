"""The canary controller end to end in one gateway (`source: local`): a worse candidate rolls
back, an equal one is promoted, too little traffic ends inconclusive, a skewed override list
halts it (SRM); operator actions, reloads and the metrics."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelgate.mock.server import MockSettings, start_mock

from .canary_traffic import (
    BASELINE,
    SCENARIOS,
    Scenario,
    Traffic,
    canary_config,
    canary_of,
    wait_state,
)
from .support import (
    ServeProcesses,
    admin_stack,
    async_test,
    free_port,
    gateway_stack,
    get_json,
    serve_ready,
    served_config,
    wait_until,
)

MOCKS = {"model-a": BASELINE, "model-b": MockSettings(name="model-b", latency_ms=10)}


def weights_of(status: dict[str, Any]) -> dict[str, float]:
    variants = status["routes"][0]["experiment"]["variants"]
    return {v["name"]: v["weight"] for v in variants}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_the_canary_decides_on_evidence(scenario: Scenario) -> None:
    @async_test
    async def run() -> None:
        mocks = {"model-a": BASELINE, "model-b": scenario.candidate}
        async with admin_stack(canary_config(**scenario.canary), mocks) as admin:
            traffic = Traffic([admin.stack.url], conversion=scenario.conversion)
            async with aiohttp.ClientSession() as session, traffic.running():
                canary = await wait_state(session, admin.admin_url, "ranker")
                _, status = await get_json(session, admin.admin_url + "/status")
        assert canary["state"] == scenario.expected, canary
        events = [h["event"] for h in canary["history"]]
        assert events[0] == "start" and events[-1] == scenario.expected
        final = canary["history"][-1]
        evidence = final["evidence"]
        assert evidence["samples"]["candidate"] >= 40
        assert evidence["srm"]["mismatch"] is False
        if scenario.expected == "promoted":
            assert events == ["start", "step", "promoted"]
            assert [h["weight"] for h in canary["history"]] == [20, 50, 100]
            assert weights_of(status) == {"control": 0, "candidate": 100}
            assert all(c["outcome"] == "pass" for c in evidence["checks"])
        else:
            assert weights_of(status) == {"control": 100, "candidate": 0}
            failing = [c for c in evidence["checks"] if c["outcome"] == "fail"]
            metric = "converted" if scenario.conversion else "error_rate"
            assert [c["metric"] for c in failing] == [metric]
            assert final["reason"].startswith(f"{metric} failed 1 time(s) in a row")
            assert failing[0]["candidate"] < failing[0]["baseline"] or metric == "error_rate"
        assert status["config_file"]["differs_from_running"] is None  # no file: started inline
        assert canary["weight"] == status["routes"][0]["experiment"]["variants"][1]["weight"]

    run()


@async_test
async def test_too_little_traffic_ends_inconclusive_and_is_never_promoted() -> None:
    config = canary_config(min_samples=1000, max_wait_s=1.0)
    async with admin_stack(config, MOCKS) as admin:
        traffic = Traffic([admin.stack.url], concurrency=1, pause_s=0.02)
        async with aiohttp.ClientSession() as session, traffic.running():
            canary = await wait_state(session, admin.admin_url, "ranker")
            _, status = await get_json(session, admin.admin_url + "/status")
    assert canary["state"] == "inconclusive", canary
    assert weights_of(status) == {"control": 80, "candidate": 20}  # held at step 1
    evidence = canary["history"][-1]["evidence"]
    assert evidence["decision"] == "waiting"
    assert 0 < evidence["samples"]["candidate"] < 1000
    assert "no decision after" in canary["history"][-1]["reason"]


@async_test
async def test_a_gateway_out_of_step_with_the_weights_halts_the_rollout() -> None:
    """A second gateway of the fleet that never got the canary's weights (it serves 40/60)
    writes records to the same directory: the enrolled units per variant no longer match
    the weights in force, and the sequential sample-ratio guard pauses the canary."""
    config = canary_config(max_wait_s=20.0)
    stale = dict(config, routes=copy.deepcopy(config["routes"]))
    del stale["routes"][0]["experiment"]["canary"]
    for variant, weight in zip(stale["routes"][0]["experiment"]["variants"], (40, 60), strict=True):
        variant["weight"] = weight
    async with admin_stack(config, MOCKS) as admin, gateway_stack(stale, MOCKS) as other:
        traffic = Traffic([admin.stack.url, other.url])
        async with aiohttp.ClientSession() as session, traffic.running():
            canary = await wait_state(session, admin.admin_url, "ranker")
            _, status = await get_json(session, admin.admin_url + "/status")
    assert canary["state"] == "paused", canary
    assert weights_of(status) == {"control": 80, "candidate": 20}  # halted where it was
    srm = canary["history"][-1]["evidence"]["srm"]
    assert srm["unit"] == "units" and srm["mismatch"] is True and srm["p_value"] < 0.001
    counts = srm["counts"]
    assert counts["candidate"] / (counts["control"] + counts["candidate"]) > 0.3
    assert canary["history"][-1]["reason"].startswith("sample ratio mismatch")


@async_test
async def test_overrides_and_heavy_users_do_not_trip_the_sample_ratio_guard() -> None:
    """300 QA ids forced onto the candidate send 40% of the requests: they are not enrolled
    (outside the analysis), so the rollout goes on; the guard counts units, not requests."""
    vips = [f"vip-{i}" for i in range(300)]
    config = canary_config(checks=[{"metric": "error_rate", "max_increase": 0.05}])
    config["routes"][0]["experiment"]["overrides"] = {u: "candidate" for u in vips}
    async with admin_stack(config, MOCKS) as admin:
        traffic = Traffic([admin.stack.url], vips=vips, vip_share=0.4)
        async with aiohttp.ClientSession() as session, traffic.running():
            canary = await wait_state(session, admin.admin_url, "ranker")
    assert canary["state"] == "promoted", canary
    for entry in canary["history"][1:]:
        assert entry["evidence"]["srm"]["mismatch"] is False


@async_test
async def test_a_check_must_fail_failure_limit_times_in_a_row() -> None:
    mocks = {"model-a": BASELINE, "model-b": SCENARIOS[0].candidate}  # 30% errors
    async with admin_stack(canary_config(failure_limit=2), mocks) as admin:
        traffic = Traffic([admin.stack.url])
        async with aiohttp.ClientSession() as session, traffic.running():
            canary = await wait_state(session, admin.admin_url, "ranker")
    assert canary["state"] == "rolled_back"
    assert [h["event"] for h in canary["history"]] == ["start", "check_failed", "rolled_back"]
    assert canary["history"][1]["evidence"]["failures"] == {"error_rate": 1}
    assert canary["history"][-1]["reason"].startswith("error_rate failed 2 time(s) in a row")


async def post(session: aiohttp.ClientSession, url: str, **body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body or {}) as response:
        return response.status, await response.json()


@async_test
async def test_operator_actions_and_weights_changed_outside_the_controller() -> None:
    config = canary_config(min_samples=10_000, max_wait_s=60)
    async with admin_stack(config, MOCKS) as admin, aiohttp.ClientSession() as session:
        url = admin.admin_url
        canary = await wait_state(session, url, "ranker", ("running",))
        assert canary["weight"] == 20

        status, body = await post(session, url + "/canaries/ranker/pause")
        assert (status, body["state"]) == (200, "paused")
        status, body = await post(session, url + "/canaries/ranker/pause")
        assert (status, body["error"]) == (409, "canary_state")
        assert "ranker is paused" in body["detail"]
        status, body = await post(session, url + "/canaries/ranker/resume")
        assert (status, body["state"]) == (200, "running")

        async with session.put(
            url + "/experiments/ranker/weights", json={"weights": {"candidate": 35}}
        ) as response:
            assert response.status == 200
        canary = await wait_state(session, url, "ranker", ("paused",))
        last = canary["history"][-1]
        assert last["reason"] == "the weights were changed outside the controller"
        assert last["evidence"]["found"] == {"control": 80, "candidate": 35}
        status, body = await post(session, url + "/canaries/ranker/resume")
        assert (status, body["state"]) == (200, "running")
        _, running = await get_json(session, url + "/status")
        assert weights_of(running) == {"control": 80, "candidate": 20}  # step 1 again

        status, body = await post(session, url + "/canaries/ranker/promote")
        assert (status, body["state"], body["weight"]) == (200, "promoted", 100)
        _, running = await get_json(session, url + "/status")
        assert weights_of(running) == {"control": 0, "candidate": 100}
        status, body = await post(session, url + "/canaries/ranker/resume")
        assert (status, body["error"]) == (409, "canary_state")
        assert body["detail"].startswith("canary ranker is promoted; only a paused")
        status, body = await post(session, url + "/canaries/ranker/rollback")
        assert (status, body["state"], body["weight"]) == (200, "rolled_back", 0)
        assert "rolled back by POST /canaries/ranker/rollback" in body["history"][-1]["reason"]

        status, body = await post(session, url + "/canaries/nope/promote")
        assert (status, body["error"]) == (404, "unknown_canary")
        assert "no canary for experiment 'nope' (canaries: ['ranker'])" == body["detail"]
        status, body = await post(session, url + "/canaries/ranker/explode")
        assert status == 404

        async with session.get(url + "/metrics") as response:
            text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    states = {
        s.labels["state"]: s.value
        for s in families["modelgate_canary_state"].samples
        if s.labels["experiment"] == "ranker"
    }
    assert states["rolled_back"] == 1 and sum(states.values()) == 1
    assert families["modelgate_canary_weight"].samples[0].value == 0


@async_test
async def test_reloads_restart_stop_or_hand_over_the_canary() -> None:
    config = canary_config(min_samples=10_000, max_wait_s=60)
    async with admin_stack(config, MOCKS) as admin, aiohttp.ClientSession() as session:
        url = admin.admin_url

        async def reload(new: dict[str, Any]) -> None:
            async with session.post(url + "/reload", json=admin.complete(new)) as response:
                assert response.status == 200, await response.text()

        await wait_state(session, url, "ranker", ("running",))
        changed = canary_config(min_samples=10_000, max_wait_s=60, steps=[10, 100])
        await reload(changed)

        async def restarted() -> bool:
            canary = await canary_of(session, url, "ranker")
            return bool(canary["steps"] == [10, 100] and canary["weight"] == 10)

        await wait_until(restarted, "the canary restarted with the new steps")
        canary = await canary_of(session, url, "ranker")
        assert [h["event"] for h in canary["history"]] == ["start", "start"]  # history kept

        status, body = await post(session, url + "/experiments/ranker/kill")
        assert status == 200 and body["killed"] is True

        async def held() -> bool:
            evaluation = (await canary_of(session, url, "ranker"))["last_evaluation"]
            return evaluation is not None and evaluation["decision"] == "held"

        await wait_until(held, "the canary holds while the experiment is killed")
        assert (await canary_of(session, url, "ranker"))["state"] == "running"

        external = canary_config(source="prometheus", prometheus_url="http://127.0.0.1:9")
        await reload(external)
        canary = await canary_of(session, url, "ranker")
        assert (canary["state"], canary["source"]) == ("external", "prometheus")
        status, body = await post(session, url + "/canaries/ranker/promote")
        assert (status, body["error"]) == (409, "external_canary")

        plain = canary_config()
        del plain["routes"][0]["experiment"]["canary"]
        plain["routes"][0]["experiment"]["variants"][1]["weight"] = 10
        await reload(plain)
        _, body = await get_json(session, url + "/canaries")
        assert body["canaries"] == []
        _, running = await get_json(session, url + "/status")
        assert weights_of(running) == {"control": 100, "candidate": 10}


def test_with_workers_the_parent_runs_the_canary_over_every_worker(tmp_path: Path) -> None:
    scenario = SCENARIOS[2]  # equal candidate, judged on feedback: promoted

    @async_test
    async def run() -> None:
        runners = [await start_mock(s) for s in (BASELINE, scenario.candidate)]
        try:
            upstreams = {"model-a": runners[0][1], "model-b": runners[1][1]}
            port, admin_port = free_port(), free_port()
            config = served_config(canary_config(**scenario.canary), upstreams, port, admin_port)
            with ServeProcesses(tmp_path) as processes:
                await serve_ready(processes, config, "--workers", "2")
                admin = f"http://127.0.0.1:{admin_port}"
                traffic = Traffic([f"http://127.0.0.1:{port}"], conversion=scenario.conversion)
                async with aiohttp.ClientSession() as session, traffic.running():
                    canary = await wait_state(session, admin, "ranker")
                    _, status = await get_json(session, admin + "/status")
        finally:
            for runner, _ in runners:
                await runner.cleanup()
        assert canary["state"] == "promoted", canary
        assert [w["version"] for w in status["workers"]] == [status["version"]] * 2
        assert weights_of(status) == {"control": 0, "candidate": 100}

    run()
