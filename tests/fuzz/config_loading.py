"""The config-loading fuzz harness: bytes into the loader that `modelgate check`, SIGHUP and
`POST /reload` use. The first byte picks how the rest is read:

- mode 0: the rest is a config file's text (`parse_config`, as `load_config` reads it);
- mode 1: the rest is a `POST /reload` body, YAML or JSON (`parse_document`, then
  `validate_config`, as `ControlPlane.reload_from_body` does);
- mode 2: the rest drives structured mutations of a valid config (a value replaced by a hostile
  one, a key dropped or added, a container shared so that YAML writes an alias, ...), which is
  then written as YAML and read back (`parse_config`) and sent as a JSON body.

What each input must satisfy: the loader returns a valid config or raises its own error type
(ConfigError; ReloadError `unparseable` for a body it cannot parse) whose every error is a
`place: problem` line; no other exception. A config it accepts compiles, has a digest, and
reads back the same from the JSON a worker is sent (`model_dump` then `validate_config`). A
hang (a bomb that expands) shows as libFuzzer's -timeout.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import yaml

from modelgate.config import ConfigError, GatewayConfig, parse_config, validate_config
from modelgate.control import ReloadError, parse_document
from modelgate.plan import compile_plan, config_digest

__all__ = ["SEEDS", "FuzzFailure", "check_input"]

_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
_BASE: dict[str, Any] = yaml.safe_load((_CONFIGS / "example.yaml").read_text(encoding="utf-8"))

SEEDS: list[bytes] = [
    b"\x00" + (_CONFIGS / "example.yaml").read_bytes(),
    b"\x00" + (_CONFIGS / "demo.yaml").read_bytes(),
    b"\x01" + orjson.dumps(_BASE),
    b"\x00a: &a [1, 1]\nb: &b [*a, *a]\nc: [*b, *b]\n",
    b"\x00x: [[[[[[1]]]]]]\ny: 99999999999999999999\nz: 2001-12-14\n",
    b"\x02" + bytes(range(64)),
    b"\x02" + bytes(range(255, 127, -1)),
]


class FuzzFailure(AssertionError):
    """A property of the loader broke; the message says which."""


# Values a mutation may put anywhere: wrong types, edges, and things that stress the bounds.
_HOSTILE: list[Any] = [
    None,
    True,
    0,
    -1,
    2**63,
    10**40,
    1e308,
    -0.0,
    float("inf"),
    float("nan"),
    "",
    "x" * 300,
    "http://[::1",
    "/../..",
    "é\u0000\ud7ff",
    [],
    {},
    [[[[[[[[[[1]]]]]]]]]],
    {"name": "x"},
    ["header:"],
]


class _Reader:
    """Takes small numbers from the input's bytes, 0 once they run out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def byte(self) -> int:
        if self.at >= len(self.data):
            return 0
        self.at += 1
        return self.data[self.at - 1]

    def more(self) -> bool:
        return self.at < len(self.data)

    def text(self) -> str:
        size = self.byte() % 24
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk.decode("utf-8", "replace")


def _containers(doc: Any) -> list[Any]:
    out: list[Any] = []
    stack = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, dict | list) and not any(value is seen for seen in out):
            out.append(value)
            stack.extend(value.values() if isinstance(value, dict) else value)
    return out


def _mutate(doc: dict[str, Any], reader: _Reader) -> None:
    """One mutation at a place in `doc` chosen by the input."""
    containers = _containers(doc)
    target = containers[reader.byte() % len(containers)]
    keys: list[Any] = list(target) if isinstance(target, dict) else list(range(len(target)))
    op = reader.byte() % 6
    if not keys or op == 0:  # a new key or element
        value = _HOSTILE[reader.byte() % len(_HOSTILE)]
        if isinstance(target, dict):
            target[reader.text() or "extra"] = copy.deepcopy(value)
        else:
            target.append(copy.deepcopy(value))
        return
    key = keys[reader.byte() % len(keys)]
    if op == 1:
        del target[key]
    elif op == 2:
        target[key] = copy.deepcopy(_HOSTILE[reader.byte() % len(_HOSTILE)])
    elif op == 3:  # the same container twice: YAML writes an anchor and an alias
        target[key] = containers[reader.byte() % len(containers)]
    elif op == 4:
        target[key] = reader.text()
    else:
        number = reader.byte() | reader.byte() << 8
        target[key] = number if reader.byte() % 2 else number / 7.0 - 100


def _check_errors(errors: list[str], where: str) -> None:
    if not errors:
        raise FuzzFailure(f"{where}: refused without an error")
    for error in errors:
        place, sep, problem = error.partition(": ")
        if not isinstance(error, str) or not sep or not place.strip() or not problem.strip():
            raise FuzzFailure(f"{where}: an error that is not 'place: problem': {error!r}")


def _check_accepted(config: GatewayConfig, where: str) -> None:
    try:
        plan = compile_plan(config, version=2)
        again = validate_config(orjson.loads(orjson.dumps(config.model_dump(mode="json"))))
    except Exception as exc:
        raise FuzzFailure(f"{where}: an accepted config broke later: {exc!r}") from exc
    if config_digest(again) != plan.digest:
        raise FuzzFailure(f"{where}: a worker would read another config from the JSON it is sent")


def _file(text: str) -> str:
    try:
        config = parse_config(text)
    except ConfigError as exc:
        _check_errors(exc.errors, "file")
        return "refused"
    _check_accepted(config, "file")
    return "accepted"


def _body(body: bytes, content_type: str) -> str:
    try:
        config = validate_config(parse_document(body, content_type))
    except ReloadError as exc:
        if exc.kind != "unparseable":
            raise FuzzFailure(f"body: refused as {exc.kind}") from exc
        _check_errors(exc.errors, "body")
        return "refused"
    except ConfigError as exc:
        _check_errors(exc.errors, "body")
        return "refused"
    _check_accepted(config, "body")
    return "accepted"


def check_input(data: bytes) -> str:
    """Runs one input through the loader; 'accepted' or 'refused', else FuzzFailure."""
    mode, rest = (data[0] % 3, data[1:]) if data else (0, b"")
    try:
        if mode == 0:
            try:
                text = rest.decode("utf-8")
            except UnicodeDecodeError:
                return "refused"  # load_config says so before parsing (covered by its tests)
            return _file(text)
        if mode == 1:
            kind = "application/json" if rest[:1] in (b"{", b"[") else "application/yaml"
            return _body(rest, kind)
        doc = copy.deepcopy(_BASE)
        reader = _Reader(rest)
        for _ in range(1 + reader.byte() % 8):
            _mutate(doc, reader)
        text = yaml.safe_dump(doc, allow_unicode=True)
        outcome = _file(text)
        try:
            body = orjson.dumps(doc)
        except TypeError:  # a shared container made a cycle: JSON cannot say it
            return outcome
        return _body(body, "application/json")
    except FuzzFailure:
        raise
    except RecursionError as exc:
        raise FuzzFailure(f"mode {mode}: RecursionError escaped the loader") from exc
    except Exception as exc:
        raise FuzzFailure(f"mode {mode}: {exc!r} escaped the loader") from exc
