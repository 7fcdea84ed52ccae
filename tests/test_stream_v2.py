"""Stream V2 decoder against an independent CBOR encoder written here from RFC 8949 / RFC 8746 /
the DECTRIS spec (no cbor2, no beamkin.compression), plus fuzzing and a ZeroMQ round trip."""

from __future__ import annotations

import struct

import bitshuffle
import lz4.block
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beamkin.frames import frame_image
from beamkin.errors import StreamDecodeError
from streamer.cbor_decode import decode_message
from streamer.stream_v2 import StreamV2Decoder
from tests.conftest import consume_in_thread


# ---------------------------------------------------------------- independent CBOR encoder
class Tag:
    def __init__(self, number, value):
        self.number, self.value = number, value


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | info]) + struct.pack(fmt, n)
    raise ValueError(n)


def cbor(value) -> bytes:
    if value is None:
        return b"\xf6"
    if value is True:
        return b"\xf5"
    if value is False:
        return b"\xf4"
    if isinstance(value, int):
        if value >= 1 << 64 or value < -(1 << 64):  # RFC 8949 3.4.3 bignums: tag 2 (n) or 3 (-1 - n)
            number, tag = (value, 2) if value >= 0 else (-1 - value, 3)
            return cbor(Tag(tag, number.to_bytes((number.bit_length() + 7) // 8, "big")))
        return _head(0, value) if value >= 0 else _head(1, -1 - value)
    if isinstance(value, float):
        return b"\xfb" + struct.pack(">d", value)
    if isinstance(value, (bytes, bytearray)):
        return _head(2, len(value)) + bytes(value)
    if isinstance(value, str):
        raw = value.encode()
        return _head(3, len(raw)) + raw
    if isinstance(value, (list, tuple)):
        return _head(4, len(value)) + b"".join(cbor(v) for v in value)
    if isinstance(value, dict):
        return _head(5, len(value)) + b"".join(cbor(k) + cbor(v) for k, v in value.items())
    if isinstance(value, Tag):
        return _head(6, value.number) + cbor(value.value)
    raise TypeError(type(value))


def self_described(message: dict) -> bytes:
    return b"\xd9\xd9\xf7" + cbor(message)


# RFC 8746 table 1, written out by hand
TYPED_TAGS = {
    64: "u1", 65: ">u2", 66: ">u4", 67: ">u8", 68: "u1", 69: "<u2", 70: "<u4", 71: "<u8",
    72: "i1", 73: ">i2", 74: ">i4", 75: ">i8", 77: "<i2", 78: "<i4", 79: "<i8",
    80: ">f2", 81: ">f4", 82: ">f8", 84: "<f2", 85: "<f4", 86: "<f8",
}


def binary128(value: float, little: bool) -> bytes:
    """IEEE binary128 encoding of a float64 value (exact: binary128 has more precision)."""
    if value == 0:
        return bytes(16)
    sign = 1 if value < 0 else 0
    mantissa, exponent = np.frexp(abs(value))  # value = m * 2^e, 0.5 <= m < 1
    e = int(exponent) - 1 + 16383
    frac = int(round((float(mantissa) * 2 - 1) * 2**52)) << 60  # 52 -> 112 bits
    bits = sign << 127 | e << 112 | frac
    raw = bits.to_bytes(16, "big")
    return raw[::-1] if little else raw


def bslz4_h5(array: np.ndarray) -> bytes:
    elem = array.dtype.itemsize
    block = 8192 // elem
    return struct.pack(">QI", array.nbytes, block * elem) + bitshuffle.compress_lz4(np.ascontiguousarray(array).ravel(), block).tobytes()


def lz4_h5(raw: bytes, block: int = 4096) -> bytes:
    parts = [struct.pack(">QI", len(raw), block)]
    for i in range(0, len(raw), block):
        chunk = lz4.block.compress(raw[i : i + block], store_size=False)
        parts.append(struct.pack(">I", len(chunk)) + chunk)
    return b"".join(parts)


def typed(array: np.ndarray, compression: str = "none"):
    array = np.ascontiguousarray(array)
    tag = {"|u1": 64, "<u2": 69, "<u4": 70, "<i4": 78, "<f4": 85, ">u2": 65, ">i4": 74, ">f8": 82, "<f8": 86}[array.dtype.str]
    if compression == "bslz4":
        payload = Tag(56500, ["bslz4", array.dtype.itemsize, bslz4_h5(array)])
    elif compression == "lz4":
        payload = Tag(56500, ["lz4", 0, lz4_h5(array.tobytes())])
    else:
        payload = array.tobytes()
    return Tag(tag, payload)


def mdarray(array: np.ndarray, compression: str = "none"):
    return Tag(40, [list(array.shape), typed(array, compression)])


NY, NX = 6, 5


def start_msg(**extra) -> dict:
    msg = {
        "type": "start", "series_id": 7, "series_unique_id": "abc-7",
        "arm_date": Tag(0, "2026-11-26T10:00:00.000+00:00"),
        "beam_center_x": 2.5, "beam_center_y": 3.25, "channels": ["threshold_1"],
        "count_time": 0.3, "frame_time": 1 / 3, "detector_description": "EIGER2 X 1M",
        "detector_translation": [0.0, 0.0, 0.21], "image_size_x": NX, "image_size_y": NY,
        "incident_wavelength": 0.8, "number_of_images": 3, "pixel_size_x": 75e-6, "pixel_size_y": 72e-6,
        "saturation_value": 65534, "user_data": {"gas_time_s": 2.5, "sample": "CPL-1"},
    }
    msg.update(extra)
    return msg


def image_msg(image_id: int, data: dict, series="abc-7", start=None, stop=None) -> dict:
    start = [image_id * 1000, 3000] if start is None else start
    stop = [image_id * 1000 + 900, 3000] if stop is None else stop
    return {"type": "image", "series_id": 7, "series_unique_id": series, "image_id": image_id,
            "series_date": Tag(0, "2026-11-26T10:00:00.000+00:00"), "start_time": start, "stop_time": stop,
            "real_time": [900, 3000], "data": data}


END = {"type": "end", "series_id": 7, "series_unique_id": "abc-7"}


def feed(decoder, *messages):
    out = []
    for m in messages:
        out.extend(decoder.feed(m if isinstance(m, bytes) else self_described(m)))
    return out


# ---------------------------------------------------------------- typed arrays
@pytest.mark.parametrize("tag", sorted(TYPED_TAGS))
def test_every_typed_array_tag_decodes_to_its_values(tag):
    dtype = np.dtype(TYPED_TAGS[tag])
    values = np.array([0, 1, 2, 100, 7, 3], dtype=dtype)
    if dtype.kind == "i":
        values[1] = -5
    if dtype.kind == "f":
        values[2] = -0.5
    raw, _ = decode_message(self_described({"type": "x", "a": Tag(tag, values.tobytes())}))
    assert raw["a"].dtype.isnative or raw["a"].dtype.itemsize == 1
    np.testing.assert_array_equal(raw["a"], values.astype(dtype.newbyteorder("=")))


@pytest.mark.parametrize("tag,little", [(83, False), (87, True)])
def test_binary128_typed_arrays_convert_to_float64(tag, little):
    values = [1.5, -2.0, 0.0, 3.141592653589793, 1e-300, -6.02e23]
    payload = b"".join(binary128(v, little) for v in values)
    raw, _ = decode_message(cbor({"type": "x", "a": Tag(tag, payload)}))
    np.testing.assert_array_equal(raw["a"], np.array(values))


def test_reserved_tag_76_is_counted_as_unknown():
    raw, unknown = decode_message(cbor({"type": "x", "a": Tag(76, b"\x01\x02")}))
    assert unknown == {76: 1}


def test_row_and_column_major_multi_dim_arrays():
    matrix = np.arange(12, dtype="<u2").reshape(3, 4)
    row = Tag(40, [[3, 4], Tag(69, matrix.tobytes(order="C"))])
    col = Tag(1040, [[3, 4], Tag(69, matrix.tobytes(order="F"))])
    plain = Tag(40, [[3, 4], [int(x) for x in matrix.ravel()]])
    raw, _ = decode_message(cbor({"type": "x", "row": row, "col": col, "plain": plain}))
    for key in ("row", "col", "plain"):
        np.testing.assert_array_equal(raw[key], matrix)


def test_big_endian_typed_arrays_inside_multi_dim_become_native():
    matrix = np.arange(6, dtype=">i4").reshape(2, 3) - 3
    raw, _ = decode_message(cbor({"type": "x", "m": mdarray(matrix)}))
    assert raw["m"].dtype == np.dtype("=i4")
    np.testing.assert_array_equal(raw["m"], matrix)


@pytest.mark.parametrize("compression", ["bslz4", "lz4"])
@pytest.mark.parametrize("dtype", ["u1", "<u2", "<u4", "<f4"])
def test_compressed_multi_dim_arrays(compression, dtype):
    rng = np.random.default_rng(1)
    image = rng.poisson(20, size=(37, 53)).astype(dtype)
    raw, _ = decode_message(self_described({"type": "x", "m": mdarray(image, compression)}))
    assert raw["m"].dtype == image.dtype
    np.testing.assert_array_equal(raw["m"], image)


def test_message_without_self_describe_tag_also_decodes():
    raw, _ = decode_message(cbor(END))
    assert raw["type"] == "end"


# ---------------------------------------------------------------- series normalisation
def test_series_fields_geometry_times_and_arrays():
    mask = np.zeros((NY, NX), np.uint32)
    mask[1, 2] = 4
    flat = np.full((NY, NX), 1.25, np.float32)
    start = start_msg(pixel_mask={"threshold_1": mdarray(mask, "bslz4")}, flatfield={"threshold_1": mdarray(flat)})
    images = [np.full((NY, NX), i + 1, np.uint16) for i in range(3)]
    out = feed(StreamV2Decoder("dectris2:test"), start, *[image_msg(i, {"threshold_1": mdarray(im, "bslz4")}) for i, im in enumerate(images)], END)
    assert [m.type for m in out] == ["start", "frame", "frame", "frame", "end"]
    s = out[0]
    assert s["series_id"] == "abc-7" and s["kind"] == "image" and s["source"] == "dectris2:test"
    assert s["detector"] == {"name": "EIGER2 X 1M", "shape": [NY, NX], "pixel_size_m": [72e-6, 75e-6],
                             "saturation": 65534, "bit_depth": None}
    assert s["geometry"]["distance_m"] == 0.21 and s["geometry"]["beam_center_px"] == [2.5, 3.25]
    assert s["geometry"]["wavelength_A"] == 0.8
    assert s["frame_time_s"] == pytest.approx(1 / 3) and s["exposure_s"] == 0.3 and s["n_frames"] == 3
    assert s["gas_time_s"] == 2.5 and s["user_data"]["sample"] == "CPL-1"
    np.testing.assert_array_equal(s.arrays["pixel_mask"], mask)
    assert s.arrays["pixel_mask"].dtype == np.uint32 and s.arrays["flatfield"].dtype == np.float32
    np.testing.assert_array_equal(s.arrays["flatfield"], flat)
    for i, frame in enumerate(out[1:4]):
        assert frame["frame_index"] == i
        # mid-exposure of [i/3, i/3 + 0.3] s
        assert frame["time_s"] == pytest.approx(i / 3 + 0.15, abs=1e-12)
        assert frame["exposure_s"] == pytest.approx(0.3)
        np.testing.assert_array_equal(frame.arrays["image"], images[i])
    assert out[4].fields == {"series_id": "abc-7", "n_frames": 3, "reason": "completed"}


def test_wavelength_from_energy_and_no_translation():
    start = start_msg(incident_wavelength=None, incident_energy=12398.419843320026, detector_translation=None,
                      detector_distance=0.3)
    del start["incident_wavelength"]
    (s,) = feed(StreamV2Decoder(), start)
    assert s["geometry"]["wavelength_A"] == pytest.approx(1.0)
    assert s["geometry"]["distance_m"] == 0.3


@pytest.mark.parametrize("option,expected", [(None, 1), ("threshold_2", 2), (1, 2), ("0", 1)])
def test_channel_selection(option, expected):
    masks = {f"threshold_{c}": mdarray(np.full((NY, NX), c, np.uint32)) for c in (1, 2)}
    start = start_msg(channels=["threshold_1", "threshold_2"], pixel_mask=masks)
    data = {f"threshold_{c}": mdarray(np.full((NY, NX), 10 * c, np.uint32), "lz4") for c in (1, 2)}
    out = feed(StreamV2Decoder(channel=option), start, image_msg(0, data))
    assert out[0].arrays["pixel_mask"][0, 0] == expected
    assert out[1].arrays["image"][0, 0] == 10 * expected


def test_unknown_channel_falls_back_to_the_first_and_is_counted():
    start = start_msg(channels=["threshold_1", "threshold_2"])
    data = {f"threshold_{c}": mdarray(np.full((NY, NX), 10 * c, np.uint32)) for c in (1, 2)}
    decoder = StreamV2Decoder(channel="threshold_9")
    out = feed(decoder, start, image_msg(0, data))
    assert [m.type for m in out] == ["start", "frame"] and out[1].arrays["image"][0, 0] == 10
    assert decoder.counters["unknown_channel"] == 1


def test_frame_time_fallback_without_rational_times():
    msg = image_msg(2, {"threshold_1": mdarray(np.zeros((NY, NX), np.uint16))})
    for key in ("start_time", "stop_time", "real_time"):
        del msg[key]
    out = feed(StreamV2Decoder(), start_msg(), msg)
    assert out[1]["time_s"] == pytest.approx(2 / 3 + 0.15)
    assert out[1]["exposure_s"] == 0.3


# ---------------------------------------------------------------- bad input
def good_image(i):
    return image_msg(i, {"threshold_1": mdarray(np.full((NY, NX), i, np.uint16), "bslz4")})


def test_bad_input_is_counted_and_the_stream_carries_on():
    decoder = StreamV2Decoder()
    truncated = self_described(good_image(1))[:-7]
    wrong_shape = image_msg(2, {"threshold_1": Tag(40, [[NY, NX], typed(np.zeros(NY * NX - 1, np.uint16))])})
    wrong_detector = image_msg(3, {"threshold_1": mdarray(np.zeros((NY + 1, NX), np.uint16))})
    unknown = dict(good_image(4), user_data=Tag(99999, "x"))
    second_start = start_msg(series_unique_id="abc-8")
    out = feed(
        decoder,
        good_image(0),            # before start
        start_msg(number_of_images=6),
        good_image(0),
        good_image(0),            # duplicate
        truncated,                # corrupt CBOR
        wrong_shape,              # array size does not match its dims
        wrong_detector,           # image shape is not the detector shape
        unknown,                  # unknown tag in user data: counted, frame kept
        b"\x00\x01garbage",
        second_start,             # missing end of abc-7 -> aborted end synthesised
        dict(good_image(0), series_unique_id="abc-8"),
        dict(END, series_unique_id="abc-8"),
    )
    kinds = [(m.type, m.series_id, m.get("frame_index")) for m in out]
    assert kinds == [
        ("start", "abc-7", None), ("frame", "abc-7", 0), ("frame", "abc-7", 4), ("end", "abc-7", None),
        ("start", "abc-8", None), ("frame", "abc-8", 0), ("end", "abc-8", None),
    ]
    assert out[3]["reason"] == "aborted" and out[3]["n_frames"] == 2
    assert out[6]["reason"] == "aborted"  # 1 of 3 announced frames
    c = decoder.counters
    assert c["frame_before_start"] == 1 and c["duplicate_frame"] == 1 and c["missing_end"] == 1
    assert c["malformed"] == 2 and c["shape_mismatch"] == 2 and c["unknown_tag"] == 1


def test_compression_bomb_header_is_rejected_without_allocating():
    from streamer.cbor_decode import UnusableArray

    bomb = Tag(69, Tag(56500, ["bslz4", 2, struct.pack(">QI", 1 << 50, 8192) + b"\x00" * 8]))
    raw, _ = decode_message(cbor({"type": "x", "a": bomb}))
    assert isinstance(raw["a"], UnusableArray) and "limit" in raw["a"].reason
    decoder = StreamV2Decoder()
    out = feed(decoder, start_msg(), image_msg(0, {"threshold_1": Tag(40, [[NY, NX], bomb])}), good_image(1))
    assert [(m.type, m.get("frame_index")) for m in out] == [("start", None), ("frame", 1)]
    assert decoder.counters["malformed"] == 1


def test_unknown_compression_is_counted():
    decoder = StreamV2Decoder()
    msg = image_msg(0, {"threshold_1": Tag(40, [[NY, NX], Tag(69, Tag(56500, ["zstd", 0, b"\x00" * 20]))])})
    assert [m.type for m in feed(decoder, start_msg(), msg)] == ["start"]
    assert decoder.counters["unsupported_compression"] == 1


VALID = [self_described(start_msg(pixel_mask={"threshold_1": mdarray(np.zeros((NY, NX), np.uint32), "bslz4")})),
         self_described(good_image(0)), self_described(END)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_raise_only_the_documented_error(data):
    try:
        decode_message(data)
    except StreamDecodeError:
        pass
    StreamV2Decoder().feed(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(VALID))), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 10**6))
def test_fuzz_mutated_messages_never_escape(which, flips, cut):
    data = bytearray(VALID[which])
    for position, value in flips:
        data[position % len(data)] = value
    data = bytes(data[: max(1, cut % (len(data) + 1))])
    try:
        decode_message(data)
    except StreamDecodeError:
        pass
    decoder = StreamV2Decoder()
    decoder.feed(VALID[0])
    decoder.feed(data)
    decoder.feed(VALID[1])


# ---------------------------------------------------------------- over ZeroMQ with the fake EIGER
@pytest.mark.parametrize("compression", ["bslz4", "lz4", "none"])
def test_fake_eiger_to_source_over_zeromq(compression):
    from simulator.fake_eiger import StreamV2Sender
    from streamer.sources import open_source

    sender = StreamV2Sender("tcp://127.0.0.1:0", compression=compression)
    source = open_source(f"dectris2:{sender.endpoint}", {"poll_ms": 20})

    assert not sender.writable(0.0)  # nobody connected yet: a send would block
    thread, received = consume_in_thread(source)
    assert sender.writable(10.0)
    rng = np.random.default_rng(3)
    images = [rng.poisson(5, size=(64, 48)).astype(np.uint32) for _ in range(4)]
    mask = (rng.random((64, 48)) < 0.01).astype(np.uint32)
    sender.send_start({"beam_center_x": 24.0, "beam_center_y": 30.0, "count_time": 0.25, "frame_time": 0.5,
                       "incident_energy": 15_000.0, "pixel_size_x": 75e-6, "pixel_size_y": 75e-6,
                       "detector_translation": [0.0, 0.0, 0.3], "number_of_images": 4,
                       "user_data": {"gas_time_s": 1.0}}, pixel_mask=mask)
    for i, image in enumerate(images):
        sender.send_image(i, image, 0.5 * i, 0.5 * i + 0.25)
    sender.send_end()
    thread.join(timeout=20)
    sender.close()
    assert not thread.is_alive()
    assert [m.type for m in received] == ["start"] + ["frame"] * 4 + ["end"]
    assert received[0]["gas_time_s"] == 1.0
    assert received[0]["geometry"]["wavelength_A"] == pytest.approx(12398.419843320026 / 15000)
    np.testing.assert_array_equal(received[0].arrays["pixel_mask"], mask)
    for i, image in enumerate(images):  # compressed images are forwarded as sent (decompress = "workers")
        assert ("image_compressed" in received[1 + i].arrays) == (compression != "none")
        np.testing.assert_array_equal(frame_image(received[1 + i]), image)
        assert received[1 + i]["time_s"] == pytest.approx(0.5 * i + 0.125)
    assert received[-1]["reason"] == "completed"


def test_series_ids_are_sanitised_for_every_sink_and_the_original_kept():
    """Issue 11: a series_unique_id with NUL took the recorder down. The beamkin id is the
    percent-encoded UTF-8 of the original (reversible), frames and end still match it."""
    from urllib.parse import unquote

    from streamer.series import safe_series_id

    odd = "run 7/\x00é%"
    decoder = StreamV2Decoder()
    out = feed(decoder, start_msg(series_unique_id=odd), dict(good_image(0), series_unique_id=odd),
               dict(END, series_unique_id=odd))
    assert [m.type for m in out] == ["start", "frame", "end"]
    assert {m.series_id for m in out} == {"run%207%2F%00%C3%A9%25"}
    assert unquote(out[0].series_id) == odd and out[0]["user_data"]["source_series_id"] == odd
    assert decoder.counters["series_id_sanitised"] == 1
    assert safe_series_id("01HBV3JPF9T4ZDPADX6EMK6XMZ") == "01HBV3JPF9T4ZDPADX6EMK6XMZ"  # real ids unchanged
    long_id = safe_series_id("x" * 1000)
    assert len(long_id) == 128 and long_id.startswith("x" * 111 + "~")
    assert safe_series_id("") == "unnamed"
