"""Reading a config document without being hurt by it: bounds checked before validation.

A config comes from a file, a SIGHUP or the admin API's body, so a few hundred bytes must not
hang the control plane or escape as a stray exception. YAML is read with a safe loader that
builds JSON types only (no timestamps, sets or binary), refuses nesting deeper than
`MAX_DEPTH` while composing (PyYAML recurses), numbers longer than `MAX_NUMBER_CHARS` (Python
refuses to convert a long integer and would raise ValueError), and documents larger than
`MAX_DOCUMENT_BYTES`. Any parsed document (YAML or JSON) is then walked once, bounded: more
than `MAX_VALUES` values, counting every use of a YAML alias (the "billion laughs": nine
levels of ten aliases make 10^9 values out of 300 bytes), a cycle, or an integer beyond 64
bits (JSON tools, the digest and the workers' channel cannot carry it) is refused.
Every refusal is a ConfigError naming the place, like any other config error.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import Node, ScalarNode

__all__ = [
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
    "MAX_NUMBER_CHARS",
    "MAX_VALUES",
    "DocumentError",
    "check_document",
    "load_yaml",
    "path_key",
]

MAX_DOCUMENT_BYTES = 1024 * 1024  # 1 MB of YAML: ~4 s to read and validate
MAX_DEPTH = 64
MAX_VALUES = 200_000
MAX_NUMBER_CHARS = 100
# What a config's JSON (the digest, the message to a worker) can carry: orjson's range.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1

_NOT_IN_A_CONFIG = ("binary", "omap", "pairs", "set", "timestamp")


class DocumentError(Exception):
    """A document refused before validation; `errors` are `place: problem` lines."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded, building only what JSON can say."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise ConstructorError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        # The scalar constructors raise plain ValueErrors (a 13th month, `!!int x`): say where.
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            raise ConstructorError(None, None, f"{exc}", node.start_mark) from exc

    def construct_yaml_int(self, node: ScalarNode) -> int:
        _short_number(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: ScalarNode) -> float:
        _short_number(node)
        return super().construct_yaml_float(node)


def _short_number(node: ScalarNode) -> None:
    if len(node.value) > MAX_NUMBER_CHARS:
        raise ConstructorError(
            None,
            None,
            f"a number of {len(node.value)} characters (at most {MAX_NUMBER_CHARS})",
            node.start_mark,
        )


def _not_in_a_config(loader: yaml.SafeLoader, node: Node) -> Any:
    raise ConstructorError(
        None,
        None,
        f"{node.tag} values have no place in a config (JSON types only)",
        node.start_mark,
    )


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)
_ConfigLoader.add_constructor("tag:yaml.org,2002:float", _ConfigLoader.construct_yaml_float)
for _name in _NOT_IN_A_CONFIG:
    _ConfigLoader.add_constructor(f"tag:yaml.org,2002:{_name}", _not_in_a_config)
# A plain 2026-12-07 stays a string, as in JSON, instead of becoming a date.
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if not tag.endswith(":timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(text: str, source: str = "<config>") -> Any:
    """The document in `text`; DocumentError with `(yaml) line L, column C: problem`."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_DOCUMENT_BYTES:
        raise DocumentError([f"(yaml) {source}: {size} bytes (at most {MAX_DOCUMENT_BYTES})"])
    loader = None
    try:
        loader = _ConfigLoader(text)  # its reader refuses control characters right here
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise DocumentError([f"(yaml) {where}: {problem}"]) from exc
    finally:
        if loader is not None:
            loader.dispose()


def path_key(key: object) -> str:
    """A mapping key as a key path shows it: quoted when it would not read as one (empty,
    blank, edged with spaces, unprintable, or holding the `: ` that ends a key path)."""
    text = str(key)
    plain = text.strip() == text and text.isprintable() and ": " not in text
    return text if text and plain else repr(text)


def check_document(raw: Any) -> None:
    """Walks a parsed document once, stopping at the first bound it breaks: more than
    `MAX_VALUES` values (aliases counted each time they are used), deeper than `MAX_DEPTH`
    (a cycle is infinitely deep), an integer beyond 64 bits."""
    values = 0
    stack: list[tuple[Any, str, int]] = [(raw, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        values += 1
        if values > MAX_VALUES:
            raise DocumentError(
                [f"(root): more than {MAX_VALUES} values (each use of a YAML alias counts)"]
            )
        if depth > MAX_DEPTH:
            where = path if len(path) <= 80 else path[:80] + "..."
            raise DocumentError([f"{where}: nested deeper than {MAX_DEPTH} levels"])
        if isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX:
            where = path or "(root)"
            raise DocumentError([f"{where}: integer {value:.3g} out of the 64-bit range"])
        if isinstance(value, dict):
            for key, item in value.items():
                name = path_key(key)
                stack.append((item, f"{path}.{name}" if path else name, depth + 1))
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                stack.append((item, f"{path}[{index}]", depth + 1))
