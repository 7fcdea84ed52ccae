"""The same frames give bit-identical phase fractions with 1, 2 and 3 reducer workers.

Real processes on loopback: `beamkin run --source simulate --once` with the simulator's fixed
seed, so every run reduces exactly the same frames; only the number of workers (hence which
worker reduces which frame, and in which order) changes. A frame's fraction must depend on that
frame and the configuration only (issue 11.3).
"""

from __future__ import annotations

import os
import re
import signal
import time

import numpy as np
import zmq

from beamkin import protocol
from beamkin.loopback import LoopbackPorts, beamkin_process, results_listener

N_FRAMES = 24


def fractions_with_workers(workers: int) -> tuple[dict[int, tuple], dict[str, int]]:
    """{frame_index: (alpha, sigma_alpha, status, peak areas)} of one simulated series, and the
    number of frames each worker reported having reduced."""
    ports = LoopbackPorts.free()
    context = zmq.Context()
    listener = results_listener(context, ports)
    run = beamkin_process(
        "run", "--source", "simulate", "--once", *ports.options(),
        "--reducer.workers", str(workers), "--simulator.n_frames", str(N_FRAMES),
        "--simulator.frame_time_s", "0.5", "--simulator.exposure_s", "0.5", "--simulator.speed", "4",
        "--simulator.t0_s", "3.0", "--simulator.k_per_s", "0.5", "--simulator.gas_time_s", "1.0",
        "--inference.particles", "256", "--inference.models", "F1", "--inference.missing_timeout_s", "120",
    )
    fractions = {}
    try:
        deadline = time.monotonic() + 400
        while run.poll() is None and time.monotonic() < deadline:
            if listener.poll(200):
                message = protocol.decode(listener.recv_multipart())
                if message.type == "fraction":
                    areas = tuple(p["area"] for p in message["peaks"])
                    fractions[message["frame_index"]] = (message["alpha"], message["sigma_alpha"],
                                                         message["status"], areas)
        output = run.stdout.read()
        assert run.returncode == 0, output[-4000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        listener.close(0)
        context.term()
    reduced = {name: int(n) for name, n in re.findall(r"reducer worker (\S+) stopping after (\d+) frames", output)}
    assert sorted(fractions) == list(range(N_FRAMES)), output[-4000:]
    return fractions, reduced


def test_one_two_and_three_workers_give_bit_identical_fractions():
    one, _ = fractions_with_workers(1)
    statuses = [one[i][2] for i in range(N_FRAMES)]
    assert statuses.count("ok") == N_FRAMES, statuses
    alphas = np.array([one[i][0] for i in range(N_FRAMES)])
    # the series goes from the empty phase to mostly loaded (F1, t0 3 s, k 0.5 1/s, 12 s)
    assert alphas[:4].max() < 0.1 and alphas[-4:].min() > 0.85
    for workers in (2, 3):
        many, reduced = fractions_with_workers(workers)
        # the frames were really shared out (otherwise the comparison proves nothing)
        assert sum(1 for n in reduced.values() if n > 0) >= 2, reduced
        for index in range(N_FRAMES):
            assert many[index] == one[index], (workers, index, many[index], one[index])
