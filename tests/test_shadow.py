"""Shadow teeing end to end: copies go out, the primary never waits, everything is bounded."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import xxhash

from modelgate.difflog import DIFF_DTYPE, read_difflog
from modelgate.mock.server import MockSettings
from modelgate.shadow import ShadowPair

from .support import Stack, ab_config, async_test, gateway_stack


class CollectingSink:
    def __init__(self, capacity: int = 1_000_000) -> None:
        self.pairs: list[ShadowPair] = []
        self.capacity = capacity

    def submit(self, pair: ShadowPair) -> bool:
        if len(self.pairs) >= self.capacity:
            return False
        self.pairs.append(pair)
        return True


def shadow_config(**shadow: Any) -> dict[str, Any]:
    config = ab_config()
    config["upstreams"]["model-c"] = {"url": "x"}
    config["routes"][0]["shadows"] = [{"upstream": "model-c", **shadow}]
    return config


def attach(stack: Stack) -> CollectingSink:
    sink = CollectingSink()
    stack.gateway.shadows.sink = sink
    return sink


async def settle(stack: Stack, timeout: float = 5.0) -> None:
    """Waits until no shadow copy is in flight."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while stack.gateway.shadows.calls and loop.time() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.02)


MOCKS = {
    "model-a": MockSettings(name="model-a"),
    "model-b": MockSettings(name="model-b"),
    "model-c": MockSettings(name="model-c"),
}


@async_test
async def test_copies_are_sent_marked_and_paired() -> None:
    config = shadow_config()
    config["routes"][0]["match"]["path_prefix"] = "/_echo"
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        sink = attach(stack)
        for i in range(20):
            async with session.post(
                stack.url + "/_echo/p", data=b'{"x": %d}' % i, headers={"x-user-id": f"u{i}"}
            ) as response:
                assert response.status == 200
                primary = await response.json()
                assert "x-modelgate-shadow" not in primary["headers"]
        await settle(stack)
    assert len(sink.pairs) == 20
    for pair in sink.pairs:
        shadow_seen = orjson.loads(pair.shadow_answer.body)
        assert shadow_seen["headers"]["x-modelgate-shadow"] == "1"
        assert shadow_seen["headers"]["x-request-id"] == pair.request_id.decode()
        assert shadow_seen["body_sha256"] == orjson.loads(pair.primary.body)["body_sha256"]
        assert pair.route == "predict" and pair.shadow == "model-c"
        assert pair.primary.status == pair.shadow_answer.status == 200
        assert pair.variant in ("control", "candidate")


@async_test
async def test_sampling_by_unit_is_deterministic_and_close_to_the_rate() -> None:
    config = shadow_config(sample=0.3)
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        sink = attach(stack)
        units = [f"user-{i}" for i in range(600)]
        for unit in units:
            async with session.post(stack.url + "/predict", json={}, headers={"x-user-id": unit}):
                pass
        await settle(stack)
    teed = {pair.unit for pair in sink.pairs}
    expected = {
        u
        for u in units
        if xxhash.xxh64_intdigest(f"shadow:predict:model-c:{u}".encode()) % 10000 < 3000
    }
    assert teed == expected
    assert abs(len(teed) / len(units) - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(units))


@async_test
async def test_methods_filter_and_body_limit() -> None:
    config = shadow_config(methods=["POST"])
    config["limits"] = {"shadow_body_max_bytes": 400}
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        sink = attach(stack)
        headers = {"x-user-id": "u1"}
        async with session.get(stack.url + "/predict", headers=headers) as r:
            assert r.status == 200
        async with session.post(stack.url + "/predict", data=b"x" * 500, headers=headers) as r:
            assert r.status == 200  # the primary is served; only the copy is skipped
        async with session.post(stack.url + "/predict", data=b"{}", headers=headers) as r:
            assert r.status == 200
        await settle(stack)
        counters = stack.gateway.shadows.counters
    assert len(sink.pairs) == 1
    assert counters[("predict", "model-c", "dropped_body_too_large")] == 1
    assert counters[("predict", "model-c", "sent")] == 1


async def timed_requests(stack: Stack, count: int) -> list[float]:
    loop = asyncio.get_running_loop()
    latencies = []
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            start = loop.time()
            async with session.post(
                stack.url + "/predict", json={"i": i}, headers={"x-user-id": f"u{i}"}
            ) as response:
                assert response.status == 200
                await response.read()
            latencies.append(loop.time() - start)
    return latencies


@async_test
async def test_a_slow_or_dead_shadow_never_slows_the_primary() -> None:
    slow = dict(MOCKS, **{"model-c": MockSettings(name="slow", latency_ms=500)})
    async with gateway_stack(ab_config(), MOCKS) as stack:
        baseline = sorted(await timed_requests(stack, 30))
    async with gateway_stack(shadow_config(timeout_ms=2000), slow) as stack:
        sink = attach(stack)
        with_slow = sorted(await timed_requests(stack, 30))
        await settle(stack)
        assert len(sink.pairs) == 30
        assert all(p.shadow_answer.latency_s >= 0.45 for p in sink.pairs)
    # A dead shadow: its port is closed.
    dead = shadow_config()
    async with gateway_stack(
        dead, {k: v for k, v in MOCKS.items() if k != "model-c"}, extra_ports={"model-c": 1}
    ) as stack:
        sink = attach(stack)
        with_dead = sorted(await timed_requests(stack, 30))
        await settle(stack)
        assert all(p.shadow_answer.error == "connect_failed" for p in sink.pairs)
    # Generous bound: the median with a 500 ms shadow stays far below the shadow's latency.
    assert with_slow[15] < baseline[15] + 0.1
    assert with_dead[15] < baseline[15] + 0.1


@async_test
async def test_inflight_cap_drops_and_counts() -> None:
    slow = dict(MOCKS, **{"model-c": MockSettings(name="slow", latency_ms=400)})
    async with gateway_stack(shadow_config(max_inflight=2), slow) as stack:
        sink = attach(stack)
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> int:
                async with session.post(
                    stack.url + "/predict", json={}, headers={"x-user-id": f"u{i}"}
                ) as response:
                    return response.status

            statuses = await asyncio.gather(*(one(i) for i in range(10)))
        await settle(stack)
        counters = stack.gateway.shadows.counters
    assert statuses == [200] * 10
    assert counters[("predict", "model-c", "sent")] == 2
    assert counters[("predict", "model-c", "dropped_inflight_cap")] == 8
    assert len(sink.pairs) == 2


@async_test
async def test_shadow_timeout_is_recorded() -> None:
    slow = dict(MOCKS, **{"model-c": MockSettings(name="slow", latency_ms=1000)})
    async with gateway_stack(shadow_config(timeout_ms=100), slow) as stack:
        sink = attach(stack)
        async with aiohttp.ClientSession() as session:
            async with session.post(
                stack.url + "/predict", json={}, headers={"x-user-id": "u"}
            ) as response:
                assert response.status == 200
        await settle(stack)
    assert [p.shadow_answer.error for p in sink.pairs] == ["timeout"]


def test_pairs_land_in_the_diff_log(tmp_path: Path) -> None:
    @async_test
    async def run() -> None:
        config = shadow_config(compare={"fields": ["/label"]})
        config["log_dir"] = str(tmp_path)
        async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
            for i in range(50):
                async with session.post(
                    stack.url + "/predict", json={"i": i}, headers={"x-user-id": f"u{i}"}
                ) as response:
                    assert response.status == 200
            await settle(stack)
        # gateway_stack drained the gateway, which flushed and closed the writer.

    run()
    records, names = read_difflog(tmp_path)
    raw = np.concatenate(
        [np.fromfile(f, dtype=DIFF_DTYPE) for f in sorted(tmp_path.glob("difflog-*.bin"))]
    )
    assert len(records) == len(raw) == 50
    verdicts = {names.verdicts[v] for v in records["verdict"]}
    # model-c disagrees with model-a/model-b on some labels (the mock's drift), not all.
    assert verdicts <= {"equal", "differs"} and "equal" in verdicts
    assert set(records["primary_status"]) == {200}


def test_an_unwritable_log_dir_does_not_stop_the_gateway(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory", encoding="utf-8")

    @async_test
    async def run() -> None:
        config = shadow_config()
        config["log_dir"] = str(blocker / "logs")
        async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
            for i in range(20):
                async with session.post(
                    stack.url + "/predict", json={}, headers={"x-user-id": f"u{i}"}
                ) as response:
                    assert response.status == 200
            await settle(stack)
            writer = stack.gateway.shadows.writer
            assert writer is not None
            await asyncio.sleep(1.5)  # the writer's flush interval
            assert writer.stats()["write_errors"] >= 1

    run()


@async_test
async def test_a_pair_carries_the_experiment_that_assigned_its_variant() -> None:
    """Two experiments split one layer: a unit is in one of them. Its shadow pair is labelled
    with that experiment and its variant; it used to carry the route's first experiment's
    name beside the second's variant for every unit the first one's layer left out."""
    config = shadow_config()
    route = config["routes"][0]
    experiment = route.pop("experiment")
    route["upstream"] = "model-a"
    route["experiments"] = [
        {
            "name": "first",
            "layer": "l",
            "layer_share": 0.5,
            "variants": [{"name": "f-on", "weight": 1}, {"name": "f-off", "weight": 1}],
        },
        {
            "name": "second",
            "layer": "l",
            "layer_share": 0.5,
            "variants": [{"name": "s-on", "weight": 1}, {"name": "s-off", "weight": 1}],
        },
    ]
    assert experiment["name"] == "ranker"
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        sink = attach(stack)
        for i in range(40):
            async with session.post(
                stack.url + "/predict", data=b"{}", headers={"x-user-id": f"u{i}"}
            ) as response:
                assert response.status == 200
                assert response.headers["x-modelgate-variant"]
        await settle(stack)
    assert len(sink.pairs) == 40
    labels = {(p.experiment, p.variant) for p in sink.pairs}
    assert {e for e, _ in labels} == {"first", "second"}  # both experiments took units
    for experiment_name, variant in labels:
        assert variant.startswith(experiment_name[0] + "-"), (experiment_name, variant)
