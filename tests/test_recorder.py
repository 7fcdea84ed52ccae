"""HDF5 recorder: survives SIGKILL mid-series, records from PUB sockets, exports CSV."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle filter for reading)
import numpy as np
import pytest
import zmq

from beamkin.protocol import make, send
from sinks.export import export_csv
from beamkin.recording import read_messages
from sinks.recorder import Recorder, run_recorder
ROOT = Path(__file__).resolve().parents[1]


def start_message(series_id="s1", **extra):
    fields = dict(series_id=series_id, kind="image", source="test", detector={"name": "d", "shape": [32, 40]},
                  geometry={}, frame_time_s=0.5, exposure_s=0.4, n_frames=None, gas_time_s=1.5)
    fields.update(extra)
    return make("start", arrays={"pixel_mask": np.eye(32, 40, dtype=np.uint32)}, **fields)


def frame_message(i, series_id="s1"):
    return make("frame", arrays={"image": (np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) + i)},
                series_id=series_id, frame_index=i, time_s=0.5 * i + 0.2, exposure_s=0.4)


WRITER = r"""
import sys
import numpy as np
from beamkin.protocol import make
from sinks.recorder import Recorder
recorder = Recorder(sys.argv[1], raw_frames=True)
recorder.write(make("start", series_id="s1", kind="image", source="t", detector={}, geometry={},
                    frame_time_s=0.1, exposure_s=0.1, n_frames=None, gas_time_s=None))
i = 0
while True:
    image = (np.arange(128 * 96, dtype=np.uint32).reshape(128, 96) * 7 + i) % 65521
    recorder.write(make("frame", arrays={"image": image}, series_id="s1", frame_index=i, time_s=0.1 * i, exposure_s=0.1))
    recorder.write(make("fraction", series_id="s1", frame_index=i, time_s=0.1 * i, exposure_s=0.1,
                        alpha=i / 1000, sigma_alpha=0.01, status="ok", reason=None))
    print(i, flush=True)
    i += 1
"""


@pytest.mark.parametrize("kill_after", [3, 40])
def test_recording_survives_sigkill_mid_series(tmp_path, kill_after):
    path = tmp_path / "killed.h5"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    last = -1
    try:
        for line in process.stdout:
            last = int(line)
            if last >= kill_after:
                break
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert last >= kill_after
    messages = list(read_messages(path))
    frames = [m for _, m in messages if m.type == "frame"]
    fractions = [m for _, m in messages if m.type == "fraction"]
    assert messages[0][1].type == "start"
    # every frame reported as flushed is there, complete and in order
    assert len(frames) >= last + 1 and len(fractions) >= last + 1
    for i, frame in enumerate(frames):
        assert frame["frame_index"] == i
        expected = (np.arange(128 * 96, dtype=np.uint32).reshape(128, 96) * 7 + i) % 65521
        np.testing.assert_array_equal(frame.arrays["image"], expected)
    assert [f["alpha"] for f in fractions] == pytest.approx([i / 1000 for i in range(len(fractions))])
    with h5py.File(path, "r") as f:
        # raw frames are stored with the bitshuffle filter (HDF5 filter id 32008), LZ4 (code 2)
        assert f["series/s1/frame/image"]._filters["32008"][-1] == 2


def test_raw_frames_off_keeps_headers_and_everything_else(tmp_path):
    path = tmp_path / "r.h5"
    with Recorder(path, raw_frames=False) as recorder:
        recorder.write(start_message())
        recorder.write(start_message())  # the same start from a second PUB: recorded once
        for i in range(3):
            recorder.write(frame_message(i))
        recorder.write(make("end", series_id="s1", n_frames=3, reason="completed"))
    messages = [m for _, m in read_messages(path)]
    assert [m.type for m in messages] == ["start", "frame", "frame", "frame", "end"]
    assert "image" not in messages[1].arrays and messages[2]["time_s"] == pytest.approx(0.7)
    np.testing.assert_array_equal(messages[0].arrays["pixel_mask"], np.eye(32, 40, dtype=np.uint32))
    with h5py.File(path, "r") as f:
        assert "frame" not in f["series/s1"]


def test_run_recorder_records_everything_published(tmp_path):
    context = zmq.Context.instance()
    # XPUB instead of PUB: it tells us when the recorder's subscription has arrived, so nothing
    # is published before the recorder can receive it (no sleep for the slow-joiner problem)
    raw, results = context.socket(zmq.XPUB), context.socket(zmq.XPUB)
    raw_port = raw.bind_to_random_port("tcp://127.0.0.1")
    results_port = results.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    path = tmp_path / "pub.h5"
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(counters=run_recorder(
        [f"tcp://127.0.0.1:{raw_port}", f"tcp://127.0.0.1:{results_port}"], path, True, stop, poll_ms=20)))
    thread.start()
    for publisher in (raw, results):
        assert publisher.poll(20_000), "the recorder never subscribed"
        assert publisher.recv() == b"\x01"  # subscribe to everything
    send(raw, start_message())
    send(results, start_message())
    for i in range(5):
        send(raw, frame_message(i))
        send(results, make("fraction", series_id="s1", frame_index=i, time_s=0.5 * i + 0.2, exposure_s=0.4,
                           alpha=0.1 * i, sigma_alpha=0.02, status="ok", reason=None))
    send(raw, make("end", series_id="s1", n_frames=5, reason="completed"))
    deadline = time.monotonic() + 20
    def recorded_types():  # the file is readable while it is being written (flushed per message)
        return [m.type for _, m in read_messages(path, with_arrays=False)]

    # two sockets: the raw end may overtake the last results fraction, so wait for both
    while time.monotonic() < deadline and not ("end" in recorded_types() and recorded_types().count("fraction") == 5):
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=10)
    raw.close(0)
    results.close(0)
    messages = [m for _, m in read_messages(path)]
    assert sum(m.type == "start" for m in messages) == 1
    assert [m["frame_index"] for m in messages if m.type == "frame"] == list(range(5))
    assert [m["alpha"] for m in messages if m.type == "fraction"] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert [m.type for m in messages].count("end") == 1
    assert outcome["counters"]["frame"] == 5 and outcome["counters"]["repeated"] == 1


def test_export_csv(tmp_path):
    path = tmp_path / "e.h5"
    radial = np.linspace(5, 10, 4)
    with Recorder(path) as recorder:
        recorder.write(start_message())
        for i in range(2):
            recorder.write(frame_message(i))
            recorder.write(make("pattern", arrays={"radial": radial, "intensity": radial * (i + 1), "sigma": np.sqrt(radial)},
                                series_id="s1", frame_index=i, time_s=0.5 * i + 0.2, unit="2th_deg"))
            recorder.write(make("fraction", series_id="s1", frame_index=i, time_s=0.5 * i + 0.2, exposure_s=0.4,
                                alpha=0.25 * i, sigma_alpha=0.05, status="ok", reason=None))
            recorder.write(make("posterior", series_id="s1", frame_index=i, time_s=0.5 * i + 0.2, onset_probability=0.3 * i,
                                leading_model="F1", models={"F1": {"probability": 0.7, "t0": {"mean": 7.4, "sd": 0.03}}},
                                model_averaged={"t0": {"mean": 7.45, "sd": 0.029}, "k": {"mean": 0.62, "sd": 0.02}}))
        recorder.write(make("alert", series_id="s1", frame_index=1, time_s=0.7, t0={"mean": 7.44, "sd": 0.03},
                            t0_minus_ts=5.94, leading_model="F1", leading_probability=0.7, onset_probability=0.99))
        recorder.write(make("end", series_id="s1", n_frames=2, reason="completed"))
    written = {p.name for p in export_csv(path, tmp_path / "csv")}
    assert written == {"series.csv", "fractions.csv", "patterns.csv", "posteriors.csv", "alerts.csv"}

    def rows(name):
        with open(tmp_path / "csv" / name, newline="") as handle:
            return list(csv.DictReader(handle))

    fractions = rows("fractions.csv")
    assert [float(r["alpha"]) for r in fractions] == [0.0, 0.25] and fractions[1]["status"] == "ok"
    patterns = rows("patterns.csv")
    assert len(patterns) == 8
    assert float(patterns[5]["intensity"]) == pytest.approx(2 * radial[1])
    assert float(patterns[5]["sigma"]) == pytest.approx(np.sqrt(radial[1]))
    posteriors = rows("posteriors.csv")
    assert float(posteriors[1]["model_averaged.t0.mean"]) == 7.45 and float(posteriors[1]["models.F1.t0.sd"]) == 0.03
    assert float(rows("alerts.csv")[0]["t0.mean"]) == 7.44
    (series,) = rows("series.csv")
    assert series["frames_recorded"] == "2" and series["end_reason"] == "completed" and float(series["gas_time_s"]) == 1.5


@pytest.mark.parametrize("series_id", ["a\x00b", "x/y.z%00", "\ud800lone", "é 1"])
def test_odd_series_ids_are_recorded_with_the_original_kept(tmp_path, series_id):
    """Issue 11: a series id with NUL made h5py raise ("VLEN strings do not support embedded
    NULLs") and took the pipeline down. Now the log and the group name hold a storable form,
    the series group keeps the exact original (JSON) and the header keeps it too."""
    import json

    path = tmp_path / "odd.h5"
    with Recorder(path, raw_frames=True) as recorder:
        recorder.write(start_message(series_id))
        recorder.write(frame_message(0, series_id))
        recorder.write(make("end", series_id=series_id, n_frames=1, reason="completed"))
        assert recorder.counters["start"] == 1 and recorder.counters["frame"] == 1 and recorder.counters["end"] == 1
    messages = [m for _, m in read_messages(path)]
    assert [m.series_id for m in messages] == [series_id] * 3
    np.testing.assert_array_equal(messages[1].arrays["image"], frame_message(0).arrays["image"])
    with h5py.File(path, "r") as f:
        (group,) = f["series"].values()
        assert json.loads(group.attrs["series_id_json"]) == series_id
        stored = f["log/series_id"].asstr()[0]
        assert "\x00" not in stored and (series_id.isprintable() or stored != series_id)


def test_a_message_that_cannot_be_written_is_counted_and_the_recorder_goes_on(tmp_path, monkeypatch):
    """A write that fails (here: the disk is full while frame 1's image is appended) is logged,
    counted as write_errors, and the recorder records what comes next."""
    original = Recorder._append_array

    def full_disk_at_frame_1(self, message, name, array):
        if message.type == "frame" and message.frame_index == 1:
            raise OSError(28, "No space left on device")
        return original(self, message, name, array)

    monkeypatch.setattr(Recorder, "_append_array", full_disk_at_frame_1)
    context = zmq.Context()
    publisher = context.socket(zmq.XPUB)
    port = publisher.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    outcome = {}
    path = tmp_path / "r.h5"
    thread = threading.Thread(target=lambda: outcome.update(counters=run_recorder(
        [f"tcp://127.0.0.1:{port}"], path, True, stop, poll_ms=20, drain_ms=300)))
    thread.start()
    try:
        assert publisher.poll(5000)  # the recorder's subscription
        publisher.recv()
        for message in (start_message("s1"), frame_message(0), frame_message(1), frame_message(2),
                        make("end", series_id="s1", n_frames=3, reason="completed")):
            send(publisher, message)
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=20)
        publisher.close(0)
        context.term()
    counters = outcome["counters"]
    assert counters["write_errors"] == 1 and counters["frame"] == 2 and counters["end"] == 1
    assert [m.frame_index for _, m in read_messages(path, types=["frame"])] == [0, 2]


def test_array_names_hdf5_cannot_hold_are_stored_under_a_safe_name(tmp_path):
    image = np.arange(6, dtype=np.uint16).reshape(2, 3)
    message = make("frame", arrays={"image": image, "odd\x00/name": image + 1}, series_id="s", frame_index=0,
                   time_s=0.1, exposure_s=0.1)
    with Recorder(tmp_path / "a.h5", raw_frames=True) as recorder:
        recorder.write(message)
    (_, back), = read_messages(tmp_path / "a.h5")
    np.testing.assert_array_equal(back.arrays["odd\x00/name"], image + 1)
