"""Feedback records: every accepted item written beside the exposures, readable with numpy,
with the experiments' design in the sidecar; and the shared record-log writer's limits."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import numpy as np
import xxhash

from modelgate.exposure import EXPOSURE_DTYPE, ExposureLog
from modelgate.feedbacklog import FEEDBACK_DTYPE, read_feedback
from modelgate.mock.server import MockSettings
from modelgate.recordlog import iter_record_files

from .support import ab_config, async_test, gateway_stack
from .test_outcomes import variant_of

MOCKS = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}
FEEDBACK = "/_modelgate/feedback"


def test_every_accepted_item_is_written(tmp_path: Path) -> None:
    @async_test
    async def run() -> str:
        config = ab_config(log_dir=str(tmp_path))
        config["routes"][0]["experiment"]["analysis"] = {"mde": {"rating": 0.2}}
        async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
            async with session.post(
                stack.url + "/predict", json={}, headers={"x-user-id": "alice"}
            ) as response:
                rid = response.headers["x-request-id"]
            items = [
                {"experiment": "ranker", "unit": f"u{i}", "metric": "rating", "value": i / 2}
                for i in range(10)
            ]
            items.append({"request_id": rid, "metric": "clicked", "value": True})
            async with session.post(stack.url + FEEDBACK, json=items) as response:
                assert response.status == 202
            async with session.post(stack.url + FEEDBACK, json=[{"metric": "x"}]) as response:
                assert response.status == 400  # refused whole: nothing written
        return rid

    rid = run()
    rows = read_feedback(tmp_path)
    assert len(rows) == 11
    by_unit = [r for r in rows if not r["by_request_id"]]
    assert [r["value"] for r in by_unit] == [i / 2 for i in range(10)]
    for i, row in enumerate(by_unit):
        assert row["unit_hash"] == xxhash.xxh64_intdigest(f"u{i}".encode())
        assert (row["experiment"], row["metric"]) == ("ranker", "rating")
        assert row["variant"] == variant_of(f"u{i}") and row["enrolled"]
    (click,) = [r for r in rows if r["by_request_id"]]
    assert click["request_id"] == rid[-16:] and click["unit_hash"] == 0
    assert (click["metric"], click["value"], click["variant"]) == (
        "clicked",
        1.0,
        variant_of("alice"),
    )

    (file,) = tmp_path.glob("feedback-*.bin")
    raw = np.fromfile(file, dtype=FEEDBACK_DTYPE)
    assert len(raw) == 11 and raw.dtype.itemsize == 48
    sidecar = json.loads(file.with_suffix(".json").read_text())
    design = sidecar["meta"]["experiments"]["ranker"]
    assert design["variants"] == ["control", "candidate"] and design["control"] == "control"
    assert design["weights"] == [50, 50] and design["analysis"]["mde"] == {"rating": 0.2}
    assert sidecar["metrics"] == ["rating", "clicked"]


def test_the_record_log_drops_and_counts_when_its_queue_is_full(tmp_path: Path) -> None:
    log = ExposureLog(tmp_path, queue_size=3, flush_interval_s=0.01)
    for i in range(5):
        log.add(b"req-%d" % i, i, "e", "v", 1)
    assert log.dropped["queue_full"] == 2
    log.start()
    log.close()
    (_, records, names), *_ = list(iter_record_files(tmp_path, "exposure", EXPOSURE_DTYPE))
    assert records["unit_hash"].tolist() == [0, 1, 2]
    assert names["experiments"] == ["e"] and log.stats()["written"] == 3


def test_a_write_error_is_counted_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    log = ExposureLog(blocker / "logs", flush_interval_s=0.01)
    log.start()
    log.add(b"r", 1, "e", "v", 1)
    log.close()
    assert log.write_errors == 1 and log.dropped["write_error"] == 1


def test_an_exposure_log_opened_after_the_feedback_log_is_described_too(tmp_path: Path) -> None:
    """Feedback by unit can come before any request; the exposure log opened later under the
    same config must still carry the experiments' design (it once stayed without)."""

    @async_test
    async def run() -> None:
        config = ab_config(log_dir=str(tmp_path))
        async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
            item = {"experiment": "ranker", "unit": "bob", "metric": "rating", "value": 1}
            async with session.post(stack.url + FEEDBACK, json=[item]) as response:
                assert response.status == 202
            async with session.post(
                stack.url + "/predict", json={}, headers={"x-user-id": "alice"}
            ) as response:
                assert response.status == 200

    run()
    (file,) = tmp_path.glob("exposure-*.bin")
    sidecar = json.loads(file.with_suffix(".json").read_text())
    assert sidecar["meta"]["experiments"]["ranker"]["variants"] == ["control", "candidate"]
