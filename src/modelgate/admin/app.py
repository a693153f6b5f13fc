"""The admin API: an aiohttp app on its own listener (never the proxy's) over the control
plane: /status, /config, /reload, /experiments/{name}/weights, /metrics, /healthz, /readyz.
Only requests with a known Host and no foreign Origin get in (admin.guard); a bearer token
(admin_token, its variable, or admin_token_file) guards every call when one is set, and off
loopback one is required; bodies and changes must say JSON or YAML.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from modelgate.admin.chaos import add_chaos_routes
from modelgate.admin.guard import AdminGuard, known_hosts
from modelgate.admin.release import add_release_api, canary_collector
from modelgate.admin.results import add_result_routes
from modelgate.admin.token import TOKEN_ENV, TokenFileError, load_or_create_token
from modelgate.config import GatewayConfig
from modelgate.control import ControlPlane, ReloadError
from modelgate.http11 import is_valid_request_id
from modelgate.server import StartupError, bind_socket
from modelgate.telemetry.prometheus import MetricsSnapshot, render_metrics

__all__ = [
    "ADMIN_TOKEN_ENV",
    "bind_admin",
    "build_admin_app",
    "check_admin_exposure",
    "resolve_admin_token",
    "start_admin",
]

log = logging.getLogger("modelgate.admin")

ADMIN_TOKEN_ENV = TOKEN_ENV
MAX_BODY_BYTES = 16 * 1024 * 1024
ADMIN_SHUTDOWN_S = 5.0  # at exit, admin calls still running get this long (the drain is over)

# Why a reload was refused -> (HTTP status, error code).
_REFUSALS = {
    "unparseable": (400, "unparseable_config"),
    "invalid": (422, "invalid_config"),
    "restart_required": (422, "restart_required"),
    "unknown_experiment": (404, "unknown_experiment"),
    "no_config_file": (409, "no_config_file"),
    "apply_failed": (500, "apply_failed"),
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CONTROL: web.AppKey[ControlPlane] = web.AppKey("control", ControlPlane)
GUARD: web.AppKey[AdminGuard] = web.AppKey("guard", AdminGuard)


def resolve_admin_token(config: GatewayConfig, token_file: str | None = None) -> str | None:
    """MODELGATE_ADMIN_TOKEN, else the config's admin_token, else the token in `token_file`
    (serve --admin-token-file) or the config's admin_token_file, generated there if the file
    does not exist yet; else none."""
    path = token_file or config.admin_token_file
    from_env = os.environ.get(ADMIN_TOKEN_ENV)
    if path is not None and from_env:
        raise StartupError(
            f"both {ADMIN_TOKEN_ENV} and an admin token file ({path}) are set: the clients "
            "reading the file would hold the wrong token; use one of them"
        )
    if path is None:
        return from_env or config.admin_token
    try:
        token, created = load_or_create_token(path)
    except TokenFileError as exc:
        raise StartupError(str(exc)) from exc
    log.info("admin API token %s %s", "generated into" if created else "read from", path)
    return token


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_admin_exposure(config: GatewayConfig, token: str | None) -> None:
    """Refuses to start an admin API reachable from other hosts without a token."""
    host, _ = config.admin_address
    if token is None and not _is_loopback(host):
        raise StartupError(
            f"admin: {config.admin} is not a loopback address, so the admin API needs a "
            f"bearer token: set admin_token in the config or {ADMIN_TOKEN_ENV}"
        )


def bind_admin(config: GatewayConfig) -> socket.socket:
    host, port = config.admin_address
    try:
        return bind_socket(host, port, reuse_port=False)
    except StartupError as exc:
        raise StartupError(f"admin API: {exc}") from exc


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body, option=orjson.OPT_INDENT_2),
        content_type="application/json",
        headers=headers,
    )


def _request_id(request: web.Request) -> str:
    given = request.headers.get("x-request-id", "")
    if given and is_valid_request_id(given.encode("latin-1", "replace")):
        return given
    return uuid.uuid4().hex


def _error(request: web.Request, status: int, code: str, detail: str, **extra: Any) -> web.Response:
    """The gateway's error format (DESIGN.md), with `errors` when there are several."""
    body = {"error": code, "detail": detail, "request_id": _request_id(request), **extra}
    headers = {"WWW-Authenticate": 'Bearer realm="modelgate-admin"'} if status == 401 else None
    return _json(status, body, headers)


def _refusal(request: web.Request, control: ControlPlane, exc: ReloadError) -> web.Response:
    status, code = _REFUSALS.get(exc.kind, (422, exc.kind))
    count = len(exc.errors)
    problems = "1 problem" if count == 1 else f"{count} problems"
    first = exc.errors[0] if exc.errors else exc.kind
    detail = f"{problems}: {first}; nothing was applied, still serving version {control.version}"
    return _error(request, status, code, detail, errors=exc.errors, version=control.version)


def _auth_middleware(token: str | None, guard: AdminGuard) -> Any:
    expected = f"Bearer {token}".encode() if token is not None else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None:
            given = request.headers.get("Authorization", "").encode("latin-1", "replace")
            # compare_digest: the time taken says nothing about how much of the token matched.
            if not hmac.compare_digest(given, expected):
                reason = "missing" if not given else "wrong"
                detail = f"{reason} bearer token (Authorization: Bearer ...)"
                guard.note(request, "unauthorized", detail)
                return _error(request, 401, "unauthorized", detail)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = (exc.reason or "error").lower().replace(" ", "_")
            return _error(
                request, exc.status, code, f"{request.method} {request.path}: {exc.reason}"
            )

    return middleware


async def _status(request: web.Request) -> web.Response:
    return _json(200, await request.app[CONTROL].status())


async def _config(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    headers = {
        "x-modelgate-config-version": str(control.version),
        "x-modelgate-config-digest": control.plan.digest,
    }
    return _json(200, control.running_config(), headers)


async def _reload(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    body = await request.read()
    try:
        if body.strip():
            result = await control.reload_from_body(body, request.content_type, "POST /reload")
        else:
            result = await control.reload_from_file("POST /reload")
    except ReloadError as exc:
        return _refusal(request, control, exc)
    return _json(200, result.to_json())


async def _weights(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    try:
        result = await control.set_weights_from_body(
            request.match_info["name"], await request.read()
        )
    except ReloadError as exc:
        return _refusal(request, control, exc)
    return _json(200, result.to_json())


async def _metrics(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    counts = await control.counts()
    workers = await control.target.workers()
    snap = MetricsSnapshot(
        version=control.version,
        digest=control.plan.digest,
        counts=counts,
        reloads={label: dict(c) for label, c in control.reloads.export().items()},
        last_reload_ok=control.last_attempt_ok,
        last_success_time=control.last_success_time,
        started_at=control.started_at,
        workers=workers,
        telemetry=await control.target.telemetry(),
    )
    extra = [await canary_collector(request.app), request.app[GUARD].collector(control.version)]
    body, content_type = render_metrics(snap, request.headers.get("Accept", ""), extra)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    return _json(200, {"status": "alive", "pid": os.getpid()})


async def _readyz(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    if control.ready():
        return _json(200, {"status": "ready", "version": control.version})
    why = "draining" if control.draining else "not every worker is serving"
    return _error(request, 503, "not_ready", why, version=control.version)


def build_admin_app(control: ControlPlane, token: str | None, guard: AdminGuard) -> web.Application:
    """Middlewares outermost first: Host and Origin (a foreign page learns nothing, not even
    whether there is a token), the token, then the body type."""
    middlewares = [
        guard.origin_middleware,
        _auth_middleware(token, guard),
        guard.body_type_middleware,
    ]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[CONTROL] = control
    app[GUARD] = guard
    app.router.add_get("/status", _status)
    app.router.add_get("/config", _config)
    app.router.add_post("/reload", _reload)
    app.router.add_put("/experiments/{name}/weights", _weights)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    add_result_routes(app, control)  # GET /experiments, /experiments/{name}
    add_chaos_routes(app, control)  # GET /chaos, POST /chaos/{route}/{rule}/enable|disable
    add_release_api(app, control)  # /canaries..., POST /experiments/{name}/switch|kill|unkill
    return app


async def start_admin(
    control: ControlPlane, sock: socket.socket, token: str | None
) -> web.AppRunner:
    """Serves the admin API on an already bound socket; the caller cleans the runner up."""
    host, port = sock.getsockname()[:2]
    config = control.config
    hosts = known_hosts((host, port), config.admin_address[0], config.admin_hosts)
    any_address = host in ("0.0.0.0", "::")
    runner = web.AppRunner(
        build_admin_app(control, token, AdminGuard(hosts, port, any_address)),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=ADMIN_SHUTDOWN_S,
    )
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    control.admin_address = (host, port)
    log.info("admin API on http://%s:%d%s", host, port, " (bearer token required)" if token else "")
    return runner
