"""The inference stage as a real process on real sockets: ordering, missing frames, bad input."""

from __future__ import annotations

import os
import random
import signal
import time

import numpy as np
import pytest
import zmq

from beamkin import protocol
from beamkin.loopback import LoopbackPorts, beamkin_process, results_listener
from simulator.experiment import exposure_averaged_alpha

FRAME_TIME_S, EXPOSURE_S, N_FRAMES, MISSING = 1 / 3, 0.3, 36, 17


@pytest.fixture
def inference_stage():
    ports = LoopbackPorts.free()
    stage = beamkin_process(
        "infer", f"--endpoints.reduced=tcp://127.0.0.1:{ports.reduced}",
        f"--endpoints.results=tcp://127.0.0.1:{ports.results}",
        "--inference.particles", "512", "--inference.models", "F1,A2", "--inference.missing_timeout_s", "1.0",
    )
    deadline = time.monotonic() + 120
    for line in stage.stdout:
        if "BEAMKIN-READY" in line or time.monotonic() > deadline:
            break
    yield ports, stage
    if stage.poll() is None:
        os.killpg(stage.pid, signal.SIGINT)
        try:
            stage.wait(20)
        except Exception:
            os.killpg(stage.pid, signal.SIGKILL)


def test_shuffled_frames_are_assimilated_in_order_and_gaps_and_garbage_reported(inference_stage):
    ports, stage = inference_stage
    context = zmq.Context()
    listener = results_listener(context, ports)
    push = context.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{ports.reduced}")
    time.sleep(0.5)  # let the SUB connection settle before the series starts
    times = np.arange(N_FRAMES) * FRAME_TIME_S + EXPOSURE_S / 2
    alphas = exposure_averaged_alpha("F1", 7.4461, 0.6192, 1.0, 2.0, times, EXPOSURE_S)
    alphas = alphas + np.random.default_rng(5).normal(0, 0.02, N_FRAMES)

    push.send_multipart([b"fraction", b"{garbage"])  # malformed: must be counted, not fatal
    push.send_multipart([b"bogus"])
    protocol.send(push, protocol.make(
        "start", series_id="s1", kind="profile", source="test", detector={}, geometry={},
        frame_time_s=FRAME_TIME_S, exposure_s=EXPOSURE_S, n_frames=N_FRAMES, gas_time_s=5.0))
    order = [j for j in range(N_FRAMES) if j != MISSING]
    random.Random(1).shuffle(order)
    for j in order:
        protocol.send(push, protocol.make(
            "fraction", series_id="s1", frame_index=j, time_s=float(times[j]), exposure_s=EXPOSURE_S,
            alpha=float(alphas[j]), sigma_alpha=0.02, status="ok", reason=None))
    protocol.send(push, protocol.make("end", series_id="s1", n_frames=N_FRAMES, reason="completed"))

    messages = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(m.type == "result" for m in messages):
        if listener.poll(200):
            messages.append(protocol.decode(listener.recv_multipart()))
    push.close(0)
    listener.close(0)
    context.term()

    # every frame but the missing one, in order; the exact sampler takes the frames that arrived
    # while it was busy together (a posterior per batch, its last frame's index)
    posteriors = [m for m in messages if m.type == "posterior"]
    assert [j for m in posteriors for j in m["batch"]] == [j for j in range(N_FRAMES) if j != MISSING]
    assert [m["frame_index"] for m in posteriors] == [m["batch"][-1] for m in posteriors]
    estimates = [m["frame_index"] for m in messages if m.type == "estimate"]
    assert estimates == [j for j in range(N_FRAMES) if j != MISSING]
    result = next(m for m in messages if m.type == "result")["result"]
    assert result["diagnostics"]["frames_missing"] == 1
    assert result["diagnostics"]["missing_indices"] == [MISSING]
    statuses = [m for m in messages if m.type == "status" and m["stage"] == "inference"]
    assert statuses and statuses[-1]["counters"]["malformed_messages"] == 2
    t0 = result["model_averaged"]["t0"]
    assert abs(t0["mean"] - 7.4461) < 3 * t0["sd"]
    assert stage.poll() is None, "the stage must keep running after bad input"


def test_a_failing_sampler_aborts_its_series_and_keeps_the_stage_and_the_data():
    """The exact sampler of a series fails at frame 3: the posteriors before it are published,
    the series ends once with reason "aborted" and a status naming the error, and the later
    fractions are still published (recorded), not lost."""
    import threading

    from beamkin import config as configuration
    from inference.service import InferenceStage
    from tests.test_inference_live import before_each_update, fail_at, wait_caught_up

    config = configuration.defaults()
    config["inference"].update(particles=128, models=["F1"], reorder_window=8)
    stage = InferenceStage(config, publisher=None, stop=threading.Event())
    published = []
    stage.publish = published.append
    start = protocol.make("start", source="test", series_id="bad", kind="profile", detector={}, geometry={},
                          frame_time_s=FRAME_TIME_S, exposure_s=EXPOSURE_S, n_frames=8, gas_time_s=None)
    stage.handle(start)
    live = stage.series["bad"].live
    before_each_update(live.engine, fail_at(3))
    for j in range(8):
        stage.handle(protocol.make("fraction", series_id="bad", frame_index=j, time_s=(j + 0.5) * FRAME_TIME_S,
                                   exposure_s=EXPOSURE_S, alpha=0.0, sigma_alpha=0.02, status="ok", reason=None))
        while stage.work:
            stage.process_one()
        wait_caught_up(live, 30.0)
        stage.poll_exact()
    kinds = [(m.type, m.get("frame_index")) for m in published]
    assert [i for t, i in kinds if t == "posterior"] == [0, 1, 2]
    assert [i for t, i in kinds if t == "fraction"] == list(range(8))
    ends = [m for m in published if m.type == "end"]
    assert len(ends) == 1 and ends[0]["reason"] == "aborted"
    status = [m for m in published if m.type == "status" and "error" in m["counters"]]
    assert "all particles have zero likelihood" in status[0]["counters"]["error"]
    assert stage.finished_series == 1 and stage.series["bad"].counters["frames_after_failure"] >= 3
