"""DECTRIS Stream V2 decoder: CBOR messages (start / image / end) -> the normalised beamkin series.

Public specification: github.com/dectris/documentation, stream_v2/README.md and
cbor/dectris-compression-tag.md. Each ZeroMQ message is one CBOR map (normally wrapped in the
self-describe tag 55799) whose first key is ``type``. What this module understands:

* RFC 8746 typed arrays, tags 64-87: unsigned/signed integers of 8-64 bits and IEEE floats of
  16-128 bits, big and little endian (tag = 0b010_f_s_e_ll: f float, s signed, e little endian,
  ll log2 of the element size minus the float offset). Big-endian arrays are converted to native
  byte order; binary128 floats (83, 87) are converted to float64 exactly where representable.
* RFC 8746 multi-dimensional arrays: tag 40 (row-major) and tag 1040 (column-major), content a
  typed array or a plain array; ``[dims, data]`` with ``prod(dims) == len(data)``.
* Tag 56500 (DECTRIS compression): ``[algorithm, elem_size, bytes]`` with "bslz4" or "lz4" in
  HDF5 framing, equivalent to the decompressed byte string wherever a byte string may appear.
  With ``decompress="workers"`` (the streamer's default, ``[streamer] decompress``) an image is
  not decompressed here: its payload is checked (header, declared size against the typed array
  and dimensions) and forwarded unchanged as the frame's ``image_compressed`` array with its
  ``compression`` field (docs/protocol.md); the reducer worker decompresses it. Start and end
  messages are always decompressed here. With ``decompress="streamer"`` everything is.
* Tag 55799 (self-described CBOR) around the message.
* Rational times ``[numerator, denominator]`` -> seconds; image time is mid-exposure
  ``(start_time + stop_time) / 2`` relative to ``series_date``.
* Geometry from the start message: ``beam_center_x/y`` (pixels), ``pixel_size_x/y`` (metres),
  ``incident_wavelength`` (angstrom) or ``incident_energy`` (eV; lambda = 12398.42 / E), and the
  sample-detector distance (metres): ``detector_distance`` when present, else the magnitude
  ``|z|`` of ``detector_translation = [x, y, z]``. Real detectors send z negative (an EIGER2 Si
  16M: z = -0.237 m, with x and y equal to the beam centre times the pixel size), so the
  magnitude is taken; which convention was used is logged once per series and kept in
  ``user_data.stream_v2.distance_from``. The streamer passes these values on as they are (no
  sign or range check): the reducer applies stream, then TOML, then PONI geometry, and validates.
* Several channels (thresholds): the one reduced is the ``channel`` option (a name or an index
  into ``channels``), default the first. ``pixel_mask`` and ``flatfield`` of that channel become
  the start message's arrays ``pixel_mask`` (uint32, nonzero = bad) and ``flatfield`` (float32).
  These optional calibration arrays are dropped with one WARNING naming the field when they
  cannot be used (a placeholder such as the 4-byte string real detectors send with
  ``header_detail`` other than ``all``, a wrong shape, a non-numeric type); the series goes on.
* 1D (strip) detectors: ``image_size_y`` 1 or absent, images of dimensions ``[nx]`` or
  ``[1, nx]``: the series has detector shape ``(1, nx)``.
* ``gas_time_s`` from the start message's ``user_data`` (the SIMPLON ``header_appendix``).

A start message that cannot be used (no series id, no valid image size, channels not text) is
rejected loudly (:meth:`streamer.series.SeriesAssembler.reject`: one ERROR naming the field and
the value; the series' images and end are counted, not warned about one by one).

:func:`decode_message` raises only :class:`beamkin.errors.StreamDecodeError`;
:class:`StreamV2Decoder` turns messages into beamkin messages and never raises: bad input is
dropped and counted, and any other exception while handling one message is logged (series and
frame), counted as ``handler_errors`` and survived. :class:`StreamV2Source` PULLs from a
detector endpoint.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import threading
from collections import Counter
from typing import Any, Iterator, Mapping

import cbor2
import numpy as np

from beamkin.detector_socket import pull_parts
from beamkin.protocol import Message
from beamkin import compression
from beamkin.errors import StreamDecodeError
from streamer.series import (DEFAULT_FRAME_INDEX_WINDOW, SeriesAssembler, gas_time_from, make_detector, make_geometry,
                             safe_series_id, wavelength_from_energy)

log = logging.getLogger(__name__)

TAG_SELF_DESCRIBE = 55799
TAG_MULTI_DIM_ROW_MAJOR = 40
TAG_HOMOGENEOUS_ARRAY = 41
TAG_MULTI_DIM_COLUMN_MAJOR = 1040
TAG_DECTRIS_COMPRESSION = 56500
TAG_DATETIME = 0
#: Largest image side accepted (pixels); the largest detectors have about 4 400.
MAX_IMAGE_SIDE = 1 << 20
#: Where compressed images are decompressed ([streamer] decompress)
DECOMPRESS_WHERE = ("workers", "streamer")


def _typed_array_dtypes() -> dict[int, np.dtype]:
    """RFC 8746 section 2.1: tag 64 + 0b_f_s_e_ll -> numpy dtype (no entry for reserved tag 76)."""
    table: dict[int, np.dtype] = {}
    for ll in range(4):
        for endian, code in ((0, ">"), (1, "<")):
            size = 1 << ll
            table[64 + 4 * endian + ll] = np.dtype(f"{code}u{size}")  # unsigned (68: uint8 clamped)
            if not (ll == 0 and endian == 1):  # 76 would be a little-endian sint8: reserved
                table[72 + 4 * endian + ll] = np.dtype(f"{code}i{size}")
            if ll < 3:
                table[80 + 4 * endian + ll] = np.dtype(f"{code}f{2 * size}")  # binary16/32/64
    return table


TYPED_ARRAY_DTYPES = _typed_array_dtypes()
#: binary128 typed arrays: big-endian 83, little-endian 87 (converted to float64)
BINARY128_TAGS = {83: ">", 87: "<"}
#: tags whose content is (or becomes) an array: an unusable array inside them makes them unusable
ARRAY_TAGS = frozenset(TYPED_ARRAY_DTYPES) | set(BINARY128_TAGS) | {TAG_MULTI_DIM_ROW_MAJOR, TAG_MULTI_DIM_COLUMN_MAJOR,
                                                                      TAG_DECTRIS_COMPRESSION}
#: numpy dtype string ("<u2", "|u1", ...) -> its typed array tag, used by encoders (64, not 68, for uint8)
TAG_FOR_DTYPE = {TYPED_ARRAY_DTYPES[tag].str: tag for tag in sorted(TYPED_ARRAY_DTYPES, reverse=True) if tag != 68}


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
        raise StreamDecodeError(f"{name} has denominator {_short(denominator)}", field=name, value=_short(value))
    try:
        seconds = numerator / denominator  # int true division is correctly rounded
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or abs(seconds) > MAX_TIME_S:
        raise StreamDecodeError(f"{name} {_short(value)} is not a time within +-{MAX_TIME_S:g} s",
                                field=name, value=_short(value))
    return seconds


#: Largest time (s, about 31.7 years) a rational time may give: any more is corrupt input.
MAX_TIME_S = 1e9


def _short(value: Any, limit: int = 80) -> str:
    """A short rendering of a value for messages, safe for integers of any size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"<integer of {value.bit_length()} bits>"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_short(v, limit) for v in list(value)[:4])
        text = f"[{inner}{', ...' if len(value) > 4 else ''}]"
    elif isinstance(value, np.ndarray):
        text = f"<array {value.dtype} {list(value.shape)}>"
    elif isinstance(value, (bytes, bytearray)):
        text = f"<{len(value)}-byte string>"
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{_short(k, 20)}: {_short(v, 40)}" for k, v in list(value.items())[:4]) + "}"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def json_safe(value: Any, *, max_list: int = 4096, depth: int = 0) -> Any:
    """User data made JSON-safe: datetimes -> ISO text, small arrays -> lists, bytes/tags described."""
    if depth > 32:
        return "<nested too deep>"
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if -(1 << 63) <= value < (1 << 64) else _short(value)
    if isinstance(value, float):
        return value if np.isfinite(value) else str(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, np.ndarray):
        if value.size <= max_list and value.dtype.kind in "biuf":
            return json_safe(value.tolist(), max_list=max_list, depth=depth + 1)
        return f"<array {value.dtype} {list(value.shape)}>"
    if isinstance(value, np.generic):
        return json_safe(value.item(), depth=depth + 1)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else _short(k): json_safe(v, max_list=max_list, depth=depth + 1)
                for k, v in list(value.items())[:max_list]}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v, max_list=max_list, depth=depth + 1) for v in list(value)[:max_list]]
    if isinstance(value, cbor2.CBORTag):
        return {"cbor_tag": value.tag, "value": json_safe(value.value, max_list=max_list, depth=depth + 1)}
    return _short(value, 200)


def user_data_dict(value: Any) -> dict:
    """``user_data`` as a JSON-safe dict (a JSON text object is parsed; anything else is wrapped)."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            parsed = value
        value = parsed
    value = json_safe(value)
    return value if isinstance(value, dict) else {"value": value}


def finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or None (not a number, a bool, NaN, infinite, or an integer too
    large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _number(raw: Mapping, key: str, series_id: str | None = None) -> float | None:
    value = raw.get(key)
    number = finite_float(value)
    if number is None and value is not None:
        log.warning("ignoring start field %s = %s: not a finite number", key, _short(value), extra={"series_id": series_id})
    return number


def _integer(raw: Mapping, key: str, series_id: str | None = None, *, low: int = -(1 << 63), high: int = (1 << 63) - 1) -> int | None:
    value = raw.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    if value is not None:
        log.warning("ignoring start field %s = %s: not an integer in [%d, %d]", key, _short(value), low, high,
                    extra={"series_id": series_id})
    return None


class StreamV2Decoder:
    """Stateful Stream V2 -> beamkin message normaliser; :meth:`feed` never raises.

    ``channel``: the channel (threshold) to reduce, a name or an index into the start message's
    ``channels``; None takes the first. ``frame_index_window``: see
    :class:`streamer.series.SeriesAssembler`. ``decompress``: where compressed images are
    decompressed, "streamer" (here, the frame carries ``image``) or "workers" (forwarded as they
    came, the frame carries ``image_compressed`` and ``compression``; see the module doc).
    """

    def __init__(
        self,
        source: str = "dectris2:",
        channel: str | int | None = None,
        *,
        max_bytes: int = compression.DEFAULT_MAX_BYTES,
        counters: Counter | None = None,
        frame_index_window: int = DEFAULT_FRAME_INDEX_WINDOW,
        decompress: str = "streamer",
    ) -> None:
        if decompress not in DECOMPRESS_WHERE:
            raise ValueError(f"decompress must be one of {DECOMPRESS_WHERE}, got {decompress!r}")
        self.decompress = decompress
        self.counters: Counter = counters if counters is not None else Counter()
        self.series = SeriesAssembler(source, self.counters, frame_index_window=frame_index_window)
        self.channel_option = None if channel == "" else channel
        self.max_bytes = max_bytes
        self.channel: str | None = None

    def feed(self, data: bytes | memoryview) -> list[Message]:
        """Decode one ZeroMQ message; returns the beamkin messages it yields (maybe none)."""
        try:
            return self._feed(data)
        except Exception:  # a bug must cost one message, never the stage
            self.counters["handler_errors"] += 1
            log.exception("error handling a Stream V2 message", extra={"series_id": self.series.series_id})
            return []

    def _feed(self, data: bytes | memoryview) -> list[Message]:
        try:
            raw, unknown = decode_message(data, max_bytes=self.max_bytes, defer_compression=self.decompress == "workers")
        except StreamDecodeError as exc:
            self.series.count_dropped(exc.counter, "dropping undecodable Stream V2 message (%s): %s", exc.counter, exc,
                                      series_id=self.series.series_id)
            return []
        if self.decompress == "workers" and raw["type"] != "image":
            raw = materialise_tree(raw)  # only images travel compressed
        if unknown:  # kept as they are (the message goes on); counted, logged once per series
            self.series.count_dropped("unknown_tag", "Stream V2 %s message carries unknown CBOR tags %s",
                                      _short(raw["type"]), dict(unknown), series_id=self.series.series_id,
                                      amount=sum(unknown.values()))
        handler = {"start": self._start, "image": self._image, "end": self._end}.get(raw["type"])
        if handler is None:
            self.series.count_dropped("unknown_type", "dropping Stream V2 message of unknown type %s", _short(raw["type"]),
                                      series_id=self.series.series_id)
            return []
        try:
            return handler(raw)
        except StreamDecodeError as exc:
            if raw["type"] == "start":
                key = self.series_key(raw)
                return self.series.reject(key, exc.field, exc.value, str(exc))
            frame_index = raw.get("image_id") if isinstance(raw.get("image_id"), int) else None
            self.series.count_dropped(exc.counter, "dropping Stream V2 %s message (%s): %s", raw["type"], exc.counter, exc,
                                      series_id=self.series.series_id, frame_index=frame_index)
            return []

    def close(self) -> list[Message]:
        """Messages to emit when the stream stops (an aborted end for an open series)."""
        return self.series.close()

    @staticmethod
    def series_key(raw: Mapping) -> str | None:
        """The source's id of a Stream V2 message's series: series_unique_id, else str(series_id).
        (The beamkin series id is this, sanitised: :func:`streamer.series.safe_series_id`.)"""
        unique = raw.get("series_unique_id")
        if isinstance(unique, str) and unique:
            return unique
        number = raw.get("series_id")
        if isinstance(number, int) and not isinstance(number, bool):
            return str(number) if number.bit_length() <= 64 else _short(number)
        return None

    def _select_channel(self, channels: list[str]) -> str | None:
        """The configured channel; a channel the detector does not send falls back to the first
        (counted as ``unknown_channel`` and logged), so a misconfiguration never loses the series."""
        option = self.channel_option
        if option is None:
            return channels[0] if channels else None
        if isinstance(option, int) or (isinstance(option, str) and option.isdigit() and option not in channels):
            index = int(option)
            if 0 <= index < len(channels):
                return channels[index]
        elif not channels or option in channels:
            return option
        self.counters["unknown_channel"] += 1
        log.error("channel %r is not among the active channels %s; reducing %r instead", option, channels,
                  channels[0] if channels else None)
        return channels[0] if channels else None

    def _channel_array(self, raw: Mapping, name: str, shape: tuple[int, int], series_id: str) -> np.ndarray | None:
        """The selected channel's array of the optional start field ``name`` (pixel_mask,
        flatfield), or None: an array that cannot be used is dropped with one WARNING naming the
        field and what is wrong with it (counter ``unusable_calibration``)."""
        mapping = raw.get(name)
        if mapping is None:
            return None
        problem = None
        array = None
        if not isinstance(mapping, Mapping):
            problem = f"is {_short(mapping)}, not a map of channel -> array"
        else:
            array = mapping.get(self.channel)
            if array is None:
                return None
            if not isinstance(array, np.ndarray):
                problem = f"[{self.channel!r}] is {_short(array)}, not an array (a placeholder?)"
            elif array.dtype.kind not in "biuf":
                problem = f"[{self.channel!r}] has type {array.dtype}, not numeric"
            elif array.size != shape[0] * shape[1] or array.ndim not in (1, 2) or (array.ndim == 2 and array.shape != shape):
                problem = f"[{self.channel!r}] has shape {list(array.shape)}, the images {list(shape)}"
        if problem is not None:
            self.counters["unusable_calibration"] += 1
            log.warning("start field %s%s: dropped, the series goes on without it", name, problem,
                        extra={"series_id": series_id})
            return None
        return array.reshape(shape)

    @staticmethod
    def _distance(raw: Mapping, series_id: str) -> tuple[float | None, str | None]:
        """(distance in metres, the convention used): ``detector_distance``, else |z| of
        ``detector_translation`` (real detectors send z < 0); the sign is left to the reducer."""
        distance = _number(raw, "detector_distance", series_id)
        if distance is not None:
            return distance, "detector_distance"
        translation = raw.get("detector_translation")
        if isinstance(translation, np.ndarray):
            translation = translation.tolist()
        if isinstance(translation, (list, tuple)) and len(translation) == 3:
            z = finite_float(translation[2])
            if z is not None:
                return abs(z), "|detector_translation z|"
        if translation is not None:
            log.warning("ignoring start field detector_translation = %s: not [x, y, z] numbers", _short(translation),
                        extra={"series_id": series_id})
        return None, None

    def _start(self, raw: Mapping) -> list[Message]:
        series_id = self.series_key(raw)
        if series_id is None:
            raise StreamDecodeError("start message has neither series_unique_id nor series_id", field="series_unique_id",
                                    value=_short(raw.get("series_unique_id")))
        channels = raw.get("channels")
        if channels is None:
            channels = []
        if not isinstance(channels, (list, tuple)) or not all(isinstance(c, str) for c in channels):
            raise StreamDecodeError("start field channels is not an array of text", field="channels", value=_short(channels))
        self.channel = self._select_channel(list(channels))
        log_id = safe_series_id(series_id)  # logs never carry the raw id (control characters, NUL)
        sizes = {}
        for key in ("image_size_x", "image_size_y"):
            value = raw.get(key)
            if key == "image_size_y" and value is None:
                value = 1  # a strip (1D) detector
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_IMAGE_SIDE:
                raise StreamDecodeError(f"start field {key} must be an integer in [1, {MAX_IMAGE_SIDE}]",
                                        field=key, value=_short(value))
            sizes[key] = value
        nx, ny = sizes["image_size_x"], sizes["image_size_y"]
        shape = (ny, nx)
        px, py = _number(raw, "pixel_size_x", log_id), _number(raw, "pixel_size_y", log_id)
        distance, distance_from = self._distance(raw, log_id)
        if distance_from is not None:
            log.info("series %s: distance %.6g m from %s", log_id, distance, distance_from, extra={"series_id": log_id})
        else:
            log.info("series %s: no distance in the start message (neither detector_distance nor detector_translation)",
                     log_id, extra={"series_id": log_id})
        bx, by = _number(raw, "beam_center_x", log_id), _number(raw, "beam_center_y", log_id)
        wavelength = _number(raw, "incident_wavelength", log_id)
        if wavelength is None or wavelength <= 0:
            wavelength = wavelength_from_energy(_number(raw, "incident_energy", log_id))
        count_time = _number(raw, "count_time", log_id)
        frame_time = _number(raw, "frame_time", log_id)
        if frame_time is None and count_time is None:
            log.warning("start message has neither frame_time nor count_time; frame times need start/stop times",
                        extra={"series_id": log_id})
        frame_time = frame_time if frame_time is not None else (count_time or 0.0)
        count_time = count_time if count_time is not None else frame_time
        n_frames = _integer(raw, "number_of_images", log_id, low=1, high=1 << 40)
        user_data = user_data_dict(raw.get("user_data")) if raw.get("user_data") is not None else {}
        description = raw.get("detector_description")
        fields = {
            "series_id": series_id,
            "kind": "image",
            "detector": make_detector(
                description[:200] if isinstance(description, str) else "DECTRIS Stream V2 detector",
                shape,
                None if px is None or py is None else (py, px),
                saturation=_integer(raw, "saturation_value", log_id),
                bit_depth=_integer(raw, "bit_depth_image", log_id, low=1, high=64),
            ),
            "geometry": make_geometry(distance, None if bx is None or by is None else (bx, by), wavelength),
            "frame_time_s": frame_time,
            "exposure_s": count_time,
            "n_frames": n_frames,
            "gas_time_s": gas_time_from(user_data),
            "user_data": {**user_data, "stream_v2": {"series_id": json_safe(raw.get("series_id")), "channel": self.channel,
                                                     "channels": list(channels), "distance_from": distance_from}},
        }
        arrays = {}
        mask = self._channel_array(raw, "pixel_mask", shape, log_id)
        if mask is not None:
            arrays["pixel_mask"] = np.ascontiguousarray(mask, dtype=np.uint32)
        flat = self._channel_array(raw, "flatfield", shape, log_id)
        if flat is not None:
            arrays["flatfield"] = np.ascontiguousarray(flat, dtype=np.float32)
        return self.series.start(fields, arrays)

    def _image(self, raw: Mapping) -> list[Message]:
        key = self.series_key(raw)
        image_id = raw.get("image_id")
        if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id < 0:
            raise StreamDecodeError(f"image message has invalid image_id {_short(image_id)}")
        if self.series.rejected is not None and not self.series.is_open:
            return self.series.frame(key, image_id, {})  # counted as a frame of the rejected series
        data = raw.get("data")
        if not isinstance(data, Mapping) or not data:
            raise StreamDecodeError("image message has no data map")
        channel = self.channel if self.channel is not None else next(iter(data))
        image = data.get(channel)
        if image is None:
            raise StreamDecodeError(f"image {image_id} has no data for channel {_short(channel)}", "missing_channel")
        if isinstance(image, UnusableArray):
            raise StreamDecodeError(f"image {image_id} channel {_short(channel)}: {image.reason}", image.counter)
        if isinstance(image, compression.CompressedArray):
            if image.dtype is not None:
                return self._compressed_frame(raw, key, image_id, channel, image)
            image = compression.materialise(image)  # a bare byte string: refused below, as when decompressed here
        if not isinstance(image, np.ndarray) or image.ndim not in (1, 2) or image.dtype.kind not in "biuf":
            raise StreamDecodeError(f"image {image_id} channel {_short(channel)} is {_short(image)}, not a 1D or 2D "
                                    "numeric array", "shape_mismatch")
        if image.ndim == 1:
            image = image.reshape(1, -1)  # a strip detector's line
        image = np.ascontiguousarray(image)
        time_s, exposure_s = self._image_times(raw)
        return self.series.frame(key, image_id, {"image": image}, time_s, exposure_s)

    @staticmethod
    def _image_times(raw: Mapping) -> tuple[float | None, float | None]:
        """(mid-exposure time, exposure) in seconds of an image message, None where not sent."""
        time_s = exposure_s = None
        if "start_time" in raw and "stop_time" in raw:
            start = rational_seconds(raw["start_time"], "start_time")
            stop = rational_seconds(raw["stop_time"], "stop_time")
            time_s = (start + stop) / 2
            exposure_s = stop - start
        if "real_time" in raw:
            exposure_s = rational_seconds(raw["real_time"], "real_time")
        return time_s, exposure_s

    def _compressed_frame(self, raw: Mapping, key: str | None, image_id: int, channel: Any,
                          image: compression.CompressedArray) -> list[Message]:
        """A frame forwarding the detector's compressed payload unchanged (``image_compressed``,
        uint8) with what decompressing it needs (``compression``: algorithm, elem_size, dtype,
        shape). Only the header was checked here; the worker decompresses it."""
        if image.shape is None or len(image.shape) not in (1, 2):
            raise StreamDecodeError(f"image {image_id} channel {_short(channel)} is a compressed array of "
                                    f"dimensions {list(image.shape or [])}, not 1D or 2D", "shape_mismatch")
        shape = (1, image.shape[0]) if len(image.shape) == 1 else image.shape  # a strip detector's line
        time_s, exposure_s = self._image_times(raw)
        descriptor = {"algorithm": image.algorithm, "elem_size": image.elem_size, "dtype": image.dtype.str,
                      "shape": list(shape)}
        payload = np.frombuffer(image.data, dtype=np.uint8)
        return self.series.frame(key, image_id, {"image_compressed": payload}, time_s, exposure_s,
                                 fields={"compression": descriptor})

    def _end(self, raw: Mapping) -> list[Message]:
        return self.series.end(self.series_key(raw))


class StreamV2Source:
    """``dectris2:tcp://HOST:PORT``: CONNECTs a PULL socket to a Stream V2 detector endpoint.

    Options: ``channel`` (name or index), ``max_bytes`` (largest decompressed array accepted),
    ``decompress`` ("workers", the default: images forwarded compressed; "streamer": decompressed here),
    ``poll_ms`` (how often the stop event is checked, default 100 ms).
    """

    def __init__(self, endpoint: str, options: Mapping[str, Any] | None = None, *, spec: str | None = None) -> None:
        options = dict(options or {})
        self.endpoint = endpoint
        self.spec = spec or f"dectris2:{endpoint}"
        self.poll_ms = int(options.get("poll_ms", 100))
        self.decoder = StreamV2Decoder(self.spec, options.get("channel"),
                                       max_bytes=int(options.get("max_bytes", compression.DEFAULT_MAX_BYTES)),
                                       frame_index_window=int(options.get("frame_index_window", DEFAULT_FRAME_INDEX_WINDOW)),
                                       decompress=str(options.get("decompress", "workers")))

    @property
    def counters(self) -> Counter:
        return self.decoder.counters

    def messages(self, stop_event: threading.Event) -> Iterator[Message]:
        for frames in pull_parts(self.endpoint, self.poll_ms, stop_event, "Stream V2"):
            if len(frames) != 1:
                self.counters["malformed"] += 1
                log.warning("dropping Stream V2 message of %d parts (expected one)", len(frames))
                continue
            yield from self.decoder.feed(frames[0].buffer)
        yield from self.decoder.close()
