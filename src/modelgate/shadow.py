"""Shadow traffic: tee a request to shadow upstreams and pair their answers with the primary's.

The primary never waits for a shadow. A `ShadowSession` buffers the request body (bounded),
sends one copy per sampled shadow when the body is complete, captures the primary's answer
as it streams to the client, and hands each finished pair to a `PairSink` (the diff log),
which compares off the event loop. Every copy is bounded: an in-flight cap per shadow (beyond
it the copy is dropped and counted, never queued) and a timeout.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from modelgate.chaos import ChaosRuntime, mutate_json
from modelgate.config import LogsSpec
from modelgate.core import bucket
from modelgate.difflog import DiffLogWriter
from modelgate.logretention import retention_of
from modelgate.upstream import UpstreamRegistry

if TYPE_CHECKING:
    from modelgate.chaos import ChaosDecision
    from modelgate.config import CompareSpec
    from modelgate.plan import CompiledRoute, CompiledShadow, Plan
    from modelgate.upstream import UpstreamConnection, UpstreamPool

__all__ = ["PairSink", "ShadowAnswer", "ShadowDispatcher", "ShadowPair", "ShadowSession"]

WATCHDOG_INTERVAL_S = 0.02


@dataclass(slots=True)
class ShadowAnswer:
    """One side's answer. `error` is set when there was no HTTP answer at all."""

    status: int = 0
    content_type: bytes = b""
    body: bytes = b""
    latency_s: float = 0.0
    error: str = ""  # "", "timeout", "connect_failed", "reset", "bad_response", ...

    @property
    def timed_out(self) -> bool:
        return self.error in ("timeout", "connect_timeout")


@dataclass(slots=True)
class ShadowPair:
    """A primary answer and one shadow's, with what the diff log records about them."""

    started_at: float  # unix time
    request_id: bytes
    unit: str | None
    route: str
    experiment: str
    variant: str
    shadow: str
    request_body: bytes
    primary: ShadowAnswer
    shadow_answer: ShadowAnswer
    compare: CompareSpec


class PairSink(Protocol):
    def submit(self, pair: ShadowPair) -> bool:
        """Queues a pair for comparison and logging; False when it had to be dropped."""
        ...


@dataclass(slots=True)
class _ShadowState:
    inflight: int = 0


class ShadowDispatcher:
    """Per gateway process: the shadow pools, in-flight accounting, timeouts and counters."""

    def __init__(self, sink: PairSink | None = None) -> None:
        # Without an explicit sink, the first pair opens a DiffLogWriter in the Plan's
        # log_dir: a gateway without shadows never creates log files.
        self.sink = sink
        self.log_dir: str | None = None
        self.log_settings = LogsSpec()
        self.writer: DiffLogWriter | None = None
        self.registry = UpstreamRegistry()
        self.applied_version = -1
        self.states: dict[tuple[str, str], _ShadowState] = {}
        self.calls: set[ShadowCall] = set()
        # (route, shadow, outcome) -> count; outcomes: sent, answered, error, timeout,
        # dropped_inflight_cap, dropped_body_too_large, dropped_primary_too_large,
        # dropped_primary_abandoned, dropped_sink_full, dropped_no_sink
        self.counters: Counter[tuple[str, str, str]] = Counter()
        self._watchdog: asyncio.Task[None] | None = None

    def sync(self, plan: Plan) -> None:
        """Shadow pools follow the Plan: kept when an address is unchanged (cheap to call)."""
        if plan.version == self.applied_version:
            return
        targets = {
            shadow.upstream: plan.upstreams[shadow.upstream]
            for route in plan.routes
            for shadow in route.shadows
        }
        self.registry.apply(targets)
        self.applied_version = plan.version
        self.log_dir = plan.config.log_dir
        self.log_settings = settings = plan.config.logs
        if self.writer is not None:  # a reload's bounds apply to the running writer
            self.writer.retention = retention_of(settings.retention)
            self.writer.queue_max_bytes = settings.diff_queue_max_bytes

    def begin(
        self,
        plan: Plan,
        route: CompiledRoute,
        method: bytes,
        unit: str | None,
        meta: tuple[bytes, str, str],
        body_limit: int,
    ) -> ShadowSession | None:
        """A session when at least one of the route's shadows samples this request."""
        chosen = []
        for shadow in route.shadows:
            if shadow.methods is not None and method not in shadow.methods:
                continue
            if shadow.threshold >= 10000:
                chosen.append(shadow)
                continue
            if shadow.threshold <= 0:
                continue
            if shadow.sample_by == "unit" and unit is not None:
                sample = bucket(shadow.salt, unit)
            else:
                sample = int.from_bytes(os.urandom(2), "little") % 10000
            if sample < shadow.threshold:
                chosen.append(shadow)
        if not chosen:
            return None
        self.sync(plan)
        request_id, experiment, variant = meta
        return ShadowSession(
            self, route.name, chosen, request_id, unit, experiment, variant, body_limit
        )

    def count(self, route: str, shadow: str, outcome: str) -> None:
        self.counters[(route, shadow, outcome)] += 1

    def state(self, route: str, shadow: str) -> _ShadowState:
        key = (route, shadow)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = _ShadowState()
        return state

    def track(self, call: ShadowCall) -> None:
        self.calls.add(call)
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while self.calls:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            now = loop.time()
            for call in list(self.calls):
                call.check_timeout(now)

    def emit(self, pair: ShadowPair) -> None:
        if self.sink is None and self.log_dir is not None:
            settings = self.log_settings
            self.writer = DiffLogWriter(
                self.log_dir,
                queue_max_bytes=settings.diff_queue_max_bytes,
                retention=retention_of(settings.retention),
            )
            self.writer.start()
            self.sink = self.writer
        sink = self.sink
        if sink is None:
            self.count(pair.route, pair.shadow, "dropped_no_sink")
        elif not sink.submit(pair):
            self.count(pair.route, pair.shadow, "dropped_sink_full")

    def close(self, timeout_s: float = 2.0) -> None:
        """Ends the shadow calls; the diff log writes what is queued within `timeout_s`
        (the process's stop deadline) and says what it could not."""
        for call in list(self.calls):
            call.finish("unavailable")
        self.registry.close()
        if self.writer is not None:
            self.writer.close(timeout=timeout_s)
            self.writer = None
            self.sink = None
        if self._watchdog is not None:
            self._watchdog.cancel()


class ShadowSession:
    """One primary request's shadows: copies out, the primary's answer captured, pairs out."""

    __slots__ = (
        "dispatcher",
        "route",
        "shadows",
        "request_id",
        "unit",
        "experiment",
        "variant",
        "body_limit",
        "body",
        "body_size",
        "dropped",
        "calls",
        "primary",
        "primary_body",
        "primary_size",
        "primary_done",
        "started_at",
        "started_loop",
        "faults_for",
    )

    def __init__(
        self,
        dispatcher: ShadowDispatcher,
        route: str,
        shadows: list[CompiledShadow],
        request_id: bytes,
        unit: str | None,
        experiment: str,
        variant: str,
        body_limit: int,
    ) -> None:
        self.dispatcher = dispatcher
        self.route = route
        self.shadows = shadows
        self.request_id = request_id
        self.unit = unit
        self.experiment = experiment
        self.variant = variant
        self.body_limit = body_limit
        self.body: list[bytes] = []
        self.body_size = 0
        self.dropped = False
        self.calls: list[ShadowCall] = []
        self.primary = ShadowAnswer()
        self.primary_body: list[bytes] = []
        self.primary_size = 0
        self.primary_done = False
        self.started_at = time.time()
        self.started_loop = asyncio.get_running_loop().time()
        # Chaos rules scoped to a shadow's upstream fault its copies (set by the exchange).
        self.faults_for: Callable[[str], ChaosDecision | None] | None = None

    def _drop(self, outcome: str) -> None:
        if not self.dropped:
            self.dropped = True
            for shadow in self.shadows:
                self.dispatcher.count(self.route, shadow.name, outcome)
            for call in self.calls:
                call.session = None  # its answer is no longer wanted; it still finishes
            self.body = []
            self.primary_body = []

    # --- the request side ----------------------------------------------------------------

    def add_request_body(self, data: bytes) -> None:
        if self.dropped:
            return
        self.body_size += len(data)
        if self.body_size > self.body_limit:
            self._drop("dropped_body_too_large")
            return
        self.body.append(data)

    def request_complete(self, plan: Plan, head_for: HeadBuilder, method: bytes) -> None:
        """The whole body is here: send the copies."""
        if self.dropped:
            return
        body = b"".join(self.body)
        self.body = [body]
        dispatcher = self.dispatcher
        for shadow in self.shadows:
            state = dispatcher.state(self.route, shadow.name)
            if state.inflight >= shadow.max_inflight:
                dispatcher.count(self.route, shadow.name, "dropped_inflight_cap")
                continue
            pool = dispatcher.registry.pools.get(shadow.upstream)
            if pool is None:
                dispatcher.count(self.route, shadow.name, "error")
                continue
            target = plan.upstreams[shadow.upstream]
            call = ShadowCall(self, shadow, state, pool, method == b"HEAD")
            if self.faults_for is not None:
                call.chaos = self.faults_for(shadow.upstream)
            self.calls.append(call)
            dispatcher.count(self.route, shadow.name, "sent")
            call.send(head_for(target.host_header, target.base_path, len(body)), body)

    # --- the primary side ------------------------------------------------------------------

    def primary_head(self, status: int, headers: list[tuple[bytes, bytes, bytes]]) -> None:
        self.primary.status = status
        for lname, _, value in headers:
            if lname == b"content-type":
                self.primary.content_type = value
                break

    def add_primary_body(self, data: bytes) -> None:
        if self.dropped:
            return
        self.primary_size += len(data)
        if self.primary_size > self.body_limit:
            self._drop("dropped_primary_too_large")
            return
        self.primary_body.append(data)

    def primary_complete(self, loop_now: float) -> None:
        self.primary.latency_s = loop_now - self.started_loop
        self.primary.body = b"".join(self.primary_body)
        self.primary_body = []
        self.primary_done = True
        self._maybe_emit()

    def primary_failed(self, status: int, body: bytes, loop_now: float) -> None:
        """The gateway answered itself (502, 504, ...): the pair is a primary error."""
        self.primary.status = status
        self.primary.content_type = b"application/json"
        self.primary_body = [body]
        self.primary_size = len(body)
        self.primary_complete(loop_now)

    def primary_abandoned(self) -> None:
        self._drop("dropped_primary_abandoned")

    def call_finished(self) -> None:
        self._maybe_emit()

    def _maybe_emit(self) -> None:
        if self.dropped or not self.primary_done:
            return
        if any(not call.done for call in self.calls):
            return
        for call in self.calls:
            self.dispatcher.emit(
                ShadowPair(
                    started_at=self.started_at,
                    request_id=self.request_id,
                    unit=self.unit,
                    route=self.route,
                    experiment=self.experiment,
                    variant=self.variant,
                    shadow=call.shadow.name,
                    request_body=self.body[0] if self.body else b"",
                    primary=self.primary,
                    shadow_answer=call.answer,
                    compare=call.shadow.compare,
                )
            )
        self.calls = []
        self.dropped = True  # emitted once


class HeadBuilder(Protocol):
    def __call__(self, host_header: bytes, base_path: bytes, content_length: int) -> bytes: ...


class ShadowCall:
    """One copy to one shadow upstream (an upstream.ResponseSink)."""

    __slots__ = (
        "dispatcher",
        "session",
        "shadow",
        "state",
        "pool",
        "head_request",
        "conn",
        "answer",
        "chunks",
        "size",
        "done",
        "started",
        "parts",
        "retried",
        "chaos",
        "timer",
    )

    def __init__(
        self,
        session: ShadowSession,
        shadow: CompiledShadow,
        state: _ShadowState,
        pool: UpstreamPool,
        head_request: bool,
    ) -> None:
        self.dispatcher = session.dispatcher
        self.session: ShadowSession | None = session
        self.shadow = shadow
        self.state = state
        self.pool = pool
        self.head_request = head_request
        self.conn: UpstreamConnection | None = None
        self.answer = ShadowAnswer()
        self.chunks: list[bytes] = []
        self.size = 0
        self.done = False
        self.started = 0.0
        self.parts: list[bytes] = []
        self.retried = False
        self.chaos: ChaosDecision | None = None
        self.timer: asyncio.TimerHandle | None = None

    def send(self, head: bytes, body: bytes) -> None:
        self.state.inflight += 1
        self.parts = [head, body] if body else [head]
        self.dispatcher.track(self)
        loop = asyncio.get_running_loop()
        self.started = loop.time()
        chaos = self.chaos
        if chaos is not None:
            if chaos.delay_s > 0:
                self.timer = loop.call_later(chaos.delay_s, self._after_delay)
                return
            self._after_delay()
            return
        conn = self.pool.acquire(self)
        if conn is not None:
            self.upstream_ready(conn)

    def _after_delay(self) -> None:
        self.timer = None
        chaos = self.chaos
        if self.done or chaos is None:
            return
        if chaos.abort is not None:
            status, body = chaos.abort
            self.answer.status = status
            self.answer.content_type = b"application/json"
            self.chunks = [body if body is not None else b'{"error":"chaos_abort"}']
            self.finish()
            return
        if chaos.reset:
            self.finish("reset")
            return
        if chaos.hang:
            return  # never sent: the timeout ends it
        conn = self.pool.acquire(self)
        if conn is not None:
            self.upstream_ready(conn)

    def check_timeout(self, now: float) -> None:
        if not self.done and now - self.started > self.shadow.timeout_s:
            self.finish("timeout")

    def finish(self, error: str = "") -> None:
        if self.done:
            return
        self.done = True
        self.state.inflight -= 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.chaos is not None:
            ChaosRuntime.release(self.chaos)
        loop_now = asyncio.get_running_loop().time()
        self.answer.latency_s = loop_now - self.started
        self.answer.error = error
        self.answer.body = b"".join(self.chunks)
        self.chunks = []
        conn = self.conn
        self.conn = None
        if conn is not None:
            if error:
                conn.abort()
            else:
                self.pool.release(conn)
        elif error:
            self.pool.cancel_wait(self)
        self.dispatcher.calls.discard(self)
        session = self.session
        if session is not None:
            self.dispatcher.count(session.route, self.shadow.name, error or "answered")
            session.call_finished()

    # --- ResponseSink ------------------------------------------------------------------

    def upstream_ready(self, conn: UpstreamConnection) -> None:
        if self.done:
            self.pool.release(conn)
            return
        self.conn = conn
        conn.start(self, self.parts, head_request=self.head_request)

    def upstream_failed(self, kind: str, detail: str, *, reused_idle: bool = False) -> None:
        if self.done:
            return
        self.conn = None
        if reused_idle and not self.retried:
            self.retried = True
            conn = self.pool.acquire(self)
            if conn is not None:
                self.upstream_ready(conn)
            return
        self.finish(kind)

    def response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes, bytes]], framed: bool
    ) -> None:
        self.answer.status = status
        for lname, _, value in headers:
            if lname == b"content-type":
                self.answer.content_type = value
                break

    def flush_head(self) -> None:
        pass

    def response_body(self, data: bytes) -> None:
        session = self.session
        self.size += len(data)
        if session is not None and self.size <= session.body_limit:
            self.chunks.append(data)

    def response_complete(self) -> None:
        session = self.session
        if session is not None and self.size > session.body_limit:
            self.finish("too_large")
            return
        chaos = self.chaos
        if chaos is not None and chaos.model is not None and chaos.rng is not None:
            faulted = mutate_json(b"".join(self.chunks), chaos.model, chaos.rng)
            if faulted is not None:
                self.chunks = [faulted]
        self.finish()

    def upstream_pause_writing(self) -> None:
        pass  # the copy is already in memory: nothing to pause

    def upstream_resume_writing(self) -> None:
        pass
