"""The beamkin protocol decoder is total: any parts give a Message or a ProtocolError (issue 11).

Property-based (Hypothesis) with the hostile cases of issue 11 as explicit examples, plus the
limits of docs/protocol.md ("Decoding limits") checked one by one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from beamkin import protocol
from beamkin.protocol import ProtocolError


def header(msg_type: str, arrays: list | None = None, **fields) -> bytes:
    return json.dumps({"protocol": "beamkin", "version": 1, "type": msg_type, **fields,
                       "arrays": arrays or []}).encode()


PATTERN = dict(series_id="s1", frame_index=3, time_s=1.15, unit="2th_deg")
#: issue 11: a pattern whose declared shape [2^62, 2^62] overflowed the int64 size check to 0
OVERFLOWING_PATTERN = [b"pattern", header("pattern", [{"name": n, "dtype": "<f8", "shape": [2**62, 2**62]}
                                                      for n in ("radial", "intensity", "sigma")], **PATTERN),
                       b"", b"", b""]
#: issue 11: 100 000 nested JSON arrays (RecursionError)
DEEP_HEADER = [b"frame", b"[" * 100_000 + b"]" * 100_000]
#: issue 11: the same size overflow in a `ready` from a DEALER
OVERFLOWING_READY = [b"ready", header("ready", [{"name": "x", "dtype": "<u1", "shape": [2**32, 2**32]}],
                                      worker="w", capacity=2), b""]


def valid_messages() -> list[list[bytes]]:
    frame = protocol.make("frame", {"image": np.arange(12, dtype=np.uint16).reshape(3, 4)},
                          series_id="s1", frame_index=0, time_s=0.15, exposure_s=0.3)
    ready = protocol.make("ready", worker="w1", capacity=2)
    pattern = protocol.make("pattern", {"radial": np.linspace(1, 2, 4), "intensity": np.ones(4), "sigma": np.ones(4)},
                            **PATTERN)
    return [[bytes(p) for p in protocol.encode(m)] for m in (frame, ready, pattern)]


VALID = valid_messages()


def decode_is_total(parts) -> protocol.Message | None:
    try:
        message = protocol.decode(parts)
    except ProtocolError as exc:
        assert str(exc)  # the text says what was wrong
        return None
    assert message.type in protocol.MESSAGE_TYPES
    return message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=5))
@example(OVERFLOWING_PATTERN)
@example(DEEP_HEADER)
@example(OVERFLOWING_READY)
@example([b"frame", b'{"protocol": "beamkin", "version": 1, "type": ["a"]}'])
@example([b"frame", b'{"protocol": "beamkin", "version": 1, "type": "frame", "arrays": [{"name": "image", '
          b'"dtype": "<u4", "shape": [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, '
          b'1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, '
          b'1, 1, 1, 1, 1, 1]}]}', b"\0\0\0\0"])
@example([b"frame", b'{"protocol": "beamkin", "version": 1, "type": "frame", "frame_index": 1' + b"0" * 5000 + b"}"])
def test_fuzz_random_parts_give_a_message_or_a_protocol_error(parts):
    decode_is_total(parts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(VALID))), st.integers(0, 4),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, 10**6))
def test_fuzz_mutated_messages_give_a_message_or_a_protocol_error(which, part, flips, cut):
    parts = list(VALID[which])
    part %= len(parts)
    data = bytearray(parts[part])
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    parts[part] = bytes(data[: cut % (len(data) + 1)])
    decode_is_total(parts)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
                    max_leaves=30),
       st.sampled_from(sorted(protocol.MESSAGE_TYPES)))
def test_fuzz_any_json_header_gives_a_message_or_a_protocol_error(value, msg_type):
    fields = value if isinstance(value, dict) else {"x": value}
    decode_is_total([msg_type.encode(), header(msg_type, **fields)])


def test_shape_overflow_is_a_protocol_error_naming_the_size():
    with pytest.raises(ProtocolError, match=r"needs 2\^12[0-9] or more bytes, got 0"):
        protocol.decode(OVERFLOWING_PATTERN)


def test_deep_nesting_is_bounded_without_recursion_error():
    with pytest.raises(ProtocolError, match="deeper than 64 levels"):
        protocol.decode(DEEP_HEADER)
    nested = {"a": 1}
    for _ in range(protocol.MAX_JSON_DEPTH):  # one level too deep, well below Python's recursion limit
        nested = {"n": nested}
    with pytest.raises(ProtocolError, match="deeper than 64 levels"):
        protocol.decode([b"status", header("status", stage="x", series_id=None, counters=nested)])
    ok = {"a": 1}
    for _ in range(protocol.MAX_JSON_DEPTH - 3):  # header object + counters + this = 64 levels
        ok = {"n": ok}
    assert protocol.decode([b"status", header("status", stage="x", series_id=None, counters=ok)]).type == "status"


def test_maximum_message_size_is_configurable():
    parts = VALID[0]
    size = sum(len(p) for p in parts)
    assert protocol.decode(parts, max_bytes=size).type == "frame"
    with pytest.raises(ProtocolError, match=f"message of {size} bytes exceeds the limit of {size - 1} bytes"):
        protocol.decode(parts, max_bytes=size - 1)
    try:
        protocol.configure(max_message_bytes=size - 1)
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            protocol.decode(parts)
    finally:
        protocol.configure(None)
    assert protocol.max_message_bytes() == protocol.DEFAULT_MAX_MESSAGE_BYTES


@pytest.mark.parametrize("fields, complaint", [
    (dict(frame_index=2**53 + 1), "beyond"),
    (dict(time_s=float("nan")), "not a finite number"),
    (dict(time_s=float("inf")), "not a finite number"),
])
def test_received_integers_are_bounded_and_times_finite(fields, complaint):
    frame = {"series_id": "s", "frame_index": 1, "time_s": 0.5, "exposure_s": 0.3, **fields}
    buffers = [{"name": "image", "dtype": "<u1", "shape": [1, 1]}]
    with pytest.raises(ProtocolError, match=complaint):
        protocol.decode([b"frame", header("frame", buffers, **frame), b"\0"])


def test_a_flagged_fraction_keeps_its_infinite_sigma():
    fraction = dict(series_id="s", frame_index=1, time_s=0.5, exposure_s=0.3, alpha=0.0,
                    sigma_alpha=float("inf"), status="flagged", reason="no peaks")
    assert protocol.decode([b"fraction", header("fraction", **fraction)])["sigma_alpha"] == float("inf")
