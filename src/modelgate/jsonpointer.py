"""JSON Pointers (RFC 6901), one reading of them for the whole package: the shadow compare
spec's `fields`, `ignore`, `ranked` and `argmax`, chaos's model faults, and the config that
names both. There were three before, and they disagreed: chaos read "/scores/01" as index
1 (and would have read "/scores/²" as a number), where the diff found nothing there.

The rules: "" is the whole document; every other pointer starts with "/"; "~1" is "/" and
"~0" is "~" in a token, and no other "~" escape exists; an array index is ASCII digits
without a leading zero ("0", "7", "12", never "01", "-" or "+1"), inside the array.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

__all__ = ["ABSENT", "array_index", "check", "format_pointer", "locate", "parse", "resolve"]

ABSENT: Final = object()  # what resolve() gives where the document has nothing
_INDEX = re.compile(r"0|[1-9][0-9]*")
_BAD_ESCAPE = re.compile(r"~(?![01])")


def check(pointer: str) -> str:
    """The pointer, or a ValueError that names what is wrong with it (for a config's error)."""
    if pointer and not pointer.startswith("/"):
        raise ValueError(f"not a JSON pointer (RFC 6901), missing '/': {pointer!r}")
    if _BAD_ESCAPE.search(pointer):
        raise ValueError(f"bad escape in JSON pointer (only ~0 and ~1): {pointer!r}")
    return pointer


def parse(pointer: str) -> tuple[str, ...]:
    """The pointer's tokens, unescaped: "" is (), "/a~1b/0" is ("a/b", "0")."""
    if not check(pointer):
        return ()
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/"))


def format_pointer(tokens: Sequence[str | int]) -> str:
    """The pointer of a path of keys and indexes, escaped."""
    return "".join("/" + str(t).replace("~", "~0").replace("/", "~1") for t in tokens)


def array_index(token: str, size: int) -> int | None:
    """The index a token names in an array of `size` items, or None (not an index, or past
    the end)."""
    if _INDEX.fullmatch(token) is None:
        return None
    index = int(token)
    return index if index < size else None


def resolve(document: Any, tokens: Sequence[str]) -> Any:
    """The value at the tokens' path, or ABSENT."""
    for token in tokens:
        if type(document) is dict:
            document = document.get(token, ABSENT)
            if document is ABSENT:
                return ABSENT
        elif type(document) is list:
            index = array_index(token, len(document))
            if index is None:
                return ABSENT
            document = document[index]
        else:
            return ABSENT
    return document


def locate(document: Any, tokens: Sequence[str]) -> tuple[Any, str | int] | None:
    """The container and the key or index that the tokens' path ends at, for a change in
    place; None for the whole document or where the document has nothing."""
    if not tokens:
        return None
    container = resolve(document, tokens[:-1])
    last = tokens[-1]
    if type(container) is dict and last in container:
        return container, last
    if type(container) is list:
        index = array_index(last, len(container))
        if index is not None:
            return container, index
    return None
