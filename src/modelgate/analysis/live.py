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

What it holds, per exposure: experiment, variant, unit, a key of its request id tail, flags
and latency_us (21 bytes; the key resolves feedback by request id, the latency gives the
quantiles per arm); a bounded engine also its ts_ns and status (31 bytes: a canary counts
what came since its step began). Per feedback record by request id: experiment, metric,
key, value and how it resolved, its unit and state (25 bytes). The rest as partial
aggregates per chunk read: per experiment, unit and variant the enrolled exposures, the
first one's ts_ns, and the measured ones' errors and latency summed (48 bytes); per
experiment, metric and unit of the feedback by unit its sum, count and whether all were 0/1
(25 bytes). Units are held as codes (UnitCodes), request id tails as keyed 8-byte hashes
(RidKeys). The query (experiment_query with `partial`) groups on those. For the benchmark's
10 million exposures and 10 million feedback records that is about 380 MiB; DuckDB's
working memory comes on top while a query runs.

Feedback by request id is resolved as records come, not per query: each refresh resolves the
id tails that its new records touch (new feedback, or new exposures of ids asked before),
from every exposure, and keeps the outcome beside each value. A bound in time (a canary's
start) is applied when reading, in an engine of its own (`bounded`).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from modelgate.analysis.engine import AnalysisEngine, ExperimentUnits
from modelgate.analysis.load import NameIds, file_columns
from modelgate.analysis.sql import REQUEST_UNITS
from modelgate.analysis.system import ERROR, MEASURED
from modelgate.exposure import EXPOSURE_DTYPE, EXPOSURE_NAMES, FLAG_ENROLLED
from modelgate.feedbacklog import FEEDBACK_DTYPE, FEEDBACK_NAMES, FLAG_BY_REQUEST_ID
from modelgate.recordfiles import LEGACY_LAYOUTS, read_record_range

__all__ = ["LiveEngine", "Refresh", "RidKeys", "UnitCodes", "close_live_engines", "live_engine"]

log = logging.getLogger("modelgate.analysis")

# What is kept of each chunk (one read of a file), as Arrow tables of these schemas. Name
# columns hold ids (uint16) into the engine's names, id halves int64; `unit_hash` columns
# hold the unit's code in this engine (UnitCodes: 4 bytes where the hash takes 8, and the
# latency quantiles' clusters without a hash table per query).
_SCHEMAS = {
    "exposures": pa.schema(  # every exposure: the (unit, variant) claiming its request id,
        [  # and its answer (modelgate.analysis.system's latency quantiles per unit)
            ("experiment", pa.uint16()),
            ("variant", pa.uint16()),
            ("unit_hash", pa.uint32()),
            ("rid_key", pa.int64()),  # the request id tail's key (RidKeys)
            ("flags", pa.uint8()),
            ("latency_us", pa.uint32()),
        ]
    ),
    "exposure_units": pa.schema(  # per (experiment, unit, variant), the enrolled exposures
        [
            ("experiment", pa.uint16()),
            ("unit_hash", pa.uint32()),
            ("variant", pa.uint16()),
            ("ts_ns", pa.int64()),  # the first exposure's
            ("exposures", pa.int64()),
            ("measured", pa.int64()),  # and of those measured: errors, latency (1 us) summed
            ("errors", pa.int64()),
            ("latency_us", pa.int64()),
        ]
    ),
    "feedback_units": pa.schema(  # per (experiment, metric, unit), feedback by unit
        [
            ("experiment", pa.uint16()),
            ("metric", pa.uint16()),
            ("unit_hash", pa.uint32()),
            ("value", pa.float64()),  # the sum
            ("n", pa.int64()),
            ("zero_one", pa.bool_()),  # every value 0 or 1
        ]
    ),
    "feedback_by_request": pa.schema(
        [
            ("experiment", pa.uint16()),
            ("metric", pa.uint16()),
            ("rid_key", pa.int64()),
            ("value", pa.float64()),
        ]
    ),
}
# A time-bounded engine (a canary's) also keeps each exposure's time and status: the canary
# counts what came since its current step began (modelgate.analysis.system).
_TIMED_EXPOSURES = pa.schema(
    [*_SCHEMAS["exposures"], pa.field("ts_ns", pa.int64()), pa.field("status", pa.uint16())]
)
_EXPOSURE_READ = [c for c in _TIMED_EXPOSURES.names if c != "rid_key"] + ["rid_hi", "rid_lo"]
_BY_REQUEST_READ = ("experiment", "metric", "rid_hi", "rid_lo", "value")
_BY_UNIT_READ = ("experiment", "metric", "unit_hash", "value")
_UNITS_SQL = f"""SELECT experiment, unit_hash, variant, min(ts_ns) AS ts_ns,
  count(*)::BIGINT AS exposures, count(*) FILTER (WHERE {MEASURED})::BIGINT AS measured,
  count(*) FILTER (WHERE {MEASURED} AND {ERROR})::BIGINT AS errors,
  coalesce(sum(latency_us) FILTER (WHERE {MEASURED}), 0)::BIGINT AS latency_us
FROM chunk WHERE (flags & {FLAG_ENROLLED}) <> 0 GROUP BY experiment, unit_hash, variant"""
# The resolved request ids (analysis.sql.REQUEST_UNITS) of every experiment for the id tails
# in `touched`, from every exposure that carries one.
_RESOLVE_SQL = REQUEST_UNITS.format(
    group="experiment, ",
    ids="experiment, rid_key",
    claims="(SELECT experiment, unit_hash, variant, rid_key, flags FROM exposures)",
    asked="rid_key IN (SELECT key FROM touched)",
)
# Each value by request id that needs resolving (`need`: its place and row) with its tail's
# outcome, where REQUEST_UNITS finds one; for one share of the tails (their keys' low bits).
_ATTRIBUTE_SQL = f"""SELECT n.place, n.row, f.unit_hash, f.ambiguous
FROM need AS n JOIN ({_RESOLVE_SQL}) AS f
  ON f.experiment = n.experiment AND f.rid_key = n.rid_key
WHERE (n.rid_key & $shares) = $share"""
_RESOLVE_SHARE = 1 << 19  # tails resolved at a time
_VALUES_SQL = """SELECT experiment, metric, unit_hash, sum(value) AS value, count(*)::BIGINT AS n,
  bool_and(value = 0 OR value = 1) AS zero_one
FROM chunk GROUP BY experiment, metric, unit_hash"""
_BOUNDED_KEPT = 32  # time-bounded engines kept (one per running canary with feedback checks)
_MTIME_SLACK_NS = 2 * 10**9


@dataclass
class _Segment:
    """One record file: its identity when last read, and what was kept of it so far, per
    table one Arrow table per read (the first read, then each new tail)."""

    key: tuple[int, int]  # st_dev, st_ino
    size: int
    mtime_ns: int
    sidecar: tuple[int, int, int] | None  # its sidecar's st_ino, st_size, st_mtime_ns
    end: int = 0  # whole records read: the next read starts here
    designs: dict[str, dict[str, Any]] = field(default_factory=dict)
    chunks: dict[str, list[pa.Table]] = field(default_factory=dict)
    attributions: list[_Attribution] = field(default_factory=list)  # per feedback_by_request
    experiments: set[int] = field(default_factory=set)  # ids its exposures name


@dataclass(frozen=True)
class _Attribution:
    """The outcome of resolving each value of a feedback_by_request chunk: `state` 0 no
    enrolled exposure claims its id (yet), 1 the unit `unit` (its code) does, 2 ambiguous
    (analysis.sql._ATTRIBUTED_PARTIAL). Replaced, never changed: snapshots read them."""

    unit: npt.NDArray[np.uint32]
    state: npt.NDArray[np.uint8]

    @classmethod
    def unresolved(cls, rows: int) -> _Attribution:
        return cls(np.zeros(rows, np.uint32), np.zeros(rows, np.uint8))


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


def _keys(table: pa.Table) -> npt.NDArray[np.int64]:
    """The request id tail keys (RidKeys) of a table's rows."""
    return np.asarray(table.column("rid_key").to_numpy(), dtype=np.int64)


class RidKeys:
    """One 8-byte key per 16-byte request id tail, where the raw query groups on both halves:
    the halves mixed with a secret drawn per engine (splitmix64's finalizer over each half in
    turn), so that the live engine keeps half the bytes per exposure. Two tails share a key
    with probability about n^2 / 2^65 (3 in 10^6 over 10^7 exposures); the values asked by
    either are then dropped as ambiguous when their units differ (never given to the other
    unit), and no client can aim for that, as none sees the secret."""

    _M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)

    def __init__(self) -> None:
        self._secret = np.frombuffer(os.urandom(16), dtype=np.uint64)

    def _mix(self, z: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        z = (z ^ (z >> np.uint64(30))) * self._M1
        z = (z ^ (z >> np.uint64(27))) * self._M2
        return np.asarray(z ^ (z >> np.uint64(31)), dtype=np.uint64)

    def key(self, hi: npt.NDArray[np.int64], lo: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        first = self._mix(hi.view(np.uint64) ^ self._secret[0])
        mixed = self._mix(first ^ lo.view(np.uint64) ^ self._secret[1])
        return mixed.view(np.int64)


def _members(keys: npt.NDArray[np.int64], known: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Which keys are in the sorted `known`: a binary search for a few keys (each refresh's
    new ones), a hash set for many (the first refresh's)."""
    if not keys.size or not known.size:
        return np.zeros(keys.size, bool)
    if keys.size * 8 < known.size:
        at = np.minimum(np.searchsorted(known, keys), known.size - 1)
        return np.asarray(known[at] == keys)
    found = pc.is_in(pa.array(keys), value_set=pa.array(known))
    return np.asarray(found.to_numpy(zero_copy_only=False), dtype=bool)


class UnitCodes:
    """A code 0, 1, 2, ... per unit hash, kept for the engine's life (a unit that retention
    dropped keeps its code); the new units of a chunk are numbered after the known ones, in
    the order of their hashes. Sorted hashes beside their codes, looked up by a binary
    search of each chunk's distinct units."""

    def __init__(self) -> None:
        self._hashes = np.zeros(0, np.int64)
        self._codes = np.zeros(0, np.uint32)

    def __len__(self) -> int:
        return int(self._hashes.size)

    def code(self, hashes: npt.NDArray[np.int64]) -> npt.NDArray[np.uint32]:
        """The codes of `hashes`, new units given the next ones."""
        distinct, back = np.unique(hashes, return_inverse=True)
        at = np.searchsorted(self._hashes, distinct)
        found = at < self._hashes.size
        found[found] = self._hashes[at[found]] == distinct[found]
        codes = np.empty(distinct.size, np.uint32)
        codes[found] = self._codes[at[found]]
        new = ~found
        codes[new] = np.arange(len(self), len(self) + int(new.sum()), dtype=np.uint32)
        if new.any():
            self._hashes = np.insert(self._hashes, at[new], distinct[new])
            self._codes = np.insert(self._codes, at[new], codes[new])
        return np.asarray(codes[back.reshape(-1)], dtype=np.uint32)


def _trim() -> None:
    """Hands the freed heap back to the system (glibc keeps what the files' reads freed,
    ~100 MB after a full load of 20 million records); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
        since_ns: int | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.threads = threads
        self.memory_limit = memory_limit
        self.since_ns = since_ns  # records with an earlier ts_ns are dropped when read
        self._bounded: OrderedDict[int, LiveEngine] = OrderedDict()
        self._scratch: duckdb.DuckDBPyConnection | None = None  # aggregates each chunk
        self._segments: dict[str, dict[str, _Segment]] = {"exposure": {}, "feedback": {}}
        self._names: dict[str, NameIds] = {}  # sidecar table -> global ids
        self._lock = threading.Lock()
        self._started = 0  # refreshes begun
        self._done = 0  # the number of the last refresh finished
        self._tables: dict[str, pa.Table] = {}
        self._designs: dict[str, dict[str, Any]] = {}
        self.last: Refresh | None = None
        # Request ids resolved to units: the id tails (xor of the halves) that feedback asks
        # for, sorted; the REQUEST_UNITS rows of those tails; what one refresh read anew.
        self._asked = np.zeros(0, np.int64)
        self._new: dict[str, list[pa.Table]] = {}
        self._reset = True  # exposures were dropped or read again: resolve every id again
        self._units = UnitCodes()
        self._rids = RidKeys()
        timed = since_ns is not None
        self._schemas = dict(
            _SCHEMAS, exposures=_TIMED_EXPOSURES if timed else _SCHEMAS["exposures"]
        )

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
        self._new = {"exposures": [], "feedback_by_request": []}
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
            gone = len(known.keys() - current.keys())
            dropped += gone
            self._reset = self._reset or (prefix == "exposure" and gone > 0)
            self._segments[prefix] = current
            files += sum(1 for s in current.values() if s.chunks)
        self._tables = self._assemble()
        self._resolve()
        self._tables["feedback_by_request"] = self._attributed()
        self._new = {}
        if self._scratch is not None:  # its buffers go back (DuckDB keeps them for reuse)
            self._scratch.close()
            self._scratch = None
        if read:
            _trim()
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
            if segment is not None and segment.chunks.get("exposures"):  # replaced or cut
                self._reset = True
            segment = _Segment(key, st.st_size, st.st_mtime_ns, side)  # new, replaced, cut
        if self.since_ns is not None and st.st_mtime_ns < self.since_ns - _MTIME_SLACK_NS:
            # Written before the bound: every record's ts_ns is older than its last write
            # (file times come from a coarse clock that may lag time.time_ns() by a tick).
            segment.size, segment.mtime_ns, segment.sidecar = st.st_size, st.st_mtime_ns, side
            return segment, None
        got = read_record_range(path, dtype, names, LEGACY_LAYOUTS.get(prefix, ()), segment.end)
        segment.size, segment.mtime_ns, segment.sidecar = st.st_size, st.st_mtime_ns, side
        if got is None:
            return segment, 0  # no sidecar yet, or unreadable: tried again when it changes
        data, sidecar, segment.end = got.data, got.sidecar, got.end
        read = len(data)
        if self.since_ns is not None:
            data = data[data["ts_ns"].view(np.int64) >= self.since_ns]
        if prefix == "exposure":
            segment.designs = _designs(sidecar)
            columns = file_columns(data, sidecar, names, _EXPOSURE_READ, self._names)
            del data
            columns["unit_hash"] = self._units.code(columns["unit_hash"])
            columns["rid_key"] = self._rids.key(columns.pop("rid_hi"), columns.pop("rid_lo"))
            segment.experiments.update(np.unique(columns["experiment"]).tolist())
            self._keep(segment, "exposures", columns)
            self._keep(segment, "exposure_units", self._aggregate(columns, _UNITS_SQL))
        else:
            asked = (data["flags"] & FLAG_BY_REQUEST_ID) != 0
            by_request = file_columns(data[asked], sidecar, names, _BY_REQUEST_READ, self._names)
            by_request["rid_key"] = self._rids.key(
                by_request.pop("rid_hi"), by_request.pop("rid_lo")
            )
            self._keep(segment, "feedback_by_request", by_request)
            by_unit = file_columns(data[~asked], sidecar, names, _BY_UNIT_READ, self._names)
            del data
            values = self._aggregate(by_unit, _VALUES_SQL)  # fewer rows to give codes to
            codes = self._units.code(values.column("unit_hash").to_numpy())
            at = values.schema.get_field_index("unit_hash")
            self._keep(
                segment, "feedback_units", values.set_column(at, "unit_hash", pa.array(codes))
            )
        return segment, read

    def _connection(self) -> duckdb.DuckDBPyConnection:
        """This engine's scratch connection, for the work of a refresh."""
        if self._scratch is None:
            self._scratch = duckdb.connect(
                ":memory:", config={"threads": 1, "preserve_insertion_order": False}
            )
        return self._scratch

    def _aggregate(self, columns: dict[str, np.ndarray], sql: str) -> pa.Table:
        """A chunk's partial aggregates (DuckDB, on this engine's scratch connection)."""
        scratch = self._connection()
        chunk = pa.table({name: pa.array(array) for name, array in columns.items()})
        scratch.register("chunk", chunk)
        try:
            return scratch.sql(sql).to_arrow_table()
        finally:
            scratch.unregister("chunk")

    def _keep(
        self, segment: _Segment, table: str, columns: dict[str, np.ndarray] | pa.Table
    ) -> None:
        schema = self._schemas[table]
        if isinstance(columns, pa.Table):
            found = columns.select(schema.names).cast(schema)
        else:
            found = pa.table([pa.array(columns[n]) for n in schema.names], schema=schema)
        if found.num_rows:
            segment.chunks.setdefault(table, []).append(found)
            if table == "feedback_by_request":
                segment.attributions.append(_Attribution.unresolved(found.num_rows))
            if table in self._new:
                self._new[table].append(found)

    def _resolve(self) -> None:
        """Resolves the values by request id that this refresh makes resolvable anew: the
        id tails of new feedback, and those of new exposures that feedback asked for before
        (a tail's exposures may come before or after its feedback, and a later exposure can
        make it ambiguous), from every exposure (REQUEST_UNITS, as the raw query groups
        them); every value with such a tail gets the outcome (_Attribution). After
        exposures were dropped or read again, every value is resolved again."""
        new = self._new["feedback_by_request"]
        if self._reset:
            chunks = [
                _keys(c)
                for s in self._segments["feedback"].values()
                for c in s.chunks.get("feedback_by_request", [])
            ]
            self._asked = np.unique(np.concatenate(chunks)) if chunks else np.zeros(0, np.int64)
            touched = self._asked
        else:
            asked_new = [_keys(t) for t in new]
            asked = np.unique(np.concatenate(asked_new)) if asked_new else np.zeros(0, np.int64)
            fresh = asked[~_members(asked, self._asked)]
            if fresh.size:
                self._asked = np.sort(np.concatenate([self._asked, fresh]), kind="stable")
            exposed = [_keys(t) for t in self._new["exposures"]]
            again = np.concatenate(exposed) if exposed else np.zeros(0, np.int64)
            touched = np.union1d(asked, again[_members(again, self._asked)])
        if not touched.size:
            self._reset = False
            return
        fresh_ids = {id(t) for t in new}
        needs, places = [], []
        for segment in self._segments["feedback"].values():
            for at, chunk in enumerate(segment.chunks.get("feedback_by_request", [])):
                ids = chunk.select(["experiment", "rid_key"])
                if self._reset or id(chunk) in fresh_ids:
                    rows = np.arange(chunk.num_rows, dtype=np.uint32)  # every value, in place
                else:
                    rows = np.flatnonzero(_members(_keys(chunk), touched)).astype(np.uint32)
                    ids = ids.take(rows)
                if rows.size:
                    places.append((segment, at))
                    place = np.full(rows.size, len(places) - 1, np.uint32)
                    needs.append(
                        ids.append_column("place", pa.array(place)).append_column(
                            "row", pa.array(rows)
                        )
                    )
        self._reset = False
        if not needs:
            return
        matched = self._match(touched, pa.concat_tables(needs))
        order = np.argsort(matched["place"], kind="stable")
        bounds = np.searchsorted(matched["place"][order], np.arange(len(places) + 1))
        for number, ((segment, at), need) in enumerate(zip(places, needs, strict=True)):
            old = segment.attributions[at]
            unit, state = old.unit.copy(), old.state.copy()  # a snapshot may read the old
            state[need.column("row").to_numpy()] = 0
            mine = order[bounds[number] : bounds[number + 1]]
            rows = matched["row"][mine]
            unit[rows] = matched["unit_hash"][mine]
            state[rows] = np.where(matched["ambiguous"][mine] == 0, 1, 2)
            segment.attributions[at] = _Attribution(unit, state)

    def _assemble(self) -> dict[str, pa.Table]:
        """The tables over every segment's chunks but feedback_by_request, in file name
        order (no copy: the tables share the chunks' buffers)."""
        out = {}
        for table, schema in self._schemas.items():
            if table == "feedback_by_request":
                continue  # with its resolution beside it once resolved: _attributed()
            prefix = "exposure" if table.startswith("exposure") else "feedback"
            chunks = [c for s in self._segments[prefix].values() for c in s.chunks.get(table, [])]
            out[table] = pa.concat_tables(chunks) if chunks else schema.empty_table()
        return out

    def _match(self, touched: npt.NDArray[np.int64], need: pa.Table) -> dict[str, Any]:
        """The outcome of each needing value's tail (place, row, unit_hash, ambiguous), where
        REQUEST_UNITS finds one. Many tails (the first refresh's) are resolved a share at a
        time, split on their keys' low bits: each share's hash tables are a fraction of the
        whole's (the first load of 10^7 records peaked 330 MB higher in one go)."""
        shares = 1
        while touched.size > shares * _RESOLVE_SHARE:
            shares *= 2
        scratch = self._connection()
        scratch.register("exposures", self._tables["exposures"])
        scratch.register("need", need)
        found: dict[str, list[npt.NDArray[Any]]] = {}
        try:
            for share in range(shares):
                mine = touched[(touched & (shares - 1)) == share] if shares > 1 else touched
                scratch.register("touched", pa.table({"key": mine}))
                part = scratch.execute(_ATTRIBUTE_SQL, {"shares": shares - 1, "share": share})
                for name, column in part.fetchnumpy().items():
                    found.setdefault(name, []).append(np.asarray(column))
                scratch.unregister("touched")
        finally:
            scratch.unregister("exposures")
            scratch.unregister("need")
        return {name: np.concatenate(parts) for name, parts in found.items()}

    def _attributed(self) -> pa.Table:
        """feedback_by_request with each value's resolution beside it (no copy of the
        chunks: the columns are appended to them)."""
        chunks = [
            chunk.append_column("unit_hash", pa.array(done.unit)).append_column(
                "state", pa.array(done.state)
            )
            for segment in self._segments["feedback"].values()
            for chunk, done in zip(
                segment.chunks.get("feedback_by_request", []), segment.attributions, strict=True
            )
        ]
        if chunks:
            return pa.concat_tables(chunks)
        return pa.schema(
            [*_SCHEMAS["feedback_by_request"], ("unit_hash", pa.uint32()), ("state", pa.uint8())]
        ).empty_table()

    # --- querying -------------------------------------------------------------------------

    def _engine(self) -> AnalysisEngine:
        names = {table.removesuffix("s"): list(ids.names) for table, ids in self._names.items()}
        files = sum(1 for p in self._segments.values() for s in p.values() if s.chunks)
        bound = "" if self.since_ns is None else f" since ts_ns {self.since_ns}"
        return AnalysisEngine.from_partials(
            dict(self._tables),
            names,
            dict(self._designs),
            f"{files} record files in {self.log_dir}{bound}",
            self.threads,
            self.memory_limit,
            timed=self.since_ns is not None,
            exposed=[
                names["experiment"][i]
                for i in sorted(
                    set().union(*(s.experiments for s in self._segments["exposure"].values()))
                )
            ],
        )

    def bounded(self, since_ns: int) -> LiveEngine:
        """The engine of this directory's records with ts_ns >= since_ns (a canary's, since
        it started): its own LiveEngine, which drops older records when it reads them and
        skips files last written before since_ns, so it holds only that window. The last
        few asked for are kept."""
        with self._lock:
            engine = self._bounded.pop(since_ns, None)
            if engine is None:
                engine = LiveEngine(self.log_dir, self.threads, self.memory_limit, since_ns)
            self._bounded[since_ns] = engine
            while len(self._bounded) > _BOUNDED_KEPT:
                self._bounded.popitem(last=False)[1].close()
            return engine

    @contextmanager
    def snapshot(self, refresh: bool = True) -> Iterator[tuple[AnalysisEngine, Refresh]]:
        """An AnalysisEngine over the records as of a refresh (its own DuckDB connection
        over the same Arrow buffers: later refreshes do not change what it sees), and that
        refresh. Closed on exit. Its queries take no `since_ns`: use bounded()."""
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
        bounds it to the records with ts_ns >= since_ns (a canary's, since it started),
        through bounded(since_ns)."""
        live = self if since_ns is None or since_ns == self.since_ns else self.bounded(since_ns)
        with live.snapshot() as (engine, _):
            return engine.query(experiment, ratios)

    def close(self) -> None:
        with self._lock:
            self._segments = {"exposure": {}, "feedback": {}}
            self._tables = {}
            self._asked = np.zeros(0, np.int64)
            bounded, self._bounded = list(self._bounded.values()), OrderedDict()
            if self._scratch is not None:
                self._scratch.close()
                self._scratch = None
        for engine in bounded:
            engine.close()


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
