"""The live analysis engine (issue 13): after each change a log directory goes through (a new
file, a grown open file, a torn record at its tail made whole later, a deleted file, a sidecar
rewritten with names appended), it returns exactly what a fresh AnalysisEngine.from_logs over
the same directory returns, while reading only what is new. Records come from the real
writers (ExposureLog, FeedbackLog) with traffic like production's: units that come back,
feedback by unit and by request id, a second experiment, forced exposures."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelgate.analysis.engine import AnalysisEngine
from modelgate.analysis.live import LiveEngine, RidKeys, UnitCodes, live_engine
from modelgate.analysis.system import system_units
from modelgate.core import xxh64
from modelgate.exposure import (
    EXPOSURE_DTYPE,
    FLAG_ENROLLED,
    FLAG_FORCED,
    FLAG_MEASURED,
    ExposureLog,
)
from modelgate.feedbacklog import FEEDBACK_DTYPE, FLAG_BY_REQUEST_ID, FeedbackLog

RATIOS = [("clicks", "views")]
DESIGN = {"name": "ranker", "variants": ["control", "candidate"], "weights": [1, 1]}


class Traffic:
    """Requests of units that come back (a few heavy, many light), each exposed and, for
    most, answered with feedback by unit or by request id, through the real writers; flushed
    by hand so each step of a test knows what is on disk."""

    def __init__(self, log_dir: Path, max_file_bytes: int = 48 * 150) -> None:
        self.rng = np.random.default_rng(13)
        self.exposures = ExposureLog(log_dir, max_file_bytes=max_file_bytes)
        self.feedback = FeedbackLog(log_dir, max_file_bytes=max_file_bytes)
        self.exposures.meta = {"experiments": {"ranker": DESIGN}}
        self.metrics = ["clicks", "views"]
        self.variants = ["control", "candidate"]
        self.served = 0

    def requests(self, n: int) -> None:
        units = np.minimum(self.rng.zipf(1.6, size=n), 300)  # repeat visitors, heavy tail
        for count, unit in enumerate(units.tolist()):
            if count and count % 100 == 0:
                self.flush()  # a second's batch: the writers rotate files between batches
            self.served += 1
            unit_hash = xxh64(f"user-{unit}".encode())
            request_id = self.rng.bytes(16)
            if self.rng.random() < 0.02:  # a client that reuses its request id
                request_id = b"fixed-request-id"
            experiment = "ranker" if self.rng.random() < 0.9 else "other"
            variant = self.variants[unit_hash % len(self.variants)]
            if self.rng.random() < 0.02:
                variant = self.variants[(unit_hash + 1) % len(self.variants)]  # a ramp moved it
            forced = self.rng.random() < 0.03
            flags = (FLAG_FORCED if forced else FLAG_ENROLLED) | FLAG_MEASURED
            status = 503 if self.rng.random() < 0.02 else 200
            if self.rng.random() < 0.02:
                flags, status = flags & ~FLAG_MEASURED, 0  # the client left before the answer
            latency = int(self.rng.lognormal(7, 0.5))
            ts = time.time_ns()
            self.exposures.add(
                request_id, unit_hash, experiment, variant, flags, status, latency, ts
            )
            for metric in self.metrics:
                roll = self.rng.random()
                if roll < 0.3:  # by unit
                    value = float(self.rng.random() < 0.4) if metric == "clicks" else roll * 7
                    self.feedback.add(
                        unit_hash, value, b"", experiment, variant, metric, FLAG_ENROLLED
                    )
                elif roll < 0.5:  # by request id
                    value = float(self.rng.integers(0, 2)) if metric == "clicks" else roll * 3
                    self.feedback.add(
                        unit_hash,
                        value,
                        request_id,
                        experiment,
                        variant,
                        metric,
                        FLAG_ENROLLED | FLAG_BY_REQUEST_ID,
                    )
        if self.rng.random() < 0.5:  # feedback of a unit never exposed
            self.feedback.add(12345, 1.0, b"", "ranker", "control", "clicks", FLAG_ENROLLED)
        self.flush()

    def flush(self) -> None:
        self.exposures._flush()
        self.feedback._flush()

    def rotate(self) -> None:
        """The writers' next records go to new files (as when a file reaches its limit)."""
        self.exposures._close_file()
        self.feedback._close_file()
        self.exposures._size = self.feedback._size = 1 << 40

    def close(self) -> None:
        self.exposures._close_file()
        self.feedback._close_file()


def _fresh(log_dir: Path) -> AnalysisEngine:
    return AnalysisEngine.from_logs(log_dir, threads=1)


def _assert_close(got: Any, want: Any, where: str = "") -> None:
    """Equal, counts exactly, sums and moments to 1e-12: the live engine sums each chunk's
    values first (its partial aggregates), so the last bits of a sum may differ."""
    if dataclasses.is_dataclass(got) and not isinstance(got, type):
        assert type(got) is type(want), where
        for item in dataclasses.fields(got):
            name = item.name
            _assert_close(getattr(got, name), getattr(want, name), f"{where}.{name}")
    elif isinstance(got, dict):
        assert got.keys() == want.keys(), where
        for key in got:
            _assert_close(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(got, np.ndarray):
        assert np.array_equal(np.sort(got), np.sort(want)), where
    elif isinstance(got, float):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12), where
    else:
        assert got == want, where


def _assert_same(live: LiveEngine, log_dir: Path) -> None:
    """The live engine's answers equal a fresh engine's over the same directory."""
    fresh = _fresh(log_dir)
    try:
        with live.snapshot() as (engine, _):
            assert engine.experiments() == fresh.experiments()
            assert engine.designs == fresh.designs
            for name in fresh.experiments():
                units = engine.query(name, RATIOS)
                _assert_close(units, fresh.query(name, RATIOS), name)
                assert engine.binary_metrics(name) == fresh.binary_metrics(name)
                _assert_close(  # the gateway's own metrics read the raw exposures
                    system_units(engine, name, units.variants),
                    system_units(fresh, name, units.variants),
                    name,
                )
    finally:
        fresh.close()


@pytest.fixture
def traffic(tmp_path: Path) -> Any:
    found = Traffic(tmp_path)
    yield found
    found.close()


def test_every_change_of_the_directory_gives_what_a_fresh_engine_gives(
    tmp_path: Path, traffic: Traffic
) -> None:
    live = LiveEngine(tmp_path)
    traffic.requests(900)  # several files of each kind, the last one open
    first = live.refresh()
    assert first.read == first.files >= 6 and first.records > 0
    _assert_same(live, tmp_path)
    assert live.refresh().read == 0  # nothing new: nothing read

    # The open files grow; a new metric and a new variant append names to their sidecars.
    open_files = {p.name: p.stat().st_size for p in tmp_path.glob("*.bin")}
    traffic.metrics.append("revenue")
    traffic.variants.append("challenger")
    traffic.requests(40)
    grown = [p for p in tmp_path.glob("*.bin") if p.name in open_files]
    assert any(p.stat().st_size > open_files[p.name] for p in grown)
    sidecars = [json.loads(p.with_suffix(".json").read_text()) for p in grown]
    assert any("revenue" in s.get("metrics", []) for s in sidecars)
    step = live.refresh()
    assert 0 < step.read <= 4 and step.records < first.records / 5
    _assert_same(live, tmp_path)

    # New files.
    traffic.rotate()
    traffic.requests(60)
    assert live.refresh().read >= 2
    _assert_same(live, tmp_path)

    # Retention deletes the oldest files of each kind.
    for prefix in ("exposure", "feedback"):
        oldest = sorted(tmp_path.glob(f"{prefix}-*.bin"))[0]
        oldest.unlink()
        oldest.with_suffix(".json").unlink()
    gone = live.refresh()
    assert gone.dropped == 2 and gone.read == 0
    _assert_same(live, tmp_path)

    # Only a sidecar rewritten (a new design in its meta): the designs follow it.
    newest = sorted(tmp_path.glob("exposure-*.json"))[-1]
    document = json.loads(newest.read_text())
    design = dict(DESIGN, variants=["control", "candidate", "challenger"], weights=[1, 1, 1])
    document["meta"] = {"experiments": {"ranker": design}}
    newest.write_text(json.dumps(document))
    assert live.refresh().read == 0
    _assert_same(live, tmp_path)
    with live.snapshot() as (engine, _):
        assert engine.designs["ranker"]["variants"] == design["variants"]


def test_a_torn_record_is_picked_up_once_whole(tmp_path: Path, traffic: Traffic) -> None:
    live = LiveEngine(tmp_path)
    traffic.requests(200)
    traffic.close()  # no writer holds the files: the bytes below are the only writes
    _assert_same(live, tmp_path)
    for prefix, dtype in (("exposure", EXPOSURE_DTYPE), ("feedback", FEEDBACK_DTYPE)):
        last = sorted(tmp_path.glob(f"{prefix}-*.bin"))[-1]
        records = np.fromfile(last, dtype=dtype)
        extra = records[-1:].copy()  # one more record like the file's last one
        extra["ts_ns"] += 1
        extra["unit_hash"] = xxh64(b"user-late")  # a unit that was not there before
        if prefix == "feedback":
            extra["flags"] = FLAG_ENROLLED
        raw = extra.tobytes()
        with open(last, "ab") as out:
            out.write(raw[:19])  # the writer is still writing it
        _assert_same(live, tmp_path)  # the fresh engine ignores it too (with a warning)
        with open(last, "ab") as out:
            out.write(raw[19:])
        before = live.last
        step = live.refresh()
        assert step.records == 1 and before is not None and step.read == 1
        _assert_same(live, tmp_path)


def test_a_file_cut_back_or_replaced_is_read_again(tmp_path: Path, traffic: Traffic) -> None:
    live = LiveEngine(tmp_path)
    traffic.requests(200)
    traffic.close()
    live.refresh()
    last = sorted(tmp_path.glob("exposure-*.bin"))[-1]
    data = last.read_bytes()
    with open(last, "r+b") as out:  # a failed write is cut back to whole records
        out.truncate(len(data) - 2 * EXPOSURE_DTYPE.itemsize)
    _assert_same(live, tmp_path)
    first = sorted(tmp_path.glob("feedback-*.bin"))[0]
    copy = first.with_name("copy.tmp")
    shutil.copyfile(first, copy)  # replaced by a file of the same name (another inode)
    copy.replace(first)
    step = live.refresh()
    assert step.read == 1
    _assert_same(live, tmp_path)


def test_since_bounds_exposures_and_feedback(tmp_path: Path, traffic: Traffic) -> None:
    """A canary's query (records since it started) equals a fresh engine's over a copy of the
    directory that holds only those records."""
    live = LiveEngine(tmp_path)
    traffic.requests(300)
    since = time.time_ns()
    traffic.requests(150)
    step = time.time_ns()
    traffic.requests(150)
    traffic.close()
    whole = _fresh(tmp_path)
    try:  # a canary's own metrics: since it began, and since its current step began
        with live.bounded(since).snapshot() as (engine, _):
            for name in ("ranker", "other"):
                _assert_close(
                    system_units(engine, name, ["control", "candidate"], since, step),
                    system_units(whole, name, ["control", "candidate"], since, step),
                    name,
                )
        with live.snapshot() as (engine, _), pytest.raises(ValueError, match="bounds in time"):
            system_units(engine, "ranker", ["control", "candidate"], since, step)
    finally:
        whole.close()
    cut = tmp_path.parent / (tmp_path.name + "-since")
    cut.mkdir()
    for prefix, dtype in (("exposure", EXPOSURE_DTYPE), ("feedback", FEEDBACK_DTYPE)):
        for file in tmp_path.glob(f"{prefix}-*.bin"):
            records = np.fromfile(file, dtype=dtype)
            records[records["ts_ns"] >= since].tofile(cut / file.name)
            shutil.copyfile(file.with_suffix(".json"), cut / file.with_suffix(".json").name)
    fresh = _fresh(cut)
    try:
        for name in ("ranker", "other"):
            want = fresh.query(name, RATIOS)
            _assert_close(live.query(name, RATIOS, since_ns=since), want, name)
            _assert_close(fresh.query(name, RATIOS, since_ns=since), want, name)  # raw rows
            assert want.units != live.query(name, RATIOS).units  # the bound did something
        # A file last written long before the bound is skipped unread.
        first = sorted(tmp_path.glob("exposure-*.bin"))[0]
        os.utime(first, ns=(since - 10**10, since - 10**10))
        bounded = LiveEngine(tmp_path, since_ns=since)
        done = bounded.refresh()
        assert done.read == len(list(tmp_path.glob("*.bin"))) - 1
        with bounded.snapshot(refresh=False) as (engine, _):
            _assert_close(engine.query("ranker", RATIOS), fresh.query("ranker", RATIOS))
    finally:
        fresh.close()


def test_callers_that_wait_share_one_refresh(
    tmp_path: Path, traffic: Traffic, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = LiveEngine(tmp_path)
    traffic.requests(100)
    calls = []
    real = live._refresh
    gate = threading.Event()

    def slow() -> Any:
        calls.append(1)
        gate.wait(5)
        return real()

    monkeypatch.setattr(live, "_refresh", slow)
    threads = [threading.Thread(target=live.refresh) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    gate.set()
    for thread in threads:
        thread.join(10)
    # The first caller's refresh, then one begun after the others called, which they share.
    assert len(calls) == 2


def test_one_engine_per_directory_and_results_from_it(tmp_path: Path, traffic: Traffic) -> None:
    from modelgate.admin.results import _from_logs

    traffic.requests(200)
    design = {
        "name": "ranker",
        "variants": ["control", "candidate"],
        "weights": [1, 1],
        "control": "control",
        "analysis": {},
    }
    first = _from_logs(str(tmp_path), [design])
    assert live_engine(tmp_path) is live_engine(str(tmp_path) + "/.")
    assert live_engine(tmp_path).last is not None
    again = _from_logs(str(tmp_path), [design])
    last = live_engine(tmp_path).last
    assert last is not None and last.read == 0  # the second call read nothing
    assert {k: v for k, v in first[0].items() if k != "as_of"} == {
        k: v for k, v in again[0].items() if k != "as_of"
    }


def test_request_ids_resolve_whichever_record_comes_first(tmp_path: Path, traffic: Traffic) -> None:
    """The live engine resolves feedback by request id as records come: feedback flushed
    before its exposure (the writers flush apart), the exposure later; a later exposure of
    the same id to another unit makes it ambiguous; a deleted exposure file takes its
    claims away. After each step it answers what a fresh engine answers."""
    live = LiveEngine(tmp_path)
    traffic.requests(300)
    live.refresh()
    early, late = b"feedback-first-1", b"feedback-first-2"
    unit_a, unit_b = xxh64(b"user-early-a"), xxh64(b"user-early-b")
    by_request = FLAG_ENROLLED | FLAG_BY_REQUEST_ID
    for rid in (early, late):
        traffic.feedback.add(unit_a, 5.0, rid, "ranker", "control", "views", by_request)
    traffic.flush()
    live.refresh()
    _assert_same(live, tmp_path)
    orphans = live.query("ranker").excluded["views"][1]

    traffic.rotate()
    measured = FLAG_ENROLLED | FLAG_MEASURED
    traffic.exposures.add(early, unit_a, "ranker", "control", measured, 200, 900, time.time_ns())
    traffic.flush()
    live.refresh()
    _assert_same(live, tmp_path)
    assert live.query("ranker").excluded["views"][1] == orphans - 1  # now attributed

    before = live.query("ranker").ambiguous.get("views", 0)
    traffic.exposures.add(early, unit_b, "ranker", "candidate", measured, 200, 900, time.time_ns())
    traffic.flush()
    live.refresh()
    _assert_same(live, tmp_path)
    assert live.query("ranker").ambiguous.get("views", 0) == before + 1

    traffic.rotate()
    (held,) = [p for p in tmp_path.glob("exposure-*.bin") if early in p.read_bytes()]
    held.unlink()  # retention deletes the file of those two exposures
    held.with_suffix(".json").unlink()
    assert live.refresh().dropped == 1
    _assert_same(live, tmp_path)
    assert live.query("ranker").excluded["views"][1] == orphans


def test_request_id_keys_are_one_per_tail_and_secret_per_engine() -> None:
    """The live engine's 8-byte keys of 16-byte id tails: the same tail gives the same key,
    a million distinct tails give a million keys, and another engine's secret gives other
    keys (no client can make two tails collide on purpose)."""
    rng = np.random.default_rng(5)
    hi = rng.integers(-(2**63), 2**63 - 1, 1_000_000, dtype=np.int64)
    lo = rng.integers(-(2**63), 2**63 - 1, 1_000_000, dtype=np.int64)
    lo[:1000] = 0  # tails that differ in one half only
    hi[1000:2000] = hi[0]
    keys = RidKeys()
    first = keys.key(hi, lo)
    assert np.array_equal(first, keys.key(hi.copy(), lo.copy()))
    assert np.unique(first).size == hi.size
    assert not np.array_equal(first, RidKeys().key(hi, lo))
    swapped = keys.key(lo, hi)  # the halves are not interchangeable
    assert np.count_nonzero(swapped == first) == 0


def test_unit_codes_keep_a_units_code_and_number_new_ones_after_the_known() -> None:
    codes = UnitCodes()
    assert codes.code(np.array([30, 10, 30, 20], dtype=np.int64)).tolist() == [2, 0, 2, 1]
    assert codes.code(np.array([20, 40, -5, 10], dtype=np.int64)).tolist() == [1, 4, 3, 0]
    assert len(codes) == 5
