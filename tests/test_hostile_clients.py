"""Slow and hostile clients: pipelines that are never read, heads and bodies trickled a byte at
a time, readers that stall, requests queued for a saturated upstream. Each is bounded, and the
gateway keeps serving everyone else."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson

from modelgate.connection import FEED_SLICE, MAX_PIPELINE, ClientConnection
from modelgate.exchange import Exchange
from modelgate.mock.server import MockSettings

from .support import (
    async_test,
    gateway_stack,
    is_closed,
    raw_exchange,
    read_response,
    simple_config,
)
from .wire import SeenRequest, recording_upstream

GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"


def limited(upstream_port: int, **limits: Any) -> Any:
    config = simple_config()
    config["limits"] = limits
    return gateway_stack(config, extra_ports={"model-a": upstream_port})


def big_answer(size: int) -> Any:
    def respond(request: SeenRequest) -> bytes:
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"x" * size

    return respond


@async_test
async def test_a_pipelining_client_that_never_reads_is_not_answered_without_bound() -> None:
    """Finding 2: the gateway used to parse and answer a never-reading client's whole
    pipeline into its send buffer (about 5x the bytes sent), bounded by nothing."""
    async with recording_upstream(big_answer(64 * 1024)) as upstream:
        async with limited(upstream.port) as stack:
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            writer.transport.set_write_buffer_limits(high=16 * 1024 * 1024)
            requests = 2000
            writer.write(GET * requests)  # 64 KB of requests; 128 MB of answers if all served
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(writer.drain(), 2)
            await asyncio.sleep(0.5)
            (conn,) = stack.gateway.connections
            assert conn.transport is not None
            buffered = conn.transport.get_write_buffer_size()
            held = len(conn.pending)
            served = len(upstream.requests)
            # Another client is served meanwhile.
            (other,) = await raw_exchange(stack.port, GET)
            writer.transport.abort()
    assert other.status == 200
    assert served < 200  # answers stop once the client's socket and our buffer are full
    assert buffered < 4 * 1024 * 1024
    # The bound connection.py states: a full pipeline plus the requests of one parsed slice
    # (a slice parsed while the pipeline drained adds up to FEED_SLICE // len(GET) at once).
    assert held <= MAX_PIPELINE + FEED_SLICE // len(GET)


@async_test
async def test_one_read_of_thousands_of_tiny_requests_holds_at_most_a_pipeline() -> None:
    """A single read may hold thousands of tiny requests: they are parsed in slices, so no
    more than MAX_PIPELINE (and a slice) of them wait parsed in memory, and all are still
    answered in order."""
    peak = 0
    original = ClientConnection._start_next

    def watched(self: ClientConnection) -> None:
        nonlocal peak
        peak = max(peak, len(self.pending))
        original(self)

    async with recording_upstream() as upstream:
        async with limited(upstream.port) as stack:
            ClientConnection._start_next = watched  # type: ignore[method-assign]
            try:
                count = 3000
                data = b"".join(b"GET /r%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(count))
                responses = await raw_exchange(stack.port, data, count=count)
            finally:
                ClientConnection._start_next = original  # type: ignore[method-assign]
    targets = [orjson.loads(r.body)["target"] for r in responses]
    assert targets == [f"/r{i}" for i in range(count)]
    # At most a pipeline, plus the requests one parse slice can hold.
    assert peak <= MAX_PIPELINE + FEED_SLICE // len(b"GET /r0 HTTP/1.1\r\nHost: a\r\n\r\n")


@async_test
async def test_a_head_trickled_behind_a_request_in_flight_times_out_after_its_answer() -> None:
    """Finding 6 and item 12: a partial head pipelined behind an in-flight request had no
    deadline; and gateway errors were written ahead of earlier pipelined answers."""
    config = simple_config()
    config["limits"] = {"client_header_timeout_ms": 300}
    mocks = {"model-a": MockSettings(name="slow", latency_ms=800)}
    async with gateway_stack(config, mocks) as stack:
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
        writer.write(GET + b"GET /second HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        first = await asyncio.wait_for(read_response(reader), 5)
        second = await asyncio.wait_for(read_response(reader), 5)
        closed = await is_closed(reader)
        writer.close()
        assert stack.gateway.counters.client_timeouts == 1
    assert first.status == 200  # the answer in flight comes first
    assert second.status == 408
    assert closed


@async_test
async def test_an_oversized_pipelined_head_is_refused_after_the_answer_in_flight() -> None:
    config = simple_config()
    config["limits"] = {"max_header_bytes": 2048}
    mocks = {"model-a": MockSettings(name="slow", latency_ms=300)}
    async with gateway_stack(config, mocks) as stack:
        big = b"GET /big HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 5000  # still unfinished
        responses = await raw_exchange(stack.port, GET + big, count=2)
    assert [r.status for r in responses] == [200, 431]


@async_test
async def test_a_trickled_body_is_refused_and_never_holds_an_upstream_connection() -> None:
    """Finding 7: each byte of a slow body counted as activity, so trickling clients held
    upstream connections indefinitely; a thousand of them exhausted the pool."""
    async with recording_upstream() as upstream:
        async with limited(
            upstream.port,
            client_body_min_rate_bytes_per_s=100,
            client_body_min_rate_grace_ms=300,
        ) as stack:
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            writer.write(b"POST /slow HTTP/1.1\r\nHost: a\r\ncontent-length: 100000\r\n\r\n")
            pool = stack.gateway.registry.pools["model-a"]
            opened_while_trickling = 0

            async def trickle() -> None:
                nonlocal opened_while_trickling
                for _ in range(100):
                    writer.write(b"x")
                    await writer.drain()
                    opened_while_trickling = max(opened_while_trickling, pool.size)
                    await asyncio.sleep(0.05)  # 20 bytes/s: busy, but far below the minimum

            trickling = asyncio.ensure_future(trickle())
            response = await asyncio.wait_for(read_response(reader), 10)
            trickling.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await trickling
            writer.close()
            assert stack.gateway.counters.client_timeouts == 1
    assert response.status == 408
    assert "client_body_min_rate_bytes_per_s" in orjson.loads(response.body)["detail"]
    assert opened_while_trickling == 0  # the body was being buffered, not streamed upstream
    assert upstream.requests == []


@async_test
async def test_a_large_body_streams_upstream_and_a_small_one_is_buffered_first() -> None:
    async with recording_upstream() as upstream:
        async with limited(upstream.port, request_buffer_bytes=1024) as stack:
            pool = stack.gateway.registry.pools["model-a"]
            sizes = []
            for size in (512, 4096):
                reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
                head = b"POST /b HTTP/1.1\r\nHost: a\r\ncontent-length: %d\r\n\r\n" % size
                writer.write(head + b"y" * (size // 2))
                await writer.drain()
                await asyncio.sleep(0.2)
                sizes.append(pool.size)  # connections taken while half the body is in
                writer.write(b"y" * (size - size // 2))
                response = await read_response(reader)
                assert response.status == 200
                writer.close()
    assert sizes[0] == 0  # 512 bytes fit the buffer: no connection until the body is whole
    assert sizes[1] == 1  # 4096 bytes do not: it streams
    assert [len(r.body) for r in upstream.requests] == [512, 4096]


@async_test
async def test_a_reader_that_stalls_is_cut_and_frees_the_upstream() -> None:
    async with recording_upstream(big_answer(32 * 1024 * 1024)) as upstream:
        async with limited(upstream.port, client_send_timeout_ms=500) as stack:
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            writer.write(GET)
            await writer.drain()
            pool = stack.gateway.registry.pools["model-a"]
            for _ in range(100):
                await asyncio.sleep(0.05)
                if pool.size:
                    break
            assert pool.size == 1
            for _ in range(100):  # never reads: the gateway gives up after the send timeout
                await asyncio.sleep(0.05)
                if not stack.gateway.connections:
                    break
            connections = len(stack.gateway.connections)
            upstream_open = pool.size
            writer.transport.abort()
            assert stack.gateway.counters.client_timeouts == 1
    assert connections == 0
    assert upstream_open == 0


@async_test
async def test_requests_queued_for_a_saturated_upstream_time_out_with_503() -> None:
    config = simple_config()
    config["upstreams"]["model-a"] = {"url": "x", "max_connections": 1, "queue_timeout_ms": 200}
    mocks = {"model-a": MockSettings(name="slow", latency_ms=1500)}
    async with gateway_stack(config, mocks) as stack:
        results = await asyncio.gather(*(raw_exchange(stack.port, GET) for _ in range(3)))
        assert stack.gateway.counters.upstream_errors["queue_timeout"] == 2
        assert not stack.gateway.registry.pools["model-a"].waiters
    statuses = sorted(r[0].status for r in results)
    assert statuses == [200, 503, 503]
    details = [orjson.loads(r[0].body)["detail"] for r in results if r[0].status == 503]
    assert all("came free within 200 ms" in d for d in details)


@async_test
async def test_dot_segments_and_encoded_dots_cannot_step_around_a_route() -> None:
    config: dict[str, Any] = {
        "upstreams": {"public": {"url": "x"}, "private": {"url": "x"}},
        "routes": [
            {"name": "public", "match": {"path_prefix": "/public"}, "upstream": "public"},
            {"name": "admin", "match": {"path_prefix": "/admin"}, "upstream": "private"},
            {"name": "rest", "match": {"path_prefix": "/"}, "upstream": "public"},
        ],
    }
    async with recording_upstream() as public, recording_upstream() as private:
        ports = {"public": public.port, "private": private.port}
        async with gateway_stack(config, extra_ports=ports) as stack:
            routes = {}
            for path in (
                b"/public/../admin/x",
                b"/public/%2e%2e/admin/x",
                b"/public/%2E./admin/x",
                b"/public/./a",
                b"/%70ublic/a",
            ):
                (response,) = await raw_exchange(
                    stack.port, b"GET " + path + b"?q=1 HTTP/1.1\r\nHost: a\r\n\r\n"
                )
                routes[path] = (response.header("x-modelgate-route"), orjson.loads(response.body))
    assert routes[b"/public/../admin/x"][0] == "admin"
    assert routes[b"/public/%2e%2e/admin/x"][0] == "admin"
    assert routes[b"/public/%2E./admin/x"][0] == "admin"
    assert routes[b"/public/./a"][0] == "public"
    assert routes[b"/%70ublic/a"][0] == "public"
    # The upstream gets the path the route matched, not the one the client wrote.
    assert private.targets() == ["/admin/x?q=1"] * 3
    assert public.targets() == ["/public/a?q=1", "/public/a?q=1"]


@async_test
async def test_a_separated_prefix_matches_only_at_a_segment_boundary() -> None:
    config: dict[str, Any] = {
        "upstreams": {"model": {"url": "x"}, "other": {"url": "x"}},
        "routes": [
            {
                "name": "predict",
                "match": {"path_separated_prefix": "/predict"},
                "upstream": "model",
            },
            {"name": "rest", "match": {"path_prefix": "/"}, "upstream": "other"},
        ],
    }
    async with recording_upstream() as model, recording_upstream() as other:
        ports = {"model": model.port, "other": other.port}
        async with gateway_stack(config, extra_ports=ports) as stack:
            names = []
            for path in (b"/predict", b"/predict/v1", b"/predict?x=1", b"/predictions"):
                (response,) = await raw_exchange(
                    stack.port, b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n"
                )
                names.append(response.header("x-modelgate-route"))
    assert names == ["predict", "predict", "predict", "rest"]


@async_test
async def test_an_http10_client_gets_no_100_continue() -> None:
    async with recording_upstream() as upstream:
        async with limited(upstream.port) as stack:
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            writer.write(
                b"POST /x HTTP/1.0\r\nHost: a\r\nExpect: 100-continue\r\ncontent-length: 2\r\n\r\n"
            )
            await writer.drain()
            early = b""
            with contextlib.suppress(TimeoutError):
                early = await asyncio.wait_for(reader.read(100), 0.3)
            writer.write(b"{}")
            rest = await asyncio.wait_for(reader.read(), 5)
            writer.close()
    assert b"100 Continue" not in early + rest
    assert (early + rest).startswith(b"HTTP/1.1 200")


@async_test
async def test_a_model_fault_on_a_chunked_answer_is_bounded_by_the_hold_limit() -> None:
    """Item 12: a model fault used to buffer a chunked JSON answer whole, without a limit."""
    body = b'{"score": 0.5, "pad": "' + b"p" * 200_000 + b'"}'

    def chunked_json(request: SeenRequest) -> bytes:
        pieces = [body[i : i + 8192] for i in range(0, len(body), 8192)]
        return (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
            + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
            + b"0\r\n\r\n"
        )

    config = simple_config(
        chaos=[{"name": "bias", "model": {"bias": {"pointers": ["/score"], "shift": 1}}}]
    )
    config["limits"] = {"shadow_body_max_bytes": 16 * 1024}
    held_at_release: list[int] = []
    original = Exchange._release_model_hold

    def watched(self: Exchange) -> None:
        held_at_release.append(self.model_held)
        original(self)

    async with recording_upstream(chunked_json) as upstream:
        async with gateway_stack(config, extra_ports={"model-a": upstream.port}) as stack:
            Exchange._release_model_hold = watched  # type: ignore[method-assign]
            try:
                (response,) = await raw_exchange(stack.port, GET)
            finally:
                Exchange._release_model_hold = original  # type: ignore[method-assign]
            snapshot = stack.gateway.chaos.snapshot(
                [(r.name, r.chaos) for r in stack.gateway.plan.routes]
            )
    assert response.status == 200
    assert response.body == body  # passed through whole, unfaulted
    assert response.header("transfer-encoding") == "chunked"
    (rule,) = snapshot
    assert rule["counts"].get("skipped_too_large") == 1
    (held,) = held_at_release  # let go once, as soon as it passed the limit
    assert 16 * 1024 < held <= 16 * 1024 + 65536
