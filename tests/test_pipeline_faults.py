"""Fault tests: kill -9 one stage of a real `beamkin demo --once` (every stage its own process,
on loopback) mid-series, and check what the supervisor and the stages promise (README.md, "What
the service guarantees"): the run goes on with the stage restarted, and

- reducer: its unacknowledged frames are handed to the restarted one; every frame reaches the
  inference's sampler exactly once and the result holds the simulated kinetics;
- recorder: the restarted recorder writes a new segment; the first one is intact, and the
  segments together hold each message once;
- inference: the series it lost cannot be rebuilt; it ends ``incomplete: inference restarted``
  with the count of frames lost, and the run exits non-zero saying so.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid

import pytest
import zmq

from beamkin import protocol
from beamkin.loopback import LoopbackPorts, beamkin_process, results_listener, stage_pid
from beamkin.recording import read_messages, recording_segments
N_FRAMES = 24
TRUE_T0_S = 4.0
TRUE_K_PER_S = 0.6192
SMALL = ["--speed", "4", "--inference.particles", "256", "--simulator.n_frames", str(N_FRAMES),
         "--simulator.t0_s", str(TRUE_T0_S), "--simulator.gas_time_s", "2.0", "--simulator.seed", "3",
         "--inference.models", '["F1", "A2"]', "--streamer.worker_timeout_s", "2.0",
         "--supervisor.restart_backoff_s", "0.2"]


class Run:
    """`beamkin demo --once` with a marker in its environment, listened to on the results PUB."""

    def __init__(self, tmp_path, *options: str):
        self.ports = LoopbackPorts.free()
        self.marker = uuid.uuid4().hex
        self.context = zmq.Context()
        self.listener = results_listener(self.context, self.ports)
        self.raw_ends = self.context.socket(zmq.SUB)  # the streamer's `end` of a series, as it sends it
        self.raw_ends.setsockopt(zmq.SUBSCRIBE, b"end")
        self.raw_ends.connect(f"tcp://127.0.0.1:{self.ports.raw}")
        self.messages: list[protocol.Message] = []
        self.result_path = tmp_path / "result.json"
        self.process = beamkin_process("demo", "--once", "--json", str(self.result_path), *SMALL,
                                       *self.ports.options(), *options, env={"BEAMKIN_TEST_RUN": self.marker})
        self.output = ""

    def receive(self, until, limit_s: float = 120.0) -> None:
        """Collect published messages until until(messages) or the demo exits."""
        deadline = time.monotonic() + limit_s
        while not until(self.messages) and self.process.poll() is None:
            assert time.monotonic() < deadline, "the demo did not get there"
            if self.listener.poll(100):
                self.messages.append(protocol.decode(self.listener.recv_multipart()))

    def streamer_ended(self) -> bool:
        """Whether the streamer has sent the series' end (to the inference, and on its raw PUB)."""
        return bool(self.raw_ends.poll(0))

    def kill_stage(self, command: str) -> int:
        pid = stage_pid("BEAMKIN_TEST_RUN", self.marker, command)
        assert pid is not None, f"no {command} stage running"
        os.kill(pid, signal.SIGKILL)
        return pid

    def finish(self, limit_s: float = 180.0) -> int:
        self.receive(lambda messages: False, limit_s)
        self.output = self.process.stdout.read()
        while self.listener.poll(300):
            self.messages.append(protocol.decode(self.listener.recv_multipart()))
        return self.process.returncode

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.listener.close(0)
        self.raw_ends.close(0)
        self.context.term()

    def of_type(self, kind: str) -> list[protocol.Message]:
        return [m for m in self.messages if m.type == kind]


def read_when_unlocked(path, limit_s: float = 30.0) -> list[protocol.Message]:
    """The messages of a recording, once the killed writer's file lock is gone."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return [m for _, m in read_messages(path, with_arrays=False)]
        except BlockingIOError:
            assert time.monotonic() < deadline, f"{path} still locked"
            time.sleep(0.05)


def fraction_reached(index: int):
    return lambda messages: any(m.type == "fraction" and m["frame_index"] >= index for m in messages)


@pytest.fixture
def run_factory(tmp_path):
    runs: list[Run] = []

    def make(*options: str) -> Run:
        runs.append(Run(tmp_path, *options))
        return runs[-1]

    yield make
    for run in runs:
        run.close()


def test_killed_reducer_is_restarted_and_its_frames_redispatched(run_factory):
    run = run_factory()
    run.receive(fraction_reached(5))
    pid = run.kill_stage("reduce")
    code = run.finish()
    assert code == 0, run.output[-5000:]
    assert f"stage reducer (pid {pid}) was killed by signal 9 (SIGKILL); restarting it" in run.output
    assert "restarted stage reducer" in run.output
    # the streamer declared the killed worker lost and handed its unacknowledged frames on (on a
    # machine loaded enough to starve a live worker's heartbeat thread for worker_timeout_s, that
    # worker may be declared lost too: every frame handed on is dispatched once more, and done once)
    killed = re.search(rf"reducer worker \S+-{pid}-\d+ silent for [0-9.]+ s: declared lost, (\d+) frame", run.output)
    assert killed, run.output[-5000:]
    handed = sum(int(n) for n in re.findall(r"reducer worker \S+ silent for [0-9.]+ s: declared lost, (\d+) frame", run.output))
    stats = re.search(r"'frames_dispatched': (\d+), 'frames_done': (\d+)", run.output)
    assert stats and int(stats.group(2)) == N_FRAMES, run.output[-5000:]
    assert N_FRAMES + int(killed.group(1)) <= int(stats.group(1)) <= N_FRAMES + handed
    # every frame reached the sampler exactly once (a frame done twice is not published twice)
    fractions = sorted(m["frame_index"] for m in run.of_type("fraction"))
    assert fractions == list(range(N_FRAMES)), fractions
    assert sorted(j for m in run.of_type("posterior") for j in m["batch"]) == list(range(N_FRAMES))
    result = json.loads(run.result_path.read_text())
    assert result["end_reason"] == "completed" and result["diagnostics"]["frames_missing"] == 0
    # the same statistical answer an undisturbed run gives: the simulated F1 kinetics within 3 sd
    f1 = result["models"]["F1"]
    assert f1["probability"] > 0.5, result["models"]
    t0, k = f1["params"]["t0"], f1["params"]["k"]
    assert abs(t0["mean"] - TRUE_T0_S) < 3 * t0["sd"], t0
    assert abs(k["mean"] - TRUE_K_PER_S) < 3 * k["sd"], k


def test_killed_recorder_resumes_in_a_new_segment_and_keeps_what_it_wrote(run_factory, tmp_path):
    recording = tmp_path / "run.h5"
    # at real-time pace, so that the series goes on for seconds after the restarted recorder subscribed
    run = run_factory("--record", str(recording), "--speed", "1")
    run.receive(fraction_reached(5))
    pid = run.kill_stage("record")
    first_at_kill = read_when_unlocked(recording)  # what was flushed by then
    code = run.finish()
    assert code == 0, run.output[-5000:]
    assert f"stage recorder (pid {pid}) was killed by signal 9 (SIGKILL); restarting it" in run.output
    assert "resuming the recording in a new segment" in run.output and "run.part2.h5" in run.output
    segments = recording_segments(recording)
    assert segments == [recording, tmp_path / "run.part2.h5"]
    # nothing written before the kill is lost: the first segment holds what it held then
    first = [m for _, m in read_messages(segments[0], with_arrays=False)]
    assert [(m.type, m.frame_index) for m in first] == [(m.type, m.frame_index) for m in first_at_kill]
    assert any(m.type == "start" for m in first)
    second = [m for _, m in read_messages(segments[1], with_arrays=False)]
    # the segments hold the series in order, each published fraction at most once: the first a
    # prefix of the series, the second the rest from where the restarted recorder subscribed
    # (those published in between are in neither: README.md says so)
    recorded = [m["frame_index"] for m in first + second if m.type == "fraction"]
    published = sorted(m["frame_index"] for m in run.of_type("fraction"))
    assert published == list(range(N_FRAMES))
    assert recorded == sorted(set(recorded)), recorded
    assert {m.type for m in second} >= {"result", "end"}
    # the streamer's end, and the inference's with the series' provenance
    assert {m["reason"] for m in second if m.type == "end"} == {"completed"}
    assert any("provenance" in m.fields for m in second if m.type == "end")
    print(f"recorder kill: {N_FRAMES - len(recorded)} of {N_FRAMES} fractions published while no recorder listened")


def test_killed_inference_ends_its_series_incomplete_with_the_frames_lost(run_factory):
    # a restarted inference gives up on a series it has no start of after start_wait_s without a
    # fraction, or at its end
    run = run_factory("--inference.start_wait_s", "3.0")
    run.receive(fraction_reached(5))
    deadline = time.monotonic() + 60
    while not run.streamer_ended():  # the series has ended at the streamer: no start is re-sent
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = run.kill_stage("infer")
    code = run.finish()
    assert code == 4, run.output[-5000:]  # EXIT_SERIES_INCOMPLETE: run --once says the series is incomplete
    assert f"stage inference (pid {pid}) was killed by signal 9 (SIGKILL); restarting it" in run.output
    assert "the series ended incomplete" in run.output
    ends = run.of_type("end")
    assert [m["reason"] for m in ends][-1] == "incomplete: inference restarted", [m.fields for m in ends]
    result = json.loads(run.result_path.read_text())
    assert result["incomplete"] and result["end_reason"] == "incomplete: inference restarted"
    assert result["n_frames"] == N_FRAMES
    # the fractions the first inference published, and those the restarted one received, are
    # every frame but the ones counted lost (in flight to, or in, the killed process)
    before = {m["frame_index"] for m in run.of_type("fraction")}
    assert result["frames_lost"] == len(result["frames_lost_indices"]) >= 1
    assert result["frames_lost"] + result["frames_received"] == N_FRAMES
    assert re.search(rf"its start and (at least )?{result['frames_lost']} of its (at least )?{N_FRAMES} frames never "
                     "reached this inference", run.output), run.output[-5000:]
    lost = set(result["frames_lost_indices"])
    assert min(lost) == 0  # the restarted process never got the start or the first frames
    status = [m for m in run.of_type("status") if m.get("counters", {}).get("error") == result["end_reason"]]
    assert status and status[-1]["counters"]["frames_lost"] == result["frames_lost"]
    print(f"inference kill: {result['frames_lost']} of {N_FRAMES} frames lost; {len(before)} fractions published")


def test_inference_killed_while_the_series_is_open_analyses_the_rest_and_says_incomplete(run_factory):
    # at real-time pace the series is still open at the streamer when the inference is killed: the
    # streamer's periodic re-sent start lets the restarted inference analyse the frames to come
    run = run_factory("--speed", "1")
    run.receive(fraction_reached(4))
    assert not run.streamer_ended(), "the series ended before the kill: nothing to resume"
    pid = run.kill_stage("infer")
    code = run.finish()
    assert code == 4, run.output[-5000:]
    assert f"stage inference (pid {pid}) was killed by signal 9 (SIGKILL); restarting it" in run.output
    assert "series already running when this inference started (restarted)" in run.output
    result = json.loads(run.result_path.read_text())
    assert result["end_reason"] == "incomplete: inference restarted" and result["incomplete"]
    assert [m["reason"] for m in run.of_type("end")][-1] == "incomplete: inference restarted"
    # a posterior of the frames after the restart; those before it are counted lost
    lost = result["diagnostics"]["missing_indices"]
    assert result["frames_lost"] == result["diagnostics"]["frames_missing"] == len(lost) >= 5
    assert lost == list(range(len(lost)))
    assert result["diagnostics"]["frames_assimilated"] == N_FRAMES - len(lost)
    assert f"{len(lost)} of its frames were lost" in run.output
    print(f"inference kill (open series): {len(lost)} of {N_FRAMES} frames lost, "
          f"{N_FRAMES - len(lost)} analysed by the restarted inference; "
          f"t0 = {result['model_averaged']['t0']['mean']:.3f} +- {result['model_averaged']['t0']['sd']:.3f}")
