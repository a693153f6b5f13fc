"""Offline joins cannot be moved by a shared request id tail (issue 12 review, finding 2).

The exposure and feedback records keep only the request id's last 16 bytes, and both readers
(`load_logs`, the per-event analysis; the DuckDB engine, the analysis over units) joined a
feedback record to one exposure with that tail: the last (load_logs) or the first (the
engine). An attacker who sends `attacker-0-0123456789abcdef` from a unit in the other arm,
before or after `victim-request-0123456789abcdef`, or reuses the victim's exact id, moved the
victim's accepted feedback into the attacker's arm. Now a tail exposed with more than one
(unit hash, variant) in an experiment is ambiguous: its feedback is dropped and counted in
both readers. Each test failed on the code before the change."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from modelgate.analysis.engine import AnalysisEngine
from modelgate.analyze.command import results_from_logs
from modelgate.analyze.logs import load_logs, snapshot_of

from .support import ab_config, async_test, gateway_stack
from .test_feedback_trust import MOCKS, post, predict, variant_of

TAIL = "0123456789abcdef"


def units_for(variant: str, count: int, prefix: str) -> list[str]:
    return [u for u in (f"{prefix}-{i}" for i in range(1000)) if variant_of(u) == variant][:count]


def through_a_gateway(log_dir: Path) -> None:
    """Victims in candidate, attackers in control. Three victims' clicks are accepted live
    and then shared with an attacker's request: a tail sent after the victim's, a tail sent
    before it, the exact id sent again after the post. Bob's id, sent twice by Bob (a
    retry), is one request and joins."""

    @async_test
    async def run() -> None:
        victims = units_for("candidate", 3, "victim")
        attackers = units_for("control", 3, "attacker")
        bob = units_for("candidate", 1, "bob")[0]
        config = ab_config(log_dir=str(log_dir))
        async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:

            async def click(request_id: str) -> None:
                item = {"request_id": request_id, "metric": "clicked", "value": 1}
                status, body = await post(session, stack, item)
                assert (status, body.get("counted")) == (202, 1), body

            # 1. The victim's request, its click, then the attacker's id with the same tail.
            await predict(session, stack, victims[0], f"victim-request-{TAIL}")
            await click(f"victim-request-{TAIL}")
            await predict(session, stack, attackers[0], f"attacker-0-{TAIL}")
            # 2. The attacker's id first, then the victim's request and click.
            await predict(session, stack, attackers[1], f"attacker-1-x{TAIL[::-1]}")
            await predict(session, stack, victims[1], f"victim-request-{TAIL[::-1]}")
            await click(f"victim-request-{TAIL[::-1]}")
            # 3. The same exact id, reused after the victim's click was accepted.
            await predict(session, stack, victims[2], "order-0000000000001234")
            await click("order-0000000000001234")
            await predict(session, stack, attackers[2], "order-0000000000001234")
            # A retry by the same unit is not ambiguous.
            await predict(session, stack, bob, "bob-request-00000042")
            await predict(session, stack, bob, "bob-request-00000042")
            await click("bob-request-00000042")
            live = stack.gateway.outcomes.outcomes
            assert {(v, m): s.count for (_, v, m), s in live.items()} == {
                ("candidate", "clicked"): 4
            }

    run()


def test_load_logs_drops_feedback_of_an_ambiguous_tail(tmp_path: Path) -> None:
    through_a_gateway(tmp_path)
    data = load_logs(tmp_path)
    assert dict(data.join) == {"joined": 1, "ambiguous": 3}  # moved 2 before
    assert data.feedback["variant"].tolist() == ["candidate"]  # Bob's click only
    outcomes = snapshot_of(data)["outcomes"]
    assert [(o["variant"], o["metric"], o["count"]) for o in outcomes] == [
        ("candidate", "clicked", 1)
    ]


def test_the_engine_drops_feedback_of_an_ambiguous_tail(tmp_path: Path) -> None:
    through_a_gateway(tmp_path)
    engine = AnalysisEngine.from_logs(tmp_path, threads=1)
    try:
        result = engine.query("ranker")
    finally:
        engine.close()
    # Bob's click is the only value counted, in his arm (before: the second victim's click
    # counted for the attacker who sent the shared tail first).
    assert result.values["clicked"] == {"control": 0, "candidate": 1}
    clicks = result.metrics[("clicked", "values")]
    assert clicks["control"].mean_x == 0.0
    assert result.ambiguous == {"clicked": 3}
    assert result.excluded == {}
    (units,), _, counts = results_from_logs(str(tmp_path), "ranker", None, timelines=False)
    assert counts == {"excluded": 0, "ambiguous": 3}
    assert units["ambiguous"] == {"clicked": 3}
