"""New request ids: a random prefix per process, then 64 random bits per request, so that no
id tells anything about the next one (issue 12: ids were the prefix and a counter, and one
response told the ids of everyone else's requests). The prefix still tells which process
answered, as operators and tests use it.

Random bytes are drawn from the OS 512 ids at a time: one `os.urandom` call per id cost
about 2.5x the old counter; the pool costs about the same as the counter did. A forked
worker draws a new prefix and drops the pool it inherited, or it would hand out its
parent's (and its siblings') ids.
"""

from __future__ import annotations

import os

__all__ = ["new_request_id"]

_RANDOM_BYTES = 8  # 16 hex characters after the prefix
_BATCH = 512

_prefix = os.urandom(6).hex().encode() + b"-"
_pool = b""
_next = 0


def _reseed() -> None:
    global _prefix, _pool, _next
    _prefix = os.urandom(6).hex().encode() + b"-"
    _pool = b""
    _next = 0


os.register_at_fork(after_in_child=_reseed)


def new_request_id() -> bytes:
    """`<12 hex: this process>-<16 hex: random>`, from the OS's CSPRNG."""
    global _pool, _next
    start = _next
    if start >= len(_pool):
        _pool = os.urandom(_RANDOM_BYTES * _BATCH).hex().encode()
        start = 0
    _next = start + 2 * _RANDOM_BYTES
    return _prefix + _pool[start:_next]
