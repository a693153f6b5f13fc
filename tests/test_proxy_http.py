"""HTTP/1.1 correctness of the proxy over real sockets: headers, framing, streaming, reuse."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from typing import Any

import aiohttp
import orjson
import pytest

from modelgate.mock.server import MockSettings

from .support import (
    RawResponse,
    ab_config,
    async_test,
    gateway_stack,
    is_closed,
    raw_exchange,
    raw_upstream,
    read_request_head,
    read_response,
    simple_config,
)

MOCKS = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}


def echo(response: RawResponse) -> dict[str, Any]:
    document: dict[str, Any] = orjson.loads(response.body)
    return document


@async_test
async def test_header_hygiene_both_ways() -> None:
    request = (
        b"POST /_echo/predict HTTP/1.1\r\n"
        b"Host: gateway.example:8080\r\n"
        b"X-User-Id: alice\r\n"
        b"Connection: keep-alive, X-Secret-Hop\r\n"
        b"X-Secret-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Upgrade-Insecure-Requests: 1\r\n"
        b"Proxy-Authorization: Basic eA==\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\n"
        b"X-Modelgate-Variant: ranker=forged\r\n"
        b"X-Modelgate-Shadow: 1\r\n"
        b"X-Request-Id: req-123\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    config = ab_config()
    config["routes"][0]["match"]["path_prefix"] = "/_echo"
    async with gateway_stack(config, MOCKS) as stack:
        (response,) = await raw_exchange(stack.port, request)
    assert response.status == 200
    seen = echo(response)["headers"]
    assert "x-secret-hop" not in seen and "keep-alive" not in seen and "te" not in seen
    assert "proxy-authorization" not in seen and "connection" not in seen
    assert seen["upgrade-insecure-requests"] == "1"  # not hop-by-hop, despite the name
    assert seen["x-request-id"] == "req-123"
    assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "gateway.example:8080"
    assert seen["x-modelgate-variant"] in ("ranker=control", "ranker=candidate")
    assert "x-modelgate-shadow" not in seen
    assert response.header("x-request-id") == "req-123"
    assert response.header("x-modelgate-route") == "predict"
    assert response.header("x-modelgate-variant") == seen["x-modelgate-variant"]


@async_test
async def test_response_hop_by_hop_headers_are_removed() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: secret\r\n"
            b"Keep-Alive: timeout=3\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok"
        )
        await writer.drain()
        await reader.read()

    async with raw_upstream(upstream) as port:
        async with gateway_stack(simple_config(), extra_ports={"model-a": port}) as stack:
            (response,) = await raw_exchange(stack.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.body == b"ok"
    assert response.header("x-internal") is None and response.header("keep-alive") is None
    assert response.header("x-kept") == "yes"
    assert response.header("x-request-id")


@async_test
async def test_request_id_generated_when_absent_or_invalid() -> None:
    async with gateway_stack(simple_config(), MOCKS) as stack:
        (first, second) = await raw_exchange(
            stack.port,
            b"GET /_echo HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /_echo HTTP/1.1\r\nHost: a\r\nX-Request-Id: bad id with spaces\r\n\r\n",
            count=2,
        )
    for response in (first, second):
        rid = response.header("x-request-id")
        assert rid and " " not in rid
        assert echo(response)["headers"]["x-request-id"] == rid  # the upstream saw the same
    assert first.header("x-request-id") != second.header("x-request-id")


@async_test
async def test_large_and_chunked_bodies_arrive_intact() -> None:
    payload = os.urandom(10 * 1024 * 1024)
    async with gateway_stack(simple_config(), MOCKS) as stack, aiohttp.ClientSession() as session:
        async with session.post(stack.url + "/_echo", data=io.BytesIO(payload)) as response:
            seen = await response.json()
        assert seen["body_len"] == len(payload)
        assert seen["body_sha256"] == hashlib.sha256(payload).hexdigest()
        assert seen["headers"]["content-length"] == str(len(payload))

        async def chunks() -> Any:
            for i in range(0, len(payload), 300_000):
                yield payload[i : i + 300_000]

        async with session.post(stack.url + "/_echo", data=chunks()) as response:
            seen = await response.json()
        assert seen["body_sha256"] == hashlib.sha256(payload).hexdigest()
        assert seen["headers"]["transfer-encoding"] == "chunked"


@async_test
async def test_body_over_the_limit_is_413() -> None:
    config = simple_config()
    config["limits"] = {"max_body_bytes": 1000}
    async with gateway_stack(config, MOCKS) as stack, aiohttp.ClientSession() as session:
        async with session.post(stack.url + "/x", data=b"x" * 1001) as response:
            assert response.status == 413
            assert (await response.json())["error"] == "body_too_large"

        async def chunks() -> Any:
            for _ in range(5):
                yield b"y" * 400

        async with session.post(stack.url + "/x", data=chunks()) as response:
            assert response.status == 413
        async with session.post(stack.url + "/x", data=b"x" * 1000) as response:
            assert response.status == 200


@async_test
async def test_streamed_responses_arrive_incrementally() -> None:
    mocks = {"model-a": MockSettings(name="s", stream="sse", chunks=5, chunk_delay_ms=150)}
    async with gateway_stack(simple_config(), mocks) as stack, aiohttp.ClientSession() as session:
        loop = asyncio.get_running_loop()
        async with session.post(stack.url + "/generate", json={"p": 1}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            arrivals = []
            async for line in response.content:
                if line.startswith(b"data:"):
                    arrivals.append(loop.time())
    assert len(arrivals) >= 5
    # Events were spaced ~150 ms apart upstream; buffered proxies deliver them all at once.
    assert arrivals[-1] - arrivals[0] > 0.3


@async_test
async def test_keep_alive_reused_on_both_sides() -> None:
    async with gateway_stack(simple_config(), MOCKS) as stack:
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
        for _ in range(20):
            writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            response = await read_response(reader)
            assert response.status == 200
        writer.close()
        stats = stack.gateway.registry.pools["model-a"].stats()
    assert stats["connects"] == 1  # twenty requests, one upstream connection


@async_test
async def test_pipelined_requests_answered_in_order() -> None:
    requests = (
        b"".join(b"GET /_echo/%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(10))
        + b"POST /_echo/body HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    )
    async with gateway_stack(simple_config(), MOCKS) as stack:
        responses = await raw_exchange(stack.port, requests, count=11)
    assert [echo(r)["path"] for r in responses] == [f"/_echo/{i}" for i in range(10)] + [
        "/_echo/body"
    ]
    assert echo(responses[-1])["body_len"] == 5


@async_test
async def test_head_204_304_have_no_body() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request_head(reader)
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            elif b"/204" in head:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            else:
                writer.write(b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n')
            await writer.drain()

    async with raw_upstream(upstream) as port:
        async with gateway_stack(simple_config(), extra_ports={"model-a": port}) as stack:
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            writer.write(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
            head = await read_response(reader, head=True)
            writer.write(b"GET /204 HTTP/1.1\r\nHost: a\r\n\r\n")
            no_content = await read_response(reader)
            writer.write(b"GET /304 HTTP/1.1\r\nHost: a\r\n\r\n")
            not_modified = await read_response(reader)
            writer.write(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")  # the connection still works
            again = await read_response(reader, head=True)
            writer.close()
    assert head.status == 200 and head.header("content-length") == "1234"
    assert no_content.status == 204 and no_content.header("transfer-encoding") is None
    assert not_modified.status == 304 and not_modified.header("etag") == '"x"'
    assert again.status == 200


@async_test
async def test_expect_100_continue() -> None:
    async with gateway_stack(simple_config(), MOCKS) as stack:
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
        writer.write(
            b"POST /_echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        interim = await read_response(reader)
        assert interim.status == 100
        writer.write(b"data")
        final = await read_response(reader)
        writer.close()
    assert final.status == 200
    assert echo(final)["body_len"] == 4
    assert "expect" not in echo(final)["headers"]


@async_test
async def test_http10_client_gets_a_close_delimited_or_sized_response() -> None:
    async with gateway_stack(simple_config(), MOCKS) as stack:
        (response,) = await raw_exchange(stack.port, b"GET /x HTTP/1.0\r\n\r\n")
    assert response.status == 200
    assert response.header("transfer-encoding") is None
    assert orjson.loads(response.body)["model"] == "model-a"


BAD_REQUESTS = {
    "content-length and transfer-encoding": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n"
    ),
    "whitespace before colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
    "missing host": b"GET / HTTP/1.1\r\n\r\n",
    "two hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "invalid host": b"GET / HTTP/1.1\r\nHost: a b/c\r\n\r\n",
    "bad version 2.0": b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    "bad version 1.2": b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
    "bad version 0.9": b"GET / HTTP/0.9\r\nHost: a\r\n\r\n",
    "invalid header name": b"GET / HTTP/1.1\r\nHost: a\r\nX(A: b\r\n\r\n",
    "invalid content-length": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    "two content-lengths": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
    ),
    "bad chunk size": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
    ),
    "unknown transfer-encoding": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    "transfer-encoding in http/1.0": (
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "bare LF line endings": b"GET / HTTP/1.1\nHost: a\n\n",
    "NUL in a header value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n",
    "space in the target": b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_front_door_rejects_ambiguous_requests(name: str) -> None:
    hits_before = 0

    @async_test
    async def run() -> None:
        async with gateway_stack(simple_config(), MOCKS) as stack:
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            writer.write(BAD_REQUESTS[name])
            response = await read_response(reader)
            closed = await is_closed(reader)
            writer.close()
            forwarded = sum(p.stats()["connects"] for p in stack.gateway.registry.pools.values())
        assert response.status == 400, response
        assert orjson.loads(response.body)["error"] == "bad_request"
        assert closed
        assert forwarded == hits_before  # nothing reached an upstream

    run()


@async_test
async def test_connect_and_upgrade_are_not_tunnelled() -> None:
    async with gateway_stack(simple_config(), MOCKS) as stack:
        (connect,) = await raw_exchange(
            stack.port, b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"
        )
        (upgrade,) = await raw_exchange(
            stack.port,
            b"GET /_echo HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
        )
    assert connect.status == 405
    assert upgrade.status == 200  # served as plain HTTP/1.1, the upgrade dropped
    seen = echo(upgrade)["headers"]
    assert "upgrade" not in seen and "http2-settings" not in seen
    assert upgrade.header("connection") == "close"
