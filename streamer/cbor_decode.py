"""The CBOR layer of DECTRIS Stream V2: bytes -> a tree of Python values and numpy arrays.

:func:`decode_message` understands RFC 8746 typed arrays (tags 64-87, binary128 converted to
float64), multi-dimensional arrays (tags 40 and 1040), the DECTRIS compression tag 56500 (bslz4 /
lz4, decompressed, or checked and kept compressed for the workers) and the self-describe tag
55799; :func:`rational_seconds` turns ``[numerator, denominator]`` times into seconds. The module
doc of streamer.stream_v2 says what the messages mean. Raises only
:class:`beamkin.errors.StreamDecodeError`.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Mapping

import cbor2
import numpy as np

from beamkin import compression
from beamkin.cbor_tags import (ARRAY_TAGS, BINARY128_TAGS, TAG_DECTRIS_COMPRESSION, TAG_HOMOGENEOUS_ARRAY,
                               TAG_MULTI_DIM_COLUMN_MAJOR, TAG_MULTI_DIM_ROW_MAJOR, TAG_SELF_DESCRIBE, TYPED_ARRAY_DTYPES)
from beamkin.errors import StreamDecodeError
from streamer.header_fields import MAX_TIME_S, short_text

def binary128_to_float64(raw: bytes, byteorder: str) -> np.ndarray:
    """IEEE 754 binary128 values -> float64 (rounded toward zero, overflow to inf, tiny to 0).

    value = (-1)^s * 2^(e - 16383) * (1 + m / 2^112); subnormals have e = 0 and no implicit 1.
    """
    words = np.frombuffer(raw, dtype=f"{byteorder}u8").reshape(-1, 2)
    high, low = (words[:, 0], words[:, 1]) if byteorder == ">" else (words[:, 1], words[:, 0])
    high = high.astype(np.uint64)
    sign = np.where((high >> np.uint64(63)) != 0, -1.0, 1.0)
    exponent = ((high >> np.uint64(48)) & np.uint64(0x7FFF)).astype(np.int64)
    mantissa_high = (high & np.uint64(0xFFFFFFFFFFFF)).astype(np.float64)  # top 48 of 112 bits
    mantissa_low = low.astype(np.uint64) >> np.uint64(12)  # next 52 bits
    fraction = (mantissa_high + np.ldexp(mantissa_low.astype(np.float64), -52)) * 2.0**-48
    is_normal = exponent != 0
    significand = np.where(is_normal, 1.0 + fraction, fraction)
    with np.errstate(over="ignore", invalid="ignore"):
        value = sign * np.ldexp(significand, np.clip(np.where(is_normal, exponent, 1) - 16383, -1100, 1100).astype(np.int32))
    special = exponent == 0x7FFF
    value = np.where(special & (fraction == 0), sign * np.inf, value)
    value = np.where(special & (fraction != 0), np.nan, value)
    return value


class UnusableArray:
    """What the tag hook gives for an array it cannot decode (a typed array that is not a whole
    number of elements, a tag 40 whose dimensions do not match its data, a compressed buffer that
    is corrupt, too large or of an unknown algorithm), in place of failing the whole message: an
    optional start field holding one is dropped with a warning and the series goes on; an image
    holding one is dropped and counted under ``counter``."""

    __slots__ = ("reason", "counter")

    def __init__(self, reason: str, counter: str = "malformed") -> None:
        self.reason, self.counter = reason, counter

    def __repr__(self) -> str:
        return f"<unusable array: {self.reason}>"


class _TagDecoder:
    """cbor2 tag hook (both the cbor2 5 ``(decoder, tag)`` and 6 ``(tag, immutable)`` call forms)."""

    def __init__(self, max_bytes: int, defer_compression: bool = False) -> None:
        self.max_bytes = max_bytes
        self.defer_compression = defer_compression
        self.unknown_tags: Counter | None = None  # created on the first unknown tag

    def __call__(self, first: Any, second: Any) -> Any:
        tag = first if isinstance(first, cbor2.CBORTag) else second
        if tag.tag in ARRAY_TAGS:  # an array inside this one was already unusable: so is this one
            if isinstance(tag.value, UnusableArray):
                return tag.value
            if isinstance(tag.value, (list, tuple)) and tag.value and isinstance(tag.value[-1], UnusableArray):
                return tag.value[-1]
        try:
            return self._decode(tag)
        except StreamDecodeError as exc:
            return UnusableArray(str(exc), exc.counter)

    def _decode(self, tag: cbor2.CBORTag) -> Any:
        number, value = tag.tag, tag.value
        if number in TYPED_ARRAY_DTYPES:
            return self._typed_array(number, value)
        if number in BINARY128_TAGS:
            raw = self._byte_string(number, value, 16)
            return binary128_to_float64(raw, BINARY128_TAGS[number])
        if number in (TAG_MULTI_DIM_ROW_MAJOR, TAG_MULTI_DIM_COLUMN_MAJOR):
            return self._multi_dim(number, value)
        if number == TAG_DECTRIS_COMPRESSION:
            return self._decompress(value)
        if number == TAG_HOMOGENEOUS_ARRAY:
            if not isinstance(value, (list, tuple)):
                raise StreamDecodeError("tag 41 (homogeneous array) does not hold an array")
            return list(value)
        if number == TAG_SELF_DESCRIBE:
            return value
        if self.unknown_tags is None:
            self.unknown_tags = Counter()
        self.unknown_tags[number] += 1
        return tag

    @staticmethod
    def _byte_string(number: int, value: Any, itemsize: int) -> bytes:
        if isinstance(value, compression.CompressedArray):
            value = value.to_bytes()
        if not isinstance(value, (bytes, bytearray)):
            raise StreamDecodeError(f"typed array tag {number} holds {type(value).__name__}, not a byte string")
        if len(value) % itemsize:
            raise StreamDecodeError(
                f"typed array tag {number} holds {len(value)} bytes, not a multiple of its element size {itemsize}",
                "shape_mismatch",
            )
        return value

    def _typed_array(self, number: int, value: Any) -> np.ndarray:
        dtype = TYPED_ARRAY_DTYPES[number]
        if isinstance(value, compression.CompressedArray):
            return value.with_dtype(dtype)
        array = np.frombuffer(self._byte_string(number, value, dtype.itemsize), dtype=dtype)
        if dtype.byteorder == ">" and dtype.itemsize > 1:
            array = array.astype(dtype.newbyteorder("="))
        return array

    @staticmethod
    def _multi_dim(number: int, value: Any) -> np.ndarray:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise StreamDecodeError(f"tag {number} (multi-dimensional array) is not [dimensions, data]")
        dims, data = value
        if isinstance(data, compression.CompressedArray) and (number == TAG_MULTI_DIM_COLUMN_MAJOR or data.dtype is None):
            data = compression.materialise(data)  # column-major (rare): the streamer decompresses it
        if (
            not isinstance(dims, (list, tuple))
            or not dims
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 40 for n in dims)
        ):
            raise StreamDecodeError(f"tag {number} dimensions {dims!r:.60} are not non-negative integers")
        if isinstance(data, compression.CompressedArray):
            return data.with_shape(tuple(dims))
        if isinstance(data, np.ndarray):
            flat = data
        elif isinstance(data, (list, tuple)):
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data):
                raise StreamDecodeError(f"tag {number} plain-array data holds non-numbers")
            try:
                flat = np.asarray(data) if data else np.zeros(0)
            except (OverflowError, ValueError) as exc:
                raise StreamDecodeError(f"tag {number} plain-array data: {exc}") from exc
            if flat.dtype == object:
                raise StreamDecodeError(f"tag {number} plain-array data has integers beyond 64 bits")
        else:
            raise StreamDecodeError(f"tag {number} data is {type(data).__name__}, not a typed or plain array")
        expected = 1
        for n in dims:
            expected *= n
        if flat.size != expected:
            raise StreamDecodeError(
                f"tag {number} declares dimensions {list(dims)} ({expected} elements) but holds {flat.size}",
                "shape_mismatch",
            )
        order = "F" if number == TAG_MULTI_DIM_COLUMN_MAJOR else "C"
        return flat.reshape(tuple(dims), order=order)

    def _decompress(self, value: Any) -> bytes | compression.CompressedArray:
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise StreamDecodeError("tag 56500 (compression) is not [algorithm, elem_size, data]")
        algorithm, elem_size, data = value
        if not isinstance(algorithm, str):
            raise StreamDecodeError(f"tag 56500 algorithm is {type(algorithm).__name__}, not text")
        if not isinstance(elem_size, int) or isinstance(elem_size, bool):
            raise StreamDecodeError(f"tag 56500 element size is {type(elem_size).__name__}, not an integer")
        if not isinstance(data, (bytes, bytearray)):
            raise StreamDecodeError(f"tag 56500 data is {type(data).__name__}, not a byte string")
        if self.defer_compression:
            return compression.CompressedArray.checked(data, algorithm, elem_size, max_bytes=self.max_bytes)
        return compression.decompress(data, algorithm, elem_size, max_bytes=self.max_bytes)


def materialise_tree(value: Any, depth: int = 0) -> Any:
    """``value`` (a decoded map, list or leaf) with every :class:`~beamkin.compression.CompressedArray`
    decompressed; a corrupt one becomes an :class:`UnusableArray`. Maps and lists are copied."""
    if isinstance(value, compression.CompressedArray):
        try:
            return compression.materialise(value)
        except StreamDecodeError as exc:
            return UnusableArray(str(exc), exc.counter)
    if depth > 32:
        return value
    if isinstance(value, Mapping):
        return {key: materialise_tree(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [materialise_tree(item, depth + 1) for item in value]
    return value


def decode_message(data: bytes | memoryview, *, max_bytes: int = compression.DEFAULT_MAX_BYTES,
                   defer_compression: bool = False) -> tuple[dict, Counter]:
    """Decode one Stream V2 message into (map with arrays as numpy, unknown tag numbers -> count).

    ``defer_compression``: tag 56500 payloads are checked but left compressed
    (:class:`~beamkin.compression.CompressedArray`, with the dtype and shape of the arrays around them).
    Raises StreamDecodeError (only) when the bytes are not a CBOR map with a text ``type``.
    """
    hook = _TagDecoder(max_bytes, defer_compression)
    try:
        value = cbor2.loads(data, tag_hook=hook)
    except StreamDecodeError:
        raise
    except cbor2.CBORDecodeError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, StreamDecodeError):
            raise cause from None
        raise StreamDecodeError(f"invalid CBOR: {exc}{f' ({cause})' if cause else ''}") from exc
    except (ValueError, TypeError, OverflowError, MemoryError, RecursionError, EOFError, IndexError, KeyError) as exc:
        raise StreamDecodeError(f"invalid CBOR: {type(exc).__name__}: {exc}") from exc
    if isinstance(value, cbor2.CBORTag) and value.tag == TAG_SELF_DESCRIBE:
        value = value.value
    if not isinstance(value, dict) and not isinstance(value, Mapping):
        raise StreamDecodeError(f"message is a CBOR {type(value).__name__}, not a map")
    message_type = value.get("type")
    if not isinstance(message_type, str):
        raise StreamDecodeError("message has no text 'type' field")
    return (value if type(value) is dict else dict(value)), (hook.unknown_tags or Counter())


def rational_seconds(value: Any, name: str) -> float:
    """A Stream V2 rational ``[numerator, denominator]`` in seconds; raises StreamDecodeError."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    ):
        raise StreamDecodeError(f"{name} {value!r:.60} is not a rational [numerator, denominator]")
    numerator, denominator = value
    if denominator <= 0:
        raise StreamDecodeError(f"{name} has denominator {short_text(denominator)}", field=name, value=short_text(value))
    try:
        seconds = numerator / denominator  # int true division is correctly rounded
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or abs(seconds) > MAX_TIME_S:
        raise StreamDecodeError(f"{name} {short_text(value)} is not a time within +-{MAX_TIME_S:g} s",
                                field=name, value=short_text(value))
    return seconds
