"""A scripted upstream that records every byte it receives and parses them with h11, an
HTTP/1.1 parser independent of the gateway's llhttp: what it reads is what a real model
server behind the gateway would read. The desync, resource and fuzz suites build on it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import h11
import orjson

__all__ = [
    "RecordingUpstream",
    "SeenRequest",
    "echo_response",
    "recording_upstream",
]


@dataclass
class SeenRequest:
    """One request as the upstream parsed it."""

    connection: int
    method: str
    target: str
    headers: list[tuple[str, str]]  # lowercase names, in order
    body: bytes = b""

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


Responder = Callable[[SeenRequest], bytes]


def echo_response(request: SeenRequest) -> bytes:
    """A keep-alive JSON answer naming the request it answers, so a client can tell that
    the response is its own (request id, target, body length)."""
    body = orjson.dumps(
        {
            "request_id": request.header("x-request-id"),
            "target": request.target,
            "body_bytes": len(request.body),
            "connection": request.connection,
        }
    )
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


@dataclass
class RecordingUpstream:
    """Answers each request with `respond(request)` (raw bytes, so a test can misbehave).

    `answer_before_body`: answer as soon as the head is in, before reading the body (many
    servers do), then read and discard the body before the next request, as h11 requires.
    `errors` holds what h11 refused: bytes a strict server would not accept as HTTP."""

    respond: Responder = echo_response
    answer_before_body: bool = False
    requests: list[SeenRequest] = field(default_factory=list)
    raw: dict[int, bytearray] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    port: int = 0
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def connections(self) -> int:
        return len(self.raw)

    def targets(self) -> list[str]:
        return [r.target for r in self.requests]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cid = next(self._ids)
        raw = self.raw.setdefault(cid, bytearray())
        parser = h11.Connection(h11.SERVER)
        current: SeenRequest | None = None
        try:
            while True:
                try:
                    event = parser.next_event()
                except h11.RemoteProtocolError as exc:
                    self.errors.append(f"connection {cid}: {exc}")
                    return
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    raw += data
                    parser.receive_data(data)  # b"" at EOF tells h11 the peer closed
                    continue
                if isinstance(event, h11.Request):
                    current = SeenRequest(
                        cid,
                        event.method.decode("latin-1"),
                        event.target.decode("latin-1"),
                        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
                    )
                    self.requests.append(current)
                    if self.answer_before_body:
                        writer.write(self.respond(current))
                        await writer.drain()
                elif isinstance(event, h11.Data):
                    assert current is not None
                    current.body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    assert current is not None
                    if not self.answer_before_body:
                        writer.write(self.respond(current))
                        await writer.drain()
                    current = None
                    # The response was written raw, so h11 is told nothing of it: a new
                    # parser takes over the bytes that followed this request.
                    leftover, closed = parser.trailing_data
                    parser = h11.Connection(h11.SERVER)
                    if leftover:
                        parser.receive_data(bytes(leftover))
                    if closed:
                        parser.receive_data(b"")  # (an empty read is h11's end of input)
                else:  # ConnectionClosed
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def recording_upstream(
    respond: Responder = echo_response, *, answer_before_body: bool = False
) -> AsyncIterator[RecordingUpstream]:
    upstream = RecordingUpstream(respond, answer_before_body)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    try:
        yield upstream
    finally:
        server.close()
        await server.wait_closed()
