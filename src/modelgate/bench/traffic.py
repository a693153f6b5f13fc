"""The traffic of one driver process: request bytes, the open- or closed-loop schedule,
and best-effort feedback posts, all on one event loop through `bench.client.Pool`."""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from modelgate.bench.client import Pool
from modelgate.bench.config import (
    DEFAULT_CONCURRENCY,
    DEFAULT_DURATION_S,
    FEEDBACK_PATH,
    BenchConfig,
    split_url,
)
from modelgate.bench.report import Recorder
from modelgate.feedback_tokens import UNIT_SECRET_ENV

__all__ = ["Driver", "FeedbackPoster", "RequestFactory", "Share"]

_FEEDBACK_CONNECTIONS = 32
_FEEDBACK_QUEUE = 10_000  # posts waiting for a connection beyond this are dropped
_BODY_METHODS = ("POST", "PUT", "PATCH")
_PLACEHOLDER = re.compile(r"\{(unit|rand|seq)\}")


# --- requests ----------------------------------------------------------------------------


class RequestFactory:
    """Builds each request's bytes and picks its unit id (None when it has none)."""

    def __init__(self, config: BenchConfig, rng: random.Random) -> None:
        _, _, host, target = split_url(config.url, "URL")
        self.rng = rng
        self.units = config.units
        method = config.method
        self.has_body = (
            config.body is not None or config.body_file is not None or (method in _BODY_METHODS)
        )
        lines = [f"{method} {target} HTTP/1.1", f"host: {host}"]
        names = {name.lower() for name, _ in config.headers}
        if self.has_body and "content-type" not in names:
            lines.append("content-type: application/json")
        lines += [f"{name}: {value}" for name, value in config.headers]
        self.head = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self.unit_header = (
            f"{config.unit_header}: ".encode("latin-1") if config.unit_header else None
        )
        self.lines: list[bytes] = []
        self.template: list[str] | None = None
        if config.body_file is not None:
            raw = Path(config.body_file).read_bytes().splitlines()
            self.lines = [line for line in raw if line.strip()]
            if not self.lines:
                raise ValueError(f"--body-file {config.body_file} has no non-empty line")
        elif config.body is not None:
            self.template = _PLACEHOLDER.split(config.body)
        # Built-in bodies: a small feature vector, drawn once per slot of a ring of 256.
        self.vectors = [
            orjson.dumps([round(rng.gauss(0.0, 1.0), 4) for _ in range(8)]) for _ in range(256)
        ]
        self.needs_unit = (
            self.unit_header is not None
            or (self.template is not None and "unit" in self.template[1::2])
            or (self.has_body and self.template is None and not self.lines)
        )

    def make(self, seq: int) -> tuple[bytes, str | None]:
        unit = f"user-{self.rng.randrange(self.units)}" if self.needs_unit else None
        head = self.head
        if unit is not None and self.unit_header is not None:
            head += self.unit_header + unit.encode() + b"\r\n"
        if not self.has_body:
            return head + b"\r\n", unit
        if self.lines:
            body = self.lines[seq % len(self.lines)]
        elif self.template is not None:
            body = self._render(seq, unit).encode()
        elif unit is not None:
            body = b'{"unit":"%s","features":%s}' % (unit.encode(), self.vectors[seq & 255])
        else:
            body = b'{"features":%s}' % self.vectors[seq & 255]
        return b"%scontent-length: %d\r\n\r\n%s" % (head, len(body), body), unit

    def _render(self, seq: int, unit: str | None) -> str:
        parts = list(self.template or [])
        for i in range(1, len(parts), 2):
            kind = parts[i]
            if kind == "unit":
                parts[i] = unit or ""
            elif kind == "rand":
                parts[i] = f"{self.rng.random():.6f}"
            else:
                parts[i] = str(seq)
        return "".join(parts)


# --- feedback ----------------------------------------------------------------------------


class FeedbackPoster:
    """Posts simulated outcomes for answered requests; best effort, every failure counted."""

    def __init__(self, config: BenchConfig, recorder: Recorder, rng: random.Random) -> None:
        url = config.feedback_url
        if url is None:
            parts = urlsplit(config.url)
            url = f"http://{parts.netloc}{FEEDBACK_PATH}"
        host, port, host_header, target = split_url(url, "--feedback-url")
        # A gateway with feedback.unit_secret takes feedback by unit only with the secret.
        secret = os.environ.get(UNIT_SECRET_ENV)
        self.head = (
            f"POST {target} HTTP/1.1\r\nhost: {host_header}\r\ncontent-type: application/json\r\n"
            + (f"authorization: Bearer {secret}\r\n" if secret else "")
        ).encode("latin-1")
        self.counts = recorder.feedback
        self.rng = rng
        self.binary = config.feedback_kind == "binary"
        self.sd = config.feedback_sd
        self.timeout_s = config.timeout_s
        # variant name -> [(metric, mean)]
        self.means: dict[str, list[tuple[str, float]]] = {}
        for spec in config.feedback:
            for variant, mean in spec.means:
                self.means.setdefault(variant, []).append((spec.metric, mean))
        self.pool: Pool[None] = Pool(host, port, _FEEDBACK_CONNECTIONS, self)

    def observe(self, unit: str | None, variant_header: bytes | None) -> None:
        if unit is None or variant_header is None:
            self.counts.skipped += 1
            return
        posted = False
        for pair in variant_header.decode("latin-1").split(","):
            experiment, _, variant = pair.strip().partition("=")
            for metric, mean in self.means.get(variant, ()):
                self._post(experiment, unit, metric, self._draw(mean))
                posted = True
        if not posted:
            self.counts.skipped += 1

    def _draw(self, mean: float) -> float:
        if self.binary:
            return 1.0 if self.rng.random() < mean else 0.0
        return self.rng.gauss(mean, self.sd)

    def _post(self, experiment: str, unit: str, metric: str, value: float) -> None:
        if len(self.pool.waiting) >= _FEEDBACK_QUEUE:
            self.counts.dropped += 1
            return
        body = orjson.dumps(
            {"experiment": experiment, "unit": unit, "metric": metric, "value": value}
        )
        data = b"%scontent-length: %d\r\n\r\n%s" % (self.head, len(body), body)
        self.counts.posted += 1
        self.pool.submit(data, None, time.perf_counter() + self.timeout_s)

    # Sink of the feedback pool.
    def response_done(
        self, token: None, status: int, variant: bytes | None, chaos: bytes | None
    ) -> None:
        if 200 <= status < 300:
            self.counts.accepted += 1
        else:
            self.counts.rejected[status] = self.counts.rejected.get(status, 0) + 1

    def request_failed(self, token: None, kind: str) -> None:
        self.counts.failed[kind] = self.counts.failed.get(kind, 0) + 1


# --- the driver --------------------------------------------------------------------------

Token = tuple[float, str | None]  # (scheduled send time, unit id)


@dataclass
class Share:
    """This process's part of the load: slots index, index + step, ... of the schedule."""

    index: int = 0
    step: int = 1

    def count(self, total: int) -> int:
        """How many of `total` slots (or connections) are this process's."""
        return len(range(self.index, total, self.step))


@dataclass
class Driver:
    """One process's driver on the running loop: issues, records, knows when it is done."""

    config: BenchConfig
    share: Share = field(default_factory=Share)
    recorder: Recorder = field(default_factory=Recorder)

    def __post_init__(self) -> None:
        seed = (
            self.config.seed
            if self.config.seed is not None
            else int.from_bytes(os.urandom(8), "little")
        )
        self.rng = random.Random(seed * 1009 + self.share.index)
        self.factory = RequestFactory(self.config, self.rng)
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.issued = 0
        self.in_flight = 0
        self.stopped = False
        self.end = math.inf  # closed loop: no request starts after this
        self.next_due = math.inf  # open loop: the next slot's send time
        self.timer: asyncio.TimerHandle | None = None
        config = self.config
        self.timeout_s = config.timeout_s
        if config.rate is not None:
            self.connections = config.max_connections
            total = config.requests or math.ceil(
                (config.duration_s or DEFAULT_DURATION_S) * config.rate
            )
            self.limit: float = self.share.count(total)
        else:
            self.connections = self.share.count(config.concurrency or DEFAULT_CONCURRENCY)
            self.limit = self.share.count(config.requests) if config.requests else math.inf
        host, port, _, _ = split_url(config.url, "URL")
        self.pool: Pool[Token] = Pool(
            host, port, self.connections, self, head_only=config.method == "HEAD"
        )
        self.feedback = FeedbackPoster(config, self.recorder, self.rng) if config.feedback else None

    async def run(self) -> Recorder:
        config = self.config
        cpu0 = time.process_time()
        self.t0 = time.perf_counter()
        self.recorder.first_send = self.t0
        if config.rate is not None:
            self.interval = self.share.step / config.rate
            self.offset = self.share.index / config.rate
            self.next_due = self.t0 + self.offset
            self._tick()
        else:
            self.end = (
                math.inf
                if config.requests is not None
                else self.t0 + (config.duration_s or DEFAULT_DURATION_S)
            )
            for _ in range(self.connections):
                self._next(self.t0)
        try:
            await self.done
            if self.feedback is not None:
                await self._drain_feedback()
        finally:
            if self.timer is not None:
                self.timer.cancel()
            self.pool.close()
            if self.feedback is not None:
                self.feedback.pool.close()
        self.recorder.cpu_s = time.process_time() - cpu0
        return self.recorder

    def stop(self) -> None:
        """Issues nothing more; in-flight requests still finish (or time out)."""
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._maybe_done()

    async def _drain_feedback(self) -> None:
        assert self.feedback is not None
        pool = self.feedback.pool
        deadline = time.perf_counter() + self.timeout_s + 1.0
        while pool.in_flight and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)

    def _issue(self, scheduled: float) -> None:
        data, unit = self.factory.make(self.share.index + self.issued * self.share.step)
        self.issued += 1
        self.in_flight += 1
        self.recorder.sent += 1
        self.pool.submit(data, (scheduled, unit), scheduled + self.timeout_s)

    def _tick(self) -> None:
        """Open loop's timer: sends what is due, then sleeps until the next slot."""
        self.timer = None
        if self.stopped:
            return
        self._send_due(time.perf_counter())
        if self.issued >= self.limit:
            self._maybe_done()
            return
        # uvloop's timers count whole milliseconds; rounding the wait up wakes at or after
        # the slot, never spinning on zero-length waits (that would burn a core the target
        # may need). Responses also call _send_due, so a busy bench sends between ticks.
        delay = math.ceil((self.next_due - time.perf_counter()) * 1e3) / 1e3
        self.timer = self.loop.call_later(max(delay, 0.001), self._tick)

    def _send_due(self, now: float) -> None:
        """Open loop: issues every request whose slot has come, recording how late it is."""
        if now < self.next_due or self.stopped:
            return
        base = self.t0 + self.offset
        due = min(self.limit, math.floor((now - base) / self.interval) + 1)
        record_lag = self.recorder.lag.record
        while self.issued < due:
            scheduled = base + self.issued * self.interval
            record_lag(now - scheduled)
            self._issue(scheduled)
        self.next_due = base + self.issued * self.interval if self.issued < self.limit else math.inf

    def _next(self, now: float) -> None:
        """Closed loop: one more request, unless the budget or the time is spent."""
        if self.stopped or self.issued >= self.limit or now >= self.end:
            self._maybe_done()
        else:
            self._issue(now)

    def _maybe_done(self) -> None:
        finished_sending = (
            self.stopped
            or self.issued >= self.limit
            or (self.config.rate is None and time.perf_counter() >= self.end)
        )
        if finished_sending and self.in_flight == 0 and not self.done.done():
            self.done.set_result(None)

    # Sink of the pool: each request ends here exactly once.
    def response_done(
        self, token: Token, status: int, variant: bytes | None, chaos: bytes | None
    ) -> None:
        now = time.perf_counter()
        self.in_flight -= 1
        self.recorder.record(now - token[0], status, variant, chaos)
        self.recorder.last_done = now
        if self.feedback is not None:
            self.feedback.observe(token[1], variant)
        self._after(now)

    def request_failed(self, token: Token, kind: str) -> None:
        now = time.perf_counter()
        self.in_flight -= 1
        self.recorder.error(kind)
        self.recorder.last_done = now
        self._after(now)

    def _after(self, now: float) -> None:
        if self.config.rate is None:
            self._next(now)
        else:
            self._send_due(now)
            self._maybe_done()
