"""Twenty A/A canaries at once through one real gateway (issue 13): identical arms on the same
model with 1% errors and lognormal latency, traffic from repeat visitors drawn Zipf-like (a
few users send most requests). Before the per-unit checks, 6-9 of 20 such canaries rolled
back on the p99 check and 1-3 paused on a request-counted SRM; now rollbacks stay within
the binomial bounds of alpha and no canary pauses."""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
from collections import Counter
from typing import Any

import aiohttp
from scipy import stats as sps  # type: ignore[import-untyped]

from modelgate.mock.server import MockSettings

from .canary_traffic import TERMINAL
from .support import admin_stack, async_test, get_json, wait_until

CANARIES = 20
ALPHA = 0.05
MODEL = MockSettings(
    name="model-a",
    latency_ms=4.0,
    latency_dist="lognormal",
    latency_std_ms=3.0,
    error_rate=0.01,
    seed=11,
)


def battery_config(log_dir: str) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {
            "name": f"aa{i}",
            "match": {"path_prefix": f"/aa{i}/"},
            "unit": ["header:x-user-id"],
            "experiment": {
                "name": f"aa{i}",
                "variants": [
                    {"name": "control", "upstream": "model-a", "weight": 100},
                    {"name": "candidate", "upstream": "model-a", "weight": 0},
                ],
                "canary": {
                    "baseline": "control",
                    "candidate": "candidate",
                    "steps": [20, 50, 100],
                    "interval_s": 1.0,
                    "min_samples": 30,
                    "max_wait_s": 20.0,
                    "alpha": ALPHA,
                    # p90, not p99: a canary here sees a few hundred requests a step, and an
                    # interval on a p99 needs more than 380 (it would only ever wait).
                    "checks": [
                        {"metric": "error_rate", "max_increase": 0.01},
                        {"metric": "latency_p90_ms", "max_ratio": 1.5},
                    ],
                },
            },
        }
        for i in range(CANARIES)
    ]
    routes.append({"name": "default", "match": {"path_prefix": "/"}, "upstream": "model-a"})
    return {
        "log_dir": log_dir,
        "upstreams": {"model-a": {"url": "http://127.0.0.1:1"}},
        "routes": routes,
    }


async def visitors(base: str, stop: asyncio.Event, seed: int, sent: Counter[str]) -> None:
    """One client loop: each request from a user drawn Zipf-like out of 4000 (most users come
    once or twice, a few dozens of times), to one of the canaries' routes."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** 1.1 for k in range(4000)]
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            (user,) = rng.choices(range(4000), weights)
            route = rng.randrange(CANARIES)
            with contextlib.suppress(aiohttp.ClientError):
                async with session.post(
                    f"{base}/aa{route}/predict", json={"x": 1}, headers={"x-user-id": f"u{user}"}
                ) as response:
                    await response.read()
                    sent[str(response.status)] += 1


@async_test
async def test_twenty_aa_canaries_with_repeat_visitors_roll_back_at_most_at_alpha() -> None:
    config = battery_config(tempfile.mkdtemp(prefix="modelgate-battery-"))
    async with admin_stack(config, {"model-a": MODEL}) as admin:
        stop, sent = asyncio.Event(), Counter[str]()
        loops = [
            asyncio.create_task(visitors(admin.stack.url, stop, seed, sent)) for seed in range(16)
        ]
        try:
            async with aiohttp.ClientSession() as session:

                async def states() -> list[dict[str, Any]]:
                    status, body = await get_json(session, admin.admin_url + "/canaries")
                    assert status == 200, body
                    return list(body["canaries"])

                async def all_done() -> bool:
                    return all(c["state"] in TERMINAL for c in await states())

                await wait_until(all_done, "every canary decided", 90.0)
                canaries = await states()
        finally:
            stop.set()
            await asyncio.gather(*loops, return_exceptions=True)
    outcomes = Counter(c["state"] for c in canaries)
    assert len(canaries) == CANARIES
    assert sent["200"] > 2000 and sent["500"] > 0  # real traffic, with the 1% errors
    # More rollbacks than this happen with probability < 1e-4 when each canary's is ALPHA.
    ceiling = int(sps.binom.isf(1e-4, CANARIES, ALPHA))
    assert outcomes["rolled_back"] <= ceiling, outcomes
    assert outcomes["paused"] == 0, [c["history"][-1] for c in canaries if c["state"] == "paused"]
    judged = [c for c in canaries if c["last_evaluation"] and "checks" in c["last_evaluation"]]
    assert judged, "no canary ever judged its evidence"
    for canary in judged:
        evaluation = canary["last_evaluation"]
        assert canary["judged_on"] == "units"
        assert evaluation["srm"]["unit"] == "units"
    tested = [
        check
        for canary in judged
        for check in canary["last_evaluation"]["checks"]
        if "interval" in check  # tested (an interval astride its limit waits, tested too)
    ]
    assert tested, "no check ever had enough units to test"
    assert all(check["interval"] == "confidence-sequence" for check in tested)
    # Repeat visitors: the tests count units, fewer than the requests they sent.
    rates = [c for c in tested if c["metric"] == "error_rate"]
    assert rates and all(sum(c["units"]) < sum(c["requests"]) for c in rates)
    latency = [c for c in tested if c["metric"] == "latency_p90_ms"]
    assert latency and all(sum(c["units"]) < sum(c["requests"]) for c in latency)
    print("A/A battery:", dict(outcomes))
