"""Feedback nobody can forge (issue 12, finding 5): declared metric names, bounded values,
tokens on feedback by request id, a secret on feedback by unit, request ids that neither
predict each other nor take over another request's join. Each test sends what an attacker
on the public port could send, and failed on the code before this change."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import xxhash

from modelgate.config import ConfigError, validate_config
from modelgate.control import REDACTED
from modelgate.mock.server import MockSettings
from modelgate.outcomes import FeedbackError, OutcomeStore
from modelgate.plan import compile_plan

from .support import (
    Stack,
    ab_config,
    admin_stack,
    async_test,
    gateway_stack,
    raw_upstream,
    read_request_head,
)

MOCKS = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}
FEEDBACK = "/_modelgate/feedback"
SECRET = "unit-secret-0123456789"


def variant_of(unit: str) -> str:
    bucket = xxhash.xxh64_intdigest(f"ranker:{unit}".encode()) % 10000
    return "control" if bucket < 5000 else "candidate"


def units_in_both_variants() -> tuple[str, str]:
    """Two units the 50/50 experiment puts in different variants."""
    first = "alice"
    other = next(f"mallory-{i}" for i in range(100) if variant_of(f"mallory-{i}") != "control")
    if variant_of(first) != "control":
        other = next(f"mallory-{i}" for i in range(100) if variant_of(f"mallory-{i}") == "control")
    return first, other


async def post(
    session: aiohttp.ClientSession,
    stack: Stack,
    document: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    async with session.post(stack.url + FEEDBACK, json=document, headers=headers) as response:
        return response.status, await response.json()


async def predict(
    session: aiohttp.ClientSession, stack: Stack, unit: str, request_id: str | None = None
) -> tuple[str, str | None]:
    """One request as `unit`: its request id and the feedback token it was handed."""
    headers = {"x-user-id": unit}
    if request_id is not None:
        headers["x-request-id"] = request_id
    async with session.post(stack.url + "/predict", json={}, headers=headers) as response:
        assert response.status == 200
        return response.headers["x-request-id"], response.headers.get("x-modelgate-feedback")


def in_forked_child(work: Callable[[], bytes]) -> bytes:
    """What `work` returns when run in a forked child, as a `--workers` worker is."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.write(write_end, work())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        return os.read(read_end, 1000)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


def aggregates_finite(stack: Stack) -> bool:
    return all(
        math.isfinite(m.mean) and math.isfinite(m.m2)
        for m in stack.gateway.outcomes.outcomes.values()
    )


# --- values -------------------------------------------------------------------------------


@async_test
async def test_the_1e308_pair_is_refused_and_the_aggregate_stays_finite() -> None:
    async with gateway_stack(ab_config(), MOCKS) as stack, aiohttp.ClientSession() as session:
        item = {"experiment": "ranker", "unit": "u1", "metric": "revenue"}
        status, body = await post(session, stack, {**item, "value": 5.0})
        assert status == 202, body
        for value in (1e308, -1e308):
            status, body = await post(session, stack, {**item, "value": value})
            assert (status, body["error"]) == (400, "value_out_of_range"), body
            assert "max_abs_value" in body["detail"]
        assert aggregates_finite(stack)
        (moments,) = stack.gateway.outcomes.outcomes.values()
        assert (moments.count, moments.mean) == (1, 5.0)


@async_test
async def test_values_at_the_bound_keep_every_sum_finite() -> None:
    """The largest accepted values, alternating: mean, M2 and the canary's sum of squares."""
    config = ab_config(feedback={"max_abs_value": 1e100})
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        batch = [
            {"experiment": "ranker", "unit": "u1", "metric": "m", "value": (-1) ** i * 1e100}
            for i in range(1000)
        ]
        for _ in range(3):
            status, body = await post(session, stack, batch)
            assert status == 202, body
        assert aggregates_finite(stack)
        (moments,) = stack.gateway.outcomes.outcomes.values()
        assert math.isfinite(moments.m2 + moments.count * moments.mean**2)


def test_max_abs_value_cannot_be_set_where_squares_overflow() -> None:
    with pytest.raises(
        ConfigError, match=r"feedback\.max_abs_value: .*less than or equal to 1000000"
    ):
        validate_config(ab_config(feedback={"max_abs_value": 1e200}))


# --- metric names ---------------------------------------------------------------------------

DECLARED = {"clicked": {"min": 0, "max": 1}, "revenue": {"min": 0, "max": 10000}}


@async_test
async def test_an_undeclared_metric_is_refused_naming_it_and_the_declared_ones() -> None:
    config = ab_config(feedback={"metrics": DECLARED})
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        item = {"experiment": "ranker", "unit": "u1"}
        status, body = await post(session, stack, {**item, "metric": "clickd", "value": 1})
        assert (status, body["error"]) == (400, "unknown_metric")
        assert "'clickd'" in body["detail"] and "clicked, revenue" in body["detail"]
        status, body = await post(session, stack, {**item, "metric": "clicked", "value": 2})
        assert (status, body["error"]) == (400, "value_out_of_range")
        assert "[0, 1]" in body["detail"]
        status, body = await post(session, stack, {**item, "metric": "revenue", "value": "9"})
        assert (status, body["error"]) == (400, "bad_feedback")
        assert stack.gateway.outcomes.outcomes == {}
        status, body = await post(session, stack, {**item, "metric": "clicked", "value": True})
        assert status == 202, body
        assert stack.gateway.outcomes.counts["bad"] == 3


def test_70000_distinct_names_leave_only_the_first_few(tmp_path: Path) -> None:
    """Without declarations, names are taken up to max_undeclared_metrics; the feedback
    log (whose writer died at the 65,536th name) sees no more than those."""
    plan = compile_plan(validate_config({**ab_config(), "log_dir": str(tmp_path)}))
    store = OutcomeStore()
    refused = 0
    try:
        for i in range(70_000):
            body = b'{"experiment":"ranker","unit":"u%d","metric":"m%d","value":1}' % (i, i)
            try:
                store.handle_feedback(body, plan, 0.0)
            except FeedbackError as exc:
                assert exc.code == "unknown_metric", body
                refused += 1
    finally:
        store.close()
    cap = 32  # the default of feedback.max_undeclared_metrics
    assert refused == 70_000 - cap
    assert len({metric for _, _, metric in store.outcomes}) == cap
    assert store.counts["bad"] == refused


def test_a_refused_batch_takes_none_of_its_names() -> None:
    plan = compile_plan(validate_config(ab_config(feedback={"max_undeclared_metrics": 3})))
    store = OutcomeStore()
    items = [f'{{"experiment":"ranker","unit":"u","metric":"m{i}","value":1}}' for i in range(4)]
    with pytest.raises(FeedbackError, match="at most 3"):
        store.handle_feedback(("[" + ",".join(items) + "]").encode(), plan, 0.0)
    assert store.metrics.undeclared == set()
    store.handle_feedback(("[" + ",".join(items[:3]) + "]").encode(), plan, 0.0)
    assert store.metrics.undeclared == {"m0", "m1", "m2"}


def test_a_canary_check_must_name_a_declared_metric() -> None:
    config = ab_config(feedback={"metrics": DECLARED})
    experiment = config["routes"][0]["experiment"]
    experiment["canary"] = {
        "baseline": "control",
        "candidate": "candidate",
        "steps": [10, 100],
        "checks": [
            {"metric": "error_rate", "max_increase": 0.01},
            {"metric": "convert", "margin": 0.1},
        ],
    }
    experiment["analysis"] = {"mde": {"revenue": 5, "clicks": 0.1}}
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    assert caught.value.errors == [
        "routes[0].experiment.analysis.mde.clicks: unknown feedback metric 'clicks' "
        "(feedback.metrics declares clicked, revenue)",
        "routes[0].experiment.canary.checks[1].metric: unknown feedback metric 'convert' "
        "(feedback.metrics declares clicked, revenue)",
    ]
    experiment["canary"]["checks"][1]["metric"] = "clicked"
    experiment["analysis"] = {"mde": {"revenue": 5}}
    validate_config(config)


# --- tokens on feedback by request id -------------------------------------------------------


@async_test
async def test_a_forged_or_missing_token_is_refused_when_tokens_are_required() -> None:
    config = ab_config(feedback={"require_token": True})
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        rid, token = await predict(session, stack, "alice")
        assert token is not None and len(token) == 32
        item = {"request_id": rid, "metric": "clicked", "value": 1}
        status, body = await post(session, stack, item)
        assert (status, body["error"]) == (403, "token_required")
        forged = "0" * 32
        status, body = await post(session, stack, {**item, "token": forged})
        assert (status, body["error"]) == (403, "bad_token")
        assert stack.gateway.outcomes.outcomes == {}
        status, body = await post(session, stack, {**item, "token": token})
        assert (status, body["counted"]) == (202, 1)
        assert stack.gateway.outcomes.counts["unauthorized"] == 2


@async_test
async def test_a_token_cannot_be_replayed_onto_another_request_or_unit() -> None:
    alice, mallory = units_in_both_variants()
    async with gateway_stack(ab_config(), MOCKS) as stack, aiohttp.ClientSession() as session:
        rid_a, token_a = await predict(session, stack, alice)
        rid_m, token_m = await predict(session, stack, mallory)
        assert token_a is not None and token_m is not None
        # Mallory's token on Alice's request, and Alice's on Mallory's: both refused, even
        # though tokens are not required (a token given is always checked).
        for rid, token in ((rid_a, token_m), (rid_m, token_a)):
            status, body = await post(
                session, stack, {"request_id": rid, "token": token, "metric": "m", "value": 1}
            )
            assert (status, body["error"]) == (403, "bad_token"), body
        # The same request id sent again by Mallory gets a token for Mallory's unit, which
        # does not open Alice's request either.
        _, token_again = await predict(session, stack, mallory, request_id=rid_a)
        assert token_again not in (None, token_a)
        status, body = await post(
            session, stack, {"request_id": rid_a, "token": token_again, "metric": "m", "value": 1}
        )
        assert status in (403, 409), body
        assert stack.gateway.outcomes.outcomes == {}


@async_test
async def test_tokens_only_where_an_experiment_applied_and_feedback_is_on() -> None:
    async with gateway_stack(ab_config(), MOCKS) as stack, aiohttp.ClientSession() as session:
        async with session.get(stack.url + "/other") as response:
            assert "x-modelgate-feedback" not in response.headers
        assert (await predict(session, stack, "alice"))[1] is not None
    config = ab_config(feedback={"enabled": False})
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        assert (await predict(session, stack, "alice"))[1] is None


@async_test
async def test_neither_an_upstream_nor_a_client_can_pass_a_token_along() -> None:
    seen: list[bytes] = []

    async def forging(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request_head(reader))
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-modelgate-feedback: forged\r\n\r\n{}"
        )
        await writer.drain()

    async with raw_upstream(forging) as port:
        ports = {"model-a": port, "model-b": port}
        async with gateway_stack(ab_config(), extra_ports=ports) as stack:
            async with aiohttp.ClientSession() as session:
                headers = {"x-user-id": "alice", "x-modelgate-feedback": "from-the-client"}
                async with session.get(stack.url + "/predict", headers=headers) as response:
                    tokens = response.headers.getall("x-modelgate-feedback")
    assert len(tokens) == 1 and len(tokens[0]) == 32 and tokens[0] != "forged"
    assert b"from-the-client" not in seen[0]


def test_a_token_made_by_one_worker_verifies_on_another() -> None:
    """The generated key is made before `--workers` forks: a forked worker that compiles
    the config again (as every reload does) makes the very same tokens."""
    config = validate_config(ab_config())
    keys = compile_plan(config).feedback_keys
    token = in_forked_child(
        lambda: compile_plan(validate_config(ab_config())).feedback_keys.token(
            b"rid-1", 42, b"ranker=control"
        )
    )
    assert keys.token_matches(token.decode(), b"rid-1", 42, b"ranker=control")
    assert not keys.token_matches(token.decode(), b"rid-1", 43, b"ranker=control")
    assert not keys.token_matches(token.decode(), b"rid-2", 42, b"ranker=control")
    assert not keys.token_matches(token.decode(), b"rid-1", 42, b"ranker=candidate")


def test_a_configured_secret_keys_the_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    def token(**feedback: Any) -> bytes:
        plan = compile_plan(validate_config(ab_config(feedback=feedback)))
        return plan.feedback_keys.token(b"r", 1, b"ranker=control")

    assert token(secret="s" * 16) == token(secret="s" * 16) != token(secret="t" * 16)
    monkeypatch.setenv("MODELGATE_FEEDBACK_SECRET", "t" * 16)
    assert token(secret="s" * 16) == token()
    with pytest.raises(ConfigError, match=r"feedback\.secret: .*16 to 512"):
        validate_config(ab_config(feedback={"secret": "short"}))


def test_a_secret_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"feedback\.unit_secret_file: cannot read .*nope"):
        validate_config(ab_config(feedback={"unit_secret_file": str(missing)}))
    good = tmp_path / "secret"
    good.write_text(SECRET + "\n")
    plan = compile_plan(validate_config(ab_config(feedback={"unit_secret_file": str(good)})))
    assert plan.feedback_keys.unit_secret == SECRET.encode()


@async_test
async def test_get_config_hides_the_feedback_secrets_and_a_reload_of_it_keeps_them() -> None:
    token_secret = "token-secret-0123456789"
    config = ab_config(feedback={"secret": token_secret, "unit_secret": SECRET})
    async with admin_stack(config, MOCKS) as admin, aiohttp.ClientSession() as session:
        async with session.get(admin.admin_url + "/config") as response:
            running = await response.json()
        assert running["feedback"]["secret"] == running["feedback"]["unit_secret"] == REDACTED
        assert token_secret not in str(running) and SECRET not in str(running)
        async with session.post(admin.admin_url + "/reload", json=running) as response:
            assert (await response.json())["result"] == "unchanged"
        assert admin.stack.gateway.plan.feedback_keys.unit_secret == SECRET.encode()


# --- the secret on feedback by unit ----------------------------------------------------------


@async_test
async def test_feedback_by_unit_needs_the_secret_when_one_is_set() -> None:
    config = ab_config(feedback={"unit_secret": SECRET})
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        item = {"experiment": "ranker", "unit": "never-seen", "metric": "m", "value": 1}
        status, body = await post(session, stack, item)
        assert (status, body["error"]) == (401, "unit_secret_required")
        for wrong in ("Bearer nope", f"Basic {SECRET}", SECRET, f"Bearer {SECRET}x"):
            status, body = await post(session, stack, item, {"authorization": wrong})
            assert (status, body["error"]) == (403, "bad_unit_secret"), wrong
        assert stack.gateway.outcomes.outcomes == {}
        status, body = await post(session, stack, item, {"authorization": f"Bearer {SECRET}"})
        assert status == 202, body
        # Feedback by request id does not need it, nor minds another Authorization header.
        rid, _ = await predict(session, stack, "alice")
        item = {"request_id": rid, "metric": "m", "value": 1}
        status, body = await post(session, stack, item, {"authorization": "Bearer app-token"})
        assert status == 202, body
        assert stack.gateway.outcomes.counts["unauthorized"] == 5


@async_test
async def test_the_unit_secret_can_come_in_a_header_of_its_own() -> None:
    config = ab_config(feedback={"unit_secret": SECRET, "unit_secret_header": "X-Feedback-Key"})
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        item = {"experiment": "ranker", "unit": "u", "metric": "m", "value": 1}
        status, body = await post(session, stack, item, {"authorization": f"Bearer {SECRET}"})
        assert (status, body["error"]) == (401, "unit_secret_required")
        status, body = await post(session, stack, item, {"x-feedback-key": SECRET})
        assert status == 202, body


@async_test
async def test_bench_posts_by_unit_with_the_secret_from_the_environment() -> None:
    from modelgate.bench.config import BenchConfig
    from modelgate.bench.config import FeedbackSpec as BenchFeedback
    from modelgate.bench.run import run_bench

    config = ab_config(feedback={"unit_secret": SECRET})
    async with gateway_stack(config, MOCKS) as stack:
        bench = BenchConfig(
            stack.url + "/predict",
            concurrency=2,
            requests=20,
            unit_header="x-user-id",
            feedback=(BenchFeedback.parse("clicked:control=0.2,candidate=0.4"),),
            feedback_kind="binary",
        )
        without = await run_bench(bench)
        os.environ["MODELGATE_FEEDBACK_UNIT_SECRET"] = SECRET
        try:
            with_secret = await run_bench(bench)
        finally:
            del os.environ["MODELGATE_FEEDBACK_UNIT_SECRET"]
    assert without.feedback is not None and without.feedback.accepted == 0
    assert with_secret.feedback is not None and with_secret.feedback.accepted == 20


# --- request ids -------------------------------------------------------------------------------


@async_test
async def test_request_ids_do_not_predict_each_other() -> None:
    """Ids are `<process prefix>-<64 random bits>`: the prefix tells the process, the rest
    nothing (they were the prefix and a counter)."""
    async with gateway_stack(ab_config(), MOCKS) as stack, aiohttp.ClientSession() as session:
        ids = [(await predict(session, stack, f"u{i}"))[0] for i in range(200)]
    prefixes = {rid.rsplit("-", 1)[0] for rid in ids}
    tails = [int(rid.rsplit("-", 1)[1], 16) for rid in ids]
    assert len(prefixes) == 1 and all(len(rid) == 29 for rid in ids)
    assert len({tail >> 48 for tail in tails}) > 150  # the top 16 bits: random, not a count
    assert not any(b - a == 1 for a, b in zip(tails, tails[1:], strict=False))


def test_a_forked_worker_draws_other_request_ids() -> None:
    from modelgate.request_ids import new_request_id

    new_request_id()  # the parent's pool is filled: the child must not reuse it
    child = in_forked_child(lambda: b"".join(new_request_id() for _ in range(3)))
    ours = b"".join(new_request_id() for _ in range(3))
    assert len(child) == len(ours) == 87
    assert child[:12] != ours[:12] and child[13:29] != ours[13:29]


@async_test
async def test_a_reused_request_id_cannot_take_over_the_earlier_requests_join() -> None:
    """Mallory sends Alice's request id (a client-chosen x-request-id is kept) from a unit in
    the other variant, then posts feedback for it: it must not count for Mallory's variant,
    nor move Alice's feedback there."""
    alice, mallory = units_in_both_variants()
    async with gateway_stack(ab_config(), MOCKS) as stack, aiohttp.ClientSession() as session:
        rid, _ = await predict(session, stack, alice, request_id="order-1234")
        assert rid == "order-1234"
        again, _ = await predict(session, stack, mallory, request_id=rid)
        assert again == rid
        for _ in range(2):  # Mallory's post, then Alice's
            status, body = await post(
                session, stack, {"request_id": rid, "metric": "m", "value": 1}
            )
            assert (status, body["error"]) == (409, "ambiguous_request_id"), body
        assert stack.gateway.outcomes.outcomes == {}
        assert stack.gateway.outcomes.counts["request_id_collisions"] == 1
        assert stack.gateway.outcomes.counts["ambiguous_request_id"] == 2
        # The same unit sending the same id again (a retry) keeps its join.
        rid_b, _ = await predict(session, stack, alice, request_id="order-5678")
        await predict(session, stack, alice, request_id=rid_b)
        status, body = await post(session, stack, {"request_id": rid_b, "metric": "m", "value": 1})
        assert status == 202, body
        assert {v for _, v, _ in stack.gateway.outcomes.outcomes} == {variant_of(alice)}


@async_test
async def test_a_token_counts_once_per_metric_however_often_it_is_posted() -> None:
    """The review's repro (issue 12, finding 1): one response's request id and token posted
    3 x 1000 times used to count 3000 clicks for one request, so one client decided a canary
    check. Now one value per (request id, metric): a repeat in the batch or a later post is
    409 `duplicate_feedback`, the batch recorded whole or not at all, and counted."""
    config = ab_config(feedback={"require_token": True})
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        outcomes = stack.gateway.outcomes
        rid, token = await predict(session, stack, "alice")
        item = {"request_id": rid, "token": token, "metric": "clicked", "value": 1}
        for _ in range(3):
            status, body = await post(session, stack, [item] * 1000)
            assert (status, body["error"]) == (409, "duplicate_feedback"), body
            assert "'clicked'" in body["detail"] and body["detail"].startswith("[1]")
        assert outcomes.outcomes == {}  # a refused batch records nothing
        status, body = await post(session, stack, item)
        assert (status, body["counted"]) == (202, 1), body
        for document in (item, [{**item, "metric": "rated", "value": 4}, item]):
            status, body = await post(session, stack, document)
            assert (status, body["error"]) == (409, "duplicate_feedback"), body
        # Another metric of the same request is its own value, once.
        status, body = await post(session, stack, {**item, "metric": "rated", "value": 4})
        assert (status, body["counted"]) == (202, 1), body
        counts = {m: moments.count for (_, _, m), moments in outcomes.outcomes.items()}
        assert counts == {"clicked": 1, "rated": 1}
        assert outcomes.counts["duplicate"] == 5
        assert outcomes.counts["ambiguous_request_id"] == 0
        # A request nobody posted for holds no set of credited metrics.
        other, _ = await predict(session, stack, "bob")
        assert outcomes.recent[other.encode()][3] is None
