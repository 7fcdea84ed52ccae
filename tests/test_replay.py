"""Replay of recordings (same messages, same order, original timing / speed) and EIGER master files."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from beamkin.protocol import make
from streamer.eiger_h5 import write_eiger_master
from streamer.recorder import Recorder
from streamer.sources import open_source

SPACING_S = 0.1


def recorded_series(path, n_frames=6, with_end=True, raw_frames=True):
    messages = [make("start", arrays={"pixel_mask": np.zeros((8, 10), np.uint32)}, series_id="s1", kind="image",
                     source="dectris2:tcp://x", detector={"name": "d", "shape": [8, 10]}, geometry={"distance_m": 0.2},
                     frame_time_s=0.5, exposure_s=0.4, n_frames=n_frames, gas_time_s=1.0)]
    for i in range(n_frames):
        messages.append(make("frame", arrays={"image": np.full((8, 10), i, np.uint16)}, series_id="s1", frame_index=i,
                             time_s=0.5 * i + 0.2, exposure_s=0.4))
        messages.append(make("fraction", series_id="s1", frame_index=i, time_s=0.5 * i + 0.2, exposure_s=0.4,
                             alpha=i / 10, sigma_alpha=0.01, status="ok", reason=None))
    if with_end:
        messages.append(make("end", series_id="s1", n_frames=n_frames, reason="completed"))
    with Recorder(path, raw_frames=raw_frames) as recorder:
        for i, message in enumerate(messages):
            recorder.write(message, received_s=1_000_000.0 + SPACING_S * i)
    return messages


def collect(source, stop=None):
    stop = stop or threading.Event()
    out = []
    for message in source.messages(stop):
        out.append((time.monotonic(), message))
    return out


def assert_same(a, b):
    assert a.type == b.type and a.fields == b.fields
    assert a.arrays.keys() == b.arrays.keys()
    for name in a.arrays:
        assert a.arrays[name].dtype == b.arrays[name].dtype
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name])


def test_round_trip_same_messages_same_order_scaled_timing(tmp_path):
    path = tmp_path / "rec.h5"
    original = recorded_series(path)
    speed = 2.0
    replayed = collect(open_source(f"replay:{path}", {"speed": speed, "types": "all", "progress": False}))
    assert len(replayed) == len(original)
    for (_, got), want in zip(replayed, original):
        assert_same(got, want)
    times = np.array([t for t, _ in replayed])
    gaps = np.diff(times)
    expected_gap = SPACING_S / speed
    # a paced replay never runs ahead of the schedule; it may lag by scheduling jitter only
    assert times[-1] - times[0] >= (len(original) - 1) * expected_gap * 0.99
    assert np.median(gaps) == pytest.approx(expected_gap, abs=0.02)


def test_default_types_are_the_series_and_fast_replay(tmp_path):
    path = tmp_path / "rec.h5"
    original = recorded_series(path)
    replayed = [m for _, m in collect(open_source(f"replay:{path}", {"speed": 0, "progress": False}))]
    wanted = [m for m in original if m.type in ("start", "frame", "end")]
    assert [m.type for m in replayed] == [m.type for m in wanted]
    for got, want in zip(replayed, wanted):
        assert_same(got, want)


def test_missing_end_and_missing_images(tmp_path):
    path = tmp_path / "rec.h5"
    recorded_series(path, n_frames=3, with_end=False, raw_frames=False)
    source = open_source(f"replay:{path}", {"speed": 0, "progress": False})
    replayed = [m for _, m in collect(source)]
    assert [m.type for m in replayed] == ["start", "end"]
    assert replayed[-1]["reason"] == "aborted"
    assert source.counters["frames_not_recorded"] == 3 and source.counters["missing_end"] == 1


def test_stop_event_ends_replay_early(tmp_path):
    path = tmp_path / "rec.h5"
    recorded_series(path, n_frames=50)
    stop = threading.Event()
    source = open_source(f"replay:{path}", {"speed": 1.0, "progress": False})
    got = []
    for message in source.messages(stop):
        got.append(message)
        if len(got) == 3:
            stop.set()
    assert len(got) < 10 and got[-1].type == "end" and got[-1]["reason"] == "aborted"


def test_progress_goes_to_stderr(tmp_path, capsys):
    path = tmp_path / "rec.h5"
    recorded_series(path, n_frames=2)
    collect(open_source(f"replay:{path}", {"speed": 0}))
    assert "replay rec.h5: 4/4 messages (100%)" in capsys.readouterr().err


def test_eiger_master_replay(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.poisson(4, size=(7, 12, 16)).astype(np.uint16)
    mask = np.zeros((12, 16), np.uint32)
    mask[0, :] = 1
    master = write_eiger_master(tmp_path / "series_1_master.h5", images, frames_per_file=3, frame_time=0.25,
                                count_time=0.2, wavelength=0.7, beam_center=(8.5, 6.0), distance=0.15, pixel_mask=mask)
    replayed = [m for _, m in collect(open_source(f"replay:{master}", {"speed": 0, "gas_time_s": 0.5, "progress": False}))]
    assert [m.type for m in replayed] == ["start"] + ["frame"] * 7 + ["end"]
    start = replayed[0]
    assert start["detector"]["shape"] == [12, 16] and start["detector"]["pixel_size_m"] == [75e-6, 75e-6]
    assert start["geometry"]["beam_center_px"] == [8.5, 6.0] and start["geometry"]["distance_m"] == 0.15
    assert start["geometry"]["wavelength_A"] == pytest.approx(0.7)
    assert start["n_frames"] == 7 and start["gas_time_s"] == 0.5 and start["exposure_s"] == pytest.approx(0.2)
    np.testing.assert_array_equal(start.arrays["pixel_mask"], mask)
    for i, frame in enumerate(replayed[1:-1]):
        np.testing.assert_array_equal(frame.arrays["image"], images[i])
        assert frame["time_s"] == pytest.approx(0.25 * i + 0.1)
    assert replayed[-1]["reason"] == "completed"


def test_replay_of_something_else_is_refused(tmp_path):
    path = tmp_path / "x.h5"
    path.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="neither"):
        open_source(f"replay:{path}")


def test_eiger_master_with_a_missing_data_file_ends_aborted(tmp_path):
    images = np.arange(5 * 4 * 6, dtype=np.uint16).reshape(5, 4, 6)
    master = write_eiger_master(tmp_path / "m_master.h5", images, frames_per_file=2, frame_time=0.1)
    (tmp_path / "m_data_000002.h5").write_bytes(b"corrupt")
    source = open_source(f"replay:{master}", {"speed": 0, "progress": False})
    replayed = [m for _, m in collect(source)]
    assert [m.type for m in replayed] == ["start", "frame", "frame", "end"]
    assert replayed[-1]["reason"] == "aborted" and source.counters["malformed"] == 1


def test_damaged_recording_stops_cleanly(tmp_path):
    import h5py

    path = tmp_path / "rec.h5"
    recorded_series(path, n_frames=4)
    with h5py.File(path, "r+") as f:
        f["log/header"][3] = "{not json"  # message 3 is the second frame
    source = open_source(f"replay:{path}", {"speed": 0, "progress": False})
    replayed = [m for _, m in collect(source)]
    assert [m.type for m in replayed] == ["start", "frame", "end"]
    assert replayed[-1]["reason"] == "aborted" and source.counters["malformed"] == 1
