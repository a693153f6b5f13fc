"""Fault tests for the logs (issue 12, findings 9 and 10): a gateway writing exposures and a
shadow diff log to a full disk (a 64 KiB tmpfs when we may mount one, else injected ENOSPC)
serves every request, counts the failures in /metrics, leaves only whole records, and writes
again once there is room; a `modelgate serve` killed with SIGKILL leaves logs that
`modelgate analyze --logs` reads, warning about the damage instead of crashing."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelgate.difflog import read_difflog
from modelgate.exposure import EXPOSURE_DTYPE, read_exposures
from modelgate.mock.server import MockSettings, start_mock

from .support import (
    ServeProcesses,
    ab_config,
    admin_stack,
    async_test,
    free_port,
    serve_ready,
    served_config,
    wait_until,
)
from .test_recordlog import DiskFault

MOCKS = {name: MockSettings(name=name) for name in ("model-a", "model-b", "model-c")}


class FullDisk:
    """Makes log_dir's filesystem full and frees it again."""

    def __init__(self, fill: Callable[[], None], free: Callable[[], None]) -> None:
        self.fill, self.free = fill, free


@contextmanager
def tmpfs(path: Path) -> Iterator[FullDisk]:
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    filler, ballast = path / "filler", path / "ballast"
    ballast.write_bytes(b"\0" * (24 << 10))  # room kept for after the disk is freed

    def fill() -> None:
        try:
            with open(filler, "ab") as out:
                while True:
                    out.write(b"\0" * 1024)
                    out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC

    def free() -> None:
        filler.unlink(missing_ok=True)
        ballast.unlink()

    try:
        yield FullDisk(fill, free)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(params=["tmpfs", "injected"])
def full_disk(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, FullDisk]]:
    log_dir = tmp_path / "logs"
    if request.param == "tmpfs":
        with tmpfs(log_dir) as disk:
            yield log_dir, disk
        return
    fault = DiskFault(log_dir, monkeypatch)

    def arm(on: bool) -> Callable[[], None]:
        return lambda: setattr(fault, "armed", on)

    yield log_dir, FullDisk(arm(True), arm(False))


def shadowed_config(log_dir: Path) -> dict[str, Any]:
    config = ab_config(log_dir=str(log_dir))
    config["upstreams"]["model-c"] = {"url": "x"}
    config["routes"][0]["shadows"] = [{"upstream": "model-c"}]
    return config


async def traffic(session: aiohttp.ClientSession, url: str, start: int, stop: int) -> None:
    for i in range(start, stop):
        async with session.post(
            url + "/predict", json={"i": i}, headers={"x-user-id": f"u{i}"}
        ) as response:
            assert response.status == 200, await response.text()


def metrics(text: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("modelgate_log_write_errors_total", "modelgate_log_records_total"):
                key = (sample.name, sample.labels["log"], sample.labels.get("result", ""))
                out[key] = out.get(key, 0.0) + sample.value
    return out


def whole_records_only(log_dir: Path) -> None:
    for pattern, size in (("exposure-*.bin", EXPOSURE_DTYPE.itemsize), ("difflog-*.bin", 64)):
        for file in log_dir.glob(pattern):
            assert file.stat().st_size % size == 0, file


def test_a_full_disk_never_hurts_traffic_and_leaves_only_whole_records(
    full_disk: tuple[Path, FullDisk],
) -> None:
    log_dir, disk = full_disk

    @async_test
    async def run() -> tuple[int, int]:
        async with admin_stack(shadowed_config(log_dir), MOCKS) as admin:
            gateway = admin.stack.gateway
            url = admin.stack.url
            async with aiohttp.ClientSession() as session:
                await traffic(session, url, 0, 20)

                def logs() -> tuple[Any, Any]:
                    assert gateway.outcomes.exposures and gateway.shadows.writer
                    return gateway.outcomes.exposures.stats(), gateway.shadows.writer.stats()

                async def written(n: int) -> bool:
                    exposures, diffs = logs()
                    return bool(exposures["written"] >= n and diffs["written"] >= n)

                await wait_until(lambda: written(20), "the first records written")
                disk.fill()
                # Every one 200 while the disk is full; enough records to need new pages.
                await traffic(session, url, 20, 220)

                async def failed() -> bool:
                    exposures, diffs = logs()
                    return all(
                        stats["write_errors"] and stats["dropped"].get("write_error")
                        for stats in (exposures, diffs)
                    )

                await wait_until(failed, "records lost to write errors, counted by both logs")
                whole_records_only(log_dir)
                async with session.get(admin.admin_url + "/metrics") as response:
                    found = metrics(await response.text())
                for log in ("exposure", "difflog"):
                    assert found[("modelgate_log_write_errors_total", log, "")] >= 1
                    assert found[("modelgate_log_records_total", log, "dropped_write_error")] > 0
                disk.free()
                before = logs()
                await traffic(session, url, 220, 240)

                async def resumed() -> bool:
                    exposures, diffs = logs()
                    return bool(
                        exposures["written"] >= before[0]["written"] + 20
                        and diffs["written"] >= before[1]["written"] + 20
                    )

                await wait_until(resumed, "writing to resume once there is room")
            exposures, diffs = logs()
        return exposures["written"], diffs["written"]

    exposures_written, diffs_written = run()
    whole_records_only(log_dir)
    records, rows = read_exposures(log_dir)
    assert len(records) == exposures_written and exposures_written < 240
    assert {r["request_id"][-2:] for r in rows}  # names resolved for every record
    diffs, _ = read_difflog(log_dir)
    assert len(diffs) == diffs_written < 240


# --- kill -9 and analyze ----------------------------------------------------------------------


def analyze(log_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelgate", "analyze", "--logs", str(log_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_analyze_reads_the_logs_of_a_gateway_killed_mid_write(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"

    @async_test
    async def run() -> None:
        runners = [await start_mock(MOCKS[name]) for name in ("model-a", "model-b")]
        ports = {"model-a": runners[0][1], "model-b": runners[1][1]}
        try:
            with ServeProcesses(tmp_path) as processes:
                config = served_config(
                    ab_config(log_dir=str(log_dir)), ports, free_port(), free_port()
                )
                proc = await serve_ready(processes, config)
                url = f"http://{config['listen']}"
                async with aiohttp.ClientSession() as session:
                    await traffic(session, url, 0, 200)

                    async def flushed() -> bool:
                        files = list(log_dir.glob("exposure-*.bin"))
                        return sum(f.stat().st_size for f in files) >= 200 * EXPOSURE_DTYPE.itemsize

                    await wait_until(flushed, "the exposures flushed")
                    load = asyncio.gather(*(traffic(session, url, k, k + 50) for k in (1, 2)))
                    await asyncio.sleep(0.5)
                    proc.send_signal(signal.SIGKILL)  # mid-traffic, maybe mid-write
                    await asyncio.gather(load, return_exceptions=True)
                    proc.wait(10)
        finally:
            for runner, _ in runners:
                await runner.cleanup()

    run()
    (file,) = sorted(log_dir.glob("exposure-*.bin"))
    size = file.stat().st_size
    # What a kill -9 can leave: a record cut in the middle, and (with the old writer, which
    # wrote records before their sidecar) a record whose ids the sidecar does not list.
    orphan = np.zeros(1, dtype=EXPOSURE_DTYPE)
    orphan["experiment_id"], orphan["variant_id"] = 0, 7
    with open(file, "r+b") as f:
        f.truncate(size - size % EXPOSURE_DTYPE.itemsize)
        f.seek(0, os.SEEK_END)
        f.write(orphan.tobytes() + b"\x01" * 17)
    result = analyze(log_dir)
    assert result.returncode == 0, result.stderr
    assert f"{file}: ignored a torn last record (17 bytes" in result.stderr
    assert "skipped 1 records whose ids are not in the sidecar's tables" in result.stderr
    assert "ranker" in result.stdout and "control" in result.stdout
    _, rows = read_exposures(log_dir)
    assert len(rows) >= 200 and {r["variant"] for r in rows} == {"control", "candidate"}
    assert len(rows) == size // EXPOSURE_DTYPE.itemsize
