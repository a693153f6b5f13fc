"""The record files of a log directory as Arrow tables for the SQL engine, and their roll-up
into Parquet partitioned by experiment and date (issue 13).

Files are read by modelgate.recordfiles, so damaged ones are skipped with the same warnings
as everywhere else. Each file becomes one chunk of each column: only the fields the query
needs are copied out of the records (the file's array is then dropped, so the peak is the
columns plus one file), and the names tables of every file merge into one dictionary per
column, so experiment, variant and metric stay 2-byte ids (Arrow dictionary arrays; the
engine hands DuckDB the ids themselves, without a copy, and maps names back after the query).
Unit hashes and the request id's 16-byte tail are handed over as int64 (the same bits), which
every warehouse can store.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from modelgate.exposure import EXPOSURE_DTYPE, EXPOSURE_NAMES
from modelgate.feedbacklog import FEEDBACK_DTYPE, FEEDBACK_NAMES, FLAG_BY_REQUEST_ID
from modelgate.recordfiles import iter_record_files

__all__ = ["EXPOSURE_COLUMNS", "FEEDBACK_COLUMNS", "RecordTables", "load_tables", "write_parquet"]

# Plain columns (numeric fields, int64 where the record holds uint64 hashes); `rid_hi` and
# `rid_lo` are the two halves of the request id's tail, `date` (UTC) only in Parquet.
_KEYS = ("experiment", "variant", "ts_ns", "unit_hash", "rid_hi", "rid_lo")
EXPOSURE_COLUMNS = (*_KEYS, "flags", "status", "latency_us")
FEEDBACK_COLUMNS = (*_KEYS[:2], "metric", *_KEYS[2:], "value", "flags")
_AS_INT64 = {"ts_ns", "unit_hash"}


@dataclass
class RecordTables:
    """The exposures and feedback of a directory, and the experiments' designs found in the
    sidecars (the newest file's design of each experiment wins)."""

    exposures: pa.Table
    feedback: pa.Table
    designs: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: int = 0
    names: dict[str, list[str]] = field(default_factory=dict)  # column -> names by id
    feedback_by_request: pa.Table | None = None  # with split_feedback

    def as_ids(self) -> tuple[pa.Table, pa.Table, pa.Table | None, dict[str, list[str]]]:
        """The tables with their name columns as the dictionaries' uint16 ids (no copy),
        and each column's names by id: a query groups and compares 2-byte ids much
        faster than strings, and the ids mean the same in both tables."""

        def ids(table: pa.Table) -> pa.Table:
            columns = {
                name: pa.chunked_array(
                    [chunk.indices for chunk in column.chunks], type=column.type.index_type
                )
                if pa.types.is_dictionary(column.type)
                else column
                for name, column in zip(table.column_names, table.columns, strict=True)
            }
            return pa.table(columns)

        asked = self.feedback_by_request
        return (
            ids(self.exposures),
            ids(self.feedback),
            None if asked is None else ids(asked),
            self.names,
        )


class NameIds:
    """One dictionary per names table across files: a file's ids map to global ids."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.ids: dict[str, int] = {}

    def remap(self, table: Sequence[str]) -> np.ndarray:
        """file id -> global id, as an array to index with the file's id column."""
        for name in table:
            if name not in self.ids:
                self.ids[name] = len(self.names)
                self.names.append(name)
        if len(self.names) > 1 << 16:
            raise ValueError(f"more than {1 << 16} distinct names in one column of the logs")
        return np.array([self.ids[name] for name in table] or [0], dtype=np.uint16)


def _field(data: np.ndarray, name: str, dtype: Any = None, skip: int = 0) -> np.ndarray:
    """One field of the records (from `skip` bytes into it) as a contiguous column,
    optionally reinterpreted as `dtype`: one strided copy, no per-record Python."""
    fields: Any = data.dtype.fields
    kind = np.dtype(dtype or data.dtype[name])
    offset = fields[name][1] + skip
    if len(data) == 0:  # no buffer to offset into (a file with feedback of one kind only)
        return np.empty(0, kind)
    view = np.ndarray(len(data), kind, buffer=data, offset=offset, strides=(data.itemsize,))
    return np.ascontiguousarray(view)


def file_columns(
    data: np.ndarray,
    sidecar: Mapping[str, Any],
    tables: Mapping[str, str],
    wanted: Sequence[str],
    shared: dict[str, NameIds],
) -> dict[str, np.ndarray]:
    """One file's records as the `wanted` columns: names as global ids (through `shared`,
    sidecar table -> its global names), hashes as int64, the request id's tail as two
    int64 halves. Also what modelgate.analysis.live keeps of each file it has read."""
    out = {}
    for column in wanted:
        if column + "_id" in tables:
            names = shared.setdefault(tables[column + "_id"], NameIds())
            remap = names.remap(sidecar[tables[column + "_id"]])
            out[column] = remap[_field(data, column + "_id")]
        elif column in ("rid_hi", "rid_lo"):
            skip = 8 if column == "rid_lo" else 0
            out[column] = _field(data, "request_id", "<i8", skip)
        else:
            out[column] = _field(data, column, "<i8" if column in _AS_INT64 else None)
    return out


def _columns(
    path: str | os.PathLike[str],
    prefix: str,
    dtype: np.dtype[Any],
    tables: Mapping[str, str],
    wanted: Sequence[str],
    designs: dict[str, dict[str, Any]],
    shared: dict[str, NameIds],
    by_request: bool | None = None,
) -> tuple[pa.Table, int]:
    """`shared`: sidecar table -> its global names, one for both kinds of records, so an
    experiment has the same id among exposures and feedback. `by_request`: only the
    feedback by request id (True) or by unit (False)."""
    names = {field: shared.setdefault(table, NameIds()) for field, table in tables.items()}
    chunks: dict[str, list[np.ndarray]] = {column: [] for column in wanted}
    files = 0
    for _, data, sidecar in iter_record_files(path, prefix, dtype, tables):
        files += 1
        designs.update(sidecar.get("meta", {}).get("experiments", {}))
        if by_request is not None:
            data = data[((data["flags"] & FLAG_BY_REQUEST_ID) != 0) == by_request]
        for column, array in file_columns(data, sidecar, tables, wanted, shared).items():
            chunks[column].append(array)
        del data
    arrays = []
    for column in wanted:
        if column + "_id" in tables:
            dictionary = pa.array(names[column + "_id"].names, pa.string())
            parts = [
                pa.DictionaryArray.from_arrays(pa.array(c), dictionary) for c in chunks[column]
            ]
            kind: pa.DataType = pa.dictionary(pa.uint16(), pa.string())
        else:
            parts = [pa.array(c) for c in chunks[column]]
            kind = parts[0].type if parts else pa.from_numpy_dtype(empty_dtype(column, dtype))
        arrays.append(pa.chunked_array(parts, type=kind))
        chunks[column].clear()  # the Arrow arrays hold the memory now
    return pa.table(arrays, names=list(wanted)), files


def empty_dtype(column: str, dtype: np.dtype[Any]) -> np.dtype[Any]:
    if column in _AS_INT64 or column.startswith("rid_"):
        return np.dtype("<i8")
    return np.dtype(dtype[column])


def load_tables(
    path: str | os.PathLike[str],
    *,
    feedback_columns: Sequence[str] = FEEDBACK_COLUMNS,
    split_feedback: bool = False,
) -> RecordTables:
    """Every worker's exposure and feedback files of `path` as Arrow tables. With
    `split_feedback`, `feedback` holds the feedback by unit without the request id columns
    and `feedback_by_request` the rest without the unit column (the other's is always 0):
    16 bytes a record less where most feedback is by unit."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    designs: dict[str, dict[str, Any]] = {}
    shared: dict[str, NameIds] = {}
    exposures, n = _columns(
        path, "exposure", EXPOSURE_DTYPE, EXPOSURE_NAMES, EXPOSURE_COLUMNS, designs, shared
    )
    read = (path, "feedback", FEEDBACK_DTYPE, FEEDBACK_NAMES)
    asked = None
    if not split_feedback:  # designs as load_logs takes them: from the exposure files
        feedback, m = _columns(*read, feedback_columns, {}, shared)
    else:
        by_unit = [c for c in feedback_columns if not c.startswith("rid_")]
        feedback, m = _columns(*read, by_unit, {}, shared, by_request=False)
        by_id = [c for c in feedback_columns if c != "unit_hash"]
        asked, _ = _columns(*read, by_id, {}, shared, by_request=True)
    names = {table.removesuffix("s"): found.names for table, found in shared.items()}
    return RecordTables(exposures, feedback, designs, n + m, names, asked)


def _with_date(table: pa.Table) -> pa.Table:
    """Adds the UTC date of each record, the second partition key."""
    import pyarrow.compute as pc

    stamps = table.column("ts_ns").cast(pa.timestamp("ns", "UTC"))
    return table.append_column("date", pc.cast(stamps, pa.date32()))


def write_parquet(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, int]:
    """Rolls the record files of `path` into `out/exposures` and `out/feedback`, Parquet files
    partitioned by experiment and date (hive style: `experiment=NAME/date=YYYY-MM-DD`), and
    the designs into `out/designs.json`. A partition written again is replaced whole, so a
    roll-up can be redone; other partitions stay. Returns the records written per table."""
    import json

    import pyarrow.dataset as ds

    tables = load_tables(path)
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, table in (("exposures", tables.exposures), ("feedback", tables.feedback)):
        if table.num_rows:
            ds.write_dataset(
                _with_date(table),
                target / name,
                format="parquet",
                partitioning=["experiment", "date"],
                partitioning_flavor="hive",
                existing_data_behavior="delete_matching",
                basename_template="part-{i}.parquet",
            )
        written[name] = table.num_rows
    designs = target / "designs.json"
    try:
        known = json.loads(designs.read_text())
    except (OSError, ValueError):
        known = {}  # none yet, or a damaged one: the files' designs are written anew
    if not isinstance(known, dict):
        known = {}
    designs.write_text(json.dumps({**known, **tables.designs}, indent=1, sort_keys=True))
    return written
