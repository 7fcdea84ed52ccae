"""The same frames give bit-identical phase fractions with 1, 2 and 3 reducer workers.

Real processes on loopback: the fake EIGER (`beamkin simulate`, fixed seed, so every run sends
exactly the same frames), the streamer (`beamkin stream`) and `beamkin reduce --workers N`; the
test itself binds the inference's PULL endpoint and collects the fraction messages. Only the
number of workers (hence which worker reduces which frame, and in which order) changes. A frame's
fraction must depend on that frame and the configuration only (issue 11.3).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import zmq

from beamkin import protocol
from beamkin.loopback import LoopbackPorts, beamkin_process
from beamkin.supervise import READY_LINE

N_FRAMES = 24
SIMULATION = ("--simulator.n_frames", str(N_FRAMES), "--simulator.frame_time_s", "0.5", "--simulator.exposure_s", "0.5",
              "--simulator.speed", "4", "--simulator.t0_s", "3.0", "--simulator.k_per_s", "0.5",
              "--simulator.gas_time_s", "1.0", "--simulator.seed", "3")


class Stage:
    """A beamkin stage process whose merged output is collected by a thread."""

    def __init__(self, *args: str):
        self.process = beamkin_process(*args)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if line.strip() == READY_LINE:
                self.ready.set()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(20)
            except Exception:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def output(self) -> str:
        return "".join(self.lines[-60:])


def endpoint_options(ports: LoopbackPorts) -> list[str]:
    """The --endpoints.* options of ports (the stage commands take only their own sections)."""
    pairs = list(zip(ports.options()[::2], ports.options()[1::2]))
    return [item for key, value in pairs if key.startswith("--endpoints.") for item in (key, value)]


def fractions_with_workers(workers: int) -> tuple[dict[int, tuple], dict[str, int]]:
    """{frame_index: (alpha, sigma_alpha, status, peak areas)} of one simulated series, and the
    number of frames each worker reported having reduced."""
    ports = LoopbackPorts.free()
    context = zmq.Context()
    reduced = context.socket(zmq.PULL)
    reduced.bind(f"tcp://127.0.0.1:{ports.reduced}")
    stages = []
    fractions, ended = {}, False
    try:
        detector = f"tcp://127.0.0.1:{ports.detector}"
        stages.append(Stage("stream", *endpoint_options(ports), "--streamer.source", f"dectris2:{detector}"))
        stages.append(Stage("reduce", *endpoint_options(ports), "--reducer.workers", str(workers)))
        for stage in stages:
            deadline = time.monotonic() + 300
            while not stage.ready.wait(0.2):
                assert stage.process.poll() is None and time.monotonic() < deadline, stage.output()
        stages.append(Stage("simulate", "--simulator.endpoint", detector, *SIMULATION))
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not (ended and len(fractions) == N_FRAMES):
            for stage in stages[:2]:
                assert stage.process.poll() is None, stage.output()
            if reduced.poll(200):
                message = protocol.decode(reduced.recv_multipart())
                if message.type == "fraction":
                    areas = tuple(p["area"] for p in message["peaks"])
                    fractions[message["frame_index"]] = (message["alpha"], message["sigma_alpha"],
                                                         message["status"], areas)
                ended = ended or message.type == "end"
    finally:
        for stage in reversed(stages):
            stage.stop()
        reduced.close(0)
        context.term()
    assert sorted(fractions) == list(range(N_FRAMES)), "".join(s.output() for s in stages)
    counts = {}
    for line in stages[1].lines:
        if "stopping after" in line:
            words = line.split()
            counts[words[words.index("worker") + 1]] = int(words[words.index("after") + 1])
    return fractions, counts


def test_one_two_and_three_workers_give_bit_identical_fractions():
    one, _ = fractions_with_workers(1)
    statuses = [one[i][2] for i in range(N_FRAMES)]
    assert statuses.count("ok") == N_FRAMES, statuses
    alphas = [one[i][0] for i in range(N_FRAMES)]
    # the series goes from the empty phase to mostly loaded (F1, t0 3 s, k 0.5 1/s, 12 s)
    assert max(alphas[:4]) < 0.1 and min(alphas[-4:]) > 0.85
    for workers in (2, 3):
        many, reduced = fractions_with_workers(workers)
        # the frames were really shared out (otherwise the comparison proves nothing)
        assert sum(1 for n in reduced.values() if n > 0) >= 2, reduced
        for index in range(N_FRAMES):
            assert many[index] == one[index], (workers, index, many[index], one[index])
