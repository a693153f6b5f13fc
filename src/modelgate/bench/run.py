"""`modelgate bench`: a load driver at a fixed arrival rate (open loop, latency from each
request's scheduled send time) or a fixed concurrency (closed loop), per variant."""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import queue
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
import uvloop

from modelgate.bench.config import (
    DEFAULT_CONCURRENCY,
    DEFAULT_DURATION_S,
    FEEDBACK_PATH,
    HEADER_NAME,
    BenchConfig,
    FeedbackSpec,
    split_url,
)
from modelgate.bench.report import BenchReport, Recorder, build_report, format_report
from modelgate.bench.traffic import Driver, Share
from modelgate.feedback_tokens import UNIT_SECRET_ENV

__all__ = [
    "BenchConfig",
    "BenchReport",
    "FeedbackSpec",
    "configure_parser",
    "format_report",
    "run_bench",
    "run_from_args",
]


# --- running -----------------------------------------------------------------------------


class _ProgressLine:
    """A `\\r` status line on stderr, refreshed in place; cleared at the end."""

    def __init__(self) -> None:
        self.start = self.last_t = time.perf_counter()
        self.last_responses = 0
        self.width = 0

    def show(self, sent: int, responses: int, errors: int, in_flight: int) -> None:
        now = time.perf_counter()
        rate = (responses - self.last_responses) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_responses = now, responses
        line = (
            f"{now - self.start:6.1f} s  sent {sent:,}  responses {responses:,}"
            f"  errors {errors:,}  in flight {in_flight:,}  {rate:,.0f} req/s"
        )
        self.width = max(self.width, len(line))
        sys.stderr.write("\r" + line.ljust(self.width))
        sys.stderr.flush()

    def clear(self) -> None:
        if self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()


_PROGRESS_EVERY_S = 0.5
Counts = tuple[int, int, int, int]  # sent, responses, errors, in flight


def _counts(driver: Driver) -> Counts:
    r = driver.recorder
    return r.sent, r.responses, sum(r.errors.values()), driver.in_flight


async def _report_progress(read: Callable[[], Counts], line: _ProgressLine) -> None:
    while True:
        await asyncio.sleep(_PROGRESS_EVERY_S)
        line.show(*read())


async def run_bench(config: BenchConfig, *, stop: asyncio.Event | None = None) -> BenchReport:
    """Runs one bench on the running loop (N child processes with `processes`). Setting
    `stop` ends it early: nothing more is sent, and what is in flight is still counted."""
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    if stop is None:
        stop = asyncio.Event()
    if config.processes > 1:
        recorder = await _run_processes(config, stop)
    else:
        recorder = await _run_local(config, stop)
    return build_report(
        recorder,
        url=config.url,
        mode=config.mode,
        rate=config.rate,
        concurrency=(config.concurrency or DEFAULT_CONCURRENCY) if config.rate is None else None,
        duration_s=(
            None if config.requests is not None else (config.duration_s or DEFAULT_DURATION_S)
        ),
        requests=config.requests,
        processes=config.processes,
        started_at=started_at,
        feedback=bool(config.feedback),
        stopped_early=stop.is_set(),
    )


async def _run_local(config: BenchConfig, stop: asyncio.Event) -> Recorder:
    driver = Driver(config)
    line = _ProgressLine() if config.progress else None
    tasks = [asyncio.create_task(_stop_when(stop, driver.stop))]
    if line is not None:
        tasks.append(asyncio.create_task(_report_progress(lambda: _counts(driver), line)))
    try:
        return await driver.run()
    finally:
        for task in tasks:
            task.cancel()
        if line is not None:
            line.clear()


async def _stop_when(stop: asyncio.Event, action: Callable[[], None]) -> None:
    await stop.wait()
    action()


def _child(config: BenchConfig, index: int, step: int, results: Any, go: Any) -> None:
    """A driver process: waits for the start signal, runs its share, sends its Recorder."""
    # Ctrl-C reaches the whole process group; until the loop handles it, ignore it here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        results.put(("ready", index, None))
        if not go.wait(120):
            return

        async def main() -> Recorder:
            driver = Driver(config, Share(index, step))
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, driver.stop)
            task = None
            if config.progress:

                async def tell() -> None:
                    while True:
                        await asyncio.sleep(_PROGRESS_EVERY_S)
                        results.put(("progress", index, _counts(driver)))

                task = asyncio.create_task(tell())
            try:
                return await driver.run()
            finally:
                if task is not None:
                    task.cancel()

        results.put(("done", index, uvloop.run(main())))
    except BaseException:
        results.put(("failed", index, traceback.format_exc()))


async def _run_processes(config: BenchConfig, stop: asyncio.Event) -> Recorder:
    # spawn, not fork: the parent may be running threads and an event loop of its own.
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    go = ctx.Event()
    step = config.processes
    procs = [
        ctx.Process(target=_child, args=(config, i, step, results, go), daemon=True)
        for i in range(step)
    ]
    loop = asyncio.get_running_loop()
    line = _ProgressLine() if config.progress else None
    progress: dict[int, Counts] = {}
    total = Recorder()
    states: dict[int, str] = {}

    def get() -> tuple[str, int, Any] | None:
        try:
            item: tuple[str, int, Any] = results.get(timeout=0.2)
            return item
        except queue.Empty:
            return None

    def interrupt() -> None:
        for proc in procs:
            if proc.pid is not None and proc.exitcode is None:
                os.kill(proc.pid, signal.SIGINT)

    stopper = asyncio.create_task(_stop_when(stop, interrupt))
    try:
        for proc in procs:
            proc.start()
        while len([s for s in states.values() if s in ("done", "failed")]) < step:
            item = await loop.run_in_executor(None, get)
            if item is None:
                dead = [i for i, p in enumerate(procs) if p.exitcode is not None]
                lost = [i for i in dead if states.get(i) not in ("done", "failed")]
                if lost:
                    raise RuntimeError(f"bench process {lost[0]} exited without a report")
                continue
            kind, index, payload = item
            if kind == "ready":
                states[index] = "ready"
                if len(states) == step and all(s == "ready" for s in states.values()):
                    go.set()
            elif kind == "progress" and line is not None:
                progress[index] = payload
                sums = [sum(c[k] for c in progress.values()) for k in range(4)]
                line.show(sums[0], sums[1], sums[2], sums[3])
            elif kind == "done":
                states[index] = "done"
                total.merge(payload)
            elif kind == "failed":
                raise RuntimeError(f"bench process {index} failed:\n{payload}")
        return total
    finally:
        stopper.cancel()
        if line is not None:
            line.clear()
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            await loop.run_in_executor(None, proc.join, 5)
        results.close()


# --- command line ------------------------------------------------------------------------

N = TypeVar("N", int, float)


def _checked(
    kind: Callable[[str], N], ok: Callable[[N], bool], requirement: str
) -> Callable[[str], N]:
    """An argparse type: `kind(text)` that must satisfy `ok` (argparse names the flag)."""

    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    return parse


_positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a number > 0")
_non_negative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
_positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")


def _url(text: str) -> str:
    try:
        split_url(text, "the URL")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not HEADER_NAME.match(name.strip()) or any(c in value for c in "\r\n\0"):
        raise argparse.ArgumentTypeError(f"expected 'name: value', got {text!r}")
    return name.strip(), value.strip()


def _feedback(text: str) -> FeedbackSpec:
    try:
        return FeedbackSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _method(text: str) -> str:
    if not HEADER_NAME.match(text):
        raise argparse.ArgumentTypeError(f"not an HTTP method: {text!r}")
    return text.upper()


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Adds the bench options to `parser` (argparse names the flag on a bad value)."""
    add = parser.add_argument
    add("url", type=_url, metavar="URL", help="the target, http://host[:port][/path]")
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--rate", type=_positive_float, help="open loop: requests per second on a fixed schedule"
    )
    load.add_argument(
        "--concurrency",
        type=_positive_int,
        help=f"closed loop: requests in flight (default {DEFAULT_CONCURRENCY})",
    )
    span = parser.add_mutually_exclusive_group()
    span.add_argument(
        "--duration",
        type=_positive_float,
        help=f"seconds of load (default {DEFAULT_DURATION_S:g})",
    )
    span.add_argument("--requests", type=_positive_int, help="a request budget instead")
    add("--method", type=_method, default="POST", help="HTTP method (default POST)")
    bodies = parser.add_mutually_exclusive_group()
    bodies.add_argument(
        "--body",
        metavar="TEMPLATE",
        help="request body; {unit}, {rand} and {seq} are filled per request"
        " (default for POST/PUT/PATCH: a small JSON feature vector with a unit id)",
    )
    bodies.add_argument("--body-file", metavar="FILE", help="JSON lines: one body per line")
    add("--unit-header", metavar="NAME", help="send the request's unit id in this header")
    add("--units", type=_positive_int, default=10_000, help="distinct unit ids (user-N)")
    add(
        "--header",
        type=_header,
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="an extra request header (repeatable)",
    )
    add("--timeout", type=_positive_float, default=10.0, help="seconds per request")
    add("--processes", type=_positive_int, default=1, help="driver processes sharing the load")
    add(
        "--max-connections",
        type=_positive_int,
        default=1024,
        help="open loop: connections per process at most (beyond: queued in the driver)",
    )
    add("--seed", type=int, default=None, help="seed of unit ids, bodies and outcomes")
    add("--json", action="store_true", help="print the full report as JSON on stdout")
    add(
        "--feedback",
        type=_feedback,
        action="append",
        default=[],
        metavar="METRIC:VARIANT=MEAN[,...]",
        help="post a simulated outcome per response of these variants (repeatable)",
    )
    add("--feedback-url", type=_url, default=None, help="default: the target's " + FEEDBACK_PATH)
    add(
        "--feedback-kind",
        choices=["normal", "binary"],
        default="normal",
        help="outcomes ~ normal(MEAN, --feedback-sd), or Bernoulli(MEAN)",
    )
    add("--feedback-sd", type=_non_negative_float, default=1.0, help="sd of normal outcomes")


def config_from_args(ns: argparse.Namespace, progress: bool = False) -> BenchConfig:
    return BenchConfig(
        url=ns.url,
        rate=ns.rate,
        concurrency=ns.concurrency,
        duration_s=ns.duration,
        requests=ns.requests,
        method=ns.method,
        body=ns.body,
        body_file=ns.body_file,
        unit_header=ns.unit_header,
        units=ns.units,
        headers=tuple(ns.header),
        timeout_s=ns.timeout,
        processes=ns.processes,
        max_connections=ns.max_connections,
        feedback=tuple(ns.feedback),
        feedback_url=ns.feedback_url,
        feedback_kind=ns.feedback_kind,
        feedback_sd=ns.feedback_sd,
        seed=ns.seed,
        progress=progress,
    )


def run_from_args(ns: argparse.Namespace) -> int:
    """`modelgate bench`: 0 when anything answered, 1 when nothing did, 2 on bad flags."""
    try:
        config = config_from_args(ns, progress=sys.stderr.isatty())
        if config.body_file is not None and not Path(config.body_file).is_file():
            raise ValueError(f"--body-file: no such file: {config.body_file}")
        secret = os.environ.get(UNIT_SECRET_ENV, "")
        if config.feedback and secret and not re.fullmatch(r"[!-~]+", secret):
            raise ValueError(f"{UNIT_SECRET_ENV}: must be visible ASCII without spaces")
    except ValueError as exc:
        print(f"modelgate bench: error: {exc}", file=sys.stderr)
        return 2
    report = uvloop.run(_run_interruptible(config))
    if ns.json:
        sys.stdout.buffer.write(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(format_report(report))
    return 0 if report.responses else 1


async def _run_interruptible(config: BenchConfig) -> BenchReport:
    """The first Ctrl-C ends the bench with a report; a second one aborts."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def first_interrupt() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    loop.add_signal_handler(signal.SIGINT, first_interrupt)
    try:
        return await run_bench(config, stop=stop)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
