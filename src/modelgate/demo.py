"""`modelgate demo`: mock models and a gateway on free loopback ports, a few seconds of
traffic from many users, then the observed split and per-variant latency. No network."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import aiohttp
import numpy as np
import uvloop
from aiohttp import web

from modelgate.config import GatewayConfig, load_config, parse_config
from modelgate.mock import MockSettings, start_mock
from modelgate.plan import compile_plan
from modelgate.server import Gateway, bind_socket

__all__ = ["DemoResult", "run_demo", "run_demo_async"]

# How each demo upstream's mock behaves: the candidate is a little slower.
_MOCK_LATENCY_MS = (4.0, 7.0, 5.0, 6.0)


@dataclass
class DemoResult:
    """What the demo observed, per variant (from the response headers) and overall."""

    sent: int = 0
    errors: int = 0
    by_variant: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    weights: dict[str, float] = field(default_factory=dict)


def _load_demo_config(path: str | None) -> GatewayConfig:
    if path is not None:
        return load_config(path)
    text = resources.files("modelgate").joinpath("demo.yaml").read_text(encoding="utf-8")
    return parse_config(text, source="demo.yaml")


async def _drive(url: str, duration_s: float, rate: float, result: DemoResult) -> None:
    """Open-loop traffic at `rate` req/s from 5,000 simulated users for `duration_s`."""
    loop = asyncio.get_running_loop()
    rng = random.Random(7)
    connector = aiohttp.TCPConnector(limit=64)
    pending: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(user: str) -> None:
            start = loop.time()
            try:
                async with session.post(
                    url,
                    json={"features": [rng.random() for _ in range(4)]},
                    headers={"x-user-id": user},
                ) as response:
                    await response.read()
                    result.statuses[response.status] += 1
                    variant = response.headers.get("x-modelgate-variant", "-")
                    result.by_variant[variant].append((loop.time() - start) * 1000)
            except aiohttp.ClientError:
                result.errors += 1

        start = loop.time()
        interval = 1.0 / rate
        next_send = start
        while loop.time() - start < duration_s:
            task = loop.create_task(one(f"user-{rng.randrange(5000)}"))
            pending.add(task)
            task.add_done_callback(pending.discard)
            result.sent += 1
            next_send += interval
            delay = next_send - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        if pending:
            await asyncio.wait(pending, timeout=10)


def _print_report(result: DemoResult, elapsed_s: float) -> None:
    answered = sum(len(v) for v in result.by_variant.values())
    print(
        f"\nsent {result.sent} requests in {elapsed_s:.1f} s; {answered} answered, "
        f"{result.errors} connection errors; statuses {dict(result.statuses)}\n"
    )
    total_weight = sum(result.weights.values()) or 1.0
    header = (
        f"{'variant':<28}{'requests':>9}{'share':>8}{'expected':>10}"
        f"{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
    )
    print(header)
    print("-" * len(header))
    for variant in sorted(result.by_variant):
        latencies = np.array(result.by_variant[variant])
        share = len(latencies) / answered if answered else 0.0
        name = variant.partition("=")[2]
        expected = result.weights.get(name, 0.0) / total_weight
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
        print(
            f"{variant:<28}{len(latencies):>9}{share:>8.1%}{expected:>10.1%}"
            f"{p50:>9.1f}{p90:>9.1f}{p99:>9.1f}"
        )
    print(
        "\nThe same user always lands on the same variant: the split is by "
        "XXH64(salt:unit) mod 10000 (see README)."
    )


async def run_demo_async(
    duration_s: float = 5.0,
    rate: float = 300.0,
    config_path: str | None = None,
    quiet: bool = False,
) -> DemoResult:
    config = _load_demo_config(config_path)
    runners: list[web.AppRunner] = []
    raw = config.model_dump(mode="json", exclude_none=True)
    gateway: Gateway | None = None
    try:
        for index, name in enumerate(config.upstreams):
            latency = _MOCK_LATENCY_MS[index % len(_MOCK_LATENCY_MS)]
            runner, port = await start_mock(
                MockSettings(
                    name=name,
                    latency_ms=latency,
                    latency_dist="lognormal",
                    latency_std_ms=latency / 3,
                    seed=index,
                ),
            )
            runners.append(runner)
            raw["upstreams"][name]["url"] = f"http://127.0.0.1:{port}"
            if not quiet:
                print(f"mock model {name:<12} http://127.0.0.1:{port}  (~{latency:.0f} ms)")
        from modelgate.config import validate_config

        plan = compile_plan(validate_config(raw))
        gateway = Gateway(plan)
        sock = bind_socket("127.0.0.1", 0, reuse_port=False)
        port = sock.getsockname()[1]
        await gateway.listen(sock)
        route = next(r for r in plan.routes if r.experiment is not None)
        assert route.experiment is not None
        url = f"http://127.0.0.1:{port}{route.path_prefix.decode()}"
        result = DemoResult(
            weights={
                v.name: w
                for v, w in zip(
                    route.experiment.variants, route.experiment.table.weights, strict=True
                )
            }
        )
        if not quiet:
            print(
                f"gateway             http://127.0.0.1:{port}  "
                f"(experiment {route.experiment.name!r} on {url})"
            )
            print(f"driving {rate:.0f} req/s for {duration_s:.0f} s ...")
        started = time.monotonic()
        await _drive(url, duration_s, rate, result)
        if not quiet:
            _print_report(result, time.monotonic() - started)
        return result
    finally:
        if gateway is not None:
            await gateway.drain(2.0)
        for runner in runners:
            await runner.cleanup()


def run_demo(duration_s: float = 5.0, rate: float = 300.0, config_path: str | None = None) -> int:
    """Runs the demo; Ctrl-C stops it cleanly (the finally blocks tear everything down)."""
    if duration_s <= 0 or rate <= 0:
        print("modelgate demo: --duration and --rate must be > 0")
        return 2
    if config_path is not None and not Path(config_path).exists():
        print(f"modelgate demo: no such config file: {config_path}")
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run_demo_async(duration_s, rate, config_path))
        return 0
    print("\ninterrupted; everything stopped")
    return 130
