"""One request's journey: route, unit, assignment, forward upstream, stream the response back.

An Exchange is created when the client connection starts parsing a request and lives until
its response is complete. It reads the Plan once, at start, and keeps it. Bodies stream in
both directions with backpressure; the request body is buffered only while no upstream
connection is attached yet (or when the route needs a JSON field of it for the unit id).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING

import httptools
import orjson

from modelgate.chaos import mutate_json
from modelgate.core import xxh64
from modelgate.exposure import FLAG_ENROLLED, FLAG_FORCED
from modelgate.faults import Throttle
from modelgate.http11 import (
    GATEWAY_SET_RESPONSE_HEADERS,
    connection_tokens,
    error_response,
    is_valid_request_id,
    normalize_path,
    status_line,
)
from modelgate.outcomes import FeedbackError
from modelgate.request_ids import new_request_id
from modelgate.unit import cookie_value, json_field, query_value

if TYPE_CHECKING:
    import asyncio

    from modelgate.chaos import ChaosDecision
    from modelgate.connection import ClientConnection
    from modelgate.plan import CompiledExperiment, CompiledRoute, Plan, UpstreamTarget
    from modelgate.shadow import ShadowSession
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
    "queue_timeout": (503, "no_healthy_upstream"),
    "unavailable": (503, "no_healthy_upstream"),
}

# RFC 9110 §9.2.2: a request of these methods may be sent again after a failure.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def _unit_hash(unit: str) -> int:
    """What the records and the feedback token carry of a unit: computed once per request."""
    return xxh64(unit.encode("utf-8")) if unit else 0


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
        "reject",
        "started_at",
        "shadow",
        "chaos",
        "chaos_timer",
        "sent_body",
        "throttle",
        "model_head",
        "model_body",
        "assignments",
        "body_waiter",
        "pools",
        "variant_line",
        "feedback_line",
        "buffering",
        "model_held",
        "exposed",
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
        self.reject: tuple[int, str, str] | None = None
        self.started_at = 0.0
        self.shadow: ShadowSession | None = None
        self.chaos: ChaosDecision | None = None
        self.chaos_timer: asyncio.TimerHandle | None = None
        self.sent_body = 0
        self.throttle: Throttle | None = None
        self.model_head: list[bytes] | None = None  # head parts held while a model fault waits
        self.model_body: list[bytes] = []
        self.assignments: list[tuple[str, str, bool]] = []  # (experiment, variant, enrolled)
        self.exposed: list[tuple[int, str, str, int]] = []  # unit hash, experiment, variant, flags
        self.body_waiter: Callable[[], None] | None = None  # runs when the body is complete
        self.pools: dict[str, UpstreamPool] = {}  # the pools of the Plan read at start
        self.variant_line = b""  # the x-modelgate-variant header line, when one applies
        self.feedback_line = b""  # the x-modelgate-feedback token line, when one applies
        self.buffering = False  # reading the body whole before taking an upstream connection
        self.model_held = 0  # body bytes held for a model fault

    # --- request body, fed by the client connection -----------------------------------

    def feed_body(self, data: bytes) -> None:
        if self.done:
            return
        self.body_bytes += len(data)
        if self.plan is not None and self.body_bytes > self.plan.limits.max_body_bytes:
            self._body_too_large()
            return
        if self.shadow is not None:
            self.shadow.add_request_body(data)
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
            if self.buffering and self.plan is not None:
                if self.buffered > self.plan.limits.request_buffer_bytes:
                    # Too large to hold whole: stream the rest through a connection.
                    self.body_waiter = None
                    self._acquire()
                return
            self.client.note_buffered(self)

    def finish_body(self) -> None:
        self.body_complete = True
        if self.done:
            return
        if self.shadow is not None and self.plan is not None:
            self.shadow.request_complete(self.plan, self._shadow_head, self.method)
        upstream = self.upstream
        if upstream is not None:
            if self.chunked:
                upstream.write(b"0\r\n\r\n")
        elif self.body_waiter is not None:
            waiter = self.body_waiter
            self.body_waiter = None
            waiter()

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
        # The registry replaces (never mutates) its dict on a reload: this is the Plan's set.
        self.pools = self.client.gateway.registry.pools
        # A precise clock: the loop's time moves in whole milliseconds under uvloop.
        self.started_at = perf_counter()
        rid = self.client_request_id
        self.request_id = rid if rid is not None and is_valid_request_id(rid) else new_request_id()
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
        if path == plan.feedback_path:
            self._feedback(plan)
            return
        route = plan.match(self.method, path, self.headers)
        if route is None:
            self.fail(404, "no_route", f"no route matches {self.method.decode()} {path.decode()}")
            return
        self.route = route
        if route.needs_body_for_unit and not self.body_complete:
            self._wait_for_body(self._route_and_forward)
            return
        self._route_and_forward()

    def _wait_for_body(self, then: Callable[[], None]) -> None:
        self.body_waiter = then
        self._send_continue()
        if self.buffered:
            self.client.note_buffered(self)  # lifts a buffering pause: the body is awaited

    def _route_and_forward(self) -> None:
        route = self.route
        plan = self.plan
        assert route is not None and plan is not None
        upstream_name = route.upstream
        unit: str | None = None
        if route.experiments:
            assigned = self._assign(plan, route)
            if assigned is None:
                return  # answered (no unit and unit_fallback: reject)
            unit, chosen = assigned
            if chosen is not None:
                upstream_name = chosen
        if upstream_name is None:
            self.fail(
                503, "no_healthy_upstream", "no experiment applied and the route has no upstream"
            )
            return
        assert upstream_name is not None
        if route.shadows:
            if unit is None:
                unit = self._unit()
            self._begin_shadow(plan, route, unit)
        self.target = plan.upstreams[upstream_name]
        if route.chaos:
            self._decide_chaos(plan, route, upstream_name, unit)
            decision = self.chaos
            if decision is not None and decision.delay_s > 0:
                self.chaos_timer = self.client.gateway.loop.call_later(
                    decision.delay_s, self._after_delay
                )
                return
            self._after_delay()
            return
        self._forward()

    def _after_delay(self) -> None:
        """Forwards the request, unless a chaos fault answers it first."""
        self.chaos_timer = None
        if self.done:
            return
        decision = self.chaos
        if decision is not None:
            if decision.abort is not None:
                self._chaos_abort(*decision.abort)
                return
            if decision.reset:
                self._chaos_reset()
                return
            if decision.hang:
                # Never forwarded: the watchdog answers 504 after the upstream's timeout.
                gateway = self.client.gateway
                self.upstream_activity = gateway.loop.time()
                gateway.inflight.add(self)
                return
        self._forward()

    def _forward(self) -> None:
        """Sends the request upstream (or queues it for a pooled connection)."""
        plan = self.plan
        target = self.target
        assert plan is not None and target is not None
        pool = self.pools.get(target.name)
        if pool is None:
            self.fail(503, "no_healthy_upstream", f"upstream {target.name!r} has no pool")
            return
        self.pool = pool
        self._send_continue()
        self.request_head = self._request_head(
            target.host_header, target.base_path, self._framing(), b""
        )
        buffer_limit = plan.limits.request_buffer_bytes
        if not self.body_complete and max(self.content_length or 0, self.buffered) <= buffer_limit:
            # A body that fits is read whole first (nginx's proxy_request_buffering): a slow
            # sender then holds a buffer, never one of the upstream's connections.
            self.buffering = True
            self.body_waiter = self._acquire
            if self.buffered:
                self.client.note_buffered(self)  # lifts a buffering pause: the body is awaited
            return
        self._acquire()

    def _acquire(self) -> None:
        self.buffering = False
        pool = self.pool
        assert pool is not None
        conn = pool.acquire(self)
        if conn is not None:
            self.upstream_ready(conn)

    def _decide_chaos(
        self, plan: Plan, route: CompiledRoute, upstream: str, unit: str | None
    ) -> None:
        settings = plan.config.chaos
        requested = None
        if settings.request_header:
            requested = self._header(settings.header.encode("latin-1"))
        if unit is None and any(rule.by == "unit" for rule in route.chaos):
            unit = self._unit()
        self.chaos = self.client.gateway.chaos.decide(
            route.name, route.chaos, self.variant_name, upstream, self.headers, unit, requested
        )

    def _chaos_header(self) -> bytes:
        decision = self.chaos
        plan = self.plan
        if decision is None or plan is None or not plan.config.chaos.response_header:
            return b""
        return b"x-modelgate-chaos: " + decision.header_value + b"\r\n"

    def _chaos_abort(self, status: int, body: bytes | None) -> None:
        decision = self.chaos
        assert decision is not None
        if body is None:
            rules = ", ".join(decision.names)
            self.fail(status, "chaos_abort", f"fault injected by chaos rule {rules}")
            return
        if not self.body_complete or not self.client.gateway.accepting:
            self.keep_alive = False
        self.responded = True
        self.response_status = status
        content_type = b"application/json" if body[:1] in (b"{", b"[") else b"text/plain"
        head = b"".join(
            (
                status_line(status),
                b"content-type: ",
                content_type,
                b"\r\ncontent-length: %d\r\n" % len(body),
                self._gateway_headers(),
                b"" if self.keep_alive else b"connection: close\r\n",
                b"\r\n",
            )
        )
        self.client.write(head if self.method == b"HEAD" else head + body)
        if self.shadow is not None:
            self.shadow.primary_failed(status, body, self.client.gateway.loop.time())
        self._count()
        self._finish()

    def _chaos_reset(self) -> None:
        """A connection reset seen by the client: RST, no response."""
        self.keep_alive = False
        self.response_status = 0
        if self.shadow is not None:
            self.shadow.primary_abandoned()
        self._count()
        self.done = True
        self._release_chaos()
        self.client.reset()

    def _release_chaos(self) -> None:
        if self.chaos is not None:
            self.client.gateway.chaos.release(self.chaos)
        if self.chaos_timer is not None:
            self.chaos_timer.cancel()
            self.chaos_timer = None
        if self.throttle is not None:
            self.throttle.close()

    def _gateway_headers(self) -> bytes:
        """x-request-id, then the route, variant and chaos headers of every response."""
        return b"x-request-id: " + self.request_id + b"\r\n" + self._tag_headers()

    def _tag_headers(self) -> bytes:
        route = self.route
        if self.chaos is None and route is not None:
            # The common case: no join.
            return route.route_header + self.variant_line + self.feedback_line
        return b"".join(
            (
                route.route_header if route is not None else b"",
                b"x-modelgate-variant: " + self.variant_header + b"\r\n"
                if self.variant_header
                else b"",
                self.feedback_line,
                self._chaos_header(),
            )
        )

    def _assign(self, plan: Plan, route: CompiledRoute) -> tuple[str | None, str | None] | None:
        """Assigns every experiment of the route; returns (unit, upstream the variants chose),
        or None when the request was answered (no unit id and `unit_fallback: reject`)."""
        experiments = route.experiments
        if len(experiments) == 1 and plan.force_header is None and experiments[0].targeting.plain:
            return self._assign_plain(plan, route, experiments[0])
        unit: str | None = None
        unit_hash = 0  # XXH64 of the unit once it is known: for exposures and the token
        hashed = plan.exposures or plan.remember_requests
        upstream: str | None = None
        names: list[bytes] = []
        for experiment in experiments:
            index = self._forced_variant(plan, experiment.name, experiment.by_name)
            enrolled = False
            index_from_unit = index < 0
            if index < 0:
                if unit is None:
                    unit = self._unit_or_fallback(route)
                    if unit is None:
                        return None
                    unit_hash = _unit_hash(unit) if hashed else 0
                assignment = experiment.targeting.assign(unit, self._lookup)
                if assignment is None:
                    continue  # the unit's layer puts it in another experiment
                index = assignment.index
                enrolled = assignment.enrolled
            variant = experiment.variants[index]
            if not names:
                self.variant_name = variant.name
            names.append(variant.assignment)
            self.assignments.append((experiment.name, variant.name, enrolled))
            if plan.exposures:
                self.exposed.append(
                    (
                        unit_hash,
                        experiment.name,
                        variant.name,
                        (FLAG_ENROLLED if enrolled else 0)
                        | (0 if index_from_unit else FLAG_FORCED),
                    )
                )
            if upstream is None and variant.routes_traffic:
                upstream = variant.upstream
        if not names:
            return unit, upstream
        self.variant_header = names[0] if len(names) == 1 else b",".join(names)
        self.variant_line = b"x-modelgate-variant: " + self.variant_header + b"\r\n"
        if plan.remember_requests:
            self._remember(plan, unit_hash, tuple(self.assignments))
        return unit, upstream

    def _assign_plain(
        self, plan: Plan, route: CompiledRoute, experiment: CompiledExperiment
    ) -> tuple[str | None, str | None] | None:
        """One experiment with weights only: the per-request fast path of `_assign`."""
        unit = self._unit_or_fallback(route)
        if unit is None:
            return None
        variant = experiment.variants[experiment.table.assign(experiment.salt, unit)]
        self.variant_name = variant.name
        self.variant_header = variant.assignment
        self.variant_line = variant.header_line
        record = variant.record
        self.assignments.append(record)
        if plan.exposures or plan.remember_requests:
            unit_hash = _unit_hash(unit)
            if plan.exposures:
                self.exposed.append((unit_hash, record[0], record[1], FLAG_ENROLLED))
            if plan.remember_requests:
                self._remember(plan, unit_hash, (record,))
        return unit, variant.upstream if variant.routes_traffic else None

    def _remember(
        self, plan: Plan, unit_hash: int, assignments: tuple[tuple[str, str, bool], ...]
    ) -> None:
        """Keeps the request for feedback by its id, and hands the client the token that
        proves, in that feedback, that it got this very response (issue 12)."""
        self.client.gateway.outcomes.remember(
            self.request_id,
            assignments,
            self.client.gateway.loop.time(),
            plan.config.feedback,
            unit_hash,
        )
        token = plan.feedback_keys.token(self.request_id, unit_hash, self.variant_header)
        self.feedback_line = b"x-modelgate-feedback: " + token + b"\r\n"

    def _unit_or_fallback(self, route: CompiledRoute) -> str | None:
        unit = self._unit()
        if unit is not None:
            return unit
        if route.unit_fallback == "reject":
            sources = ", ".join(f"{s.kind}:{s.name}" for s in route.unit_sources)
            self.fail(400, "no_unit", f"no unit id in the request (looked in {sources})")
            return None
        if route.unit_fallback == "client_ip":
            return self.client.peer_ip
        self.client.gateway.counters.unit_fallbacks += 1
        return os.urandom(8).hex()

    def _lookup(self, kind: str, name: str) -> str | None:
        """A request value for segment conditions (header names come lowercase)."""
        return self._value(kind, name.encode("latin-1" if kind == "header" else "utf-8"))

    def _value(self, kind: str, key: bytes) -> str | None:
        """A header (`key` lowercase), cookie or query parameter of the request, or None."""
        if kind == "header":
            value = self._header(key)
            return value.decode("utf-8", "replace") if value is not None else None
        if kind == "cookie":
            for lname, _, header_value in self.headers:
                if lname == b"cookie":
                    found = cookie_value(header_value, key)
                    if found is not None:
                        return found
            return None
        _, sep, query = self.url.partition(b"?")
        return query_value(query, key) if sep else None

    def _begin_shadow(self, plan: Plan, route: CompiledRoute, unit: str | None) -> None:
        # The pair is labelled with the experiment whose variant the request got (the first
        # that assigned it: a layer may leave the unit out of the route's first experiment).
        experiment = self.assignments[0][0] if self.assignments else ""
        session = self.client.gateway.shadows.begin(
            plan,
            route,
            self.method,
            unit,
            (self.request_id, experiment, self.variant_name),
            plan.limits.shadow_body_max_bytes,
        )
        if session is None:
            return
        self.shadow = session
        shadow_upstreams = {s.upstream for s in route.shadows}
        if any(rule.upstream in shadow_upstreams for rule in route.chaos):
            session.faults_for = self._shadow_faults
        for chunk in self.body_chunks:  # what arrived before the route was decided
            session.add_request_body(chunk)
        if self.body_complete:
            session.request_complete(plan, self._shadow_head, self.method)

    def _shadow_faults(self, upstream: str) -> ChaosDecision | None:
        """Chaos for a shadow copy: only rules scoped to that shadow's upstream."""
        route = self.route
        plan = self.plan
        assert route is not None and plan is not None
        rules = [rule for rule in route.chaos if rule.upstream == upstream]
        settings = plan.config.chaos
        requested = (
            self._header(settings.header.encode("latin-1")) if settings.request_header else None
        )
        return self.client.gateway.chaos.decide(
            route.name, rules, self.variant_name, upstream, self.headers, None, requested
        )

    def _feedback(self, plan: Plan) -> None:
        """POST feedback on the main listener: answered by the gateway itself."""
        if self.method != b"POST":
            self.fail(405, "method_not_allowed", "feedback takes POST with a JSON body")
            return
        limit = plan.config.feedback.max_body_bytes
        if (self.content_length or 0) > limit or self.body_bytes > limit:
            self.keep_alive = False
            self.fail(413, "body_too_large", f"feedback bodies are limited to {limit} bytes")
            return
        if not self.body_complete:
            self._wait_for_body(lambda: self._feedback(plan))
            return
        gateway = self.client.gateway
        keys = plan.feedback_keys
        try:
            result = gateway.outcomes.handle_feedback(
                b"".join(self.body_chunks),
                plan,
                gateway.loop.time(),
                keys.credential(self._header(keys.unit_header)),
            )
        except FeedbackError as exc:
            self.fail(exc.status, exc.code, exc.detail)
            return
        result["request_id"] = self.request_id.decode("ascii", "replace")
        self._respond_json(202, orjson.dumps(result))

    def _respond_json(self, status: int, body: bytes) -> None:
        if not self.client.gateway.accepting:
            self.keep_alive = False
        self.responded = True
        self.response_status = status
        self.client.write(
            b"".join(
                (
                    status_line(status),
                    b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
                    b"x-request-id: ",
                    self.request_id,
                    b"\r\n",
                    b"" if self.keep_alive else b"connection: close\r\n",
                    b"\r\n",
                    body,
                )
            )
        )
        self._count()
        self._finish()

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
            if source.kind != "json":
                found = self._value(source.kind, source.key)
                if found:  # an empty header is no unit id
                    return found
            elif self.body_complete and self.body_chunks:
                found = json_field(b"".join(self.body_chunks), source.name)
                if found is not None:
                    return found
        return None

    def _framing(self) -> bytes:
        if self.chunked:
            return b"transfer-encoding: chunked\r\n"
        if self.content_length is not None:
            return b"content-length: %d\r\n" % self.content_length
        return b""

    def _shadow_head(self, host_header: bytes, base_path: bytes, content_length: int) -> bytes:
        """The head of a shadow copy: the whole body is buffered, so its length is known."""
        framing = b"content-length: %d\r\n" % content_length
        if not content_length and self.content_length is None and not self.chunked:
            framing = b""
        return self._request_head(host_header, base_path, framing, b"x-modelgate-shadow: 1\r\n")

    def _request_head(
        self, host_header: bytes, base_path: bytes, framing: bytes, extra: bytes
    ) -> bytes:
        forward = self.forward
        if self.connection_tokens:
            forward = self._drop_named(forward, self.connection_tokens)
        peer = self.client.peer_ip_bytes
        forwarded_for = self.forwarded_for
        return b"".join(
            (
                self.method,
                b" ",
                base_path,
                self.url,
                b" HTTP/1.1\r\n",
                host_header,
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
                extra,
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
            and self._replayable()
        ):
            # The upstream closed a keep-alive connection as we reused it: most likely it
            # never saw the request, so send it again on another connection.
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
            if self.shadow is not None:
                self.shadow.primary_abandoned()
            self.keep_alive = False
            self._finish()
            self.client.abort()
            return
        status, code = _UPSTREAM_FAILURE_STATUS.get(kind, (502, "upstream_broken"))
        self.keep_alive = self.keep_alive and self.body_complete
        self.fail(status, code, detail)

    def _replayable(self) -> bool:
        """Whether the request may be sent twice: a reused connection that died before any
        answer may still have delivered it to the model (nginx's proxy_next_upstream and Go's
        http.Transport retry only idempotent requests, or those with an Idempotency-Key)."""
        if self.method in IDEMPOTENT_METHODS:
            return True
        target = self.target
        if target is not None and target.retry_non_idempotent:
            return True
        return (
            self._header(b"idempotency-key") is not None
            or self._header(b"x-idempotency-key") is not None
        )

    def response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes, bytes]], framed: bool
    ) -> None:
        if self.done:
            return
        self.upstream_activity = self.client.gateway.loop.time()
        self.responded = True
        self.response_status = status
        if self.shadow is not None:
            self.shadow.primary_head(status, headers)
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
        decision = self.chaos
        if decision is not None and decision.model is not None and not no_body:
            if self._hold_for_model_fault(status, headers, content_length, parts):
                return
        if no_body:
            if content_length is not None and status != 204:
                parts += (b"content-length: ", content_length, b"\r\n")
        elif content_length is not None:
            parts += (b"content-length: ", content_length, b"\r\n")
        else:
            self._frame_unknown_length(parts)
        # Held back until the end of this read so head and body leave in one write.
        self.pending_head = self._close_head(parts)
        if decision is not None:
            if decision.slow_bytes_per_s is not None and not no_body:
                self.throttle = Throttle(
                    decision.slow_bytes_per_s, self.client.write, self._pause_upstream_reading
                )
                self.flush_head()

    def _frame_unknown_length(self, parts: list[bytes]) -> None:
        if self.version == "1.1":
            self.client_chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            self.keep_alive = False  # HTTP/1.0 client, unknown length: close-delimited

    def _close_head(self, parts: list[bytes]) -> bytes:
        """The gateway's headers, the connection verdict and the blank line."""
        if not self.client.gateway.accepting:
            self.keep_alive = False
        parts.append(self._gateway_headers())
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif self.version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _pause_upstream_reading(self, pause: bool) -> None:
        if self.upstream is not None:
            if pause:
                self.upstream.pause_reading()
            else:
                self.upstream.resume_reading()

    def _hold_for_model_fault(
        self,
        status: int,
        headers: list[tuple[bytes, bytes, bytes]],
        content_length: bytes | None,
        parts: list[bytes],
    ) -> bool:
        """Buffers a JSON answer so a model fault can rewrite it (its length changes)."""
        plan = self.plan
        assert plan is not None
        limit = plan.limits.shadow_body_max_bytes
        is_json = any(n == b"content-type" and b"json" in v for n, _, v in headers)
        if not (200 <= status < 300 and is_json):
            return False
        if content_length is not None and int(content_length) > limit:
            self._count_model_skip()
            return False
        self.model_head = parts
        return True

    def _count_model_skip(self) -> None:
        decision = self.chaos
        if decision is not None and decision.model_counts is not None:
            decision.model_counts["skipped_too_large"] += 1

    def _release_model_hold(self) -> None:
        """A held answer grew past shadow_body_max_bytes: it goes to the client unfaulted,
        the held part now and the rest as it streams, so the hold never exceeds the limit."""
        parts = self.model_head
        assert parts is not None
        self.model_head = None
        held = b"".join(self.model_body)
        self.model_body = []
        self._count_model_skip()
        self._frame_unknown_length(parts)
        self.client.write(self._close_head(parts))
        self._write_body(held)

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
        if self.shadow is not None:
            self.shadow.add_primary_body(data)
        if self.chaos is not None and self._faulted_body(data):
            return
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

    def _faulted_body(self, data: bytes) -> bool:
        """Applies the response-side chaos faults; True when it consumed `data`."""
        decision = self.chaos
        assert decision is not None
        if self.model_head is not None:
            self.model_body.append(data)
            self.model_held += len(data)
            plan = self.plan
            if plan is not None and self.model_held > plan.limits.shadow_body_max_bytes:
                self._release_model_hold()
            return True
        truncate = decision.truncate_bytes
        if truncate is not None:
            room = truncate - self.sent_body
            if len(data) >= room:
                # The client gets the first `truncate_bytes` of the body, then a cut.
                self.flush_head()
                self._write_body(data[: max(room, 0)])
                self._truncated()
                return True
            self.sent_body += len(data)
        if self.throttle is not None:
            self.flush_head()
            if self.client_chunked:
                self.throttle.push(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self.throttle.push(data)
            return True
        return False

    def _write_body(self, data: bytes) -> None:
        if not data:
            return
        if self.client_chunked:
            self.client.writelines([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            self.client.write(data)

    def _truncated(self) -> None:
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.abort()
        self.keep_alive = False
        if self.shadow is not None:
            self.shadow.primary_abandoned()
        self._count()
        self._finish()
        self.client.close()

    def _complete_model_fault(self) -> None:
        decision = self.chaos
        parts = self.model_head
        assert decision is not None and decision.model is not None and parts is not None
        body = b"".join(self.model_body)
        rng = decision.rng
        assert rng is not None
        faulted = mutate_json(body, decision.model, rng)
        if faulted is not None:
            body = faulted
        parts.append(b"content-length: %d\r\n" % len(body))
        self.client.writelines([self._close_head(parts), body])

    def response_complete(self) -> None:
        if self.done:
            return
        if self.model_head is not None:
            self._complete_model_fault()
            self.model_head = None
        conn = self.upstream
        self.upstream = None
        head = self.pending_head
        self.pending_head = None
        throttle = self.throttle
        if throttle is not None:
            if head is not None:
                self.client.write(head)
            if self.client_chunked:
                throttle.push(b"0\r\n\r\n")
        elif self.client_chunked:
            self.client.writelines([head, b"0\r\n\r\n"] if head else [b"0\r\n\r\n"])
        elif head is not None:
            self.client.write(head)
        if conn is not None and self.pool is not None:
            exact = self.chunked or self.body_bytes == (self.content_length or 0)
            if self.body_complete and exact:
                self.pool.release(conn)
            else:
                # The upstream answered before the request body ended (or the body sent was
                # not the one its head announced): the connection's framing is unknown.
                conn.close()
                if not self.body_complete:
                    self.keep_alive = False
        if self.shadow is not None:
            self.shadow.primary_complete(self.client.gateway.loop.time())
        if throttle is not None:
            # The exchange ends when the throttled body has reached the client.
            throttle.finish(self._finish_after_throttle)
            return
        self._count()
        self._finish()

    def _finish_after_throttle(self) -> None:
        if not self.done:
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
        response = error_response(
            status,
            code,
            detail,
            self.request_id.decode("ascii", "replace"),
            keep_alive=self.keep_alive,
            head_only=self.method == b"HEAD",
            extra_headers=self._tag_headers(),
        )
        self.client.write(response)
        if self.shadow is not None:
            body = response.partition(b"\r\n\r\n")[2]
            self.shadow.primary_failed(status, body, self.client.gateway.loop.time())
        self._count()
        self._finish()

    def _count(self) -> None:
        route = self.route
        gateway = self.client.gateway
        gateway.counters.count_response(
            route.name if route is not None else "", self.variant_name, self.response_status
        )
        latency = perf_counter() - self.started_at if self.started_at else 0.0
        gateway.counters.observe_latency(
            route.name if route is not None else "", self.variant_name, latency
        )
        if self.assignments:
            error = self.response_status >= 500 or self.response_status == 0
            gateway.outcomes.observe_all(self.assignments, latency, error)
        if self.exposed:
            self._write_exposures(latency, measured=True)

    def _write_exposures(self, latency: float, *, measured: bool) -> None:
        """The exposure records, written once the answer is known so that they carry its
        status and latency (`measured`: False when the client left before it)."""
        plan = self.plan
        if plan is not None:
            self.client.gateway.outcomes.expose_all(
                plan,
                self.request_id,
                self.exposed,
                self.response_status if measured else 0,
                round(latency * 1e6),
                measured,
            )
        self.exposed = []

    def _finish(self) -> None:
        self.done = True
        self.client.gateway.inflight.discard(self)
        if self.chaos is not None:
            self._release_chaos()
        self.body_chunks = []
        self.replay = None
        self.client.exchange_done(self)

    def abandon(self) -> None:
        """The client went away: free the upstream side without answering anyone."""
        if self.done:
            return
        self.done = True
        self.client.gateway.inflight.discard(self)
        if self.chaos is not None:
            self._release_chaos()
        if self.shadow is not None:
            self.shadow.primary_abandoned()
        if self.exposed:
            started = self.started_at
            self._write_exposures(perf_counter() - started if started else 0.0, measured=False)
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.abort()
        elif self.pool is not None:
            self.pool.cancel_wait(self)
        self.body_chunks = []
        self.replay = None


def parse_request_target(url: bytes) -> bytes | None:
    """The origin-form target (`/path?query`, its path normalized) that routes match and
    the upstream gets; None when unusable."""
    if url[:1] == b"/":
        path, sep, query = url.partition(b"?")
        if b"%" not in path and b"/." not in path:
            return url  # the common case: nothing to normalize
        return normalize_path(path) + sep + query
    if url == b"*":
        return url
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        return None
    path = normalize_path(parsed.path or b"/")
    return path + b"?" + parsed.query if parsed.query else path
