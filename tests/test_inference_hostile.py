"""The inference stage at the door: starts that would make the priors impossible, frame indices
beyond the series, forged starts and fractions, forged ends.  Each is logged and counted; the
stage and the good series live on, and nothing bounded grows without bound."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from beamkin import config as configuration
from beamkin import protocol
from inference.service import EARLY_SERIES_KEPT, FINISHED_SERIES_KEPT, InferenceStage, series_window
from simulator.experiment import exposure_averaged_alpha

FRAME_TIME_S, EXPOSURE_S, N_FRAMES = 1 / 3, 0.3, 36


@pytest.fixture
def stage():
    config = configuration.defaults()
    config["inference"].update(particles=128, models=["F1"], reorder_window=8, max_open_series=3)
    stage = InferenceStage(config, publisher=None, stop=threading.Event())
    stage.published = []
    stage.publish = stage.published.append
    yield stage
    for series in stage.series.values():
        series.live.close()


def start(series_id="s1", **fields):
    values = dict(source="test", series_id=series_id, kind="profile", detector={}, geometry={},
                  frame_time_s=FRAME_TIME_S, exposure_s=EXPOSURE_S, n_frames=N_FRAMES, gas_time_s=5.0)
    values.update(fields)
    return protocol.make("start", **values)


def fraction(series_id, j, alpha):
    return protocol.make("fraction", series_id=series_id, frame_index=j, time_s=(j + 0.5) * FRAME_TIME_S,
                         exposure_s=EXPOSURE_S, alpha=float(alpha), sigma_alpha=0.02, status="ok", reason=None)


def run_to_end(stage, series_id, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        while stage.work:
            stage.process_one()
        stage.idle()
        stage.poll_exact()
        if any(m.type == "result" and m["series_id"] == series_id for m in stage.published):
            return next(m for m in stage.published if m.type == "result" and m["series_id"] == series_id)["result"]
        time.sleep(0.005)
    raise AssertionError(f"series {series_id} did not finish")


def paper_alphas():
    times = (np.arange(N_FRAMES) + 0.5) * FRAME_TIME_S
    return exposure_averaged_alpha("F1", 7.4461, 0.6192, 1.0, 2.0, times, EXPOSURE_S) + \
        np.random.default_rng(3).normal(0, 0.02, N_FRAMES)


@pytest.mark.parametrize("fields, window, gas", [
    ({"frame_time_s": 0.0}, 600.0, 5.0),                      # no series length: max_series_s
    ({"gas_time_s": 100.0}, 12.0, None),                      # ts after the end: ignored
    ({"gas_time_s": -3.0}, 12.0, None),
    ({"n_frames": 36, "frame_time_s": float("inf")}, 600.0, 5.0),
])
def test_start_fields_that_would_make_the_priors_impossible_are_clamped(fields, window, gas, caplog):
    config = configuration.defaults()["inference"]
    end, gas_time, problems = series_window(config, start(**fields))
    assert end == pytest.approx(window) and gas_time == gas and problems


def test_a_stray_frame_index_is_not_assimilated_and_warned_once(stage, caplog):
    stage.handle_safely(start("s1"))
    alphas = paper_alphas()
    for j in range(N_FRAMES):
        stage.handle_safely(fraction("s1", j, alphas[j]))
        if j == 20:
            for stray in (200_000, 1_000_000, 36):
                stage.handle_safely(fraction("s1", stray, 0.0))
    stage.handle_safely(protocol.make("end", series_id="s1", n_frames=2 ** 62, reason="completed"))
    result = run_to_end(stage, "s1")
    assert result["n_frames"] == N_FRAMES and result["diagnostics"]["frames_missing"] == 0
    assert stage.series["s1"].counters["frames_out_of_range"] == 3
    assert sum("beyond the series" in r.getMessage() for r in caplog.records) == 1
    t0 = result["model_averaged"]["t0"]
    assert abs(t0["mean"] - 7.4461) < 4 * t0["sd"]


def test_forged_starts_and_unknown_series_keep_the_state_bounded(stage):
    threads_before = threading.active_count()
    for i in range(100):
        stage.handle_safely(start(f"forged-{i}"))
    open_series = [s for s in stage.series.values() if not s.finished]
    assert len(open_series) == 3 and len(stage.series) <= 3 + FINISHED_SERIES_KEPT
    ends = [m for m in stage.published if m.type == "end"]
    assert len(ends) == 97 and all(m["reason"].startswith("aborted: more than max_open_series") for m in ends)
    # the threads of the aborted series are gone: what is left belongs to the three open ones
    assert threading.active_count() - threads_before <= 3 * 8
    for i in range(2_000):
        stage.handle_safely(fraction(f"unknown-{i % 50}", i // 50, 0.0))
    assert len(stage.early) == EARLY_SERIES_KEPT
    assert stage.counters["frames_without_start_dropped"] > 0


def test_a_series_the_source_aborted_is_not_republished_as_completed(stage):
    stage.handle_safely(start("s2", n_frames=12))
    for j in range(6):
        stage.handle_safely(fraction("s2", j, 0.0))
    stage.handle_safely(protocol.make("end", series_id="s2", n_frames=6, reason="aborted"))
    result = run_to_end(stage, "s2")
    assert result["end_reason"] == "aborted" and result["n_frames"] == 6
    ends = [m for m in stage.published if m.type == "end" and m["series_id"] == "s2"]
    assert [m["reason"] for m in ends] == ["aborted"]


def test_a_start_whose_priors_cannot_be_built_is_rejected_and_the_stage_goes_on(stage):
    stage.settings = stage.settings.replace(priors={"k": [5.0, 1.0]})
    stage.handle_safely(start("bad"))
    assert "bad" not in stage.series and stage.closed["bad"] == "rejected"
    ends = [m for m in stage.published if m.type == "end" and m["series_id"] == "bad"]
    assert ends and "lower bound 5.0 must be below upper bound 1.0" in ends[0]["reason"]
    stage.handle_safely(fraction("bad", 0, 0.1))  # published (recorded), not assimilated
    assert stage.published[-1].type == "fraction" and stage.counters["frames_after_close"] == 1
