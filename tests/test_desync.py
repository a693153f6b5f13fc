"""Request smuggling and response desync: raw clients and misbehaving upstreams, with what
the upstream receives checked byte for byte by an independent parser (h11), and the next
client on a pooled connection checked to be served as itself."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson

from .support import async_test, gateway_stack, is_closed, read_response, simple_config
from .wire import RecordingUpstream, SeenRequest, echo_response, recording_upstream


def one_connection_config(**limits: Any) -> dict[str, Any]:
    """A single pooled upstream connection, so every request reuses the previous one's."""
    config = simple_config()
    config["upstreams"]["model-a"] = {"url": "x", "max_connections": 1, "max_idle": 1}
    if limits:
        config["limits"] = limits
    return config


def pooled_stack(upstream: RecordingUpstream, **limits: Any) -> Any:
    """A gateway in front of `upstream` through a single pooled connection."""
    return gateway_stack(one_connection_config(**limits), extra_ports={"model-a": upstream.port})


async def send(port: int, data: bytes, count: int = 1) -> list[Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return [await read_response(reader) for _ in range(count)]
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def smuggling_request(path: bytes, body: bytes) -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: a\r\ncontent-type: text/plain\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )


SMUGGLED = (
    b"GET /smuggled HTTP/1.1\r\nHost: a\r\nx-modelgate-variant: ranker=candidate\r\n"
    b"x-forwarded-for: 10.6.6.6\r\nx-modelgate-shadow: 1\r\ncontent-length: 0\r\n\r\n"
)


def assert_upstream_saw_only(upstream: RecordingUpstream, served: dict[str, bytes]) -> None:
    """The upstream parsed exactly the requests the gateway answered for, each with its own
    body, and nothing else: no phantom request, no protocol error."""
    assert upstream.errors == [], upstream.errors
    seen = {r.header("x-request-id"): r for r in upstream.requests}
    assert len(seen) == len(upstream.requests), [r.target for r in upstream.requests]
    assert set(seen) == set(served), (sorted(map(str, seen)), sorted(served))
    for request_id, body in served.items():
        assert seen[request_id].body == body, request_id
    assert "/smuggled" not in upstream.targets()


@async_test
async def test_an_upgrade_request_with_a_body_cannot_smuggle_into_the_next_client() -> None:
    """Finding 1: llhttp ends an Upgrade request at its head; the gateway used to forward
    `content-length: N` without the bytes and pool the connection, so the upstream took the
    next client's head as that body and read the rest as a request of the attacker's."""
    served: dict[str, bytes] = {}
    async with recording_upstream(answer_before_body=True) as upstream:
        async with pooled_stack(upstream) as stack:
            victim_body = b"padding" + SMUGGLED
            victim = smuggling_request(b"/victim", victim_body)
            # The attacker's declared length swallows the gateway's head of the next request.
            for length in (40, 120, 180):
                body = b"A" * length
                attack = (
                    b"POST /attack HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
                    b"content-length: %d\r\n\r\n%s" % (length, body)
                )
                (first,) = await send(stack.port, attack)
                (second,) = await send(stack.port, victim)
                assert second.status == 200
                mine = orjson.loads(second.body)
                assert mine["target"] == "/victim"
                assert mine["request_id"] == second.header("x-request-id")
                served[str(second.header("x-request-id"))] = victim_body
                if first.status == 200:  # served with its body, as the headers frame it
                    served[str(first.header("x-request-id"))] = body
                else:
                    assert first.status == 400
    assert_upstream_saw_only(upstream, served)
    assert upstream.targets().count("/victim") == 3


@async_test
async def test_an_upgrade_request_with_a_chunked_body_is_framed_or_refused() -> None:
    async with recording_upstream(answer_before_body=True) as upstream:
        async with pooled_stack(upstream) as stack:
            attack = (
                b"POST /attack HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
                b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
            )
            (first,) = await send(stack.port, attack)
            (second,) = await send(stack.port, smuggling_request(b"/victim", b"{}"))
    assert first.status in (200, 400)
    assert second.status == 200
    assert orjson.loads(second.body)["target"] == "/victim"
    assert "/smuggled" not in upstream.targets()
    assert upstream.errors == []
    for request in upstream.requests:
        if request.target == "/attack":
            assert request.body == SMUGGLED  # the chunked body, de-chunked and whole


@async_test
async def test_a_body_less_upgrade_is_served_plain_and_the_rest_is_not_parsed() -> None:
    """Bytes after an Upgrade request belong to the protocol the client asked for: never
    parsed as HTTP requests, never forwarded."""
    async with recording_upstream() as upstream:
        async with pooled_stack(upstream) as stack:
            data = b"GET /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n"
            data += SMUGGLED
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            writer.write(data)
            response = await read_response(reader)
            assert await is_closed(reader)
            writer.close()
    assert response.status == 200
    assert upstream.targets() == ["/up"]


@async_test
async def test_an_upstream_that_answers_twice_cannot_reach_the_next_client() -> None:
    """Finding 8: a second response after a complete one used to reach the client as a
    phantom response, and the next client on the pooled connection got stray bytes."""

    def twice(request: SeenRequest) -> bytes:
        return echo_response(request) + b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nphantom"

    async with recording_upstream(twice) as upstream:
        async with pooled_stack(upstream) as stack:
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            bodies = []
            for path in (b"/one", b"/two", b"/three"):
                writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
                response = await read_response(reader)
                assert response.status == 200
                bodies.append(orjson.loads(response.body)["target"])
            writer.close()
            assert stack.gateway.counters.upstream_errors["extra_bytes"] == 3
            connects = stack.gateway.registry.pools["model-a"].connects
    assert bodies == ["/one", "/two", "/three"]
    assert connects == 3  # each tainted connection was discarded, never pooled


@async_test
async def test_bytes_from_an_idle_upstream_connection_discard_it() -> None:
    def late(request: SeenRequest) -> bytes:
        return echo_response(request)

    async with recording_upstream(late) as upstream:
        async with pooled_stack(upstream) as stack:
            (first,) = await send(stack.port, b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
            pool = stack.gateway.registry.pools["model-a"]
            (conn,) = pool.idle
            assert conn.transport is not None
            conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstray")
            (second,) = await send(stack.port, b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n")
            assert stack.gateway.counters.upstream_errors["extra_bytes"] == 1
    assert orjson.loads(second.body)["target"] == "/two"


@async_test
async def test_an_upstream_101_is_a_502_not_a_crash() -> None:
    def switching(request: SeenRequest) -> bytes:
        return b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x\r\n\r\nraw"

    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
    async with recording_upstream(switching) as upstream:
        async with gateway_stack(simple_config(), extra_ports={"model-a": upstream.port}) as stack:
            (response,) = await send(stack.port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            assert stack.gateway.counters.upstream_errors["bad_response"] == 1
    assert response.status == 502
    assert orjson.loads(response.body)["error"] == "upstream_broken"
    assert errors == []


@async_test
async def test_an_oversized_upstream_head_is_a_502() -> None:
    def huge(request: SeenRequest) -> bytes:
        pad = b"x-pad: " + b"p" * 200_000 + b"\r\n"
        return b"HTTP/1.1 200 OK\r\n" + pad + b"content-length: 0\r\n\r\n"

    async with recording_upstream(huge) as upstream:
        async with pooled_stack(upstream, max_upstream_header_bytes=4096) as stack:
            (response,) = await send(stack.port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            assert stack.gateway.counters.upstream_errors["bad_response"] == 1
    assert response.status == 502
    assert "header" in orjson.loads(response.body)["detail"]


@async_test
async def test_upstream_trailers_are_bounded_and_never_forwarded() -> None:
    def with_trailers(size: int) -> Any:
        def respond(request: SeenRequest) -> bytes:
            return (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
                b"x-trailer: " + b"t" * size + b"\r\n\r\n"
            )

        return respond

    async with recording_upstream(with_trailers(100)) as upstream:
        async with pooled_stack(upstream) as stack:
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            raw = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
            writer.close()
    assert raw.endswith(b"2\r\nok\r\n0\r\n\r\n")
    assert b"x-trailer" not in raw

    async with recording_upstream(with_trailers(50_000)) as upstream:
        async with pooled_stack(upstream, max_upstream_header_bytes=4096) as stack:
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 5)  # cut: the body had begun
            writer.close()
            assert stack.gateway.counters.upstream_errors["bad_response"] == 1
    assert not data.endswith(b"0\r\n\r\n")


@async_test
async def test_request_trailers_never_become_headers() -> None:
    """Finding 3: on routes whose upstream head is built after the body (a `json:` unit),
    trailers used to be promoted to headers after routing, including an unchecked Host."""
    config = simple_config(unit=["json:user", "header:x-user-id"])
    config["routes"][0]["experiment"] = {
        "name": "ranker",
        "variants": [
            {"name": "control", "upstream": "model-a", "weight": 100},
            {"name": "candidate", "upstream": "model-a", "weight": 0},
        ],
    }
    del config["routes"][0]["upstream"]
    body = b'{"user": "alice"}'
    request = (
        b"POST /predict HTTP/1.1\r\nHost: real.example\r\ntransfer-encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n"
        % (len(body), body)
        + b"Host: evil.example\r\nx-modelgate-variant: ranker=candidate\r\n"
        b"x-user-id: mallory\r\nx-forwarded-for: 10.6.6.6\r\nx-extra: 1\r\n\r\n"
    )
    async with recording_upstream() as upstream:
        async with gateway_stack(config, extra_ports={"model-a": upstream.port}) as stack:
            (response,) = await send(stack.port, request)
    assert response.status == 200
    assert response.header("x-modelgate-variant") == "ranker=control"
    (seen,) = upstream.requests
    assert seen.body == body
    assert seen.header("x-forwarded-host") == "real.example"
    assert seen.header_all("x-modelgate-variant") == ["ranker=control"]
    assert seen.header("x-extra") is None and seen.header("x-user-id") is None
    assert "10.6.6.6" not in (seen.header("x-forwarded-for") or "")


@async_test
async def test_request_trailers_count_against_the_header_limit() -> None:
    config = one_connection_config(max_header_bytes=4096)
    request = (
        b"POST /x HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n"
        + b"".join(b"x-t%d: %s\r\n" % (i, b"v" * 100) for i in range(200))
        + b"\r\n"
    )
    async with recording_upstream() as upstream:
        async with gateway_stack(config, extra_ports={"model-a": upstream.port}) as stack:
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            writer.write(request)
            response = await read_response(reader)
            assert await is_closed(reader)
            writer.close()
    assert response.status == 431
    # Nothing of a request whose framing was refused was completed upstream.
    assert all(r.body != b"hi" for r in upstream.requests) or upstream.errors == []


@async_test
async def test_transfer_codings_other_than_chunked_are_refused() -> None:
    async with recording_upstream() as upstream:
        async with gateway_stack(simple_config(), extra_ports={"model-a": upstream.port}) as stack:
            responses = []
            for coding in (b"gzip, chunked", b"deflate,chunked", b"identity, chunked"):
                (response,) = await send(
                    stack.port,
                    b"POST /x HTTP/1.1\r\nHost: a\r\ntransfer-encoding: "
                    + coding
                    + b"\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
                )
                responses.append(response.status)
    assert responses == [501, 501, 501]
    assert upstream.requests == []


@async_test
async def test_a_post_is_not_replayed_when_it_may_have_reached_the_model() -> None:
    """Item 12: a POST used to be sent again, up to twice, when a reused connection died
    before its answer, though the model may have acted on it."""
    seen: list[str] = []

    async def upstream_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            method = head.split(b" ", 1)[0].decode()
            seen.append(method)
            if len(seen) == 1:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
                continue
            # Reads the request, then dies without a word: the model may have acted.
            await reader.read(2)
            writer.transport.abort()
            return

    server = await asyncio.start_server(upstream_handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with gateway_stack(one_connection_config(), extra_ports={"model-a": port}) as stack:
            (first,) = await send(stack.port, b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
            (second,) = await send(
                stack.port, b"POST /x HTTP/1.1\r\nHost: a\r\ncontent-length: 2\r\n\r\n{}"
            )
    finally:
        server.close()
        await server.wait_closed()
    assert first.status == 200
    assert second.status == 502
    assert seen == ["GET", "POST"]  # sent once, never replayed


@async_test
async def test_a_connection_paused_for_a_slow_client_reads_again_once_pooled() -> None:
    """A client that stalls pauses its upstream's reading; when that exchange ended while
    paused, the connection went back to the pool unable to read its next answer (a 504)."""
    async with recording_upstream() as upstream:
        async with pooled_stack(upstream) as stack:
            (first,) = await send(stack.port, b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
            pool = stack.gateway.registry.pools["model-a"]
            conn = pool.idle.pop()
            conn.pause_reading()  # as a slow client's pause_writing does
            pool.release(conn)
            (second,) = await send(stack.port, b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n")
    assert second.status == 200
    assert orjson.loads(second.body)["target"] == "/two"


@async_test
async def test_a_shadow_copy_carries_no_trailer_of_the_request() -> None:
    """Finding 3: every shadow copy's head is built after the body, so trailers used to
    arrive there as headers (and a forged Host as x-forwarded-host)."""
    config = simple_config()
    config["upstreams"]["model-c"] = {"url": "x"}
    config["routes"][0]["shadows"] = [{"upstream": "model-c"}]
    body = b'{"x": 1}'
    request = (
        b"POST /predict HTTP/1.1\r\nHost: real.example\r\ntransfer-encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n"
        % (len(body), body)
        + b"Host: evil.example\r\nx-extra: 1\r\nx-modelgate-shadow: 0\r\n\r\n"
    )
    async with recording_upstream() as primary, recording_upstream() as shadow:
        ports = {"model-a": primary.port, "model-c": shadow.port}
        async with gateway_stack(config, extra_ports=ports) as stack:
            (response,) = await send(stack.port, request)
            for _ in range(100):
                if shadow.requests and not stack.gateway.shadows.calls:
                    break
                await asyncio.sleep(0.02)
    assert response.status == 200
    for seen in (*primary.requests, *shadow.requests):
        assert seen.body == body
        assert seen.header("x-forwarded-host") == "real.example"
        assert seen.header("x-extra") is None
    (copy,) = shadow.requests
    assert copy.header_all("x-modelgate-shadow") == ["1"]
