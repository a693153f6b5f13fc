"""The client side of the proxy: one asyncio.Protocol per client connection.

It parses HTTP/1.1 with httptools (llhttp), enforces the front-door rules llhttp leaves to
the server (version, Host, Transfer-Encoding in 1.0, header size), answers pipelined requests
in order, and applies backpressure both ways. Reading pauses for several reasons at once
(a full pipeline, a slow upstream, a body buffered while waiting for a connection); a bit
mask keeps them apart so one reason's resume does not undo another's pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from modelgate.exchange import Exchange, parse_request_target
from modelgate.http11 import (
    GATEWAY_SET_REQUEST_HEADERS,
    connection_tokens,
    error_response,
    is_valid_host,
)

if TYPE_CHECKING:
    from modelgate.server import Gateway

__all__ = ["ClientConnection"]

MAX_PIPELINE = 16
MAX_BUFFERED_BODY = 256 * 1024

_PAUSE_PIPELINE = 1
_PAUSE_UPSTREAM = 2
_PAUSE_BUFFER = 4
_PAUSE_CLOSING = 8

_INF = float("inf")


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "gateway",
        "transport",
        "parser",
        "parsing",
        "current",
        "pending",
        "peer_ip",
        "peer_ip_bytes",
        "pause_mask",
        "write_paused",
        "closing",
        "header_bytes",
        "deadline",
        "deadline_reason",
        "host_count",
    )

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.parsing: Exchange | None = None
        self.current: Exchange | None = None
        self.pending: deque[Exchange] = deque()
        self.peer_ip = ""
        self.peer_ip_bytes = b""
        self.pause_mask = 0
        self.write_paused = False
        self.closing = False
        self.header_bytes = 0
        self.deadline = _INF
        self.deadline_reason = ""
        self.host_count = 0

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = self.transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else ""
        self.peer_ip_bytes = self.peer_ip.encode("ascii", "replace")
        gateway = self.gateway
        gateway.connections.add(self)
        if len(gateway.connections) > gateway.plan.limits.max_connections:
            gateway.counters.rejected_connections += 1
            self.write(
                error_response(
                    503,
                    "too_many_connections",
                    "the gateway is at max_connections",
                    "",
                    keep_alive=False,
                )
            )
            self.close()
            return
        self._set_deadline(gateway.plan.limits.client_header_timeout_ms, "header")

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._on_upgrade()
        except httptools.HttpParserError as exc:
            self._parse_error(str(exc) or type(exc).__name__)
            return
        parsing = self.parsing
        if parsing is not None and not parsing.headers_complete:
            # Bytes of a head still incomplete (httptools buffers partial lines itself).
            self.header_bytes += len(data)
            if self.header_bytes > self.gateway.plan.limits.max_header_bytes:
                self._refuse(431, "headers_too_large", "request headers exceed max_header_bytes")
                return
        if self.current is None and self.pending:
            self._start_next()

    def eof_received(self) -> bool | None:
        # Like nginx, a client EOF with a request in flight is a client abort: the upstream
        # work is abandoned (connection_lost follows) rather than answered into the void.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.gateway.connections.discard(self)
        for exchange in (self.current, self.parsing, *self.pending):
            if exchange is not None and not exchange.done:
                self.gateway.counters.client_aborts += 1
                exchange.abandon()
        self.current = None
        self.parsing = None
        self.pending.clear()

    def pause_writing(self) -> None:
        # The client reads slower than the upstream sends: stop reading the upstream.
        self.write_paused = True
        current = self.current
        if current is not None and current.upstream is not None:
            current.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        current = self.current
        if current is not None and current.upstream is not None:
            current.upstream.resume_reading()

    # --- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.parsing = Exchange(self)
        self.header_bytes = 0
        self.host_count = 0
        if self.current is None:
            self._set_deadline(self.gateway.plan.limits.client_header_timeout_ms, "header")

    def on_url(self, url: bytes) -> None:
        exchange = self.parsing
        if exchange is not None:
            exchange.url += url
            self.header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self.parsing
        if exchange is None:
            return
        if value[-1:] in (b" ", b"\t"):
            value = value.rstrip(b" \t")  # trailing OWS is not part of the value
        self.header_bytes += len(name) + len(value) + 4
        lname = name.lower()
        exchange.headers.append((lname, name, value))
        if lname not in GATEWAY_SET_REQUEST_HEADERS:
            # Forwarded as is: the upstream head is assembled while parsing, in one pass.
            exchange.forward += (name, b": ", value, b"\r\n")
        elif lname == b"host":
            self.host_count += 1
            exchange.host = value
        elif lname == b"content-length":
            exchange.content_length = int(value)  # llhttp has validated the digits
        elif lname == b"transfer-encoding":
            exchange.chunked = True  # llhttp accepts only a final "chunked" here
        elif lname == b"x-request-id":
            exchange.client_request_id = value
        elif lname == b"x-forwarded-for":
            exchange.forwarded_for = value
        elif lname == b"connection":
            tokens = connection_tokens(value)
            if tokens:
                exchange.connection_tokens = tokens
        elif lname == b"expect":
            if value.lower() == b"100-continue":
                exchange.expect_continue = True
            else:
                exchange.reject = (417, "expectation_failed", "only 100-continue is supported")

    def on_headers_complete(self) -> None:
        exchange = self.parsing
        if exchange is None:
            return
        parser = self.parser
        exchange.headers_complete = True
        exchange.method = parser.get_method()
        version = parser.get_http_version()
        exchange.version = version
        exchange.keep_alive = parser.should_keep_alive()
        if self.header_bytes > self.gateway.plan.limits.max_header_bytes:
            exchange.reject = (431, "headers_too_large", "request headers exceed max_header_bytes")
        if exchange.reject is None:
            exchange.reject = self._front_door_violation(exchange, version)
        if exchange.reject is None:
            target = parse_request_target(exchange.url)
            if target is None:
                exchange.reject = (400, "bad_request", "invalid request target")
            else:
                exchange.url = target
        if exchange.reject is not None:
            exchange.keep_alive = False
        if exchange.content_length or exchange.chunked:
            self._set_deadline(self.gateway.plan.limits.client_body_timeout_ms, "body")
        else:
            self.deadline = _INF
        self.pending.append(exchange)
        if len(self.pending) >= MAX_PIPELINE:
            self.pause_reading_for(None, _PAUSE_PIPELINE)

    def _front_door_violation(
        self, exchange: Exchange, version: str
    ) -> tuple[int, str, str] | None:
        """What RFC 9112 says a server MUST reject and llhttp accepts: answered 400."""
        if version not in ("1.1", "1.0"):
            return (400, "bad_request", f"unsupported HTTP version {version}")
        if self.host_count > 1:
            return (400, "bad_request", "more than one Host header")
        if exchange.host is None:
            if version == "1.1":
                return (400, "bad_request", "HTTP/1.1 request without a Host header")
        elif not is_valid_host(exchange.host):
            return (400, "bad_request", "invalid Host header")
        if version == "1.0" and exchange.chunked:
            return (400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
        return None

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        if exchange is not None:
            self.deadline = self.gateway.loop.time() + self.gateway.body_timeout_s
            exchange.feed_body(body)

    def on_message_complete(self) -> None:
        exchange = self.parsing
        self.parsing = None
        self.deadline = _INF
        if exchange is not None:
            exchange.finish_body()

    # --- exchanges ------------------------------------------------------------------------

    def _start_next(self) -> None:
        if self.current is not None or not self.pending:
            return
        if self.transport is None or self.transport.is_closing():
            return
        exchange = self.pending.popleft()
        if self.pause_mask & _PAUSE_PIPELINE and len(self.pending) < MAX_PIPELINE // 2:
            self.resume_reading_for(None, _PAUSE_PIPELINE)
        self.current = exchange
        exchange.start(self.gateway.plan)

    def exchange_done(self, exchange: Exchange) -> None:
        if exchange is not self.current:
            return
        self.current = None
        if self.pause_mask & _PAUSE_UPSTREAM:
            self.resume_reading_for(None, _PAUSE_UPSTREAM)
        if not exchange.keep_alive:
            self.close()
            return
        if self.pending:
            # call_soon, not a direct call: a pipeline of errors must not recurse.
            self.gateway.loop.call_soon(self._start_next)
        elif self.parsing is None:
            if self.transport is not None and self.transport.is_closing():
                return
            if self.closing:
                self.close()
                return
            self._set_deadline(self.gateway.plan.limits.keepalive_timeout_ms, "keepalive")

    def note_buffered(self, exchange: Exchange) -> None:
        """Bounds the request body held while no upstream connection is attached."""
        if exchange.buffered > MAX_BUFFERED_BODY and exchange.body_waiter is None:
            # (An exchange waiting for its whole body is bounded by its own body limit.)
            self.pause_reading_for(exchange, _PAUSE_BUFFER)
        elif self.pause_mask & _PAUSE_BUFFER:
            self.resume_reading_for(exchange, _PAUSE_BUFFER)

    def pause_reading_for(self, exchange: Exchange | None, reason: int = _PAUSE_UPSTREAM) -> None:
        if not self.pause_mask and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.pause_mask |= reason

    def resume_reading_for(self, exchange: Exchange | None, reason: int = _PAUSE_UPSTREAM) -> None:
        if not self.pause_mask & reason:
            return
        self.pause_mask &= ~reason
        if not self.pause_mask and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.writelines(parts)

    # --- errors, timeouts, closing ------------------------------------------------------

    def _parse_error(self, detail: str) -> None:
        """Malformed framing: answer 400 after what is already in flight, then close."""
        self.gateway.counters.bad_requests += 1
        self.pause_reading_for(None, _PAUSE_CLOSING)
        reason = (400, "bad_request", f"malformed request: {detail}")
        parsing = self.parsing
        self.parsing = None
        if parsing is not None and parsing.headers_complete:
            # The error is in this request's body: it must never be completed upstream.
            if parsing.started:
                parsing.body_error(*reason)
            else:
                parsing.reject = reason
                parsing.keep_alive = False
                parsing.body_complete = True
        elif self.current is None and not self.pending:
            self._refuse(*reason)
            return
        else:
            # Let the requests before the bad bytes finish; the bad one becomes a rejection.
            bad = Exchange(self)
            bad.headers_complete = True
            bad.body_complete = True
            bad.keep_alive = False
            bad.reject = reason
            self.pending.append(bad)
        if self.current is None and self.pending:
            self._start_next()

    def _on_upgrade(self) -> None:
        """llhttp stops at CONNECT and Upgrade; we tunnel neither (no open proxy)."""
        exchange = (
            self.parsing
            if self.parsing is not None
            else (self.pending[-1] if self.pending else None)
        )
        self.pause_reading_for(None, _PAUSE_CLOSING)
        if exchange is None:
            self._refuse(400, "bad_request", "upgrade without a request")
            return
        exchange.keep_alive = False
        if exchange.method == b"CONNECT":
            exchange.reject = (405, "method_not_allowed", "CONNECT is not supported")
        elif not exchange.body_complete:
            exchange.reject = (400, "bad_request", "a body on an upgrade request")
        # Otherwise it is served as a plain request: Upgrade is hop-by-hop and dropped.
        if self.parsing is exchange:
            self.parsing = None
            exchange.body_complete = True

    def _refuse(self, status: int, code: str, detail: str) -> None:
        self.write(error_response(status, code, detail, "", keep_alive=False))
        self.close()

    def _set_deadline(self, timeout_ms: int, reason: str) -> None:
        self.deadline = self.gateway.loop.time() + timeout_ms / 1000.0
        self.deadline_reason = reason

    def check_deadline(self, now: float) -> None:
        """Called by the gateway's sweeper about twice a second: idle and slowloris limits."""
        if now < self.deadline:
            return
        if self.pause_mask:
            # We stopped reading (backpressure): the client is not the slow one.
            self.deadline = now + self.gateway.body_timeout_s
            return
        if self.deadline_reason == "keepalive":
            self.close()
        else:
            self.gateway.counters.client_timeouts += 1
            self._refuse(
                408, "request_timeout", f"client too slow sending the {self.deadline_reason}"
            )

    def close_if_idle(self) -> bool:
        """For draining: closes a connection that has nothing in flight."""
        if self.current is None and self.parsing is None and not self.pending:
            self.close()
            return True
        self.closing = True
        return False

    def close(self) -> None:
        self.closing = True
        self.deadline = _INF
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def reset(self) -> None:
        """Closes with a TCP RST (SO_LINGER 0), as a crashed upstream would be seen."""
        transport = self.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.abort()
