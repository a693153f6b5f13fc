"""Live reloads through the admin API: under load nothing fails and every reload's split is
the formula's; a bad config changes nothing and is visible; in-flight requests finish on their
Plan; warm pools survive; removed upstreams drain; weights change without the file."""

from __future__ import annotations

import asyncio
import copy
import random
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from modelgate.mock.server import MockSettings

from .support import JSON_TYPE, AdminStack, ab_config, admin_stack, async_test
from .test_proxy_routing import expected_variant

MOCKS = {name: MockSettings(name=name) for name in ("model-a", "model-b", "model-c")}
UNITS = [f"unit-{i}" for i in range(12)]
NAMES = ["control", "candidate"]


def three_upstreams(weights: tuple[float, float] = (50, 50)) -> dict[str, Any]:
    config = ab_config(weights)
    config["upstreams"]["model-c"] = {"url": "http://127.0.0.1:1"}
    return config


def variant_config(step: int) -> tuple[dict[str, Any], list[float], str]:
    """The step-th config of the reload storm: new weights every step, the candidate's
    upstream alternating between model-b and model-c (the other one removed), and a shadow
    every third step. Returns the config, its weights and the candidate's upstream."""
    candidate = (step * 13) % 100  # consecutive steps never share weights
    weights = [100.0 - candidate, float(candidate)]
    config = ab_config((weights[0], weights[1]))
    upstream = "model-b" if step % 2 == 0 else "model-c"
    if upstream == "model-c":
        config["upstreams"]["model-c"] = config["upstreams"].pop("model-b")
        config["routes"][0]["experiment"]["variants"][1]["upstream"] = "model-c"
    if step % 3 == 0:
        config["routes"][0]["shadows"] = [{"upstream": "model-a", "sample": 0.5}]
    return config, weights, upstream


async def post_config(
    session: aiohttp.ClientSession, admin: AdminStack, config: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with session.post(admin.admin_url + "/reload", json=admin.complete(config)) as r:
        return r.status, await r.json()


async def check_split(
    session: aiohttp.ClientSession, url: str, weights: list[float], candidate_upstream: str
) -> None:
    """Each fixed unit lands exactly where the formula puts it under `weights`."""
    upstream_of = {"control": "model-a", "candidate": candidate_upstream}
    for unit in UNITS:
        variant = NAMES[expected_variant("ranker", unit, weights)]
        async with session.post(url, json={"x": 1}, headers={"x-user-id": unit}) as response:
            assert response.status == 200
            assert response.headers["x-modelgate-variant"] == f"ranker={variant}", weights
            assert (await response.json())["model"] == upstream_of[variant]


@async_test
async def test_fifty_reloads_under_load_fail_nothing() -> None:
    first, _, _ = variant_config(0)
    async with admin_stack(first, MOCKS) as admin:
        gateway = admin.stack.gateway
        warm_pool = gateway.registry.pools["model-a"]
        url = admin.stack.url + "/predict"
        failures: list[str] = []
        served = 0
        in_flight = 0
        done = asyncio.Event()

        async def load(session: aiohttp.ClientSession, seed: int) -> None:
            nonlocal served, in_flight
            rng = random.Random(seed)
            while not done.is_set():
                in_flight += 1
                try:
                    headers = {"x-user-id": f"load-{rng.randrange(10**6)}"}
                    async with session.post(url, json={"x": 1}, headers=headers) as response:
                        await response.read()
                        if response.status != 200:
                            failures.append(f"{response.status}: {await response.text()}")
                        served += 1
                except (aiohttp.ClientError, OSError) as exc:
                    failures.append(repr(exc))
                finally:
                    in_flight -= 1

        connector = aiohttp.TCPConnector(limit=16)
        async with aiohttp.ClientSession(connector=connector) as session:
            loaders = [asyncio.create_task(load(session, seed)) for seed in range(12)]
            overlapping: list[int] = []
            async with aiohttp.ClientSession() as control_session:
                await asyncio.sleep(0.2)
                for step in range(1, 51):
                    config, weights, upstream = variant_config(step)
                    overlapping.append(in_flight)
                    status, body = await post_config(control_session, admin, config)
                    assert status == 200, body
                    assert body["result"] == "applied"
                    assert body["version"] == step + 1
                    await check_split(control_session, url, weights, upstream)
                    await asyncio.sleep(0.05)
            done.set()
            await asyncio.gather(*loaders)
        assert failures == []
        # Load was in flight when each reload started, so each one met live traffic.
        assert all(n > 0 for n in overlapping), overlapping
        assert served > 50
        # model-a is in every config: one pool, its connections reused across all 50 reloads.
        assert gateway.registry.pools["model-a"] is warm_pool
        assert warm_pool.connects <= 2 * 16 + 2
        assert gateway.counters.export()[str(gateway.plan.version)].responses


@async_test
async def test_a_bad_config_changes_nothing_and_is_reported() -> None:
    async with admin_stack(three_upstreams((70, 30)), MOCKS) as admin:
        bad = three_upstreams((70, 30))
        bad["routes"][0]["experiment"]["variants"][1]["upstream"] = "model-x"
        bad["routes"][0]["experiment"]["variants"][0]["weight"] = -1
        bad["routes"][1]["wieght"] = 3
        bad["upstreams"]["model-c"]["timeout_ms"] = 0
        async with aiohttp.ClientSession() as session:
            status, body = await post_config(session, admin, bad)
            assert status == 422
            assert body["error"] == "invalid_config"
            # pydantic reports shape errors first; each names its key path.
            assert set(body["errors"]) == {
                "upstreams.model-c.timeout_ms: Input should be greater than or equal to 1",
                "routes[0].experiment.variants[0].weight: must be a finite number >= 0, got -1.0",
                "routes[1].wieght: unknown key",
            }
            assert "still serving version 1" in body["detail"]
            bad_refs = three_upstreams((10, 90))
            bad_refs["routes"][0]["experiment"]["variants"][1]["upstream"] = "model-x"
            bad_refs["routes"][1]["upstream"] = "model-y"
            status, body = await post_config(session, admin, bad_refs)
            assert status == 422
            assert body["errors"] == [
                "routes[0].experiment.variants[1].upstream: unknown upstream 'model-x'",
                "routes[1].upstream: unknown upstream 'model-y'",
            ]
            async with session.post(
                admin.admin_url + "/reload",
                data=b"routes: [\n  - {name: x",
                headers={"content-type": "application/yaml"},
            ) as response:
                assert response.status == 400
                unparseable = await response.json()
                assert unparseable["error"] == "unparseable_config"
                assert unparseable["errors"][0].startswith("(yaml) line ")
            # The old Plan still serves, split and all.
            assert admin.control.version == 1
            await check_split(session, admin.stack.url + "/predict", [70, 30], "model-b")
            async with session.get(admin.admin_url + "/status") as response:
                status_body = await response.json()
            error = status_body["last_reload_error"]
            assert error["kind"] == "unparseable"
            assert error["time"] and error["serving_version"] == 1
            assert status_body["version"] == 1
            assert status_body["reloads"] == {"ok": 0, "unchanged": 0, "failed": 3}
            kinds = [entry["result"] for entry in status_body["history"]]
            assert kinds == ["invalid", "invalid", "unparseable"]
            async with session.get(admin.admin_url + "/metrics") as response:
                metrics = await response.text()
            assert 'modelgate_config_reloads_total{config_version="1",result="invalid"} 2.0' in (
                metrics
            )
            assert 'modelgate_config_last_reload_successful{config_version="1"} 0.0' in metrics


@async_test
async def test_restart_only_settings_refuse_the_whole_reload() -> None:
    async with admin_stack(three_upstreams((70, 30)), MOCKS) as admin:
        changed = three_upstreams((10, 90))  # new weights too: they must not be applied
        changed["listen"] = "127.0.0.1:1"
        changed["workers"] = 4
        async with aiohttp.ClientSession() as session:
            status, body = await post_config(session, admin, changed)
            assert status == 422
            assert body["error"] == "restart_required"
            assert body["errors"] == [
                "listen: changing it needs a restart (running '127.0.0.1:0', new '127.0.0.1:1'); "
                "nothing was applied",
                "workers: changing it needs a restart (running 1, new 4); nothing was applied",
            ]
            await check_split(session, admin.stack.url + "/predict", [70, 30], "model-b")
        assert admin.control.version == 1


@async_test
async def test_in_flight_requests_finish_on_their_plan_and_removed_pools_drain() -> None:
    mocks = {**MOCKS, "model-b": MockSettings(name="model-b", latency_ms=600)}
    async with admin_stack(three_upstreams((0, 100)), mocks) as admin:
        gateway = admin.stack.gateway
        url = admin.stack.url + "/predict"
        async with aiohttp.ClientSession() as session:

            async def slow(unit: str) -> tuple[int, str, str]:
                async with session.post(url, json={}, headers={"x-user-id": unit}) as r:
                    return r.status, r.headers["x-modelgate-variant"], (await r.json())["model"]

            tasks = [asyncio.create_task(slow(u)) for u in UNITS[:6]]
            while len(gateway.inflight) < 6:
                await asyncio.sleep(0.01)
            old_pool = gateway.registry.pools["model-b"]
            # model-b goes away and every unit moves to control while six requests wait on it.
            moved = three_upstreams((100, 0))
            del moved["upstreams"]["model-b"]
            moved["routes"][0]["experiment"]["variants"][1]["upstream"] = "model-c"
            status, body = await post_config(session, admin, moved)
            assert status == 200, body
            assert body["safety"]["experiments"][0]["share_changed"] == 1.0
            assert old_pool.closing and "model-b" not in gateway.registry.pools
            await check_split(session, url, [100, 0], "model-c")
            results = await asyncio.gather(*tasks)
        assert results == [(200, "ranker=candidate", "model-b")] * 6
        for _ in range(100):  # the removed pool closes its connections as they come back
            if old_pool.size == 0:
                break
            await asyncio.sleep(0.01)
        assert old_pool.size == 0 and not old_pool.idle


@async_test
async def test_weights_endpoint_and_file_state(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    async with admin_stack(three_upstreams((90, 10)), MOCKS, config_path=path) as admin:
        path.write_text(yaml.safe_dump(admin.complete(three_upstreams((90, 10)))))
        weights_url = admin.admin_url + "/experiments/ranker/weights"
        async with aiohttp.ClientSession() as session:
            async with session.get(admin.admin_url + "/status") as response:
                assert (await response.json())["config_file"]["differs_from_running"] is False
            async with session.put(weights_url, json={"weights": {"candidate": 60}}) as response:
                body = await response.json()
                assert response.status == 200, body
                assert body["version"] == 2
                ranker = body["safety"]["experiments"][0]
                assert ranker["transitions"] == {"control->candidate": 3000}  # 10% -> 40%
            await check_split(session, admin.stack.url + "/predict", [90, 60], "model-b")
            async with session.put(weights_url, json={"weights": [25, 75]}) as response:
                assert response.status == 200
            await check_split(session, admin.stack.url + "/predict", [25, 75], "model-b")
            async with session.get(admin.admin_url + "/status") as response:
                status = await response.json()
            assert status["config_file"]["differs_from_running"] is True
            variants = status["routes"][0]["experiment"]["variants"]
            assert [(v["weight"], v["share"]) for v in variants] == [(25, 0.25), (75, 0.75)]
            refusals = [
                ({"weights": {"nope": 1}}, 422, "weights.nope: unknown variant 'nope'"),
                ({"weights": [1]}, 422, "weights: expected 2 weights, one per variant"),
                ({"weights": [0, 0]}, 422, "routes[0].experiment.variants: weights are all zero"),
                ({"weights": {"control": "x"}}, 422, "weights.control: expected a number"),
                ({"wrong": 1}, 422, '(body): expected {"weights"'),
            ]
            for document, code, message in refusals:
                async with session.put(weights_url, json=document) as response:
                    assert response.status == code
                    assert (await response.json())["errors"][0].startswith(message)
            async with session.put(
                admin.admin_url + "/experiments/other/weights", json={"weights": [1]}
            ) as response:
                assert response.status == 404
                assert (await response.json())["error"] == "unknown_experiment"
            # The file was never rewritten: reloading it goes back to 90/10.
            async with session.post(admin.admin_url + "/reload", headers=JSON_TYPE) as response:
                body = await response.json()
                assert response.status == 200 and body["version"] == 4
            await check_split(session, admin.stack.url + "/predict", [90, 10], "model-b")
            async with session.post(admin.admin_url + "/reload", headers=JSON_TYPE) as response:
                assert (await response.json())["result"] == "unchanged"
        assert admin.control.version == 4


@async_test
async def test_counts_and_metrics_carry_the_version() -> None:
    async with admin_stack(three_upstreams((50, 50)), MOCKS) as admin:
        url = admin.stack.url + "/predict"
        async with aiohttp.ClientSession() as session:
            await check_split(session, url, [50, 50], "model-b")
            changed = copy.deepcopy(three_upstreams((100, 0)))
            assert (await post_config(session, admin, changed))[0] == 200
            await check_split(session, url, [100, 0], "model-b")
            async with session.get(admin.admin_url + "/metrics") as response:
                assert response.status == 200
                text = await response.text()
        samples = [line for line in text.splitlines() if line and not line.startswith("#")]
        assert samples and all('config_version="' in line for line in samples)
        ones = sum(1 for u in UNITS if expected_variant("ranker", u, [50, 50]) == 1)
        v1_candidate = (
            f'modelgate_requests_total{{code="200",config_version="1",route="predict",'
            f'variant="candidate"}} {float(ones)}'
        )
        v2_control = (
            f'modelgate_requests_total{{code="200",config_version="2",route="predict",'
            f'variant="control"}} {float(len(UNITS))}'
        )
        assert v1_candidate in text and v2_control in text
        assert 'modelgate_config_info{config_version="2",digest="' in text
        assert 'modelgate_config_version{config_version="2"} 2.0' in text
