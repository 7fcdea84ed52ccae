"""Frames per second through `beamkin reduce` (ZeroMQ in, ZeroMQ out) vs bare pyFAI (targets and figures: docs/benchmarks.md).

This process plays the streamer: it binds the frames ROUTER (streamer.service.FrameDispatcher,
the real dispatch code) and the inference PULL, starts `beamkin reduce --workers N` as its own
process tree, sends a start message and Pilatus 1M-size synthetic frames, and counts the
`fraction` messages coming back. The stage's work per frame is integration + phase fraction +
two messages; the baseline, on the same frames, is bare pyFAI `integrate1d` (same geometry,
mask, npt and method, error_model="poisson") in one process: with one OpenMP thread (in a child
process, what one worker of N gets) and on all cores (in this process).

Rounds alternate between the baseline and the stage (each round is one pass over the same
frames; the stage keeps running between its rounds), so each ratio compares two passes a
fraction of a second apart: on a shared machine the load changes between runs, and even within
one. Reported: the median of the per-round ratios and their range, the median rates, and the ratio
of the best rounds (what each side reaches when the machine leaves it alone).
Peak memory per worker is VmHWM of each worker process; CPU per frame of each thread kind
(worker main thread = its socket thread, its reduction thread, ZeroMQ I/O threads, this process as
the streamer side) comes from
/proc/<pid>/task/*/stat over the stage rounds (clock ticks of 10 ms, summed over hundreds of frames). The per-frame breakdown is measured in
the one-thread child: `Integrator.integrate` (mask checks + pyFAI), the phase fraction, and
decoding a frame message plus encoding the two result messages (no sockets).

Target: >= 0.9 x bare per worker, and scaling with workers (on 2 cores with other load the
second worker can only add what the second core is free to give).

    .venv/bin/python bench/bench_reduce_stage.py [--frames 60] [--rounds 7] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beamkin import config as configuration  # noqa: E402
from beamkin import protocol  # noqa: E402
from beamkin.loopback import LoopbackPorts, beamkin_process, processes_with_environment  # noqa: E402
from beamkin.geometry import azimuthal_integrator_from_metadata  # noqa: E402
from reducer.integrate import DEFAULT_METHOD  # noqa: E402
from reducer.service import REDUCTION_THREAD_NAME  # noqa: E402
from streamer.service import FrameDispatcher  # noqa: E402
from simulator.synthetic import SyntheticPowderDetector, default_metadata  # noqa: E402

WARM_UP_FRAMES = 6


def make_frames(n: int):
    metadata = default_metadata(series_id="bench-reduce", n_frames=n + WARM_UP_FRAMES, gas_time_s=1.0)
    detector = SyntheticPowderDetector(metadata, seed=2, counts_scale=0.15)
    frames = [detector.image(float(a), 1 / 3) for a in np.linspace(0, 1, n + WARM_UP_FRAMES)]
    return metadata, detector.gap_mask, frames


def frame_messages(metadata, frames) -> list[protocol.Message]:
    return [protocol.make("frame", {"image": frame}, series_id=metadata["series_id"], frame_index=i,
                          time_s=i / 3 + 1 / 6, exposure_s=1 / 3) for i, frame in enumerate(frames)]


def start_message(metadata, gap_mask) -> protocol.Message:
    return protocol.make("start", {"pixel_mask": gap_mask.astype(np.uint32)}, source="bench", **metadata)


class BareIntegrate1d:
    """Bare pyFAI integrate1d on the frames, one pass per round (frames/s); engine built at once."""

    def __init__(self, metadata, gap_mask, frames, npt: int):
        self.ai = azimuthal_integrator_from_metadata(metadata)
        self.frames, self.npt = frames, npt
        self.kw = dict(unit="2th_deg", method=DEFAULT_METHOD, error_model="poisson", mask=gap_mask,
                       dummy=float(2**32 - 1), delta_dummy=0.5, polarization_factor=0.99, correctSolidAngle=True)
        for frame in frames[:WARM_UP_FRAMES]:
            self.ai.integrate1d(frame, npt, **self.kw)

    def round(self) -> float:
        began = time.perf_counter()
        for frame in self.frames[WARM_UP_FRAMES:]:
            self.ai.integrate1d(frame, self.npt, **self.kw)
        return (len(self.frames) - WARM_UP_FRAMES) / (time.perf_counter() - began)


def per_frame_breakdown(metadata, gap_mask, frames) -> dict[str, float]:
    """Mean ms per frame of the worker's steps in one process, no sockets (reducer.service)."""
    from reducer.service import SeriesReduction

    start = protocol.decode(protocol.encode(start_message(metadata, gap_mask)))
    reduction = SeriesReduction(start, configuration.defaults()["reducer"])
    encoded = [[bytes(part) for part in protocol.encode(m)] for m in frame_messages(metadata, frames)]
    times = {"integrate": [], "fraction": [], "messages": []}
    for i, parts in enumerate(encoded):
        t0 = time.perf_counter()
        frame = protocol.decode(parts)
        t1 = time.perf_counter()
        pattern = reduction.integrator.integrate(frame.arrays["image"])
        t2 = time.perf_counter()
        reduction.estimator.estimate(pattern, frame["time_s"])
        t3 = time.perf_counter()
        # the worker builds and encodes these; building them again here is cheap next to the rest
        pattern_message = protocol.make("pattern", {"radial": pattern.radial, "intensity": pattern.intensity,
                                                    "sigma": pattern.sigma}, unit=pattern.unit,
                                        series_id=frame["series_id"], frame_index=frame["frame_index"],
                                        time_s=frame["time_s"])
        protocol.encode(pattern_message)
        protocol.encode(protocol.make("fraction", series_id=frame["series_id"], frame_index=frame["frame_index"],
                                      time_s=frame["time_s"], exposure_s=frame["exposure_s"], alpha=0.5,
                                      sigma_alpha=0.01, status="ok", reason=None))
        t4 = time.perf_counter()
        if i >= WARM_UP_FRAMES:
            times["integrate"].append(t2 - t1)
            times["fraction"].append(t3 - t2)
            times["messages"].append((t1 - t0) + (t4 - t3))
    return {k: 1e3 * float(np.mean(v)) for k, v in times.items()}


def one_thread_child(n_frames: int, npt: int) -> None:
    """Child process (OMP_NUM_THREADS=1): answers 'round' with bare frames/s, 'breakdown' with
    the per-frame breakdown (JSON), on stdin/stdout."""
    metadata, gap_mask, frames = make_frames(n_frames)
    bare = BareIntegrate1d(metadata, gap_mask, frames, npt)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "round":
            print(bare.round(), flush=True)
        elif line.strip() == "breakdown":
            print(json.dumps(per_frame_breakdown(metadata, gap_mask, frames)), flush=True)


class OneThreadBaseline:
    """The bare baseline with OMP_NUM_THREADS=1 in a child process on the same frames (same seed)."""

    def __init__(self, n_frames: int, npt: int):
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
                f"import bench_reduce_stage as b; b.one_thread_child({n_frames}, {npt})")
        self.child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"},
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.child.stdout.readline().strip() != "ready":
            raise SystemExit("the one-thread baseline process did not start")

    def ask(self, command: str) -> str:
        self.child.stdin.write(command + "\n")
        self.child.stdin.flush()
        return self.child.stdout.readline()

    def round(self) -> float:
        return float(self.ask("round"))

    def breakdown(self) -> dict[str, float]:
        return json.loads(self.ask("breakdown"))

    def close(self) -> None:
        self.child.stdin.close()
        self.child.wait(30)


CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pids) -> dict[tuple[str, str], float]:
    """CPU seconds (user + system) so far of the given processes' threads, keyed by (process role,
    thread kind): 'main', 'reduction' (the worker's, named REDUCTION_THREAD_NAME), 'ZeroMQ I/O' or
    'other' (OpenMP threads...). Roles: 'worker' for pids
    other than this process, 'streamer side' for this process."""
    cpu: dict[tuple[str, str], float] = {}
    for pid in pids:
        role = "streamer side" if pid == os.getpid() else "worker"
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                name = (task / "comm").read_text().strip()
            except OSError:
                continue
            kind = ("main" if task.name == str(pid) else "reduction" if name == REDUCTION_THREAD_NAME
                    else "ZeroMQ I/O" if name.startswith("ZMQbg/IO") else "other")
            key = (role, kind)
            cpu[key] = cpu.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S
    return cpu


class ReduceStage:
    """`beamkin reduce --workers N` fed by this process; one pass over the frames per round."""

    def __init__(self, metadata, gap_mask, frames, workers: int, threads: int | None = None):
        self.workers = workers
        ports = LoopbackPorts.free()
        self.marker = uuid.uuid4().hex
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.bind(f"tcp://127.0.0.1:{ports.frames}")
        self.pull = self.context.socket(zmq.PULL)
        self.pull.bind(f"tcp://127.0.0.1:{ports.reduced}")
        env = {"BEAMKIN_BENCH_RUN": self.marker, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        self.stage = beamkin_process("reduce", "--workers", str(workers), *ports.options()[:8], env=env)
        self.dispatcher = FrameDispatcher(self.router, worker_timeout_s=60.0)
        self.dispatcher.starts[metadata["series_id"]] = start_message(metadata, gap_mask)
        self.messages = frame_messages(metadata, frames)
        self.cpu_s: dict[tuple[str, str], float] = {}
        self.frames_timed = 0
        try:
            while len([w for w in self.dispatcher.workers.values() if w.capacity]) < workers:  # all joined
                if self.router.poll(200):
                    self.dispatcher.handle_worker_message()
            self._run(self.messages[:WARM_UP_FRAMES * workers])  # integrators built, caches warm
        except BaseException:
            self.close()
            raise

    def _run(self, batch) -> float:
        dispatcher, router, pull = self.dispatcher, self.router, self.pull
        dispatcher.pending.extend(batch)
        wanted = {m["frame_index"] for m in batch}
        began = time.perf_counter()
        deadline = time.monotonic() + 600
        while wanted and time.monotonic() < deadline:
            while router.poll(0):
                dispatcher.handle_worker_message()
            dispatcher.dispatch()
            if pull.poll(5):
                _, message = protocol.recv(pull)
                if message.type == "fraction":
                    wanted.discard(message["frame_index"])
        if wanted:
            raise SystemExit(f"frames {sorted(wanted)[:5]}... never came back from beamkin reduce")
        return time.perf_counter() - began

    def round(self) -> float:
        """frames/s over the frames after the warm-up ones (the same frames as the baseline)."""
        pids = [*self.worker_pids(), os.getpid()]
        before = thread_cpu_s(pids)
        rate = (len(self.messages) - WARM_UP_FRAMES) / self._run(self.messages[WARM_UP_FRAMES:])
        for key, seconds in thread_cpu_s(pids).items():
            self.cpu_s[key] = self.cpu_s.get(key, 0.0) + seconds - before.get(key, 0.0)
        self.frames_timed += len(self.messages) - WARM_UP_FRAMES
        return rate

    def cpu_ms_per_frame(self) -> dict[tuple[str, str], float]:
        """Mean CPU ms per frame of each (role, thread kind) over the rounds so far."""
        order = {"worker": 0, "streamer side": 1, "main": 0, "reduction": 1, "ZeroMQ I/O": 2, "other": 3}
        return {key: 1e3 * seconds / max(self.frames_timed, 1)
                for key, seconds in sorted(self.cpu_s.items(), key=lambda item: (order[item[0][0]], order[item[0][1]]))}

    def worker_pids(self) -> list[int]:
        return [pid for pid in processes_with_environment("BEAMKIN_BENCH_RUN", self.marker)
                if b"--worker-name" in Path(f"/proc/{pid}/cmdline").read_bytes() or self.workers == 1]

    def peak_memory_mib(self) -> list[float]:
        peaks = []
        for pid in self.worker_pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
        return peaks

    def close(self) -> None:
        try:
            os.killpg(self.stage.pid, signal.SIGINT)
            self.stage.wait(30)
        finally:
            self.router.close(0)
            self.pull.close(0)
            self.context.term()


def compare(label: str, baseline, stage: ReduceStage, rounds: int) -> tuple[float, list[float]]:
    """Alternate baseline and stage rounds; print and return (median stage/bare ratio, ratios)."""
    bare_rates, stage_rates, ratios = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            bare_rates.append(baseline.round())
            stage_rates.append(stage.round())
        else:
            stage_rates.append(stage.round())
            bare_rates.append(baseline.round())
        ratios.append(stage_rates[-1] / bare_rates[-1])
    ratio = float(np.median(ratios))
    memory = ", ".join(f"{m:.0f} MiB" for m in stage.peak_memory_mib()) or "n/a"
    print(f"{label}:\n  {np.median(stage_rates):.1f} frames/s vs bare {np.median(bare_rates):.1f} frames/s "
          f"(medians of {rounds} rounds); ratio {ratio:.2f} (median of the rounds' ratios, range "
          f"{min(ratios):.2f}-{max(ratios):.2f}: {', '.join(f'{x:.2f}' for x in ratios)})\n"
          f"  best rounds {max(stage_rates):.1f} vs {max(bare_rates):.1f} frames/s = "
          f"{max(stage_rates) / max(bare_rates):.2f}; peak memory per worker {memory}")
    cpu = stage.cpu_ms_per_frame()
    print("  CPU per frame in the stage rounds: " + ", ".join(
        f"{role} {kind} {ms:.2f} ms" for (role, kind), ms in cpu.items() if ms >= 0.005))
    return ratio, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60, help="frames per round (after 6 warm-up frames)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating baseline/stage rounds per comparison")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    npt = configuration.defaults()["reducer"]["npt"]
    n_frames = args.frames + WARM_UP_FRAMES * max(args.workers)
    metadata, gap_mask, frames = make_frames(n_frames)
    load = os.getloadavg()
    print(f"{len(frames)} Pilatus 1M-size frames ({args.frames} per round), npt {npt}, "
          f"method {','.join(DEFAULT_METHOD)}, {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f}")
    one_thread = OneThreadBaseline(n_frames, npt)
    try:
        parts = one_thread.breakdown()
        print("per frame in one process, one OpenMP thread (mean): integrate {integrate:.2f} ms, phase fraction "
              "{fraction:.2f} ms, decode frame + encode results {messages:.2f} ms".format(**parts))
        stage = ReduceStage(metadata, gap_mask, frames, 1, threads=1)
        try:
            compare("beamkin reduce --workers 1, one OpenMP thread, vs bare on one thread (target >= 0.9)",
                    one_thread, stage, args.rounds)
        finally:
            stage.close()
    finally:
        one_thread.close()
    all_cores = BareIntegrate1d(metadata, gap_mask, frames, npt)
    for workers in args.workers:
        stage = ReduceStage(metadata, gap_mask, frames, workers)
        try:
            compare(f"beamkin reduce --workers {workers} (OpenMP threads: cores / workers) vs bare on all cores",
                    all_cores, stage, args.rounds)
        finally:
            stage.close()
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f}")


if __name__ == "__main__":
    main()
