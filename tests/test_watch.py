"""`--watch`: a replaced or rewritten config file is reported once it has settled, once."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from modelgate.runtime.watch import watch_file

from .support import async_test

INTERVAL = 0.02


@async_test
async def test_rename_and_in_place_writes_are_each_seen_once(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("a: 1\n")
    seen: list[str] = []
    changed = asyncio.Event()

    def on_change() -> None:
        seen.append(path.read_text())
        changed.set()

    watcher = asyncio.create_task(watch_file(path, on_change, INTERVAL))
    try:
        await asyncio.sleep(INTERVAL * 3)
        assert seen == []  # nothing changed: nothing reported
        staging = tmp_path / "new.yaml"
        staging.write_text("a: 2\n")
        os.replace(staging, path)  # atomic rename: a new inode
        await asyncio.wait_for(changed.wait(), 5)
        changed.clear()
        path.write_text("a: 333\n")  # in place: a new size and mtime
        await asyncio.wait_for(changed.wait(), 5)
        await asyncio.sleep(INTERVAL * 5)
        assert seen == ["a: 2\n", "a: 333\n"]  # each change reported once
        path.unlink()
        await asyncio.sleep(INTERVAL * 5)
        assert len(seen) == 2  # a missing file is not a change to reload
    finally:
        watcher.cancel()
