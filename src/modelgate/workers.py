"""`modelgate serve --workers N`: the parent runs the control plane and the admin API; each
forked worker runs a Gateway on the shared SO_REUSEPORT port and takes orders from the parent
over a socketpair (length-prefixed JSON: apply, status, counters, outcomes, telemetry, chaos).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import orjson
import uvloop

from modelgate.admin import bind_admin, check_admin_exposure, resolve_admin_token, start_admin
from modelgate.config import ConfigError, GatewayConfig, validate_config
from modelgate.control import ControlPlane, ReloadError
from modelgate.plan import Plan, compile_plan
from modelgate.process import process_telemetry, start_gateway, supervise, switch_chaos
from modelgate.server import Gateway, StartupError, bind_socket
from modelgate.telemetry import CountSlice

__all__ = ["WorkerPool", "serve_workers"]

log = logging.getLogger("modelgate.workers")

_FRAME = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024
REPLY_TIMEOUT_S = 10.0
START_TIMEOUT_S = 30.0
KILL_GRACE_S = 5.0


# --- the channel: one JSON object per frame ---------------------------------------------


def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    data = orjson.dumps(message)
    writer.write(_FRAME.pack(len(data)) + data)


async def _receive(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None when the other side is gone."""
    try:
        (size,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
        if size > MAX_FRAME:
            raise ConnectionError(f"channel frame of {size} bytes exceeds {MAX_FRAME}")
        message: dict[str, Any] = orjson.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return message


# --- the worker side -------------------------------------------------------------------


def _handle(gateway: Gateway, message: dict[str, Any]) -> dict[str, Any]:
    kind = message.get("type")
    if kind == "apply":
        try:
            config = validate_config(message["config"])
            plan = compile_plan(config, version=int(message["version"]))
        except ConfigError as exc:
            return {"ok": False, "errors": exc.errors}
        except Exception as exc:  # report, never die: the parent decides what to do
            return {"ok": False, "errors": [f"(compile) {exc!r}"]}
        gateway.swap(plan)
        return {"ok": True, "version": plan.version, "digest": plan.digest}
    if kind == "status":
        return {"ok": True, "status": gateway.status()}
    if kind == "counters":
        export = gateway.counters.export()
        return {"ok": True, "counters": {k: v.to_json() for k, v in export.items()}}
    if kind == "outcomes":
        return {"ok": True, "outcomes": gateway.outcomes.snapshot()}
    if kind == "telemetry":
        return {"ok": True, "telemetry": process_telemetry(gateway)}
    if kind == "chaos_switch":
        route, rule = str(message["route"]), str(message["rule"])
        if switch_chaos(gateway, route, rule, bool(message["enabled"])):
            return {"ok": True}
        return {"ok": False, "errors": [f"no chaos rule {rule!r} on route {route!r}"]}
    return {"ok": False, "errors": [f"unknown message type {kind!r}"]}


async def _worker_main(config: GatewayConfig, host: str, port: int, channel: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    # Ctrl-C reaches the whole process group; the parent handles it and tells us (SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    reader, writer = await asyncio.open_unix_connection(sock=channel)
    try:
        sock = bind_socket(host, port, reuse_port=True)
    except StartupError as exc:
        log.error("worker %d: %s", os.getpid(), exc)
        return 1
    gateway = await start_gateway(config, sock)
    stop = asyncio.Event()
    stops = 0

    def on_stop() -> None:
        nonlocal stops
        stops += 1
        if stops > 1:
            os._exit(1)
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_stop)

    async def serve_channel() -> None:
        _send(writer, {"type": "hello", "pid": os.getpid(), "version": gateway.plan.version})
        while (message := await _receive(reader)) is not None:
            reply = _handle(gateway, message)
            _send(writer, {"id": message.get("id"), **reply})
        log.warning("worker %d: the parent is gone; draining", os.getpid())
        stop.set()

    channel_task = loop.create_task(serve_channel())
    await stop.wait()
    clean = await gateway.drain(gateway.plan.limits.drain_timeout_ms / 1000.0)
    if not clean:
        log.warning("worker %d: drain timeout: some connections were cut", os.getpid())
    channel_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await channel_task
    writer.close()
    return 0


# --- the parent side -------------------------------------------------------------------


class _Worker:
    """The parent's handle on one worker: its channel, its pending requests, its exit."""

    def __init__(self, index: int, pid: int, channel: socket.socket) -> None:
        self.index = index
        self.pid = pid
        self.channel = channel
        self.alive = True
        self.listening = False
        self.version = 0
        self.exit_code: int | None = None
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.hello: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)

    async def start(self) -> None:
        reader, self.writer = await asyncio.open_unix_connection(sock=self.channel)
        asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while (message := await _receive(reader)) is not None:
            if message.get("type") == "hello":
                self.listening = True
                self.version = int(message["version"])
                if not self.hello.done():
                    self.hello.set_result(True)
                continue
            future = self.pending.pop(int(message.get("id") or 0), None)
            if future is not None and not future.done():
                future.set_result(message)
        # EOF: the worker exited (or is exiting); collect its status without blocking the loop.
        self.alive = False
        self.listening = False
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError(f"worker {self.pid} exited"))
        if not self.hello.done():
            self.hello.set_result(False)
        _, status = await asyncio.to_thread(os.waitpid, self.pid, 0)
        self.exit_code = os.waitstatus_to_exitcode(status)
        self.exited.set_result(self.exit_code)

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        if not self.alive or self.writer is None:
            raise ConnectionError(f"worker {self.pid} is not running")
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        _send(self.writer, {"id": ident, **message})
        try:
            async with asyncio.timeout(REPLY_TIMEOUT_S):
                return await future
        finally:
            self.pending.pop(ident, None)

    def kill(self, signum: int) -> None:
        if self.exit_code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


class WorkerPool:
    """The control plane's target with --workers: a reload reaches every worker, or none."""

    def __init__(self, workers: list[_Worker], config: GatewayConfig) -> None:
        self.workers_ = workers
        self.applied: tuple[GatewayConfig, int] = (config, 1)  # what every worker serves

    async def _apply_to(self, worker: _Worker, config: GatewayConfig, version: int) -> str | None:
        """None when applied, else why not."""
        message = {"type": "apply", "version": version, "config": config.model_dump(mode="json")}
        try:
            reply = await worker.request(message)
        except (ConnectionError, TimeoutError) as exc:
            return f"worker {worker.pid}: {exc or 'no reply in time'}"
        if not reply.get("ok"):
            return f"worker {worker.pid}: " + "; ".join(reply.get("errors", ["refused"]))
        return None

    async def apply(self, config: GatewayConfig, plan: Plan) -> None:
        live = [w for w in self.workers_ if w.alive]
        if not live:
            raise ReloadError("apply_failed", ["(workers): no worker is running"])
        outcomes = await asyncio.gather(*(self._apply_to(w, config, plan.version) for w in live))
        failures = [why for why in outcomes if why is not None]
        if failures:
            # All or nothing: put the workers that took the new config back on the old one.
            old_config, old_version = self.applied
            took = [w for w, why in zip(live, outcomes, strict=True) if why is None]
            await asyncio.gather(*(self._apply_to(w, old_config, old_version) for w in took))
            raise ReloadError("apply_failed", failures)
        self.applied = (config, plan.version)

    async def _ask(self, worker: _Worker, kind: str) -> dict[str, Any] | None:
        try:
            return await worker.request({"type": kind})
        except (ConnectionError, TimeoutError):
            return None

    async def workers(self) -> list[dict[str, Any]]:
        replies = await asyncio.gather(*(self._ask(w, "status") for w in self.workers_))
        out = []
        for worker, reply in zip(self.workers_, replies, strict=True):
            if reply is not None and reply.get("ok"):
                out.append({"worker": worker.index, **reply["status"]})
            else:
                out.append(
                    {
                        "worker": worker.index,
                        "pid": worker.pid,
                        "alive": worker.alive,
                        "exit_code": worker.exit_code,
                    }
                )
        return out

    async def counters(self) -> list[dict[str, CountSlice]]:
        replies = await asyncio.gather(*(self._ask(w, "counters") for w in self.workers_))
        return [
            {label: CountSlice.from_json(data) for label, data in reply["counters"].items()}
            for reply in replies
            if reply is not None and reply.get("ok")
        ]

    async def outcomes(self) -> list[dict[str, Any]]:
        replies = await asyncio.gather(*(self._ask(w, "outcomes") for w in self.workers_))
        return [r["outcomes"] for r in replies if r is not None and r.get("ok")]

    async def telemetry(self) -> list[dict[str, Any]]:
        replies = await asyncio.gather(*(self._ask(w, "telemetry") for w in self.workers_))
        return [r["telemetry"] for r in replies if r is not None and r.get("ok")]

    async def set_chaos(self, route: str, rule: str, enabled: bool) -> None:
        """Every live worker switches the rule before this returns (or it raises)."""
        message = {"type": "chaos_switch", "route": route, "rule": rule, "enabled": enabled}
        live = [w for w in self.workers_ if w.alive]
        replies = await asyncio.gather(*(w.request(message) for w in live), return_exceptions=True)
        for worker, reply in zip(live, replies, strict=True):
            if isinstance(reply, BaseException):
                raise ConnectionError(f"worker {worker.pid}: {reply or 'no reply in time'}")
            if not reply.get("ok"):
                raise LookupError(f"worker {worker.pid}: " + "; ".join(reply.get("errors", [])))

    def ready(self) -> bool:
        return all(w.alive and w.listening for w in self.workers_)

    def signal_all(self, signum: int) -> None:
        for worker in self.workers_:
            worker.kill(signum)

    async def stop(self, timeout_s: float) -> int:
        """SIGTERM: every worker drains; stragglers past the drain timeout are killed."""
        self.signal_all(signal.SIGTERM)
        exits = [w.exited for w in self.workers_]
        _, late = await asyncio.wait(exits, timeout=timeout_s + KILL_GRACE_S)
        if late:
            log.error("%d worker(s) did not stop in time: killing them", len(late))
            self.signal_all(signal.SIGKILL)
            await asyncio.wait(exits)
        return max((w.exit_code or 0 for w in self.workers_), default=0)


async def _parent_main(
    config: GatewayConfig,
    config_path: Path | None,
    children: list[tuple[int, socket.socket]],
    probe: socket.socket,
    port: int,
    admin_sock: socket.socket,
    token: str | None,
    watch: bool,
) -> int:
    workers = [_Worker(i, pid, sock) for i, (pid, sock) in enumerate(children)]
    for worker in workers:
        await worker.start()
    pool = WorkerPool(workers, config)
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            started = await asyncio.gather(*(w.hello for w in workers))
    except TimeoutError:
        started = [w.listening for w in workers]
    probe.close()  # held until now so nobody else could take the port meanwhile
    if not all(started):
        log.error("not every worker started; stopping")
        await pool.stop(1.0)
        return 1
    stop = asyncio.Event()

    def worker_exited(_: asyncio.Future[int]) -> None:
        if not control.draining and not any(w.alive for w in workers):
            log.error("every worker has exited; stopping")
            stop.set()

    control = ControlPlane(compile_plan(config), pool, config_path)
    for worker in workers:
        worker.exited.add_done_callback(worker_exited)
    admin = await start_admin(control, admin_sock, token)
    log.info(
        "serving on %s:%d with %d workers (pids %s), config version %d",
        config.listen_address[0],
        port,
        len(workers),
        ", ".join(str(w.pid) for w in workers),
        control.version,
    )
    return await supervise(
        control,
        admin,
        pool.stop,
        watch=watch,
        stop=stop,
        on_second_signal=lambda: pool.signal_all(signal.SIGTERM),
    )


def serve_workers(
    config: GatewayConfig,
    config_path: Path | None,
    workers: int,
    *,
    watch: bool = False,
    token_file: str | None = None,
) -> int:
    """N worker processes on one port (SO_REUSEPORT: the kernel balances connections) and a
    parent that serves the admin API (and alone reads or generates its token file) and sends
    every reload to every worker."""
    token = resolve_admin_token(config, token_file)
    check_admin_exposure(config, token)
    host, port = config.listen_address
    # Bound, not listening: it fails fast on a taken port but takes no connections itself.
    probe = bind_socket(host, port, reuse_port=True, listen=False)
    port = probe.getsockname()[1]
    admin_sock = bind_admin(config)
    children: list[tuple[int, socket.socket]] = []
    for _ in range(workers):
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # Only the parent may hold these: a worker must see EOF when the parent dies.
                for sock in (parent_end, probe, admin_sock, *(s for _, s in children)):
                    sock.close()
                code = uvloop.run(_worker_main(config, host, port, child_end))
            except BaseException:
                log.exception("worker %d failed", os.getpid())
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        child_end.close()
        children.append((pid, parent_end))
    return uvloop.run(
        _parent_main(config, config_path, children, probe, port, admin_sock, token, watch)
    )
