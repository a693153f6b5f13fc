"""Test helpers: a gateway with mock models on ephemeral loopback ports, raw HTTP clients and
hand-written misbehaving upstreams. Everything binds to 127.0.0.1 and is torn down after."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import uvloop
from aiohttp import web

from modelgate.config import validate_config
from modelgate.mock import MockSettings, start_mock
from modelgate.plan import compile_plan
from modelgate.server import Gateway, bind_socket

P = ParamSpec("P")
T = TypeVar("T")


def async_test(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """Runs an async test on uvloop, bounded in time so a hang fails instead of blocking."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(60):
                return await fn(*args, **kwargs)

        return uvloop.run(bounded())

    return wrapper


@dataclass
class Stack:
    gateway: Gateway
    port: int
    upstream_ports: dict[str, int]
    runners: list[web.AppRunner] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def with_ports(config: dict[str, Any], ports: dict[str, int]) -> dict[str, Any]:
    """Points each upstream of a config at the port given for its name."""
    config = copy.deepcopy(config)
    for name, port in ports.items():
        config["upstreams"].setdefault(name, {})
        config["upstreams"][name]["url"] = f"http://127.0.0.1:{port}"
    return config


@contextlib.asynccontextmanager
async def gateway_stack(
    config: dict[str, Any],
    mocks: dict[str, MockSettings] | None = None,
    extra_ports: dict[str, int] | None = None,
) -> AsyncIterator[Stack]:
    """Starts one mock model per entry of `mocks` (keyed by upstream name) and a gateway."""
    runners: list[web.AppRunner] = []
    ports: dict[str, int] = dict(extra_ports or {})
    try:
        for name, settings in (mocks or {}).items():
            runner, port = await start_mock(settings, "127.0.0.1", 0)
            runners.append(runner)
            ports[name] = port
        full = with_ports(config, ports)
        full.setdefault("listen", "127.0.0.1:0")
        full.setdefault("admin", "127.0.0.1:0")
        plan = compile_plan(validate_config(full))
        gateway = Gateway(plan)
        sock = bind_socket("127.0.0.1", 0, reuse_port=False)
        port = sock.getsockname()[1]
        await gateway.listen(sock)
        try:
            yield Stack(gateway, port, ports, runners)
        finally:
            await gateway.drain(1.0)
    finally:
        for runner in runners:
            await runner.cleanup()


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> RawResponse:
    """Reads one HTTP/1.1 response (Content-Length, chunked or close-delimited)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    parts = status_line.decode("latin-1").split(" ", 2)
    status = int(parts[1])
    headers: list[tuple[str, str]] = []
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    response = RawResponse(status, headers, b"")
    if head or status in (204, 304) or 100 <= status < 200:
        return response
    length = response.header("content-length")
    if response.header("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            body += await reader.readexactly(size)
            await reader.readline()
        response.body = body
    elif length is not None:
        response.body = await reader.readexactly(int(length))
    else:
        response.body = await reader.read()
    return response


async def raw_exchange(port: int, data: bytes, *, count: int = 1) -> list[RawResponse]:
    """Sends raw bytes on a fresh connection and reads `count` responses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return [await read_response(reader) for _ in range(count)]
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def is_closed(reader: asyncio.StreamReader, timeout: float = 2.0) -> bool:
    """True when the peer closes the connection (EOF) within the timeout."""
    try:
        async with asyncio.timeout(timeout):
            return await reader.read() == b""
    except (ConnectionError, TimeoutError):
        return True


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_upstream(handler: RawHandler) -> AsyncIterator[int]:
    """A hand-written upstream for failure cases; yields its port."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def simple_config(upstream: str = "model-a", **route: Any) -> dict[str, Any]:
    """One route to one upstream; keyword arguments extend the route."""
    config: dict[str, Any] = {
        "upstreams": {upstream: {"url": "http://127.0.0.1:1"}},
        "routes": [{"name": "default", "match": {"path_prefix": "/"}, "upstream": upstream}],
    }
    config["routes"][0].update(route)
    return config


def ab_config(weights: tuple[float, float] = (50, 50), **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "upstreams": {
            "model-a": {"url": "http://127.0.0.1:1"},
            "model-b": {"url": "http://127.0.0.1:1"},
        },
        "routes": [
            {
                "name": "predict",
                "match": {"path_prefix": "/predict"},
                "unit": ["header:x-user-id", "cookie:uid", "query:user_id"],
                "experiment": {
                    "name": "ranker",
                    "variants": [
                        {"name": "control", "upstream": "model-a", "weight": weights[0]},
                        {"name": "candidate", "upstream": "model-b", "weight": weights[1]},
                    ],
                },
            },
            {"name": "default", "match": {"path_prefix": "/"}, "upstream": "model-a"},
        ],
    }
    config.update(extra)
    return config
