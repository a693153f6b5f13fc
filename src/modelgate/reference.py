"""The config reference, generated from the schema itself so it cannot drift: every key, its
type, its default, and whether a reload applies it live or it needs a restart.

    python -m modelgate.reference > configs/REFERENCE.md
    python -m modelgate.reference --schema > configs/modelgate.schema.json
"""

from __future__ import annotations

import json
import sys
import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from modelgate.config import RESTART_ONLY_KEYS, GatewayConfig

__all__ = ["reference_markdown", "schema_json"]


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}" if args else "map"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, directly or in a list, map or optional."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined:
        if field.default_factory is not None:
            value = field.default_factory()  # type: ignore[call-arg]
            if isinstance(value, BaseModel):
                return "(see below)"
            return f"`{json.dumps(value)}`"
        return "**required**"
    if isinstance(field.default, BaseModel):
        return "(see below)"
    return f"`{json.dumps(field.default)}`"


# Keys a reload accepts whose effect is narrower than "live".
_NOTES = {
    "log_dir": "live for log files opened after the reload; open ones keep their directory",
}


def _rows(model: type[BaseModel], prefix: str, seen: set[type[BaseModel]]) -> Iterator[str]:
    for name, field in model.model_fields.items():
        key = field.alias or name
        path = f"{prefix}{key}"
        top = path.split(".")[0].split("[")[0]
        applies = "restart" if top in RESTART_ONLY_KEYS else _NOTES.get(path, "live")
        yield f"| `{path}` | {_type_name(field.annotation)} | {_default(field)} | {applies} |"
        nested = _nested_model(field.annotation)
        if nested is not None and nested in seen and nested is not model:
            yield f"| `{path}[]` ... | | | as `{_first_path(nested)}` |"
        if nested is not None and nested not in seen:
            origin = typing.get_origin(field.annotation)
            inner = (
                f"{path}[]."
                if origin is list or "list" in _type_name(field.annotation)
                else (f"{path}.NAME." if "map" in _type_name(field.annotation) else f"{path}.")
            )
            yield from _rows(nested, inner, seen | {nested})


def _first_path(model: type[BaseModel]) -> str:
    return {"ExperimentSpec": "routes[].experiment"}.get(model.__name__, model.__name__)


def reference_markdown() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from the schema (`python -m modelgate.reference`); `modelgate check FILE`",
        "validates a file against it and names the key path of every error. *live*: a reload",
        "(SIGHUP, `POST /reload`, `--watch`) applies it without dropping a request; *restart*:",
        "a reload that changes it is refused, and nothing else is applied.",
        "",
        "| key | type | default | applies |",
        "|---|---|---|---|",
        *_rows(GatewayConfig, "", {GatewayConfig}),
        "",
    ]
    return "\n".join(lines)


def schema_json() -> str:
    return json.dumps(GatewayConfig.model_json_schema(by_alias=True), indent=2, sort_keys=True)


if __name__ == "__main__":
    sys.stdout.write(schema_json() + "\n" if "--schema" in sys.argv[1:] else reference_markdown())
