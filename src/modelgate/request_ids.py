"""New request ids: 96 random bits each, so that no id tells anything about the next one
(issue 12: a predictable id let anyone post feedback for other users' requests).

Random bytes are drawn from the OS 512 ids at a time: one `os.urandom` call per id cost
about 2.5x the old counter; the pool costs the same as the counter did. A forked worker
drops the pool it inherited, or it would hand out its parent's (and its siblings') ids.
"""

from __future__ import annotations

import os

__all__ = ["new_request_id"]

_ID_BYTES = 12  # 24 hex characters
_BATCH = 512

_pool = b""
_next = 0


def _reseed() -> None:
    global _pool, _next
    _pool = b""
    _next = 0


os.register_at_fork(after_in_child=_reseed)


def new_request_id() -> bytes:
    """24 lowercase hex characters from the OS's CSPRNG."""
    global _pool, _next
    start = _next
    if start >= len(_pool):
        _pool = os.urandom(_ID_BYTES * _BATCH).hex().encode()
        start = 0
    _next = start + 2 * _ID_BYTES
    return _pool[start:_next]
