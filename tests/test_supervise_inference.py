"""The inference ends a series whose start it never got as incomplete, counting the frames lost
(what a restarted inference does with the series its predecessor was analysing)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import zmq

from beamkin import protocol
from beamkin.loopback import LoopbackPorts, beamkin_process, results_listener


def fraction(series_id: str, index: int) -> protocol.Message:
    return protocol.make("fraction", series_id=series_id, frame_index=index, time_s=index / 3, exposure_s=0.3,
                         alpha=0.0, sigma_alpha=0.02, status="ok", reason=None)


def start_infer(ports: LoopbackPorts, tmp_path, env: dict[str, str] | None):
    stage = beamkin_process(
        "infer", f"--endpoints.reduced=tcp://127.0.0.1:{ports.reduced}",
        f"--endpoints.results=tcp://127.0.0.1:{ports.results}", "--inference.particles", "256",
        "--inference.models", "F1", "--inference.start_wait_s", "2.0", "--inference.once", "true",
        "--inference.json", str(tmp_path / "result.json"), env=env)
    deadline = time.monotonic() + 120
    for line in stage.stdout:
        if "BEAMKIN-READY" in line or time.monotonic() > deadline:
            break
    return stage


@pytest.mark.parametrize("restarted, with_end", [(False, True), (True, False)],
                         ids=["start-lost-then-end", "restarted-no-end"])
def test_series_without_start_ends_incomplete_with_frames_lost(tmp_path, restarted, with_end):
    ports = LoopbackPorts.free()
    stage = start_infer(ports, tmp_path, {"BEAMKIN_RESTART": "1"} if restarted else None)
    context = zmq.Context()
    listener = results_listener(context, ports)
    push = context.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{ports.reduced}")
    messages = []
    try:
        time.sleep(0.5)  # let the SUB connection settle
        for index in (7, 8, 10, 11):  # frames 0-6 and 9 went to a predecessor, or nowhere
            protocol.send(push, fraction("s1", index))
        if with_end:
            protocol.send(push, protocol.make("end", series_id="s1", n_frames=14, reason="completed"))
        stage.wait(120)
        output = stage.stdout.read()
        while listener.poll(500):
            messages.append(protocol.decode(listener.recv_multipart()))
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
        push.close(0)
        listener.close(0)
        context.term()
    reason = "incomplete: inference restarted" if restarted else "incomplete: start not received"
    assert stage.returncode == 4, output  # with once: the series ended incomplete
    n_frames, lost = (14, 10) if with_end else (12, 8)  # without an end: counted up to the last frame seen
    ends = [m for m in messages if m.type == "end"]
    assert [(m["reason"], m["n_frames"]) for m in ends] == [(reason, n_frames)]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["end_reason"] == reason and result["frames_lost"] == lost and result["frames_received"] == 4
    assert result["n_frames_known"] is with_end
    assert result["frames_lost_indices"] == [i for i in range(n_frames) if i not in (7, 8, 10, 11)]
    at_least = "" if with_end else "at least "
    assert f"series {reason}: its start and {at_least}{lost} of its {at_least}{n_frames} frames never reached" in output
    # the fractions are kept in the published stream (for the recorder), not assimilated
    assert sorted(m["frame_index"] for m in messages if m.type == "fraction") == [7, 8, 10, 11]
    assert not any(m.type in ("posterior", "result") for m in messages)
