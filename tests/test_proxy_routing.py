"""End to end over loopback: routes, unit ids, sticky A/B assignment by the DESIGN.md formula."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import aiohttp
import xxhash

from modelgate.mock.server import MockSettings

from .support import ab_config, async_test, gateway_stack, raw_exchange

MOCKS = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}


def expected_variant(salt: str, unit: str, weights: list[float]) -> int:
    """DESIGN.md's formula, computed here without modelgate's code."""
    bucket = xxhash.xxh64_intdigest((salt + ":" + unit).encode("utf-8"), seed=0) % 10000
    total = sum(weights)
    running = 0.0
    for index, weight in enumerate(weights):
        running += weight
        if bucket < math.floor(10000 * running / total + 0.5):
            return index
    raise AssertionError("bucket beyond the last boundary")


async def variant_of(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[str, str]:
    async with session.post(url, json={"x": 1}, **kwargs) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
        return response.headers["x-modelgate-variant"], body["model"]


@async_test
async def test_split_and_stickiness_match_the_formula() -> None:
    weights = [70.0, 30.0]
    async with gateway_stack(ab_config((70, 30)), MOCKS) as stack:
        connector = aiohttp.TCPConnector(limit=32)
        async with aiohttp.ClientSession(connector=connector) as session:
            units = [f"user-{i}" for i in range(3000)]
            semaphore = asyncio.Semaphore(32)

            async def one(unit: str) -> tuple[str, str]:
                async with semaphore:
                    return await variant_of(
                        session, stack.url + "/predict", headers={"x-user-id": unit}
                    )

            first = await asyncio.gather(*(one(u) for u in units))
            again = await asyncio.gather(*(one(u) for u in units[:500]))
    names = ["control", "candidate"]
    upstream_of = {"control": "model-a", "candidate": "model-b"}
    for unit, (header, model) in zip(units, first, strict=True):
        variant = names[expected_variant("ranker", unit, weights)]
        assert header == f"ranker={variant}"
        assert model == upstream_of[variant]  # the assignment really chose the upstream
    assert again == first[:500]  # sticky
    share = sum(1 for h, _ in first if h.endswith("candidate")) / len(first)
    # Binomial tolerance: 4 standard deviations of a 30% share over 3000 units.
    assert abs(share - 0.30) < 4 * math.sqrt(0.3 * 0.7 / len(first))


@async_test
async def test_unit_from_cookie_query_and_json() -> None:
    config = ab_config()
    config["routes"][0]["unit"] = ["header:x-user-id", "cookie:uid", "query:user_id", "json:user"]
    weights = [50.0, 50.0]
    names = ["control", "candidate"]
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        for i in range(40):
            unit = f"u{i}"
            want = f"ranker={names[expected_variant('ranker', unit, weights)]}"
            by_cookie, _ = await variant_of(
                session, stack.url + "/predict", headers={"cookie": f"a=1; uid={unit}; b=2"}
            )
            by_query, _ = await variant_of(session, stack.url + f"/predict?z=1&user_id={unit}")
            async with session.post(stack.url + "/predict", json={"user": unit}) as response:
                by_json = response.headers["x-modelgate-variant"]
            assert by_cookie == by_query == by_json == want


@async_test
async def test_unit_fallbacks() -> None:
    config = ab_config()
    config["routes"][0]["unit_fallback"] = "reject"
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        async with session.post(stack.url + "/predict", json={}) as response:
            assert response.status == 400
            body = await response.json()
            assert body["error"] == "no_unit"
            assert body["request_id"] == response.headers["x-request-id"]
    config["routes"][0]["unit_fallback"] = "client_ip"
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        want = ["control", "candidate"][expected_variant("ranker", "127.0.0.1", [50, 50])]
        for _ in range(5):
            header, _ = await variant_of(session, stack.url + "/predict")
            assert header == f"ranker={want}"
    config["routes"][0]["unit_fallback"] = "random"
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        seen = {(await variant_of(session, stack.url + "/predict"))[0] for _ in range(60)}
        assert seen == {"ranker=control", "ranker=candidate"}
        assert stack.gateway.counters.unit_fallbacks == 60


@async_test
async def test_forced_variant_only_when_enabled() -> None:
    unit = next(
        u for u in (f"u{i}" for i in range(100)) if expected_variant("ranker", u, [50, 50]) == 0
    )
    headers = {"x-user-id": unit, "x-modelgate-force": "ranker=candidate"}
    async with gateway_stack(ab_config(), MOCKS) as stack, aiohttp.ClientSession() as session:
        assert (await variant_of(session, stack.url + "/predict", headers=headers))[0] == (
            "ranker=control"
        )
    config = ab_config(force={"enabled": True})
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        assert (await variant_of(session, stack.url + "/predict", headers=headers))[0] == (
            "ranker=candidate"
        )
        bogus = {"x-user-id": unit, "x-modelgate-force": "ranker=nope"}
        assert (await variant_of(session, stack.url + "/predict", headers=bogus))[0] == (
            "ranker=control"
        )


@async_test
async def test_route_matching_by_method_and_header_and_404() -> None:
    config: dict[str, Any] = {
        "upstreams": {"model-a": {"url": "x"}, "model-b": {"url": "x"}},
        "routes": [
            {
                "name": "beta",
                "match": {"path_prefix": "/v1", "methods": ["POST"], "headers": {"x-beta": "1"}},
                "upstream": "model-b",
            },
            {"name": "v1", "match": {"path_prefix": "/v1"}, "upstream": "model-a"},
        ],
    }
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        async with session.post(stack.url + "/v1/x", headers={"x-beta": "1"}) as response:
            assert response.headers["x-modelgate-route"] == "beta"
            assert (await response.json())["model"] == "model-b"
        async with session.get(stack.url + "/v1/x", headers={"x-beta": "1"}) as response:
            assert response.headers["x-modelgate-route"] == "v1"
        async with session.get(stack.url + "/other") as response:
            assert response.status == 404
            body = await response.json()
            assert body["error"] == "no_route"
            assert set(body) == {"error", "detail", "request_id"}


@async_test
async def test_host_header_and_absolute_url_cannot_choose_the_upstream() -> None:
    async with gateway_stack(ab_config(), MOCKS) as stack:
        forged = (
            b"GET http://169.254.169.254/_echo/latest HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
        )
        (response,) = await raw_exchange(stack.port, forged)
        assert response.status == 200
        assert response.header("x-mock-model") == "model-a"  # the Plan's upstream, not the URL's
        import orjson

        echo = orjson.loads(response.body)
        assert echo["path"] == "/_echo/latest"
        assert echo["headers"]["host"] == f"127.0.0.1:{stack.upstream_ports['model-a']}"
        assert echo["headers"]["x-forwarded-host"] == "169.254.169.254"
