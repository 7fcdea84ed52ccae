"""Round trips of every beamkin message type and rejection of malformed input."""

import json

import numpy as np
import pytest

from beamkin import protocol
from beamkin.protocol import ProtocolError

STAT = {"mean": 7.4, "sd": 0.03, "q05": 7.35, "q50": 7.4, "q95": 7.45}

EXAMPLES = {
    "start": dict(
        series_id="s1", kind="image", source="simulate",
        detector={"name": "Pilatus 1M", "shape": [1043, 981], "pixel_size_m": [172e-6, 172e-6], "saturation": None},
        geometry={"distance_m": 0.25, "beam_center_px": [490.0, 520.0], "wavelength_A": 0.8},
        frame_time_s=1 / 3, exposure_s=0.3, n_frames=36, gas_time_s=None, user_data={"gas": "Ar"},
    ),
    "frame": dict(series_id="s1", frame_index=3, time_s=1.15, exposure_s=0.3),
    "end": dict(series_id="s1", n_frames=36, reason="completed"),
    "pattern": dict(series_id="s1", frame_index=3, time_s=1.15, unit="2th_deg"),
    "fraction": dict(series_id="s1", frame_index=3, time_s=1.15, exposure_s=0.3, alpha=0.2,
                     sigma_alpha=0.02, status="ok", reason=None, peaks=[{"phase": "A", "area": 10.0}]),
    "posterior": dict(series_id="s1", frame_index=3, time_s=1.15, onset_probability=0.5, leading_model="F1",
                      models={"F1": {"log_evidence": 1.0, "probability": 1.0, "params": {"t0": STAT}}},
                      model_averaged={"t0": STAT, "k": STAT}),
    "estimate": dict(series_id="s1", frame_index=4, time_s=1.45, onset_probability=0.6, leading_model="F1",
                     models={"F1": {"log_evidence": 1.2, "probability": 1.0, "params": {"t0": STAT}}},
                     model_averaged={"t0": STAT, "k": STAT}, diagnostics={"frames_behind": 1}),
    "alert": dict(series_id="s1", frame_index=24, time_s=8.1, t0=STAT, t0_minus_ts=None,
                  leading_model="F1", leading_probability=0.9, onset_probability=0.995),
    "result": dict(series_id="s1", result={"models": {}}),
    "status": dict(stage="inference", series_id="s1", counters={"frames_received": 3}),
    "ready": dict(worker="w1", capacity=2),
    "done": dict(worker="w1", series_id="s1", frame_index=3),
}

ARRAYS = {
    "frame": {"image": np.arange(12, dtype=np.uint32).reshape(3, 4)},
    "pattern": {"radial": np.linspace(1, 30, 5), "intensity": np.ones(5, np.float32), "sigma": np.ones(5, np.float32)},
    "start": {"pixel_mask": np.zeros((3, 4), np.uint32)},
}


def test_every_message_type_has_an_example():
    assert set(EXAMPLES) == protocol.MESSAGE_TYPES


@pytest.mark.parametrize("msg_type", sorted(EXAMPLES))
def test_round_trip(msg_type):
    message = protocol.make(msg_type, ARRAYS.get(msg_type), **EXAMPLES[msg_type])
    parts = protocol.encode(message)
    assert parts[0] == msg_type.encode()
    decoded = protocol.decode([bytes(p) for p in parts])
    assert decoded.type == msg_type
    assert decoded.fields == EXAMPLES[msg_type]
    for name, array in ARRAYS.get(msg_type, {}).items():
        np.testing.assert_array_equal(decoded.arrays[name], array)
        assert decoded.arrays[name].dtype == array.dtype


def test_profile_frame_and_big_endian_array_round_trip():
    arrays = {"two_theta_deg": np.linspace(2, 40, 7), "counts": np.arange(7, dtype=">i4")}
    message = protocol.make("frame", arrays, **EXAMPLES["frame"])
    decoded = protocol.decode([bytes(p) for p in protocol.encode(message)])
    np.testing.assert_array_equal(decoded.arrays["counts"], np.arange(7))
    assert decoded.arrays["counts"].dtype == np.dtype(">i4")


def test_round_trip_over_a_real_socket_keeps_arrays_without_copy():
    zmq = pytest.importorskip("zmq")
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    image = np.random.default_rng(0).integers(0, 1000, size=(64, 32), dtype=np.uint32)
    protocol.send(push, protocol.make("frame", {"image": image}, **EXAMPLES["frame"]))
    assert pull.poll(5000)
    _, message = protocol.recv(pull)
    np.testing.assert_array_equal(message.arrays["image"], image)
    push.close(0)
    pull.close(0)


def _parts(header: dict, *buffers: bytes, topic: bytes | None = None) -> list[bytes]:
    topic = topic if topic is not None else str(header.get("type", "x")).encode()
    return [topic, json.dumps(header).encode(), *buffers]


def _header(msg_type="frame", **extra):
    return {"protocol": "beamkin", "version": 1, "type": msg_type, **EXAMPLES[msg_type], **extra}


@pytest.mark.parametrize(
    "parts, complaint",
    [
        ([b"frame"], "expected topic + header"),
        ([b"frame", b"{not json"], "not valid JSON"),
        ([b"frame", b"[1, 2]"], "not an object"),
        (_parts({**_header(), "protocol": "other"}), "protocol"),
        (_parts({**_header(), "version": 99}), "version 99"),
        (_parts({**_header(), "type": "bogus"}, topic=b"bogus"), "unknown message type 'bogus'"),
        (_parts(_header(), topic=b"end"), "does not match"),
        (_parts({**_header(arrays=[])}), "expected image or image_compressed or two_theta_deg+counts"),
        (_parts(_header(arrays=[{"name": "image", "dtype": "<u4", "shape": [2, 2]}]), b"\0" * 15), "needs 16 bytes, got 15"),
        (_parts(_header(arrays=[{"name": "image", "dtype": "|O", "shape": [1]}]), b"\0" * 8), "unsupported dtype"),
        (_parts(_header(arrays=[{"name": "image", "dtype": "<u4", "shape": [1]}])), "declares 1 array(s) but carries 0"),
        (_parts(_header(arrays=[{"name": "image", "dtype": "<u4", "shape": [-1]}]), b""), "invalid shape"),
        (_parts({k: v for k, v in _header().items() if k != "time_s"}), "lacks required field 'time_s'"),
        (_parts(_header(frame_index="3")), "field 'frame_index' is str"),
        (_parts(_header(frame_index=True)), "field 'frame_index' is bool"),
        (_parts(_header(frame_index=-1)), "negative frame_index"),
        ([b"\xff\xfe", b"{}"], "not ASCII"),
    ],
)
def test_malformed_messages_are_rejected_with_a_clear_error(parts, complaint):
    with pytest.raises(ProtocolError) as info:
        protocol.decode(parts)
    assert complaint in str(info.value)


def test_make_rejects_unknown_type_and_missing_fields():
    with pytest.raises(ProtocolError, match="unknown message type"):
        protocol.make("bogus")
    with pytest.raises(ProtocolError, match="lacks required field 'series_id'"):
        protocol.make("end", n_frames=3, reason="completed")
