"""The beamkin wire protocol: one self-describing, versioned message per ZeroMQ multipart.

Every message on every beamkin socket has the same shape (documented in docs/protocol.md)::

    part 0   topic    ASCII message type, e.g. b"frame"  (lets SUB sockets filter by prefix)
    part 1   header   UTF-8 JSON object: {"protocol": "beamkin", "version": 1, "type": ...,
                      <fields of that type>, "arrays": [{"name", "dtype", "shape"}, ...]}
    part 2+  buffers  one raw C-contiguous buffer per entry of "arrays", in that order

Arrays travel as raw buffers (no copy on send; on receive they are read-only views of the
ZeroMQ frames), so a 1M-pixel image is never serialised element by element. Nothing is ever
unpickled: the header is JSON and buffers are interpreted only as plain numeric dtypes, so a
network peer cannot make a beamkin stage run code.

Malformed input raises :class:`ProtocolError` with a message naming what was wrong; stages
log it, count it and carry on. :func:`decode` is total: any sequence of byte strings gives either
a :class:`Message` or a :class:`ProtocolError`, never another exception, and it bounds what it
accepts (docs/protocol.md, "Decoding limits"):

* the whole multipart at most ``max_message_bytes`` (default :data:`DEFAULT_MAX_MESSAGE_BYTES`,
  configurable per stage with :func:`configure`, key ``[endpoints] max_message_bytes``);
* JSON nesting at most :data:`MAX_JSON_DEPTH` levels (no RecursionError, however deep);
* at most :data:`MAX_ARRAY_DIMENSIONS` dimensions per array, sizes computed with Python integers
  (``prod(shape) * itemsize`` cannot overflow to a small number);
* integer fields within +-2^53 (exact in JSON and in float64) and number fields finite.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

PROTOCOL_NAME = "beamkin"
PROTOCOL_VERSION = 1

#: Numeric dtype kinds a buffer may have: bool, signed/unsigned integer, float.
_ALLOWED_DTYPE_KINDS = frozenset("biuf")

#: Largest multipart message (all parts, bytes) a stage decodes by default: 1 GiB, room for a
#: 16M-pixel 32-bit frame (64 MiB) many times over. ``[endpoints] max_message_bytes`` changes it.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
#: Deepest JSON nesting of a header (objects and arrays); real headers need fewer than 10 levels.
MAX_JSON_DEPTH = 64
#: Most dimensions an array may declare (numpy's own limit is 64).
MAX_ARRAY_DIMENSIONS = 32
#: Integer header fields must lie within +-MAX_SAFE_INTEGER (2^53: exact in JSON and float64).
MAX_SAFE_INTEGER = 1 << 53

_limits = {"max_message_bytes": DEFAULT_MAX_MESSAGE_BYTES}


def configure(max_message_bytes: int | None = None) -> None:
    """Set this process's decoding limits (a stage calls it once from its configuration).

    ``max_message_bytes``: largest multipart message accepted, in bytes (None or <= 0: default).
    """
    if max_message_bytes is None or int(max_message_bytes) <= 0:
        max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
    _limits["max_message_bytes"] = int(max_message_bytes)


def max_message_bytes() -> int:
    """The largest multipart message (bytes) :func:`decode` accepts in this process."""
    return _limits["max_message_bytes"]


class ProtocolError(ValueError):
    """A message that does not follow the beamkin protocol (the text says what is wrong)."""


@dataclass(frozen=True)
class FieldSpec:
    """A required or optional header field: its name and the JSON types it may have."""

    name: str
    types: tuple[type, ...]
    required: bool = True


def _f(name: str, *types: type, required: bool = True) -> FieldSpec:
    return FieldSpec(name, types, required)


_NUMBER = (int, float)
_OPT_NUMBER = (int, float, type(None))

#: Header fields of each message type (beyond protocol/version/type/arrays).
#: Optional fields may also be absent. Arrays listed as required must be attached.
#: fields of a posterior and of its immediate estimate
_POSTERIOR_FIELDS = (
    _f("series_id", str),
    _f("frame_index", int),
    _f("time_s", *_NUMBER),
    _f("onset_probability", *_NUMBER),
    _f("leading_model", str),
    _f("models", dict),
    _f("model_averaged", dict),
    _f("histograms", dict, required=False),
    _f("predictive", dict, required=False),
    _f("diagnostics", dict, required=False),
)

MESSAGE_FIELDS: dict[str, tuple[FieldSpec, ...]] = {
    # series lifecycle (streamer -> reducers, inference, recorder)
    "start": (
        _f("series_id", str),
        _f("kind", str),  # "image" (2D detector) or "profile" (1D strip detector)
        _f("source", str),
        _f("detector", dict),
        _f("geometry", dict),
        _f("frame_time_s", *_NUMBER),
        _f("exposure_s", *_NUMBER),
        _f("n_frames", int, type(None)),
        _f("gas_time_s", *_OPT_NUMBER),
        _f("user_data", dict, required=False),
    ),
    "frame": (
        _f("series_id", str),
        _f("frame_index", int),
        _f("time_s", *_NUMBER),
        _f("exposure_s", *_NUMBER),
        _f("received_unix_s", *_NUMBER, required=False),  # when the streamer got it (latency)
        # with image_compressed: {"algorithm": "bslz4"|"lz4", "elem_size", "dtype", "shape"} (beamkin.frames)
        _f("compression", dict, required=False),
    ),
    "end": (
        _f("series_id", str),
        _f("n_frames", int),
        _f("reason", str),  # "completed" or "aborted"
    ),
    # reduction results (reducer -> inference -> PUB)
    "pattern": (
        _f("series_id", str),
        _f("frame_index", int),
        _f("time_s", *_NUMBER),
        _f("unit", str),  # "2th_deg" or "q_nm^-1"
    ),
    "fraction": (
        _f("series_id", str),
        _f("frame_index", int),
        _f("time_s", *_NUMBER),
        _f("exposure_s", *_NUMBER),
        _f("alpha", *_OPT_NUMBER),
        _f("sigma_alpha", *_OPT_NUMBER),
        _f("status", str),  # "ok" or "flagged"
        _f("reason", str, type(None)),
        _f("peaks", list, required=False),
        _f("received_unix_s", *_NUMBER, required=False),
    ),
    # inference results (inference PUB)
    "posterior": _POSTERIOR_FIELDS + (_f("priors", dict, required=False),),
    # the immediate estimate of the same posterior (inference.live), before the exact one
    "estimate": _POSTERIOR_FIELDS,
    "alert": (
        _f("series_id", str),
        _f("frame_index", int),
        _f("time_s", *_NUMBER),
        _f("t0", dict),
        _f("t0_minus_ts", *_OPT_NUMBER),
        _f("leading_model", str),
        _f("leading_probability", *_NUMBER),
        _f("onset_probability", *_NUMBER),
    ),
    "result": (  # final result of a series, the schema of `beamkin demo --json`
        _f("series_id", str),
        _f("result", dict),
    ),
    "status": (  # stage health, published about once a second and on notable events
        _f("stage", str),
        _f("series_id", str, type(None)),
        _f("counters", dict),
    ),
    # reducer worker <-> streamer load balancing (DEALER -> ROUTER)
    "ready": (  # sent on connection and every second as a heartbeat
        _f("worker", str),
        _f("capacity", int),  # how many frames the worker holds at once
        _f("quiet_s", *_NUMBER, required=False),  # it may be silent this long (building an integrator)
        _f("series", list, required=False),  # ids of the series whose integrator it has set up
    ),
    "done": (
        _f("worker", str),
        _f("series_id", str),
        _f("frame_index", int),
    ),
}

#: Arrays each message type must carry; alternatives separated as tuples of names.
REQUIRED_ARRAYS: dict[str, tuple[tuple[str, ...], ...]] = {
    "pattern": (("radial", "intensity", "sigma"),),
    # a frame carries a 2D image, the detector's compressed image (uint8 bytes, described by
    # the "compression" field, decompressed by the reducer worker) or a 1D profile
    "frame": (("image",), ("image_compressed",), ("two_theta_deg", "counts")),
}

MESSAGE_TYPES = frozenset(MESSAGE_FIELDS)


@dataclass
class Message:
    """One protocol message: its type, JSON header fields and named numeric arrays."""

    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    @property
    def series_id(self) -> str | None:
        return self.fields.get("series_id")

    @property
    def frame_index(self) -> int | None:
        return self.fields.get("frame_index")


#: Number fields a received message must carry as finite values (times and durations, seconds);
#: others may be +-inf by convention (a flagged fraction's sigma_alpha is inf).
FINITE_FIELDS = frozenset({"time_s", "exposure_s", "frame_time_s", "gas_time_s", "received_unix_s", "quiet_s"})


def _check_fields(msg_type: str, fields: Mapping[str, Any], inbound: bool = False) -> None:
    """Check the header fields of a message type; ``inbound`` (decoding) also checks that integers
    lie within +-2^53 and that the fields of FINITE_FIELDS are finite."""
    for spec in MESSAGE_FIELDS[msg_type]:
        if spec.name not in fields:
            if spec.required:
                raise ProtocolError(f"{msg_type} message lacks required field {spec.name!r}")
            continue
        value = fields[spec.name]
        # bool is an int subclass in Python but never a valid number here
        if isinstance(value, bool) or not isinstance(value, spec.types):
            allowed = "/".join("null" if t is type(None) else t.__name__ for t in spec.types)
            raise ProtocolError(
                f"{msg_type} message field {spec.name!r} is {type(value).__name__} "
                f"({_preview(value)}), expected {allowed}"
            )
        if not inbound:
            continue
        if isinstance(value, int) and not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise ProtocolError(f"{msg_type} message field {spec.name!r} = {_preview(value)} is beyond +-2^53")
        if spec.name in FINITE_FIELDS and isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(f"{msg_type} message field {spec.name!r} is {value}, not a finite number")
    if "frame_index" in fields and fields["frame_index"] < 0:
        raise ProtocolError(f"{msg_type} message has negative frame_index {fields['frame_index']}")


def _preview(value: Any, limit: int = 60) -> str:
    """A short repr for error messages (never the repr of a 10^5-digit integer: that raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"<integer of {value.bit_length()} bits>"
    if isinstance(value, (list, tuple)) and len(value) <= 8 and all(
        isinstance(v, (str, float, type(None))) or (isinstance(v, int) and abs(v) < 10**limit) for v in value
    ):
        text = repr(list(value))
        return text if len(text) <= 2 * limit else text[: 2 * limit] + "..."
    if isinstance(value, (list, dict, tuple)):
        return f"<{type(value).__name__} of {len(value)}>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """True if ``value`` (parsed JSON) nests objects/arrays more than ``limit`` levels deep.

    Iterative (an explicit stack), so it never recurses however deep the value is.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _check_arrays(msg_type: str, names: Iterable[str]) -> None:
    alternatives = REQUIRED_ARRAYS.get(msg_type)
    if not alternatives:
        return
    present = set(names)
    if not any(set(option) <= present for option in alternatives):
        wanted = " or ".join("+".join(option) for option in alternatives)
        raise ProtocolError(
            f"{msg_type} message carries arrays {sorted(present)}, expected {wanted}"
        )


def make(msg_type: str, arrays: Mapping[str, np.ndarray] | None = None, **fields: Any) -> Message:
    """Build and validate a message; raises ProtocolError if a field is missing or mistyped."""
    if msg_type not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    _check_fields(msg_type, fields)
    arrays = dict(arrays or {})
    _check_arrays(msg_type, arrays)
    return Message(msg_type, dict(fields), arrays)


def encode(message: Message) -> list[bytes | memoryview]:
    """Encode a message as ZeroMQ multipart parts (arrays are not copied when contiguous)."""
    if message.type not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {message.type!r}")
    _check_fields(message.type, message.fields)
    descriptors = []
    buffers: list[bytes | memoryview] = []
    for name, array in message.arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.kind not in _ALLOWED_DTYPE_KINDS:
            raise ProtocolError(f"array {name!r} has unsupported dtype {array.dtype}")
        descriptors.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape)})
        buffers.append(memoryview(array).cast("B") if array.size else b"")
    header = {
        "protocol": PROTOCOL_NAME,
        "version": PROTOCOL_VERSION,
        "type": message.type,
        **message.fields,
        "arrays": descriptors,
    }
    try:
        header_bytes = json.dumps(header, separators=(",", ":"), default=json_default).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{message.type} message header is not JSON-serialisable: {exc}") from exc
    return [message.type.encode("ascii"), header_bytes, *buffers]


def json_default(value: Any) -> Any:
    """Let numpy scalars and small arrays appear in headers as plain JSON numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _buffer(part: Any) -> memoryview:
    """A read-only byte view of a multipart part (bytes, memoryview or zmq.Frame)."""
    buffer = getattr(part, "buffer", part)  # zmq.Frame exposes .buffer without copying
    return memoryview(buffer).cast("B") if not isinstance(buffer, bytes) else memoryview(buffer)


def decode(parts: Sequence[Any], *, max_bytes: int | None = None) -> Message:
    """Decode ZeroMQ multipart parts into a validated Message; raises ProtocolError (only).

    ``max_bytes``: largest total size of the parts (default :func:`max_message_bytes`).
    """
    try:
        return _decode(parts, max_message_bytes() if max_bytes is None else max_bytes)
    except ProtocolError:
        raise
    except Exception as exc:  # a check missed above must still be a ProtocolError, never a crash
        raise ProtocolError(f"undecodable message: {type(exc).__name__}: {exc}") from exc


def _decode(parts: Sequence[Any], max_bytes: int) -> Message:
    if len(parts) < 2:
        raise ProtocolError(f"message has {len(parts)} part(s), expected topic + header")
    views = []
    total = 0
    for part in parts:
        try:
            view = _buffer(part)
        except TypeError as exc:
            raise ProtocolError(f"message part is {type(part).__name__}, not a byte buffer") from exc
        views.append(view)
        total += view.nbytes
    if total > max_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {max_bytes} bytes "
                            "([endpoints] max_message_bytes)")
    try:
        topic = bytes(views[0]).decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError("topic part is not ASCII") from exc
    if len(topic) > 64:
        raise ProtocolError(f"topic of {len(topic)} characters is not a message type")
    try:
        header = json.loads(bytes(views[1]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header of {topic!r} message is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ProtocolError(f"header of {topic!r} message nests JSON deeper than {MAX_JSON_DEPTH} levels") from exc
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ProtocolError(f"header of {topic!r} message is not acceptable JSON: {exc}") from exc
    if json_depth_exceeds(header, MAX_JSON_DEPTH):
        raise ProtocolError(f"header of {topic!r} message nests JSON deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(header, dict):
        raise ProtocolError(f"header of {topic!r} message is a JSON {type(header).__name__}, not an object")
    if header.get("protocol") != PROTOCOL_NAME:
        raise ProtocolError(f"header protocol is {_preview(header.get('protocol'))}, expected {PROTOCOL_NAME!r}")
    version = header.get("version")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(f"protocol version {_preview(version)} is not supported (this is version {PROTOCOL_VERSION})")
    msg_type = header.get("type")
    if not isinstance(msg_type, str) or msg_type not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {_preview(msg_type)}")
    if topic != msg_type:
        raise ProtocolError(f"topic {topic!r} does not match header type {msg_type!r}")
    descriptors = header.pop("arrays", [])
    if not isinstance(descriptors, list):
        raise ProtocolError(f"{msg_type} message 'arrays' is not a list")
    buffers = views[2:]
    if len(buffers) != len(descriptors):
        raise ProtocolError(
            f"{msg_type} message declares {len(descriptors)} array(s) but carries {len(buffers)} buffer(s)"
        )
    arrays = {}
    for descriptor, part in zip(descriptors, buffers):
        arrays_name, array = _decode_array(msg_type, descriptor, part)
        arrays[arrays_name] = array
    for key in ("protocol", "version", "type"):
        header.pop(key, None)
    _check_fields(msg_type, header, inbound=True)
    _check_arrays(msg_type, arrays)
    return Message(msg_type, header, arrays)


def _decode_array(msg_type: str, descriptor: Any, part: Any) -> tuple[str, np.ndarray]:
    if not isinstance(descriptor, dict):
        raise ProtocolError(f"{msg_type} message array descriptor is not an object: {descriptor!r:.60}")
    name = descriptor.get("name")
    if not isinstance(name, str):
        raise ProtocolError(f"{msg_type} message array descriptor has no name")
    dtype_text = descriptor.get("dtype")
    if not isinstance(dtype_text, str) or len(dtype_text) > 16:
        raise ProtocolError(f"array {name!r} has invalid dtype {_preview(dtype_text)}")
    try:
        dtype = np.dtype(dtype_text)
    except (TypeError, ValueError, SyntaxError) as exc:
        raise ProtocolError(f"array {name!r} has invalid dtype {dtype_text!r}") from exc
    if dtype.kind not in _ALLOWED_DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ProtocolError(f"array {name!r} has unsupported dtype {dtype}")
    shape = descriptor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_ARRAY_DIMENSIONS
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise ProtocolError(f"array {name!r} has invalid shape {_preview(shape)}")
    buffer = _buffer(part)
    expected = math.prod(shape) * dtype.itemsize  # Python integers: no int64 overflow
    if buffer.nbytes != expected:
        needs = expected if expected < 10**30 else f"2^{expected.bit_length() - 1} or more"
        raise ProtocolError(
            f"array {name!r} of shape {_preview(shape, 120)} and dtype {dtype} needs {needs} bytes, got {buffer.nbytes}"
        )
    array = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    return name, array


def send(socket: Any, message: Message, *, flags: int = 0, prefix: Sequence[bytes] = ()) -> None:
    """Send a message on a pyzmq socket without copying its arrays.

    ``prefix`` parts (e.g. a ROUTER peer identity) are sent before the topic.
    """
    socket.send_multipart([*prefix, *encode(message)], flags=flags, copy=False)


def recv(socket: Any, *, flags: int = 0, prefix_parts: int = 0) -> tuple[list[bytes], Message]:
    """Receive one message; returns (prefix parts, message). Raises ProtocolError if malformed.

    The whole multipart is always consumed, so a malformed message never desynchronises
    the socket.
    """
    parts = socket.recv_multipart(flags=flags, copy=False)
    if len(parts) < prefix_parts:
        raise ProtocolError(f"message has {len(parts)} part(s), fewer than its {prefix_parts} routing part(s)")
    prefix = [bytes(p.buffer) for p in parts[:prefix_parts]]
    return prefix, decode(parts[prefix_parts:])
