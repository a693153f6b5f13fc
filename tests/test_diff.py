"""modelgate.diff: verdicts on crafted answer pairs, typed pointers, tolerances, top-k."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelgate.config import CompareSpec
from modelgate.diff import (
    MAX_DIFFERENCES,
    Answer,
    Comparison,
    DiffKind,
    Verdict,
    compare,
)
from modelgate.jsonpointer import format_pointer
from modelgate.jsonpointer import parse as parse_pointer

JSON = b"application/json"


def ok(doc: Any, status: int = 200, content_type: bytes | str = JSON) -> Answer:
    return Answer(status, content_type, orjson.dumps(doc), 0.01)


def diff(a: Any, b: Any, **spec: Any) -> Comparison:
    return compare(ok(a), ok(b), CompareSpec(**spec))


def kinds(result: Comparison) -> dict[str, DiffKind]:
    return {d.pointer: d.kind for d in result.differences}


ANSWER = {
    "model": "model-a",
    "score": 0.75,
    "label": "positive",
    "probs": [0.1, 0.2, 0.7],
    "ranking": [1, 0, 2, 3, 4],
}


def test_identical_documents_are_equal() -> None:
    result = diff(ANSWER, dict(ANSWER))
    assert result.verdict is Verdict.EQUAL
    assert result.n_diff == 0 and result.differences == ()


def test_reserialized_document_is_equal_without_a_walk() -> None:
    primary = ok(ANSWER)
    shadow = Answer(200, JSON, json.dumps({**ANSWER, "model": "b"}, indent=2).encode(), 0.02)
    result = compare(primary, shadow, CompareSpec(ignore=["/model"]))
    assert result.verdict is Verdict.EQUAL
    assert math.isnan(result.max_abs_diff) and result.vectors_compared == 0


def test_a_walked_equal_document_counts_its_numbers() -> None:
    # a nested ignore pointer (or `fields`) rules out the whole-document shortcut
    result = diff(ANSWER, {**ANSWER, "meta": {"id": 1}}, ignore=["/meta/id", "/meta"])
    assert result.verdict is Verdict.EQUAL
    assert result.max_abs_diff == 0.0 and result.numbers_compared == 4
    assert result.vectors_compared == 1 and result.argmax_disagreements == 0


def test_the_whole_document_shortcut_keeps_json_types_apart() -> None:
    assert kinds(diff({"a": [1], "m": 1}, {"a": [True], "m": 2}, ignore=["/m"])) == {
        "/a/0": DiffKind.TYPE_CHANGED
    }
    assert diff({"a": 1, "m": 1}, {"a": 1.0, "m": 2}, ignore=["/m"]).verdict is Verdict.EQUAL


def test_byte_identical_bodies_are_equal_without_parsing() -> None:
    body = b"{not json at all"
    result = compare(Answer(200, JSON, body), Answer(200, JSON, body), CompareSpec())
    assert result.verdict is Verdict.EQUAL
    assert math.isnan(result.max_abs_diff)


def test_number_within_abs_tolerance() -> None:
    result = diff({"score": 0.5}, {"score": 0.5 + 1e-9}, abs=1e-6)
    assert result.verdict is Verdict.WITHIN_TOLERANCE
    assert result.max_abs_diff == pytest.approx(1e-9)
    assert diff({"score": 0.5}, {"score": 0.5001}, abs=1e-6).verdict is Verdict.DIFFERS


def test_number_within_rel_tolerance() -> None:
    assert diff({"x": 1000.0}, {"x": 1000.5}, rel=1e-3).verdict is Verdict.WITHIN_TOLERANCE
    result = diff({"x": 1000.0}, {"x": 1002.0}, rel=1e-3)
    assert result.verdict is Verdict.DIFFERS
    assert kinds(result) == {"/x": DiffKind.VALUE_CHANGED}
    assert result.max_abs_diff == pytest.approx(2.0)


def test_zero_tolerance_makes_any_numeric_change_differ() -> None:
    assert diff({"x": 0.1}, {"x": 0.1000001}).verdict is Verdict.DIFFERS


def test_int_and_float_compare_as_numbers() -> None:
    assert diff({"x": 1}, {"x": 1.0}).verdict is Verdict.EQUAL
    assert diff({"x": 1}, {"x": 1.5}, abs=1).verdict is Verdict.WITHIN_TOLERANCE


def test_ints_compare_exactly_as_labels() -> None:
    result = diff({"class": 3}, {"class": 4}, abs=10.0)
    assert result.verdict is Verdict.DIFFERS
    assert kinds(result) == {"/class": DiffKind.VALUE_CHANGED}


def test_label_flip() -> None:
    result = diff(ANSWER, {**ANSWER, "label": "negative"})
    assert result.verdict is Verdict.DIFFERS
    (difference,) = result.differences
    assert difference.pointer == "/label" and difference.shadow == "negative"
    assert tuple(difference) == ("/label", DiffKind.VALUE_CHANGED, "positive", "negative")


def test_missing_and_extra_fields() -> None:
    result = diff({"a": 1, "b": 2}, {"a": 1, "c": 3})
    assert result.verdict is Verdict.DIFFERS
    assert kinds(result) == {"/b": DiffKind.MISSING, "/c": DiffKind.EXTRA}
    assert result.n_diff == 2


def test_type_change() -> None:
    result = diff({"a": {"b": 1}}, {"a": [1]})
    assert kinds(result) == {"/a": DiffKind.TYPE_CHANGED}
    assert kinds(diff({"a": "1"}, {"a": 1})) == {"/a": DiffKind.TYPE_CHANGED}
    assert kinds(diff({"a": True}, {"a": 1})) == {"/a": DiffKind.TYPE_CHANGED}
    assert kinds(diff({"a": None}, {"a": 0.0})) == {"/a": DiffKind.TYPE_CHANGED}
    assert diff([1], {"a": 1}).verdict is Verdict.DIFFERS
    # 1 == True in Python, not in JSON
    assert kinds(diff({"a": [1, 0]}, {"a": [True, False]})) == {
        "/a/0": DiffKind.TYPE_CHANGED,
        "/a/1": DiffKind.TYPE_CHANGED,
    }


def test_length_change_still_compares_the_common_prefix() -> None:
    result = diff({"ids": ["a", "b", "c"]}, {"ids": ["a", "x"]})
    assert result.verdict is Verdict.DIFFERS
    assert kinds(result) == {"/ids": DiffKind.LENGTH_CHANGED, "/ids/1": DiffKind.VALUE_CHANGED}
    length = next(d for d in result.differences if d.kind is DiffKind.LENGTH_CHANGED)
    assert (length.primary, length.shadow) == (3, 2)


def test_probability_vectors_report_argmax_and_max_difference() -> None:
    result = diff({"p": [0.1, 0.2, 0.7]}, {"p": [0.1, 0.25, 0.65]}, abs=0.1)
    assert result.verdict is Verdict.WITHIN_TOLERANCE
    assert result.vectors_compared == 1 and result.argmax_disagreements == 0
    assert result.max_abs_diff == pytest.approx(0.05)
    flipped = diff({"p": [0.1, 0.2, 0.7]}, {"p": [0.1, 0.7, 0.2]})
    assert flipped.argmax_disagreements == 1
    assert kinds(flipped) == {"/p/1": DiffKind.VALUE_CHANGED, "/p/2": DiffKind.VALUE_CHANGED}


def test_argmax_pointers_compare_by_predicted_class_only() -> None:
    moved = diff({"p": [0.1, 0.2, 0.7]}, {"p": [0.3, 0.1, 0.6]}, argmax=["/p"])
    assert moved.verdict is Verdict.WITHIN_TOLERANCE
    assert moved.max_abs_diff == pytest.approx(0.2)
    flipped = diff({"p": [0.1, 0.2, 0.7]}, {"p": [0.1, 0.7, 0.2]}, argmax=["/p"])
    assert flipped.verdict is Verdict.DIFFERS
    assert kinds(flipped) == {"/p": DiffKind.VALUE_CHANGED}


def test_reordered_top_k_is_within_tolerance_with_its_overlap() -> None:
    result = diff({"r": [1, 0, 2, 3, 4]}, {"r": [0, 1, 2, 4, 3]}, ranked=["/r"])
    assert result.verdict is Verdict.WITHIN_TOLERANCE
    assert result.ranked_compared == 1 and result.min_topk_overlap == 1.0


def test_top_k_member_change_differs_below_min_overlap() -> None:
    # top-3 {1, 0, 2} vs {1, 0, 9}: overlap 2/3
    primary, shadow = {"r": [1, 0, 2, 3]}, {"r": [1, 0, 9, 2]}
    strict = diff(primary, shadow, ranked=["/r"], topk=3)
    assert strict.verdict is Verdict.DIFFERS
    assert strict.min_topk_overlap == pytest.approx(2 / 3)
    assert kinds(strict) == {"/r": DiffKind.VALUE_CHANGED}
    lenient = diff(primary, shadow, ranked=["/r"], topk=3, min_overlap=0.6)
    assert lenient.verdict is Verdict.WITHIN_TOLERANCE
    # beyond k nothing counts
    tail = diff({"r": [1, 2, 3, 4]}, {"r": [1, 2, 3, 5]}, ranked=["/r"], topk=3)
    assert tail.verdict is Verdict.WITHIN_TOLERANCE


def test_ranked_lists_of_objects() -> None:
    primary = {"r": [{"id": 1}, {"id": 2}]}
    shadow = {"r": [{"id": 2}, {"id": 1}]}
    assert diff(primary, shadow, ranked=["/r"]).verdict is Verdict.WITHIN_TOLERANCE


def test_ignore_pointers() -> None:
    primary = {"model": "a", "meta": {"ts": 1, "id": "x"}, "items": [{"id": 1, "v": 2}]}
    shadow = {"model": "b", "meta": {"ts": 2, "id": "x"}, "items": [{"id": 9, "v": 2}]}
    assert diff(primary, shadow).n_diff == 3
    spec = {"ignore": ["/model", "/meta/ts", "/items/0/id"]}
    assert diff(primary, shadow, **spec).verdict is Verdict.EQUAL
    # an ignored key present on one side only is not missing or extra either
    assert diff({"a": 1, "t": 1}, {"a": 1}, ignore=["/t"]).verdict is Verdict.EQUAL
    assert diff({"a": 1}, {"a": 1, "t": 1}, ignore=["/t"]).verdict is Verdict.EQUAL


def test_fields_restrict_the_comparison() -> None:
    primary = {**ANSWER, "debug": {"took": 3}}
    shadow = {**ANSWER, "model": "model-b", "debug": {"took": 5}}
    assert diff(primary, shadow).verdict is Verdict.DIFFERS
    only = diff(primary, shadow, fields=["/score", "/label"])
    assert only.verdict is Verdict.EQUAL
    assert only.numbers_compared == 1
    nested = diff({"a": {"b": [1, 2]}}, {"a": {"b": [1, 3]}}, fields=["/a/b/1"])
    assert kinds(nested) == {"/a/b/1": DiffKind.VALUE_CHANGED}


def test_fields_missing_on_one_side() -> None:
    result = diff({"score": 1.0}, {"other": 1}, fields=["/score", "/label"])
    assert kinds(result) == {"/score": DiffKind.MISSING}
    result = diff({"other": 1}, {"label": "x"}, fields=["/score", "/label"])
    assert kinds(result) == {"/label": DiffKind.EXTRA}


def test_field_under_an_ignored_pointer_is_skipped() -> None:
    result = diff({"a": {"b": 1}}, {"a": {"b": 2}}, fields=["/a/b"], ignore=["/a"])
    assert result.verdict is Verdict.EQUAL


def test_non_json_bodies_compare_by_bytes() -> None:
    text = "text/plain"
    same = compare(Answer(200, text, b"hello"), Answer(200, text, b"hello"), CompareSpec())
    assert same.verdict is Verdict.EQUAL
    other = compare(Answer(200, text, b"hello"), Answer(200, text, b"world"), CompareSpec())
    assert other.verdict is Verdict.DIFFERS and other.n_diff == 1


def test_not_json_when_one_side_is_json_and_the_other_is_not() -> None:
    primary = ok({"a": 1})
    shadow = Answer(200, "text/html", b"<html>oops</html>")
    assert compare(primary, shadow, CompareSpec()).verdict is Verdict.NOT_JSON
    broken = Answer(200, JSON, b"{truncated")
    result = compare(primary, broken, CompareSpec())
    assert result.verdict is Verdict.NOT_JSON and "shadow" in result.detail


def test_not_json_when_both_claim_json_and_neither_parses() -> None:
    result = compare(Answer(200, JSON, b"{a"), Answer(200, JSON, b"{b"), CompareSpec())
    assert result.verdict is Verdict.NOT_JSON


def test_content_type_variants_and_sniffing() -> None:
    primary = Answer(200, "application/json; charset=utf-8", b'{"a": 1}')
    shadow = Answer(200, b"application/problem+json", b'{"a":1}')
    assert compare(primary, shadow, CompareSpec()).verdict is Verdict.EQUAL
    sniffed = Answer(200, b"", b' {"a":1}')
    assert compare(primary, sniffed, CompareSpec()).verdict is Verdict.EQUAL


def test_primary_error() -> None:
    error = Answer(503, JSON, b'{"error": "x"}')
    assert compare(error, ok(ANSWER), CompareSpec()).verdict is Verdict.PRIMARY_ERROR
    broken = Answer(error="reset")
    assert compare(broken, ok(ANSWER), CompareSpec()).verdict is Verdict.PRIMARY_ERROR


def test_primary_error_wins_over_shadow_error_and_timeout() -> None:
    error = Answer(500)
    assert compare(error, Answer(500), CompareSpec()).verdict is Verdict.PRIMARY_ERROR
    assert compare(error, None, CompareSpec()).verdict is Verdict.PRIMARY_ERROR


def test_shadow_error() -> None:
    assert compare(ok(ANSWER), Answer(502), CompareSpec()).verdict is Verdict.SHADOW_ERROR
    refused = Answer(error="connect_failed")
    assert compare(ok(ANSWER), refused, CompareSpec()).verdict is Verdict.SHADOW_ERROR


def test_shadow_timeout() -> None:
    assert compare(ok(ANSWER), None, CompareSpec()).verdict is Verdict.SHADOW_TIMEOUT
    late = Answer(error="timeout", latency_s=2.0)
    assert compare(ok(ANSWER), late, CompareSpec()).verdict is Verdict.SHADOW_TIMEOUT


def test_status_change_below_500_differs() -> None:
    result = compare(ok(ANSWER), ok(ANSWER, status=404), CompareSpec())
    assert result.verdict is Verdict.DIFFERS
    assert result.differences[0] == ("", DiffKind.STATUS_CHANGED, 200, 404)


def test_differences_are_bounded_but_counted() -> None:
    primary = {f"k{i}": i for i in range(100)}
    shadow = {f"k{i}": i + 1 for i in range(100)}
    result = diff(primary, shadow)
    assert result.n_diff == 100
    assert len(result.differences) == MAX_DIFFERENCES


def test_deep_documents_do_not_recurse() -> None:
    depth = 1000  # orjson refuses deeper than 1024
    primary = Answer(200, JSON, b"[" * depth + b"1" + b"]" * depth)
    shadow = Answer(200, JSON, b"[" * depth + b"2" + b"]" * depth)
    result = compare(primary, shadow, CompareSpec())
    assert result.verdict is Verdict.DIFFERS
    assert result.differences[0].pointer == "/0" * depth
    same = Answer(200, JSON, b"[" * depth + b" 1" + b"]" * depth)
    assert compare(primary, same, CompareSpec()).verdict is Verdict.EQUAL
    ranked = compare(primary, same, CompareSpec(ranked=[""]))
    assert ranked.verdict is Verdict.EQUAL
    too_deep = b"[" * 5000 + b"]" * 5000
    result = compare(Answer(200, JSON, too_deep), ok([]), CompareSpec())
    assert result.verdict is Verdict.NOT_JSON


def test_pointer_escapes_round_trip() -> None:
    assert parse_pointer("/a~1b/~0c/0") == ("a/b", "~c", "0")
    assert format_pointer(("a/b", "~c", 0)) == "/a~1b/~0c/0"
    assert parse_pointer("") == ()
    result = diff({"a/b": {"~": 1}}, {"a/b": {"~": 2}})
    assert kinds(result) == {"/a~1b/~0": DiffKind.VALUE_CHANGED}
    assert diff({"a/b": 1}, {"a/b": 2}, ignore=["/a~1b"]).verdict is Verdict.EQUAL


def test_config_rejects_malformed_pointers() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="missing '/'"):
        CompareSpec(fields=["score"])
    with pytest.raises(ValidationError, match="bad escape"):
        CompareSpec(ignore=["/a~2"])


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_documents = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_documents)
def test_a_document_always_equals_itself(document: Any) -> None:
    # Two serializations (orjson compact, json with indent) take the parsing path, not the
    # byte-equality shortcut.
    primary = Answer(200, JSON, orjson.dumps(document))
    shadow = Answer(200, JSON, json.dumps(document, indent=1).encode())
    spec = CompareSpec(ranked=["/0"], argmax=["/1"])
    assert compare(primary, shadow, spec).verdict is Verdict.EQUAL
    assert compare(primary, primary, CompareSpec()).verdict is Verdict.EQUAL
