"""The load driver's HTTP/1.1 client: keep-alive connections on asyncio.Protocol with
httptools parsing, one request in flight per connection, callbacks instead of futures."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Generic, Protocol, TypeVar, cast

import httptools

__all__ = ["CHAOS_HEADER", "ERROR_KINDS", "VARIANT_HEADER", "Pool", "Sink"]

VARIANT_HEADER = b"x-modelgate-variant"
CHAOS_HEADER = b"x-modelgate-chaos"
ERROR_KINDS = (
    "refused",  # connect: nothing listening
    "connect_error",  # connect: any other OS error (unreachable, no route, ...)
    "connect_timeout",  # connect: not established before the request's deadline
    "reset",  # the peer reset the connection before a full response
    "closed",  # the peer closed the connection before a full response
    "timeout",  # no full response before the deadline (or still queued at it)
    "protocol",  # a malformed response
)

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class Sink(Protocol[T_contra]):
    """Where a Pool reports each request's outcome; `token` is what was submitted with it."""

    def response_done(
        self, token: T_contra, status: int, variant: bytes | None, chaos: bytes | None
    ) -> None: ...

    def request_failed(self, token: T_contra, kind: str) -> None: ...


class _Connection(asyncio.Protocol, Generic[T]):
    """One keep-alive connection; the parser's callbacks are its methods."""

    def __init__(self, pool: Pool[T], head_only: bool) -> None:
        self.pool = pool
        self.head_only = head_only  # HEAD: the response ends with its headers
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.token: T | None = None
        self.busy = False
        self.closed = False
        self.deadline = 0.0
        self._reset_response()

    def _reset_response(self) -> None:
        self.variant: bytes | None = None
        self.chaos: bytes | None = None
        self.status = 0
        self.framed = False
        self.headers_done = False
        self.complete = False
        self.interim = False
        self.reusable = False

    def send(self, data: bytes, token: T, deadline: float) -> None:
        assert self.transport is not None
        self.token = token
        self.deadline = deadline
        self.busy = True
        self._reset_response()
        self.transport.write(data)

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            self.abort()  # bytes nobody asked for: the framing is lost from here on
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.fail("protocol")
            return
        if self.complete:
            self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if not self.busy:
            return
        if self.headers_done and not self.framed:
            self.complete = True  # a close-delimited response ends at EOF
            self._finish()
        else:
            self.fail("reset" if isinstance(exc, ConnectionResetError) else "closed")

    # --- httptools callbacks -----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        # Only three names matter; comparing lengths first skips most lower() calls.
        size = len(name)
        if size == 19:
            if name.lower() == VARIANT_HEADER:
                self.variant = value
        elif size == 17:
            lower = name.lower()
            if lower == CHAOS_HEADER:
                self.chaos = value
            elif lower == b"transfer-encoding":
                self.framed = True
        elif size == 14 and name.lower() == b"content-length":
            self.framed = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.interim = True  # 100 Continue, 103 Early Hints: the final answer follows
            return
        self.status = status
        self.headers_done = True
        if status in (204, 304):
            self.framed = True
        if self.head_only:
            self.reusable = self.parser.should_keep_alive()
            self.complete = True

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            self.variant = self.chaos = None
            return
        # llhttp forgets the keep-alive verdict once the message is done: read it now.
        self.reusable = self.parser.should_keep_alive()
        self.complete = True

    # --- outcomes ----------------------------------------------------------------------

    def _finish(self) -> None:
        token = cast(T, self.token)
        self.token = None
        self.busy = False
        if self.head_only:
            # httptools cannot be told that a HEAD response has no body; start afresh.
            self.parser = httptools.HttpResponseParser(self)
        if not self.reusable and not self.closed:
            self.closed = True
            self.pool._forget(self)
            if self.transport is not None:
                self.transport.close()
        self.pool._finished(self, token, self.status, self.variant, self.chaos)

    def fail(self, kind: str) -> None:
        token = cast(T, self.token)
        was_busy = self.busy
        self.token = None
        self.busy = False
        self.abort()
        if was_busy:
            self.pool._failed(token, kind)

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool._forget(self)
        if self.transport is not None:
            self.transport.abort()


class Pool(Generic[T]):
    """Up to `max_connections` keep-alive connections to one host:port. `submit` sends on an
    idle connection, opens one, or queues; a watchdog fails whatever passes its deadline."""

    def __init__(
        self,
        host: str,
        port: int,
        max_connections: int,
        sink: Sink[T],
        *,
        head_only: bool = False,
        tick_s: float = 0.05,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.sink = sink
        self.head_only = head_only
        self.idle: list[_Connection[T]] = []
        self.connections: set[_Connection[T]] = set()
        self.waiting: deque[tuple[bytes, T, float]] = deque()
        self.connecting: set[asyncio.Task[None]] = set()
        self.tick_s = tick_s
        self._watchdog: asyncio.TimerHandle | None = self.loop.call_later(tick_s, self._watch)

    @property
    def in_flight(self) -> int:
        busy = sum(1 for c in self.connections if c.busy)
        return busy + len(self.connecting) + len(self.waiting)

    def submit(self, data: bytes, token: T, deadline: float) -> None:
        """Sends `data` (a whole request); `deadline` is on time.perf_counter()'s clock."""
        if self.idle:
            self.idle.pop().send(data, token, deadline)  # LIFO: the warmest connection
        elif len(self.connections) + len(self.connecting) < self.max_connections:
            self._open(data, token, deadline)
        else:
            self.waiting.append((data, token, deadline))

    def close(self) -> None:
        """Stops the watchdog and drops every connection; queued requests are forgotten."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for task in list(self.connecting):
            task.cancel()
        self.waiting.clear()
        for conn in list(self.connections):
            conn.token = None
            conn.busy = False
            conn.abort()

    # --- internals ---------------------------------------------------------------------

    def _open(self, data: bytes, token: T, deadline: float) -> None:
        task = self.loop.create_task(self._connect(data, token, deadline))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    async def _connect(self, data: bytes, token: T, deadline: float) -> None:
        kind: str | None = None
        try:
            async with asyncio.timeout(max(deadline - time.perf_counter(), 0.0)):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self, self.head_only), self.host, self.port
                )
        except TimeoutError:
            kind = "connect_timeout"
        except ConnectionRefusedError:
            kind = "refused"
        except OSError:
            kind = "connect_error"
        if kind is not None:
            self._failed(token, kind)
            self._pump()
            return
        self.connections.add(conn)
        conn.send(data, token, deadline)

    def _finished(
        self,
        conn: _Connection[T],
        token: T,
        status: int,
        variant: bytes | None,
        chaos: bytes | None,
    ) -> None:
        if not conn.closed:
            self.idle.append(conn)
        self._pump()
        self.sink.response_done(token, status, variant, chaos)

    def _failed(self, token: T, kind: str) -> None:
        self._pump()
        self.sink.request_failed(token, kind)

    def _forget(self, conn: _Connection[T]) -> None:
        self.connections.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def _pump(self) -> None:
        """Moves queued requests onto free connections (or new ones, within the cap)."""
        while self.waiting and (
            self.idle or len(self.connections) + len(self.connecting) < self.max_connections
        ):
            data, token, deadline = self.waiting.popleft()
            if deadline <= time.perf_counter():
                self.sink.request_failed(token, "timeout")
                continue
            self.submit(data, token, deadline)

    def _watch(self) -> None:
        now = time.perf_counter()
        for conn in [c for c in self.connections if c.busy and c.deadline <= now]:
            conn.fail("timeout")
        # Deadlines are submit time + a fixed timeout, so the queue is in deadline order.
        while self.waiting and self.waiting[0][2] <= now:
            _, token, _ = self.waiting.popleft()
            self.sink.request_failed(token, "timeout")
        self._pump()
        self._watchdog = self.loop.call_later(self.tick_s, self._watch)
