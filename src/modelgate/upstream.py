"""Upstream side of the proxy: keep-alive connection pools and the response parser protocol.

A pool hands out an idle connection synchronously when it has one (the fast path: no task,
no await), else opens one in a task, bounded by `max_connections` and a bounded wait queue.
A connection the upstream closed is dropped the moment uvloop reports it, so no request is
written to it; the race where the close is still in flight is covered by the exchange's
one retry on a reused connection that failed before any response byte.

A connection is pooled only when its framing is exactly known: a response head or trailers
beyond the target's limit, a second response after a complete one, or any byte while idle
discard it (as nginx does), and each is counted.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

import httptools

from modelgate.plan import UpstreamTarget

__all__ = ["ResponseSink", "UpstreamConnection", "UpstreamPool", "UpstreamRegistry"]


class ResponseSink(Protocol):
    """What an upstream connection reports to the exchange it serves."""

    def upstream_ready(self, conn: UpstreamConnection) -> None: ...
    def upstream_failed(self, kind: str, detail: str, *, reused_idle: bool = False) -> None: ...
    def response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes, bytes]], framed: bool
    ) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def flush_head(self) -> None: ...
    def response_complete(self) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an upstream; serves one exchange at a time."""

    __slots__ = (
        "pool",
        "transport",
        "parser",
        "sink",
        "closed",
        "reused",
        "received_any",
        "headers",
        "reason",
        "head_request",
        "informational",
        "framed",
        "complete",
        "failed",
        "headers_done",
        "reusable",
        "head_bytes",
        "extra",
        "error",
        "paused",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self.closed = False
        self.reused = False
        self.paused = False  # reading paused for a slow client
        self._reset()
        self.reusable = True  # a fresh connection that served nothing can be pooled

    def _reset(self) -> None:
        self.received_any = False
        self.headers: list[tuple[bytes, bytes, bytes]] = []  # (lowercase name, name, value)
        self.reason = b""
        self.head_request = False
        self.informational = False
        self.framed = False
        self.complete = False
        self.failed = False
        self.headers_done = False
        self.reusable = False
        self.head_bytes = 0  # of the response head, then of its trailers
        self.extra = False  # bytes after the complete response: never pooled again
        self.error = ""  # why a callback stopped the parser

    # --- the exchange's side -------------------------------------------------------------

    def start(self, sink: ResponseSink, parts: list[bytes], *, head_request: bool) -> None:
        """Sends a request head (and any buffered body); the rest follows through `write`."""
        self._reset()
        self.sink = sink
        self.head_request = head_request
        assert self.transport is not None
        if len(parts) == 1:
            self.transport.write(parts[0])
        else:
            self.transport.writelines(parts)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines(parts)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed and self.paused:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Closes for good: an upstream connection in an unknown state is never reused."""
        self.sink = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.pool.forget(self)

    def abort(self) -> None:
        self.sink = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            self.pool.forget(self)

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None or self.complete:
            # Bytes nobody asked for: the connection's framing is unknown from here on.
            self.pool.count("extra_bytes")
            self.abort()
            return
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade is hop-by-hop and never forwarded: a 101 answers nothing we asked.
            self._broken(sink, "upstream answered 101 Switching Protocols to a plain request")
            return
        except httptools.HttpParserError as exc:
            if not self.complete:
                self._broken(sink, self.error or f"malformed response from upstream: {exc}")
                return
            self.extra = True  # garbage after a complete response
        if self.complete:
            self.sink = None
            if self.extra:
                self.reusable = False  # released, then closed: never handed out again
                self.pool.count("extra_bytes")
            elif self.head_request:
                # httptools cannot be told that a HEAD response has no body; start afresh.
                self.parser = httptools.HttpResponseParser(self)
            sink.response_complete()
        elif self.headers_done:
            sink.flush_head()

    def _broken(self, sink: ResponseSink, detail: str) -> None:
        self.failed = True
        self.abort()
        sink.upstream_failed("bad_response", detail)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost does the rest

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        if not was_closed:
            self.pool.forget(self)
        sink = self.sink
        self.sink = None
        if sink is None or was_closed or self.complete:
            return
        if self.headers_done and not self.framed and not self.head_request:
            # A close-delimited response (no Content-Length, not chunked) ends at EOF.
            sink.response_complete()
            return
        reused_idle = self.reused and not self.received_any
        if self.headers_done:
            sink.upstream_failed("reset", "upstream closed the connection mid-response")
        else:
            detail = "upstream closed the connection before responding"
            if exc is not None:
                detail = f"upstream connection failed: {exc}"
            sink.upstream_failed("reset", detail, reused_idle=reused_idle)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_resume_writing()

    # --- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True  # a second response to one request: dropped, never forwarded
            return
        self.headers_done = False

    def on_status(self, reason: bytes) -> None:
        if not self.complete:
            self.reason += reason
            self._count_head(len(reason))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            return
        self._count_head(len(name) + len(value) + 4)
        if self.headers_done:
            return  # a trailer: bounded like the head, never forwarded
        lname = name.lower()
        self.headers.append((lname, name, value))
        if lname == b"content-length" or (
            lname == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self.framed = True

    def _count_head(self, size: int) -> None:
        self.head_bytes += size
        limit = self.pool.target.max_header_bytes
        if self.head_bytes > limit:
            part = "trailers" if self.headers_done else "header"
            self.error = (
                f"upstream response {part} exceed {limit} bytes (max_upstream_header_bytes)"
            )
            raise ValueError(self.error)  # stops llhttp: the response cannot be trusted

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # Interim responses (100, 103) are consumed here; the final one follows.
            self.informational = True
            return
        self.headers_done = True
        self.head_bytes = 0  # trailers, if any, get a limit of their own
        if status in (204, 304):
            self.framed = True
        sink = self.sink
        if sink is not None:
            sink.response_head(status, self.reason, self.headers, self.framed)
        if self.head_request:
            self.reusable = self.parser.should_keep_alive()
            self.complete = True

    def on_body(self, body: bytes) -> None:
        if self.complete or self.informational:
            return
        sink = self.sink
        if sink is not None:
            sink.response_body(body)

    def on_message_complete(self) -> None:
        if self.complete:
            return
        if self.informational:
            self.informational = False
            self.head_bytes = 0
            self.headers = []
            self.reason = b""
            self.framed = False
            return
        # llhttp forgets the keep-alive verdict once the message is done: read it now.
        self.reusable = self.parser.should_keep_alive()
        self.complete = True

    @property
    def keep_alive(self) -> bool:
        return not self.closed and not self.failed and self.reusable


def _uncounted(kind: str) -> None:
    pass


class UpstreamPool:
    """Connections to one upstream address: bounded, reused LIFO, drained on close.

    Requests beyond max_connections wait in a bounded FIFO queue, each for at most the
    target's queue_timeout_s (one timeout for all, so deadlines are in queue order)."""

    def __init__(
        self,
        target: UpstreamTarget,
        max_waiters: int | None = None,
        count: Callable[[str], None] = _uncounted,
    ) -> None:
        self.target = target
        self.count = count  # events no exchange sees: bytes after a response (extra_bytes)
        self.idle: list[UpstreamConnection] = []
        self.size = 0  # open or opening
        self.waiters: deque[tuple[float, ResponseSink]] = deque()
        self.max_waiters = max_waiters if max_waiters is not None else 4 * target.max_connections
        self.closing = False
        self.connects = 0
        self.connect_failures = 0

    def acquire(self, sink: ResponseSink) -> UpstreamConnection | None:
        """An idle connection now, or None: then `sink.upstream_ready/failed` is called later."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        # A closing pool (its upstream left the Plan) still serves the requests that started on
        # the Plan that had it: it drains, it does not refuse them.
        if self.size < self.target.max_connections:
            self.size += 1
            asyncio.get_running_loop().create_task(self._connect(sink))
            return None
        if len(self.waiters) >= self.max_waiters:
            sink.upstream_failed(
                "saturated",
                f"upstream {self.target.name!r} is at max_connections "
                f"({self.target.max_connections}) with {len(self.waiters)} requests waiting",
            )
            return None
        deadline = asyncio.get_running_loop().time() + self.target.queue_timeout_s
        self.waiters.append((deadline, sink))
        return None

    def cancel_wait(self, sink: ResponseSink) -> None:
        for entry in self.waiters:
            if entry[1] is sink:
                self.waiters.remove(entry)
                return

    def expire_waiters(self, now: float) -> None:
        """Answers requests that waited for a connection longer than queue_timeout_s."""
        waiters = self.waiters
        while waiters and waiters[0][0] <= now:
            _, sink = waiters.popleft()
            sink.upstream_failed(
                "queue_timeout",
                f"no connection to upstream {self.target.name!r} came free within "
                f"{self.target.queue_timeout_s * 1000:.0f} ms (max_connections "
                f"{self.target.max_connections})",
            )

    async def _connect(self, sink: ResponseSink) -> None:
        loop = asyncio.get_running_loop()
        target = self.target
        try:
            async with asyncio.timeout(target.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self), target.host, target.port
                )
        except TimeoutError:
            self.size -= 1
            self.connect_failures += 1
            sink.upstream_failed(
                "connect_timeout",
                f"connecting to upstream {target.name!r} timed out after "
                f"{target.connect_timeout_s * 1000:.0f} ms",
            )
            self._wake_waiter()
            return
        except OSError as exc:
            self.size -= 1
            self.connect_failures += 1
            sink.upstream_failed(
                "connect_failed",
                f"cannot connect to upstream {target.name!r} "
                f"({target.host}:{target.port}): {exc.strerror or exc}",
            )
            self._wake_waiter()
            return
        self.connects += 1
        conn.reused = False
        sink.upstream_ready(conn)

    def release(self, conn: UpstreamConnection) -> None:
        """Returns a connection whose exchange finished cleanly."""
        if conn.closed:
            return
        if not conn.keep_alive:
            conn.close()
            return
        # Its last client may have paused it: a pooled connection must read, or it would
        # neither answer its next request nor notice the upstream closing it.
        conn.resume_reading()
        if self.waiters:
            _, sink = self.waiters.popleft()
            conn.reused = True
            sink.upstream_ready(conn)
            return
        if self.closing or len(self.idle) >= self.target.max_idle:
            conn.close()
            return
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """Called once per connection when it closes, whoever closed it."""
        self.size -= 1
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        self._wake_waiter()

    def _wake_waiter(self) -> None:
        if self.waiters and self.size < self.target.max_connections:
            _, sink = self.waiters.popleft()
            self.size += 1
            asyncio.get_running_loop().create_task(self._connect(sink))

    def close(self) -> None:
        """Drains: idle connections close now, busy ones when released (after serving any
        request still waiting for one); requests of the old Plan are still served."""
        self.closing = True
        for conn in list(self.idle):
            conn.close()
        self.idle.clear()

    def stats(self) -> dict[str, int]:
        return {
            "open": self.size,
            "idle": len(self.idle),
            "waiting": len(self.waiters),
            "connects": self.connects,
            "connect_failures": self.connect_failures,
        }


class UpstreamRegistry:
    """Pools by upstream name. A reload keeps a pool whose address is unchanged (warm
    connections survive) and closes the pools of removed or re-addressed upstreams."""

    def __init__(self, count: Callable[[str], None] = _uncounted) -> None:
        self.pools: dict[str, UpstreamPool] = {}
        self.count = count
        self._draining: list[UpstreamPool] = []  # closed pools whose queues still wait

    def apply(self, targets: dict[str, UpstreamTarget]) -> None:
        old = self.pools
        new: dict[str, UpstreamPool] = {}
        for name, target in targets.items():
            pool = old.get(name)
            if pool is not None and pool.target.pool_key == target.pool_key:
                pool.target = target  # timeouts and host header may change in place
                new[name] = pool
            else:
                new[name] = UpstreamPool(target, count=self.count)
        for name, pool in old.items():
            if new.get(name) is not pool:
                pool.close()
                self._draining.append(pool)
        self.pools = new

    def expire_waiters(self, now: float) -> None:
        for pool in self.pools.values():
            if pool.waiters:
                pool.expire_waiters(now)
        if self._draining:
            for pool in self._draining:
                pool.expire_waiters(now)
            self._draining = [pool for pool in self._draining if pool.size or pool.waiters]

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
