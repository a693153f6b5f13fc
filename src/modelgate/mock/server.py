"""The fake model server (`modelgate mock-model`): deterministic JSON predictions with
configurable latency, injected errors, chunked or SSE streaming, and an echo of what it saw.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import random
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import orjson
import uvloop
import xxhash
from aiohttp import web

from modelgate.mock.models import ModelError, load_predictor

__all__ = [
    "DEFAULT_DRIFT",
    "LABELS",
    "LatencyDist",
    "MockSettings",
    "MOCK_STATE",
    "MockState",
    "RANKING_SIZE",
    "StreamMode",
    "build_app",
    "configure_parser",
    "predict",
    "run_from_args",
    "sample_latency_ms",
    "settings_from_args",
    "start_mock",
]

LatencyDist = Literal["fixed", "uniform", "normal", "lognormal", "exponential"]
StreamMode = Literal["none", "chunked", "sse"]

LABELS: tuple[str, str, str] = ("negative", "neutral", "positive")
RANKING_SIZE = 5
# About this fraction of labels differs between two model names (see `predict`).
DEFAULT_DRIFT = 0.2

_TWO64 = float(2**64)
_CENTERS = (1 / 6, 1 / 2, 5 / 6)
_SHARPNESS = 12.0
_MOCK_PREFIX = "/_mock/"
_ECHO_PREFIX = "/_echo"


def predict(name: str, data: bytes, drift: float = DEFAULT_DRIFT) -> dict[str, Any]:
    """The prediction of model `name` for input `data`; a pure function of its arguments.

    base  = xxh64(data) / 2**64                      (the same for every model name)
    nudge = xxh64(data, seed=xxh64(name)) / 2**64    (differs per name)
    score = (base + drift * nudge) mod 1
    label = LABELS[floor(3 * score)]; probs = softmax(-12 * (score - c_i)**2) over the
    class centres c = (1/6, 1/2, 5/6), so argmax(probs) is the label; ranking = item ids
    0..4 sorted by the same base + drift * nudge rule per item.

    Two names put a label across one of the three class boundaries with probability
    close to `drift` (for drift <= 1/3): drift 0.2 -> about 20% of labels differ.
    With drift 0 every name answers the same.
    """
    name_seed = xxhash.xxh64_intdigest(name.encode())
    base = xxhash.xxh64_intdigest(data) / _TWO64
    nudge = xxhash.xxh64_intdigest(data, seed=name_seed) / _TWO64
    score = (base + drift * nudge) % 1.0
    label_index = min(int(score * 3), 2)
    logits = [-_SHARPNESS * (score - c) ** 2 for c in _CENTERS]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    probs = [w / total for w in weights]

    def item_key(item: int) -> float:
        item_base = xxhash.xxh64_intdigest(data, seed=item + 1) / _TWO64
        item_nudge = xxhash.xxh64_intdigest(data, seed=(name_seed + item + 1) % 2**64) / _TWO64
        return item_base + drift * item_nudge

    ranking = sorted(range(RANKING_SIZE), key=item_key, reverse=True)
    return {
        "model": name,
        "score": score,
        "label": LABELS[label_index],
        "probs": probs,
        "ranking": ranking,
    }


@dataclass(frozen=True, slots=True)
class MockSettings:
    """What one mock model does. Every distribution has mean `latency_ms`; `latency_std_ms`
    is the standard deviation for uniform, normal and lognormal (exponential: std = mean).
    Samples below 0 are clipped to 0."""

    name: str = "mock-model"
    latency_ms: float = 0.0
    latency_dist: LatencyDist = "fixed"
    latency_std_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 500
    seed: int | None = None
    stream: StreamMode = "none"
    chunks: int = 4
    chunk_delay_ms: float = 20.0
    drift: float = DEFAULT_DRIFT
    max_body_bytes: int = 64 * 1024 * 1024
    # A real model instead of the hash-based fake: called with the body, returns the answer
    # (modelgate.mock.models.SklearnPredictor; raises ModelError for a bad request).
    predictor: Callable[[bytes], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        dists, modes = get_args(LatencyDist), get_args(StreamMode)
        # Messages name the command-line flag: that is what an operator typed.
        rules: list[tuple[bool, str, str, object]] = [
            (bool(self.name), "--name", "not be empty", self.name),
            (_non_negative(self.latency_ms), "--latency-ms", "be >= 0", self.latency_ms),
            (self.latency_dist in dists, "--latency-dist", f"be one of {dists}", self.latency_dist),
            (
                _non_negative(self.latency_std_ms),
                "--latency-std-ms",
                "be >= 0",
                self.latency_std_ms,
            ),
            (0.0 <= self.error_rate <= 1.0, "--error-rate", "be in [0, 1]", self.error_rate),
            (
                400 <= self.error_status <= 599,
                "--error-status",
                "be in [400, 599]",
                self.error_status,
            ),
            (self.stream in modes, "--stream", f"be one of {modes}", self.stream),
            (self.chunks >= 1, "--chunks", "be >= 1", self.chunks),
            (
                _non_negative(self.chunk_delay_ms),
                "--chunk-delay-ms",
                "be >= 0",
                self.chunk_delay_ms,
            ),
            (0.0 <= self.drift <= 1.0, "--drift", "be in [0, 1]", self.drift),
            (self.max_body_bytes >= 0, "--max-body-bytes", "be >= 0", self.max_body_bytes),
        ]
        for ok, flag, requirement, value in rules:
            if not ok:  # NaN fails every comparison, so it lands here too
                raise ValueError(f"{flag} must {requirement}, got {value!r}")
        if self.latency_std_ms > 0 and self.latency_dist not in ("uniform", "normal", "lognormal"):
            raise ValueError(
                "--latency-std-ms applies only to --latency-dist uniform, normal or lognormal "
                f"(got --latency-dist {self.latency_dist})"
            )


def _non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def sample_latency_ms(settings: MockSettings, rng: random.Random) -> float:
    """One latency draw in milliseconds (mean `latency_ms`, never negative)."""
    mean = settings.latency_ms
    std = settings.latency_std_ms
    dist = settings.latency_dist
    if mean == 0.0 or dist == "fixed":
        return mean
    if dist == "exponential":
        return rng.expovariate(1.0 / mean)
    if std == 0.0:
        return mean
    if dist == "uniform":
        half = std * math.sqrt(3.0)  # a uniform on [m-h, m+h] has std h/sqrt(3)
        return max(0.0, rng.uniform(mean - half, mean + half))
    if dist == "normal":
        return max(0.0, rng.gauss(mean, std))
    # lognormal parameterized by its own mean and std, not by the underlying normal's.
    sigma2 = math.log1p((std / mean) ** 2)
    return rng.lognormvariate(math.log(mean) - sigma2 / 2.0, math.sqrt(sigma2))


@dataclass
class MockState:
    """Counters and the last request seen; one per application."""

    settings: MockSettings
    rng: random.Random
    requests: int = 0
    errors: int = 0
    streams: int = 0
    echoes: int = 0
    in_flight: int = 0
    last_request: dict[str, Any] | None = None
    by_method: dict[str, int] = field(default_factory=dict)

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.settings.name,
            "requests": self.requests,
            "errors": self.errors,
            "streams": self.streams,
            "echoes": self.echoes,
            "in_flight": self.in_flight,
            "by_method": dict(self.by_method),
        }

    def reset(self) -> None:
        self.requests = self.errors = self.streams = self.echoes = 0
        self.last_request = None
        self.by_method.clear()


MOCK_STATE = web.AppKey("modelgate_mock_state", MockState)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def _describe(request: web.Request, body: bytes) -> dict[str, Any]:
    """What arrived, as the echo endpoint reports it; path and query stay percent-encoded."""
    target = request.raw_path
    path, _, query = target.partition("?")
    headers: dict[str, str] = {}
    for key, value in request.headers.items():
        lower = key.lower()
        headers[lower] = f"{headers[lower]}, {value}" if lower in headers else value
    return {
        "method": request.method,
        "path": path,
        "query": query,
        "version": f"{request.version.major}.{request.version.minor}",
        "headers": headers,
        "raw_headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "body_len": len(body),
    }


class _Handlers:
    def __init__(self, state: MockState) -> None:
        self.state = state
        self.settings = state.settings
        self.headers = {"x-mock-model": state.settings.name}

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith(_MOCK_PREFIX):
            return self.control(request)
        state = self.state
        state.requests += 1
        state.by_method[request.method] = state.by_method.get(request.method, 0) + 1
        state.in_flight += 1
        try:
            body = await request.read()
            state.last_request = _describe(request, body)
            if request.path == _ECHO_PREFIX or request.path.startswith(_ECHO_PREFIX + "/"):
                # The echo is never delayed or failed: gateway tests read it as ground truth.
                state.echoes += 1
                return _json(state.last_request, headers=self.headers)
            return await self.model(request, body)
        finally:
            state.in_flight -= 1

    def control(self, request: web.Request) -> web.Response:
        state = self.state
        action = request.path[len(_MOCK_PREFIX) :]
        routes: dict[tuple[str, str], Callable[[], web.Response]] = {
            ("GET", "stats"): lambda: _json(state.stats(), headers=self.headers),
            ("GET", "last-headers"): self._last,
            ("POST", "reset"): self._reset,
        }
        handler = routes.get((request.method, action))
        if handler is None:
            detail = f"no mock control endpoint {request.method} {request.path}"
            return _json({"error": "not_found", "detail": detail}, 404, self.headers)
        return handler()

    def _last(self) -> web.Response:
        if self.state.last_request is None:
            detail = "nothing received yet"
            return _json({"error": "no_request", "detail": detail}, 404, self.headers)
        return _json(self.state.last_request, headers=self.headers)

    def _reset(self) -> web.Response:
        self.state.reset()
        return _json({"reset": True}, headers=self.headers)

    async def model(self, request: web.Request, body: bytes) -> web.StreamResponse:
        settings = self.settings
        rng = self.state.rng
        delay = sample_latency_ms(settings, rng)
        # Drawn in a fixed order (latency, then error) so a seed fixes the whole sequence.
        failed = settings.error_rate > 0.0 and rng.random() < settings.error_rate
        if delay > 0.0:
            await asyncio.sleep(delay / 1000.0)
        headers = {**self.headers, "x-mock-latency-ms": f"{delay:.3f}"}
        if failed:
            self.state.errors += 1
            error = {
                "error": "mock_error",
                "detail": f"injected failure (error_rate={settings.error_rate})",
                "model": settings.name,
            }
            return _json(error, settings.error_status, headers)
        if settings.predictor is not None:
            try:
                prediction = settings.predictor(body)
            except ModelError as exc:
                bad = {"error": "bad_request", "detail": str(exc), "model": settings.name}
                return _json(bad, 400, headers)
        else:
            # GET and other bodiless requests predict on the raw target (path and query).
            data = body if body else request.raw_path.encode("utf-8", "surrogateescape")
            prediction = predict(settings.name, data, settings.drift)
        if settings.stream == "none":
            return _json(prediction, headers=headers)
        self.state.streams += 1
        if settings.stream == "chunked":
            pieces = self._chunk_pieces(prediction)
            stream_headers = {**headers, "x-mock-stream": "chunked"}
            content_type = "application/json"
        else:
            pieces = self._sse_events(prediction)
            stream_headers = {**headers, "x-mock-stream": "sse", "cache-control": "no-cache"}
            content_type = "text/event-stream"
        response = web.StreamResponse(headers=stream_headers)
        response.content_type = content_type
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for index, piece in enumerate(pieces):
                if index:
                    await asyncio.sleep(settings.chunk_delay_ms / 1000.0)
                await response.write(piece)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away mid-stream; there is no one left to answer
        return response

    def _chunk_pieces(self, prediction: dict[str, Any]) -> list[bytes]:
        """The JSON body cut into `chunks` nearly equal pieces."""
        payload = orjson.dumps(prediction)
        count = min(self.settings.chunks, len(payload))
        step = -(-len(payload) // count)
        return [payload[i * step : (i + 1) * step] for i in range(count)]

    def _sse_events(self, prediction: dict[str, Any]) -> list[bytes]:
        """`chunks` token events, then one final event with the prediction and "done": true."""
        ranking = prediction["ranking"]
        events: list[dict[str, Any]] = [
            {
                "model": self.settings.name,
                "index": index,
                "token": f"{prediction['label']}-{ranking[index % len(ranking)]}",
            }
            for index in range(self.settings.chunks)
        ]
        events.append({**prediction, "index": self.settings.chunks, "done": True})
        return [b"data: " + orjson.dumps(event) + b"\n\n" for event in events]


def build_app(settings: MockSettings) -> web.Application:
    """An aiohttp application answering every path and method.

    - `/_echo[/...]`, any method: JSON {"method", "path", "query", "version", "headers",
      "raw_headers", "body_sha256", "body_len"} of the request as received; never delayed
      or failed.
    - `GET /_mock/stats`: counters; `GET /_mock/last-headers`: the echo of the last request
      (404 before any); `POST /_mock/reset`: zero the counters.
    - anything else: `predict(name, body or raw target)` after the sampled latency, or an
      injected error with probability `error_rate`; streamed when `stream` is set.
    Every answer carries `x-mock-model: NAME`.
    """
    state = MockState(settings=settings, rng=random.Random(settings.seed))
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[MOCK_STATE] = state
    app.router.add_route("*", "/{tail:.*}", _Handlers(state).dispatch)
    return app


async def start_mock(
    settings: MockSettings, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Starts a mock on host:port (0 = an ephemeral port); returns the runner and bound port.

    The caller owns the runner: `await runner.cleanup()` stops it.
    """
    runner = web.AppRunner(build_app(settings), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound


def _number(text: str, kind: type[float] | type[int]) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a valid {kind.__name__}: {text!r}") from None


def _non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not _non_negative(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _probability(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _port(text: str) -> int:
    value = int(_number(text, int))
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {text!r}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Adds the mock-model options to `parser` (argparse names the flag on a bad value)."""
    d = MockSettings()
    add = parser.add_argument
    add("--port", type=_port, default=0, help="port to listen on (0: ephemeral, printed)")
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    add("--name", default=d.name, help="model name: in every answer and x-mock-model")
    add(
        "--latency-ms",
        type=_non_negative_float,
        default=d.latency_ms,
        help="mean latency before answering, ms",
    )
    add(
        "--latency-dist",
        choices=get_args(LatencyDist),
        default=d.latency_dist,
        help="latency distribution, mean --latency-ms",
    )
    add(
        "--latency-std-ms",
        type=_non_negative_float,
        default=d.latency_std_ms,
        help="latency standard deviation (uniform, normal, lognormal)",
    )
    add(
        "--error-rate",
        type=_probability,
        default=d.error_rate,
        help="probability of an injected error response",
    )
    add("--error-status", type=int, default=d.error_status, help="status of injected errors")
    add("--seed", type=int, default=None, help="seed of the latency and error RNG")
    add(
        "--stream",
        choices=get_args(StreamMode),
        default=d.stream,
        help="none, chunked (body in pieces) or sse (text/event-stream)",
    )
    add(
        "--chunks",
        type=_positive_int,
        default=d.chunks,
        help="chunks (chunked) or token events (sse) per response",
    )
    add(
        "--chunk-delay-ms",
        type=_non_negative_float,
        default=d.chunk_delay_ms,
        help="pause between chunks or events, ms",
    )
    add(
        "--drift",
        type=_probability,
        default=d.drift,
        help="name-dependent perturbation: about this fraction of labels differ between names",
    )
    add("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body")
    add(
        "--model",
        default=None,
        help='a pickled scikit-learn classifier: serve its predictions on {"features": [...]}',
    )


def settings_from_args(ns: argparse.Namespace) -> MockSettings:
    """MockSettings from parsed options; raises ValueError naming the flag on a bad value."""
    predictor = load_predictor(ns.model, ns.name) if getattr(ns, "model", None) else None
    return MockSettings(
        predictor=predictor,
        name=ns.name,
        latency_ms=ns.latency_ms,
        latency_dist=ns.latency_dist,
        latency_std_ms=ns.latency_std_ms,
        error_rate=ns.error_rate,
        error_status=ns.error_status,
        seed=ns.seed,
        stream=ns.stream,
        chunks=ns.chunks,
        chunk_delay_ms=ns.chunk_delay_ms,
        drift=ns.drift,
        max_body_bytes=ns.max_body_bytes,
    )


async def _serve(settings: MockSettings, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner, bound = await start_mock(settings, host, port)
    try:
        # One line on stdout so scripts that start us with --port 0 learn the port.
        print(f"mock-model {settings.name} listening on http://{host}:{bound}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def run_from_args(ns: argparse.Namespace) -> int:
    """Serves on uvloop until SIGINT or SIGTERM and returns 0; on option values that do not
    go together (argparse checks each alone) prints the error naming the flag, returns 2."""
    try:
        settings = settings_from_args(ns)
    except ValueError as exc:
        print(f"modelgate mock-model: error: {exc}", file=sys.stderr)
        return 2
    uvloop.run(_serve(settings, ns.host, ns.port))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelgate mock-model", description=__doc__)
    configure_parser(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
