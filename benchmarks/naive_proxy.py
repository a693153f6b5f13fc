"""The baseline for the proxy benches: a straightforward aiohttp server whose one catch-all
handler forwards each request through one shared keep-alive ClientSession to one upstream.

    python benchmarks/naive_proxy.py --listen 127.0.0.1:8000 --upstream http://127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDictProxy

# RFC 9110 section 7.6.1, plus the framing headers that aiohttp recomputes on each side.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)

SESSION = web.AppKey("naive_proxy_session", aiohttp.ClientSession)


def _forwardable(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    named = {
        token.strip().lower() for v in headers.getall("connection", []) for token in v.split(",")
    }
    return [
        (k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP and k.lower() not in named
    ]


def build_app(upstream: str) -> web.Application:
    base = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # One shared pool of keep-alive connections, as the aiohttp docs recommend;
        # auto_decompress off so bodies pass through byte for byte.
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=60)
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout(total=30)
        ) as session:
            app[SESSION] = session
            yield

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        async with request.app[SESSION].request(
            request.method,
            base + request.raw_path,
            headers=_forwardable(request.headers),
            data=body if body else None,
            allow_redirects=False,
        ) as upstream_response:
            payload = await upstream_response.read()
            return web.Response(
                status=upstream_response.status,
                body=payload,
                headers=_forwardable(upstream_response.headers),
            )

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def serve(host: str, port: int, upstream: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # No access log: it would cost the baseline more than the proxying itself.
    runner = web.AppRunner(build_app(upstream), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"naive proxy listening on http://{host}:{port} -> {upstream}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    parser.add_argument("--upstream", required=True, help="upstream base URL, http://HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--listen must be HOST:PORT, got {args.listen!r}")
    uvloop.run(serve(host, int(port), args.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
