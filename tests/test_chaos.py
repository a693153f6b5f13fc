"""Chaos faults end to end: rates, scope, each fault's effect, caps and switches."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
import xxhash

from modelgate.chaos import sample_delay_ms
from modelgate.config import ConfigError, DelaySpec, validate_config
from modelgate.mock.server import MockSettings

from .support import (
    Stack,
    ab_config,
    async_test,
    gateway_stack,
    is_closed,
    read_response,
)

MOCKS = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}


def chaos_config(*rules: dict[str, Any], **settings: Any) -> dict[str, Any]:
    config = ab_config()
    config["routes"][0]["chaos"] = list(rules)
    if settings:
        config["chaos"] = settings
    return config


async def post(
    session: aiohttp.ClientSession, stack: Stack, unit: str, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(
        stack.url + "/predict", json={"u": unit}, headers={"x-user-id": unit, **headers}
    ) as response:
        return response.status, dict(response.headers), await response.read()


def variant_of(unit: str) -> str:
    bucket = xxhash.xxh64_intdigest(f"ranker:{unit}".encode()) % 10000
    return "control" if bucket < 5000 else "candidate"


@async_test
async def test_rate_matches_probability_and_scope_is_respected() -> None:
    rule = {
        "name": "fail-candidate",
        "variant": "candidate",
        "probability": 0.3,
        "seed": 7,
        "abort": {"status": 503},
    }
    async with gateway_stack(chaos_config(rule), MOCKS) as stack:
        connector = aiohttp.TCPConnector(limit=16)
        async with aiohttp.ClientSession(connector=connector) as session:
            units = [f"user-{i}" for i in range(3000)]
            results = await asyncio.gather(*(post(session, stack, u) for u in units))
            other_route = [await session.get(stack.url + "/other") for _ in range(50)]
    candidate = [
        (u, r) for u, r in zip(units, results, strict=True) if variant_of(u) == "candidate"
    ]
    control = [r for u, r in zip(units, results, strict=True) if variant_of(u) == "control"]
    faulted = [r for _, r in candidate if r[0] == 503]
    share = len(faulted) / len(candidate)
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(candidate))
    assert all(r[1].get("x-modelgate-chaos") == "fail-candidate" for r in faulted)
    assert all(orjson.loads(r[2])["error"] == "chaos_abort" for r in faulted)
    assert all(r[0] == 200 and "x-modelgate-chaos" not in r[1] for r in control)
    assert all(r.status == 200 for r in other_route)
    counts = stack.gateway.chaos.states[("predict", "fail-candidate")].counts
    assert counts["abort"] == len(faulted)


@async_test
async def test_by_unit_faults_always_the_same_units() -> None:
    rule = {
        "name": "sticky",
        "probability": 0.2,
        "by": "unit",
        "abort": {"status": 500, "body": '{"fault": true}'},
    }
    async with gateway_stack(chaos_config(rule), MOCKS) as stack:
        async with aiohttp.ClientSession() as session:
            units = [f"u{i}" for i in range(400)]
            first = [(await post(session, stack, u))[0] for u in units]
            second = [(await post(session, stack, u))[0] for u in units]
            status, headers, body = await post(
                session, stack, next(u for u, s in zip(units, first, strict=True) if s == 500)
            )
    assert first == second
    expected = [
        500 if xxhash.xxh64_intdigest(f"chaos:predict:sticky:{u}".encode()) % 10000 < 2000 else 200
        for u in units
    ]
    assert first == expected
    assert orjson.loads(body) == {"fault": True}
    assert headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    ("spec", "mean", "sd"),
    [
        ({"distribution": "uniform", "low_ms": 50, "high_ms": 150}, 100, 100 / math.sqrt(12)),
        ({"distribution": "normal", "mean_ms": 100, "sd_ms": 20}, 100, 20),
        (
            {"distribution": "lognormal", "median_ms": 100, "sigma": 0.5},
            100 * math.exp(0.125),
            100 * math.sqrt((math.exp(0.25) - 1) * math.exp(0.25)),
        ),
        ({"distribution": "pareto", "scale_ms": 10, "alpha": 3}, 15, math.sqrt(75 / 4 * 10 / 10)),
    ],
)
def test_delay_distributions_match_their_parameters(
    spec: dict[str, Any], mean: float, sd: float
) -> None:
    rng = random.Random(1)
    delay = DelaySpec.model_validate(spec)
    samples = [sample_delay_ms(delay, rng) for _ in range(40_000)]
    assert abs(statistics.fmean(samples) - mean) < 4 * sd / math.sqrt(len(samples)) + 0.01 * mean
    if spec["distribution"] != "pareto":  # pareto's sample sd converges too slowly to test
        assert abs(statistics.stdev(samples) - sd) < 0.05 * sd


def test_delay_is_capped() -> None:
    delay = DelaySpec.model_validate(
        {"distribution": "normal", "mean_ms": 500, "sd_ms": 100, "max_ms": 300}
    )
    rng = random.Random(2)
    assert max(sample_delay_ms(delay, rng) for _ in range(1000)) == 300


@async_test
async def test_delay_fault_delays_only_its_scope() -> None:
    rule = {"name": "slow", "variant": "candidate", "delay_ms": 200}
    async with gateway_stack(chaos_config(rule), MOCKS) as stack:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:
            timings = {}
            for unit in ("u1", "u2", "u3", "u4", "u5", "u6"):
                start = loop.time()
                status, headers, _ = await post(session, stack, unit)
                timings[unit] = (loop.time() - start, headers.get("x-modelgate-chaos"))
                assert status == 200
    for unit, (elapsed, header) in timings.items():
        if variant_of(unit) == "candidate":
            assert header == "slow" and elapsed >= 0.19
        else:
            assert header is None


@async_test
async def test_reset_is_seen_as_a_reset() -> None:
    async with gateway_stack(chaos_config({"name": "rst", "reset": True}), MOCKS) as stack:
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
        writer.write(b"GET /predict HTTP/1.1\r\nHost: a\r\nx-user-id: u\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            await reader.read(100)
        writer.close()


@async_test
async def test_hang_ends_in_the_gateway_timeout() -> None:
    config = chaos_config({"name": "stuck", "hang": True})
    config["upstreams"]["model-a"] = {"url": "x", "timeout_ms": 200}
    config["upstreams"]["model-b"] = {"url": "x", "timeout_ms": 200}
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        status, headers, body = await post(session, stack, "u1")
        stats = stack.gateway.registry.pools
        assert all(pool.stats()["connects"] == 0 for pool in stats.values())  # never forwarded
    assert status == 504
    assert headers["x-modelgate-chaos"] == "stuck"


@async_test
async def test_truncated_body_is_cut_short() -> None:
    async with gateway_stack(chaos_config({"name": "cut", "truncate_bytes": 10}), MOCKS) as stack:
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
        writer.write(b"GET /predict HTTP/1.1\r\nHost: a\r\nx-user-id: u\r\n\r\n")
        with pytest.raises(asyncio.IncompleteReadError) as info:
            await read_response(reader)
        assert await is_closed(reader)
        writer.close()
    assert len(info.value.partial) == 10


@async_test
async def test_slow_body_is_paced() -> None:
    config = chaos_config({"name": "drip", "slow_body_bytes_per_s": 1000})
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        status, _, body = await post(session, stack, "u1")
        elapsed = loop.time() - start
    assert status == 200
    assert orjson.loads(body)["model"] in ("model-a", "model-b")  # intact, only slow
    assert elapsed >= len(body) / 1000 * 0.8


@async_test
async def test_model_faults_degrade_predictions() -> None:
    rules = [
        {"name": "bias", "model": {"bias": {"pointers": ["/score", "/probs"], "shift": 10}}},
    ]
    async with gateway_stack(ab_config(), MOCKS) as stack, aiohttp.ClientSession() as session:
        _, _, clean = await post(session, stack, "u1")
    async with gateway_stack(chaos_config(*rules), MOCKS) as stack, aiohttp.ClientSession() as s:
        _, headers, biased = await post(s, stack, "u1")
    clean_doc, biased_doc = orjson.loads(clean), orjson.loads(biased)
    assert biased_doc["score"] == pytest.approx(clean_doc["score"] + 10)
    assert biased_doc["probs"] == pytest.approx([p + 10 for p in clean_doc["probs"]])
    assert biased_doc["label"] == clean_doc["label"]
    assert headers["x-modelgate-chaos"] == "bias"

    flip = {
        "name": "flip",
        "model": {"flip": {"pointer": "/label", "labels": ["negative", "neutral", "positive"]}},
    }
    nulls = {"name": "nulls", "model": {"replace": {"pointers": ["/score"], "value": "null"}}}
    nans = {"name": "nans", "model": {"replace": {"pointers": ["/score"], "value": "nan"}}}
    stale = {"name": "stale", "model": {"stale": {"label": "old"}}}
    checks: list[tuple[dict[str, Any], Callable[[bytes], bool]]] = [
        (flip, lambda text: bool(orjson.loads(text)["label"] != clean_doc["label"])),
        (nulls, lambda text: orjson.loads(text)["score"] is None),
        (nans, lambda text: b'"score":NaN' in text),
        (stale, lambda text: bool(orjson.loads(text) == {"label": "old"})),
    ]
    for rule, check in checks:
        async with gateway_stack(chaos_config(rule), MOCKS) as stack:
            async with aiohttp.ClientSession() as session:
                status, headers, body = await post(session, stack, "u1")
        assert status == 200 and check(body), (rule["name"], body)
        assert int(headers["Content-Length"]) == len(body)


@async_test
async def test_max_active_caps_faults_in_flight() -> None:
    rule = {"name": "slow", "delay_ms": 300, "max_active": 2}
    async with gateway_stack(chaos_config(rule), MOCKS) as stack:
        connector = aiohttp.TCPConnector(limit=20)
        async with aiohttp.ClientSession(connector=connector) as session:
            results = await asyncio.gather(*(post(session, stack, f"u{i}") for i in range(10)))
        state = stack.gateway.chaos.states[("predict", "slow")]
    faulted = [r for r in results if r[1].get("x-modelgate-chaos") == "slow"]
    assert all(r[0] == 200 for r in results)
    assert len(faulted) == 2
    assert state.counts["skipped_max_active"] == 8
    assert state.active == 0  # released when the requests finished


@async_test
async def test_disable_takes_effect_on_the_next_request() -> None:
    config = chaos_config({"name": "down", "abort": {"status": 503}})
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        assert (await post(session, stack, "u1"))[0] == 503
        rule = stack.gateway.plan.routes[0].chaos[0]
        stack.gateway.chaos.set_enabled("predict", rule, False)
        assert (await post(session, stack, "u1"))[0] == 200
        stack.gateway.chaos.set_enabled("predict", rule, True)
        assert (await post(session, stack, "u1"))[0] == 503


@async_test
async def test_header_controlled_faults_only_when_enabled_and_capped() -> None:
    rule = {
        "name": "bench",
        "probability": 0,
        "header_control": True,
        "delay": {"ms": 0, "max_ms": 100},
        "abort": {"status": 500},
    }
    loop = asyncio.get_running_loop()
    async with gateway_stack(chaos_config(rule), MOCKS) as stack:
        async with aiohttp.ClientSession() as session:
            status, headers, _ = await post(
                session, stack, "u1", **{"x-modelgate-chaos": "abort=503"}
            )
    assert status == 200 and "x-modelgate-chaos" not in headers  # off by default
    async with gateway_stack(chaos_config(rule, request_header=True), MOCKS) as stack:
        async with aiohttp.ClientSession() as session:
            status, headers, _ = await post(
                session, stack, "u1", **{"x-modelgate-chaos": "abort=503"}
            )
            assert status == 503 and headers["x-modelgate-chaos"] == "bench"
            start = loop.time()
            status, _, _ = await post(session, stack, "u1", **{"x-modelgate-chaos": "delay=5000"})
            assert status == 200
            assert loop.time() - start < 2.0  # capped at max_ms (100), not 5 s


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"name": "x"}, "routes[0].chaos[0]: no fault"),
        ({"name": "x", "abort": {"status": 200}}, "routes[0].chaos[0].abort.status:"),
        ({"name": "x", "probability": 2, "reset": True}, "routes[0].chaos[0].probability:"),
        ({"name": "x", "reset": True, "hang": True}, "routes[0].chaos[0]: reset and hang"),
        ({"name": "x", "variant": "nope", "reset": True}, "routes[0].chaos[0].variant: unknown"),
        (
            {"name": "x", "delay": {"distribution": "normal", "mean_ms": 5}},
            "routes[0].chaos[0].delay: distribution normal needs sd_ms",
        ),
        ({"name": "x", "delay_ms": -1}, "routes[0].chaos[0].delay_ms:"),
    ],
)
def test_bad_rules_are_refused_with_their_key_path(rule: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(chaos_config(rule))
    assert any(error.startswith(expected) for error in info.value.errors), info.value.errors


@async_test
async def test_rules_scoped_to_a_shadow_upstream_fault_only_the_copies() -> None:
    from .test_shadow import CollectingSink, settle, shadow_config

    config = shadow_config()
    config["routes"][0]["chaos"] = [
        {"name": "shadow-down", "upstream": "model-c", "probability": 1.0, "abort": {"status": 500}}
    ]
    mocks = dict(MOCKS, **{"model-c": MockSettings(name="model-c")})
    async with gateway_stack(config, mocks) as stack, aiohttp.ClientSession() as session:
        sink = CollectingSink()
        stack.gateway.shadows.sink = sink
        for i in range(10):
            status, headers, _ = await post(session, stack, f"u{i}")
            assert status == 200 and "x-modelgate-chaos" not in headers  # primary untouched
        await settle(stack)
        counts = stack.gateway.chaos.states[("predict", "shadow-down")].counts
    assert [p.shadow_answer.status for p in sink.pairs] == [500] * 10
    assert counts["abort"] == 10
