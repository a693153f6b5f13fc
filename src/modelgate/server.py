"""The data plane of one process: listeners, the running Plan and its swap, timeouts, drain.

`Gateway` holds the one Plan reference requests read; `swap()` replaces it atomically and
keeps warm upstream pools. Running it as a process (signals, admin API, workers) is
runtime/serve.py's and runtime/workers.py's; deciding what to swap in is control.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import Any

from modelgate.chaos import ChaosRuntime
from modelgate.connection import ClientConnection
from modelgate.exchange import Exchange
from modelgate.outcomes import OutcomeStore
from modelgate.plan import Plan
from modelgate.shadow import ShadowDispatcher
from modelgate.telemetry.counts import Counters, VersionLogFilter
from modelgate.upstream import UpstreamRegistry

__all__ = ["Gateway", "StartupError", "bind_socket"]

SWEEP_INTERVAL_S = 0.5
WATCHDOG_INTERVAL_S = 0.02
# The log writers get what is left of the drain timeout for their backlog, at least this
# (within the --workers parent's kill grace), so a drain that used it all still flushes.
LOG_DRAIN_MIN_S = 1.0


class StartupError(Exception):
    """The gateway cannot start (port taken, bad address): said once, exit 1."""


class Gateway:
    """One process's data plane."""

    def __init__(self, plan: Plan, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.plan = plan
        self.counters = Counters(plan.version)
        self.registry = UpstreamRegistry(self.counters.count_upstream_error)
        self.registry.apply(plan.upstreams)
        self.connections: set[ClientConnection] = set()
        self.inflight: set[Exchange] = set()  # exchanges waiting on an upstream
        self.shadows = ShadowDispatcher()  # its diff-log sink is attached by whoever serves
        self.chaos = ChaosRuntime()
        self.outcomes = OutcomeStore()  # feedback, per-variant system metrics, exposures
        self.accepting = True
        self._read_limits(plan)
        self.servers: list[asyncio.AbstractServer] = []
        self.started_at = time.time()
        self._sweeper: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None

    # --- the Plan -------------------------------------------------------------------------

    def swap(self, plan: Plan) -> None:
        """Installs a new Plan; requests already started keep the one they read.

        Pools of upstreams whose address is unchanged are kept (warm connections survive);
        pools of removed or re-addressed upstreams close once their connections are free."""
        self.registry.apply(plan.upstreams)
        self._read_limits(plan)
        self.counters.begin_version(plan.version)
        self.plan = plan
        VersionLogFilter.set_version(plan.version)

    def _read_limits(self, plan: Plan) -> None:
        # Read by every connection on every body chunk and deadline check: kept at hand.
        limits = plan.limits
        self.body_timeout_s = limits.client_body_timeout_ms / 1000.0
        self.body_min_rate = limits.client_body_min_rate_bytes_per_s
        self.body_grace_s = limits.client_body_min_rate_grace_ms / 1000.0
        self.send_timeout_s = limits.client_send_timeout_ms / 1000.0

    # --- listening --------------------------------------------------------------------------

    async def listen(self, sock: socket.socket) -> None:
        server = await self.loop.create_server(
            lambda: ClientConnection(self), sock=sock, backlog=4096
        )
        self.servers.append(server)
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())
            self._watchdog = self.loop.create_task(self._watch_upstreams())

    async def _watch_upstreams(self) -> None:
        # One periodic check instead of a timer per request: call_later + cancel on every
        # request cost ~4% of the proxy's CPU; this costs a set add and discard.
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            now = self.loop.time()
            if self.inflight:
                for exchange in list(self.inflight):
                    exchange.check_timeout(now)
            self.registry.expire_waiters(now)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = self.loop.time()
            for conn in list(self.connections):
                conn.check_deadline(now)

    async def drain(self, timeout_s: float) -> bool:
        """Stops accepting, lets in-flight requests finish, closes idle keep-alives politely.
        Returns True when everything finished within the timeout."""
        self.accepting = False
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        deadline = self.loop.time() + timeout_s
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        clean = not self.connections
        for conn in list(self.connections):
            conn.abort()
        for task in (self._sweeper, self._watchdog):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.registry.close()
        left = max(deadline - self.loop.time(), LOG_DRAIN_MIN_S)
        logs_deadline = time.monotonic() + left
        self.shadows.close(left)
        self.outcomes.close(logs_deadline)
        return clean

    def status(self) -> dict[str, Any]:
        """This process: its Plan version, connections and upstream pools."""
        plan = self.plan
        return {
            "pid": os.getpid(),
            "alive": True,
            "version": plan.version,
            "digest": plan.digest,
            "accepting": self.accepting,
            "uptime_s": round(time.time() - self.started_at, 3),
            "connections": len(self.connections),
            "upstream_requests_in_flight": len(self.inflight),
            "upstreams": {name: pool.stats() for name, pool in self.registry.pools.items()},
        }


def bind_socket(host: str, port: int, *, reuse_port: bool, listen: bool = True) -> socket.socket:
    """Binds the listening socket up front so a taken port fails start-up with a clear error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve listen address {host!r}: {exc}") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    if listen:
        sock.listen(4096)
    sock.setblocking(False)
    return sock
