"""Upstream and client failures: each gets the right status and JSON, and frees what it held."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson

from modelgate.mock.server import MockSettings

from .support import (
    async_test,
    gateway_stack,
    is_closed,
    raw_exchange,
    raw_upstream,
    read_request_head,
    read_response,
    simple_config,
)

GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def error_of(body: bytes) -> dict[str, Any]:
    document: dict[str, Any] = orjson.loads(body)
    assert set(document) == {"error", "detail", "request_id"}
    return document


@async_test
async def test_upstream_refused_is_502() -> None:
    async with gateway_stack(simple_config(), extra_ports={"model-a": free_port()}) as stack:
        (response,) = await raw_exchange(stack.port, GET)
    assert response.status == 502
    body = error_of(response.body)
    assert body["error"] == "upstream_unreachable"
    assert body["request_id"] == response.header("x-request-id")


@async_test
async def test_upstream_slower_than_timeout_is_504() -> None:
    config = simple_config()
    config["upstreams"]["model-a"] = {"url": "x", "timeout_ms": 200}
    mocks = {"model-a": MockSettings(name="slow", latency_ms=2000)}
    async with gateway_stack(config, mocks) as stack:
        (response,) = await raw_exchange(stack.port, GET)
        assert stack.gateway.counters.upstream_errors["timeout"] == 1
    assert response.status == 504
    assert error_of(response.body)["error"] == "upstream_timeout"


@async_test
async def test_malformed_upstream_response_is_502() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\nhello")
        await writer.drain()
        await reader.read()

    async with raw_upstream(upstream) as port:
        async with gateway_stack(simple_config(), extra_ports={"model-a": port}) as stack:
            (response,) = await raw_exchange(stack.port, GET)
    assert response.status == 502
    assert error_of(response.body)["error"] == "upstream_broken"


@async_test
async def test_upstream_closing_without_answer_is_502() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        transport = writer.transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        transport.abort()  # RST

    async with raw_upstream(upstream) as port:
        async with gateway_stack(simple_config(), extra_ports={"model-a": port}) as stack:
            (response,) = await raw_exchange(stack.port, GET)
    assert response.status == 502
    assert error_of(response.body)["error"] == "upstream_broken"


@async_test
async def test_upstream_reset_mid_response_cuts_the_client() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    async with raw_upstream(upstream) as port:
        async with gateway_stack(simple_config(), extra_ports={"model-a": port}) as stack:
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            writer.write(GET)
            status_line = await reader.readline()
            assert status_line.startswith(b"HTTP/1.1 200")
            # The client must see a short body and a closed connection, never a clean end.
            data = b""
            try:
                async with asyncio.timeout(5):
                    while chunk := await reader.read(65536):
                        data += chunk
            except ConnectionError:
                pass
            writer.close()
            assert stack.gateway.counters.upstream_errors["reset"] == 1
    assert len(data) < 100000


@async_test
async def test_stale_keep_alive_connection_is_replayed_not_failed() -> None:
    """The upstream closes idle connections after each response; the gateway must never
    hand a request to one of those and fail it."""
    served = 0

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await read_request_head(reader)
        served += 1
        # Claims keep-alive, then closes right after: the classic reuse race.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.01)

    async with raw_upstream(upstream) as port:
        async with gateway_stack(simple_config(), extra_ports={"model-a": port}) as stack:
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            statuses = []
            for _ in range(10):
                writer.write(GET)
                statuses.append((await read_response(reader)).status)
                await asyncio.sleep(0.03)  # the upstream's close lands while the conn is idle
            for _ in range(10):
                writer.write(GET)  # back to back: some closes are still in flight
                statuses.append((await read_response(reader)).status)
            writer.close()
    assert statuses == [200] * 20
    assert served == 20


@async_test
async def test_client_disconnect_frees_the_upstream_connection() -> None:
    config = simple_config()
    config["upstreams"]["model-a"] = {"url": "x", "max_connections": 1}
    mocks = {"model-a": MockSettings(name="slow", latency_ms=300)}
    async with gateway_stack(config, mocks) as stack:
        pool = stack.gateway.registry.pools["model-a"]
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            writer.write(GET)
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.transport.abort()
            await asyncio.sleep(0.05)
            assert pool.size == 0  # the half-done upstream exchange was aborted, not leaked
        (response,) = await raw_exchange(stack.port, GET)
        assert response.status == 200
        assert stack.gateway.counters.client_aborts == 3


@async_test
async def test_pool_saturation_queues_then_answers_503() -> None:
    config = simple_config()
    config["upstreams"]["model-a"] = {"url": "x", "max_connections": 1}
    mocks = {"model-a": MockSettings(name="slow", latency_ms=200)}
    async with gateway_stack(config, mocks) as stack:
        pool = stack.gateway.registry.pools["model-a"]
        pool.max_waiters = 2
        results = await asyncio.gather(*(raw_exchange(stack.port, GET) for _ in range(5)))
    statuses = sorted(r[0].status for r in results)
    assert statuses == [200, 200, 200, 503, 503]


@async_test
async def test_slow_client_headers_time_out_with_408() -> None:
    config = simple_config()
    config["limits"] = {"client_header_timeout_ms": 300}
    async with gateway_stack(config, {"model-a": MockSettings()}) as stack:
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n")  # never finishes the head
        response = await read_response(reader)
        assert response.status == 408
        assert await is_closed(reader)
        writer.close()


@async_test
async def test_oversized_headers_are_431() -> None:
    config = simple_config()
    config["limits"] = {"max_header_bytes": 2048}
    async with gateway_stack(config, {"model-a": MockSettings()}) as stack:
        big = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
        (response,) = await raw_exchange(stack.port, big)
    assert response.status == 431


@async_test
async def test_connections_beyond_max_connections_get_503() -> None:
    config = simple_config()
    config["limits"] = {"max_connections": 2}
    async with gateway_stack(config, {"model-a": MockSettings()}) as stack:
        held = [await asyncio.open_connection("127.0.0.1", stack.port) for _ in range(2)]
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
        response = await read_response(reader)
        assert response.status == 503
        assert error_of(response.body)["error"] == "too_many_connections"
        assert await is_closed(reader)
        writer.close()
        for _, held_writer in held:
            held_writer.close()
        await asyncio.sleep(0.05)
        (after,) = await raw_exchange(stack.port, GET)  # capacity is back
        assert after.status == 200
        assert stack.gateway.counters.rejected_connections == 1
