"""Frames per second through `beamkin reduce` (ZeroMQ in, ZeroMQ out) vs bare pyFAI (DESIGN §6).

This process plays the streamer: it binds the frames ROUTER (streamer.service.FrameDispatcher,
the real dispatch code) and the inference PULL, starts `beamkin reduce --workers N` as its own
process tree, sends a start message and Pilatus 1M-size synthetic frames, and counts the
`fraction` messages coming back. The stage's work per frame is integration + phase fraction +
two messages; the baseline, measured in the same run on the same frames, is bare pyFAI
`integrate1d` (same geometry, mask, npt and method) in one process. Peak memory per worker is
VmHWM of each worker process.

Target: >= 0.9 x bare per worker, and scaling with workers (on 2 cores with other load the
second worker can only add what the second core is free to give).

    .venv/bin/python bench/bench_reduce_stage.py [--frames 60] [--workers 1 2]
"""

from __future__ import annotations

import argparse
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
from reducer.integrate import DEFAULT_METHOD, azimuthal_integrator_from_metadata  # noqa: E402
from streamer.service import FrameDispatcher  # noqa: E402
from streamer.synthetic import SyntheticPowderDetector, default_metadata  # noqa: E402

WARM_UP_FRAMES = 6


def make_frames(n: int):
    metadata = default_metadata(series_id="bench-reduce", n_frames=n + WARM_UP_FRAMES, gas_time_s=1.0)
    detector = SyntheticPowderDetector(metadata, seed=2, counts_scale=0.15)
    frames = [detector.image(float(a), 1 / 3) for a in np.linspace(0, 1, n + WARM_UP_FRAMES)]
    return metadata, detector.gap_mask, frames


def bare_frames_per_second(metadata, gap_mask, frames, npt: int) -> float:
    ai = azimuthal_integrator_from_metadata(metadata)
    kw = dict(unit="2th_deg", method=DEFAULT_METHOD, error_model="poisson", mask=gap_mask,
              dummy=float(2**32 - 1), delta_dummy=0.5, polarization_factor=0.99, correctSolidAngle=True)
    ai.integrate1d(frames[0], npt, **kw)  # builds the CSR engine
    best = 0.0
    for _ in range(3):
        began = time.perf_counter()
        for frame in frames[WARM_UP_FRAMES:]:
            ai.integrate1d(frame, npt, **kw)
        best = max(best, (len(frames) - WARM_UP_FRAMES) / (time.perf_counter() - began))
    return best


def bare_one_thread_frames_per_second(n_frames: int, npt: int) -> float:
    """The baseline with OMP_NUM_THREADS=1 (one core, as one worker of N gets), in a child process
    on the same frames (same seed)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import bench_reduce_stage as b; "
            f"m, g, f = b.make_frames({n_frames}); print(b.bare_frames_per_second(m, g, f, {npt}))")
    output = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, check=True).stdout
    return float(output.strip().splitlines()[-1])


def stage_frames_per_second(metadata, gap_mask, frames, workers: int,
                            threads: int | None = None) -> tuple[float, list[int]]:
    ports = LoopbackPorts.free()
    marker = uuid.uuid4().hex
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind(f"tcp://127.0.0.1:{ports.frames}")
    pull = context.socket(zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{ports.reduced}")
    env = {"BEAMKIN_BENCH_RUN": marker, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    stage = beamkin_process("reduce", "--workers", str(workers), *ports.options()[:8], env=env)
    dispatcher = FrameDispatcher(router, worker_timeout_s=60.0)
    series_id = metadata["series_id"]
    dispatcher.starts[series_id] = protocol.make("start", {"pixel_mask": gap_mask.astype(np.uint32)},
                                                 source="bench", **metadata)
    messages = [protocol.make("frame", {"image": frame}, series_id=series_id, frame_index=i,
                              time_s=i / 3 + 1 / 6, exposure_s=1 / 3) for i, frame in enumerate(frames)]

    def run(batch) -> float:
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

    try:
        while len([w for w in dispatcher.workers.values() if w.capacity]) < workers:  # all workers joined
            if router.poll(200):
                dispatcher.handle_worker_message()
        run(messages[:WARM_UP_FRAMES * workers])  # integrators built, caches warm
        elapsed = run(messages[WARM_UP_FRAMES * workers:])
        worker_pids = [pid for pid in processes_with_environment("BEAMKIN_BENCH_RUN", marker)
                       if b"--worker-name" in Path(f"/proc/{pid}/cmdline").read_bytes() or workers == 1]
        peak_kib = []
        for pid in worker_pids:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kib.append(int(line.split()[1]))
    finally:
        os.killpg(stage.pid, signal.SIGINT)
        stage.wait(30)
        router.close(0)
        pull.close(0)
        context.term()
    return (len(messages) - WARM_UP_FRAMES * workers) / elapsed, peak_kib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    npt = configuration.defaults()["reducer"]["npt"]
    metadata, gap_mask, frames = make_frames(args.frames + WARM_UP_FRAMES * max(args.workers))
    print(f"{len(frames)} Pilatus 1M-size frames, npt {npt}, method {','.join(DEFAULT_METHOD)}, {os.cpu_count()} cores")
    bare = bare_frames_per_second(metadata, gap_mask, frames, npt)
    bare_1 = bare_one_thread_frames_per_second(args.frames + WARM_UP_FRAMES * max(args.workers), npt)
    print(f"baseline: bare integrate1d in one process: {bare:.1f} frames/s on all cores, "
          f"{bare_1:.1f} frames/s with one OpenMP thread")
    rate, peaks = stage_frames_per_second(metadata, gap_mask, frames, 1, threads=1)
    print(f"beamkin reduce --workers 1, one OpenMP thread: {rate:.1f} frames/s = {rate / bare_1:.2f} x bare "
          f"on one thread (per-worker target 0.9); peak memory {peaks[0] / 1024:.0f} MiB")
    for workers in args.workers:
        rate, peaks = stage_frames_per_second(metadata, gap_mask, frames, workers)
        memory = ", ".join(f"{kib / 1024:.0f} MiB" for kib in peaks) or "n/a"
        print(f"beamkin reduce --workers {workers}: {rate:.1f} frames/s = {rate / bare:.2f} x bare on all cores "
              f"({rate / workers / bare:.2f} x per worker); peak memory per worker: {memory}")


if __name__ == "__main__":
    main()
