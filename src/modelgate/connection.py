"""The client side of the proxy: one asyncio.Protocol per client connection.

It parses HTTP/1.1 with httptools (llhttp), enforces the front-door rules llhttp leaves to
the server (version, Host, transfer codings, header and trailer size), answers pipelined
requests in order, and applies backpressure both ways. Reading pauses for several reasons at
once (a full pipeline, a slow upstream, a body buffered while waiting for a connection, a
client that does not read its answers); a bit mask keeps them apart so one reason's resume
does not undo another's pause.

Every state a connection can be in has a deadline: a head being sent (header timeout), a body
(an idle timeout and a minimum rate), an idle keep-alive, and answers the client leaves unread
(the send timeout). Nothing a client sends can make the gateway hold more than MAX_PIPELINE
parsed requests: large reads are parsed in slices and the rest waits, unparsed.
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
# Reads larger than this are parsed in slices of this size (a body of known length goes in
# one piece), so that one read of many tiny pipelined requests cannot become thousands of
# parsed requests held in memory: at most MAX_PIPELINE plus one slice's worth (about 40).
FEED_SLICE = 1024
# Chunk-size lines and extensions a chunked body may add beyond max_header_bytes, per chunk.
CHUNK_FRAMING_ALLOWANCE = 32

_PAUSE_PIPELINE = 1
_PAUSE_UPSTREAM = 2
_PAUSE_BUFFER = 4
_PAUSE_CLOSING = 8
_PAUSE_WRITING = 16  # the client does not read what the gateway writes

_INF = float("inf")

Refusal = tuple[int, str, str]


class _Refused(Exception):
    """Raised inside a parser callback to stop llhttp at once: the request is refused."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.refusal: Refusal = (status, code, detail)


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
        "framing_bytes",
        "chunks",
        "body_seen",
        "body_base",
        "body_started",
        "deadline",
        "deadline_reason",
        "write_deadline",
        "host_count",
        "held",
        "upgrading",
        "upgrade_body",
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
        self.header_bytes = 0  # the head and trailers of the message being parsed
        self.framing_bytes = 0  # chunk framing and trailers of a chunked body, in bytes read
        self.chunks = 0
        self.body_seen = 0  # body bytes parsed on this connection, all messages
        self.body_base = 0  # body_seen when the current message's body began
        self.body_started = 0.0
        self.deadline = _INF
        self.deadline_reason = ""
        self.write_deadline = _INF
        self.host_count = 0
        # Read but not parsed while the pipeline is full (a view: slicing it copies nothing).
        self.held: memoryview | None = None
        self.upgrading: Exchange | None = None  # an Upgrade request whose body is unparsed
        self.upgrade_body: _UpgradeBody | None = None

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

    def data_received(self, data: bytes | memoryview) -> None:
        if self.closing:
            return
        held = self.held
        if held is not None:
            # Arrived as reading paused for a full pipeline: parsed when the pipeline drains.
            self.held = memoryview(bytes(held) + data)
            return
        upgrade_body = self.upgrade_body
        if upgrade_body is not None:
            if not upgrade_body.complete:
                self._feed(upgrade_body.parser, data)
        elif len(data) <= FEED_SLICE:
            self._feed(self.parser, data)
        else:
            self._feed_sliced(data)
        if self.current is None and self.pending:
            self._start_next()

    def _feed(self, parser: httptools.HttpRequestParser, data: bytes | memoryview) -> bool:
        """Parses `data`; False when the connection stops parsing (refused or upgraded)."""
        exchange = self.parsing
        in_chunked_body = exchange is not None and exchange.chunked and exchange.headers_complete
        seen = self.body_seen
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if parser is self.parser:
                self._on_upgrade(data, int(exc.args[0]))
            return False
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._refuse_framing(*cause.refusal)
            elif self.upgrade_body is not None and self.upgrade_body.complete:
                return False  # bytes after an upgrade request's body: never parsed as HTTP
            else:
                self.gateway.counters.bad_requests += 1
                detail = f"malformed request: {str(exc) or type(exc).__name__}"
                self._refuse_framing(400, "bad_request", detail)
            return False
        parsing = self.parsing
        if parsing is None:
            return True
        limit = self.gateway.plan.limits.max_header_bytes
        if not parsing.headers_complete:
            # Bytes of a head still incomplete (httptools buffers partial lines itself).
            self.header_bytes += len(data)
            if self.header_bytes > limit:
                self._refuse_framing(
                    431, "headers_too_large", "request headers exceed max_header_bytes"
                )
                return False
        elif in_chunked_body and parsing is exchange:
            # What a chunked body's read held beyond its data: chunk lines and trailers,
            # partial ones included (httptools would buffer a huge trailer line whole).
            self.framing_bytes += len(data) - (self.body_seen - seen)
            if self.framing_bytes > limit + CHUNK_FRAMING_ALLOWANCE * self.chunks:
                self._refuse_framing(
                    431,
                    "headers_too_large",
                    "request trailers or chunk framing exceed max_header_bytes",
                )
                return False
        return True

    def _feed_sliced(self, data: bytes | memoryview) -> None:
        """Parses a large read in slices, holding what follows a full pipeline unparsed."""
        view = memoryview(data)
        size = len(view)
        pos = 0
        while pos < size:
            if len(self.pending) >= MAX_PIPELINE:
                self.held = view[pos:]
                return
            step = FEED_SLICE
            parsing = self.parsing
            if parsing is not None and parsing.headers_complete and parsing.content_length:
                # The rest of a body of known length goes through in one call.
                step += max(parsing.content_length - (self.body_seen - self.body_base), 0)
            end = pos + step
            if not self._feed(self.parser, view[pos:end]):
                upgrade_body = self.upgrade_body
                if upgrade_body is not None and end < size:
                    self._feed(upgrade_body.parser, view[end:])  # the body's next bytes
                return
            pos = end

    def _feed_held(self) -> None:
        """Parses what was held; only once all of it is parsed does reading resume, so a
        client that pipelines without pause is held to one read's worth of bytes."""
        data = self.held
        if data is None or self.closing:
            return
        self.held = None
        self.data_received(data)
        if self.held is None and len(self.pending) < MAX_PIPELINE:
            self.resume_reading_for(None, _PAUSE_PIPELINE)

    def eof_received(self) -> bool | None:
        # Like nginx, a client EOF with a request in flight is a client abort: the upstream
        # work is abandoned (connection_lost follows) rather than answered into the void.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.held = None
        self.upgrade_body = None
        self.gateway.connections.discard(self)
        for exchange in (self.current, self.parsing, self.upgrading, *self.pending):
            if exchange is not None and not exchange.done:
                self.gateway.counters.client_aborts += 1
                exchange.abandon()
        self.current = None
        self.parsing = None
        self.upgrading = None
        self.pending.clear()

    def pause_writing(self) -> None:
        # The client reads slower than the gateway answers: stop reading the upstream, stop
        # reading (and answering) the client's next requests, and start the send timeout.
        self.write_paused = True
        self.write_deadline = self.gateway.loop.time() + self.gateway.send_timeout_s
        self.pause_reading_for(None, _PAUSE_WRITING)
        current = self.current
        if current is not None and current.upstream is not None:
            current.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.write_deadline = _INF
        self.resume_reading_for(None, _PAUSE_WRITING)
        current = self.current
        if current is not None and current.upstream is not None:
            current.upstream.resume_reading()
        if current is None and self.pending:
            self.gateway.loop.call_soon(self._start_next)

    # --- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.parsing = Exchange(self)
        self.header_bytes = 0
        self.framing_bytes = 0
        self.chunks = 0
        self.host_count = 0
        # A head has a deadline however the connection got here, in flight behind another
        # request included (a pipelined slowloris).
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
        if exchange.headers_complete:
            # A trailer. Routing, segments and Host were decided on the head: a trailer is
            # counted against the head's limit and never becomes a header (nor is forwarded).
            if self.header_bytes > self.gateway.plan.limits.max_header_bytes:
                raise _Refused(431, "headers_too_large", "request trailers exceed max_header_bytes")
            return
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
            self._transfer_coding(exchange, value)
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

    @staticmethod
    def _transfer_coding(exchange: Exchange, value: bytes) -> None:
        """llhttp accepts any codings ending in chunked; the gateway decodes only chunked,
        and would otherwise forward a body its upstream cannot know is still encoded."""
        if exchange.chunked:
            exchange.reject = (400, "bad_request", "more than one Transfer-Encoding header")
            return
        exchange.chunked = True
        if value.lower() == b"chunked":
            return
        codings = [coding.strip() for coding in value.lower().split(b",")]
        if all(coding == b"chunked" for coding in codings):
            exchange.reject = (400, "bad_request", "chunked applied more than once")
        else:
            shown = value.decode("latin-1")
            exchange.reject = (
                501,
                "not_implemented",
                f"transfer coding {shown!r} is not supported (only chunked)",
            )

    def on_chunk_header(self) -> None:
        self.chunks += 1

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
        if version == "1.0":
            # RFC 9110 §10.1.1: a 100-continue expectation in HTTP/1.0 must be ignored.
            exchange.expect_continue = False
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
        has_body = bool(exchange.content_length or exchange.chunked)
        if has_body:
            self._begin_body()
        else:
            self.deadline = _INF
        self.pending.append(exchange)
        if len(self.pending) >= MAX_PIPELINE:
            self.pause_reading_for(None, _PAUSE_PIPELINE)
        if has_body and exchange.method != b"CONNECT" and parser.should_upgrade():
            # httptools tells llhttp to skip an Upgrade request's body; _on_upgrade reads it.
            self.upgrading = exchange
            self.parsing = None

    def _front_door_violation(self, exchange: Exchange, version: str) -> Refusal | None:
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
            self.body_seen += len(body)
            self._body_deadline()
            exchange.feed_body(body)

    def on_message_complete(self) -> None:
        exchange = self.parsing
        self.parsing = None
        if self.current is None and not self.pending:
            self._set_deadline(self.gateway.plan.limits.keepalive_timeout_ms, "keepalive")
        else:
            self.deadline = _INF  # the answer's own timeouts bound what follows
        if exchange is not None:
            exchange.finish_body()

    # --- body deadlines ---------------------------------------------------------------

    def _begin_body(self) -> None:
        self.body_started = self.gateway.loop.time()
        self.body_base = self.body_seen
        self._body_deadline()

    def _body_deadline(self) -> None:
        """An idle limit between reads, and a minimum average rate after a grace period
        (Apache's mod_reqtimeout): a client trickling a byte at a time cannot hold the
        request, nor the upstream connection it may be streaming to, for long."""
        gateway = self.gateway
        deadline = gateway.loop.time() + gateway.body_timeout_s
        rate = gateway.body_min_rate
        if rate:
            by_rate = (
                self.body_started + gateway.body_grace_s + (self.body_seen - self.body_base) / rate
            )
            if by_rate < deadline:
                self.deadline = by_rate
                self.deadline_reason = (
                    f"body (below limits.client_body_min_rate_bytes_per_s, {rate} bytes/s)"
                )
                return
        self.deadline = deadline
        self.deadline_reason = "body"

    # --- exchanges ------------------------------------------------------------------------

    def _start_next(self) -> None:
        if self.current is not None or not self.pending or self.write_paused:
            return  # (a client that does not read gets no further answers until it does)
        if self.transport is None or self.transport.is_closing():
            return
        exchange = self.pending.popleft()
        if self.pause_mask & _PAUSE_PIPELINE and len(self.pending) < MAX_PIPELINE // 2:
            if self.held is not None:
                self.gateway.loop.call_soon(self._feed_held)
            else:
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

    def _refuse_framing(self, status: int, code: str, detail: str) -> None:
        """Bytes that cannot be taken as a request: the answer goes after the answers to the
        requests before them (pipelining keeps its order), then the connection closes."""
        self.pause_reading_for(None, _PAUSE_CLOSING)
        self.held = None
        reason = (status, code, detail)
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
            bad = Exchange(self)
            bad.headers_complete = True
            bad.body_complete = True
            bad.keep_alive = False
            bad.reject = reason
            self.pending.append(bad)
        if self.current is None and self.pending:
            self._start_next()

    def _on_upgrade(self, data: bytes | memoryview, offset: int) -> None:
        """llhttp stops at CONNECT and Upgrade; neither is tunnelled (no open proxy).

        An Upgrade request is served as plain HTTP (Upgrade is hop-by-hop and dropped) and
        the connection closes after it: what follows it is in the protocol the client asked
        for. Its body, which httptools tells llhttp to skip, is framed as its headers say by
        a parser of its own, so no length is ever forwarded without its bytes."""
        upgrading = self.upgrading
        if upgrading is not None:
            self.upgrading = None
            upgrading.keep_alive = False
            self.parsing = upgrading
            self._body_deadline()
            self.upgrade_body = _UpgradeBody(self, upgrading)
            self._feed(self.upgrade_body.parser, data[offset:])
            return
        exchange = self.pending[-1] if self.pending else None
        self.pause_reading_for(None, _PAUSE_CLOSING)
        if exchange is None:
            self._refuse(400, "bad_request", "upgrade without a request")
            return
        exchange.keep_alive = False
        if exchange.method == b"CONNECT":
            exchange.reject = (405, "method_not_allowed", "CONNECT is not supported")

    def upgrade_body_complete(self) -> None:
        self.pause_reading_for(None, _PAUSE_CLOSING)

    def _refuse(self, status: int, code: str, detail: str) -> None:
        self.write(error_response(status, code, detail, "", keep_alive=False))
        self.close()

    def _set_deadline(self, timeout_ms: int, reason: str) -> None:
        self.deadline = self.gateway.loop.time() + timeout_ms / 1000.0
        self.deadline_reason = reason

    def check_deadline(self, now: float) -> None:
        """Called by the gateway's sweeper about twice a second: idle, slowloris, slow-body
        and unread-answer limits."""
        if now >= self.write_deadline:
            # Answers left unread for client_send_timeout_ms: nothing more can be said to
            # this client, and the upstream it pins is freed.
            self.gateway.counters.client_timeouts += 1
            self.abort()
            return
        if now < self.deadline:
            return
        if self.pause_mask:
            # We stopped reading (backpressure): the client is not the slow one.
            self.deadline = now + self.gateway.body_timeout_s
            return
        if self.deadline_reason == "keepalive":
            self.close()
            return
        self.gateway.counters.client_timeouts += 1
        self.deadline = _INF
        self._refuse_framing(
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


class _UpgradeBody:
    """Parses the body of an Upgrade request with a parser of its own, fed a synthetic head
    with the request's framing: Content-Length and chunked bodies are read and validated by
    llhttp exactly as on any other request, and their bytes go to the client connection's
    callbacks (trailers included). Whatever follows the body is ignored."""

    __slots__ = ("client", "parser", "headed", "complete")

    def __init__(self, client: ClientConnection, exchange: Exchange) -> None:
        self.client = client
        self.headed = False
        self.complete = False
        self.parser = httptools.HttpRequestParser(self)
        if exchange.chunked:
            framing = b"transfer-encoding: chunked\r\n"
        else:
            framing = b"content-length: %d\r\n" % (exchange.content_length or 0)
        self.parser.feed_data(b"POST / HTTP/1.1\r\nhost: body\r\n" + framing + b"\r\n")

    def on_headers_complete(self) -> None:
        self.headed = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headed and not self.complete:
            self.client.on_header(name, value)  # a trailer of the real request

    def on_chunk_header(self) -> None:
        if not self.complete:
            self.client.on_chunk_header()

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.client.on_body(body)

    def on_message_complete(self) -> None:
        if self.headed and not self.complete:
            self.complete = True
            self.client.upgrade_body_complete()
            self.client.on_message_complete()
