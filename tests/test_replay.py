"""Replay of recordings (same messages, same order, original timing / speed) and EIGER master files."""

from __future__ import annotations

import json
import pathlib
import threading
import time

import numpy as np
import pytest

from beamkin.protocol import make
from streamer.eiger_h5 import write_eiger_master
from sinks.recorder import Recorder
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


def test_a_series_recorded_with_two_ends_replays_one(tmp_path):
    """The recorder keeps the streamer's end and the inference's (which adds the provenance); a
    replay sends the series' end once, so the stages downstream see one series lifecycle."""
    original = recorded_series(tmp_path / "one_end.h5", n_frames=3)
    with Recorder(tmp_path / "both.h5", raw_frames=True) as recorder:
        for i, message in enumerate(original + [make("end", series_id="s1", n_frames=3, reason="completed",
                                                     provenance={"config_sha256": "0" * 64})]):
            recorder.write(message, received_s=1_000_000.0 + SPACING_S * i)
    source = open_source(f"replay:{tmp_path / 'both.h5'}", {"speed": 0, "progress": False})
    replayed = [m for _, m in collect(source)]
    assert [m.type for m in replayed] == ["start", "frame", "frame", "frame", "end"]
    assert "provenance" not in replayed[-1].fields and source.counters["repeated_end"] == 1


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


# ------------------------------------------------ replay what a recording holds (issue 13, item 4)
def kinetics_recording(path, n_frames=24, raw_frames=False, with_fractions=True):
    """A recording as `beamkin run` writes it without raw frames: start, frames (header only),
    fractions of an F1 reaction (t0 = 6 s, k = 0.7 1/s, sigma 0.02), end."""
    from inference.models import alpha_numpy

    t = np.arange(n_frames) * 0.5 + 0.25
    y = alpha_numpy("F1", 0.7 * (t - 6.0)) + np.random.default_rng(2).normal(0, 0.02, n_frames)
    messages = [make("start", series_id="rec1", kind="profile", source="test", detector={}, geometry={},
                     frame_time_s=0.5, exposure_s=0.5, n_frames=n_frames, gas_time_s=3.0)]
    for j in range(n_frames):
        messages.append(make("frame", arrays={"image": np.zeros((4, 4), np.uint16)}, series_id="rec1",
                             frame_index=j, time_s=float(t[j]), exposure_s=0.5))
        if with_fractions:
            messages.append(make("fraction", series_id="rec1", frame_index=j, time_s=float(t[j]), exposure_s=0.5,
                                 alpha=float(y[j]), sigma_alpha=0.02, status="ok", reason=None))
    messages.append(make("end", series_id="rec1", n_frames=n_frames, reason="completed"))
    with Recorder(path, raw_frames=raw_frames) as recorder:
        for i, message in enumerate(messages):
            recorder.write(message, received_s=1_000_000.0 + 0.01 * i)
    return messages


def replay_result(path, out, particles=256):
    """Run `beamkin replay PATH --speed 0 --json OUT` (real processes on loopback); returns the
    result and the command's output."""
    import os
    import signal

    from beamkin.loopback import LoopbackPorts, beamkin_process

    process = beamkin_process("replay", str(path), "--speed", "0", "--json", str(out),
                              "--inference.particles", str(particles), *LoopbackPorts.free().options())
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-3000:]
    return json.loads(pathlib.Path(out).read_text()), output


def engine_for_recording(messages, particles=256):
    """The engine the live service builds for the recording's start message (default settings)."""
    from beamkin import config as configuration
    from inference.service import make_engine

    table = configuration.defaults()["inference"]
    table["particles"] = particles
    return make_engine(table, messages[0])


def test_replay_plan_follows_what_the_recording_holds(tmp_path):
    from beamkin.recording import RecordingInputError
    from streamer.replay import replay_plan

    with_frames, without_frames, nothing = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"
    kinetics_recording(with_frames, n_frames=4, raw_frames=True)
    kinetics_recording(without_frames, n_frames=4, raw_frames=False)
    kinetics_recording(nothing, n_frames=4, raw_frames=False, with_fractions=False)
    mode, contents = replay_plan(with_frames)
    assert mode == "frames" and contents["frames_with_data"] == 4 and contents["fractions"] == 4
    mode, contents = replay_plan(without_frames)
    assert mode == "fractions" and contents["frames"] == 4 and contents["frames_with_data"] == 0
    assert replay_plan(with_frames, "fractions")[0] == "fractions"
    with pytest.raises(RecordingInputError, match=r"4 of 4 frames were recorded without their image .*--from fractions"):
        replay_plan(without_frames, "frames")
    with pytest.raises(RecordingInputError, match="without their images .* and it holds no phase fractions"):
        replay_plan(nothing)


def test_reduced_replay_sends_the_first_series_fractions_and_patterns(tmp_path):
    from streamer.replay import ReducedReplay

    path = tmp_path / "rec.h5"
    original = kinetics_recording(path, n_frames=5)
    source = ReducedReplay(path, {"speed": 0, "progress": False})
    replayed = [m for _, m in collect(source)]
    assert [m.type for m in replayed] == ["start"] + ["fraction"] * 5 + ["end"]
    for got, want in zip(replayed, [m for m in original if m.type != "frame"]):
        assert_same(got, want)
    assert source.counters["fractions"] == 5


def test_reduced_replay_keeps_fractions_recorded_after_the_end(tmp_path):
    """Live, the streamer's end reaches the recorder before the inference republishes the last
    fractions: the replay sends them all, and the end last."""
    from streamer.replay import ReducedReplay

    path = tmp_path / "rec.h5"
    messages = kinetics_recording(path, n_frames=4)
    fractions = [m for m in messages if m.type == "fraction"]
    end = messages[-1]
    late = [messages[0], *fractions[:2], end, *fractions[2:],
            make("start", series_id="rec2", kind="profile", source="test", detector={}, geometry={},
                 frame_time_s=0.5, exposure_s=0.5, n_frames=1, gas_time_s=None)]
    with Recorder(path) as recorder:
        for i, message in enumerate(late):
            recorder.write(message, received_s=1_000_000.0 + 0.01 * i)
    replayed = [m for _, m in collect(ReducedReplay(path, {"speed": 0, "progress": False}))]
    assert [m.type for m in replayed] == ["start"] + ["fraction"] * 4 + ["end"]
    assert [m.frame_index for m in replayed[1:-1]] == [0, 1, 2, 3]


def test_replay_without_raw_frames_reproduces_the_live_posterior(tmp_path):
    """`beamkin replay` of a recording made without raw frames feeds its fractions to a real
    inference process; the result equals the live service's engine fed the same fractions."""
    path = tmp_path / "rec.h5"
    messages = kinetics_recording(path)
    replayed, output = replay_result(path, tmp_path / "replayed.json")
    assert "holds no raw frames; replaying its 24 phase fractions" in output
    assert "frame missing" not in output
    live = engine_for_recording(messages)
    live.warm_up()
    for m in messages:
        if m.type == "fraction":
            live.assimilate(m["frame_index"], m["time_s"], m["exposure_s"], m["alpha"], m["sigma_alpha"])
    want = json.loads(json.dumps(live.result()))
    # The live exact sampler tempers in the frames that arrived while it was busy as one batch, so
    # the posterior equals the frame-by-frame one within Monte Carlo error, not bit for bit.
    assert replayed["n_frames"] == 24 and sorted(replayed["models"]) == sorted(want["models"])
    for name, model in want["models"].items():
        assert abs(replayed["models"][name]["probability"] - model["probability"]) < 0.05
    for param in ("t0", "k"):
        got, ref = replayed["models"]["F1"]["params"][param], want["models"]["F1"]["params"][param]
        assert abs(got["mean"] - ref["mean"]) < 0.5 * ref["sd"], (param, got, ref)
        assert got["sd"] == pytest.approx(ref["sd"], rel=0.3)
    t0 = replayed["models"]["F1"]["params"]["t0"]
    assert t0["q05"] < 6.0 < t0["q95"]  # the truth of the recorded reaction


def test_replay_that_cannot_be_done_says_why(tmp_path, capsys):
    from beamkin import cli

    path = tmp_path / "empty-series.h5"
    kinetics_recording(path, n_frames=3, with_fractions=False)
    assert cli.main(["replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"beamkin replay: {path} cannot be replayed: its frames were recorded without their images "
                   "(raw_frames = false) and it holds no phase fractions\n")
    with_fractions = tmp_path / "fractions-only.h5"
    kinetics_recording(with_fractions, n_frames=3)
    assert cli.main(["replay", str(with_fractions), "--from", "frames"]) == 2
    assert "3 of 3 frames were recorded without their image" in capsys.readouterr().err


def test_replay_takes_the_frames_in_the_recorded_runs_exact_steps(tmp_path):
    """The recorded posteriors say which frames each exact step of the live run took (``batch``);
    the replay hands that schedule to the inference, whose result then equals the live run's
    engine fed the same batches, number for number."""
    path = tmp_path / "rec.h5"
    schedule = [5, 1, 1, 10, 7]
    messages = kinetics_recording(path)
    fractions = [m for m in messages if m.type == "fraction"]
    posteriors, first = [], 0
    for size in schedule:  # what the live exact sampler published, one posterior per step
        batch = [m["frame_index"] for m in fractions[first:first + size]]
        last = fractions[first + size - 1]
        posteriors.append(make("posterior", series_id="rec1", frame_index=last["frame_index"], time_s=last["time_s"],
                               onset_probability=0.5, leading_model="F1", models={}, model_averaged={},
                               batch=batch))
        first += size
    with Recorder(path) as recorder:
        for i, message in enumerate(messages[:-1] + posteriors + messages[-1:]):
            recorder.write(message, received_s=1_000_000.0 + 0.01 * i)

    replayed, _ = replay_result(path, tmp_path / "replayed.json")
    live = engine_for_recording(messages)
    first = 0
    for size in schedule:
        live.assimilate_batch([(m["frame_index"], m["time_s"], m["exposure_s"], m["alpha"], m["sigma_alpha"])
                               for m in fractions[first:first + size]])
        first += size
    want = json.loads(json.dumps(live.result()))
    assert replayed["schedule"] == schedule
    for name, model in want["models"].items():
        assert replayed["models"][name]["log_evidence"] == pytest.approx(model["log_evidence"], abs=1e-9)
        for param, summary in model["params"].items():
            assert replayed["models"][name]["params"][param] == pytest.approx(summary, abs=1e-9), (name, param)
