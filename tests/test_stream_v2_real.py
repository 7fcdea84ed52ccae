"""Stream V2 as real detectors send it (issue 12.1 and 12.2).

The start messages are built from the public DECTRIS specification (github.com/dectris/documentation,
stream_v2/README.md: every start field with its type) and from what a public recording of a real
detector holds: the start / image / end of a DECTRIS EIGER2 Si 16M kept as test data by Diamond's
tickit-devices EIGER simulator (values of that recording; its ``pixel_mask`` and ``flatfield`` are
``{"threshold_1": 4-byte placeholder}`` and its ``detector_translation`` z is negative). CBOR is
written by the independent encoder of test_stream_v2, not by the simulator.
"""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import pytest

from streamer.stream_v2 import StreamV2Decoder
from tests.test_stream_v2 import Tag, mdarray, self_described, typed

# ---------------------------------------------------------------- the EIGER2 Si 16M recording
EIGER2_16M_START = {
    "type": "start", "series_id": 15614, "series_unique_id": "01HBV3JPF9T4ZDPADX6EMK6XMZ",
    "arm_date": Tag(0, "2023-10-03T17:47:48.329+02:00"),
    "beam_center_x": 2049.3840906675064, "beam_center_y": 2163.621048575148,
    "channels": ["threshold_1"], "count_time": 0.004317472232502031,
    "countrate_correction_lookup_table": b"\x00\x00\x00\x00", "countrate_correction_enabled": True,
    "detector_description": "Dectris EIGER2 Si 16M", "detector_serial_number": "E-32-0117",
    "detector_translation": [0.15370380680006296, 0.1622715786431361, -0.23715919962215962],
    "flatfield": {"threshold_1": b"\x00\x00\x00\x00"}, "flatfield_enabled": True,
    "frame_time": 0.004317572232502031,
    "goniometer": {"chi": {"increment": 0.0, "start": 30.0}, "omega": {"increment": 0.1, "start": 0.0},
                   "phi": {"increment": 0.0, "start": 0.0}},
    "image_size_x": 4148, "image_size_y": 4362, "incident_energy": 13500.299829398293,
    "incident_wavelength": 0.918381073013, "number_of_images": 1,
    "pixel_mask": {"threshold_1": b"\x00\x00\x00\x00"}, "pixel_mask_enabled": True,
    "pixel_size_x": 7.5e-05, "pixel_size_y": 7.5e-05, "saturation_value": 21517, "sensor_material": "Si",
    "sensor_thickness": 0.00045, "threshold_energy": {"threshold_1": 6750.149914699146, "threshold_2": 18900.41976115761},
    "virtual_pixel_interpolation_enabled": True,
}
EIGER2_16M_TIMES = {"real_time": [215873, 50000000], "start_time": [0, 50000000], "stop_time": [215873, 50000000],
                    "series_date": Tag(0, "2023-10-03T17:47:49.434+02:00")}
KEY = {"series_id": 15614, "series_unique_id": "01HBV3JPF9T4ZDPADX6EMK6XMZ"}


def decoded(*messages, decoder=None):
    decoder = decoder or StreamV2Decoder("dectris2:test")
    out = [m for message in messages for m in decoder.feed(self_described(message))]
    return decoder, out


def warnings_about(caplog, text):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def test_eiger2_16m_recording_placeholders_dropped_distance_from_translation(caplog):
    """Issue 12: this stream dropped the whole series (placeholder masks), then every frame was
    flagged for the negative distance. Now: placeholders dropped with one WARNING each naming the
    field, distance |z| logged once, the geometry passed on as the detector meant it."""
    caplog.set_level(logging.INFO)
    image = np.zeros((4362, 4148), np.uint16)
    image[2163, 2049] = 7
    image_message = {"type": "image", **KEY, "image_id": 0, **EIGER2_16M_TIMES,
                     "data": {"threshold_1": mdarray(image, "bslz4")}}
    decoder, out = decoded(EIGER2_16M_START, image_message, {"type": "end", **KEY})
    assert [m.type for m in out] == ["start", "frame", "end"]
    start, frame, end = out
    assert start.series_id == "01HBV3JPF9T4ZDPADX6EMK6XMZ"
    assert start.arrays == {}  # both placeholders dropped
    for field in ("pixel_mask", "flatfield"):
        (record,) = warnings_about(caplog, f"start field {field}")
        assert "4-byte string" in record.getMessage() and "placeholder" in record.getMessage()
    assert decoder.counters["unusable_calibration"] == 2
    geometry = start["geometry"]
    translation = EIGER2_16M_START["detector_translation"]
    assert geometry["distance_m"] == abs(translation[2]) == 0.23715919962215962
    assert start["user_data"]["stream_v2"]["distance_from"] == "|detector_translation z|"
    assert len([r for r in caplog.records if "distance" in r.getMessage() and "from" in r.getMessage()]) == 1
    # the beam centre in pixels times the pixel size is the translation's x and y (the real message agrees)
    bx, by = geometry["beam_center_px"]
    assert bx * 75e-6 == pytest.approx(translation[0], abs=1e-12) and by * 75e-6 == pytest.approx(translation[1], abs=1e-12)
    assert geometry["wavelength_A"] == 0.918381073013
    assert start["detector"] == {"name": "Dectris EIGER2 Si 16M", "shape": [4362, 4148], "pixel_size_m": [7.5e-05, 7.5e-05],
                                 "saturation": 21517, "bit_depth": None}
    assert start["n_frames"] == 1 and start["frame_time_s"] == 0.004317572232502031
    # mid-exposure of [0, 215873 / 5e7] s; exposure the real time
    assert frame["time_s"] == 215873 / 5e7 / 2 and frame["exposure_s"] == 215873 / 5e7
    assert frame.arrays["image"][2163, 2049] == 7 and frame.arrays["image"].sum() == 7
    assert end["reason"] == "completed" and end["n_frames"] == 1
    assert not warnings_about(caplog, "dropping")


def every_field_start(**extra) -> dict:
    """A start message with every field of the DECTRIS stream_v2 spec, in its spec type, two channels,
    header_detail "all": tag-40 masks of 32-bit integers (bslz4) and float flatfields."""
    ny, nx = 6, 5
    mask = {c: mdarray(np.full((ny, nx), c, np.uint32) * (np.arange(nx) == 1), "bslz4") for c in (1, 2)}
    message = {
        "type": "start", "series_id": 3, "series_unique_id": "spec-3", "arm_date": Tag(0, "2026-11-30T06:00:00Z"),
        "beam_center_x": 2.5, "beam_center_y": 3.0, "channels": ["threshold_1", "threshold_2"], "count_time": 0.2,
        "countrate_correction_enabled": True, "countrate_correction_lookup_table": typed(np.arange(16, dtype="<u4")),
        "detector_description": "Dectris EIGER2 X 500K", "detector_serial_number": "E-01-0001",
        "detector_translation": [0.0, 0.0, -0.12],
        "flatfield": {f"threshold_{c}": mdarray(np.full((ny, nx), 1.0 + c / 10, "<f4")) for c in (1, 2)},
        "flatfield_enabled": True, "frame_time": 0.25,
        "goniometer": {"omega": {"increment": 0.1, "start": 10.0}, "two_theta": {"increment": 0.0, "start": 0.0}},
        "image_size_x": nx, "image_size_y": ny, "incident_energy": 12398.419843320026, "incident_wavelength": 1.0,
        "number_of_images": 2,
        "pixel_mask": {f"threshold_{c}": m for c, m in mask.items()}, "pixel_mask_enabled": True,
        "pixel_size_x": 75e-6, "pixel_size_y": 75e-6, "saturation_value": 65534, "sensor_material": "CdTe",
        "sensor_thickness": 0.00075, "threshold_energy": {"threshold_1": 6000.0, "threshold_2": 9000.0},
        "user_data": {"gas_time_s": 0.3, "sample": "CPL-1", "dosed": Tag(0, "2026-11-30T06:00:01Z")},
        "virtual_pixel_interpolation_enabled": False, "detector_distance": 0.12,
    }
    message.update(extra)
    return message


@pytest.mark.parametrize("channel, value", [(None, 1), ("threshold_2", 2)])
def test_every_spec_field_type_with_tag_40_masks(caplog, channel, value):
    caplog.set_level(logging.INFO)
    image = {f"threshold_{c}": mdarray(np.full((6, 5), 10 * c, np.uint16), "bslz4") for c in (1, 2)}
    decoder = StreamV2Decoder("dectris2:test", channel)
    decoder, out = decoded(every_field_start(), {"type": "image", "series_id": 3, "series_unique_id": "spec-3",
                                                 "image_id": 0, "start_time": [0, 100], "stop_time": [20, 100],
                                                 "real_time": [20, 100], "series_date": Tag(0, "2026-11-30T06:00:00Z"),
                                                 "data": image, "user_data": {"note": "x"}},
                           decoder=decoder)
    start, frame = out
    mask = start.arrays["pixel_mask"]
    assert mask.dtype == np.uint32 and mask.shape == (6, 5) and mask[:, 1].tolist() == [value] * 6 and mask.sum() == 6 * value
    np.testing.assert_array_equal(start.arrays["flatfield"], np.full((6, 5), 1.0 + value / 10, np.float32))
    assert start["geometry"]["distance_m"] == 0.12  # detector_distance wins over the translation
    assert start["user_data"]["stream_v2"]["distance_from"] == "detector_distance"
    assert start["gas_time_s"] == 0.3 and start["user_data"]["dosed"] == "2026-11-30T06:00:01+00:00"
    assert frame.arrays["image"][0, 0] == 10 * value and frame["time_s"] == 0.1
    assert not warnings_about(caplog, "")  # every field understood: nothing to warn about


@pytest.mark.parametrize("field, value, complaint", [
    ("pixel_mask", {"threshold_1": mdarray(np.zeros((5, 6), np.uint32))}, "has shape [5, 6], the images [6, 5]"),
    ("flatfield", {"threshold_1": Tag(76, b"\x01\x02")}, "not an array"),  # reserved typed-array tag: unknown dtype
    ("pixel_mask", {"threshold_1": Tag(40, [[6, 5], Tag(70, Tag(56500, ["zstd", 4, b"\x00" * 16]))])},
     "unsupported compression algorithm"),
    ("flatfield", {"threshold_1": Tag(40, [[6, 5], typed(np.zeros(29, "<f4"))])}, "holds 29"),
    ("pixel_mask", [1, 2, 3], "not a map of channel -> array"),
])
def test_unusable_calibration_arrays_are_dropped_with_one_warning_naming_the_field(caplog, field, value, complaint):
    caplog.set_level(logging.WARNING)
    start = every_field_start(**{field: value})
    image = {"threshold_1": mdarray(np.ones((6, 5), np.uint16))}
    decoder, out = decoded(start, {"type": "image", "series_unique_id": "spec-3", "image_id": 0, "data": image},
                           {"type": "end", "series_unique_id": "spec-3"})
    assert [m.type for m in out] == ["start", "frame", "end"]
    assert field not in out[0].arrays
    (record,) = warnings_about(caplog, f"start field {field}")
    assert complaint in record.getMessage() and "the series goes on" in record.getMessage()
    assert decoder.counters["unusable_calibration"] == 1


@pytest.mark.parametrize("size_y", [None, 1])
@pytest.mark.parametrize("dims", [[1280], [1, 1280]])
def test_1d_strip_detector(size_y, dims):
    """A strip detector (a MYTHEN of 1280 channels): no or unit image_size_y, lines of [nx] or [1, nx]."""
    start = every_field_start(image_size_x=1280, pixel_mask=None, flatfield=None, channels=["threshold_1"],
                              detector_description="Dectris MYTHEN2 R 1K", number_of_images=1)
    start.pop("image_size_y")
    if size_y is not None:
        start["image_size_y"] = size_y
    start["pixel_mask"] = {"threshold_1": Tag(40, [[1280], typed((np.arange(1280) % 640 == 0).astype("<u4"))])}
    line = np.arange(1280, dtype=np.uint32)
    image = {"threshold_1": Tag(40, [dims, typed(line)])}
    decoder, out = decoded(start, {"type": "image", "series_unique_id": "spec-3", "image_id": 0, "data": image,
                                   "start_time": [0, 10], "stop_time": [2, 10]},
                           {"type": "end", "series_unique_id": "spec-3"})
    start_out, frame, end = out
    assert start_out["detector"]["shape"] == [1, 1280]
    assert start_out.arrays["pixel_mask"].shape == (1, 1280) and start_out.arrays["pixel_mask"].sum() == 2
    np.testing.assert_array_equal(frame.arrays["image"], line.reshape(1, 1280))
    assert end["reason"] == "completed"


def test_a_rejected_start_is_one_error_and_its_images_and_end_are_counted_quietly(caplog):
    caplog.set_level(logging.DEBUG)
    bad = every_field_start(image_size_x=0)
    images = [{"type": "image", "series_unique_id": "spec-3", "image_id": i,
               "data": {"threshold_1": mdarray(np.ones((6, 5), np.uint16))}} for i in range(5)]
    decoder, out = decoded(bad, *images, {"type": "end", "series_unique_id": "spec-3"})
    (status,) = out
    assert status.type == "status" and status["rejected"]["field"] == "image_size_x"
    assert status["rejected"]["value"] == "0" and status["series_id"] == "spec-3"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "field image_size_x = 0" in errors[0].getMessage() and "spec-3" in errors[0].getMessage()
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    c = decoder.counters
    assert c["series_rejected"] == 1 and c["rejected_series_frames"] == 5 and c["rejected_series_end"] == 1
    # the next good series is decoded as usual
    _, after = decoded(every_field_start(series_unique_id="spec-4"), decoder=decoder)
    assert [m.type for m in after] == ["start"] and decoder.series.rejected is None


def test_real_arm_date_with_offset_and_datetime_user_data_are_json_safe():
    _, (start,) = decoded({**EIGER2_16M_START, "user_data": {"at": dt.datetime(2023, 10, 3).isoformat()}})
    assert start["user_data"]["at"] == "2023-10-03T00:00:00"


def test_run_once_exits_non_zero_naming_the_field_of_a_rejected_start():
    """Issue 12.2: `beamkin run --once` waited forever with nothing on the screen. Now the streamer
    waits [streamer] rejected_wait_s for a usable start, then exits 3 and run exits 1 naming it."""
    import os
    import signal

    from beamkin.loopback import LoopbackPorts, beamkin_process
    from simulator.fake_eiger import StreamV2Sender

    sender = StreamV2Sender("tcp://127.0.0.1:0")
    run = beamkin_process("run", "--once", "--source", f"dectris2:{sender.endpoint}", "--streamer.rejected_wait_s", "1",
                          *LoopbackPorts.free().options())
    try:
        assert sender.writable(120.0), "the streamer never connected"
        sender.send_raw(self_described({**EIGER2_16M_START, "image_size_x": -4148}))
        output, _ = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        sender.close(0)
    assert run.returncode == 1, output[-3000:]
    verdict = [line for line in output.splitlines() if line.startswith("beamkin: stage 'streamer' rejected the series")]
    assert verdict and "field image_size_x = -4148" in verdict[0], output[-3000:]
