"""One worker process of `modelgate serve --workers N`: a Gateway on the shared SO_REUSEPORT
port, taking orders from the parent over a socketpair (length-prefixed JSON).

A reload reaches a worker in two phases so that every worker ends on one config:
`prepare(generation, config)` validates and compiles the new Plan and only holds it;
`commit(generation)` swaps in the Plan held for that very generation; `abort(generation)`, or
the next prepare, drops it. A worker that answers a prepare late, or never hears the verdict,
therefore cannot serve a config the parent refused. Every reply says which config version the
worker serves, so the parent always knows who is behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
from dataclasses import dataclass
from typing import Any

import orjson

from modelgate.config import ConfigError, GatewayConfig, validate_config
from modelgate.plan import Plan, compile_plan
from modelgate.runtime.serve import process_telemetry, start_gateway, switch_chaos
from modelgate.server import Gateway, StartupError, bind_socket

__all__ = ["MAX_FRAME", "WorkerState", "receive_frame", "send_frame", "worker_main"]

log = logging.getLogger("modelgate.workers")

_FRAME = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024


# --- the channel: one JSON object per frame ---------------------------------------------


def send_frame(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    data = orjson.dumps(message)
    writer.write(_FRAME.pack(len(data)) + data)


async def receive_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None when the other side is gone."""
    try:
        (size,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
        if size > MAX_FRAME:
            raise ConnectionError(f"channel frame of {size} bytes exceeds {MAX_FRAME}")
        message: dict[str, Any] = orjson.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return message


# --- what a worker does with each order ----------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    generation: int
    plan: Plan


class WorkerState:
    """A worker's Gateway and the one Plan it may hold between a prepare and its commit."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.held: _Prepared | None = None

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        """The reply to one order; it always carries the version this worker serves."""
        reply = self._answer(message)
        plan = self.gateway.plan
        return {"id": message.get("id"), **reply, "serving": plan.version, "digest": plan.digest}

    def _answer(self, message: dict[str, Any]) -> dict[str, Any]:
        gateway = self.gateway
        kind = message.get("type")
        if kind == "prepare":
            return self._prepare(int(message["generation"]), int(message["version"]), message)
        if kind == "commit":
            return self._commit(int(message["generation"]))
        if kind == "abort":
            generation = int(message["generation"])
            if self.held is not None and self.held.generation <= generation:
                self.held = None
            return {"ok": True, "generation": generation}
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

    def _prepare(self, generation: int, version: int, message: dict[str, Any]) -> dict[str, Any]:
        self.held = None  # whatever an earlier, unanswered round left is dropped here
        try:
            plan = compile_plan(validate_config(message["config"]), version=version)
        except ConfigError as exc:
            return {"ok": False, "generation": generation, "errors": exc.errors}
        except Exception as exc:  # report, never die: the parent decides what to do
            return {"ok": False, "generation": generation, "errors": [f"(compile) {exc!r}"]}
        self.held = _Prepared(generation, plan)
        return {"ok": True, "generation": generation, "version": version}

    def _commit(self, generation: int) -> dict[str, Any]:
        held = self.held
        if held is None or held.generation != generation:
            holding = "nothing" if held is None else f"generation {held.generation}"
            return {
                "ok": False,
                "generation": generation,
                "errors": [f"commit of generation {generation}, but {holding} is prepared"],
            }
        self.held = None
        self.gateway.swap(held.plan)
        return {"ok": True, "generation": generation}


# --- the worker process ----------------------------------------------------------------


async def worker_main(config: GatewayConfig, host: str, port: int, channel: socket.socket) -> int:
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
    state = WorkerState(gateway)
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
        send_frame(writer, {"type": "hello", "pid": os.getpid(), "serving": gateway.plan.version})
        while (message := await receive_frame(reader)) is not None:
            send_frame(writer, state.handle(message))
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
