"""The shadow diff log: a writer thread that compares pairs off the event loop and appends one
64-byte record per pair (numpy dtype DIFF_DTYPE), and the reader of those files.

Files, per writer run and rotation sequence, in `log_dir`:
  difflog-<start>-p<pid>-<seq>.bin             flat array of DIFF_DTYPE records, nothing else
  difflog-<start>-p<pid>-<seq>.json            names sidecar: ids -> names, the dtype, verdicts
  difflog-<start>-p<pid>-<seq>.payloads.jsonl  sampled full payloads; records point at lines

DIFF_DTYPE (little-endian, packed, 64 bytes; `numpy.fromfile(path, dtype=...)` reads it):
  ts_ns           <u8   time the request started, ns since the Unix epoch
  unit_hash       <u8   xxh64(utf8(unit id), seed=0); 0 when the request had no unit
  payload_offset  <u8   byte offset of its line in the .payloads.jsonl file; 2**64-1 = none
  request_id      S16   the request id's last 16 bytes (flag 0x01 when it was longer)
  primary_ms      <f4   primary latency, ms
  shadow_ms       <f4   shadow latency, ms (time waited when it timed out); NaN: no answer
  max_abs_diff    <f4   largest numeric difference compared; NaN when no numbers compared
  primary_status  <u2   HTTP status; 0 when there was no HTTP answer
  shadow_status   <u2   HTTP status; 0 when there was no HTTP answer
  n_diff          <u2   differing JSON pointers (saturates at 65535)
  route_id        <u2   index into the sidecar's "routes"
  variant_id      u1    index into "variants" ("experiment=variant"; 0 is "": no experiment)
  shadow_id       u1    index into "shadows"
  verdict         u1    0 equal, 1 within_tolerance, 2 differs, 3 not_json, 4 shadow_error,
                        5 shadow_timeout, 6 primary_error
  flags           u1    0x01 request id cut, 0x02 probability vectors compared, 0x04 an argmax
                        changed, 0x08 ranked lists compared, 0x10 a top-k membership changed
A reader ignores a trailing partial record (a killed writer loses at most its unflushed tail).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import orjson

from modelgate.config import CompareSpec
from modelgate.core import xxh64
from modelgate.diff import Answer, AnswerLike, Comparison, Verdict, compare
from modelgate.logfiles import ThrottledLog, make_log_dir, open_locked, write_all, write_atomic
from modelgate.logretention import RETAIN_EVERY_S, Retention, retain

__all__ = [
    "DIFF_DTYPE",
    "FLAG_ARGMAX_CHANGED",
    "FLAG_RANKED",
    "FLAG_REQUEST_ID_CUT",
    "FLAG_TOPK_CHANGED",
    "FLAG_VECTORS",
    "NO_PAYLOAD",
    "RECORD_SIZE",
    "VERDICT_CODES",
    "DiffJob",
    "DiffLogError",
    "DiffLogNames",
    "DiffLogWriter",
    "PairLike",
    "Segment",
    "iter_payloads",
    "read_difflog",
    "read_payload",
]

log = logging.getLogger("modelgate.difflog")

DIFF_DTYPE: Final = np.dtype(
    [
        ("ts_ns", "<u8"),
        ("unit_hash", "<u8"),
        ("payload_offset", "<u8"),
        ("request_id", "S16"),
        ("primary_ms", "<f4"),
        ("shadow_ms", "<f4"),
        ("max_abs_diff", "<f4"),
        ("primary_status", "<u2"),
        ("shadow_status", "<u2"),
        ("n_diff", "<u2"),
        ("route_id", "<u2"),
        ("variant_id", "u1"),
        ("shadow_id", "u1"),
        ("verdict", "u1"),
        ("flags", "u1"),
    ]
)
RECORD_SIZE: Final = 64
assert DIFF_DTYPE.itemsize == RECORD_SIZE
NO_PAYLOAD: Final = 2**64 - 1
VERDICT_CODES: Final = {verdict: code for code, verdict in enumerate(Verdict)}
FLAG_REQUEST_ID_CUT, FLAG_VECTORS, FLAG_ARGMAX_CHANGED, FLAG_RANKED, FLAG_TOPK_CHANGED = (
    1, 2, 4, 8, 16,
)  # fmt: skip
FORMAT: Final = "modelgate-difflog"
_DEFAULT_PAYLOAD_VERDICTS: Final = frozenset(
    {Verdict.DIFFERS, Verdict.NOT_JSON, Verdict.SHADOW_ERROR, Verdict.PRIMARY_ERROR}
)
_VALUE_CAP: Final = 1024  # bytes of JSON per difference value kept in a payload
_POLL_S: Final = 0.01  # an idle writer looks at its queue this often; submit never signals
_NAME_LIMITS: Final = {"routes": 65536, "variants": 256, "shadows": 256}  # ids per table
_write_all = write_all  # one name to patch in fault tests
_JOB_OVERHEAD: Final = 512  # bytes a queued pair holds beyond its three bodies (estimate)


def _job_bytes(job: PairLike) -> int:
    """What a queued pair holds in memory, about: its bodies and some overhead."""
    shadow = job.shadow_answer
    return (
        _JOB_OVERHEAD
        + len(job.request_body)
        + len(job.primary.body)
        + (len(shadow.body) if shadow is not None else 0)
    )


class DiffLogError(Exception):
    """A path that is missing or is not a diff log; the message names the problem."""


class PairLike(Protocol):
    """What the writer reads of a job (the gateway's ShadowPair fits it as is)."""

    @property
    def started_at(self) -> float: ...  # unix time, s
    @property
    def request_id(self) -> bytes | str: ...
    @property
    def unit(self) -> str | None: ...
    @property
    def route(self) -> str: ...
    @property
    def experiment(self) -> str: ...
    @property
    def variant(self) -> str: ...
    @property
    def shadow(self) -> str: ...  # the shadow's name
    @property
    def request_body(self) -> bytes: ...
    @property
    def primary(self) -> AnswerLike: ...
    @property
    def shadow_answer(self) -> AnswerLike | None: ...  # None: timed out
    @property
    def compare(self) -> CompareSpec: ...


@dataclass(slots=True)
class DiffJob:
    """A pair to compare and log; any object with these attributes will do (PairLike)."""

    route: str
    shadow: str
    primary: Answer
    shadow_answer: Answer | None
    compare: CompareSpec = field(default_factory=CompareSpec)
    request_id: bytes | str = b""
    unit: str | None = None
    experiment: str = ""
    variant: str = ""
    request_body: bytes = b""
    started_at: float = field(default_factory=time.time)


def _flags(result: Comparison, cut: bool) -> int:
    flags = FLAG_REQUEST_ID_CUT if cut else 0
    if result.vectors_compared:
        flags |= FLAG_VECTORS | (FLAG_ARGMAX_CHANGED if result.argmax_disagreements else 0)
    if result.ranked_compared:
        flags |= FLAG_RANKED | (FLAG_TOPK_CHANGED if result.min_topk_overlap < 1.0 else 0)
    return flags


def _capped_value(value: Any) -> Any:
    try:
        raw = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return {"$unserializable": repr(type(value))}
    if len(raw) > _VALUE_CAP:
        return {"$truncated": raw[:_VALUE_CAP].decode("utf-8", "replace")}
    return orjson.Fragment(raw)


def _body(body: bytes, cap: int) -> dict[str, Any]:
    return {
        "bytes": len(body),
        "truncated": len(body) > cap,
        "body": body[:cap].decode("utf-8", "replace"),
    }


def _answer(answer: AnswerLike | None, cap: int) -> dict[str, Any] | None:
    if answer is None:
        return None
    ct = answer.content_type
    return {
        "status": answer.status,
        "content_type": ct.decode("latin-1") if isinstance(ct, bytes) else ct,
        "latency_ms": answer.latency_s * 1000.0,
        "error": answer.error,
        **_body(answer.body, cap),
    }


def _payload_line(job: PairLike, result: Comparison, rid: bytes, cap: int) -> bytes:
    line = {
        "ts_ns": int(job.started_at * 1e9),
        "request_id": rid.decode("utf-8", "replace"),
        "route": job.route,
        "shadow": job.shadow,
        "variant": f"{job.experiment}={job.variant}" if job.experiment else "",
        "verdict": result.verdict.value,
        "detail": result.detail,
        "n_diff": result.n_diff,
        "differences": [
            {
                "pointer": d.pointer,
                "kind": d.kind.value,
                "primary": _capped_value(d.primary),
                "shadow": _capped_value(d.shadow),
            }
            for d in result.differences
        ],
        "request": _body(job.request_body, cap),
        "primary": _answer(job.primary, cap),
        "shadow_answer": _answer(job.shadow_answer, cap),
    }
    return orjson.dumps(line) + b"\n"


class _Names:
    """Append-only names tables: ids stay stable across the files of one writer run."""

    def __init__(self) -> None:
        self.tables: dict[str, list[str]] = {"routes": [], "variants": [""], "shadows": []}
        self.index: dict[str, dict[str, int]] = {"routes": {}, "variants": {"": 0}, "shadows": {}}
        self.dirty = True

    def id(self, table: str, name: str) -> int:
        ids = self.index[table]
        found = ids.get(name)
        if found is not None:
            return found
        names, limit = self.tables[table], _NAME_LIMITS[table]
        if len(names) >= limit - 1:  # full: the last id, "(other)", stands for later names
            if len(names) == limit - 1:
                names.append("(other)")
                self.dirty = True
            ids[name] = limit - 1
            return limit - 1
        names.append(name)
        ids[name] = len(names) - 1
        self.dirty = True
        return len(names) - 1


class DiffLogWriter:
    """Compares and logs pairs on its own thread. `submit` never blocks and never raises (the
    gateway calls it on the event loop); `close` waits, bounded, for the queue to drain.
    The queue is bounded by count and by the bytes its pairs hold (`queue_max_bytes`: three
    bodies each). Disk trouble is counted (`write_errors`, `dropped["write_error"]`),
    logged (throttled), retried, never raised. Files are owner-only; `retention` is applied
    each time a new file is opened.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        max_file_bytes: int = 64 << 20,
        queue_size: int = 65536,
        queue_max_bytes: int = 64 << 20,
        retention: Retention | None = None,
        flush_interval_s: float = 1.0,
        payload_sample: float = 1.0,
        payload_max_bytes: int = 16384,
        payload_verdicts: Iterable[Verdict] = _DEFAULT_PAYLOAD_VERDICTS,
        batch_size: int = 256,
        retry_interval_s: float = 1.0,
        seed: int | None = None,
    ) -> None:
        if max_file_bytes < RECORD_SIZE or min(queue_size, queue_max_bytes, batch_size) < 1:
            raise ValueError(
                "max_file_bytes >= 64, queue_size, queue_max_bytes and batch_size >= 1"
            )
        if not 0.0 <= payload_sample <= 1.0 or payload_max_bytes < 0 or flush_interval_s <= 0:
            raise ValueError("payload_sample in [0, 1], payload_max_bytes >= 0, flush > 0")
        self.log_dir = Path(log_dir)
        self.max_file_bytes = max_file_bytes
        self.queue_size = queue_size
        self.queue_max_bytes = queue_max_bytes
        self.retention = retention or Retention()
        self.flush_interval_s = flush_interval_s
        self.payload_sample = payload_sample
        self.payload_max_bytes = payload_max_bytes
        self.payload_verdicts = frozenset(payload_verdicts)
        self.batch_size = batch_size
        self.retry_interval_s = retry_interval_s
        # Producers only append and the writer only pops: a deque needs no lock. The bound is
        # checked before appending, so N producer threads may overshoot it by N - 1.
        self._queue: deque[tuple[PairLike, int]] = deque()
        # Bytes queued = _bytes_in (bumped by the producer) - _bytes_out (by the writer):
        # each counter has one writer, so neither needs a lock.
        self._bytes_in = self._bytes_out = self._jobs_in = 0
        self._warn = ThrottledLog(log)
        self._accepting = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # counters that stats() copies while the writer runs
        self._rng = random.Random(seed)
        self._names = _Names()
        self._ids: dict[tuple[str, str, str, str], tuple[int, int, int]] = {}
        now = time.time_ns()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9))
        self._run = f"{stamp}.{now // 1000 % 10**6:06d}Z-p{os.getpid()}"
        self._seq = 0
        self._base = ""
        self._bin_fd: int | None = None
        self._pay_fd: int | None = None
        self._bin_size = self._pay_size = 0
        self._retry_at = 0.0
        self._retain_at = 0.0
        self._rows: list[tuple[Any, ...]] = []
        self._payloads: list[tuple[int, bytes]] = []  # (index in _rows, JSON line)
        self._oldest = 0.0
        self.written = self.bytes_written = self.payloads_written = self.payload_bytes = 0
        self.write_errors = 0
        self.last_error = ""
        self.dropped: Counter[str] = Counter()
        self.verdicts: dict[tuple[str, str], Counter[str]] = {}

    # --- the caller's side (event loop) ---------------------------------------------------

    def start(self) -> None:
        """Starts the writer thread; no I/O here (the thread creates the directory)."""
        if self._thread is not None:
            return
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="modelgate-difflog", daemon=True)
        self._thread.start()

    def submit(self, job: PairLike) -> bool:
        """Queues a pair; False when the queue is full (counted in dropped["queue_full"]),
        would hold more than queue_max_bytes (dropped["queue_bytes"]) or the writer is not
        running (dropped["not_running"])."""
        if not self._accepting:
            self._drop("not_running")
            return False
        if len(self._queue) >= self.queue_size:
            self._drop("queue_full")
            return False
        try:
            size = _job_bytes(job)
        except Exception:  # a malformed job: the writer counts it as bad_job
            size = _JOB_OVERHEAD
        if self._bytes_in - self._bytes_out + size > self.queue_max_bytes:
            self._drop("queue_bytes")
            return False
        self._bytes_in += size
        self._jobs_in += 1
        self._queue.append((job, size))
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Stops accepting, drains the queue, flushes and closes the files; blocks up to
        `timeout` s (call it at shutdown or in an executor). False if the thread is still
        busy then: it is a daemon and goes on writing until done or the process exits."""
        self._accepting = False
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(max(timeout, 0.0))
        if self._thread.is_alive():
            with self._lock:  # accepted, neither written nor dropped yet
                done = self.written + self.dropped["write_error"] + self.dropped["bad_job"]
                lost = self._jobs_in - done
                self.dropped["stop_deadline"] += lost
            log.warning("diff log: not drained within %.1f s at stop: %d pairs lost", timeout, lost)
            return False
        return True

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "written": self.written,
                "bytes_written": self.bytes_written,
                "payloads_written": self.payloads_written,
                "payload_bytes_written": self.payload_bytes,
                "write_errors": self.write_errors,
                "last_error": self.last_error,
                "queue_depth": len(self._queue),
                "queue_bytes": self._bytes_in - self._bytes_out,
                "dropped": dict(self.dropped),
                "verdicts": {key: dict(counts) for key, counts in self.verdicts.items()},
            }

    def _drop(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.dropped[reason] += n

    # --- the writer thread ----------------------------------------------------------------

    def _loop(self) -> None:
        queue = self._queue
        while True:
            try:
                n = min(len(queue), self.batch_size)
                if n:
                    if not self._rows:
                        self._oldest = time.monotonic()
                    batch = [queue.popleft() for _ in range(n)]
                    try:
                        self._process([job for job, _ in batch])
                    finally:
                        self._bytes_out += sum(size for _, size in batch)  # now freed
                    if len(self._rows) >= 4096:  # 256 KiB of records: one write
                        self._flush()
                    time.sleep(0)  # hand the GIL to the event loop between batches
                if self._rows and time.monotonic() - self._oldest >= self.flush_interval_s:
                    self._flush()
                if time.monotonic() >= self._retain_at:
                    self._retain()
                if not n:
                    if self._stop.is_set() and not queue:  # nothing came in meanwhile
                        break
                    self._stop.wait(_POLL_S)
            except Exception as exc:  # never die: a bug here must not stop the diff log
                self._error("internal", exc)
                log.exception("diff log writer")
                time.sleep(_POLL_S)
        self._retry_at = 0.0  # one last try, whatever the backoff says
        self._flush()
        self._close_files()

    def _process(self, batch: list[PairLike]) -> None:
        rows, payloads, ids = self._rows, self._payloads, self._ids
        verdicts, sample, cap = self.payload_verdicts, self.payload_sample, self.payload_max_bytes
        append, codes = rows.append, VERDICT_CODES
        for job in batch:
            try:
                result = compare(job.primary, job.shadow_answer, job.compare)
                rid = job.request_id
                if type(rid) is not bytes:
                    rid = rid.encode("utf-8", "replace")  # type: ignore[union-attr]
                unit, primary, shadow = job.unit, job.primary, job.shadow_answer
                key = (job.route, job.shadow, job.experiment, job.variant)
                route_variant_shadow = ids.get(key) or self._register(key)
                if result.verdict in verdicts and (sample >= 1.0 or self._rng.random() < sample):
                    payloads.append((len(rows), _payload_line(job, result, rid, cap)))
                n_diff = result.n_diff
                cut = len(rid) > 16
                append(
                    (
                        int(job.started_at * 1e9),
                        xxh64(unit.encode("utf-8", "replace")) if unit else 0,
                        NO_PAYLOAD,
                        rid[-16:] if cut else rid,  # the tail: gateway ids are prefix-counter
                        primary.latency_s * 1000.0,
                        shadow.latency_s * 1000.0 if shadow is not None else np.nan,
                        result.max_abs_diff,
                        primary.status,
                        shadow.status if shadow is not None else 0,
                        n_diff if n_diff < 65535 else 65535,
                        *route_variant_shadow,
                        codes[result.verdict],
                        _flags(result, cut)
                        if cut or result.vectors_compared or result.ranked_compared
                        else 0,
                    )
                )
            except Exception as exc:  # a malformed job is dropped and counted, never raised
                self._drop("bad_job")
                self._error("bad_job", exc)

    def _register(self, key: tuple[str, str, str, str]) -> tuple[int, int, int]:
        route, shadow, experiment, variant = key
        names = self._names
        found = (
            names.id("routes", route),
            names.id("variants", f"{experiment}={variant}" if experiment else ""),
            names.id("shadows", shadow),
        )
        if len(self._ids) < 65536:  # a bound: keys are config names, but a bug must not leak
            self._ids[key] = found
        return found

    def _flush(self) -> None:
        rows, payloads = self._rows, self._payloads
        if not rows:
            return
        self._rows, self._payloads = [], []
        records = np.array(rows, dtype=DIFF_DTYPE)  # the batch encode
        self._tally(records)
        marks = [index for index, _ in payloads]
        start = 0
        while start < len(records):
            if not self._ready():
                self._drop("write_error", len(records) - start)
                return
            room = (self.max_file_bytes - self._bin_size) // RECORD_SIZE
            if room <= 0 or (self._pay_size >= self.max_file_bytes and self._bin_size):
                self._close_files()
                continue
            stop = min(len(records), start + room)
            piece = records[start:stop]
            lines = payloads[bisect.bisect_left(marks, start) : bisect.bisect_left(marks, stop)]
            start = stop
            try:
                if self._names.dirty:
                    self._write_sidecar()
                if lines:
                    self._write_payloads(piece, lines, stop - len(piece))
                _write_all(self._bin_fd, piece)  # type: ignore[arg-type]
            except OSError as exc:
                self._error("write", exc)
                self._drop("write_error", len(piece))
                self._rewind()
                continue
            with self._lock:
                self.written += len(piece)
                self.bytes_written += piece.nbytes
            self._bin_size += piece.nbytes

    def _tally(self, records: np.ndarray) -> None:
        keys = (
            records["route_id"].astype(np.int64) << 16
            | records["shadow_id"].astype(np.int64) << 8
            | records["verdict"]
        )
        found, counts = np.unique(keys, return_counts=True)
        tables, verdict_names = self._names.tables, list(Verdict)
        with self._lock:
            for key, count in zip(found.tolist(), counts.tolist(), strict=True):
                route, shadow = tables["routes"][key >> 16], tables["shadows"][(key >> 8) & 255]
                per_pair = self.verdicts.setdefault((route, shadow), Counter())
                per_pair[verdict_names[key & 255].value] += count

    def _ready(self) -> bool:
        """An open log file, or False while the directory is unusable (retried later)."""
        if self._bin_fd is not None:
            return True
        if time.monotonic() < self._retry_at:
            return False
        try:
            make_log_dir(self.log_dir)
            while True:  # O_EXCL: two writers started in the same microsecond never share
                self._seq += 1
                self._base = str(self.log_dir / f"difflog-{self._run}-{self._seq:06d}")
                try:
                    # Locked from its creation on, before any other file of the group exists:
                    # retention (of any process or host) deletes only groups it can lock.
                    self._bin_fd = open_locked(self._base + ".bin")
                    break
                except FileExistsError:
                    continue
            # The sidecar exists before the records: every record's names are readable.
            self._write_sidecar()
        except OSError as exc:
            self._error("open", exc)
            self._drop_new_file()
            self._retry_at = time.monotonic() + self.retry_interval_s
            return False
        self._bin_size = self._pay_size = 0
        self._retain()
        return True

    def _retain(self) -> None:
        self._retain_at = time.monotonic() + RETAIN_EVERY_S
        retain(self.log_dir, "difflog", self.retention, self._base)

    def _drop_new_file(self) -> None:
        """A .bin whose sidecar could not be written: never written to, so removed."""
        if self._bin_fd is None:
            return
        try:
            os.unlink(self._base + ".bin")
        except OSError:
            pass
        os.close(self._bin_fd)
        self._bin_fd = None

    def _write_sidecar(self) -> None:
        names = self._names
        meta = {
            "format": FORMAT,
            "version": 1,
            "record_size": RECORD_SIZE,
            "dtype": DIFF_DTYPE.descr,
            "verdicts": [verdict.value for verdict in Verdict],
            "payloads": Path(self._base).name + ".payloads.jsonl",
            **names.tables,
        }
        # atomic: a reader never sees half a sidecar
        write_atomic(self._base + ".json", orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        names.dirty = False

    def _write_payloads(self, piece: np.ndarray, lines: list[tuple[int, bytes]], at: int) -> None:
        """Payload lines for a piece of records; a failure costs the payloads, not records."""
        try:
            if self._pay_fd is None:
                self._pay_fd = open_locked(self._base + ".payloads.jsonl")
                self._pay_size = os.fstat(self._pay_fd).st_size
            offsets, offset = [], self._pay_size
            for _, line in lines:
                offsets.append(offset)
                offset += len(line)
            _write_all(self._pay_fd, b"".join(line for _, line in lines))
        except OSError as exc:
            self._error("payload", exc)
            if self._pay_fd is not None:
                try:
                    os.ftruncate(self._pay_fd, self._pay_size)
                except OSError:
                    os.close(self._pay_fd)
                    self._pay_fd = None
                    self._pay_size = self.max_file_bytes  # rotate before the next payload
            return
        piece["payload_offset"][[index - at for index, _ in lines]] = offsets
        with self._lock:
            self.payloads_written += len(lines)
            self.payload_bytes += offset - self._pay_size
        self._pay_size = offset

    def _rewind(self) -> None:
        """After a failed write: cut the file back to whole records, or give it up (the
        next write opens a new one), so no later record lands misaligned."""
        if self._bin_fd is None:
            return
        try:
            os.ftruncate(self._bin_fd, self._bin_size)
        except OSError:
            self._close_files()

    def _close_files(self) -> None:
        for fd in (self._bin_fd, self._pay_fd):
            if fd is not None:
                try:
                    os.fsync(fd)
                except OSError:
                    pass
                os.close(fd)
        self._bin_fd = self._pay_fd = None

    def _error(self, where: str, exc: BaseException) -> None:
        with self._lock:
            if where in ("open", "write", "payload", "sidecar"):
                self.write_errors += 1
            self.last_error = f"{where}: {exc}"
        if where != "bad_job":
            self._warn.warning(where, "diff log: %s error in %s: %s", where, self.log_dir, exc)


# --- reading ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """Rows [start, stop) of a read came from `path`; their payload offsets index `payloads`."""

    path: Path
    payloads: Path
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class DiffLogNames:
    """What the ids of a read mean (merged across the files read) and where rows came from."""

    routes: tuple[str, ...]
    variants: tuple[str, ...]
    shadows: tuple[str, ...]
    verdicts: tuple[str, ...]
    segments: tuple[Segment, ...]


def _sidecar(path: Path) -> dict[str, Any]:
    if path.suffix != ".bin":
        raise DiffLogError(f"{path}: not a diff log file (expected difflog-*.bin or its directory)")
    side = path.with_name(path.name[:-4] + ".json")
    try:
        meta = json.loads(side.read_bytes())
    except FileNotFoundError:
        raise DiffLogError(f"{path}: not a modelgate diff log (no sidecar {side.name})") from None
    except (OSError, ValueError) as exc:
        raise DiffLogError(f"{side}: unreadable diff log sidecar ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DiffLogError(f"{path}: not a modelgate diff log ({side.name} is not its sidecar)")
    if [list(f) for f in meta.get("dtype", ())] != [list(f) for f in DIFF_DTYPE.descr]:
        raise DiffLogError(f"{path}: written with another record layout than this modelgate's")
    return meta


def read_difflog(path: str | os.PathLike[str]) -> tuple[np.ndarray, DiffLogNames]:
    """A log file, or every log file of a directory in name (= time) order, as one array;
    ids are remapped to the merged names tables. Raises DiffLogError naming the problem."""
    root = Path(path)
    if root.is_dir():
        files = sorted(root.glob("difflog-*.bin"))
        if not files:
            raise DiffLogError(f"{root}: no diff log files (difflog-*.bin) in this directory")
    elif root.exists():
        files = [root]
    else:
        raise DiffLogError(f"{root}: no such file or directory")
    merged = _Names()
    arrays, segments, start = [], [], 0
    for file in files:
        try:
            meta = _sidecar(file)
        except DiffLogError as exc:
            if not root.is_dir():
                raise
            if file.stat().st_size:  # an empty one: killed before its first write
                log.warning("%s (skipped)", exc)
            continue
        # A killed writer may leave a partial record at the end: only whole ones are read.
        size = file.stat().st_size
        records = np.fromfile(file, dtype=DIFF_DTYPE, count=size // RECORD_SIZE)
        if size % RECORD_SIZE:
            log.warning(
                "%s: ignored a torn last record (%d bytes; %d whole records read)",
                file,
                size % RECORD_SIZE,
                len(records),
            )
        for table, column in (
            ("routes", "route_id"),
            ("variants", "variant_id"),
            ("shadows", "shadow_id"),
        ):
            names = [str(n) for n in meta.get(table, ())]
            ids = records[column]
            if len(ids) and int(ids.max()) >= len(names):
                log.warning("%s: ids past the sidecar's %s table read as (unknown)", file, table)
                names += ["(unknown)"] * (int(ids.max()) + 1 - len(names))
            lut = np.array([merged.id(table, n) for n in names] or [0], dtype=ids.dtype)
            records[column] = lut[ids]
        arrays.append(records)
        segments.append(
            Segment(
                file,
                file.with_name(file.name[:-4] + ".payloads.jsonl"),
                start,
                start + len(records),
            )
        )
        start += len(records)
    if not arrays:
        raise DiffLogError(f"{root}: no readable diff log files (see the warnings above)")
    tables = merged.tables
    names_out = DiffLogNames(
        tuple(tables["routes"]),
        tuple(tables["variants"]),
        tuple(tables["shadows"]),
        tuple(v.value for v in Verdict),
        tuple(segments),
    )
    return np.concatenate(arrays), names_out


def read_payload(names: DiffLogNames, row: int, offset: int) -> dict[str, Any] | None:
    """The payload of row `row` (its `payload_offset` is `offset`), or None when none kept."""
    if offset == NO_PAYLOAD:
        return None
    starts = [segment.start for segment in names.segments]
    segment = names.segments[bisect.bisect_right(starts, row) - 1]
    try:
        with open(segment.payloads, "rb") as f:
            f.seek(offset)
            payload = orjson.loads(f.readline())
    except (OSError, orjson.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def iter_payloads(names: DiffLogNames) -> Iterator[dict[str, Any]]:
    """Every whole payload line of the files read (a cut-off last line is skipped)."""
    for segment in names.segments:
        try:
            with open(segment.payloads, "rb") as f:
                for line in f:
                    try:
                        payload = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(payload, dict):
                        yield payload
        except FileNotFoundError:
            continue
