"""The feedback fuzz harness: arbitrary bodies, headers and query strings posted to the
feedback endpoint of a real Gateway (the front-door harness's in-memory transports), on two
gateways: one that declares its metrics and wants a unit secret and tokens, one that
declares nothing. What each input must satisfy, besides the front door's properties:

- the answer is 202, or a 4xx whose body is a JSON error; never a 5xx, never an exception;
- a refused post changes no aggregate; every aggregate stays finite and within the bound;
- only declared metric names (or, undeclared, at most the cap of distinct names) are kept;
- without the right secret nothing is counted by unit, and on the gateway that requires
  tokens nothing by request id without the token that request was handed.
"""

from __future__ import annotations

import atexit
import math
import re
from typing import Any

import orjson

from .front_door import CONFIG, FrontDoor, FuzzFailure

__all__ = ["SEEDS", "check_input"]

SECRET = b"fuzz-unit-secret-0123456789"
RID = b"@RID"  # replaced by the request id of a request the gateway served
TOKEN = b"@TOK"  # replaced by that request's x-modelgate-feedback token
_AUTH = (
    b"",
    b"authorization: Bearer " + SECRET + b"\r\n",
    b"authorization: Bearer wrong-secret-0123456789\r\n",
    b"authorization: Basic " + SECRET + b"\r\n",
)
_METHODS = (b"POST", b"POST", b"POST", b"GET")
GUARDED: dict[str, Any] = {
    **CONFIG,
    "feedback": {
        "metrics": {"clicked": {"min": 0, "max": 1}, "revenue": {"min": 0, "max": 10000}},
        "max_abs_value": 1e6,
        "unit_secret": SECRET.decode(),
        "require_token": True,
    },
}
OPEN: dict[str, Any] = {**CONFIG, "feedback": {"max_undeclared_metrics": 4}}

SEEDS: list[bytes] = [
    b'\x00\x00\x00{"experiment":"ranker","unit":"u1","metric":"clicked","value":1}',
    b'\x08\x00\x00{"experiment":"ranker","unit":"u1","metric":"clicked","value":1}',
    b'\x08\x00\x00[{"experiment":"ranker","unit":"u1","metric":"revenue","value":1e308}]',
    b'\x00\x00\x00{"request_id":"@RID","token":"@TOK","metric":"clicked","value":true}',
    b'\x00\x00\x00{"request_id":"@RID","metric":"clicked","value":0}',
    b'\x10\x00\x00{"experiment":"ranker","unit":"u1","metric":"clicked","value":1}',
    b'\x18\x00\x00{"experiment":"ranker","unit":"u1","metric":"clicked","value":1}',
    b'\x01\x00\x00[{"experiment":"ranker","unit":"u","metric":"a","value":-1e308},'
    b'{"experiment":"ranker","unit":"u","metric":"a","value":1e308}]',
    b'\x01x=1\x00x-extra: 1\r\n\x00{"request_id":"@RID","token":"nope","metric":"m","value":1}',
    b'\x01\x00\x00{"experiment":"ranker","unit":7,"metric":"c","value":NaN}',
    b"\x01\x00content-type: text/plain\r\n\x00[[],{},null]",
]

_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")


class FeedbackDoor:
    """One FrontDoor per gateway, with a served request whose id and token inputs name."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.door = FrontDoor(config)
        self.config = config
        # Before the front door's log directory is removed (atexit runs last in, first out).
        atexit.register(self.door.gateway.outcomes.close)
        out = self.door.run(
            [b"POST /predict HTTP/1.1\r\nhost: a\r\nx-user-id: u1\r\ncontent-length: 2\r\n\r\n{}"]
        )
        head = out.partition(b"\r\n\r\n")[0]
        self.request_id = _header(head, b"x-request-id")
        self.token = _header(head, b"x-modelgate-feedback")

    def run(self, data: bytes) -> bytes:
        flags = data[0]
        query, _, rest = data[1:].partition(b"\x00")
        extra, _, body = rest.partition(b"\x00")
        body = body.replace(RID, self.request_id).replace(TOKEN, self.token)
        auth = _AUTH[(flags >> 3) & 3]
        method = _METHODS[(flags >> 5) & 3]
        request = b"".join(
            (
                method,
                b" /_modelgate/feedback",
                b"?" + query if query else b"",
                b" HTTP/1.1\r\nhost: a\r\n",
                auth,
                extra,
                b"content-length: %d\r\n\r\n" % len(body),
                body,
            )
        )
        gateway = self.door.gateway
        # Every input sees the served request fresh: with one value per (request id, metric),
        # only the first input could otherwise reach the accepted path by request id.
        remembered = gateway.outcomes.recent.get(self.request_id)
        if remembered is not None:
            when, assignments, unit_hash, _ = remembered
            gateway.outcomes.recent[self.request_id] = (when, assignments, unit_hash, None)
        before = _totals(gateway.outcomes.outcomes)
        split = (flags >> 1) & 3
        chunks = (
            [request]
            if split == 0
            else [request[i : i + 7 * split] for i in range(0, len(request), 7 * split)]
        )
        out = self.door.run(chunks)
        self._check(out, body, auth, extra, before)
        return out

    def _check(
        self, out: bytes, body: bytes, auth: bytes, extra: bytes, before: tuple[float, int]
    ) -> None:
        statuses = [int(m) for m in _STATUS.findall(out)]
        if any(status >= 500 for status in statuses):
            raise FuzzFailure(f"a 5xx answer: {out[:300]!r}")
        outcomes = self.door.gateway.outcomes
        spec = self.door.gateway.plan.config.feedback
        for (_, _, metric), moments in outcomes.outcomes.items():
            if not (math.isfinite(moments.mean) and math.isfinite(moments.m2)):
                raise FuzzFailure(f"{metric}: a non-finite aggregate {moments.as_dict()}")
            if abs(moments.mean) > spec.max_abs_value:
                raise FuzzFailure(f"{metric}: a mean beyond max_abs_value {moments.as_dict()}")
            if spec.metrics and metric not in spec.metrics:
                raise FuzzFailure(f"an undeclared metric was kept: {metric!r}")
        if not spec.metrics and len(outcomes.metrics.undeclared) > spec.max_undeclared_metrics:
            raise FuzzFailure(f"{len(outcomes.metrics.undeclared)} undeclared names kept")
        if not statuses or not out.startswith(b"HTTP/1.1 "):
            return  # the front door refused the bytes before a feedback request began
        status = statuses[0]
        head, _, rest = out.partition(b"\r\n\r\n")
        length = _header(head, b"content-length")
        answer = rest[: int(length)] if length.isdigit() else b""
        if 400 <= status < 500:
            try:
                error = orjson.loads(answer)
            except orjson.JSONDecodeError:
                raise FuzzFailure(f"a {status} without a JSON body: {out[:300]!r}") from None
            if not isinstance(error, dict) or not isinstance(error.get("error"), str):
                raise FuzzFailure(f"a {status} without an error code: {answer!r}")
            if _totals(outcomes.outcomes) != before and len(statuses) == 1:
                raise FuzzFailure(f"a refused post ({status}) changed the aggregates")
        if status == 202:
            self._check_accepted(body, auth, extra)

    def _check_accepted(self, body: bytes, auth: bytes, extra: bytes) -> None:
        """What was accepted was allowed: by unit only with the secret; by request id only
        with the token, where tokens are required."""
        spec = self.door.gateway.plan.config.feedback
        if auth == _AUTH[1] or SECRET in extra:
            return
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return  # headers in `extra` framed another body than `body`
        for item in document if isinstance(document, list) else [document]:
            if not isinstance(item, dict):
                return
            if "request_id" not in item and spec.unit_secret is not None:
                raise FuzzFailure(f"feedback by unit accepted without the secret: {item!r}")
            if "request_id" in item and spec.require_token:
                if item.get("token") != self.token.decode():
                    raise FuzzFailure(
                        f"feedback by request id accepted without its token: {item!r}"
                    )


def _header(head: bytes, name: bytes) -> bytes:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return b""


def _totals(outcomes: dict[tuple[str, str, str], Any]) -> tuple[float, int]:
    return (
        sum(m.mean * m.count for m in outcomes.values()),
        sum(m.count for m in outcomes.values()),
    )


_doors: list[FeedbackDoor] = []


def check_input(data: bytes) -> bytes:
    """Runs one input (its first byte: bit 0 the gateway, bits 1-2 how it is cut into reads,
    3-4 the Authorization header, 5-6 the method; then query NUL headers NUL body, where @RID
    and @TOK stand for a served request's id and token); raises FuzzFailure on a broken
    property and returns what the client got."""
    if not _doors:
        _doors.extend((FeedbackDoor(GUARDED), FeedbackDoor(OPEN)))
    if not data:
        return b""
    return _doors[data[0] & 1].run(data)
