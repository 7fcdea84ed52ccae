"""An aborted series does not wait for its exact sampler (found by bench/bench_soak.py).

A series the inference gives up (a start beyond ``max_open_series``, ``series_idle_s``) gets no
result, so the frames its exact sampler still has queued are dropped and the step in progress is
not waited for. Before, ``LiveInference.close`` assimilated every queued frame first: with the
sampler thousands of frames behind (1D profiles at tens of Hz) the inference's loop stopped for
minutes at the fifth series of a soak run, and with it the reducers and the streamer.
The slow step is made slow by an event, not by the machine: no timing is measured.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from beamkin import config as configuration
from beamkin import protocol
from inference.live import LiveInference
from inference.priors import Priors
from inference.service import InferenceStage
from inference.smc import OnlineInference

FRAME_TIME_S, EXPOSURE_S, N_FRAMES = 1 / 3, 0.3, 36
LIVENESS_S = 120.0  # a call that has not returned by then is blocked (not a speed limit)


def block_exact_steps(engine: OnlineInference) -> tuple[threading.Event, threading.Event, list[int]]:
    """Make each exact step of ``engine`` wait for ``release`` (``entered`` set when one is
    waiting); the frame indices it assimilates are listed."""
    entered, release, assimilated = threading.Event(), threading.Event(), []
    original = engine.update_batch

    def update_batch(frames):
        entered.set()
        release.wait()
        assimilated.extend(frame[0] for frame in frames)
        return original(frames)

    engine.update_batch = update_batch
    return entered, release, assimilated


def returns(call) -> bool:
    """Run ``call`` on a thread; True when it returned within LIVENESS_S."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(LIVENESS_S)
    return not thread.is_alive()


def alpha(j: int) -> float:
    return float(np.clip(0.6 * ((j + 0.5) * FRAME_TIME_S - 7.4), 0.0, 1.0))


def test_close_without_finishing_drops_the_queued_frames_and_does_not_wait():
    engine = OnlineInference(models=("F1",), priors=Priors.for_series(N_FRAMES * FRAME_TIME_S), n_particles=128, seed=1)
    live = LiveInference(engine)
    entered, release, assimilated = block_exact_steps(engine)
    live.submit(0, 0.5 * FRAME_TIME_S, EXPOSURE_S, alpha(0), 0.02)
    assert entered.wait(LIVENESS_S)  # frame 0's step is in progress, held
    for j in range(1, 10):
        live.submit(j, (j + 0.5) * FRAME_TIME_S, EXPOSURE_S, alpha(j), 0.02)
    assert returns(lambda: live.close(finish_queued=False))
    release.set()
    live._thread.join(LIVENESS_S)
    assert not live._thread.is_alive()
    assert assimilated == [0]  # the step in progress ended; frames 1..9 were dropped


def test_close_of_an_idle_sampler_ends_its_thread_before_returning():
    engine = OnlineInference(models=("F1",), priors=Priors.for_series(N_FRAMES * FRAME_TIME_S), n_particles=128, seed=1)
    live = LiveInference(engine)
    live.close(finish_queued=False)
    assert not live._thread.is_alive()


def start(series_id: str) -> protocol.Message:
    return protocol.make("start", source="test", series_id=series_id, kind="profile", detector={}, geometry={},
                         frame_time_s=FRAME_TIME_S, exposure_s=EXPOSURE_S, n_frames=N_FRAMES, gas_time_s=5.0)


def fraction(series_id: str, j: int) -> protocol.Message:
    return protocol.make("fraction", series_id=series_id, frame_index=j, time_s=(j + 0.5) * FRAME_TIME_S,
                         exposure_s=EXPOSURE_S, alpha=alpha(j), sigma_alpha=0.02, status="ok", reason=None)


@pytest.fixture
def stage():
    config = configuration.defaults()
    config["inference"].update(particles=128, models=["F1"], max_open_series=1)
    stage = InferenceStage(config, publisher=None, stop=threading.Event())
    stage.published = []
    stage.publish = stage.published.append
    yield stage
    for series in stage.series.values():
        series.live.close(finish_queued=False)


def test_a_series_superseded_while_its_sampler_is_behind_ends_at_once(stage):
    stage.handle_safely(start("behind"))
    live = stage.series["behind"].live
    entered, release, assimilated = block_exact_steps(live.engine)
    for j in range(20):
        stage.handle_safely(fraction("behind", j))
        while stage.work:
            stage.process_one()
    assert entered.wait(LIVENESS_S) and stage.series["behind"].live.frames_behind == 20
    try:
        # a new series beyond max_open_series = 1: the old one is aborted without its queued frames
        assert returns(lambda: stage.handle_safely(start("next")))
        ends = [m for m in stage.published if m.type == "end" and m["series_id"] == "behind"]
        assert len(ends) == 1 and ends[0]["reason"].startswith("aborted: more than max_open_series")
        assert "next" in stage.series and not stage.series["next"].finished
    finally:
        release.set()
    live._thread.join(LIVENESS_S)
    assert not live._thread.is_alive() and assimilated == [0]
