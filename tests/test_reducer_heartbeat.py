"""A reducer worker's heartbeat comes from its socket thread, not from the thread that reduces:
a long frame (pyFAI building its engine, a loaded host) keeps the worker alive at the streamer,
and a frame that outlasts ``frame_timeout_s`` stops the heartbeat so the streamer can declare the
worker lost. A real Worker on loopback TCP, with the streamer's side played by a ROUTER here."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from beamkin import protocol
from reducer import service
from reducer.service import HEARTBEAT_S, SeriesReduction
from tests.worker_on_loopback import WorkerOnLoopback

#: how long the reduction of the test's one frame takes (seconds): several heartbeats long
SLOW_FRAME_S = 6.0


@pytest.fixture
def slow_reduction(monkeypatch):
    """SeriesReduction.reduce that first sleeps SLOW_FRAME_S (as a long pyFAI call would), then
    reduces the frame for real."""
    real = SeriesReduction.reduce

    def slow(self, frame):
        time.sleep(SLOW_FRAME_S)
        return real(self, frame)

    monkeypatch.setattr(SeriesReduction, "reduce", slow)


def one_slow_frame(frame_timeout_s: float) -> tuple[list[float], float, float, list[protocol.Message]]:
    """Run a worker, give it a profile series' start and one frame; return the arrival times of its
    ``ready`` messages, the time the frame was sent and acknowledged (``done``), and what reached
    the inference."""
    readies: list[float] = []
    received: list[protocol.Message] = []
    with WorkerOnLoopback({"frame_timeout_s": frame_timeout_s}, name="slow") as running:
        running.send(protocol.make("start", source="test", series_id="s", kind="profile", detector={}, geometry={},
                                   frame_time_s=0.3, exposure_s=0.3, n_frames=1, gas_time_s=None))
        while True:  # until a ready lists the series: the worker has set it up
            message = running.from_worker(20)
            assert message is not None
            if message.type == "ready" and message["series"] == ["s"]:
                break
        two_theta = np.linspace(2.0, 20.0, 400)
        running.send(protocol.make("frame", {"two_theta_deg": two_theta, "counts": 100.0 + two_theta},
                                   series_id="s", frame_index=0, time_s=0.15, exposure_s=0.3))
        sent = time.monotonic()
        done = None
        while done is None:
            message = running.from_worker(SLOW_FRAME_S + 20)
            assert message is not None
            if message.type == "ready":
                readies.append(time.monotonic())
            elif message.type == "done":
                done = time.monotonic()
                assert (message["series_id"], message["frame_index"]) == ("s", 0)
        after = time.monotonic()
        while time.monotonic() - after < 3 * HEARTBEAT_S:  # the heartbeat goes on once the frame is done
            message = running.from_worker(0.1)
            if message is not None and message.type == "ready":
                readies.append(time.monotonic())
        while running.results.poll(5000):
            received.append(protocol.recv(running.results)[1])
            if received[-1].type == "fraction":
                break
    return readies, sent, done, received


def test_a_worker_busy_with_one_long_frame_goes_on_beating(slow_reduction):
    readies, sent, done, received = one_slow_frame(frame_timeout_s=60.0)
    during = [t for t in readies if sent < t < done]
    # one heartbeat a second while the frame is reduced; the old single-threaded worker sent none,
    # and a streamer with worker_timeout_s below SLOW_FRAME_S declared it lost
    assert len(during) >= SLOW_FRAME_S / HEARTBEAT_S - 2, (during, sent, done)
    assert max(np.diff([sent, *during, done])) < SLOW_FRAME_S / 2
    assert [m.type for m in received][-1] == "fraction" and received[-1]["frame_index"] == 0


def test_a_worker_stuck_past_frame_timeout_stops_beating_and_says_why(slow_reduction, caplog):
    frame_timeout_s = 1.0
    with caplog.at_level(logging.ERROR, logger=service.log.name):
        readies, sent, done, received = one_slow_frame(frame_timeout_s=frame_timeout_s)
    # beats while the frame is within its time, none for the rest of it (the streamer, whose
    # worker_timeout_s is larger than frame_timeout_s + a heartbeat, would declare it lost here)
    silent_from = sent + frame_timeout_s + 2 * HEARTBEAT_S
    assert done - silent_from > 2.0  # the test leaves a silence long enough to tell
    assert [t for t in readies if silent_from < t < done] == [], (readies, sent, done)
    assert [t for t in readies if t > done], "the heartbeat did not resume after the frame"
    stuck = [r for r in caplog.records if "heartbeat stopped" in r.getMessage()]
    assert len(stuck) == 1 and "frame 0" in stuck[0].getMessage() and stuck[0].series_id == "s"
    assert received[-1].type == "fraction"  # the frame is still reduced and sent when it finishes
