"""Feedback, exposure records and per-variant outcome statistics, end to end."""

from __future__ import annotations

import asyncio
import json
import math
import random
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import xxhash
from scipy import stats as scipy_stats  # type: ignore[import-untyped]

from modelgate.exposure import EXPOSURE_DTYPE, LEGACY_EXPOSURE_DTYPE, read_exposures
from modelgate.mock.server import MockSettings
from modelgate.outcomes import LATENCY_BUCKETS_S, Moments, latency_quantile
from modelgate.stats import welch_test

from .support import Stack, ab_config, async_test, gateway_stack

MOCKS = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}
FEEDBACK = "/_modelgate/feedback"


def variant_of(unit: str) -> str:
    return (
        "control"
        if xxhash.xxh64_intdigest(f"ranker:{unit}".encode()) % 10000 < 5000
        else ("candidate")
    )


async def post_feedback(
    session: aiohttp.ClientSession, stack: Stack, document: Any
) -> tuple[int, dict[str, Any]]:
    async with session.post(stack.url + FEEDBACK, json=document) as response:
        return response.status, await response.json()


def moments_of(stack: Stack, metric: str) -> dict[str, Moments]:
    return {
        variant: moments
        for (experiment, variant, name), moments in stack.gateway.outcomes.outcomes.items()
        if experiment == "ranker" and name == metric
    }


@async_test
async def test_feedback_by_unit_matches_scipy_welch() -> None:
    rng = random.Random(3)
    samples: dict[str, list[float]] = {"control": [], "candidate": []}
    async with gateway_stack(ab_config(), MOCKS) as stack, aiohttp.ClientSession() as session:
        batch = []
        for i in range(600):
            unit = f"user-{i}"
            variant = variant_of(unit)
            value = rng.gauss(1.0 if variant == "control" else 1.2, 0.5)
            samples[variant].append(value)
            batch.append({"experiment": "ranker", "unit": unit, "metric": "rating", "value": value})
        for start in range(0, len(batch), 200):
            status, body = await post_feedback(session, stack, batch[start : start + 200])
            assert status == 202, body
            assert body["accepted"] == 200
        moments = moments_of(stack, "rating")
    a, b = moments["control"], moments["candidate"]
    ours = welch_test(a.count, a.mean, a.variance, b.count, b.mean, b.variance)
    theirs = scipy_stats.ttest_ind(samples["candidate"], samples["control"], equal_var=False)
    assert a.count == len(samples["control"]) and b.count == len(samples["candidate"])
    assert ours.t == pytest.approx(theirs.statistic, rel=1e-9)
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9)


@async_test
async def test_feedback_by_request_id_and_unknown_ids() -> None:
    async with gateway_stack(ab_config(), MOCKS) as stack, aiohttp.ClientSession() as session:
        async with session.post(
            stack.url + "/predict", json={}, headers={"x-user-id": "alice"}
        ) as response:
            rid = response.headers["x-request-id"]
        status, body = await post_feedback(
            session, stack, {"request_id": rid, "metric": "clicked", "value": True}
        )
        assert status == 202 and body["counted"] == 1
        status, body = await post_feedback(
            session, stack, {"request_id": "nope", "metric": "clicked", "value": 1}
        )
        assert status == 404 and body["error"] == "unknown_request_id"
        moments = moments_of(stack, "clicked")
        assert stack.gateway.outcomes.counts["unknown_request_id"] == 1
    assert moments == {variant_of("alice"): moments[variant_of("alice")]}
    assert moments[variant_of("alice")].ones == 1


@pytest.mark.parametrize(
    ("document", "status", "code"),
    [
        ({"experiment": "nope", "unit": "u", "metric": "m", "value": 1}, 400, "unknown_experiment"),
        ({"experiment": "ranker", "unit": "u", "metric": "m", "value": "x"}, 400, "bad_feedback"),
        ({"experiment": "ranker", "unit": "u", "metric": "m", "value": None}, 400, "bad_feedback"),
        (
            {"experiment": "ranker", "unit": "u", "metric": "bad metric!", "value": 1},
            400,
            "bad_feedback",
        ),
        (
            {"experiment": "ranker", "unit": "u", "metric": "m", "value": 1, "x": 2},
            400,
            "bad_feedback",
        ),
        (
            [{"experiment": "ranker", "unit": "u", "metric": "m", "value": 1}] * 1001,
            413,
            "batch_too_large",
        ),
        (
            [{"experiment": "ranker", "unit": "u", "metric": "m", "value": 1}, {"metric": "m"}],
            400,
            "bad_feedback",
        ),
        ([], 400, "bad_feedback"),
    ],
)
def test_bad_feedback_is_refused_and_changes_nothing(document: Any, status: int, code: str) -> None:
    @async_test
    async def run() -> None:
        async with gateway_stack(ab_config(), MOCKS) as stack, aiohttp.ClientSession() as s:
            got, body = await post_feedback(s, stack, document)
            assert (got, body["error"]) == (status, code)
            assert stack.gateway.outcomes.outcomes == {}

    run()


@async_test
async def test_nan_and_non_json_bodies() -> None:
    async with gateway_stack(ab_config(), MOCKS) as stack, aiohttp.ClientSession() as session:
        for raw in (b'{"experiment":"ranker","unit":"u","metric":"m","value":NaN}', b"not json"):
            async with session.post(stack.url + FEEDBACK, data=raw) as response:
                assert response.status == 400
        async with session.get(stack.url + FEEDBACK) as response:
            assert response.status == 405
        assert stack.gateway.outcomes.outcomes == {}


@async_test
async def test_thousands_of_concurrent_posts_are_counted_exactly() -> None:
    async with gateway_stack(ab_config(), MOCKS) as stack:
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as session:
            docs = [
                {"experiment": "ranker", "unit": f"u{i % 300}", "metric": "clicked", "value": i % 2}
                for i in range(3000)
            ]
            results = await asyncio.gather(*(post_feedback(session, stack, d) for d in docs))
        moments = moments_of(stack, "clicked")
    assert all(status == 202 for status, _ in results)
    assert sum(m.count for m in moments.values()) == 3000
    assert sum(m.ones for m in moments.values()) == 1500
    per_variant = {v: sum(1 for d in docs if variant_of(str(d["unit"])) == v) for v in moments}
    assert {v: m.count for v, m in moments.items()} == per_variant


def test_exposure_records_read_back_with_numpy(tmp_path: Path) -> None:
    @async_test
    async def run() -> list[str]:
        config = ab_config(log_dir=str(tmp_path))
        ids = []
        async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
            for i in range(200):
                async with session.post(
                    stack.url + "/predict", json={}, headers={"x-user-id": f"u{i}"}
                ) as response:
                    ids.append(response.headers["x-request-id"])
        return ids

    ids = run()
    raw = np.concatenate(
        [np.fromfile(f, dtype=EXPOSURE_DTYPE) for f in tmp_path.glob("exposure-*.bin")]
    )
    records, rows = read_exposures(tmp_path)
    assert len(raw) == len(records) == 200
    assert [r["request_id"] for r in rows] == [i[-16:] for i in ids]
    for i, row in enumerate(rows):
        assert row["unit_hash"] == xxhash.xxh64_intdigest(f"u{i}".encode())
        assert row["variant"] == variant_of(f"u{i}") and row["enrolled"]


def test_exposure_records_carry_the_answers_status_and_latency(tmp_path: Path) -> None:
    """Written when the answer is done: the candidate's 503s and its 30 ms show in its
    records, the control's 200s in its own; a client that hangs up is not measured."""
    mocks = {
        "model-a": MockSettings(name="a"),
        "model-b": MockSettings(name="b", error_rate=1.0, error_status=503, latency_ms=30.0),
    }

    @async_test
    async def run() -> None:
        config = ab_config(log_dir=str(tmp_path))
        async with gateway_stack(config, mocks) as stack, aiohttp.ClientSession() as session:
            for i in range(120):
                async with session.post(
                    stack.url + "/predict", json={}, headers={"x-user-id": f"u{i % 40}"}
                ) as response:
                    await response.read()
            # A client that leaves before its answer: hashed to the slow candidate.
            slow = next(f"gone{i}" for i in range(100) if variant_of(f"gone{i}") == "candidate")
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            writer.write(
                b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
                + f"x-user-id: {slow}\r\n\r\n{{}}".encode()
            )
            await writer.drain()
            writer.transport.abort()
            await asyncio.sleep(0.1)

    run()
    records, rows = read_exposures(tmp_path)
    assert len(rows) == 121
    answered = [r for r in rows if r["status"] is not None]
    assert len(answered) == 120
    for row in answered:
        if row["variant"] == "candidate":
            assert row["status"] == 503 and row["latency_us"] >= 29_000  # uvloop timers: 1 ms
        else:
            assert row["status"] == 200 and 0 < row["latency_us"] < 30_000
    (gone,) = [r for r in rows if r["status"] is None]
    assert gone["variant"] == "candidate" and gone["latency_us"] is None
    # ts_ns is when the request came: never after its answer.
    assert all(int(r["ts_ns"]) > 0 for r in records)


def test_exposure_files_of_the_older_layout_still_read(tmp_path: Path) -> None:
    """Files written before records carried status and latency: read, with both unknown."""
    old = np.zeros(3, dtype=LEGACY_EXPOSURE_DTYPE)
    old["ts_ns"], old["unit_hash"], old["flags"] = 10**18, [1, 2, 3], 1
    old["variant_id"] = [0, 1, 0]
    old.tofile(tmp_path / "exposure-1-p1-0.bin")
    sidecar = {
        "experiments": ["ranker"],
        "variants": ["control", "candidate"],
        "dtype": LEGACY_EXPOSURE_DTYPE.descr,
        "format": "exposure",
    }
    (tmp_path / "exposure-1-p1-0.json").write_text(json.dumps(sidecar))
    records, rows = read_exposures(tmp_path)
    assert records.dtype == EXPOSURE_DTYPE
    assert [r["unit_hash"] for r in rows] == [1, 2, 3]
    assert [r["variant"] for r in rows] == ["control", "candidate", "control"]
    assert all(r["enrolled"] and r["status"] is None for r in rows)


@async_test
async def test_system_metrics_per_variant() -> None:
    mocks = {"model-a": MockSettings(name="a"), "model-b": MockSettings(name="b", error_rate=1.0)}
    async with gateway_stack(ab_config(), mocks) as stack, aiohttp.ClientSession() as session:
        for i in range(100):
            async with session.post(
                stack.url + "/predict", json={}, headers={"x-user-id": f"u{i}"}
            ):
                pass
        system = stack.gateway.outcomes.system
    control, candidate = system[("ranker", "control")], system[("ranker", "candidate")]
    assert control.requests + candidate.requests == 100
    assert control.errors == 0 and candidate.errors == candidate.requests
    assert control.buckets is not None and sum(control.buckets) == control.requests


def test_latency_quantile_interpolates_in_buckets() -> None:
    buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
    buckets[LATENCY_BUCKETS_S.index(0.01)] = 100  # all in (0.005, 0.01]
    assert latency_quantile(buckets, 0.5) == pytest.approx(0.0075)
    assert math.isnan(latency_quantile([0] * len(buckets), 0.5))


def test_moments_merge_equals_one_stream() -> None:
    rng = random.Random(5)
    values = [rng.gauss(1000.0, 3.0) for _ in range(5000)]
    whole, left, right = Moments(), Moments(), Moments()
    for i, value in enumerate(values):
        whole.add(value)
        (left if i % 3 else right).add(value)
    left.merge(right)
    assert left.count == whole.count
    assert left.mean == pytest.approx(whole.mean, rel=1e-12)
    assert left.variance == pytest.approx(whole.variance, rel=1e-9)
    assert left.variance == pytest.approx(float(np.var(values, ddof=1)), rel=1e-9)


def test_snapshots_of_workers_merge_into_one() -> None:
    from modelgate.outcomes import OutcomeStore, merge_snapshots

    stores = [OutcomeStore(), OutcomeStore()]
    whole = OutcomeStore()
    rng = random.Random(9)
    for i in range(400):
        value = rng.random()
        latency = rng.random() / 10
        for store in (stores[i % 2], whole):
            store.outcomes.setdefault(("e", "v", "m"), Moments()).add(value)
            store.observe("e", "v", latency, i % 10 == 0)
    merged = merge_snapshots([s.snapshot() for s in stores])
    expected = whole.snapshot()
    (row,) = merged["outcomes"]
    (want,) = expected["outcomes"]
    assert row["count"] == want["count"] == 400
    assert row["mean"] == pytest.approx(want["mean"], rel=1e-12)
    assert row["m2"] == pytest.approx(want["m2"], rel=1e-9)
    (sys_row,) = merged["system"]
    (sys_want,) = expected["system"]
    assert sys_row["buckets"] == sys_want["buckets"]
    assert (sys_row["requests"], sys_row["errors"]) == (400, 40)
