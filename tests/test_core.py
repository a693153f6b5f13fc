"""Tests of the assignment core on both twins: XXH64, buckets, VariantTable, Layer, chooser.

Expected values come from the `xxhash` package and the formulas of DESIGN.md, computed here.
"""

from __future__ import annotations

import fractions
import math
import os
import pickle
import random
import subprocess
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import modelgate.core as core

SEEDS = [0, 1, 2**31, 2**32 + 7, 0x9E3779B185EBCA87, 2**63, 2**64 - 1]
# Any text UTF-8 can encode (no lone surrogates): ASCII, Latin-1, CJK, emoji, astral planes.
TEXT = st.text(st.characters(codec="utf-8"), max_size=60)
FAST = settings(deadline=None, max_examples=150)


def ref_bucket(salt: str, unit: str) -> int:
    return int(xxhash.xxh64_intdigest((salt + ":" + unit).encode("utf-8"))) % 10000


def ref_boundaries(weights: Sequence[float]) -> list[int]:
    total = 0.0  # summed left to right in double precision, as the contract says
    sums = []
    for w in weights:
        total += float(w)
        sums.append(total)
    return [math.floor(10000 * s / total + 0.5) for s in sums]


def ref_choose(bounds: Sequence[int], b: int) -> int:
    return next(i for i, c in enumerate(bounds) if b < c)


def mixed_units(n: int, seed: int = 7) -> list[str]:
    """ASCII ids with some Latin-1, BMP, astral and empty units mixed in."""
    rnd = random.Random(seed)
    pool = ["", "é", "ß" * 3, "中文", "😀", "👍🏽x", "a\x00b", "ÿ" * 40, "\U0010ffff"]
    return [f"user-{i}" if i % 5 else rnd.choice(pool) + str(i) for i in range(n)]


# --- XXH64 ---


@pytest.mark.parametrize("seed", SEEDS)
def test_xxh64_equals_xxhash_at_every_short_length(core_module: ModuleType, seed: int) -> None:
    # 0..200 bytes walks every path: no stripes, 1-6 stripes, all 8/4/1-byte tails.
    data = random.Random(seed).randbytes(200)
    for n in range(201):
        assert core_module.xxh64(data[:n], seed) == xxhash.xxh64_intdigest(data[:n], seed)


@pytest.mark.parametrize("size", [1000, 4095, 4096, 4097, 65537, 100_000])
def test_xxh64_equals_xxhash_on_long_inputs(core_module: ModuleType, size: int) -> None:
    data = random.Random(size).randbytes(size)
    for seed in (0, 2**64 - 1):
        assert core_module.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed)


def test_xxh64_known_vectors(core_module: ModuleType) -> None:
    # Published XXH64 values (xxHash's own sanity checks).
    assert core_module.xxh64(b"") == 0xEF46DB3751D8E999
    assert core_module.xxh64(b"abc") == 0x44BC2CF5AD770999
    assert core_module.xxh64(b"", 2**64 - 1) == xxhash.xxh64_intdigest(b"", 2**64 - 1)


@FAST
@given(data=st.binary(max_size=300), seed=st.integers(0, 2**64 - 1))
def test_xxh64_parity(core_module: ModuleType, data: bytes, seed: int) -> None:
    assert core_module.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed)


def test_xxh64_defaults_to_seed_zero_and_takes_keywords(core_module: ModuleType) -> None:
    assert core_module.xxh64(b"x") == core_module.xxh64(b"x", 0) == xxhash.xxh64_intdigest(b"x")
    assert core_module.xxh64(data=b"x", seed=5) == xxhash.xxh64_intdigest(b"x", 5)


def test_xxh64_accepts_bytes_subclasses(core_module: ModuleType) -> None:
    class Raw(bytes):
        pass

    assert core_module.xxh64(Raw(b"abc"), 3) == xxhash.xxh64_intdigest(b"abc", 3)


@pytest.mark.parametrize("seed", [-1, -(2**64), 2**64, 2**100])
def test_xxh64_rejects_seeds_outside_64_bits(core_module: ModuleType, seed: int) -> None:
    # xxhash itself would wrap these silently.
    with pytest.raises(ValueError, match=r"seed: must be in \[0, 2\*\*64\)"):
        core_module.xxh64(b"abc", seed)


@pytest.mark.parametrize("seed", [1.0, "1", None, True, np.uint64(1)])
def test_xxh64_rejects_seeds_that_are_not_int(core_module: ModuleType, seed: Any) -> None:
    with pytest.raises(TypeError, match="seed: expected int"):
        core_module.xxh64(b"abc", seed)


@pytest.mark.parametrize("data", ["abc", bytearray(b"abc"), memoryview(b"abc"), None, 1])
def test_xxh64_rejects_data_that_is_not_bytes(core_module: ModuleType, data: Any) -> None:
    with pytest.raises(TypeError, match="data: expected bytes"):
        core_module.xxh64(data)


# --- bucket ---


@FAST
@given(salt=TEXT, unit=TEXT)
def test_bucket_equals_the_formula(core_module: ModuleType, salt: str, unit: str) -> None:
    b = core_module.bucket(salt, unit)
    assert b == ref_bucket(salt, unit)
    assert 0 <= b < core_module.BUCKETS == 10000


@pytest.mark.parametrize(
    ("salt", "unit"),
    [
        ("", ""),
        ("ranker", "user-1"),
        ("ränker", "üser"),
        ("exp", "😀中文"),
        ("a:b", ":c"),
        ("nul", "a\x00b"),
        ("astral", "\U0010ffff"),
        ("latin1", "ÿ" * 300),
        ("long", "u" * 100_000),
        ("s" * 300, "t" * 300),
    ],
)
def test_bucket_examples(core_module: ModuleType, salt: str, unit: str) -> None:
    assert core_module.bucket(salt, unit) == ref_bucket(salt, unit)


def test_bucket_takes_str_subclasses(core_module: ModuleType) -> None:
    class Name(str):
        pass

    assert core_module.bucket(Name("s"), Name("ü")) == ref_bucket("s", "ü")


@pytest.mark.parametrize(
    ("salt", "unit", "message"),
    [
        (1, "a", "salt: expected str, got int"),
        (b"s", "a", "salt: expected str, got bytes"),
        ("s", None, "unit: expected str, got NoneType"),
        ("s", b"a", "unit: expected str, got bytes"),
    ],
)
def test_bucket_rejects_non_str(
    core_module: ModuleType, salt: Any, unit: Any, message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        core_module.bucket(salt, unit)


@pytest.mark.parametrize(("salt", "unit"), [("s", "\ud800"), ("\udfff", "u"), ("s", "a\ud83d")])
def test_bucket_rejects_lone_surrogates(core_module: ModuleType, salt: str, unit: str) -> None:
    with pytest.raises(UnicodeEncodeError):
        core_module.bucket(salt, unit)


# --- bucket_many ---


def _inputs(units: list[str]) -> Iterator[tuple[str, Any]]:
    yield "list", units
    yield "tuple", tuple(units)
    yield "generator", (u for u in units)
    yield "numpy str", np.array(units, dtype=str)
    yield "numpy object", np.array(units, dtype=object)
    yield "numpy big-endian", np.array(units, dtype=str).astype(np.dtype(str).newbyteorder(">"))
    strided = np.array([u for u in units for _ in (0, 1)], dtype=str)[::2]
    yield "numpy strided", strided
    readonly = np.array(units, dtype=str)
    readonly.flags.writeable = False
    yield "numpy read-only", readonly


def test_bucket_many_accepts_every_input_form(core_module: ModuleType) -> None:
    units = [u.rstrip("\x00") for u in mixed_units(300)]  # numpy drops trailing NULs
    expected = [ref_bucket("exp", u) for u in units]
    for form, value in _inputs(units):
        out = core_module.bucket_many("exp", value)
        assert out.dtype == np.int32, form
        assert out.shape == (len(units),), form
        assert out.tolist() == expected, form


def test_bucket_many_follows_numpy_str_semantics(core_module: ModuleType) -> None:
    # '<U' elements lose trailing NULs and keep interior ones; a wide dtype pads with NULs.
    arr = np.array(["a\x00b", "x\x00\x00", "", "wide"], dtype="<U12")
    expected = [ref_bucket("s", u) for u in arr.tolist()]
    assert arr.tolist() == ["a\x00b", "x", "", "wide"]
    assert core_module.bucket_many("s", arr).tolist() == expected


def test_bucket_many_takes_str_subclasses(core_module: ModuleType) -> None:
    class Name(str):
        pass

    units = [Name("x"), Name("é" * 40), "plain", Name("")]
    expected = [ref_bucket("s", str(u)) for u in units]
    assert core_module.bucket_many(Name("s"), units).tolist() == expected


@pytest.mark.parametrize("empty", [[], (), np.array([], dtype=str), np.array([], dtype=object)])
def test_bucket_many_of_nothing(core_module: ModuleType, empty: Any) -> None:
    out = core_module.bucket_many("s", empty)
    assert out.dtype == np.int32
    assert out.shape == (0,)


def test_bucket_many_across_chunks_and_long_keys(core_module: ModuleType) -> None:
    # More keys than one packing chunk (4096), of uneven sizes, and one key larger than the
    # chunk buffer (128 KiB), which must grow it.
    rnd = random.Random(3)
    units = ["é" * rnd.randrange(0, 80) + str(i) for i in range(9000)]
    units[4500] = "x" * 300_000
    units[4501] = "😀" * 50_000
    expected = [ref_bucket("salt", u) for u in units]
    assert core_module.bucket_many("salt", units).tolist() == expected
    short = [u for u in units if len(u) < 100]
    assert core_module.bucket_many("salt", np.array(short)).tolist() == [
        ref_bucket("salt", u) for u in short
    ]
    # A row of 40000 UCS4 code points is wider than the chunk buffer too.
    wide = np.array(["a", "é" * 40_000, "b" * 39_999, ""])
    assert core_module.bucket_many("salt", wide).tolist() == [
        ref_bucket("salt", u) for u in wide.tolist()
    ]


@pytest.mark.parametrize(
    ("units", "error", "message"),
    [
        ("abc", TypeError, "units: expected a sequence of str, got str"),
        (b"abc", TypeError, "units: expected a sequence of str, got bytes"),
        (5, TypeError, "units: expected a sequence of str, got int"),
        (None, TypeError, "units: expected a sequence of str, got NoneType"),
        (["a", 1], TypeError, r"units\[1\]: expected str, got int"),
        (("a", b"b"), TypeError, r"units\[1\]: expected str, got bytes"),
        (np.array(["a", None], dtype=object), TypeError, r"units\[1\]: expected str"),
        (np.array([b"a"]), TypeError, "units: expected str elements, got an array of dtype"),
        (np.zeros(3), TypeError, "units: expected str elements, got an array of dtype"),
        (np.array([["a"], ["b"]]), ValueError, "units: expected a 1-D array, got 2-D"),
        (np.array("a"), ValueError, "units: expected a 1-D array, got 0-D"),
    ],
)
def test_bucket_many_rejects_bad_units(
    core_module: ModuleType, units: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        core_module.bucket_many("s", units)


@pytest.mark.parametrize("salt", [None, 1, b"s"])
def test_bucket_many_rejects_a_non_str_salt(core_module: ModuleType, salt: Any) -> None:
    with pytest.raises(TypeError, match="salt: expected str"):
        core_module.bucket_many(salt, ["a"])


@pytest.mark.parametrize("as_array", [False, True])
def test_bucket_many_rejects_lone_surrogates(core_module: ModuleType, as_array: bool) -> None:
    units = ["a", "b\ud800"]
    with pytest.raises(UnicodeEncodeError):
        core_module.bucket_many("s", np.array(units) if as_array else units)
    with pytest.raises(UnicodeEncodeError):
        core_module.bucket_many("\udc00", ["a"])


# --- VariantTable ---


@pytest.mark.parametrize(
    ("weights", "bounds"),
    [
        ([100], (10000,)),
        ([90, 10], (9000, 10000)),
        ([1, 1, 1], (3333, 6667, 10000)),
        ([0.1, 0.2, 0.7], (1000, 3000, 10000)),
        ([33.3, 33.3, 33.4], (3330, 6660, 10000)),
        ([0, 5, 0, 5], (0, 5000, 5000, 10000)),
        ([5, 5, 0], (5000, 10000, 10000)),
        ([1, 99999], (0, 10000)),
    ],
)
def test_boundaries_examples(
    core_module: ModuleType, weights: list[float], bounds: tuple[int, ...]
) -> None:
    table = core_module.VariantTable(weights)
    assert table.boundaries == bounds
    assert list(bounds) == ref_boundaries(weights)


@pytest.mark.parametrize("weights", [[90, 10], [1, 1, 1], [0, 5, 0, 5], [5, 5, 0], [1] * 40])
def test_choose_every_bucket(core_module: ModuleType, weights: list[float]) -> None:
    table = core_module.VariantTable(weights)
    bounds = ref_boundaries(weights)
    chosen = [table.choose(b) for b in range(10000)]
    assert chosen == [ref_choose(bounds, b) for b in range(10000)]
    # A zero-weight variant is never chosen.
    assert {i for i, w in enumerate(weights) if w == 0}.isdisjoint(chosen)


def test_choose_takes_integer_like_buckets(core_module: ModuleType) -> None:
    table = core_module.VariantTable([1, 1])
    assert table.choose(np.int64(9999)) == 1
    assert table.choose(np.uint16(0)) == 0


@pytest.mark.parametrize("bucket", [-1, 10000, 2**70, -(2**70)])
def test_choose_rejects_buckets_out_of_range(core_module: ModuleType, bucket: int) -> None:
    with pytest.raises(ValueError, match=r"bucket: must be in \[0, 10000\)"):
        core_module.VariantTable([1, 1]).choose(bucket)


@pytest.mark.parametrize("bucket", [1.0, "1", None])
def test_choose_rejects_non_integers(core_module: ModuleType, bucket: Any) -> None:
    with pytest.raises(TypeError):
        core_module.VariantTable([1, 1]).choose(bucket)


@FAST
@given(salt=TEXT, unit=TEXT)
def test_assign_equals_the_formula(core_module: ModuleType, salt: str, unit: str) -> None:
    weights = [50, 30, 0, 20]
    table = core_module.VariantTable(weights)
    assert table.assign(salt, unit) == ref_choose(ref_boundaries(weights), ref_bucket(salt, unit))


def test_assign_many_equals_assign(core_module: ModuleType) -> None:
    table = core_module.VariantTable([0.1, 0.2, 0.7])
    units = mixed_units(2000)
    one_by_one = [table.assign("ranker", u) for u in units]
    bounds = ref_boundaries([0.1, 0.2, 0.7])
    assert one_by_one == [ref_choose(bounds, ref_bucket("ranker", u)) for u in units]
    for form, value in _inputs([u.rstrip("\x00") for u in units]):
        out = table.assign_many("ranker", value)
        assert out.dtype == np.int32, form
        assert out.tolist() == one_by_one, form


def test_assign_errors(core_module: ModuleType) -> None:
    table = core_module.VariantTable([1, 1])
    with pytest.raises(TypeError, match="unit: expected str, got int"):
        table.assign("s", 1)
    with pytest.raises(TypeError, match="salt: expected str, got NoneType"):
        table.assign(None, "u")
    with pytest.raises(UnicodeEncodeError):
        table.assign("s", "\ud800")
    with pytest.raises(TypeError, match=r"units\[0\]: expected str"):
        table.assign_many("s", [1])
    with pytest.raises(TypeError, match="salt: expected str"):
        table.assign_many(1, ["u"])


@pytest.mark.parametrize(
    ("weights", "error", "message"),
    [
        ([1, -3], ValueError, r"^weights\[1\]: must be >= 0, got -3$"),
        ([-0.5], ValueError, r"^weights\[0\]: must be >= 0, got -0.5$"),
        ([], ValueError, "^weights: must not be empty$"),
        ((), ValueError, "^weights: must not be empty$"),
        ([0, 0, 0.0], ValueError, "^weights: must not all be zero$"),
        ([1, math.nan], ValueError, r"^weights\[1\]: must be finite, got nan$"),
        ([math.inf, 1], ValueError, r"^weights\[0\]: must be finite, got inf$"),
        ([1, -math.inf], ValueError, r"^weights\[1\]: must be finite, got -inf$"),
        ([10**400], ValueError, r"^weights\[0\]: must be finite"),
        ([1e308, 1e308], ValueError, "^weights: their sum overflows a double$"),
        (["1"], ValueError, r"^weights\[0\]: must be a number, got '1'$"),
        ([1, None], ValueError, r"^weights\[1\]: must be a number, got None$"),
        ([True, 1], ValueError, r"^weights\[0\]: must be a number, got True$"),
        ([1, np.bool_(False)], ValueError, r"^weights\[1\]: must be a number"),
        ([1, 1j], ValueError, r"^weights\[1\]: must be a number, got 1j$"),
        ("12", TypeError, "^weights: expected a sequence of numbers, got str$"),
        (5, TypeError, "^weights: expected a sequence of numbers, got int$"),
        (None, TypeError, "^weights: expected a sequence of numbers, got NoneType$"),
    ],
)
def test_weights_validation(
    core_module: ModuleType, weights: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        core_module.VariantTable(weights)


def test_weights_take_any_real_numbers(core_module: ModuleType) -> None:
    weights = [np.float32(1), np.int64(2), fractions.Fraction(1, 1), 0]
    table = core_module.VariantTable(w for w in weights)
    assert table.weights == (1.0, 2.0, 1.0, 0.0)
    assert all(type(w) is float for w in table.weights)
    assert table.boundaries == (2500, 7500, 10000, 10000)


def test_variant_table_value_semantics(core_module: ModuleType) -> None:
    vt = core_module.VariantTable
    table = vt([90, 10])
    assert len(table) == 2
    assert table.weights == (90.0, 10.0)
    assert repr(table) == "VariantTable([90.0, 10.0])"
    assert eval(repr(table), {"VariantTable": vt}) == table
    assert table == vt([90.0, 10.0])
    assert table != vt([9, 1])  # same split, different weights
    assert table != (90.0, 10.0)
    assert hash(table) == hash(vt([90, 10]))
    clone = pickle.loads(pickle.dumps(table))
    assert type(clone) is vt
    assert clone == table
    assert clone.boundaries == table.boundaries
    with pytest.raises(AttributeError):
        table.boundaries = (1, 2)


# --- Layer ---


def test_layer_slices_the_bucket_space(core_module: ModuleType) -> None:
    layer = core_module.Layer("home", [("hero", 0.2), ("search", 0.5), ("off", 0.0)])
    assert layer.boundaries == (2000, 7000, 7000)
    assert len(layer) == 3
    assert layer.name == "home"
    assert layer.experiments == ("hero", "search", "off")
    assert layer.shares == (0.2, 0.5, 0.0)
    units = mixed_units(3000)
    names: list[str | None] = ["hero", "search", "off", None]
    expected = []
    for u in units:
        b = ref_bucket("home", u)
        expected.append(0 if b < 2000 else 1 if b < 7000 else -1)
    assert [layer.index_for(u) for u in units] == expected
    assert [layer.experiment_for(u) for u in units] == [names[i] for i in expected]
    for form, value in _inputs([u.rstrip("\x00") for u in units]):
        out = layer.experiment_for_many(value)
        assert out.dtype == np.int32, form
        assert out.tolist() == expected, form


def test_layer_full_and_rounded(core_module: ModuleType) -> None:
    # 0.7 + 0.2 + 0.1 sums to 0.9999999999999999 and 0.1 + 0.2 + 0.7 to 1.0000000000000002:
    # both cover the whole layer.
    assert core_module.Layer("l", [("a", 0.7), ("b", 0.2), ("c", 0.1)]).boundaries == (
        7000,
        9000,
        10000,
    )
    full = core_module.Layer("l", [("a", 0.1), ("b", 0.2), ("c", 0.7)])
    assert full.boundaries == (1000, 3000, 10000)
    assert -1 not in full.experiment_for_many(mixed_units(2000)).tolist()


@pytest.mark.parametrize(
    ("name", "allocations", "error", "message"),
    [
        (1, [("a", 0.5)], TypeError, "^name: expected str, got int$"),
        ("", [("a", 0.5)], ValueError, "^name: must not be empty$"),
        ("l", [], ValueError, "^allocations: must not be empty$"),
        ("l", 5, TypeError, "^allocations: expected a sequence of"),
        ("l", "ab", TypeError, "^allocations: expected a sequence of"),
        ("l", [("a", 0.6), ("b", 0.5)], ValueError, "^allocations: shares sum to 1.1, must be"),
        ("l", [("a", 0.5), ("a", 0.1)], ValueError, r"^allocations\[1\]: duplicate experiment"),
        ("l", [("a", 0.5), ("l", 0.1)], ValueError, r"^allocations\[1\]: an experiment cannot"),
        ("l", [("a", 1.5)], ValueError, r"^allocations\[0\].share: must be <= 1, got 1.5$"),
        ("l", [("a", -0.1)], ValueError, r"^allocations\[0\].share: must be >= 0, got -0.1$"),
        ("l", [("a", math.nan)], ValueError, r"^allocations\[0\].share: must be finite"),
        ("l", [("a", "x")], ValueError, r"^allocations\[0\].share: must be a number"),
        ("l", [("a", True)], ValueError, r"^allocations\[0\].share: must be a number"),
        ("l", [("", 0.5)], ValueError, r"^allocations\[0\]: name must be a non-empty str"),
        ("l", [(1, 0.5)], ValueError, r"^allocations\[0\]: name must be a non-empty str"),
        ("l", [("a", 0.5, 1)], ValueError, r"^allocations\[0\]: expected a \(name, share\)"),
        ("l", ["ab"], ValueError, r"^allocations\[0\]: expected a \(name, share\)"),
    ],
)
def test_layer_validation(
    core_module: ModuleType, name: Any, allocations: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        core_module.Layer(name, allocations)


def test_layer_value_semantics(core_module: ModuleType) -> None:
    layer = core_module.Layer("l", [("a", 0.25), ("b", 0.5)])
    assert repr(layer) == "Layer('l', [('a', 0.25), ('b', 0.5)])"
    assert eval(repr(layer), {"Layer": core_module.Layer}) == layer
    assert layer != core_module.Layer("m", [("a", 0.25), ("b", 0.5)])
    assert hash(layer) == hash(core_module.Layer("l", [["a", 0.25], ["b", 0.5]]))
    assert pickle.loads(pickle.dumps(layer)) == layer
    with pytest.raises(TypeError, match="unit: expected str"):
        layer.experiment_for(1)


# --- the two twins side by side ---


@pytest.mark.c_extension
@FAST
@given(salt=TEXT, units=st.lists(TEXT, max_size=40))
def test_twins_agree_on_batches(
    compiled_core: ModuleType, python_core: ModuleType, salt: str, units: list[str]
) -> None:
    table_c = compiled_core.VariantTable([3, 0, 1, 2])
    table_p = python_core.VariantTable([3, 0, 1, 2])
    for value in (units, np.array(units, dtype=str)):
        assert np.array_equal(
            compiled_core.bucket_many(salt, value), python_core.bucket_many(salt, value)
        )
        assert np.array_equal(table_c.assign_many(salt, value), table_p.assign_many(salt, value))
    assert [table_c.assign(salt, u) for u in units] == [table_p.assign(salt, u) for u in units]


ERROR_CALLS: dict[str, Any] = {
    "xxh64 str": lambda m: m.xxh64("x"),
    "xxh64 seed": lambda m: m.xxh64(b"x", -1),
    "bucket unit": lambda m: m.bucket("s", 1),
    "bucket_many unit": lambda m: m.bucket_many("s", ["a", 2]),
    "bucket_many 2-D": lambda m: m.bucket_many("s", np.zeros((1, 1))),
    "weights": lambda m: m.VariantTable([1, "2"]),
    "choose": lambda m: m.VariantTable([1]).choose(-5),
    "layer share": lambda m: m.Layer("l", [("a", 2)]),
}


@pytest.mark.c_extension
@pytest.mark.parametrize("call", ERROR_CALLS.values(), ids=ERROR_CALLS.keys())
def test_twins_raise_the_same_errors(
    compiled_core: ModuleType, python_core: ModuleType, call: Any
) -> None:
    errors = []
    for module in (compiled_core, python_core):
        with pytest.raises(Exception) as info:
            call(module)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


# --- the chooser ---


def test_chooser_exports_one_twin() -> None:
    assert core.IMPLEMENTATION in ("cython", "python")
    module = sys.modules[
        "modelgate._core" if core.IMPLEMENTATION == "cython" else "modelgate._core_py"
    ]
    for name in ("xxh64", "bucket", "bucket_many", "VariantTable", "Layer"):
        assert getattr(core, name) is getattr(module, name)
    assert core.BUCKETS == 10000
    assert sorted(core.__all__) == sorted(
        [
            "BUCKETS",
            "IMPLEMENTATION",
            "Layer",
            "Units",
            "VariantTable",
            "bucket",
            "bucket_many",
            "xxh64",
        ]
    )


def _implementation(**env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "MODELGATE_NO_EXTENSIONS"}
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", "import modelgate.core as c; print(c.IMPLEMENTATION)"],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


@pytest.mark.c_extension
def test_compiled_core_is_the_default() -> None:
    assert _implementation() == "cython"
    assert _implementation(MODELGATE_NO_EXTENSIONS="") == "cython"  # empty means unset


def test_env_switch_forces_the_twin() -> None:
    assert _implementation(MODELGATE_NO_EXTENSIONS="1") == "python"
