"""Targeting end to end: overrides, segments, coverage, kill, layers, several experiments."""

from __future__ import annotations

import copy
import math
from typing import Any

import aiohttp
import orjson
import pytest
import xxhash

from modelgate.config import ConfigError, validate_config
from modelgate.mock.server import MockSettings
from modelgate.targeting import parse_semver

from .support import Stack, ab_config, async_test, gateway_stack

MOCKS = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}


def bucket(salt: str, unit: str) -> int:
    return xxhash.xxh64_intdigest(f"{salt}:{unit}".encode()) % 10000


def plain_variant(unit: str, weights: tuple[float, float] = (50, 50)) -> str:
    boundary = math.floor(10000 * weights[0] / sum(weights) + 0.5)
    return "control" if bucket("ranker", unit) < boundary else "candidate"


def with_experiment(**extra: Any) -> dict[str, Any]:
    config = ab_config()
    config["routes"][0]["experiment"].update(extra)
    return config


async def variant(
    session: aiohttp.ClientSession, stack: Stack, unit: str, **headers: str
) -> str | None:
    async with session.post(
        stack.url + "/predict", json={}, headers={"x-user-id": unit, **headers}
    ) as response:
        assert response.status == 200
        return response.headers.get("x-modelgate-variant")


@async_test
async def test_overrides_pin_units() -> None:
    unit = next(u for u in (f"u{i}" for i in range(100)) if plain_variant(u) == "control")
    config = with_experiment(overrides={unit: "candidate", "qa-bob": "control"})
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        assert await variant(session, stack, unit) == "ranker=candidate"
        assert await variant(session, stack, "qa-bob") == "ranker=control"


@async_test
async def test_segments_use_their_own_weights_in_order() -> None:
    config = with_experiment(
        segments=[
            {
                "name": "beta-app",
                "when": [{"header": "x-app-version", "semver": ">=2.3.0"}],
                "weights": {"candidate": 1},
            },
            {
                "name": "staff",
                "when": [{"cookie": "team", "in": ["ml", "sre"]}],
                "weights": {"control": 1},
            },
            {
                "name": "fr",
                "when": [{"query": "country", "regex": "^(fr|be)$"}],
                "weights": {"candidate": 1},
            },
        ]
    )
    units = [f"u{i}" for i in range(40)]
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        for unit in units:
            assert await variant(session, stack, unit, **{"x-app-version": "2.10.1"}) == (
                "ranker=candidate"
            )
            old = await variant(session, stack, unit, **{"x-app-version": "2.2.9"})
            assert old == f"ranker={plain_variant(unit)}"
            assert await variant(session, stack, unit, cookie="team=sre") == "ranker=control"
            async with session.post(
                stack.url + "/predict?country=fr", json={}, headers={"x-user-id": unit}
            ) as response:
                assert response.headers["x-modelgate-variant"] == "ranker=candidate"


@async_test
async def test_coverage_enrols_a_share_and_raising_it_never_moves_enrolled_units() -> None:
    units = [f"user-{i}" for i in range(1500)]
    seen: dict[float, dict[str, str | None]] = {}
    for coverage in (0.2, 0.6):
        config = with_experiment(coverage=coverage, default="control")
        async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
            seen[coverage] = {u: await variant(session, stack, u) for u in units}
    enrolled = {
        c: {u for u in units if bucket("ranker:coverage", u) < c * 10000} for c in (0.2, 0.6)
    }
    assert enrolled[0.2] <= enrolled[0.6]
    share = len(enrolled[0.2]) / len(units)
    assert abs(share - 0.2) < 4 * math.sqrt(0.2 * 0.8 / len(units))
    for unit in units:
        for coverage in (0.2, 0.6):
            expected = plain_variant(unit) if unit in enrolled[coverage] else "control"
            assert seen[coverage][unit] == f"ranker={expected}"
    # Every unit enrolled at 20% keeps its variant at 60%.
    assert all(seen[0.2][u] == seen[0.6][u] for u in enrolled[0.2])


@async_test
async def test_killed_experiment_sends_everyone_to_the_default() -> None:
    config = with_experiment(killed=True, default="candidate")
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        assert {await variant(session, stack, f"u{i}") for i in range(30)} == {"ranker=candidate"}


def layered_config() -> dict[str, Any]:
    config = ab_config()
    route = config["routes"][0]
    route["upstream"] = "model-a"
    first = route.pop("experiment")
    second = copy.deepcopy(first)
    third = copy.deepcopy(first)
    first.update(layer="ranking", layer_share=0.5)
    second.update(name="reranker", layer="ranking", layer_share=0.5)
    third.update(name="prompt")  # not layered: independent of both
    for variant_spec in third["variants"]:
        variant_spec.pop("upstream")  # a flag experiment: the model reads the header
    route["experiments"] = [first, second, third]
    route["match"]["path_prefix"] = "/_echo"
    return config


@async_test
async def test_layers_exclusive_and_flags_forwarded() -> None:
    async with gateway_stack(layered_config(), MOCKS) as stack, aiohttp.ClientSession() as s:
        headers_seen = []
        for i in range(400):
            async with s.post(stack.url + "/_echo/x", json={}, headers={"x-user-id": f"u{i}"}) as r:
                assert r.status == 200
                upstream_saw = orjson.loads(await r.read())["headers"]["x-modelgate-variant"]
                assert upstream_saw == r.headers["x-modelgate-variant"]
                headers_seen.append(upstream_saw)
    for i, header in enumerate(headers_seen):
        experiments = {item.split("=")[0] for item in header.split(",")}
        in_layer = experiments & {"ranker", "reranker"}
        assert len(in_layer) == 1  # exactly one of the two layered experiments
        expected = "ranker" if bucket("ranking", f"u{i}") < 5000 else "reranker"
        assert in_layer == {expected}
        assert "prompt" in experiments  # the unlayered one applies to everyone


def test_semver_parsing() -> None:
    assert parse_semver("v2.10.1-beta+build") == (2, 10, 1)
    assert parse_semver("3") == (3, 0, 0)
    assert parse_semver("x") is None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"overrides": {"u1": "nope"}}, "routes[0].experiment.overrides.u1: unknown variant"),
        ({"default": "nope"}, "routes[0].experiment.default: unknown variant"),
        (
            {
                "segments": [
                    {
                        "name": "s",
                        "when": [{"header": "x", "semver": "~1"}],
                        "weights": {"control": 1},
                    }
                ]
            },
            "routes[0].experiment.segments[0].when[0]: semver must look like",
        ),
        (
            {
                "segments": [
                    {
                        "name": "s",
                        "when": [{"header": "x", "equals": "1", "prefix": "1"}],
                        "weights": {"control": 1},
                    }
                ]
            },
            "routes[0].experiment.segments[0].when[0]: give exactly one of equals",
        ),
        ({"coverage": 1.5}, "routes[0].experiment.coverage:"),
        ({"layer": "l"}, "routes[0].experiment: layer and layer_share go together"),
    ],
)
def test_bad_targeting_is_refused(change: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(with_experiment(**change))
    assert any(e.startswith(expected) for e in info.value.errors), info.value.errors


def test_layer_shares_must_fit() -> None:
    config = layered_config()
    config["routes"][0]["experiments"][1]["layer_share"] = 0.7
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert "layers.ranking: experiment shares add up to 1.2, more than 1" in info.value.errors
