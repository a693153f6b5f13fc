"""A long-lived analysis engine per log directory (issue 13): `GET /experiments/{name}` and the
canary read the records incrementally instead of re-reading every file at every call.

A writer appends fixed-size records to one open file and never changes a closed one, so each
file's columns are kept, keyed by its identity (st_dev, st_ino) with its size and mtime:
  - an unchanged file is not read again (a closed segment is immutable);
  - a grown file (the writer's open segment) is read from its last whole record on, so only
    the new tail is read; a torn record at its end is left until it is whole;
  - a file that shrank or was replaced (other inode) is read again from the start;
  - a deleted file (retention) drops out with its columns;
  - a rewritten sidecar (names appended, new designs) is read again when the file grows or
    the sidecar's own stat changes.
A refresh is therefore a listing of the directory, a stat per file and the reading of what is
new. Names (experiments, variants, metrics) keep one id each for the engine's life.

What it holds, per record (the columns the query reads, as in AnalysisEngine.from_logs):
an exposure 43 bytes (experiment, variant, ts_ns, unit_hash, request id tail, flags, status,
latency_us), a feedback record by unit 28 bytes, by request id 36: about 0.75 GB for 10
million of each, plus DuckDB's working memory while a query runs. Files' raw records are
dropped once their columns are taken.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from modelgate.analysis_engine import ENGINE_FEEDBACK_COLUMNS, AnalysisEngine, ExperimentUnits
from modelgate.analysis_load import EXPOSURE_COLUMNS, NameIds, file_columns
from modelgate.exposure import EXPOSURE_DTYPE, EXPOSURE_NAMES
from modelgate.feedbacklog import FEEDBACK_DTYPE, FEEDBACK_NAMES, FLAG_BY_REQUEST_ID
from modelgate.recordfiles import LEGACY_LAYOUTS, read_record_range

__all__ = ["LiveEngine", "Refresh", "close_live_engines", "live_engine"]

log = logging.getLogger("modelgate.analysis")

_BY_UNIT = tuple(c for c in ENGINE_FEEDBACK_COLUMNS if not c.startswith("rid_"))
_BY_REQUEST = tuple(c for c in ENGINE_FEEDBACK_COLUMNS if c != "unit_hash")
# table -> (file prefix, columns); the feedback files fill two tables
_TABLES = {
    "exposures": ("exposure", EXPOSURE_COLUMNS),
    "feedback_by_unit": ("feedback", _BY_UNIT),
    "feedback_by_request": ("feedback", _BY_REQUEST),
}
_ID_COLUMNS = {"experiment", "variant", "metric"}


def _arrow_type(column: str, dtype: np.dtype[Any]) -> pa.DataType:
    """The Arrow type file_columns gives `column` (for a table with no chunk yet)."""
    if column in _ID_COLUMNS:
        return pa.uint16()
    if column in ("ts_ns", "unit_hash", "rid_hi", "rid_lo"):
        return pa.int64()
    return pa.from_numpy_dtype(dtype[column])


_TYPES = {
    table: {c: _arrow_type(c, EXPOSURE_DTYPE if p == "exposure" else FEEDBACK_DTYPE) for c in cs}
    for table, (p, cs) in _TABLES.items()
}


@dataclass
class _Segment:
    """One record file: its identity when last read, and the columns read from it so far
    (one Arrow array per read: the first read, then each new tail)."""

    key: tuple[int, int]  # st_dev, st_ino
    size: int
    mtime_ns: int
    sidecar: tuple[int, int, int] | None  # its sidecar's st_ino, st_size, st_mtime_ns
    end: int = 0  # whole records read: the next read starts here
    designs: dict[str, dict[str, Any]] = field(default_factory=dict)
    columns: dict[str, dict[str, list[pa.Array]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Refresh:
    """What one refresh did: `started` (time.time()) bounds which records it saw (those
    flushed before it); the rest counts files and records."""

    started: float
    files: int
    read: int  # files read (new, grown or replaced)
    dropped: int  # files gone since the last refresh
    records: int  # records read
    seconds: float


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _sidecar_key(path: Path) -> tuple[int, int, int] | None:
    st = _stat(path.with_suffix(".json"))
    return None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns)


def _designs(sidecar: Any) -> dict[str, dict[str, Any]]:
    meta = sidecar.get("meta") if isinstance(sidecar, dict) else None
    found = meta.get("experiments") if isinstance(meta, dict) else None
    return dict(found) if isinstance(found, dict) else {}


class LiveEngine:
    """The records of one log directory, kept and refreshed incrementally (see the module
    doc); `snapshot()` gives an AnalysisEngine over them as of a refresh, which the
    `/experiments` endpoint and the canary query. Thread-safe: one refresh at a time, and
    callers that arrive while one runs share the next one."""

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        threads: int | None = 1,
        memory_limit: str | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.threads = threads
        self.memory_limit = memory_limit
        self._segments: dict[str, dict[str, _Segment]] = {"exposure": {}, "feedback": {}}
        self._names: dict[str, NameIds] = {}  # sidecar table -> global ids
        self._lock = threading.Lock()
        self._started = 0  # refreshes begun
        self._done = 0  # the number of the last refresh finished
        self._tables: dict[str, pa.Table] = {}
        self._designs: dict[str, dict[str, Any]] = {}
        self.last: Refresh | None = None

    # --- reading --------------------------------------------------------------------------

    def refresh(self) -> Refresh:
        """Reads what changed since the last refresh. A caller that finds a refresh under
        way waits for it and then shares one refresh begun after its call with the others
        who waited, so every caller sees the records flushed before it called."""
        ticket = self._started
        with self._lock:
            if self._done > ticket and self.last is not None:
                return self.last  # begun after this call, by another caller
            self._started += 1
            number = self._started
            self.last = self._refresh()
            self._done = number
            return self.last

    def _refresh(self) -> Refresh:
        started, clock = time.time(), time.perf_counter()
        if not self.log_dir.is_dir():
            raise FileNotFoundError(f"{self.log_dir}: not a directory")
        read = records = dropped = files = 0
        for prefix, dtype, names in (
            ("exposure", EXPOSURE_DTYPE, EXPOSURE_NAMES),
            ("feedback", FEEDBACK_DTYPE, FEEDBACK_NAMES),
        ):
            known = self._segments[prefix]
            listed = sorted(self.log_dir.glob(f"{prefix}-*.bin"))
            current: dict[str, _Segment] = {}
            for path in listed:
                st = _stat(path)
                if st is None:
                    continue  # deleted since the listing
                segment = known.get(path.name)
                got = self._update(path, st, segment, prefix, dtype, names)
                if got is None:
                    continue
                current[path.name], new = got
                if new is not None:
                    read += 1
                    records += new
            dropped += len(known.keys() - current.keys())
            self._segments[prefix] = current
            files += sum(1 for s in current.values() if s.columns)
        self._tables = self._assemble()
        self._designs = {}
        for segment in self._segments["exposure"].values():  # name order: the newest wins
            self._designs.update(segment.designs)
        seconds = time.perf_counter() - clock
        return Refresh(started, files, read, dropped, records, seconds)

    def _update(
        self,
        path: Path,
        st: os.stat_result,
        segment: _Segment | None,
        prefix: str,
        dtype: np.dtype[Any],
        names: dict[str, str],
    ) -> tuple[_Segment, int | None] | None:
        """The file's segment after this refresh, and how many records were read (None:
        not read, unchanged)."""
        key, side = (st.st_dev, st.st_ino), _sidecar_key(path)
        unchanged = (
            segment is not None
            and segment.key == key
            and segment.size == st.st_size
            and segment.mtime_ns == st.st_mtime_ns
        )
        if segment is not None and unchanged:
            if side != segment.sidecar:  # only the sidecar was rewritten: new designs
                segment.sidecar = side
                if prefix == "exposure":
                    try:
                        document = json.loads(path.with_suffix(".json").read_bytes())
                        segment.designs = _designs(document)
                    except (OSError, ValueError):
                        pass  # being replaced; the next refresh reads it
            return segment, None
        if segment is None or segment.key != key or st.st_size < segment.size:
            segment = _Segment(key, st.st_size, st.st_mtime_ns, side)  # new, replaced, cut
        got = read_record_range(path, dtype, names, LEGACY_LAYOUTS.get(prefix, ()), segment.end)
        segment.size, segment.mtime_ns, segment.sidecar = st.st_size, st.st_mtime_ns, side
        if got is None:
            return segment, 0  # no sidecar yet, or unreadable: tried again when it changes
        data, sidecar, segment.end = got.data, got.sidecar, got.end
        if prefix == "exposure":
            segment.designs = _designs(sidecar)
            parts = {"exposures": data}
        else:
            asked = (data["flags"] & FLAG_BY_REQUEST_ID) != 0
            parts = {"feedback_by_unit": data[~asked], "feedback_by_request": data[asked]}
        for table, records in parts.items():
            wanted = _TABLES[table][1]
            columns = file_columns(records, sidecar, names, wanted, self._names)
            held = segment.columns.setdefault(table, {c: [] for c in wanted})
            for column, array in columns.items():
                if len(array):
                    held[column].append(pa.array(array))
        return segment, len(data)

    def _assemble(self) -> dict[str, pa.Table]:
        """The tables over every segment's arrays, in file name order as from_logs reads
        them (no copy: chunked arrays share the segments' buffers)."""
        out = {}
        for table, (prefix, columns) in _TABLES.items():
            segments = self._segments[prefix].values()
            arrays = [
                pa.chunked_array(
                    [a for s in segments for a in s.columns.get(table, {}).get(column, [])],
                    type=_TYPES[table][column],
                )
                for column in columns
            ]
            out[table] = pa.table(arrays, names=list(columns))
        return out

    # --- querying -------------------------------------------------------------------------

    def _engine(self) -> AnalysisEngine:
        names = {table.removesuffix("s"): list(ids.names) for table, ids in self._names.items()}
        files = sum(1 for p in self._segments.values() for s in p.values() if s.columns)
        return AnalysisEngine.from_tables(
            self._tables["exposures"],
            self._tables["feedback_by_unit"],
            self._tables["feedback_by_request"],
            names,
            dict(self._designs),
            f"{files} record files in {self.log_dir}",
            self.threads,
            self.memory_limit,
        )

    @contextmanager
    def snapshot(self, refresh: bool = True) -> Iterator[tuple[AnalysisEngine, Refresh]]:
        """An AnalysisEngine over the records as of a refresh (its own DuckDB connection
        over the same Arrow buffers: later refreshes do not change what it sees), and that
        refresh. Closed on exit."""
        done = self.refresh() if refresh else self.last
        with self._lock:
            engine, last = self._engine(), done or self.last
        if last is None:
            raise RuntimeError("snapshot(refresh=False) before any refresh")
        try:
            yield engine, last
        finally:
            engine.close()

    def query(
        self,
        experiment: str,
        ratios: Sequence[tuple[str, str]] = (),
        since_ns: int | None = None,
    ) -> ExperimentUnits:
        """Refresh, then the experiment's per-unit query (AnalysisEngine.query); `since_ns`
        bounds it to the records with ts_ns >= since_ns (a canary's, since it started)."""
        with self.snapshot() as (engine, _):
            return engine.query(experiment, ratios, since_ns)

    def close(self) -> None:
        with self._lock:
            self._segments = {"exposure": {}, "feedback": {}}
            self._tables = {}


_ENGINES: dict[str, LiveEngine] = {}
_ENGINES_LOCK = threading.Lock()


def live_engine(log_dir: str | os.PathLike[str], threads: int | None = 1) -> LiveEngine:
    """The process's LiveEngine for `log_dir` (one per directory, created on first use):
    the results endpoint and the canary share its columns and its refreshes."""
    key = os.path.realpath(log_dir)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = LiveEngine(key, threads=threads)
        return engine


def close_live_engines() -> None:
    """Drops every LiveEngine (their memory); a later call builds them again."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for engine in engines:
        engine.close()
