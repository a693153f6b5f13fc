"""One reading of JSON Pointers (RFC 6901) for the shadow diff, chaos's model faults and the
config (issue 14): before, chaos read "/scores/01" as index 1 where the diff found nothing,
and a label flip's pointer went unchecked."""

from __future__ import annotations

import random

import orjson
import pytest

from modelgate.chaos import mutate_json
from modelgate.config import ConfigError, LabelFlip, ModelFaultSpec, PointerReplace, validate_config
from modelgate.jsonpointer import ABSENT, array_index, check, format_pointer, locate, parse, resolve

from .support import ab_config


@pytest.mark.parametrize(
    ("token", "index"),
    [
        ("0", 0),
        ("7", 7),
        ("12", 12),
        ("01", None),
        ("00", None),
        ("-", None),
        ("+1", None),
        ("²", None),
        ("1e1", None),
        ("", None),
        ("20", None),
        (" 1", None),
    ],
)
def test_an_array_index_is_ascii_digits_without_a_leading_zero(
    token: str, index: int | None
) -> None:
    assert array_index(token, 20) == index


def test_tokens_escape_and_unescape_both_ways() -> None:
    assert parse("") == ()
    assert parse("/") == ("",)
    assert parse("/a~1b/~0c/0/~01") == ("a/b", "~c", "0", "~1")
    assert format_pointer(("a/b", "~c", 0, "~1")) == "/a~1b/~0c/0/~01"
    for pointer in ("/a~1b/~0c/0/~01", "/x//y", "/~0~1"):
        assert format_pointer(parse(pointer)) == pointer


@pytest.mark.parametrize(
    ("pointer", "message"),
    [("score", "missing '/'"), ("/a~2b", "bad escape"), ("/a~", "bad escape")],
)
def test_a_bad_pointer_is_named_by_what_is_wrong(pointer: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check(pointer)
    with pytest.raises(ValueError, match=message):
        parse(pointer)


def test_resolve_and_locate_read_one_document_alike() -> None:
    doc = {"scores": [0.1, 0.2, 0.3], "a/b": {"~": 1}, "": 5}
    assert resolve(doc, parse("/scores/1")) == 0.2
    assert resolve(doc, parse("/scores/01")) is ABSENT
    assert resolve(doc, parse("/scores/3")) is ABSENT
    assert resolve(doc, parse("/a~1b/~0")) == 1
    assert resolve(doc, parse("/")) == 5
    assert resolve(doc, parse("")) is doc
    assert locate(doc, parse("/scores/1")) == (doc["scores"], 1)
    assert locate(doc, parse("/scores/01")) is None
    assert locate(doc, parse("/a~1b/~0")) == (doc["a/b"], "~")
    assert locate(doc, parse("")) is None


def test_chaos_degrades_only_what_the_diff_would_read() -> None:
    answer = orjson.dumps({"scores": [0.1, 0.2, 0.3], "label": "cat"})

    def replaced(pointer: str) -> dict[str, object]:
        spec = ModelFaultSpec(replace=PointerReplace(pointers=[pointer], value="null"))
        out = mutate_json(answer, spec, random.Random(1))
        assert out is not None
        return dict(orjson.loads(out))

    assert replaced("/scores/1")["scores"] == [0.1, None, 0.3]
    assert replaced("/scores/01")["scores"] == [0.1, 0.2, 0.3]  # not an index: untouched
    assert replaced("/scores/²")["scores"] == [0.1, 0.2, 0.3]  # it used to raise


def test_the_config_checks_every_pointer_of_a_model_fault() -> None:
    with pytest.raises(ValueError, match="missing '/'"):
        LabelFlip(pointer="label", labels=["cat", "dog"])
    config = ab_config()
    config["routes"][0]["chaos"] = [
        {"name": "flip", "model": {"flip": {"pointer": "label", "labels": ["cat", "dog"]}}}
    ]
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    assert any(
        "chaos[0].model.flip.pointer" in e and "missing '/'" in e for e in caught.value.errors
    )
