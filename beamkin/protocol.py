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
log it, count it and carry on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

PROTOCOL_NAME = "beamkin"
PROTOCOL_VERSION = 1

#: Numeric dtype kinds a buffer may have: bool, signed/unsigned integer, float.
_ALLOWED_DTYPE_KINDS = frozenset("biuf")


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
    # a frame carries either a 2D image or a 1D profile
    "frame": (("image",), ("two_theta_deg", "counts")),
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


def _check_fields(msg_type: str, fields: Mapping[str, Any]) -> None:
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
                f"({value!r:.60}), expected {allowed}"
            )
    if "frame_index" in fields and fields["frame_index"] < 0:
        raise ProtocolError(f"{msg_type} message has negative frame_index {fields['frame_index']}")


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


def decode(parts: Sequence[Any]) -> Message:
    """Decode ZeroMQ multipart parts into a validated Message; raises ProtocolError."""
    if len(parts) < 2:
        raise ProtocolError(f"message has {len(parts)} part(s), expected topic + header")
    try:
        topic = bytes(_buffer(parts[0])).decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError("topic part is not ASCII") from exc
    try:
        header = json.loads(bytes(_buffer(parts[1])))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header of {topic!r} message is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError(f"header of {topic!r} message is a JSON {type(header).__name__}, not an object")
    if header.get("protocol") != PROTOCOL_NAME:
        raise ProtocolError(f"header protocol is {header.get('protocol')!r}, expected {PROTOCOL_NAME!r}")
    version = header.get("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported (this is version {PROTOCOL_VERSION})")
    msg_type = header.get("type")
    if msg_type not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    if topic != msg_type:
        raise ProtocolError(f"topic {topic!r} does not match header type {msg_type!r}")
    descriptors = header.pop("arrays", [])
    if not isinstance(descriptors, list):
        raise ProtocolError(f"{msg_type} message 'arrays' is not a list")
    buffers = parts[2:]
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
    _check_fields(msg_type, header)
    _check_arrays(msg_type, arrays)
    return Message(msg_type, header, arrays)


def _decode_array(msg_type: str, descriptor: Any, part: Any) -> tuple[str, np.ndarray]:
    if not isinstance(descriptor, dict):
        raise ProtocolError(f"{msg_type} message array descriptor is not an object: {descriptor!r:.60}")
    name = descriptor.get("name")
    if not isinstance(name, str):
        raise ProtocolError(f"{msg_type} message array descriptor has no name")
    try:
        dtype = np.dtype(descriptor.get("dtype"))
    except TypeError as exc:
        raise ProtocolError(f"array {name!r} has invalid dtype {descriptor.get('dtype')!r}") from exc
    if dtype.kind not in _ALLOWED_DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ProtocolError(f"array {name!r} has unsupported dtype {dtype}")
    shape = descriptor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ProtocolError(f"array {name!r} has invalid shape {shape!r:.60}")
    buffer = _buffer(part)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if buffer.nbytes != expected:
        raise ProtocolError(
            f"array {name!r} of shape {shape} and dtype {dtype} needs {expected} bytes, got {buffer.nbytes}"
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
    prefix = [bytes(p.buffer) for p in parts[:prefix_parts]]
    return prefix, decode(parts[prefix_parts:])
