"""Response-side chaos faults that reshape the byte stream to the client: slow bodies.

Truncation and model faults are simple enough to live in the exchange; a throttle needs a
clock, a buffer and its own end-of-stream, so it gets its own small object.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

__all__ = ["Throttle"]

TICK_S = 0.02
HIGH_WATER = 64 * 1024


class Throttle:
    """Writes at most `bytes_per_s` to the client; pauses the upstream when it falls behind."""

    def __init__(
        self,
        bytes_per_s: int,
        write: Callable[[bytes], None],
        pause_upstream: Callable[[bool], None],
    ) -> None:
        self.bytes_per_s = bytes_per_s
        self.write = write
        self.pause_upstream = pause_upstream
        self.buffer: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.on_drained: Callable[[], None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    def push(self, data: bytes) -> None:
        if self.closed:
            return
        self.buffer.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER and not self.paused:
            self.paused = True
            self.pause_upstream(True)
        if self.timer is None:
            self._tick()

    def finish(self, on_drained: Callable[[], None]) -> None:
        """Calls `on_drained` once everything pushed has been written."""
        self.on_drained = on_drained
        if not self.buffer:
            self._drained()

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.buffer.clear()

    def _tick(self) -> None:
        self.timer = None
        if self.closed:
            return
        budget = max(1, int(self.bytes_per_s * TICK_S))
        while budget > 0 and self.buffer:
            chunk = self.buffer.popleft()
            if len(chunk) > budget:
                self.buffer.appendleft(chunk[budget:])
                chunk = chunk[:budget]
            budget -= len(chunk)
            self.buffered -= len(chunk)
            self.write(chunk)
        if self.paused and self.buffered < HIGH_WATER // 2:
            self.paused = False
            self.pause_upstream(False)
        if self.buffer:
            self.timer = asyncio.get_running_loop().call_later(TICK_S, self._tick)
        elif self.on_drained is not None:
            self._drained()

    def _drained(self) -> None:
        callback = self.on_drained
        self.on_drained = None
        if callback is not None:
            callback()
