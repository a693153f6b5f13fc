"""Reading record-log files (exposures, feedback) that a crash or a full disk may have left
damaged: what is whole and named is returned, the rest is skipped with a warning naming the
file. Never a crash, never a record attributed to a name it did not have.

What can be wrong, and what is done:
  size not a multiple of the record size   the torn tail is ignored (a killed writer)
  no sidecar, or an unreadable one          the file is skipped (its ids mean nothing)
  a sidecar with another record layout      the file is skipped, unless the layout is one
                                            the caller still reads (`legacy`): converted
  an id past the end of its sidecar table   that record is skipped (it would be misnamed)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "LEGACY_LAYOUTS",
    "RecordRange",
    "iter_record_files",
    "read_record_file",
    "read_record_range",
]

log = logging.getLogger("modelgate.recordlog")

# Per file prefix, the older record layouts still read (a record module registers its own):
# the files a gateway wrote before an upgrade stay readable.
LEGACY_LAYOUTS: dict[str, tuple[np.dtype[Any], ...]] = {}


def _sidecar(
    file: Path,
    dtype: np.dtype[Any],
    names: Mapping[str, str],
    legacy: Sequence[np.dtype[Any]] = (),
) -> tuple[dict[str, Any], np.dtype[Any]] | str:
    """The sidecar and the layout its file was written in, or why the file cannot be read."""
    side = file.with_suffix(".json")
    try:
        sidecar = json.loads(side.read_bytes())
    except FileNotFoundError:
        return f"no sidecar {side.name}"
    except (OSError, ValueError) as exc:
        return f"unreadable sidecar {side.name} ({exc})"
    if not isinstance(sidecar, dict):
        return f"sidecar {side.name} is not a JSON object"
    layout = sidecar.get("dtype")
    written = dtype
    if layout is not None:
        described = [list(f) for f in layout]
        known = [d for d in (dtype, *legacy) if [list(f) for f in d.descr] == described]
        if not known:
            return f"sidecar {side.name} describes another record layout"
        written = known[0]
    for table in names.values():
        entries = sidecar.get(table)
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            return f"sidecar {side.name} has no {table!r} names table"
    return sidecar, written


def _empty(file: Path) -> bool:
    try:
        return file.stat().st_size == 0
    except OSError:
        return False


class RecordRange(NamedTuple):
    """Records `[start, end)` of a file (the whole and named ones) and its sidecar."""

    data: np.ndarray
    sidecar: dict[str, Any]
    end: int  # whole records in the file when it was read: where a later read starts
    torn: int = 0  # bytes of a partial record after them


def read_record_range(
    file: Path,
    dtype: np.dtype[Any],
    names: Mapping[str, str] | None = None,
    legacy: Sequence[np.dtype[Any]] = (),
    start: int = 0,
) -> RecordRange | None:
    """The records of one file from record `start` on (a reader that follows a growing file
    reads only its new tail); None (with a warning) when the file cannot be read at all.
    The size is taken before the sidecar is read: the writer writes the sidecar before the
    records that need its names, so every record counted is named. A torn last record (a
    write under way, or a killed writer) is left for a later read."""
    names = names or {}
    try:
        size = file.stat().st_size
    except OSError as exc:
        log.warning("%s: skipped: unreadable (%s)", file, exc)
        return None
    found = _sidecar(file, dtype, names, legacy)
    if isinstance(found, str):
        if size == 0 or _empty(file):
            return None  # a writer killed between creating the file and its first write
        log.warning("%s: skipped: %s", file, found)
        return None
    sidecar, written = found
    end = size // written.itemsize
    try:
        data = np.fromfile(
            file,
            dtype=written,
            count=max(end - start, 0),
            offset=min(start, end) * written.itemsize,
        )
    except (OSError, ValueError) as exc:
        log.warning("%s: skipped: unreadable (%s)", file, exc)
        return None
    torn = size - end * written.itemsize
    if len(data) < end - start:  # cut back since the stat (a failed write is truncated)
        end, torn = start + len(data), 0
    if written is not dtype:
        converted = np.zeros(len(data), dtype=dtype)
        for field in written.names or ():
            if not field.startswith("pad") and field in (dtype.names or ()):
                converted[field] = data[field]
        data = converted
    keep = np.ones(len(data), dtype=bool)
    for field, table in names.items():
        keep &= data[field] < len(sidecar[table])
    if not keep.all():
        log.warning(
            "%s: skipped %d records whose ids are not in the sidecar's tables",
            file,
            int((~keep).sum()),
        )
        data = data[keep]
    return RecordRange(data, sidecar, end, torn)


def read_record_file(
    file: Path,
    dtype: np.dtype[Any],
    names: Mapping[str, str] | None = None,
    legacy: Sequence[np.dtype[Any]] = (),
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """(records, sidecar) of one file, its whole and named records only; None (with a
    warning) when the file cannot be read at all. `names`: id field -> sidecar table;
    `legacy`: older layouts still read, their records converted to `dtype` (fields they
    lack are zero)."""
    read = read_record_range(file, dtype, names, legacy)
    if read is None:
        return None
    if read.torn:
        log.warning(
            "%s: ignored a torn last record (%d bytes; %d whole records read)",
            file,
            read.torn,
            read.end,
        )
    return read.data, read.sidecar


def iter_record_files(
    path: str | os.PathLike[str],
    prefix: str,
    dtype: np.dtype[Any],
    names: Mapping[str, str] | None = None,
    legacy: Sequence[np.dtype[Any]] = (),
) -> Iterator[tuple[Path, np.ndarray, dict[str, Any]]]:
    """Each readable `<prefix>-*.bin` file of a directory (or the one file given), in name
    order, as (path, records, sidecar); damaged parts are skipped with a warning. Files of
    a layout in `legacy` (default: LEGACY_LAYOUTS of the prefix) come converted to `dtype`."""
    legacy = legacy or LEGACY_LAYOUTS.get(prefix, ())
    root = Path(path)
    files = sorted(root.glob(f"{prefix}-*.bin")) if root.is_dir() else [root]
    for file in files:
        read = read_record_file(file, dtype, names, legacy)
        if read is not None:
            yield file, read[0], read[1]
