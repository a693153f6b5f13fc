"""A reload that removes an upstream drains its pool: requests of the old Plan still finish."""

from __future__ import annotations

import asyncio

from modelgate.config import validate_config
from modelgate.mock.server import MockSettings
from modelgate.plan import compile_plan

from .support import async_test, gateway_stack, raw_exchange, simple_config, with_ports

GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"


@async_test
async def test_queued_requests_of_the_old_plan_are_served_after_their_upstream_left() -> None:
    config = simple_config()
    config["upstreams"]["model-a"] = {"url": "x", "max_connections": 1}
    mocks = {
        "model-a": MockSettings(name="old", latency_ms=200),
        "model-b": MockSettings(name="new"),
    }
    async with gateway_stack(config, mocks) as stack:
        requests = [asyncio.create_task(raw_exchange(stack.port, GET)) for _ in range(3)]
        await asyncio.sleep(0.1)  # one in flight upstream, two queued for the only connection
        old_pool = stack.gateway.registry.pools["model-a"]
        assert len(old_pool.waiters) == 2
        new = simple_config(upstream="model-b")
        new = with_ports(new, {"model-b": stack.upstream_ports["model-b"]})
        new["listen"] = new["admin"] = "127.0.0.1:0"
        stack.gateway.swap(compile_plan(validate_config(new), version=2))
        assert old_pool.closing
        results = await asyncio.gather(*requests)
        (after,) = await raw_exchange(stack.port, GET)
    assert [r[0].status for r in results] == [200, 200, 200]
    assert {r[0].header("x-mock-model") for r in results} == {"old"}
    assert after.header("x-mock-model") == "new"
    assert old_pool.size == 0 and not old_pool.idle  # drained and closed
