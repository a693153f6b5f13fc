"""Config documents that would hurt the loader (issue 12, config loading): YAML bombs, deep
nesting, huge numbers, non-JSON YAML types. Each is refused quickly as a ConfigError naming
its place, by `modelgate check`, a reload from the file and a reload from the admin body."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import yaml

from modelgate.config import ConfigError, parse_config, validate_config
from modelgate.config_document import MAX_DEPTH, MAX_DOCUMENT_BYTES, MAX_VALUES
from modelgate.control import ReloadError, parse_document
from modelgate.plan import config_digest

BASE = """upstreams: {a: {url: "http://127.0.0.1:1"}}
routes: [{name: r, match: {path_prefix: /}, upstream: a, chaos: [{name: c, model: {stale: STALE}}]}]
"""


def with_stale(stale: str) -> str:
    """A valid config whose one free-form value (a chaos rule's `stale` answer) is `stale`."""
    return BASE.replace("STALE", stale)


def refused(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return caught.value.errors


def laughs(levels: int) -> str:
    """The billion laughs: each level a list of ten aliases to the one before."""
    items = [f"l0: &l0 [{', '.join(['lol'] * 10)}]"]
    for i in range(1, levels):
        items.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]")
    return "{" + ", ".join(items) + "}"


def test_the_billion_laughs_are_refused_before_anything_walks_them() -> None:
    text = with_stale(laughs(9))  # 10^9 values from under 700 bytes
    assert len(text) < 700
    assert refused(text) == [
        f"(root): more than {MAX_VALUES} values (each use of a YAML alias counts)"
    ]
    # A few aliases are fine: they are YAML, and the config holds what they expand to.
    config = parse_config(with_stale(laughs(3)))
    assert config_digest(config)


def test_a_recursive_alias_is_refused() -> None:
    (error,) = refused(with_stale("&loop [*loop]"))
    assert error.startswith("routes[0].chaos[0].model.stale[0][0]")
    assert error.endswith(f"nested deeper than {MAX_DEPTH} levels")


@pytest.mark.parametrize("opening", ["[", "{a: ", "- "])
def test_deep_nesting_is_refused_while_composing(opening: str) -> None:
    if opening == "- ":  # block sequences, one more indentation per level
        nested = "".join("  " * i + "-\n" for i in range(200)) + "  " * 200 + "x\n"
        text = "x:\n" + nested
    else:
        closing = "]" if opening == "[" else "}"
        text = "x: " + opening * 5000 + "1" + closing * 5000 + "\n"
    (error,) = refused(text)
    assert error.startswith("(yaml) line ") and error.endswith(
        f"nested deeper than {MAX_DEPTH} levels"
    )


def test_nesting_within_the_bound_is_a_config_like_any_other() -> None:
    config = parse_config(with_stale("[" * 50 + "1" + "]" * 50))
    assert config.routes[0].chaos[0].model is not None


@pytest.mark.parametrize(
    "number", ["9" * 5000, "1_" * 3000 + "1", ":".join(["59"] * 3000), "1" * 400 + ".5"]
)
def test_huge_numbers_are_refused_by_length(number: str) -> None:
    (error,) = refused(with_stale(number))
    assert error.startswith("(yaml) line 2, column ")
    assert f"a number of {len(number)} characters (at most 100)" in error


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("!!timestamp 2001-01-01", "tag:yaml.org,2002:timestamp values have no place"),
        ("!!binary AAAA", "tag:yaml.org,2002:binary values have no place"),
        ("!!set {a}", "tag:yaml.org,2002:set values have no place"),
        ("!!int x", "invalid literal for int()"),
        ("!!float x", "could not convert string to float"),
    ],
)
def test_yaml_types_json_cannot_say_are_refused_with_their_place(value: str, problem: str) -> None:
    (error,) = refused(with_stale(value))
    assert error.startswith("(yaml) line 2, column ") and problem in error


def test_a_date_looking_scalar_stays_a_string() -> None:
    config = parse_config(with_stale("2001-13-45"))  # once a ValueError: month must be 1..12
    model = config.routes[0].chaos[0].model
    assert model is not None and model.stale == "2001-13-45"


def test_a_document_larger_than_the_bound_is_refused_unread() -> None:
    text = with_stale("x") + "#" * MAX_DOCUMENT_BYTES
    assert refused(text) == [f"(yaml) <config>: {len(text)} bytes (at most {MAX_DOCUMENT_BYTES})"]


def test_the_admin_body_has_the_same_bounds() -> None:
    for body in (with_stale("[" * 500 + "]" * 500), with_stale("9" * 5000)):
        with pytest.raises(ReloadError) as caught:
            parse_document(body.encode(), "application/yaml")
        assert caught.value.kind == "unparseable"
    raw: Any = yaml.safe_load(with_stale("[]"))
    raw["routes"][0]["chaos"][0]["model"]["stale"] = list(range(MAX_VALUES))
    document = parse_document(orjson.dumps(raw), "application/json")
    with pytest.raises(ConfigError, match="more than"):
        validate_config(document)


def test_integers_beyond_64_bits_are_refused_with_their_key_path() -> None:
    """Found by the fuzzer: accepted, then the digest (orjson) raised TypeError in a reload."""
    assert refused(with_stale("[1, 18446744073709551616]")) == [
        "routes[0].chaos[0].model.stale[1]: integer 1.84e+19 out of the 64-bit range"
    ]
    assert config_digest(parse_config(with_stale(str(2**64 - 1))))  # the largest that fits


def test_control_characters_are_a_config_error() -> None:
    """Found by the fuzzer: PyYAML's reader raises as the loader is built."""
    assert refused("a: \x00") == [
        "(yaml) <config>: unacceptable character #x0000: special characters are not allowed "
        'in "<unicode string>", position 3'
    ]


@pytest.mark.parametrize("host", ["127..100.", "a" * 64 + ".example", ".x"])
def test_an_upstream_host_the_plan_cannot_write_is_a_config_error(host: str) -> None:
    """Found by the fuzzer: `check` accepted it, then compiling the Plan (start-up, reload)
    raised UnicodeError writing the Host header."""
    text = BASE.replace("http://127.0.0.1:1", f"http://{host}:9003")
    assert refused(text) == [
        f"upstreams.a.url: bad host in 'http://{host}:9003' (an empty or too long label)"
    ]
