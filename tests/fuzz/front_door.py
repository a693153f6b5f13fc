"""The front-door fuzz harness: arbitrary bytes into one client connection of a real Gateway,
with in-memory transports on both sides, so an input runs in microseconds and a finding
replays exactly. What each input must satisfy:

- nothing raises out of a callback (the loop's exception handler sees nothing);
- the upstream never sees a request the gateway did not parse as one: every byte written
  to an upstream parses with h11 (an HTTP/1.1 parser independent of llhttp) into requests
  that are each one the gateway parsed and started, once per upstream role (primary or
  shadow copy, marked as such), carrying the very body bytes the gateway parsed for it;
- nothing leaks: once the client is gone and the answers are in, no exchange is in flight,
  no upstream connection is busy, no request waits in a pool.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h11
import uvloop

from modelgate.config import validate_config
from modelgate.connection import ClientConnection
from modelgate.exchange import Exchange
from modelgate.plan import compile_plan
from modelgate.server import Gateway
from modelgate.upstream import ResponseSink, UpstreamConnection, UpstreamPool

__all__ = ["CONFIG", "SEEDS", "FrontDoor", "check_input"]

_LOG_DIR = tempfile.mkdtemp(prefix="modelgate-fuzz-")
atexit.register(shutil.rmtree, _LOG_DIR, True)

CONFIG: dict[str, Any] = {
    "listen": "127.0.0.1:0",
    "admin": "127.0.0.1:0",
    "log_dir": _LOG_DIR,
    "limits": {"max_header_bytes": 4096, "max_body_bytes": 65536, "request_buffer_bytes": 512},
    "upstreams": {
        "model-a": {"url": "http://127.0.0.1:9001"},
        "model-b": {"url": "http://127.0.0.1:9002/v1"},
        "model-c": {"url": "http://127.0.0.1:9003"},
    },
    "routes": [
        {
            "name": "predict",
            "match": {"path_prefix": "/predict"},
            "unit": ["header:x-user-id", "json:user", "cookie:uid"],
            "experiment": {
                "name": "ranker",
                "variants": [
                    {"name": "control", "upstream": "model-a", "weight": 50},
                    {"name": "candidate", "upstream": "model-b", "weight": 50},
                ],
            },
            "shadows": [{"upstream": "model-c"}],
        },
        {"name": "default", "match": {"path_prefix": "/"}, "upstream": "model-a"},
    ],
}

SEEDS: list[bytes] = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: a\r\nx-user-id: u1\r\ncontent-length: 2\r\n\r\n{}",
    b'POST /predict HTTP/1.1\r\nHost: a\r\ncontent-length: 13\r\n\r\n{"user":"u2"}',
    b"POST /predict HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\n\r\n"
    b"4\r\nabcd\r\n0\r\nx-t: 1\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
    b"content-length: 5\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\ncontent-length: 3\r\n\r\nabc",
    b"POST /_modelgate/feedback HTTP/1.1\r\nHost: a\r\ncontent-length: 2\r\n\r\n[]",
    b"GET /public/%2e%2e/predict HTTP/1.0\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: a\r\nConnection: close, x-drop\r\nx-drop: 1\r\n\r\n",
]

_ANSWER = (
    b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'
)
_HEAD_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n"
_ROUNDS = 12  # loop iterations given to callbacks after each step
SHADOW_UPSTREAM = "model-c"


class FuzzFailure(AssertionError):
    """An input broke one of the harness's properties."""


class _ClientTransport:
    """What the gateway writes to the client, and whether it would read more."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: ClientConnection) -> None:
        self.loop = loop
        self.protocol = protocol
        self.out = bytearray()
        self.reading = True
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out += data

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            self.out += part

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self._lose()

    def abort(self) -> None:
        self._lose()

    def _lose(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)


@dataclass
class _Upstream:
    """One in-memory upstream connection: parses what it is sent with h11 and answers each
    request, once it is complete or (`early`, as many servers do) as soon as its head is in."""

    loop: asyncio.AbstractEventLoop
    protocol: UpstreamConnection
    early: bool = False
    sent: bytearray = field(default_factory=bytearray)
    parsed: list[tuple[bytes, bytes, int]] = field(default_factory=list)  # (id, body, shadow marks)
    partial: bytes | None = None  # the request id of a request whose body is incomplete
    closing: bool = False
    error: str = ""
    _parser: h11.Connection = field(default_factory=lambda: h11.Connection(h11.SERVER))
    _body: bytearray = field(default_factory=bytearray)
    _head_request: bool = False
    _marks: int = 0

    def write(self, data: bytes) -> None:
        if self.closing:
            return
        self.sent += data
        if self.error:
            return
        self._parser.receive_data(bytes(data))
        while True:
            try:
                event = self._parser.next_event()
            except h11.RemoteProtocolError as exc:
                self.error = f"upstream could not parse what the gateway sent: {exc}"
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._body = bytearray()
                self.partial = dict(event.headers).get(b"x-request-id", b"?")
                self._head_request = event.method == b"HEAD"
                self._marks = sum(name == b"x-modelgate-shadow" for name, _ in event.headers)
                if self.early:
                    self.loop.call_soon(self._answer, self._answer_for_head())
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert self.partial is not None
                self.parsed.append((self.partial, bytes(self._body), self._marks))
                self.partial = None
                if not self.early:
                    self.loop.call_soon(self._answer, self._answer_for_head())
                leftover, _ = self._parser.trailing_data
                self._parser = h11.Connection(h11.SERVER)
                if leftover:
                    self._parser.receive_data(bytes(leftover))

    def _answer_for_head(self) -> bytes:
        return _HEAD_ANSWER if self._head_request else _ANSWER

    def _answer(self, answer: bytes) -> None:
        if not self.closing:
            self.protocol.data_received(answer)

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            self.write(part)

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        self._lose()

    def abort(self) -> None:
        self._lose()

    def _lose(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)


class FrontDoor:
    """A Gateway whose upstream connections are in memory; `run(chunks)` sends one client's
    bytes (as separate reads), then checks the properties."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.loop = uvloop.new_event_loop()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _, context: self.errors.append(context))
        self.upstreams: list[_Upstream] = []
        self.early = False  # upstreams answer at the head, before reading the body
        # Keyed by the objects, which stay alive for the input (an id() could be reused).
        self.started: dict[bytes, Exchange] = {}  # request id -> the exchange started
        self.bodies: dict[Exchange, bytearray] = {}  # exchange -> the body bytes it parsed
        plan = compile_plan(validate_config(CONFIG if config is None else config))
        self.gateway = self.loop.run_until_complete(self._gateway(plan))

    async def _gateway(self, plan: Any) -> Gateway:
        return Gateway(plan, asyncio.get_running_loop())

    @contextlib.contextmanager
    def _patched(self) -> Iterator[None]:
        """For one input only: in-memory upstream connections, and a record of what the
        gateway started and parsed (the rest of the test session sees the real classes)."""
        harness = self
        original_connect = UpstreamPool._connect
        original_start = Exchange.start
        original_feed = Exchange.feed_body

        async def connect(pool: UpstreamPool, sink: ResponseSink) -> None:
            conn = UpstreamConnection(pool)
            upstream = _Upstream(harness.loop, conn, harness.early)
            harness.upstreams.append(upstream)
            conn.connection_made(upstream)  # type: ignore[arg-type]
            pool.connects += 1
            conn.reused = False
            sink.upstream_ready(conn)

        def start(exchange: Exchange, plan: Any) -> None:
            original_start(exchange, plan)
            harness.started[exchange.request_id] = exchange

        def feed_body(exchange: Exchange, data: bytes) -> None:
            harness.bodies.setdefault(exchange, bytearray()).extend(data)
            original_feed(exchange, data)

        UpstreamPool._connect = connect  # type: ignore[assignment,method-assign]
        Exchange.start = start  # type: ignore[method-assign,assignment]
        Exchange.feed_body = feed_body  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            UpstreamPool._connect = original_connect  # type: ignore[method-assign]
            Exchange.start = original_start  # type: ignore[method-assign]
            Exchange.feed_body = original_feed  # type: ignore[method-assign]

    def run(self, chunks: list[bytes], *, early: bool = False) -> bytes:
        self.early = early
        self.upstreams = []
        self.started = {}
        self.bodies = {}
        self.errors.clear()
        with self._patched():
            return self.loop.run_until_complete(self._run(chunks))

    async def _run(self, chunks: list[bytes]) -> bytes:
        gateway = self.gateway
        # Each input starts from empty pools, so that it replays alone exactly.
        for pool in gateway.registry.pools.values():
            for idle in list(pool.idle):
                idle.close()
        await asyncio.sleep(0)
        self.upstreams = []
        conn = ClientConnection(gateway)
        transport = _ClientTransport(self.loop, conn)
        conn.connection_made(transport)  # type: ignore[arg-type]
        for chunk in chunks:
            for _ in range(_ROUNDS):
                if transport.reading or transport.closing:
                    break
                await asyncio.sleep(0)
            if transport.closing or not transport.reading:
                break  # a real client's bytes would wait in the socket
            conn.data_received(chunk)
            for _ in range(_ROUNDS):
                await asyncio.sleep(0)
        for _ in range(_ROUNDS):
            await asyncio.sleep(0)
        transport.abort()  # the client goes away
        for _ in range(_ROUNDS * 2):
            await asyncio.sleep(0)
        self._check(gateway)
        return bytes(transport.out)

    def _check(self, gateway: Gateway) -> None:
        if self.errors:
            raise FuzzFailure(f"an exception reached the loop: {self.errors[0]}")
        seen: set[tuple[bytes, bool]] = set()
        for upstream in self.upstreams:
            if upstream.error:
                raise FuzzFailure(f"{upstream.error}; sent {bytes(upstream.sent)!r}")
            shadow = upstream.protocol.pool.target.name == SHADOW_UPSTREAM
            requests = [(rid, None, None) for rid in [upstream.partial] if rid is not None]
            for rid, body, marks in [*upstream.parsed, *requests]:
                exchange = self.started.get(rid)
                if exchange is None:
                    raise FuzzFailure(f"the upstream saw a request never parsed: {rid!r}")
                if (rid, shadow) in seen:
                    raise FuzzFailure(f"request {rid!r} reached an upstream twice")
                seen.add((rid, shadow))
                if body is not None and body != bytes(self.bodies.get(exchange, b"")):
                    raise FuzzFailure(f"request {rid!r} reached the upstream with another body")
                if marks is not None and marks != int(shadow):
                    raise FuzzFailure(f"request {rid!r}: {marks} x-modelgate-shadow headers")
            if upstream.partial is not None and not upstream.closing:
                # Pooled mid-request: the next request's bytes would be read as this body.
                raise FuzzFailure(
                    f"a pooled upstream connection is inside request {upstream.partial!r}"
                )
        if gateway.connections:
            raise FuzzFailure("a client connection outlived its transport")
        if gateway.inflight:
            raise FuzzFailure(f"{len(gateway.inflight)} exchanges still in flight")
        for name, pool in gateway.registry.pools.items():
            if pool.waiters or pool.size != len(pool.idle):
                raise FuzzFailure(f"pool {name}: {pool.stats()} after everyone left")
        if gateway.shadows.calls:
            raise FuzzFailure(f"{len(gateway.shadows.calls)} shadow copies never finished")


_SPLITS: tuple[Callable[[bytes], list[bytes]], ...] = (
    lambda data: [data],
    lambda data: [data[: len(data) // 2], data[len(data) // 2 :]],
    lambda data: [data[i : i + 7] for i in range(0, len(data), 7)],
    lambda data: [data[:1], data[1:]],
)

_harness: FrontDoor | None = None


def check_input(data: bytes) -> bytes:
    """Runs one fuzz input (its first byte picks how the rest is cut into reads and whether
    upstreams answer before the body) and returns what the client got; raises FuzzFailure
    when a property breaks."""
    global _harness
    if _harness is None:
        _harness = FrontDoor()
    if not data:
        return b""
    split = _SPLITS[data[0] % len(_SPLITS)]
    return _harness.run(split(data[1:]), early=bool(data[0] & 4))
