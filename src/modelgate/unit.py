"""Where a request's unit id (the user the assignment sticks to) comes from.

Sources are tried in config order: `header:NAME`, `cookie:NAME`, `query:NAME`, `json:NAME`
(a top-level field of a JSON body, which makes the route buffer its request body).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_plus

import orjson

__all__ = ["UnitSource", "cookie_value", "json_field", "parse_unit_sources", "query_value"]

SourceKind = Literal["header", "cookie", "query", "json"]


@dataclass(frozen=True, slots=True)
class UnitSource:
    kind: SourceKind
    name: str
    key: bytes  # lowercase header name for headers, the raw name for the others


def parse_unit_sources(specs: list[str]) -> tuple[UnitSource, ...]:
    """`["header:x-user-id", "cookie:uid"]` -> sources; the config already checked the syntax."""
    sources = []
    for spec in specs:
        kind, _, name = spec.partition(":")
        assert kind in ("header", "cookie", "query", "json"), spec
        key = name.lower().encode("latin-1") if kind == "header" else name.encode("utf-8")
        sources.append(UnitSource(kind, name, key))  # type: ignore[arg-type]
    return tuple(sources)


def cookie_value(cookie_header: bytes, name: bytes) -> str | None:
    """The value of one cookie in a `Cookie:` header (RFC 6265 §5.4 syntax: `a=1; b=2`)."""
    for pair in cookie_header.split(b";"):
        key, sep, value = pair.strip().partition(b"=")
        if sep and key == name:
            value = value.strip()
            if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
                value = value[1:-1]
            return value.decode("utf-8", "replace") if value else None
    return None


def query_value(query: bytes, name: bytes) -> str | None:
    """The first value of a query parameter, percent-decoded."""
    for pair in query.split(b"&"):
        key, sep, value = pair.partition(b"=")
        if key == name or (
            (b"%" in key or b"+" in key)
            and unquote_plus(key.decode("latin-1")).encode("utf-8") == name
        ):
            text = unquote_plus(value.decode("latin-1"), encoding="utf-8", errors="replace")
            return text if text else None
    return None


def json_field(body: bytes, name: str) -> str | None:
    """A top-level scalar field of a JSON object body; None when absent or not JSON."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    value = document.get(name)
    if value is None or isinstance(value, (dict, list)):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
