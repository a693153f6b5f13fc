# cython: language_level=3
"""Compiled twin of modelgate._core_py: XXH64 written from the spec, buckets, variant tables.

Behaviour, messages and types follow the pure-Python twin exactly; batches run without the GIL.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from cpython.sequence cimport PySequence_Fast, PySequence_Fast_GET_SIZE, PySequence_Fast_ITEMS
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

import math
import numbers
import operator
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["BUCKETS", "Layer", "VariantTable", "bucket", "bucket_many", "xxh64"]

BUCKETS = 10000

cdef enum:
    _BUCKETS = 10000
    # Keys up to this many UTF-8 bytes are built on the stack in the single-call paths.
    _STACK_KEY = 256
    # A batch of str is packed and hashed in chunks of at most this many keys and bytes.
    _CHUNK_KEYS = 4096
    _CHUNK_BYTES = 1 << 17
    _PREFETCH_AHEAD = 16

cdef double _SHARE_SLACK = 1e-9

cdef extern from *:
    """
    /* The XXH64 primes as C constants (Cython would make 64-bit literals Python ints). */
    #define MG_P1 0x9E3779B185EBCA87ULL
    #define MG_P2 0xC2B2AE3D27D4EB4FULL
    #define MG_P3 0x165667B19E3779F9ULL
    #define MG_P4 0x85EBCA77C2B2AE63ULL
    #define MG_P5 0x27D4EB2F165667C5ULL
    #if defined(__GNUC__) || defined(__clang__)
    #define MG_PREFETCH(p) __builtin_prefetch(p)
    #else
    #define MG_PREFETCH(p) ((void)0)
    #endif
    /* Only valid once PyUnicode_IS_COMPACT_ASCII(o) holds: the bytes follow the header
       (a str subclass instance is not compact: its bytes live in a separate block). */
    #define MG_ASCII_DATA(o) ((const void *)(((PyASCIIObject *)(o)) + 1))
    #if PY_VERSION_HEX < 0x030C0000
    #define MG_UNICODE_READY(o) PyUnicode_READY(o)
    #else
    #define MG_UNICODE_READY(o) 0
    #endif
    """
    const uint64_t P1 "MG_P1"
    const uint64_t P2 "MG_P2"
    const uint64_t P3 "MG_P3"
    const uint64_t P4 "MG_P4"
    const uint64_t P5 "MG_P5"
    # Strings made by the legacy (pre-3.12) C API may not be "ready" (no compact data yet).
    int _unicode_ready "MG_UNICODE_READY" (PyObject *o) except -1
    void _prefetch "MG_PREFETCH" (const void *p) noexcept nogil
    const void *_ascii_data "MG_ASCII_DATA" (PyObject *o)

# The str layout macros, taking borrowed pointers so the batch loop does no refcounting.
cdef extern from "Python.h":
    bint _is_str "PyUnicode_Check" (PyObject *o)
    bint _is_ascii "PyUnicode_IS_ASCII" (PyObject *o)
    bint _is_compact_ascii "PyUnicode_IS_COMPACT_ASCII" (PyObject *o)
    int _str_kind "PyUnicode_KIND" (PyObject *o)
    void *_str_data "PyUnicode_DATA" (PyObject *o)
    Py_ssize_t _str_len "PyUnicode_GET_LENGTH" (PyObject *o)


# --- XXH64 (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md) ---

cdef inline uint64_t _rotl(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t _read64(const uint8_t *p) noexcept nogil:
    # Little-endian on every host; compilers fuse this into one load (plus bswap on BE).
    return (<uint64_t>p[0] | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16)
            | (<uint64_t>p[3] << 24) | (<uint64_t>p[4] << 32) | (<uint64_t>p[5] << 40)
            | (<uint64_t>p[6] << 48) | (<uint64_t>p[7] << 56))


cdef inline uint32_t _read32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))


cdef inline uint64_t _round(uint64_t acc, uint64_t lane) noexcept nogil:
    acc += lane * P2
    acc = _rotl(acc, 31)
    return acc * P1


cdef inline uint64_t _merge(uint64_t acc, uint64_t v) noexcept nogil:
    acc ^= _round(0, v)
    return acc * P1 + P4


cdef inline uint64_t _xxh64(const uint8_t *p, size_t n, uint64_t seed) noexcept nogil:
    cdef const uint8_t *end = p + n
    cdef const uint8_t *limit
    cdef uint64_t h, v1, v2, v3, v4
    if n >= 32:
        # Four accumulators over 32-byte stripes.
        limit = end - 32
        v1 = seed + P1 + P2
        v2 = seed + P2
        v3 = seed
        v4 = seed - P1
        while p <= limit:
            v1 = _round(v1, _read64(p))
            v2 = _round(v2, _read64(p + 8))
            v3 = _round(v3, _read64(p + 16))
            v4 = _round(v4, _read64(p + 24))
            p += 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge(h, v1)
        h = _merge(h, v2)
        h = _merge(h, v3)
        h = _merge(h, v4)
    else:
        h = seed + P5
    h += <uint64_t>n
    # The tail: 8-byte lanes, at most one 4-byte lane, then single bytes.
    while p + 8 <= end:
        h ^= _round(0, _read64(p))
        h = _rotl(h, 27) * P1 + P4
        p += 8
    if p + 4 <= end:
        h ^= <uint64_t>_read32(p) * P1
        h = _rotl(h, 23) * P2 + P3
        p += 4
    while p < end:
        h ^= <uint64_t>p[0] * P5
        h = _rotl(h, 11) * P1
        p += 1
    # Avalanche.
    h ^= h >> 33
    h *= P2
    h ^= h >> 29
    h *= P3
    h ^= h >> 32
    return h


# --- UTF-8 ---

ctypedef fused ucs_t:
    uint8_t
    uint16_t
    uint32_t


cdef inline Py_ssize_t _utf8(const ucs_t *s, Py_ssize_t n, uint8_t *out) noexcept nogil:
    """Writes s[:n] as UTF-8; -1 for a surrogate or a code point past U+10FFFF (strict)."""
    cdef Py_ssize_t i, k = 0
    cdef uint32_t ch
    for i in range(n):
        ch = s[i]
        if ch < 0x80:
            out[k] = <uint8_t>ch
            k += 1
        elif ch < 0x800:
            out[k] = <uint8_t>(0xC0 | (ch >> 6))
            out[k + 1] = <uint8_t>(0x80 | (ch & 0x3F))
            k += 2
        elif ch < 0x10000:
            if 0xD800 <= ch <= 0xDFFF:
                return -1
            out[k] = <uint8_t>(0xE0 | (ch >> 12))
            out[k + 1] = <uint8_t>(0x80 | ((ch >> 6) & 0x3F))
            out[k + 2] = <uint8_t>(0x80 | (ch & 0x3F))
            k += 3
        elif ch <= 0x10FFFF:
            out[k] = <uint8_t>(0xF0 | (ch >> 18))
            out[k + 1] = <uint8_t>(0x80 | ((ch >> 12) & 0x3F))
            out[k + 2] = <uint8_t>(0x80 | ((ch >> 6) & 0x3F))
            out[k + 3] = <uint8_t>(0x80 | (ch & 0x3F))
            k += 4
        else:
            return -1
    return k


cdef inline void _copy(uint8_t *dst, const uint8_t *src, Py_ssize_t n) noexcept nogil:
    """memcpy for the short strings of a batch, inlined: a libc call per key costs more.

    Up to 32 bytes it moves two possibly overlapping blocks, from the start and to the end.
    """
    cdef uint64_t a, b, c, d
    cdef uint32_t x, y
    cdef Py_ssize_t i
    if n > 32:
        memcpy(dst, src, n)
    elif n > 16:
        memcpy(&a, src, 8)
        memcpy(&b, src + 8, 8)
        memcpy(&c, src + n - 16, 8)
        memcpy(&d, src + n - 8, 8)
        memcpy(dst, &a, 8)
        memcpy(dst + 8, &b, 8)
        memcpy(dst + n - 16, &c, 8)
        memcpy(dst + n - 8, &d, 8)
    elif n >= 8:
        memcpy(&a, src, 8)
        memcpy(&b, src + n - 8, 8)
        memcpy(dst, &a, 8)
        memcpy(dst + n - 8, &b, 8)
    elif n >= 4:
        memcpy(&x, src, 4)
        memcpy(&y, src + n - 4, 4)
        memcpy(dst, &x, 4)
        memcpy(dst + n - 4, &y, 4)
    else:
        for i in range(n):
            dst[i] = src[i]


cdef inline Py_ssize_t _utf8_bound(PyObject *s) except -1:
    """An upper bound of len(s.encode()); also makes sure s is ready (compact)."""
    _unicode_ready(s)
    cdef Py_ssize_t n = _str_len(s)
    if _is_ascii(s):
        return n
    # UCS1 non-ASCII takes 2 bytes, UCS2 at most 3, UCS4 at most 4.
    return n * (_str_kind(s) + 1)


cdef inline Py_ssize_t _encode_str(PyObject *s, uint8_t *out) noexcept:
    """Writes s as UTF-8 into out (sized by _utf8_bound); -1 if strict UTF-8 cannot encode it.

    The str's own buffers are read directly: no bytes object, no cached UTF-8 copy.
    """
    cdef Py_ssize_t n = _str_len(s)
    cdef int kind
    if _is_ascii(s):
        _copy(out, <const uint8_t *>_str_data(s), n)
        return n
    kind = _str_kind(s)
    if kind == 1:
        return _utf8(<const uint8_t *>_str_data(s), n, out)
    if kind == 2:
        return _utf8(<const uint16_t *>_str_data(s), n, out)
    return _utf8(<const uint32_t *>_str_data(s), n, out)


cdef int _raise_not_str(object salt, object unit) except -1:
    bad, what = ("salt", salt) if not isinstance(salt, str) else ("unit", unit)
    raise TypeError(f"{bad}: expected str, got {type(what).__name__}")


cdef int _raise_unencodable(str salt, object unit) except -1:
    # Let Python raise its own UnicodeEncodeError (same type and message as the twin).
    (salt + ":" + unit).encode()
    raise UnicodeEncodeError("utf-8", salt + ":" + unit, 0, 1, "cannot be encoded")


cdef inline int32_t _choose(const int32_t *c, Py_ssize_t n, int32_t b) noexcept nogil:
    """The number of boundaries <= b (bisect_right); n, i.e. past the last slice, is -1."""
    cdef Py_ssize_t i, lo, hi, mid
    cdef int32_t r = 0
    if n <= 16:
        # Branch-free count: buckets are random, so a branch would mispredict half the time.
        for i in range(n):
            r += c[i] <= b
    else:
        lo = 0
        hi = n
        while lo < hi:
            mid = (lo + hi) >> 1
            if c[mid] <= b:
                lo = mid + 1
            else:
                hi = mid
        r = <int32_t>lo
    return -1 if r == n else r


cdef int32_t _bucket(object salt, object unit) except -1:
    """bucket(salt, unit) with the key built on the stack (heap only for long keys)."""
    if not _is_str(<PyObject *>salt) or not _is_str(<PyObject *>unit):
        _raise_not_str(salt, unit)
    cdef uint8_t stack[_STACK_KEY]
    cdef uint8_t *buf = stack
    cdef Py_ssize_t k, k2 = -1
    cdef Py_ssize_t need = _utf8_bound(<PyObject *>salt) + 1 + _utf8_bound(<PyObject *>unit)
    cdef uint64_t h = 0
    if need > _STACK_KEY:
        buf = <uint8_t *>malloc(need)
        if buf == NULL:
            raise MemoryError()
    k = _encode_str(<PyObject *>salt, buf)
    if k >= 0:
        buf[k] = 58  # ':'
        k2 = _encode_str(<PyObject *>unit, buf + k + 1)
    if k2 >= 0:
        h = _xxh64(buf, k + 1 + k2, 0)
    if buf != stack:
        free(buf)
    if k2 < 0:
        _raise_unencodable(<str>salt, unit)
    return <int32_t>(h % _BUCKETS)


# --- public functions ---

def xxh64(data, seed=0):
    """XXH64 of `data` as an unsigned int; `seed` must be in [0, 2**64)."""
    if not isinstance(data, bytes):
        raise TypeError(f"data: expected bytes, got {type(data).__name__}")
    if type(seed) is not int and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed: expected int, got {type(seed).__name__}")
    if not 0 <= seed < 18446744073709551616:
        raise ValueError(f"seed: must be in [0, 2**64), got {seed!r}")
    cdef uint64_t s = seed
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(data)
    cdef size_t n = <size_t>PyBytes_GET_SIZE(data)
    cdef uint64_t h
    if n < 4096:
        h = _xxh64(p, n, s)
    else:
        with nogil:
            h = _xxh64(p, n, s)
    return h


def bucket(salt, unit):
    """XXH64(utf8(salt + ":" + unit), seed=0) mod 10000: the unit's bucket in [0, 10000)."""
    return _bucket(salt, unit)


def bucket_many(salt, units):
    """`bucket(salt, u)` for every unit, as a 1-D int32 array."""
    return _many(_check_salt(salt), units, NULL, 0)


cdef str _check_salt(object salt):
    if not isinstance(salt, str):
        raise TypeError(f"salt: expected str, got {type(salt).__name__}")
    return <str>salt


# --- batches: encode once, then hash + bucket + choose in one loop without the GIL ---

cdef class _Prefix:
    """utf8(salt + ":") in C memory."""

    cdef uint8_t *data
    cdef Py_ssize_t size

    def __cinit__(self, object salt):
        cdef Py_ssize_t n = _utf8_bound(<PyObject *>salt) + 1
        self.data = <uint8_t *>malloc(n)
        if self.data == NULL:
            raise MemoryError()
        self.size = _encode_str(<PyObject *>salt, self.data)
        if self.size < 0:
            _raise_unencodable(<str>salt, "")
        self.data[self.size] = 58  # ':'
        self.size += 1

    def __dealloc__(self):
        free(self.data)


cdef object _many(str salt, object units, const int32_t *c, Py_ssize_t n):
    """Buckets (c == NULL) or slice indices under the boundaries c[:n] (-1 past the last)."""
    if isinstance(units, np.ndarray):
        if units.ndim != 1:
            raise ValueError(f"units: expected a 1-D array, got {units.ndim}-D")
        kind = units.dtype.kind
        if kind == "U":
            return _many_ucs4(salt, units, c, n)
        if kind != "O":
            raise TypeError(f"units: expected str elements, got an array of dtype {units.dtype}")
        units = units.tolist()
    elif isinstance(units, (str, bytes, bytearray)):
        raise TypeError(f"units: expected a sequence of str, got {type(units).__name__}")
    elif not isinstance(units, (list, tuple)):
        try:
            units = list(units)
        except TypeError:
            raise TypeError(
                f"units: expected a sequence of str, got {type(units).__name__}"
            ) from None
    return _many_seq(salt, units, c, n)


cdef void _hash_packed(const uint8_t *buf, const Py_ssize_t *offs, Py_ssize_t count,
                       const int32_t *c, Py_ssize_t n, int32_t *o) noexcept nogil:
    """o[i] = bucket (c == NULL) or slice index of the key buf[offs[i]:offs[i + 1]]."""
    cdef Py_ssize_t i
    cdef uint64_t h
    if c == NULL:
        for i in range(count):
            h = _xxh64(buf + offs[i], <size_t>(offs[i + 1] - offs[i]), 0)
            o[i] = <int32_t>(h % _BUCKETS)
    else:
        for i in range(count):
            h = _xxh64(buf + offs[i], <size_t>(offs[i + 1] - offs[i]), 0)
            o[i] = _choose(c, n, <int32_t>(h % _BUCKETS))


cdef object _many_seq(str salt, object units, const int32_t *c, Py_ssize_t n):
    # The list or tuple's item array is read with borrowed pointers: nothing in a packing
    # loop runs Python code, so the items cannot change while it runs.
    seq = PySequence_Fast(units, b"units: expected a sequence of str")
    cdef Py_ssize_t count = PySequence_Fast_GET_SIZE(seq)
    cdef PyObject **items = PySequence_Fast_ITEMS(seq)
    cdef _Prefix prefix = _Prefix(salt)
    cdef Py_ssize_t plen = prefix.size
    # A local copy: the byte stores below could alias a field read through `prefix`.
    cdef const uint8_t *pre = prefix.data
    out = np.empty(count, dtype=np.int32)
    if count == 0:
        return out
    cdef int32_t[::1] out_view = out
    cdef int32_t *o = &out_view[0]
    cdef Py_ssize_t i, k, start = 0, used, need, cap = _CHUNK_BYTES
    cdef PyObject *item
    cdef bint ascii
    cdef Py_ssize_t *offs = <Py_ssize_t *>malloc((_CHUNK_KEYS + 1) * sizeof(Py_ssize_t))
    cdef uint8_t *buf = <uint8_t *>malloc(cap)
    cdef uint8_t *grown
    try:
        if offs == NULL or buf == NULL:
            raise MemoryError()
        # In chunks: the packed keys stay in cache (and no fresh pages are faulted in), and
        # the GIL is never held for long, so other threads (an event loop) keep running.
        while start < count:
            used = 0
            i = start
            while i < count and i - start < _CHUNK_KEYS:
                # Pack utf8(salt + ":" + unit), holding the GIL. Reading a million str objects
                # is bound by memory latency, so fetch the ones a few items ahead early.
                if i + _PREFETCH_AHEAD < count:
                    _prefetch(items[i + _PREFETCH_AHEAD])
                item = items[i]
                if not _is_str(item):
                    raise TypeError(
                        f"units[{i}]: expected str, got {type(<object>item).__name__}"
                    )
                # ASCII (the usual id) is its own UTF-8: no bound, no encoding, one copy.
                ascii = _is_compact_ascii(item)
                need = used + plen + (_str_len(item) if ascii else _utf8_bound(item))
                if need > cap:
                    if i > start:
                        break  # hash what is packed, then start over in an empty buffer
                    cap = need
                    grown = <uint8_t *>realloc(buf, cap)
                    if grown == NULL:
                        raise MemoryError()
                    buf = grown
                _copy(buf + used, pre, plen)
                if ascii:
                    k = _str_len(item)
                    _copy(buf + used + plen, <const uint8_t *>_ascii_data(item), k)
                else:
                    k = _encode_str(item, buf + used + plen)
                    if k < 0:
                        _raise_unencodable(salt, <object>item)
                offs[i - start] = used
                used += plen + k
                i += 1
            offs[i - start] = used
            with nogil:
                _hash_packed(buf, offs, i - start, c, n, o + start)
            start = i
            # Another thread may have run meanwhile: a list that was resized has a new item
            # array (the old one may be freed), so look it up again.
            if PySequence_Fast_GET_SIZE(seq) != count:
                raise RuntimeError("units: the list changed size during the call")
            items = PySequence_Fast_ITEMS(seq)
    finally:
        free(offs)
        free(buf)
    return out


cdef object _many_ucs4(str salt, object units, const int32_t *c, Py_ssize_t n):
    # A numpy '<U..' array is fixed-width UCS4, NUL-padded: it is encoded to UTF-8 without a
    # single Python object per element, and without the GIL.
    arr = units
    if arr.dtype.itemsize == 0:
        arr = arr.astype("<U1")
    if not arr.dtype.isnative or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    cdef Py_ssize_t count = arr.shape[0]
    cdef Py_ssize_t width = arr.dtype.itemsize // 4
    cdef _Prefix prefix = _Prefix(salt)
    cdef Py_ssize_t plen = prefix.size
    cdef const uint8_t *pre = prefix.data
    out = np.empty(count, dtype=np.int32)
    if count == 0:
        return out
    cdef int32_t[::1] out_view = out
    cdef int32_t *o = &out_view[0]
    cdef const uint32_t[::1] chars = arr.view(np.uint32)
    cdef const uint32_t *base = &chars[0]
    cdef const uint32_t *row
    cdef Py_ssize_t i, j, k, length, start = 0, used, bad = -1
    cdef Py_ssize_t cap = max(<Py_ssize_t>_CHUNK_BYTES, plen + 4 * width)
    cdef uint32_t wide
    cdef uint8_t *key
    cdef Py_ssize_t *offs = <Py_ssize_t *>malloc((_CHUNK_KEYS + 1) * sizeof(Py_ssize_t))
    cdef uint8_t *buf = <uint8_t *>malloc(cap)
    if offs == NULL or buf == NULL:
        free(offs)
        free(buf)
        raise MemoryError()
    with nogil:
        # Encoded in chunks and hashed after, as for a list: hashing a key right after its
        # byte-wise stores would stall on store-to-load forwarding.
        while start < count and bad < 0:
            used = 0
            i = start
            while i < count and i - start < _CHUNK_KEYS:
                row = base + i * width
                # numpy drops trailing NULs (interior ones stay): the length ends at the last
                # non-NUL code point.
                length = width
                while length > 0 and row[length - 1] == 0:
                    length -= 1
                if used + plen + 4 * length > cap:
                    break
                key = buf + used
                _copy(key, pre, plen)
                key += plen
                # ASCII first: a branch-free narrowing copy; anything else is encoded again.
                wide = 0
                for j in range(length):
                    wide |= row[j]
                    key[j] = <uint8_t>row[j]
                if wide < 0x80:
                    k = length
                else:
                    k = _utf8(row, length, key)
                    if k < 0:
                        bad = i
                        break
                offs[i - start] = used
                used += plen + k
                i += 1
            offs[i - start] = used
            _hash_packed(buf, offs, i - start, c, n, o + start)
            start = i
    free(offs)
    free(buf)
    if bad >= 0:
        # Raise what the twin raises: it converts the element to str, then encodes.
        _raise_unencodable(salt, arr[bad : bad + 1].tolist()[0])
    return out


# --- validation (messages identical to the twin's) ---

cdef tuple _check_weights(object weights):
    if isinstance(weights, (str, bytes, bytearray)) or not isinstance(weights, Iterable):
        raise TypeError(f"weights: expected a sequence of numbers, got {type(weights).__name__}")
    result = []
    for i, w in enumerate(weights):
        result.append(_check_number(f"weights[{i}]", w))
    if not result:
        raise ValueError("weights: must not be empty")
    return tuple(result)


cdef double _check_number(str where, object value) except? -1.0:
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where}: must be a number, got {value!r}")
    try:
        x = float(value)
    except OverflowError:
        raise ValueError(f"{where}: must be finite, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{where}: must be finite, got {value!r}")
    if x < 0:
        raise ValueError(f"{where}: must be >= 0, got {value!r}")
    return x


cdef tuple _boundaries(tuple weights):
    # Python floats, exactly as the twin computes them (and as the contract states).
    sums = []
    s = 0.0
    for w in weights:
        s += w
        sums.append(s)
    if s == 0.0:
        raise ValueError("weights: must not all be zero")
    if not math.isfinite(s):
        raise ValueError("weights: their sum overflows a double")
    return tuple([math.floor(BUCKETS * si / s + 0.5) for si in sums])


cdef int32_t *_c_bounds(tuple bounds) except NULL:
    cdef Py_ssize_t i, n = len(bounds)
    cdef int32_t *c = <int32_t *>malloc(max(n, 1) * sizeof(int32_t))
    if c == NULL:
        raise MemoryError()
    for i in range(n):
        c[i] = bounds[i]
    return c


cdef int32_t _check_bucket(object value) except -1:
    b = value if type(value) is int else operator.index(value)
    if not 0 <= b < _BUCKETS:
        raise ValueError(f"bucket: must be in [0, {_BUCKETS}), got {b!r}")
    return <int32_t>b


cdef class VariantTable:
    """Variants in order take contiguous bucket ranges [C_(i-1), C_i) sized by their weights."""

    cdef int32_t *_c
    cdef Py_ssize_t _n
    cdef readonly tuple weights
    cdef readonly tuple boundaries

    # __cinit__ runs once per object (unlike __init__): a batch running without the GIL can
    # rely on the boundary array staying put.
    def __cinit__(self, weights):
        cdef tuple checked = _check_weights(weights)
        cdef tuple bounds = _boundaries(checked)
        self._c = _c_bounds(bounds)
        self._n = len(bounds)
        self.weights = checked
        self.boundaries = bounds

    def __dealloc__(self):
        free(self._c)

    def __len__(self):
        return self._n

    def __repr__(self):
        return f"VariantTable({list(self.weights)!r})"

    def __eq__(self, other):
        if not isinstance(other, VariantTable):
            return NotImplemented
        return self.weights == (<VariantTable>other).weights

    def __hash__(self):
        return hash(self.weights)

    def __reduce__(self):
        return (VariantTable, (list(self.weights),))

    def choose(self, bucket):
        """The variant index i with C_(i-1) <= bucket < C_i (zero-weight variants never)."""
        return _choose(self._c, self._n, _check_bucket(bucket))

    def assign(self, salt, unit):
        """The variant index of `unit` under `salt`: choose(bucket(salt, unit))."""
        return _choose(self._c, self._n, _bucket(salt, unit))

    def assign_many(self, salt, units):
        """`assign(salt, u)` for every unit, as a 1-D int32 array."""
        return _many(_check_salt(salt), units, self._c, self._n)


cdef tuple _check_allocations(object layer, object allocations):
    if isinstance(allocations, (str, bytes, bytearray)) or not isinstance(
        allocations, Iterable
    ):
        raise TypeError(
            f"allocations: expected a sequence of (name, share), got {type(allocations).__name__}"
        )
    names = []
    shares = []
    for i, item in enumerate(allocations):
        where = f"allocations[{i}]"
        if (
            not isinstance(item, Sequence)
            or isinstance(item, (str, bytes))
            or len(item) != 2
        ):
            raise ValueError(f"{where}: expected a (name, share) pair, got {item!r}")
        name, share = item
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: name must be a non-empty str, got {name!r}")
        if name in names:
            raise ValueError(f"{where}: duplicate experiment name {name!r}")
        if name == layer:
            # Its salt (the name, by default) would equal the layer's: its variants would
            # split the layer's slice instead of the experiment's units.
            raise ValueError(f"{where}: an experiment cannot be named like its layer")
        x = _check_number(f"{where}.share", share)
        if x > 1.0:
            raise ValueError(f"{where}.share: must be <= 1, got {share!r}")
        names.append(name)
        shares.append(x)
    if not names:
        raise ValueError("allocations: must not be empty")
    return tuple(names), tuple(shares)


cdef tuple _layer_boundaries(tuple shares):
    bounds = []
    t = 0.0
    for x in shares:
        t += x
        bounds.append(min(BUCKETS, math.floor(BUCKETS * t + 0.5)))
    if t > 1.0 + _SHARE_SLACK:
        raise ValueError(f"allocations: shares sum to {t!r}, must be <= 1")
    return tuple(bounds)


cdef class Layer:
    """Experiments sharing one bucket space, salted by the layer name, so no unit is in two.

    Experiment j owns the buckets [E_(j-1), E_j) of bucket(layer name, unit), E_0 = 0; the
    buckets from E_m up belong to no experiment.
    """

    cdef int32_t *_c
    cdef Py_ssize_t _n
    cdef readonly object name
    cdef readonly tuple experiments
    cdef readonly tuple shares
    cdef readonly tuple boundaries

    def __cinit__(self, name, allocations):
        if not isinstance(name, str):
            raise TypeError(f"name: expected str, got {type(name).__name__}")
        if not name:
            raise ValueError("name: must not be empty")
        names, shares = _check_allocations(name, allocations)
        cdef tuple bounds = _layer_boundaries(shares)
        self._c = _c_bounds(bounds)
        self._n = len(bounds)
        self.name = name
        self.experiments = names
        self.shares = shares
        self.boundaries = bounds

    def __dealloc__(self):
        free(self._c)

    def __len__(self):
        return self._n

    def __repr__(self):
        pairs = list(zip(self.experiments, self.shares))
        return f"Layer({self.name!r}, {pairs!r})"

    def __eq__(self, other):
        if not isinstance(other, Layer):
            return NotImplemented
        cdef Layer o = <Layer>other
        return (self.name, self.experiments, self.shares) == (o.name, o.experiments, o.shares)

    def __hash__(self):
        return hash((self.name, self.experiments, self.shares))

    def __reduce__(self):
        return (Layer, (self.name, list(zip(self.experiments, self.shares))))

    def index_for(self, unit):
        """The index of the unit's experiment in this layer, or -1 for none."""
        return _choose(self._c, self._n, _bucket(self.name, unit))

    def experiment_for(self, unit):
        """The name of the unit's experiment in this layer, or None."""
        cdef int32_t i = _choose(self._c, self._n, _bucket(self.name, unit))
        return self.experiments[i] if i >= 0 else None

    def experiment_for_many(self, units):
        """`index_for(u)` for every unit, as a 1-D int32 array (-1: no experiment)."""
        return _many(<str>self.name, units, self._c, self._n)
