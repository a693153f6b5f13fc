"""Compares a primary's and a shadow's answer: a verdict, the differing JSON pointers (typed)
and numeric statistics. Pure functions of the two answers and a CompareSpec; no I/O.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol

import orjson

from modelgate.config import CompareSpec
from modelgate.jsonpointer import ABSENT, format_pointer, parse, resolve

__all__ = [
    "MAX_DIFFERENCES",
    "Answer",
    "AnswerLike",
    "Comparison",
    "DiffKind",
    "Difference",
    "Verdict",
    "compare",
]

# A Comparison lists at most this many differences; `n_diff` counts them all.
MAX_DIFFERENCES: Final = 32


class Verdict(enum.StrEnum):
    """The outcome of one comparison. The order is the diff log's verdict code (0..6)."""

    EQUAL = "equal"
    WITHIN_TOLERANCE = "within_tolerance"
    DIFFERS = "differs"
    NOT_JSON = "not_json"
    SHADOW_ERROR = "shadow_error"
    SHADOW_TIMEOUT = "shadow_timeout"
    PRIMARY_ERROR = "primary_error"


class DiffKind(enum.StrEnum):
    VALUE_CHANGED = "value_changed"
    MISSING = "missing"  # in the primary's answer, not in the shadow's
    EXTRA = "extra"  # only in the shadow's answer
    TYPE_CHANGED = "type_changed"
    LENGTH_CHANGED = "length_changed"  # values are the two lengths
    STATUS_CHANGED = "status_changed"  # pointer "", values are the two HTTP statuses


class AnswerLike(Protocol):
    """What compare reads of an answer (the gateway's own answer type fits it as is)."""

    @property
    def status(self) -> int: ...
    @property
    def content_type(self) -> bytes | str: ...
    @property
    def body(self) -> bytes: ...
    @property
    def latency_s(self) -> float: ...
    @property
    def error(self) -> str: ...
    @property
    def timed_out(self) -> bool: ...


@dataclass(slots=True)
class Answer:
    """One side's answer. `error` is set when there was no HTTP answer ("connect_failed",
    "reset", ...); "timeout" / "connect_timeout" mean the answer did not come in time."""

    status: int = 0
    content_type: bytes | str = b""
    body: bytes = b""
    latency_s: float = 0.0
    error: str = ""

    @property
    def timed_out(self) -> bool:
        return self.error in ("timeout", "connect_timeout")


class Difference(NamedTuple):
    """One differing place. For length_changed the values are the two lengths; for missing
    and extra the absent side is None."""

    pointer: str
    kind: DiffKind
    primary: Any
    shadow: Any


class Comparison(NamedTuple):
    """The verdict and what supports it. `max_abs_diff` is NaN when no numbers were compared
    one by one: so too for documents found identical whole (identical bytes, or identical
    canonical JSON once ignored top-level keys are dropped), which are not walked.
    A NamedTuple: immutable and ~3x cheaper to build than a frozen dataclass."""

    verdict: Verdict
    differences: tuple[Difference, ...] = ()
    n_diff: int = 0
    max_abs_diff: float = math.nan
    numbers_compared: int = 0
    vectors_compared: int = 0  # probability vectors (lists of numbers with a float)
    argmax_disagreements: int = 0  # of those, how many changed their argmax
    ranked_compared: int = 0  # `ranked` lists compared by top-k overlap
    min_topk_overlap: float = math.nan  # the lowest overlap among them
    detail: str = ""


# Answers without a body comparison share these: compare's common cases allocate nothing.
_PLAIN: Final = {verdict: Comparison(verdict) for verdict in Verdict}

_MISSING: Final = ABSENT
_CONTAINERS: Final = frozenset({dict, list})
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})
_IGNORE, _RANKED, _ARGMAX = 1, 2, 3


# A path is a linked list (parent, token) built as the walk descends; the pointer string is
# made only for the few differences listed, never for the nodes that agree.
_Path = tuple[Any, str | int] | None


class _Node:
    """A trie of pointer tokens: what `ignore`, `ranked` and `argmax` say about a subtree."""

    __slots__ = ("children", "mode")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.mode = 0


class _Compiled:
    __slots__ = ("fields", "root", "top_ignores", "abs", "rel", "topk", "min_overlap")

    def __init__(self, spec: CompareSpec) -> None:
        root = _Node()
        # Later modes win on the same pointer; ignore is applied last so it always wins.
        for mode, pointers in ((_RANKED, spec.ranked), (_ARGMAX, spec.argmax)):
            for pointer in pointers:
                self._insert(root, pointer, mode)
        for pointer in spec.ignore:
            self._insert(root, pointer, _IGNORE)
        self.root: _Node | None = root if root.children or root.mode else None
        self.fields: list[tuple[tuple[str, ...], _Path, _Node | None]] | None = None
        if spec.fields is not None:
            self.fields = []
            for pointer in spec.fields:
                tokens = parse(pointer)
                node, ignored = self.root, False
                path: _Path = None
                for token in tokens:
                    path = (path, token)
                    node = node.children.get(token) if node is not None else None
                    ignored = ignored or (node is not None and node.mode == _IGNORE)
                if not ignored:
                    self.fields.append((tokens, path, node))
        # Set when the whole-document shortcut applies: no `fields`, every ignore top-level.
        self.top_ignores: frozenset[str] | None = None
        ignores = [parse(pointer) for pointer in spec.ignore]
        if spec.fields is None and all(len(t) == 1 for t in ignores):
            self.top_ignores = frozenset(t[0] for t in ignores)
        self.abs = spec.abs
        self.rel = spec.rel
        self.topk = spec.topk
        self.min_overlap = spec.min_overlap

    @staticmethod
    def _insert(root: _Node, pointer: str, mode: int) -> None:
        node = root
        for token in parse(pointer):
            node = node.children.setdefault(token, _Node())
        node.mode = mode


# CompareSpec is frozen but unhashable (lists): cache by id, holding the spec so its id stays
# taken. Configs hold a handful of specs; the bound only guards against a leak.
_compiled_cache: dict[int, tuple[CompareSpec, _Compiled]] = {}


def _compile(spec: CompareSpec) -> _Compiled:
    hit = _compiled_cache.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    if len(_compiled_cache) >= 256:
        _compiled_cache.clear()
    compiled = _Compiled(spec)
    _compiled_cache[id(spec)] = (spec, compiled)
    return compiled


_json_types: dict[bytes | str, bool] = {}


def _claims_json(content_type: bytes | str, body: bytes) -> bool:
    if not content_type:
        return body.lstrip()[:1] in (b"{", b"[")  # none at all: sniff, as clients do
    claims = _json_types.get(content_type)
    if claims is None:  # a server sends one or two content types: remember them (bounded)
        if len(_json_types) >= 256:
            _json_types.clear()
        lowered = content_type.lower()
        claims = "json" in lowered if isinstance(lowered, str) else b"json" in lowered
        _json_types[content_type] = claims
    return claims


def compare(primary: AnswerLike, shadow: AnswerLike | None, spec: CompareSpec) -> Comparison:
    """The verdict on a pair. Precedence: primary_error (no reference to compare against, so
    the shadow is not blamed), shadow_timeout, shadow_error, then status, then bodies."""
    # An answer is an error when there was no HTTP answer, or a 5xx (or a nonsense status).
    if primary.error or not 100 <= primary.status < 500:
        return _PLAIN[Verdict.PRIMARY_ERROR]
    if shadow is None or shadow.timed_out:
        return _PLAIN[Verdict.SHADOW_TIMEOUT]
    if shadow.error or not 100 <= shadow.status < 500:
        return _PLAIN[Verdict.SHADOW_ERROR]
    if primary.status != shadow.status:
        diff = Difference("", DiffKind.STATUS_CHANGED, primary.status, shadow.status)
        return Comparison(Verdict.DIFFERS, (diff,), 1, detail="status differs")
    p_body, s_body = primary.body, shadow.body
    # The common case for an agreeing shadow: identical bytes need no parsing.
    if p_body == s_body and primary.content_type == shadow.content_type:
        return _PLAIN[Verdict.EQUAL]
    p_json = _claims_json(primary.content_type, p_body)
    s_json = _claims_json(shadow.content_type, s_body)
    if not p_json and not s_json:
        if p_body == s_body:
            return _PLAIN[Verdict.EQUAL]
        diff = Difference("", DiffKind.VALUE_CHANGED, len(p_body), len(s_body))
        return Comparison(Verdict.DIFFERS, (diff,), 1, detail="bodies differ (not JSON)")
    if p_json != s_json:
        return Comparison(Verdict.NOT_JSON, detail="only one side's content type is JSON")
    try:
        p_doc = orjson.loads(p_body)
    except orjson.JSONDecodeError:
        p_doc = _MISSING
    try:
        s_doc = orjson.loads(s_body)
    except orjson.JSONDecodeError:
        s_doc = _MISSING
    if p_doc is _MISSING or s_doc is _MISSING:
        which = "neither body" if p_doc is s_doc else "primary" if p_doc is _MISSING else "shadow"
        return Comparison(Verdict.NOT_JSON, detail=f"{which} does not parse as JSON")
    return compare_documents(p_doc, s_doc, spec)


def compare_documents(primary: Any, shadow: Any, spec: CompareSpec) -> Comparison:
    """Compares two parsed JSON documents (what compare does once both bodies parse)."""
    compiled = _compile(spec)
    top = compiled.top_ignores
    if top is not None:
        # The agreeing shadow whose answer differs only in ignored top-level keys (model
        # name, request id) is the common case: sorted canonical JSON, equal as bytes, is the
        # same document (true != 1, 1.0 != 1 here; any doubt falls through to the walk).
        same = _canonical(primary, top)
        if same is not None and same == _canonical(shadow, top):
            return _PLAIN[Verdict.EQUAL]
    walk = _Walk(compiled)
    walk.run(primary, shadow)
    return walk.result()


def _canonical(doc: Any, drop: frozenset[str]) -> bytes | None:
    if drop and type(doc) is dict:
        doc = {key: value for key, value in doc.items() if key not in drop}
    try:
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # deeper than orjson writes (254 levels): walk instead
        return None


def _pointer_of(path: _Path) -> str:
    tokens: list[str | int] = []
    while path is not None:
        path, token = path
        tokens.append(token)
    tokens.reverse()
    return format_pointer(tokens)


def _is_vector(values: list[Any]) -> bool:
    """A probability vector: numbers only, at least one float (a list of ints is labels)."""
    has_float = False
    for v in values:
        t = type(v)
        if t is float:
            has_float = True
        elif t is not int:
            return False
    return has_float


def _argmax(values: list[Any]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _hashable(value: Any) -> Any:
    """A set member for top-k overlap: objects and lists by their canonical JSON."""
    if isinstance(value, dict | list):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    return value


class _Walk:
    """One comparison's state. The walk is iterative (an explicit stack), so document depth
    costs no Python recursion; orjson already refuses documents nested deeper than 1024."""

    def __init__(self, compiled: _Compiled) -> None:
        self.c = compiled
        self.diffs: list[Difference] = []
        self.n_diff = 0
        self.within = False
        self.max_diff = 0.0
        self.numbers = 0
        self.vectors = 0
        self.argmax_dis = 0
        self.ranked = 0
        self.min_overlap = math.inf

    def result(self) -> Comparison:
        if self.n_diff:
            verdict = Verdict.DIFFERS
        elif self.within:
            verdict = Verdict.WITHIN_TOLERANCE
        else:
            verdict = Verdict.EQUAL
        return Comparison._make(  # _make: a third of the cost of the keyword constructor
            (
                verdict,
                tuple(self.diffs),
                self.n_diff,
                self.max_diff if self.numbers else math.nan,
                self.numbers,
                self.vectors,
                self.argmax_dis,
                self.ranked,
                self.min_overlap if self.ranked else math.nan,
                "",
            )
        )

    def add(self, path: _Path, kind: DiffKind, a: Any, b: Any) -> None:
        self.n_diff += 1
        if len(self.diffs) < MAX_DIFFERENCES:
            self.diffs.append(Difference(_pointer_of(path), kind, a, b))

    def run(self, a: Any, b: Any) -> None:
        c = self.c
        if c.fields is None:
            self.walk(a, b, None, c.root)
            return
        for tokens, path, node in c.fields:
            if len(tokens) == 1 and type(a) is dict and type(b) is dict:
                va, vb = a.get(tokens[0], _MISSING), b.get(tokens[0], _MISSING)
            else:
                va, vb = resolve(a, tokens), resolve(b, tokens)
            if va is _MISSING:
                if vb is not _MISSING:
                    self.add(path, DiffKind.EXTRA, None, vb)
            elif vb is _MISSING:
                self.add(path, DiffKind.MISSING, va, None)
            elif node is None and type(va) not in _CONTAINERS and type(vb) not in _CONTAINERS:
                self.leaf(va, vb, path)
            else:
                self.walk(va, vb, path, node)

    def walk(self, a: Any, b: Any, path: _Path, node: _Node | None) -> None:
        stack: list[tuple[Any, Any, _Path, _Node | None]] = [(a, b, path, node)]
        pop, push = stack.pop, stack.append
        while stack:
            a, b, path, node = pop()
            mode = node.mode if node is not None else 0
            if mode == _IGNORE:
                continue
            ta, tb = type(a), type(b)
            if ta is dict:
                if tb is not dict:
                    self.add(path, DiffKind.TYPE_CHANGED, a, b)
                    continue
                children = node.children if node is not None else None
                for key, va in a.items():
                    child = children.get(key) if children else None
                    if child is not None and child.mode == _IGNORE:
                        continue
                    vb = b.get(key, _MISSING)
                    tva = type(va)
                    # Leaves of one type are most of a model's answer: compared here, inline,
                    # rather than pushed and popped.
                    if tva is type(vb) and tva not in _CONTAINERS:
                        if va == vb:
                            if tva is float:
                                self.numbers += 1
                        elif tva is float:
                            self.number(va, vb, (path, key))
                        else:
                            self.add((path, key), DiffKind.VALUE_CHANGED, va, vb)
                    elif vb is _MISSING:
                        self.add((path, key), DiffKind.MISSING, va, None)
                    elif tva is list and type(vb) is list:
                        self.pair_list(va, vb, (path, key), child, push)
                    else:
                        push((va, vb, (path, key), child))
                if a.keys() != b.keys():
                    for key, vb in b.items():
                        child = children.get(key) if children else None
                        if key not in a and not (child is not None and child.mode == _IGNORE):
                            self.add((path, key), DiffKind.EXTRA, None, vb)
            elif ta is list:
                if tb is list:
                    self.pair_list(a, b, path, node, push)
                else:
                    self.add(path, DiffKind.TYPE_CHANGED, a, b)
            elif tb in _CONTAINERS:
                self.add(path, DiffKind.TYPE_CHANGED, a, b)
            else:
                self.leaf(a, b, path)

    def pair_list(
        self,
        a: list[Any],
        b: list[Any],
        path: _Path,
        node: _Node | None,
        push: Callable[[tuple[Any, Any, _Path, _Node | None]], None],
    ) -> None:
        mode = node.mode if node is not None else 0
        if mode == _RANKED and self.ranked_list(a, b, path):
            return
        children = node.children if node is not None else None
        # The == shortcut is for flat lists of one kind (== recurses in C on nested lists,
        # and says 1 == True); anything else is walked element by element.
        kinds = {type(v) for v in a}
        flat = len(kinds) == 1 and kinds <= _SCALARS and kinds == {type(v) for v in b}
        if flat and not children and a == b:
            if kinds == {float}:  # an equal probability vector: its argmax agrees
                self.vectors += 1
                self.numbers += len(a)
            return
        if a and b and _is_vector(a) and _is_vector(b):
            self.vector(a, b, path, mode == _ARGMAX)
            return
        if len(a) != len(b):
            self.add(path, DiffKind.LENGTH_CHANGED, len(a), len(b))
        for i in range(min(len(a), len(b)) - 1, -1, -1):
            child = children.get(str(i)) if children else None
            push((a[i], b[i], (path, i), child))

    def leaf(self, a: Any, b: Any, path: _Path) -> None:
        ta, tb = type(a), type(b)
        if ta is tb:
            if ta is float:
                self.number(a, b, path)
            elif a != b:  # str, int (labels and ids compare exactly), bool, None
                self.add(path, DiffKind.VALUE_CHANGED, a, b)
        elif (ta is float and tb is int) or (ta is int and tb is float):
            self.number(a, b, path)
        else:
            self.add(path, DiffKind.TYPE_CHANGED, a, b)

    def number(self, a: float, b: float, path: _Path) -> None:
        """Within tolerance follows math.isclose: |a - b| <= max(rel * max(|a|, |b|), abs)."""
        self.numbers += 1
        if a == b:
            return
        d = abs(a - b)
        if d > self.max_diff or d != d:
            self.max_diff = d
        c = self.c
        if d <= c.abs or d <= c.rel * max(abs(a), abs(b)):
            self.within = True
        else:
            self.add(path, DiffKind.VALUE_CHANGED, a, b)

    def vector(self, a: list[Any], b: list[Any], path: _Path, by_argmax: bool) -> None:
        self.vectors += 1
        if len(a) != len(b):
            self.argmax_dis += 1
            self.add(path, DiffKind.LENGTH_CHANGED, len(a), len(b))
            return
        if a == b:  # flat lists of numbers: == is safe and exact (1 == 1.0 as numbers are)
            self.numbers += len(a)
            return
        same_argmax = _argmax(a) == _argmax(b)
        if not same_argmax:
            self.argmax_dis += 1
        if by_argmax:
            # Values may move freely; only the predicted class counts.
            self.numbers += len(a)
            self.max_diff = max(self.max_diff, max(abs(x - y) for x, y in zip(a, b, strict=True)))
            if same_argmax:
                self.within = True
            else:
                self.add(path, DiffKind.VALUE_CHANGED, a, b)
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            self.number(x, y, (path, i))

    def ranked_list(self, a: list[Any], b: list[Any], path: _Path) -> bool:
        """Top-k overlap; False when members nest too deep to compare whole (== recurses in C,
        orjson writes 254 levels): the caller then walks the lists element by element."""
        try:
            if a == b:
                overlap = 1.0
            else:
                k = self.c.topk
                top_a, top_b = a[:k], b[:k]
                members_a = {_hashable(v) for v in top_a}
                members_b = {_hashable(v) for v in top_b}
                size = max(len(top_a), len(top_b))
                overlap = len(members_a & members_b) / size if size else 1.0
                if overlap >= self.c.min_overlap:
                    self.within = True
                else:
                    self.add(path, DiffKind.VALUE_CHANGED, top_a, top_b)
        except (RecursionError, orjson.JSONEncodeError):
            return False
        self.ranked += 1
        self.min_overlap = min(self.min_overlap, overlap)
        return True
