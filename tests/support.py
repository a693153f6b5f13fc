"""Test helpers: a gateway with mock models on ephemeral loopback ports, raw HTTP clients and
hand-written misbehaving upstreams. Everything binds to 127.0.0.1 and is torn down after."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import aiohttp
import uvloop
import yaml
from aiohttp import web

from modelgate.config import validate_config
from modelgate.control import ControlPlane
from modelgate.mock.server import MockSettings, start_mock
from modelgate.plan import compile_plan
from modelgate.runtime.serve import attach_control
from modelgate.server import Gateway, bind_socket

# What the admin API needs on a change without a body (a body-less POST /reload reloads the
# file): no form or no-cors fetch can send it.
JSON_TYPE = {"Content-Type": "application/json"}

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


@dataclass
class AdminStack:
    """A gateway with its control plane and admin API, as `modelgate serve` runs them."""

    stack: Stack
    control: ControlPlane
    admin_port: int
    runner: web.AppRunner

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def complete(self, config: dict[str, Any]) -> dict[str, Any]:
        """A config as the running one would be written: mock ports, loopback listeners.
        Unlike `with_ports`, upstreams the config leaves out stay out."""
        ports = self.stack.upstream_ports
        full = with_ports(config, {k: v for k, v in ports.items() if k in config["upstreams"]})
        full.setdefault("listen", "127.0.0.1:0")
        full.setdefault("admin", "127.0.0.1:0")
        return full


@contextlib.asynccontextmanager
async def admin_stack(
    config: dict[str, Any],
    mocks: dict[str, MockSettings] | None = None,
    *,
    token: str | None = None,
    config_path: Path | None = None,
    extra_ports: dict[str, int] | None = None,
) -> AsyncIterator[AdminStack]:
    """`gateway_stack` plus the control plane and the admin API on an ephemeral port."""
    async with gateway_stack(config, mocks, extra_ports) as stack:
        admin_sock = bind_socket("127.0.0.1", 0, reuse_port=False)
        port = admin_sock.getsockname()[1]
        control, runner = await attach_control(stack.gateway, config_path, admin_sock, token)
        try:
            yield AdminStack(stack, control, port, runner)
        finally:
            await runner.cleanup()


# --- `modelgate serve` as a subprocess ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"gateway exited early: {proc.stderr.read() if proc.stderr else ''!r}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")


def write_config(tmp_path: Path, config: dict[str, Any], name: str = "gateway.yaml") -> Path:
    """Writes atomically (a temporary file renamed over the old one), as deploy tools do."""
    path = tmp_path / name
    staging = tmp_path / f".{name}.tmp"
    staging.write_text(yaml.safe_dump(config), encoding="utf-8")
    staging.replace(path)
    return path


def served_config(
    config: dict[str, Any], upstream_ports: dict[str, int], port: int, admin_port: int
) -> dict[str, Any]:
    """A config for a `modelgate serve` process: upstreams at these loopback ports, the
    proxy on `port` and the admin API on `admin_port`."""
    full = with_ports(config, upstream_ports)
    full.update(listen=f"127.0.0.1:{port}", admin=f"127.0.0.1:{admin_port}")
    return full


class ServeProcesses:
    """`python -m modelgate serve` processes started by a test, killed if still running."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, config: dict[str, Any], *extra: str) -> subprocess.Popen[bytes]:
        path = write_config(self.tmp_path, config)
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelgate", "serve", "--config", str(path), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.procs.append(proc)
        return proc

    def __enter__(self) -> ServeProcesses:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0
) -> None:
    """Polls `check` until it is true; fails naming `what` when the time is up."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)
    assert await check(), what


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        return response.status, await response.json()


async def serve_ready(
    processes: ServeProcesses, config: dict[str, Any], *extra: str
) -> subprocess.Popen[bytes]:
    """Starts `modelgate serve` with `config` and waits until its admin API says ready
    (GET /readyz 200: with --workers, every worker is serving)."""
    proc = processes.start(config, *extra)
    await asyncio.to_thread(wait_listening, parse_port(config["listen"]), proc)
    admin = f"http://{config['admin']}"
    async with aiohttp.ClientSession() as session:

        async def ready() -> bool:
            try:
                return (await get_json(session, admin + "/readyz"))[0] == 200
            except aiohttp.ClientError:
                return False

        await wait_until(ready, "the gateway ready (every worker serving)")
    return proc


def parse_port(hostport: str) -> int:
    return int(hostport.rpartition(":")[2])
