"""One request's journey: route, unit, assignment, forward upstream, stream the response back.

An Exchange is created when the client connection starts parsing a request and lives until
its response is complete. It reads the Plan once, at start, and keeps it. Bodies stream in
both directions with backpressure; the request body is buffered only while no upstream
connection is attached yet (or when the route needs a JSON field of it for the unit id).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import httptools

from modelgate.http11 import (
    GATEWAY_SET_RESPONSE_HEADERS,
    connection_tokens,
    error_response,
    is_valid_request_id,
    status_line,
)
from modelgate.unit import cookie_value, json_field, query_value

if TYPE_CHECKING:
    from modelgate.connection import ClientConnection
    from modelgate.plan import CompiledRoute, Plan, UpstreamTarget
    from modelgate.upstream import UpstreamConnection, UpstreamPool

__all__ = ["Exchange"]

# A request body up to this size is kept so a request can be replayed once on a fresh
# connection when a reused keep-alive connection turns out to be closed by the upstream.
REPLAY_LIMIT = 256 * 1024
MAX_REPLAYS = 2

_UPSTREAM_FAILURE_STATUS = {
    "connect_failed": (502, "upstream_unreachable"),
    "reset": (502, "upstream_broken"),
    "bad_response": (502, "upstream_broken"),
    "connect_timeout": (504, "upstream_timeout"),
    "timeout": (504, "upstream_timeout"),
    "saturated": (503, "no_healthy_upstream"),
    "unavailable": (503, "no_healthy_upstream"),
}

_REQUEST_ID_PREFIX = os.urandom(6).hex().encode()
_request_counter = 0


def _reseed_request_ids() -> None:
    # Forked workers must not share the parent's prefix, or their ids would collide.
    global _REQUEST_ID_PREFIX, _request_counter
    _REQUEST_ID_PREFIX = os.urandom(6).hex().encode()
    _request_counter = 0


os.register_at_fork(after_in_child=_reseed_request_ids)


def _new_request_id() -> bytes:
    # A random per-process prefix and a counter: unique across workers and restarts, and
    # ~10x cheaper than uuid4 on the request path.
    global _request_counter
    _request_counter += 1
    return b"%s-%x" % (_REQUEST_ID_PREFIX, _request_counter)


class Exchange:
    """A request and its response. States advance one way: parsing -> started -> done."""

    __slots__ = (
        "client",
        "method",
        "url",
        "headers",
        "forward",
        "client_request_id",
        "forwarded_for",
        "connection_tokens",
        "version",
        "keep_alive",
        "content_length",
        "chunked",
        "expect_continue",
        "host",
        "request_id",
        "headers_complete",
        "body_chunks",
        "buffered",
        "body_bytes",
        "body_complete",
        "replay",
        "replays",
        "started",
        "done",
        "plan",
        "route",
        "target",
        "pool",
        "variant_header",
        "variant_name",
        "upstream",
        "request_head",
        "responded",
        "response_status",
        "client_chunked",
        "no_response_body",
        "pending_head",
        "upstream_activity",
        "waiting_for_body",
        "reject",
        "started_at",
    )

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes, bytes]] = []  # (lowercase name, name, value)
        self.forward: list[bytes] = []  # name, ": ", value, CRLF of headers passed upstream
        self.client_request_id: bytes | None = None
        self.forwarded_for: bytes | None = None
        self.connection_tokens: set[bytes] | None = None
        self.version = "1.1"
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.host: bytes | None = None
        self.request_id = b""
        self.headers_complete = False
        self.body_chunks: list[bytes] = []
        self.buffered = 0
        self.body_bytes = 0
        self.body_complete = False
        self.replay: list[bytes] | None = []
        self.replays = 0
        self.started = False
        self.done = False
        self.plan: Plan | None = None
        self.route: CompiledRoute | None = None
        self.target: UpstreamTarget | None = None
        self.pool: UpstreamPool | None = None
        self.variant_header = b""
        self.variant_name = ""
        self.upstream: UpstreamConnection | None = None
        self.request_head = b""
        self.responded = False
        self.response_status = 0
        self.client_chunked = False
        self.no_response_body = False
        self.pending_head: bytes | None = None
        self.upstream_activity = 0.0
        self.waiting_for_body = False
        self.reject: tuple[int, str, str] | None = None
        self.started_at = 0.0

    # --- request body, fed by the client connection -----------------------------------

    def feed_body(self, data: bytes) -> None:
        if self.done:
            return
        self.body_bytes += len(data)
        if self.plan is not None and self.body_bytes > self.plan.limits.max_body_bytes:
            self._body_too_large()
            return
        replay = self.replay
        if replay is not None:
            if self.body_bytes <= REPLAY_LIMIT:
                replay.append(data)
            else:
                self.replay = None
        upstream = self.upstream
        if upstream is not None:
            # Sending the body counts as upstream activity for the response timeout.
            self.upstream_activity = self.client.gateway.loop.time()
            if self.chunked:
                upstream.writelines([b"%x\r\n" % len(data), data, b"\r\n"])
            else:
                upstream.write(data)
        else:
            self.body_chunks.append(data)
            self.buffered += len(data)
            self.client.note_buffered(self)

    def finish_body(self) -> None:
        self.body_complete = True
        if self.done:
            return
        upstream = self.upstream
        if upstream is not None:
            if self.chunked:
                upstream.write(b"0\r\n\r\n")
        elif self.waiting_for_body:
            self.waiting_for_body = False
            self._route_and_forward()

    def body_error(self, status: int, code: str, detail: str) -> None:
        """The request body turned out malformed after the exchange started."""
        if self.done:
            return
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        elif self.pool is not None:
            self.pool.cancel_wait(self)
        self.keep_alive = False
        if self.responded:
            self._finish()
            self.client.abort()
        else:
            self.fail(status, code, detail)

    def _body_too_large(self) -> None:
        limit = self.plan.limits.max_body_bytes if self.plan is not None else 0
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self.keep_alive = False
        if not self.responded:
            self.fail(413, "body_too_large", f"request body exceeds max_body_bytes ({limit})")
        else:
            self.client.abort()

    # --- start: route, unit, assignment -----------------------------------------------

    def start(self, plan: Plan) -> None:
        """Becomes the connection's active exchange: decide where it goes and send it."""
        self.started = True
        self.plan = plan
        self.started_at = self.client.gateway.loop.time()
        rid = self.client_request_id
        self.request_id = rid if rid is not None and is_valid_request_id(rid) else _new_request_id()
        if self.reject is not None:
            self.keep_alive = False
            self.fail(*self.reject)
            return
        limit = plan.limits.max_body_bytes
        if self.content_length is not None and self.content_length > limit:
            self.keep_alive = False
            self.fail(413, "body_too_large", f"request body exceeds max_body_bytes ({limit})")
            return
        if self.body_bytes > limit:
            self._body_too_large()
            return
        path = self.url.split(b"?", 1)[0]
        route = plan.match(self.method, path, self.headers)
        if route is None:
            self.fail(404, "no_route", f"no route matches {self.method.decode()} {path.decode()}")
            return
        self.route = route
        if route.needs_body_for_unit and not self.body_complete:
            self.waiting_for_body = True
            self._send_continue()
            return
        self._route_and_forward()

    def _route_and_forward(self) -> None:
        route = self.route
        plan = self.plan
        assert route is not None and plan is not None
        upstream_name = route.upstream
        experiment = route.experiment
        if experiment is not None:
            index = self._forced_variant(plan, experiment.name, experiment.by_name)
            if index < 0:
                unit = self._unit()
                if unit is None:
                    if route.unit_fallback == "reject":
                        sources = ", ".join(f"{s.kind}:{s.name}" for s in route.unit_sources)
                        self.fail(
                            400, "no_unit", f"no unit id in the request (looked in {sources})"
                        )
                        return
                    if route.unit_fallback == "client_ip":
                        unit = self.client.peer_ip
                    else:
                        unit = os.urandom(8).hex()
                        self.client.gateway.counters.unit_fallbacks += 1
                index = experiment.table.assign(experiment.salt, unit)
            variant = experiment.variants[index]
            self.variant_name = variant.name
            self.variant_header = variant.assignment
            upstream_name = variant.upstream
        assert upstream_name is not None
        self.target = plan.upstreams[upstream_name]
        pool = self.client.gateway.registry.pools.get(upstream_name)
        if pool is None:
            self.fail(503, "no_healthy_upstream", f"upstream {upstream_name!r} has no pool")
            return
        self.pool = pool
        self._send_continue()
        self.request_head = self._build_request_head()
        conn = pool.acquire(self)
        if conn is not None:
            self.upstream_ready(conn)

    def _send_continue(self) -> None:
        if self.expect_continue and not self.body_complete and not self.responded:
            self.expect_continue = False
            self.client.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _header(self, lname: bytes) -> bytes | None:
        for name, _, value in self.headers:
            if name == lname:
                return value
        return None

    def _forced_variant(self, plan: Plan, experiment: str, by_name: dict[str, int]) -> int:
        header = plan.force_header
        if header is None:
            return -1
        value = self._header(header)
        if value is None:
            return -1
        for item in value.decode("latin-1").split(","):
            name, _, variant = item.strip().partition("=")
            if name == experiment and variant in by_name:
                return by_name[variant]
        return -1

    def _unit(self) -> str | None:
        route = self.route
        assert route is not None
        for source in route.unit_sources:
            kind = source.kind
            if kind == "header":
                value = self._header(source.key)
                if value:
                    return value.decode("utf-8", "replace")
            elif kind == "cookie":
                for name, _, header_value in self.headers:
                    if name == b"cookie":
                        found = cookie_value(header_value, source.key)
                        if found is not None:
                            return found
            elif kind == "query":
                _, sep, query = self.url.partition(b"?")
                if sep:
                    found = query_value(query, source.key)
                    if found is not None:
                        return found
            elif self.body_complete and self.body_chunks:
                found = json_field(b"".join(self.body_chunks), source.name)
                if found is not None:
                    return found
        return None

    def _build_request_head(self) -> bytes:
        target = self.target
        assert target is not None
        forward = self.forward
        if self.connection_tokens:
            forward = self._drop_named(forward, self.connection_tokens)
        if self.chunked:
            framing = b"transfer-encoding: chunked\r\n"
        elif self.content_length is not None:
            framing = b"content-length: %d\r\n" % self.content_length
        else:
            framing = b""
        peer = self.client.peer_ip_bytes
        forwarded_for = self.forwarded_for
        return b"".join(
            (
                self.method,
                b" ",
                target.base_path,
                self.url,
                b" HTTP/1.1\r\n",
                target.host_header,
                *forward,
                framing,
                b"x-request-id: ",
                self.request_id,
                b"\r\nx-forwarded-for: ",
                forwarded_for + b", " + peer if forwarded_for else peer,
                b"\r\nx-forwarded-proto: http\r\n",
                b"x-forwarded-host: " + self.host + b"\r\n" if self.host is not None else b"",
                b"x-modelgate-variant: " + self.variant_header + b"\r\n"
                if self.variant_header
                else b"",
                b"\r\n",
            )
        )

    @staticmethod
    def _drop_named(parts: list[bytes], tokens: set[bytes]) -> list[bytes]:
        """Removes headers named by `Connection` (parts are name, ': ', value, CRLF quads)."""
        kept: list[bytes] = []
        for i in range(0, len(parts), 4):
            if parts[i].lower() not in tokens:
                kept += parts[i : i + 4]
        return kept

    # --- upstream callbacks (ResponseSink) --------------------------------------------

    def upstream_ready(self, conn: UpstreamConnection) -> None:
        if self.done:
            if self.pool is not None:
                self.pool.release(conn)
            return
        self.upstream = conn
        # The head and whatever body is buffered leave in one write (one syscall).
        parts = [self.request_head]
        if self.body_chunks:
            chunks = self.body_chunks
            self.body_chunks = []
            self.buffered = 0
            if self.chunked:
                for data in chunks:
                    parts += (b"%x\r\n" % len(data), data, b"\r\n")
            else:
                parts += chunks
            self.client.note_buffered(self)
        if self.body_complete and self.chunked:
            parts.append(b"0\r\n\r\n")
        conn.start(self, parts, head_request=self.method == b"HEAD")
        gateway = self.client.gateway
        self.upstream_activity = gateway.loop.time()
        gateway.inflight.add(self)

    def check_timeout(self, now: float) -> None:
        """Called by the gateway's watchdog (every ~20 ms) while the exchange is upstream."""
        target = self.target
        if self.done or target is None:
            return
        if now - self.upstream_activity > target.timeout_s:
            ms = target.timeout_s * 1000
            self.upstream_failed(
                "timeout", f"upstream {target.name!r} did not answer in {ms:.0f} ms"
            )

    def upstream_failed(self, kind: str, detail: str, *, reused_idle: bool = False) -> None:
        if self.done:
            return
        gateway = self.client.gateway
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.abort()
        if (
            reused_idle
            and not self.responded
            and self.replay is not None
            and self.replays < MAX_REPLAYS
            and self.pool is not None
        ):
            # The upstream closed a keep-alive connection as we reused it: it never saw the
            # request, so send it again on another connection.
            self.replays += 1
            gateway.counters.replays += 1
            self.body_chunks = list(self.replay)
            self.buffered = sum(len(c) for c in self.body_chunks)
            new_conn = self.pool.acquire(self)
            if new_conn is not None:
                self.upstream_ready(new_conn)
            return
        gateway.counters.count_upstream_error(kind)
        if self.responded:
            self.keep_alive = False
            self._finish()
            self.client.abort()
            return
        status, code = _UPSTREAM_FAILURE_STATUS.get(kind, (502, "upstream_broken"))
        self.keep_alive = self.keep_alive and self.body_complete
        self.fail(status, code, detail)

    def response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes, bytes]], framed: bool
    ) -> None:
        if self.done:
            return
        self.upstream_activity = self.client.gateway.loop.time()
        self.responded = True
        self.response_status = status
        route = self.route
        assert route is not None
        parts = [status_line(status, reason)]
        tokens: set[bytes] | None = None
        content_length: bytes | None = None
        for lname, name, value in headers:
            if lname in GATEWAY_SET_RESPONSE_HEADERS:
                if lname == b"connection":
                    tokens = connection_tokens(value)
                elif lname == b"content-length":
                    content_length = value
                continue
            parts += (name, b": ", value, b"\r\n")
        if tokens:
            parts = [parts[0], *self._drop_named(parts[1:], tokens)]
        no_body = self.method == b"HEAD" or status in (204, 304)
        self.no_response_body = no_body
        chunked_upstream = framed and content_length is None
        if no_body:
            if content_length is not None and status != 204:
                parts += (b"content-length: ", content_length, b"\r\n")
        elif content_length is not None and not chunked_upstream:
            parts += (b"content-length: ", content_length, b"\r\n")
        elif self.version == "1.1":
            self.client_chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            self.keep_alive = False  # HTTP/1.0 client, unknown length: close-delimited
        if not self.client.gateway.accepting:
            self.keep_alive = False
        parts += (b"x-request-id: ", self.request_id, b"\r\n", route.route_header)
        if self.variant_header:
            parts += (b"x-modelgate-variant: ", self.variant_header, b"\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif self.version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        # Held back until the end of this read so head and body leave in one write.
        self.pending_head = b"".join(parts)

    def flush_head(self) -> None:
        """End of an upstream read: a head not yet followed by body goes out now (streams)."""
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            self.client.write(head)

    def response_body(self, data: bytes) -> None:
        if self.done or self.no_response_body:
            return
        self.upstream_activity = self.client.gateway.loop.time()
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            if self.client_chunked:
                self.client.writelines([head, b"%x\r\n" % len(data), data, b"\r\n"])
            else:
                self.client.writelines([head, data])
        elif self.client_chunked:
            self.client.writelines([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            self.client.write(data)

    def response_complete(self) -> None:
        if self.done:
            return
        conn = self.upstream
        self.upstream = None
        head = self.pending_head
        self.pending_head = None
        if self.client_chunked:
            self.client.writelines([head, b"0\r\n\r\n"] if head else [b"0\r\n\r\n"])
        elif head is not None:
            self.client.write(head)
        if conn is not None and self.pool is not None:
            if self.body_complete:
                self.pool.release(conn)
            else:
                # The upstream answered before the request body ended: neither side's
                # framing can be trusted for another request.
                conn.close()
                self.keep_alive = False
        self._count()
        self._finish()

    def upstream_pause_writing(self) -> None:
        self.client.pause_reading_for(self)

    def upstream_resume_writing(self) -> None:
        self.client.resume_reading_for(self)

    # --- endings --------------------------------------------------------------------

    def fail(self, status: int, code: str, detail: str) -> None:
        """Answers with the gateway's JSON error (DESIGN.md) and ends the exchange."""
        if self.done:
            return
        if not self.body_complete:
            self.keep_alive = False  # the rest of the body was never read
        if not self.client.gateway.accepting:
            self.keep_alive = False
        self.responded = True
        self.response_status = status
        self.client.write(
            error_response(
                status,
                code,
                detail,
                self.request_id.decode("ascii", "replace"),
                keep_alive=self.keep_alive,
                head_only=self.method == b"HEAD",
                extra_headers=self.route.route_header if self.route is not None else b"",
            )
        )
        self._count()
        self._finish()

    def _count(self) -> None:
        route = self.route
        self.client.gateway.counters.count_response(
            route.name if route is not None else "", self.variant_name, self.response_status
        )

    def _finish(self) -> None:
        self.done = True
        self.client.gateway.inflight.discard(self)
        self.body_chunks = []
        self.replay = None
        self.client.exchange_done(self)

    def abandon(self) -> None:
        """The client went away: free the upstream side without answering anyone."""
        if self.done:
            return
        self.done = True
        self.client.gateway.inflight.discard(self)
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.abort()
        elif self.pool is not None:
            self.pool.cancel_wait(self)
        self.body_chunks = []
        self.replay = None


def parse_request_target(url: bytes) -> bytes | None:
    """The origin-form target (`/path?query`) the upstream gets; None when unusable."""
    if url[:1] == b"/":
        return url
    if url == b"*":
        return url
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        return None
    path = parsed.path or b"/"
    return path + b"?" + parsed.query if parsed.query else path
