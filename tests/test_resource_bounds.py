"""Resource bounds under attack: a `modelgate serve` process is hit at once by slowloris
heads, pipelines that are never read, trailers that never end and bodies trickled a byte at a
time. Its memory stays under a stated bound and an ordinary client is served throughout."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import pytest

from .support import (
    ServeProcesses,
    async_test,
    free_port,
    read_response,
    serve_ready,
    served_config,
    simple_config,
)
from .wire import recording_upstream

# What the attacks below may add to the gateway's resident memory. Unbounded, the pipelines
# alone were answered into the send buffers: 10 x 4.3 MB of requests, ~5x that in answers.
RSS_BOUND_BYTES = 64 * 1024 * 1024

SLOWLORIS = 200
PIPELINES = 10
TRAILERS = 10
TRICKLERS = 30


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def opened(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def slowloris(port: int, stop: asyncio.Event) -> None:
    _, writer = await opened(port)
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"s" * 1000
    with contextlib.suppress(ConnectionError):
        for byte in head:
            if stop.is_set():
                break
            writer.write(bytes((byte,)))
            await asyncio.sleep(0.05)
    writer.transport.abort()


async def pipeline_never_read(port: int, stop: asyncio.Event) -> None:
    """Pipelines small requests without ever reading: each answer is several times the size
    of its request, so a gateway that keeps reading fills its memory with answers."""
    _, writer = await opened(port)
    batch = b"GET /p HTTP/1.1\r\nHost: a\r\n\r\n" * 2000
    with contextlib.suppress(ConnectionError, TimeoutError):
        for _ in range(80):  # up to 4.3 MB of requests
            if stop.is_set():
                break
            writer.write(batch)
            await asyncio.wait_for(writer.drain(), 1)
    await stop.wait()
    writer.transport.abort()


async def endless_trailers(port: int, stop: asyncio.Event) -> bytes:
    reader, writer = await opened(port)
    try:
        writer.write(
            b"POST /t HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n"
        )
        for i in range(2000):  # 1 MB of trailer lines, unless the gateway stops reading
            if stop.is_set() or writer.transport.is_closing():
                break
            writer.write(b"x-t%d: %s\r\n" % (i, b"v" * 500))
            await writer.drain()
        response = await asyncio.wait_for(reader.read(200), 5)
        return response
    except (ConnectionError, TimeoutError):
        return b""
    finally:
        writer.transport.abort()


async def trickle_body(port: int, stop: asyncio.Event) -> None:
    _, writer = await opened(port)
    with contextlib.suppress(ConnectionError):
        writer.write(b"POST /b HTTP/1.1\r\nHost: a\r\ncontent-length: 10000000\r\n\r\n")
        while not stop.is_set():
            writer.write(b"b")
            await asyncio.sleep(0.1)
    writer.transport.abort()


@pytest.mark.slow
@async_test
async def test_memory_stays_bounded_and_others_are_served_under_attack(tmp_path: Path) -> None:
    async with recording_upstream() as upstream:
        port, admin = free_port(), free_port()
        config = served_config(simple_config(), {"model-a": upstream.port}, port, admin)
        config["log_dir"] = str(tmp_path / "logs")
        config["limits"] = {"client_header_timeout_ms": 60_000}  # they stay for the test
        with ServeProcesses(tmp_path) as processes:
            proc = await serve_ready(processes, config)
            for _ in range(20):  # warm up: pools, imports, caches
                reader, writer = await opened(port)
                writer.write(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
                await read_response(reader)
                writer.close()
            baseline = rss_bytes(proc.pid)

            stop = asyncio.Event()
            attacks = [
                *(slowloris(port, stop) for _ in range(SLOWLORIS)),
                *(pipeline_never_read(port, stop) for _ in range(PIPELINES)),
                *(trickle_body(port, stop) for _ in range(TRICKLERS)),
            ]
            running = [asyncio.ensure_future(a) for a in attacks]
            trailers = [
                asyncio.ensure_future(endless_trailers(port, stop)) for _ in range(TRAILERS)
            ]

            statuses = []
            peak = baseline
            for _ in range(50):  # an ordinary client, served throughout
                reader, writer = await opened(port)
                writer.write(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
                statuses.append((await asyncio.wait_for(read_response(reader), 10)).status)
                writer.close()
                peak = max(peak, rss_bytes(proc.pid))
                await asyncio.sleep(0.1)
            trailer_answers = await asyncio.gather(*trailers)
            peak = max(peak, rss_bytes(proc.pid))
            stop.set()
            await asyncio.gather(*running, return_exceptions=True)
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{admin}/metrics") as response:
                    metrics = await response.text()
            refused_431 = sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("modelgate_requests_total{") and 'code="431"' in line
            )

    print(f"gateway RSS: baseline {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB")
    assert statuses == [200] * 50
    assert peak - baseline < RSS_BOUND_BYTES, (baseline, peak)
    # The endless trailers were cut at the header limit with a 431, not read to the end
    # (a client still writing may see the close as a reset before it reads the 431).
    assert refused_431 == TRAILERS, metrics
    assert all(a.startswith(b"HTTP/1.1 431") for a in trailer_answers if a), trailer_answers
