"""Two reducer workers, one killed mid-series: every frame still reaches the inference."""

from __future__ import annotations

import os
import signal
import time
import uuid

import zmq

from beamkin import protocol
from beamkin.loopback import LoopbackPorts, beamkin_process, processes_with_environment, results_listener

N_FRAMES = 30


def worker_pids(marker: str) -> list[int]:
    pids = []
    for pid in processes_with_environment("BEAMKIN_TEST_RUN", marker):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"--worker-name" in handle.read():
                    pids.append(pid)
        except OSError:
            pass
    return pids


def test_killing_one_of_two_workers_loses_no_frame(tmp_path):
    ports = LoopbackPorts.free()
    marker = uuid.uuid4().hex
    context = zmq.Context()
    listener = results_listener(context, ports)
    run = beamkin_process(
        "run", "--source", "simulate", "--once", *ports.options(),
        "--reducer.workers", "2", "--streamer.worker_timeout_s", "2.0", "--inference.missing_timeout_s", "60",
        "--simulator.n_frames", str(N_FRAMES), "--simulator.speed", "2",
        "--inference.particles", "512", "--inference.models", "F1",
        env={"BEAMKIN_TEST_RUN": marker},
    )
    messages, killed = [], None
    try:
        deadline = time.monotonic() + 400
        while run.poll() is None and time.monotonic() < deadline:
            if listener.poll(200):
                message = protocol.decode(listener.recv_multipart())
                messages.append(message)
                if killed is None and message.type == "fraction" and message["frame_index"] >= 8:
                    workers = worker_pids(marker)
                    assert len(workers) == 2
                    killed = workers[0]
                    os.kill(killed, signal.SIGKILL)
        output = run.stdout.read()
        assert run.returncode == 0, output[-4000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        listener.close(0)
        context.term()
    assert killed is not None, f"no fraction seen: {[m.type for m in messages][:20]}\n{output[-3000:]}"
    for kind in ("pattern", "fraction", "estimate"):  # each exactly once, though some were reduced twice
        indices = sorted(m["frame_index"] for m in messages if m.type == kind)
        assert indices == list(range(N_FRAMES)), f"a {kind} was lost or duplicated:\n{output[-6000:]}"
    # and every frame entered the exact posterior once (alone or in a batch)
    assimilated = sorted(j for m in messages if m.type == "posterior" for j in m["batch"])
    assert assimilated == list(range(N_FRAMES)), f"a frame was lost or duplicated:\n{output[-6000:]}"
    result = next(m for m in messages if m.type == "result")["result"]
    assert result["diagnostics"]["frames_missing"] == 0
    assert "declared lost" in output
