"""Admin API: who may talk to it at all. A web page on the operator's machine can send
requests to 127.0.0.1, and with DNS rebinding read the answers, so before the token is even
looked at every request must name the admin by a `Host` it is known by (rebinding brings the
attacker's name), must not come from another origin (`Origin`, `Sec-Fetch-Site`), is never a
CORS preflight, and sends bodies only as JSON or YAML, which a form or a no-cors fetch cannot.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from modelgate.admin.results import json_error

__all__ = ["BODY_TYPES", "REASONS", "AdminGuard", "known_hosts"]

log = logging.getLogger("modelgate.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The media types a body may have: what control.parse_document reads.
BODY_TYPES = frozenset({"application/json", "application/yaml", "application/x-yaml", "text/yaml"})
# Methods that change something, so they need a body type even when they have no body.
_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_HAS_PORT = re.compile(r"(\[[^\]]*\]|[^:\[\]]+):[0-9]+")
REASONS = (
    "unknown_host",
    "cross_origin",
    "cors_preflight",
    "unauthorized",
    "unsupported_media_type",
)


def _literal(host: str) -> str:
    """An address as a Host header writes it: IPv6 in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def known_hosts(bound: tuple[str, int], configured: str, extra: Iterable[str]) -> frozenset[str]:
    """Every `Host` value the admin listener answers to: its bound address, the name it was
    configured with, the loopback names when it listens there, and `admin_hosts` (a name
    without a port also matches with the admin's port)."""
    host, port = bound
    names = {f"{_literal(host)}:{port}", f"{_literal(configured)}:{port}"}
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and (address.is_loopback or address.is_unspecified):
        names.update(f"{name}:{port}" for name in _LOOPBACK_NAMES)
    for entry in extra:
        names.add(entry)
        if not _HAS_PORT.fullmatch(entry):
            names.add(f"{entry}:{port}")
    if port == 80:
        # Clients leave the default port out of Host (RFC 9110 §7.2): `localhost`, not `:80`.
        names.update(name.removesuffix(":80") for name in list(names) if name.endswith(":80"))
    return frozenset(n.lower() for n in names)


def _escaped(text: str) -> str:
    """One printable line: control characters and non-ASCII as Python escapes."""
    return text.encode("unicode_escape").decode("ascii")


def _is_ip_with_port(host: str, port: int) -> bool:
    """`192.0.2.7:8081` or `[2001:db8::7]:8081`: an address, which rebinding cannot bring.
    On port 80 the port may be left out (`192.0.2.7`, `[2001:db8::7]`)."""
    address, _, given = host.rpartition(":")
    if port == 80 and (host.endswith("]") or ":" not in host):
        address, given = host, "80"
    if given != str(port):
        return False
    try:
        ipaddress.ip_address(address.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


class AdminGuard:
    """The admin listener's Host, Origin and body-type rules, with a count of what each
    refused (`modelgate_admin_refused_total`, reason label)."""

    def __init__(self, hosts: frozenset[str], port: int, any_address: bool) -> None:
        self.hosts = hosts
        self.port = port
        # Bound to 0.0.0.0 or ::, the listener is known by every address of the machine:
        # any IP literal with its port passes (a name must be in admin_hosts).
        self.any_address = any_address
        self.refused: Counter[str] = Counter()

    def note(self, request: web.Request, code: str, detail: str) -> None:
        """Counts and logs a refusal (the token check's too): never silent."""
        self.refused[code] += 1
        peer = request.remote or "?"
        # The path and the detail (which may quote a Host or Origin) come from the client:
        # escaped, so that a %0a in a URL cannot write a forged line into the gateway's log.
        log.warning(
            "admin API refused %s %s from %s: %s",
            request.method,
            _escaped(request.raw_path),
            peer,
            _escaped(detail),
        )

    def _refuse(
        self, request: web.Request, status: int, code: str, detail: str
    ) -> web.StreamResponse:
        self.note(request, code, detail)
        return json_error(request, status, code, detail)

    def _host_problem(self, request: web.Request) -> str | None:
        given = request.headers.getall("Host", [])
        if len(given) != 1:
            return f"expected one Host header, got {len(given)}"
        host = given[0].strip().lower()
        if host in self.hosts or (self.any_address and _is_ip_with_port(host, self.port)):
            return None
        return (
            f"Host {given[0]!r} is not a name this admin API is known by "
            f"({', '.join(sorted(self.hosts))}); add it to admin_hosts if it is reached by it"
        )

    def _origin_problem(self, request: web.Request) -> str | None:
        site = request.headers.get("Sec-Fetch-Site", "").strip().lower()
        if site in ("cross-site", "same-site"):
            return f"Sec-Fetch-Site: {site}: the admin API answers no other site's pages"
        origins = request.headers.getall("Origin", [])
        if not origins:
            return None  # not a browser's cross-origin call: curl, our own clients
        if len(origins) == 1:
            parts = urlsplit(origins[0].strip())
            own = request.headers.get("Host", "").strip().lower()
            if (
                parts.scheme in ("http", "https")
                and parts.netloc.lower() == own
                and not (parts.path or parts.query or parts.fragment)
            ):
                return None
        return (
            f"Origin {', '.join(origins)!r} is not this admin API's own origin: the admin API "
            "answers no other site's pages (and sends no CORS headers)"
        )

    @web.middleware
    async def origin_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Outermost: a foreign Host or Origin learns nothing, not even whether a token is
        set."""
        problem = self._host_problem(request)
        if problem is not None:
            return self._refuse(request, 421, "unknown_host", problem)
        problem = self._origin_problem(request)
        if problem is not None:
            return self._refuse(request, 403, "cross_origin", problem)
        if request.method == "OPTIONS":
            detail = "OPTIONS: the admin API answers no CORS preflight and allows no other origin"
            return self._refuse(request, 403, "cors_preflight", detail)
        return await handler(request)

    @web.middleware
    async def body_type_middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        """Inside the token check: anything with a body, and every change even without one,
        must say JSON or YAML; a form post or a no-cors fetch never can."""
        routed = request.match_info.http_exception is None  # else 404/405: nothing runs
        if routed and (request.method in _CHANGING or request.body_exists):
            given = request.headers.getall("Content-Type", [])
            if len(given) != 1 or request.content_type not in BODY_TYPES:
                what = f"Content-Type {given[0]!r}" if len(given) == 1 else "no Content-Type"
                if len(given) > 1:
                    what = f"{len(given)} Content-Type headers"
                detail = (
                    f"{request.method} {request.path} with {what}: send "
                    "Content-Type: application/json (an empty body or {} when there is nothing "
                    "to send) or a YAML type (application/yaml, application/x-yaml, text/yaml)"
                )
                return self._refuse(request, 415, "unsupported_media_type", detail)
        return await handler(request)

    def collector(self, version: int) -> Collector:
        """The refusals for GET /metrics."""
        return _RefusedCollector(str(version), dict(self.refused))


class _RefusedCollector(Collector):
    def __init__(self, version: str, refused: dict[str, int]) -> None:
        self.version = version
        self.refused = refused

    def collect(self) -> Iterator[Any]:
        family = CounterMetricFamily(
            "modelgate_admin_refused",
            "Admin API requests refused before any handler ran, by reason",
            labels=["config_version", "reason"],
        )
        for reason in REASONS:
            family.add_metric([self.version, reason], self.refused.get(reason, 0))
        yield family
