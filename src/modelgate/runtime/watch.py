"""`serve --watch`: notices when the config file is replaced or rewritten and says so once it
has settled. Polling stat() twice a second needs no dependency and sees atomic renames
(a new inode) as well as in-place writes (mtime, size).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["POLL_INTERVAL_S", "watch_file"]

POLL_INTERVAL_S = 0.5

Signature = tuple[int, int, int, int]


def _signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # mid-replace by an editor that deletes first: wait for the new file
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


async def watch_file(
    path: Path, on_change: Callable[[], None], interval_s: float = POLL_INTERVAL_S
) -> None:
    """Calls `on_change` after the file changed and then stayed the same for one interval
    (a debounce: a writer still busy writing would otherwise trigger a reload per write)."""
    seen = _signature(path)
    pending: Signature | None = None
    while True:
        await asyncio.sleep(interval_s)
        now = _signature(path)
        if now is None or now == seen:
            pending = None
            continue
        if now != pending:
            pending = now  # changed since the last poll: let it settle
            continue
        seen, pending = now, None
        on_change()
