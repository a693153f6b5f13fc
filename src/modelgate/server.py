"""The gateway process: listeners, the running Plan and its swap, timeouts, drain, signals.

`Gateway` holds the one Plan reference requests read; `swap()` replaces it atomically and
keeps warm upstream pools. `serve()` runs a gateway on uvloop until SIGTERM/SIGINT, draining
in-flight requests first; `serve_workers()` forks N such processes on one SO_REUSEPORT port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import uvloop

from modelgate.chaos import ChaosRuntime
from modelgate.config import ConfigError, GatewayConfig, load_config
from modelgate.connection import ClientConnection
from modelgate.exchange import Exchange
from modelgate.outcomes import OutcomeStore
from modelgate.plan import Plan, compile_plan
from modelgate.shadow import ShadowDispatcher
from modelgate.telemetry import Counters
from modelgate.upstream import UpstreamRegistry

__all__ = ["Gateway", "StartupError", "bind_socket", "serve", "serve_workers"]

log = logging.getLogger("modelgate")

SWEEP_INTERVAL_S = 0.5
WATCHDOG_INTERVAL_S = 0.02
RESTART_KEYS = ("listen", "admin")


class StartupError(Exception):
    """The gateway cannot start (port taken, bad address): said once, exit 1."""


class Gateway:
    """One process's data plane."""

    def __init__(self, plan: Plan, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.plan = plan
        self.registry = UpstreamRegistry()
        self.registry.apply(plan.upstreams)
        self.connections: set[ClientConnection] = set()
        self.inflight: set[Exchange] = set()  # exchanges waiting on an upstream
        self.counters = Counters()
        self.shadows = ShadowDispatcher()  # its diff-log sink is attached by whoever serves
        self.chaos = ChaosRuntime()
        self.outcomes = OutcomeStore()  # feedback, per-variant system metrics, exposures
        self.accepting = True
        self.body_timeout_s = plan.limits.client_body_timeout_ms / 1000.0
        self.servers: list[asyncio.AbstractServer] = []
        self.started_at = time.time()
        self.config_path: Path | None = None
        self.last_reload_error: list[str] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None

    # --- the Plan -------------------------------------------------------------------------

    def swap(self, plan: Plan) -> None:
        """Installs a new Plan; requests already started keep the one they read."""
        self.registry.apply(plan.upstreams)
        self.body_timeout_s = plan.limits.client_body_timeout_ms / 1000.0
        self.plan = plan

    def reload(self, config: GatewayConfig) -> Plan:
        """Compiles and swaps in a validated config; restart-only keys must be unchanged."""
        current = self.plan.config
        changed = [key for key in RESTART_KEYS if getattr(config, key) != getattr(current, key)]
        if changed:
            raise ConfigError(
                [
                    f"{key}: changing it needs a restart (running: {getattr(current, key)!r})"
                    for key in changed
                ]
            )
        plan = compile_plan(config, version=self.plan.version + 1)
        self.swap(plan)
        return plan

    def reload_from_file(self) -> None:
        """SIGHUP: re-read the config file; on any error keep serving the running Plan."""
        if self.config_path is None:
            return
        try:
            plan = self.reload(load_config(self.config_path))
        except ConfigError as exc:
            self.last_reload_error = exc.errors
            log.error(
                "reload refused, still serving version %d:\n  %s",
                self.plan.version,
                "\n  ".join(exc.errors),
            )
            return
        self.last_reload_error = None
        log.info("reloaded: version %d (%s)", plan.version, plan.digest)

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
            if self.inflight:
                now = self.loop.time()
                for exchange in list(self.inflight):
                    exchange.check_timeout(now)

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
        self.shadows.close()
        self.outcomes.close()
        return clean

    def status(self) -> dict[str, object]:
        plan = self.plan
        return {
            "version": plan.version,
            "digest": plan.digest,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "connections": len(self.connections),
            "routes": [
                {
                    "name": r.name,
                    "path_prefix": r.path_prefix.decode(),
                    "experiment": r.experiment.name if r.experiment else None,
                    "upstream": r.upstream,
                }
                for r in plan.routes
            ],
            "upstreams": {name: pool.stats() for name, pool in self.registry.pools.items()},
            "last_reload_error": self.last_reload_error,
            "counters": self.counters.snapshot(),
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


async def _run(config: GatewayConfig, config_path: Path | None, sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    gateway = Gateway(compile_plan(config), loop)
    gateway.config_path = config_path
    await gateway.listen(sock)
    host, port = sock.getsockname()[:2]
    log.info(
        "serving on %s:%d (pid %d, plan version %d)", host, port, os.getpid(), gateway.plan.version
    )
    stop = asyncio.Event()
    signals_seen = 0

    def on_stop_signal() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second stop signal: exiting at once")
            os._exit(1)
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_stop_signal)
    loop.add_signal_handler(signal.SIGINT, on_stop_signal)
    loop.add_signal_handler(signal.SIGHUP, gateway.reload_from_file)
    await stop.wait()
    timeout = gateway.plan.limits.drain_timeout_ms / 1000.0
    log.info("draining (up to %.1f s)", timeout)
    clean = await gateway.drain(timeout)
    log.info("stopped%s", "" if clean else " (drain timeout: some connections were cut)")
    return 0


def serve(
    config: GatewayConfig, config_path: Path | None = None, sock: socket.socket | None = None
) -> int:
    """Runs one gateway process until a stop signal; returns its exit code."""
    if sock is None:
        host, port = config.listen_address
        sock = bind_socket(host, port, reuse_port=False)
    return uvloop.run(_run(config, config_path, sock))


def serve_workers(config: GatewayConfig, config_path: Path | None, workers: int) -> int:
    """N processes on one port (SO_REUSEPORT: the kernel balances connections). The parent
    forwards SIGHUP and SIGTERM to every worker and exits when they have all drained."""
    host, port = config.listen_address
    # Bound, not listening: it fails fast on a taken port but takes no connections itself.
    probe = bind_socket(host, port, reuse_port=True, listen=False)
    port = probe.getsockname()[1]
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                probe.close()
                sock = bind_socket(host, port, reuse_port=True)
                code = serve(config, config_path, sock)
            finally:
                sys.stdout.flush()
                os._exit(code)
        children.append(pid)
    probe.close()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    exit_code = 0
    for child in children:
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        exit_code = max(exit_code, os.waitstatus_to_exitcode(status))
    return exit_code
