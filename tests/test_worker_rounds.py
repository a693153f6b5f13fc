"""The two-phase reload across workers (issue 12, finding 11), in one process: the parent's
WorkerPool talks over real socketpairs to workers whose order loop a test can pause (as
SIGSTOP does) or make lose an order, at chosen points of a round. Every worker must end on the
one config the control plane says is running."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from modelgate.config import GatewayConfig, validate_config
from modelgate.control import ReloadError
from modelgate.plan import compile_plan
from modelgate.runtime.worker import WorkerState, receive_frame, send_frame
from modelgate.runtime.workers import WorkerPool, _Worker
from modelgate.server import Gateway

from .support import ab_config, async_test


def config_with(weights: tuple[float, float]) -> GatewayConfig:
    raw = ab_config(weights, limits={"worker_reply_timeout_ms": 200})
    return validate_config(raw)


class FakeWorker:
    """A worker's order loop in this process: `pause_at` stops it when an order of that type
    arrives (until `resume`), `lose` makes it drop the next order of that type unanswered."""

    def __init__(self, index: int, config: GatewayConfig) -> None:
        self.gateway = Gateway(compile_plan(config))
        self.state = WorkerState(self.gateway)
        self.running = asyncio.Event()
        self.running.set()
        self.pause_at: str | None = None
        self.lose: str | None = None
        self.writer: asyncio.StreamWriter | None = None
        parent_end, self.channel = socket.socketpair()
        # A real child for the parent's handle to reap when the channel closes.
        pid = os.posix_spawn("/bin/true", ["true"], os.environ)
        self.handle = _Worker(index, pid, parent_end)

    async def serve(self) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=self.channel)
        self.writer = writer
        send_frame(writer, {"type": "hello", "serving": self.gateway.plan.version})
        while (message := await receive_frame(reader)) is not None:
            if message.get("type") == self.pause_at:
                self.pause_at = None
                self.running.clear()
            await self.running.wait()
            if message.get("type") == self.lose:
                self.lose = None
                continue
            send_frame(writer, self.state.handle(message))
        writer.close()

    def resume(self) -> None:
        self.running.set()

    @property
    def version(self) -> int:
        return self.gateway.plan.version


@contextlib.asynccontextmanager
async def pool_of(count: int) -> AsyncIterator[tuple[WorkerPool, list[FakeWorker]]]:
    config = config_with((100, 0))
    fakes = [FakeWorker(i, config) for i in range(count)]
    tasks = [asyncio.create_task(f.serve()) for f in fakes]
    for fake in fakes:
        await fake.handle.start()
    await asyncio.gather(*(f.handle.hello for f in fakes))
    try:
        yield WorkerPool([f.handle for f in fakes], config), fakes
    finally:
        for fake in fakes:
            fake.resume()
            if fake.writer is not None:
                fake.writer.close()  # the parent's handle sees EOF, as when a worker exits
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(f.handle.exited for f in fakes))
        for fake in fakes:
            if fake.handle.writer is not None:
                fake.handle.writer.close()


async def reload(pool: WorkerPool, weights: tuple[float, float]) -> None:
    version = pool.applied[1] + 1
    config = config_with(weights)
    await pool.apply(config, compile_plan(config, version=version))


async def settled(pool: WorkerPool) -> list[dict[str, Any]]:
    """The pool's view once every worker answered a status query and any catch-up ended."""
    for _ in range(50):
        workers = await pool.workers()
        if all(w["responding"] for w in workers) and not pool._catching_up:
            return workers
        await asyncio.sleep(0.02)
    raise AssertionError(f"workers never settled: {workers}")


def test_a_worker_paused_at_prepare_refuses_the_round_and_never_commits() -> None:
    @async_test
    async def run() -> None:
        async with pool_of(2) as (pool, (first, second)):
            second.pause_at = "prepare"
            with pytest.raises(ReloadError) as refused:
                await reload(pool, (0, 100))
            assert refused.value.kind == "apply_failed"
            assert f"worker {second.handle.pid}: no reply in time (prepare)" in refused.value.errors
            assert (first.version, second.version) == (1, 1)
            second.resume()  # it reads the prepare, answers late, then the abort
            workers = await settled(pool)
            assert [w["version"] for w in workers] == [1, 1]
            assert all(w["current"] for w in workers)
            assert first.state.held is None and second.state.held is None

            await reload(pool, (0, 100))  # the next round reaches both
            assert (first.version, second.version) == (2, 2)

    run()


def test_a_worker_paused_between_prepare_and_commit_commits_when_it_resumes() -> None:
    @async_test
    async def run() -> None:
        async with pool_of(2) as (pool, (first, second)):
            second.pause_at = "commit"
            await reload(pool, (0, 100))  # first committed: the round cannot be undone
            assert (first.version, second.version) == (2, 1)
            workers = await pool.workers()
            assert [(w["version"], w["current"], w["responding"]) for w in workers] == [
                (2, True, True),
                (1, False, False),
            ]
            assert workers[1]["reload_events"]["commit_unacknowledged"] == 1
            second.resume()
            workers = await settled(pool)
            assert [w["version"] for w in workers] == [2, 2]
            assert second.version == 2 and second.state.held is None

    run()


def test_a_worker_that_lost_its_commit_is_caught_up_when_it_answers() -> None:
    @async_test
    async def run() -> None:
        async with pool_of(2) as (pool, (first, second)):
            second.lose = "commit"
            await reload(pool, (0, 100))
            assert (first.version, second.version) == (2, 1)
            # Its next answer says it serves version 1: the parent sends version 2 again.
            workers = await settled(pool)
            for _ in range(50):
                if second.version == 2:
                    break
                await asyncio.sleep(0.02)
            workers = await settled(pool)
            assert [w["version"] for w in workers] == [2, 2]
            assert workers[1]["reload_events"] == {
                "commit_unacknowledged": 1,
                "caught_up": 1,
                "catch_up_failed": 0,
            }

    run()


def test_a_refused_prepare_is_aborted_everywhere() -> None:
    @async_test
    async def run() -> None:
        async with pool_of(2) as (pool, (first, second)):
            config = config_with((0, 100))
            raw = config.model_dump(mode="json")
            raw["routes"][0]["experiment"]["variants"][1]["upstream"] = "nowhere"
            original = second.state._prepare

            def refuse(generation: int, version: int, message: dict[str, Any]) -> Any:
                return original(generation, version, {**message, "config": raw})

            second.state._prepare = refuse  # type: ignore[method-assign]
            with pytest.raises(ReloadError, match="unknown upstream 'nowhere'"):
                await pool.apply(config, compile_plan(config, version=2))
            await settled(pool)
            assert (first.version, second.version) == (1, 1)
            assert first.state.held is None  # dropped by the abort

    run()


def test_a_worker_commits_only_the_generation_it_prepared() -> None:
    @async_test
    async def run() -> None:
        state = WorkerState(Gateway(compile_plan(config_with((100, 0)))))
        raw = config_with((0, 100)).model_dump(mode="json")
        prepared = state.handle({"type": "prepare", "generation": 3, "version": 2, "config": raw})
        assert prepared["ok"] and prepared["serving"] == 1
        stale = state.handle({"type": "commit", "generation": 2})
        assert not stale["ok"] and stale["serving"] == 1
        assert "commit of generation 2, but generation 3 is prepared" in stale["errors"]
        assert state.handle({"type": "abort", "generation": 3})["ok"]
        assert not state.handle({"type": "commit", "generation": 3})["ok"]  # dropped
        state.handle({"type": "prepare", "generation": 4, "version": 2, "config": raw})
        state.handle({"type": "prepare", "generation": 5, "version": 2, "config": raw})
        assert not state.handle({"type": "commit", "generation": 4})["ok"]  # replaced
        assert state.handle({"type": "commit", "generation": 5})["serving"] == 2

    run()
