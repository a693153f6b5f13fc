"""`modelgate serve --workers N`: the parent runs the control plane and the admin API; each
forked worker (runtime/worker.py) runs a Gateway on the shared SO_REUSEPORT port and takes
orders from the parent over a socketpair.

A reload is applied in two phases with a generation number, one per round: every live worker
prepares the new Plan, and only when all of them did in time does any commit it; otherwise all
abort. A worker that missed a commit (stopped, slow) is reported behind and, when it answers
again, is brought to the current config by a round of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from modelgate.admin.app import bind_admin, check_admin_exposure, resolve_admin_token, start_admin
from modelgate.config import GatewayConfig
from modelgate.control import ControlPlane, ReloadError
from modelgate.plan import Plan, compile_plan
from modelgate.runtime.serve import supervise
from modelgate.runtime.worker import receive_frame, send_frame, worker_main
from modelgate.server import bind_socket
from modelgate.telemetry.counts import CountSlice

__all__ = ["WorkerPool", "serve_workers"]

log = logging.getLogger("modelgate.workers")

START_TIMEOUT_S = 30.0
KILL_GRACE_S = 5.0
_EVENTS = ("commit_unacknowledged", "caught_up", "catch_up_failed")


# --- the parent side -------------------------------------------------------------------


class _Worker:
    """The parent's handle on one worker: its channel, its pending requests, the config
    version it last said it serves, its exit."""

    def __init__(self, index: int, pid: int, channel: socket.socket) -> None:
        self.index = index
        self.pid = pid
        self.channel = channel
        self.alive = True
        self.listening = False
        self.responding = True  # false from a reply that did not come in time to the next one
        self.version = 0  # the config version in its latest message
        self.exit_code: int | None = None
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.hello: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.writer: asyncio.StreamWriter | None = None
        self.on_report: Callable[[_Worker], None] = lambda _: None
        self.events: Counter[str] = Counter()  # commits missed, catch-ups done or failed
        self._ids = itertools.count(1)

    async def start(self) -> None:
        reader, self.writer = await asyncio.open_unix_connection(sock=self.channel)
        asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while (message := await receive_frame(reader)) is not None:
            self.responding = True
            self.version = int(message.get("serving", self.version))
            if message.get("type") == "hello":
                self.listening = True
                if not self.hello.done():
                    self.hello.set_result(True)
            else:
                # A late reply finds no pending request: it only updates what we know.
                future = self.pending.pop(int(message.get("id") or 0), None)
                if future is not None and not future.done():
                    future.set_result(message)
            self.on_report(self)
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

    async def request(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        if not self.alive or self.writer is None:
            raise ConnectionError(f"worker {self.pid} is not running")
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        send_frame(self.writer, {"id": ident, **message})
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            self.responding = False
            raise
        finally:
            self.pending.pop(ident, None)

    def notify(self, message: dict[str, Any]) -> None:
        """An order whose reply nobody waits for (it still updates `version`)."""
        if self.alive and self.writer is not None:
            send_frame(self.writer, {"id": 0, **message})

    def kill(self, signum: int) -> None:
        if self.exit_code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


class WorkerPool:
    """The control plane's target with --workers: a reload is committed by every live worker
    or by none; a worker that misses a commit is brought up to date when it answers again."""

    def __init__(self, workers: list[_Worker], config: GatewayConfig, version: int = 1) -> None:
        self.workers_ = workers
        self.applied: tuple[GatewayConfig, int] = (config, version)  # what every worker serves
        self._generations = itertools.count(1)  # one per prepare round, never reused
        self._round = asyncio.Lock()  # a reload and a catch-up never interleave
        self._catching_up: set[asyncio.Task[None]] = set()
        for worker in workers:
            worker.on_report = self._noticed

    @property
    def timeout_s(self) -> float:
        return self.applied[0].limits.worker_reply_timeout_ms / 1000.0

    async def _order(self, worker: _Worker, message: dict[str, Any]) -> str | None:
        """Sends a prepare or commit; None when done for that generation, else why not."""
        try:
            reply = await worker.request(message, self.timeout_s)
        except (ConnectionError, TimeoutError) as exc:
            return f"worker {worker.pid}: {str(exc) or 'no reply in time'} ({message['type']})"
        if reply.get("generation") != message["generation"]:
            return f"worker {worker.pid}: answered another generation ({message['type']})"
        if not reply.get("ok"):
            return f"worker {worker.pid}: " + "; ".join(reply.get("errors", ["refused"]))
        return None

    async def _round_on(
        self, workers: list[_Worker], config: GatewayConfig, version: int
    ) -> list[tuple[_Worker, str]]:
        """Prepare on every one of `workers`, then commit on all, or abort on all. Raises
        ReloadError when a prepare failed (then nobody commits); returns the commits that
        were not acknowledged."""
        generation = next(self._generations)
        prepare = {
            "type": "prepare",
            "generation": generation,
            "version": version,
            "config": config.model_dump(mode="json"),
        }
        prepared = await asyncio.gather(*(self._order(w, prepare) for w in workers))
        failures = [why for why in prepared if why is not None]
        if failures:
            for worker in workers:
                worker.notify({"type": "abort", "generation": generation})
            raise ReloadError("apply_failed", failures)
        commit = {"type": "commit", "generation": generation}
        committed = await asyncio.gather(*(self._order(w, commit) for w in workers))
        missed = [(w, why) for w, why in zip(workers, committed, strict=True) if why is not None]
        for worker, why in missed:
            # Every worker holds the new Plan and some serve it already: no way back. This
            # one commits when it reads the order, or is caught up; /status shows it behind.
            worker.events["commit_unacknowledged"] += 1
            log.error("%s; it is behind until it serves version %d", why, version)
        return missed

    async def apply(self, config: GatewayConfig, plan: Plan) -> None:
        async with self._round:
            live = [w for w in self.workers_ if w.alive]
            if not live:
                raise ReloadError("apply_failed", ["(workers): no worker is running"])
            await self._round_on(live, config, plan.version)
            self.applied = (config, plan.version)
        for worker in live:
            self._noticed(worker)

    def _noticed(self, worker: _Worker) -> None:
        """A worker spoke: if it serves another config than the current one, catch it up
        (one catch-up task at a time, never during a reload)."""
        if (
            self._behind(worker)
            and worker.responding
            and not self._round.locked()
            and not self._catching_up
        ):
            task = asyncio.get_running_loop().create_task(self._catch_up())
            self._catching_up.add(task)
            task.add_done_callback(self._catching_up.discard)

    def _behind(self, worker: _Worker) -> bool:
        return worker.alive and worker.version != self.applied[1]

    async def _catch_up(self) -> None:
        """Sends the current config, in a round of its own, to each responding worker that
        serves another one."""
        async with self._round:
            config, version = self.applied
            for worker in self.workers_:
                if not (self._behind(worker) and worker.responding):
                    continue
                log.warning(
                    "worker %d serves version %d: sending version %d",
                    worker.pid,
                    worker.version,
                    version,
                )
                try:
                    errors = [why for _, why in await self._round_on([worker], config, version)]
                except ReloadError as exc:
                    errors = exc.errors
                if errors:
                    worker.events["catch_up_failed"] += 1
                    log.error("worker %d not caught up: %s", worker.pid, "; ".join(errors))
                else:
                    worker.events["caught_up"] += 1

    async def _ask(self, worker: _Worker, kind: str) -> dict[str, Any] | None:
        try:
            return await worker.request({"type": kind}, self.timeout_s)
        except (ConnectionError, TimeoutError):
            return None

    async def workers(self) -> list[dict[str, Any]]:
        """Each worker's own status, or what the parent last heard from one that is not
        answering; with the config version it serves and whether that is the current one."""
        replies = await asyncio.gather(*(self._ask(w, "status") for w in self.workers_))
        current = self.applied[1]
        out = []
        for worker, reply in zip(self.workers_, replies, strict=True):
            known: dict[str, Any] = {
                "worker": worker.index,
                "pid": worker.pid,
                "alive": worker.alive,
                "exit_code": worker.exit_code,
                "version": worker.version,
            }
            if reply is not None and reply.get("ok"):
                known.update(reply["status"])
            known.update(
                responding=worker.responding,
                current=known["version"] == current,
                reload_events={k: worker.events[k] for k in _EVENTS},
            )
            out.append(known)
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
        replies = await asyncio.gather(
            *(w.request(message, self.timeout_s) for w in live), return_exceptions=True
        )
        for worker, reply in zip(live, replies, strict=True):
            if isinstance(reply, BaseException):
                raise ConnectionError(f"worker {worker.pid}: {str(reply) or 'no reply in time'}")
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
                code = uvloop.run(worker_main(config, host, port, child_end))
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
