"""Stream V1 (JSON multipart) decoder: encodings, header details, resynchronisation, ZeroMQ round trip.
Messages are built here by hand from the SIMPLON stream format (json + bitshuffle/lz4 directly)."""

from __future__ import annotations

import json
import struct

import bitshuffle
import lz4.block
import numpy as np
import pytest

from streamer.stream_v1 import StreamV1Decoder
from tests.conftest import consume_in_thread

NY, NX = 9, 14
CONFIG = {"beam_center_x": 7.0, "beam_center_y": 4.5, "count_time": 0.3, "frame_time": 1 / 3,
          "detector_distance": 0.25, "wavelength": 0.8, "x_pixel_size": 75e-6, "y_pixel_size": 75e-6,
          "x_pixels_in_detector": NX, "y_pixels_in_detector": NY, "nimages": 2, "ntrigger": 2,
          "bit_depth_image": 16, "countrate_correction_count_cutoff": 60000, "description": "Dectris EIGER 1M"}


def j(value) -> bytes:
    return json.dumps(value).encode()


def header(series, config=CONFIG, detail="basic", mask=None, flat=None, appendix=None):
    parts = [j({"htype": "dheader-1.0", "series": series, "header_detail": detail})]
    if detail != "none":
        parts.append(j(config))
    if flat is not None:
        parts += [j({"htype": "dflatfield-1.0", "shape": [NX, NY], "type": "float32"}), flat.astype("<f4").tobytes()]
    if mask is not None:
        parts += [j({"htype": "dpixelmask-1.0", "shape": [NX, NY], "type": "uint32"}), mask.astype("<u4").tobytes()]
        parts += [j({"htype": "dcountrate_table-1.0", "shape": [2, 3], "type": "float32"}), np.zeros(6, "<f4").tobytes()]
    if appendix is not None:
        parts.append(j(appendix))
    return parts


def encode(image, encoding):
    raw = image.tobytes()
    if encoding == "<":
        return raw
    if encoding == "lz4<":
        return lz4.block.compress(raw, store_size=False)
    body = bitshuffle.compress_lz4(image.ravel()).tobytes()
    if encoding.endswith("framed"):
        return struct.pack(">QI", len(raw), 8192) + body
    return body


def image(series, frame, img, encoding="bs16-lz4<", t0_ns=None):
    kind = {"u1": "uint8", "u2": "uint16", "u4": "uint32"}[img.dtype.str[1:]]
    blob = encode(img, encoding)
    t0_ns = frame * 333_333_333 if t0_ns is None else t0_ns
    return [j({"htype": "dimage-1.0", "series": series, "frame": frame, "hash": ""}),
            j({"htype": "dimage_d-1.0", "shape": [NX, NY], "type": kind, "encoding": encoding.replace(" framed", ""),
               "size": len(blob)}),
            blob, j({"htype": "dconfig-1.0", "start_time": t0_ns, "stop_time": t0_ns + 300_000_000, "real_time": 300_000_000})]


def end(series):
    return [j({"htype": "dseries_end-1.0", "series": series})]


def feed(decoder, *messages):
    out = []
    for m in messages:
        out.extend(decoder.feed(m))
    return out


def img(i, dtype=np.uint16):
    return (np.arange(NY * NX).reshape(NY, NX) + 17 * i).astype(dtype)


@pytest.mark.parametrize("encoding,dtype", [("<", np.uint16), ("lz4<", np.uint32), ("bs16-lz4<", np.uint16),
                                            ("bs32-lz4<", np.uint32), ("bs8-lz4<", np.uint8),
                                            ("bs16-lz4< framed", np.uint16), ("bs32-lz4< framed", np.uint32)])
def test_encodings_and_series_fields(encoding, dtype):
    mask = np.zeros((NY, NX), np.uint32)
    mask[2, 3] = 1
    flat = np.linspace(0.9, 1.1, NY * NX).reshape(NY, NX)
    msgs = [header(5, detail="all", mask=mask, flat=flat, appendix={"gas_time_s": 3.0, "operator": "x"})]
    msgs += [image(5, i, img(i, dtype), encoding) for i in range(4)] + [end(5)]
    out = feed(StreamV1Decoder("dectris1:test"), *msgs)
    assert [m.type for m in out] == ["start"] + ["frame"] * 4 + ["end"]
    start = out[0]
    assert start["series_id"] == "5" and start["n_frames"] == 4 and start["gas_time_s"] == 3.0
    assert start["detector"] == {"name": "Dectris EIGER 1M", "shape": [NY, NX], "pixel_size_m": [75e-6, 75e-6],
                                 "saturation": 60000, "bit_depth": 16}
    assert start["geometry"]["beam_center_px"] == [7.0, 4.5] and start["geometry"]["distance_m"] == 0.25
    np.testing.assert_array_equal(start.arrays["pixel_mask"], mask)
    np.testing.assert_allclose(start.arrays["flatfield"], flat, rtol=1e-6)
    for i, frame in enumerate(out[1:5]):
        np.testing.assert_array_equal(frame.arrays["image"], img(i, dtype))
        assert frame["time_s"] == pytest.approx(i * 0.333333333 + 0.15)
        assert frame["exposure_s"] == pytest.approx(0.3)
    assert out[-1]["reason"] == "completed"


def test_aborted_series_then_resynchronised_on_htype():
    decoder = StreamV1Decoder()
    out = feed(
        decoder,
        image(1, 0, img(0)),              # before any header
        header(1),
        image(1, 0, img(0)),
        image(1, 1, img(1))[:2],          # truncated multipart: no blob
        [b"\x00not json"],
        [j({"htype": "dimage-1.0", "series": 1, "frame": 2, "hash": ""}),
         j({"htype": "dimage_d-1.0", "shape": [NX, NY], "type": "uint16", "encoding": "lz4<", "size": 3}), b"xyz"],
        [j({"htype": "dmystery-1.0"})],
        # series 1 is aborted: no dseries_end; series 2 starts
        header(2),
        image(1, 3, img(3)),              # a straggler of the aborted series
        image(2, 0, img(10)),
        image(2, 0, img(10)),             # duplicate
        image(2, 1, img(11)),
        end(2),
    )
    assert [(m.type, m.series_id) for m in out] == [
        ("start", "1"), ("frame", "1"), ("end", "1"), ("start", "2"), ("frame", "2"), ("frame", "2"), ("end", "2")]
    assert out[2]["reason"] == "aborted" and out[2]["n_frames"] == 1
    np.testing.assert_array_equal(out[5].arrays["image"], img(11))
    c = decoder.counters
    assert c["frame_before_start"] == 1 and c["missing_end"] == 1 and c["series_mismatch"] == 1
    assert c["duplicate_frame"] == 1 and c["unknown_htype"] == 1 and c["malformed"] >= 3


def test_header_detail_none_defers_start_to_first_image():
    out = feed(StreamV1Decoder(), header(3, detail="none"), image(3, 0, img(0), "lz4<"), image(3, 1, img(1), "lz4<"), end(3))
    assert [m.type for m in out] == ["start", "frame", "frame", "end"]
    assert out[0]["detector"]["shape"] == [NY, NX] and out[0]["n_frames"] is None
    assert out[2]["time_s"] == pytest.approx(0.333333333 + 0.15)


@pytest.mark.parametrize("compression", ["bslz4", "lz4", "none"])
def test_fake_eiger_v1_mode_over_zeromq(compression):
    from simulator.fake_eiger import StreamV1Sender
    from streamer.sources import open_source

    sender = StreamV1Sender("tcp://127.0.0.1:0", compression=compression)
    source = open_source(f"dectris1:{sender.endpoint}", {"poll_ms": 20})

    thread, received = consume_in_thread(source)
    mask = np.zeros((NY, NX), np.uint32)
    mask[0, 0] = 1
    sender.send_start(dict(CONFIG, nimages=3, ntrigger=1), pixel_mask=mask, appendix={"gas_time_s": 0.5})
    for i in range(3):
        sender.send_image(i, img(i, np.uint32), i / 3, i / 3 + 0.3)
    sender.send_end()
    thread.join(timeout=20)
    sender.close()
    assert [m.type for m in received] == ["start", "frame", "frame", "frame", "end"]
    assert received[0]["gas_time_s"] == 0.5 and received[-1]["reason"] == "completed"
    np.testing.assert_array_equal(received[0].arrays["pixel_mask"], mask)
    for i in range(3):
        np.testing.assert_array_equal(received[1 + i].arrays["image"], img(i, np.uint32))


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VALID_V1 = [header(1, detail="all", mask=np.zeros((NY, NX), np.uint32), appendix={"gas_time_s": 1.0}),
            image(1, 0, img(0), "bs16-lz4< framed"), image(1, 1, img(1), "lz4<"), end(1)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(VALID_V1) - 1), st.integers(0, 10), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                                      max_size=6),
       st.integers(0, 10**6), st.lists(st.binary(max_size=40), max_size=3))
def test_fuzz_v1_multiparts_never_escape(which, part, flips, cut, extra):
    parts = [bytearray(p) for p in VALID_V1[which]]
    target = parts[part % len(parts)]
    for position, value in flips:
        if target:
            target[position % len(target)] = value
    parts[part % len(parts)] = target[: cut % (len(target) + 1)]
    parts = [bytes(p) for p in parts] + extra
    decoder = StreamV1Decoder()
    decoder.feed(VALID_V1[0])
    decoder.feed(parts)
    decoder.feed(VALID_V1[2])


def test_lz4_image_claiming_an_impossible_size_is_rejected():
    decoder = StreamV1Decoder()
    bogus = [j({"htype": "dimage-1.0", "series": 1, "frame": 0, "hash": ""}),
             j({"htype": "dimage_d-1.0", "shape": [8000, 8000], "type": "uint32", "encoding": "lz4<", "size": 4}),
             b"\x00\x00\x00\x00"]  # 256 MB (below the size limit) from 4 bytes: impossible for LZ4
    assert [m.type for m in feed(decoder, header(1), bogus)] == ["start"]
    assert decoder.counters["malformed"] == 1


def test_a_rejected_header_is_one_error_and_its_images_and_end_are_counted_quietly(caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    decoder = StreamV1Decoder()
    out = feed(decoder, header(5, config={**CONFIG, "x_pixels_in_detector": 0}),
               *[image(5, i, img(i)) for i in range(3)], end(5), header(6), image(6, 0, img(0)))
    assert [m.type for m in out] == ["status", "start", "frame"]
    assert out[0]["rejected"]["field"] == "x_pixels_in_detector" and out[0]["rejected"]["value"] == "0.0"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "field x_pixels_in_detector = 0.0" in errors[0].getMessage()
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    c = decoder.counters
    assert c["series_rejected"] == 1 and c["rejected_series_frames"] == 3 and c["rejected_series_end"] == 1


def test_times_that_are_not_finite_nanoseconds_drop_the_image():
    decoder = StreamV1Decoder()
    huge = image(8, 1, img(1))[:3] + [j({"htype": "dconfig-1.0", "start_time": 2**1100, "stop_time": 2**1100})]
    nan = image(8, 2, img(2))[:3] + [b'{"htype": "dconfig-1.0", "start_time": NaN, "stop_time": 1}']
    out = feed(decoder, header(8), image(8, 0, img(0)), huge, nan, image(8, 3, img(3)))
    assert [m.get("frame_index") for m in out] == [None, 0, 3]
    assert decoder.counters["malformed"] == 2 and decoder.counters["handler_errors"] == 0


def test_an_unusable_mask_part_is_dropped_with_a_warning_and_the_series_goes_on(caplog):
    import logging

    caplog.set_level(logging.WARNING)
    parts = header(9, mask=np.zeros((NY, NX), np.uint32))
    parts[3] = b"\x00\x00\x00\x00"  # a 4-byte placeholder instead of the mask's NX * NY * 4 bytes
    decoder = StreamV1Decoder()
    out = feed(decoder, parts, image(9, 0, img(0)))
    assert [m.type for m in out] == ["start", "frame"] and "pixel_mask" not in out[0].arrays
    (record,) = [r for r in caplog.records if "dpixelmask-1.0" in r.getMessage()]
    assert "dropped" in record.getMessage() and decoder.counters["unusable_calibration"] == 1


def test_frames_beyond_the_announced_series_length_are_dropped_with_one_warning(caplog):
    import logging

    caplog.set_level(logging.WARNING)
    decoder = StreamV1Decoder()  # CONFIG announces nimages 2 x ntrigger 2 = 4 frames
    out = feed(decoder, header(4), image(4, 0, img(0)), *[image(4, i, img(0), t0_ns=0) for i in (4, 200_000, 5)],
               image(4, 3, img(3)), end(4))
    assert [m.get("frame_index") for m in out if m.type == "frame"] == [0, 3]
    assert decoder.counters["frame_index_out_of_range"] == 3
    assert sum("announced 4 frames" in r.getMessage() for r in caplog.records) == 1
