"""Test helpers for canaries: steady traffic of fresh users with feedback per variant, and the
canary scenarios that the local and the Prometheus-sourced controllers must decide alike."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from modelgate.mock.server import MockSettings

from .support import ab_config, get_json, wait_until

TERMINAL = ("promoted", "rolled_back", "inconclusive", "paused")


@dataclass
class Traffic:
    """`concurrency` loops posting to /predict on the gateways in turn, each request from a new
    unit (or, with probability `vip_share`, one of `vips`); after each answer, feedback
    `converted` = 1 with the probability given for the variant it got."""

    gateways: list[str]
    concurrency: int = 12
    conversion: dict[str, float] = field(default_factory=dict)
    vips: list[str] = field(default_factory=list)
    vip_share: float = 0.0
    pause_s: float = 0.0  # between requests of one loop
    seed: int = 7
    variants: Counter[str] = field(default_factory=Counter)

    async def _loop(self, index: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(self.seed * 1000 + index)
        for n in itertools.count():
            base = self.gateways[n % len(self.gateways)]
            use_vip = self.vips and rng.random() < self.vip_share
            unit = rng.choice(self.vips) if use_vip else f"u{index}-{n}-{rng.random():.6f}"
            async with session.post(
                base + "/predict", json={"x": n}, headers={"x-user-id": unit}
            ) as response:
                await response.read()
                variant = response.headers.get("x-modelgate-variant", "").partition("=")[2]
                request_id = response.headers.get("x-request-id", "")
            self.variants[variant] += 1
            p = self.conversion.get(variant)
            if p is not None and variant:
                item = {"request_id": request_id, "metric": "converted", "value": rng.random() < p}
                async with session.post(base + "/_modelgate/feedback", json=item) as response:
                    assert response.status == 202, await response.text()
            if self.pause_s:
                await asyncio.sleep(self.pause_s)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Traffic]:
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(self._loop(i, session)) for i in range(self.concurrency)]
            try:
                yield self
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                        await task


def canary_config(
    checks: list[dict[str, Any]] | None = None,
    weights: tuple[float, float] = (100, 0),
    log_dir: str | None = None,
    **canary: Any,
) -> dict[str, Any]:
    """ab_config (control on model-a, candidate on model-b) with a fast canary, its records
    in a fresh directory (the canary reads them)."""
    config = ab_config(weights, log_dir=log_dir or tempfile.mkdtemp(prefix="modelgate-canary-"))
    spec: dict[str, Any] = {
        "baseline": "control",
        "candidate": "candidate",
        "steps": [20, 50, 100],
        "interval_s": 0.5,
        "min_samples": 40,
        "max_wait_s": 6.0,
        **canary,
    }
    if checks is not None:
        spec["checks"] = checks
    config["routes"][0]["experiment"]["canary"] = spec
    return config


@dataclass(frozen=True)
class Scenario:
    """A candidate, the canary judging it, and the decision expected of any source."""

    name: str
    candidate: MockSettings
    canary: dict[str, Any]
    conversion: dict[str, float]
    expected: str


CONVERTED = {"metric": "converted", "margin": 0.1}
SCENARIOS = [
    Scenario(
        "erroring-candidate",
        MockSettings(name="model-b", latency_ms=10, error_rate=0.3, seed=3),
        {},
        {},
        "rolled_back",
    ),
    Scenario(
        "worse-feedback",
        MockSettings(name="model-b", latency_ms=10),
        {"checks": [CONVERTED]},
        {"control": 0.6, "candidate": 0.2},
        "rolled_back",
    ),
    Scenario(
        "equal-candidate",
        MockSettings(name="model-b", latency_ms=10),
        {"checks": [{"metric": "error_rate", "max_increase": 0.05}, CONVERTED]},
        {"control": 0.5, "candidate": 0.5},
        "promoted",
    ),
]
BASELINE = MockSettings(name="model-a", latency_ms=10)


async def canary_of(session: aiohttp.ClientSession, admin: str, experiment: str) -> dict[str, Any]:
    status, body = await get_json(session, admin + "/canaries")
    assert status == 200, body
    found: dict[str, Any] = next(c for c in body["canaries"] if c["experiment"] == experiment)
    return found


async def wait_state(
    session: aiohttp.ClientSession,
    admin: str,
    experiment: str,
    states: tuple[str, ...] = TERMINAL,
    timeout: float = 20.0,
) -> dict[str, Any]:
    """Polls GET /canaries until the canary is in one of `states`; returns it."""

    async def reached() -> bool:
        return (await canary_of(session, admin, experiment))["state"] in states

    await wait_until(reached, f"canary {experiment} in {states}", timeout)
    return await canary_of(session, admin, experiment)
