"""HTTP/1.1 wire details shared by both sides of the proxy: hop-by-hop rules, Host syntax,
status lines, and the gateway's own JSON error responses.

Header names arrive from httptools as raw bytes; everything here works on bytes so the
request path never decodes what it only forwards.
"""

from __future__ import annotations

import re
from http import HTTPStatus

import orjson

__all__ = [
    "GATEWAY_SET_REQUEST_HEADERS",
    "GATEWAY_SET_RESPONSE_HEADERS",
    "HOP_BY_HOP",
    "connection_tokens",
    "error_body",
    "error_response",
    "is_valid_host",
    "is_valid_request_id",
    "normalize_path",
    "status_line",
]

# RFC 9110 §7.6.1 plus the de-facto ones nginx and Envoy also strip. Names are lowercase.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

_PLAIN_CONNECTION_VALUES = frozenset(
    {b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade"}
)

# Request headers the gateway sets itself: a client's copy is dropped, never passed on.
# Framing (content-length) and host are rewritten; expect is answered by the gateway.
GATEWAY_SET_REQUEST_HEADERS: frozenset[bytes] = HOP_BY_HOP | frozenset(
    {
        b"host",
        b"content-length",
        b"expect",
        b"x-request-id",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-modelgate-variant",
        b"x-modelgate-shadow",
        b"x-modelgate-feedback",
    }
)

# Response headers the gateway sets itself on the way back.
GATEWAY_SET_RESPONSE_HEADERS: frozenset[bytes] = HOP_BY_HOP | frozenset(
    {
        b"content-length",
        b"x-request-id",
        b"x-modelgate-route",
        b"x-modelgate-variant",
        b"x-modelgate-feedback",
    }
)

# RFC 3986 host (reg-name, IPv4, or bracketed IP-literal) with an optional port.
_HOST = re.compile(
    rb"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]{0,5})?$",
)
_REQUEST_ID = re.compile(rb"^[\x21-\x7e]{1,200}$")
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def connection_tokens(value: bytes) -> set[bytes]:
    """The header names a Connection value asks to drop, beyond the hop-by-hop ones that are
    dropped anyway (so the common `keep-alive` / `close` cost nothing further)."""
    if value in _PLAIN_CONNECTION_VALUES:
        return set()
    tokens = {token.strip().lower() for token in value.split(b",")}
    return tokens - HOP_BY_HOP - {b"", b"close"}


def is_valid_host(value: bytes) -> bool:
    return bool(value) and _HOST.match(value) is not None


def is_valid_request_id(value: bytes) -> bool:
    """A client's x-request-id is kept only when it is short visible ASCII (no injection)."""
    return _REQUEST_ID.match(value) is not None


def _percent(match: re.Match[bytes]) -> bytes:
    byte = int(match.group(1), 16)
    return bytes((byte,)) if byte in _UNRESERVED else b"%" + match.group(1).upper()


def normalize_path(path: bytes) -> bytes:
    """RFC 3986 §6.2.2: percent-encoded unreserved characters decoded (`%2e` is a dot), the
    other escapes uppercased, and dot segments removed (§5.2.4), as nginx and Envoy's
    normalize_path do before matching: `/public/../admin` and `/public/%2e%2e/admin` are
    `/admin`, for routing and for the upstream alike. `%2F` stays an escape, not a slash."""
    if b"%" in path:
        path = _PERCENT.sub(_percent, path)
    if b"/." not in path:
        return path
    segments = path.split(b"/")[1:]
    kept: list[bytes] = []
    for segment in segments:
        if segment == b"..":
            if kept:
                kept.pop()
        elif segment != b".":
            kept.append(segment)
    if segments[-1] in (b".", b".."):
        kept.append(b"")  # `/a/b/..` is the directory `/a/`
    return b"/" + b"/".join(kept)


_STATUS_LINES: dict[int, bytes] = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode("ascii")
    for status in HTTPStatus
}


def status_line(code: int, reason: bytes = b"") -> bytes:
    """`HTTP/1.1 200 OK\\r\\n`; the upstream's reason phrase is kept when it gave one."""
    if reason:
        return b"HTTP/1.1 %d %s\r\n" % (code, reason)
    line = _STATUS_LINES.get(code)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % code


def error_body(code: str, detail: str, request_id: str) -> bytes:
    return orjson.dumps({"error": code, "detail": detail, "request_id": request_id})


def error_response(
    status: int,
    code: str,
    detail: str,
    request_id: str,
    *,
    keep_alive: bool,
    head_only: bool = False,
    extra_headers: bytes = b"",
) -> bytes:
    """A complete response in the DESIGN.md error format, ready for transport.write."""
    body = error_body(code, detail, request_id)
    head = b"".join(
        (
            status_line(status),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-request-id: ",
            request_id.encode("ascii", "replace"),
            b"\r\n",
            extra_headers,
            b"" if keep_alive else b"connection: close\r\n",
            b"\r\n",
        )
    )
    return head if head_only else head + body
