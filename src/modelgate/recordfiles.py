"""Reading record-log files (exposures, feedback) that a crash or a full disk may have left
damaged: what is whole and named is returned, the rest is skipped with a warning naming the
file. Never a crash, never a record attributed to a name it did not have.

What can be wrong, and what is done:
  size not a multiple of the record size   the torn tail is ignored (a killed writer)
  no sidecar, or an unreadable one          the file is skipped (its ids mean nothing)
  a sidecar with another record layout      the file is skipped
  an id past the end of its sidecar table   that record is skipped (it would be misnamed)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["iter_record_files", "read_record_file"]

log = logging.getLogger("modelgate.recordlog")


def _sidecar(file: Path, dtype: np.dtype[Any], names: Mapping[str, str]) -> dict[str, Any] | str:
    """The sidecar, or why the file cannot be read."""
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
    if layout is not None and [list(f) for f in layout] != [list(f) for f in dtype.descr]:
        return f"sidecar {side.name} describes another record layout"
    for table in names.values():
        entries = sidecar.get(table)
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            return f"sidecar {side.name} has no {table!r} names table"
    return sidecar


def _empty(file: Path) -> bool:
    try:
        return file.stat().st_size == 0
    except OSError:
        return False


def read_record_file(
    file: Path, dtype: np.dtype[Any], names: Mapping[str, str] | None = None
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """(records, sidecar) of one file, its whole and named records only; None (with a
    warning) when the file cannot be read at all. `names`: id field -> sidecar table."""
    names = names or {}
    sidecar = _sidecar(file, dtype, names)
    if isinstance(sidecar, str):
        if _empty(file):
            return None  # a writer killed between creating the file and its first write
        log.warning("%s: skipped: %s", file, sidecar)
        return None
    try:
        size = file.stat().st_size
        data = np.fromfile(file, dtype=dtype, count=size // dtype.itemsize)
    except (OSError, ValueError) as exc:
        log.warning("%s: skipped: unreadable (%s)", file, exc)
        return None
    if size % dtype.itemsize:
        log.warning(
            "%s: ignored a torn last record (%d bytes; %d whole records read)",
            file,
            size % dtype.itemsize,
            len(data),
        )
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
    return data, sidecar


def iter_record_files(
    path: str | os.PathLike[str],
    prefix: str,
    dtype: np.dtype[Any],
    names: Mapping[str, str] | None = None,
) -> Iterator[tuple[Path, np.ndarray, dict[str, Any]]]:
    """Each readable `<prefix>-*.bin` file of a directory (or the one file given), in name
    order, as (path, records, sidecar); damaged parts are skipped with a warning."""
    root = Path(path)
    files = sorted(root.glob(f"{prefix}-*.bin")) if root.is_dir() else [root]
    for file in files:
        read = read_record_file(file, dtype, names)
        if read is not None:
            yield file, read[0], read[1]
