"""A/B batteries through one real gateway (issue 13): 40 A/A experiments and 40 with a true
effect, side by side, each with repeat visitors (heavy-tailed requests per unit, each unit
with its own level) and an outcome posted for every answer by request id. Read back from
the records by the engine, over units: the A/A false positives and the SRM alarms stay
within binomial bounds of their levels, and the true effects are found about as often as
the sample-size calculator's power predicts."""

from __future__ import annotations

import asyncio
import random
import tempfile
from typing import Any

import aiohttp
import numpy as np
from scipy import stats as sps  # type: ignore[import-untyped]

from modelgate.analysis.engine import AnalysisEngine
from modelgate.analysis.unit_results import unit_results
from modelgate.mock.server import MockSettings
from modelgate.stats import power

from .support import async_test, gateway_stack

EXPERIMENTS = 80  # the first half A/A, the second half with an effect
UNITS = 120  # per experiment
EFFECT = 1.0  # added to every outcome of the candidate's units, in the second half
ALPHA = 0.05


def battery_config(log_dir: str) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {
            "name": f"x{i}",
            "match": {"path_prefix": f"/x{i}/"},
            "unit": ["header:x-user-id"],
            "experiment": {
                "name": f"x{i}",
                "variants": [
                    {"name": "control", "upstream": "model", "weight": 50},
                    {"name": "candidate", "upstream": "model", "weight": 50},
                ],
                "analysis": {"alpha": ALPHA, "metrics": {"outcome": {"kind": "mean"}}},
            },
        }
        for i in range(EXPERIMENTS)
    ]
    routes.append({"name": "default", "match": {"path_prefix": "/"}, "upstream": "model"})
    return {
        "log_dir": log_dir,
        "upstreams": {"model": {"url": "http://127.0.0.1:1"}},
        "routes": routes,
        "feedback": {"max_request_ids": 100_000},
    }


def visits(rng: random.Random) -> int:
    """Most units come 1-3 times, a few dozens (capped at 30)."""
    n = 1
    while rng.random() < 0.55 and n < 30:
        n = n * 2 if rng.random() < 0.3 else n + 1
    return n


async def unit_visits(
    session: aiohttp.ClientSession, url: str, experiment: int, unit: int, rng: random.Random
) -> list[dict[str, Any]]:
    """One unit's requests; its outcomes: its own level, plus the effect on the candidate."""
    level = rng.lognormvariate(0.0, 0.8)
    items = []
    for _ in range(visits(rng)):
        async with session.post(
            f"{url}/x{experiment}/predict", json={}, headers={"x-user-id": f"u{experiment}-{unit}"}
        ) as response:
            assert response.status == 200, await response.text()
            variant = response.headers["x-modelgate-variant"].partition("=")[2]
            rid = response.headers["x-request-id"]
        lift = EFFECT if experiment >= EXPERIMENTS // 2 and variant == "candidate" else 0.0
        value = level + lift + rng.gauss(0.0, 0.5)
        items.append({"request_id": rid, "metric": "outcome", "value": value})
    return items


@async_test
async def test_aa_and_true_effect_batteries_through_the_gateway() -> None:
    log_dir = tempfile.mkdtemp(prefix="modelgate-ab-battery-")
    rng = random.Random(2026)
    async with gateway_stack(battery_config(log_dir), {"model": MockSettings()}) as stack:
        connector = aiohttp.TCPConnector(limit=32)
        async with aiohttp.ClientSession(connector=connector) as session:
            jobs = [
                unit_visits(session, stack.url, e, u, random.Random(rng.random()))
                for e in range(EXPERIMENTS)
                for u in range(UNITS)
            ]
            items = [i for found in await asyncio.gather(*jobs) for i in found]
            for start in range(0, len(items), 1000):
                async with session.post(
                    stack.url + "/_modelgate/feedback", json=items[start : start + 1000]
                ) as response:
                    assert response.status == 202, await response.text()
    await asyncio.sleep(1.5)  # the record writers flush once a second
    engine = AnalysisEngine.from_logs(log_dir, threads=1)
    try:
        results = [
            unit_results(engine.designs[f"x{i}"], engine.query(f"x{i}")) for i in range(EXPERIMENTS)
        ]
    finally:
        engine.close()
    half = EXPERIMENTS // 2
    p_values = [r["comparisons"][0]["p_value"] for r in results]
    assert all(r["comparisons"][0]["method"] == "mean" for r in results)
    # Repeat visitors: each arm has fewer units than exposures.
    assert all(v["units"] < v["exposures"] for r in results for v in r["variants"])
    false_alarms = sum(p < ALPHA for p in p_values[:half])
    srm_alarms = sum(r["srm"]["mismatch"] for r in results)
    assert false_alarms <= sps.binom.isf(1e-3, half, ALPHA), false_alarms
    assert srm_alarms <= sps.binom.isf(1e-3, EXPERIMENTS, 1e-3), srm_alarms
    # The power the calculator predicts for each effect experiment: its units per arm, the
    # per-unit sd pooled over the A/A experiments' arms (as one plans from past data), and
    # the true difference of per-unit sums, EFFECT times the candidate's requests per unit.
    sds = [
        v["metrics"]["outcome"]["variance"] ** 0.5 for r in results[:half] for v in r["variants"]
    ]
    sd = float(np.sqrt(np.mean(np.square(sds))))
    predicted, found = [], 0
    for r in results[half:]:
        arms = {v["name"]: v for v in r["variants"]}
        cand = arms["candidate"]
        delta = EFFECT * cand["exposures"] / max(cand["units"], 1)
        n = (arms["control"]["units"] + cand["units"]) / 2
        predicted.append(power(n, delta, sd, ALPHA))
        comparison = r["comparisons"][0]
        found += comparison["p_value"] < ALPHA and comparison["diff"] > 0
    expected = float(np.mean(predicted))
    assert 0.3 < expected < 0.95, expected  # a battery that can tell
    low = sps.binom.ppf(1e-3, half, expected)
    high = sps.binom.isf(1e-3, half, expected)
    assert low <= found <= high, (found, expected)
    print(
        f"A/A: {false_alarms}/{half} p < {ALPHA}; SRM {srm_alarms}/{EXPERIMENTS}; "
        f"effect: {found}/{half} found, {expected:.2f} predicted"
    )
