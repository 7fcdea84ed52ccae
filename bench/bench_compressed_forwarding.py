"""Frames/s through a real `beamkin stream` process with 16M-size compressed frames: decompression
in the streamer vs in the workers (issue 12.4), measured in the same run.

A fake EIGER2 16M (4362 x 4148, uint32 Poisson counts of mean 1 photon/pixel, bslz4 as the
detector sends it) PUSHes Stream V2 messages over loopback TCP to `python -m beamkin stream`
(a real process, ``--streamer.decompress streamer`` or ``workers``). Workers are DEALER
processes speaking the worker protocol (``ready`` with credit, ``done`` per frame):

* streamer rate: one worker that acknowledges each frame without looking at it, so the
  streamer (decode, forward, dispatch) is the only bottleneck. Printed: frames/s for both modes
  and the ratio workers / streamer (target >= 10);
* end-to-end rate (decompression in the workers): 1 and 2 workers that turn every frame into its
  image with ``beamkin.frames.frame_image`` (the reducer worker's step) before acknowledging it
  (no pyFAI integration: that cost is the reducer's, bench/bench_reduce_stage.py).

Rates are (frames - 1) / (time of the last `done` - time of the first), over ``FRAMES`` frames
after ``WARM_UP`` frames. Modes alternate over ``ROUNDS`` rounds; printed are the medians of the
rates and of the per-round ratios. On a shared machine the wall-clock rate depends on what else
runs, so the streamer's CPU time per frame (user + system, from /proc over the same frames) is
printed too: 1 / that is the rate one streamer core sustains.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beamkin import protocol  # noqa: E402
from beamkin.loopback import beamkin_process  # noqa: E402
from simulator.fake_eiger import encode_message, encode_multi_dim, rational  # noqa: E402

SHAPE = (4362, 4148)  # EIGER2 X 16M
FRAMES = int(os.environ.get("BENCH_FRAMES", 40))
WARM_UP = 3
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 3))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detector_messages(n_frames: int, series: str) -> tuple[bytes, list[bytes], bytes, int]:
    """(start, images, end) of one series as an EIGER2 16M sends them, and the bslz4 payload size."""
    rng = np.random.default_rng(0)
    image = rng.poisson(1.0, size=SHAPE).astype(np.uint32)
    payload = encode_multi_dim(image, "bslz4")
    ids = {"series_id": 1, "series_unique_id": series}
    start = encode_message({"type": "start", **ids, "channels": ["threshold_1"], "image_size_x": SHAPE[1],
                            "image_size_y": SHAPE[0], "count_time": 0.0075, "frame_time": 0.0075,
                            "number_of_images": n_frames, "beam_center_x": SHAPE[1] / 2, "beam_center_y": SHAPE[0] / 2,
                            "pixel_size_x": 75e-6, "pixel_size_y": 75e-6, "incident_wavelength": 0.8,
                            "detector_distance": 0.3, "bit_depth_image": 32})
    images = [encode_message({"type": "image", **ids, "image_id": i, "start_time": rational(i * 0.0075),
                              "stop_time": rational((i + 1) * 0.0075), "data": {"threshold_1": payload}})
              for i in range(n_frames)]
    end = encode_message({"type": "end", **ids})
    return start, images, end, len(payload.value[1].value.value[2])


def worker(frames_endpoint: str, name: str, decompress: bool, stop, results) -> None:
    """A DEALER worker (child process): ``ready`` with credit 2, then per frame (decompressed with
    frame_image when ``decompress``) ``done``, until ``stop`` is set. Puts (receive time, array
    names, worker CPU s for the frame) of every frame on ``results``."""
    from beamkin.frames import frame_image

    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, name.encode())
    dealer.connect(frames_endpoint)
    protocol.send(dealer, protocol.make("ready", worker=name, capacity=2))
    last_ready = time.monotonic()
    while not stop.is_set():
        if time.monotonic() - last_ready > 1.0:
            protocol.send(dealer, protocol.make("ready", worker=name, capacity=2))
            last_ready = time.monotonic()
        if not dealer.poll(100):
            continue
        cpu_began = time.process_time()
        _, message = protocol.recv(dealer)
        if message.type != "frame":
            continue
        if decompress:
            image = frame_image(message)
            assert image.shape == SHAPE
        protocol.send(dealer, protocol.make("done", worker=name, series_id=message["series_id"],
                                            frame_index=message["frame_index"]))
        results.put((time.perf_counter(), ",".join(sorted(message.arrays)), time.process_time() - cpu_began))
    dealer.close(linger=1000)
    context.term()


def process_cpu_s(pid: int) -> float:
    """User + system CPU time (s) a process has used so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(mode: str, n_workers: int, decompress_in_worker: bool, messages) -> tuple[float, float]:
    """(frames/s, streamer CPU s per frame) through one `beamkin stream --streamer.decompress MODE`
    with ``n_workers`` workers."""
    start, images, end, _ = messages
    ports = {name: free_port() for name in ("detector", "frames", "raw", "reduced", "record")}
    context = zmq.Context.instance()
    detector = context.socket(zmq.PUSH)
    detector.setsockopt(zmq.SNDHWM, 4)
    detector.bind(f"tcp://127.0.0.1:{ports['detector']}")
    inference = context.socket(zmq.PULL)  # the streamer PUSHes start / end / status here
    inference.bind(f"tcp://127.0.0.1:{ports['reduced']}")
    stream = beamkin_process(
        "stream", "--streamer.source", f"dectris2:tcp://127.0.0.1:{ports['detector']}", "--streamer.decompress", mode,
        "--streamer.once", "true", "--streamer.max_pending_frames", "4",
        "--endpoints.frames", f"tcp://127.0.0.1:{ports['frames']}", "--endpoints.raw", f"tcp://127.0.0.1:{ports['raw']}",
        "--endpoints.reduced", f"tcp://127.0.0.1:{ports['reduced']}",
        "--endpoints.record", f"tcp://127.0.0.1:{ports['record']}", "--logging.level", "WARNING")
    results, stop = multiprocessing.Queue(), multiprocessing.Event()
    workers = [multiprocessing.Process(target=worker, args=(f"tcp://127.0.0.1:{ports['frames']}", f"w{i}",
                                                            decompress_in_worker, stop, results))
               for i in range(n_workers)]
    try:
        for process in workers:
            process.start()
        assert detector.poll(60_000, zmq.POLLOUT), "the streamer never connected"
        detector.send(start)
        for image in images:
            detector.send(image, copy=False)
        detector.send(end)
        collected, cpu = [], []
        for _ in images:
            collected.append(results.get(timeout=600))
            if len(collected) in (WARM_UP + 1, len(images)):
                cpu.append(process_cpu_s(stream.pid))
    finally:
        stop.set()
        for process in workers:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        if stream.poll() is None:
            try:
                stream.wait(timeout=30)
            except Exception:
                stream.kill()
        detector.close(linger=0)
        while inference.poll(0):
            inference.recv_multipart()
        inference.close(linger=0)
    kinds = {kind for _, kind, _ in collected}
    expected = "image_compressed" if mode == "workers" else "image"
    assert kinds == {expected}, f"mode {mode}: frames carried {kinds}"
    times = sorted(t for t, _, _ in collected)[WARM_UP:]
    worker_cpu_s = statistics.median(c for _, _, c in collected[WARM_UP:])
    return (len(times) - 1) / (times[-1] - times[0]), (cpu[1] - cpu[0]) / (len(times) - 1), worker_cpu_s


def main() -> None:
    from beamkin.frames import frame_image
    from beamkin.compression import decompress

    messages = detector_messages(FRAMES + WARM_UP, "bench-forwarding")
    payload_bytes = messages[3]
    raw_bytes = SHAPE[0] * SHAPE[1] * 4
    # decompression cost of one frame in this process, for reference
    payload = encode_multi_dim(np.random.default_rng(0).poisson(1.0, size=SHAPE).astype(np.uint32), "bslz4")
    data = payload.value[1].value.value[2]
    t0 = time.perf_counter()
    for _ in range(5):
        decompress(data, "bslz4", 4)
    decompress_ms = (time.perf_counter() - t0) / 5 * 1e3
    del frame_image
    print(f"EIGER2 16M frame {SHAPE[0]}x{SHAPE[1]} uint32: {raw_bytes / 1e6:.0f} MB raw, {payload_bytes / 1e6:.1f} MB bslz4; "
          f"bslz4 decompression {decompress_ms:.1f} ms/frame in one process; {os.cpu_count()} CPUs, "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rates, cpu = {"streamer": [], "workers": []}, {"streamer": [], "workers": []}
    for round_number in range(ROUNDS):
        order = ("streamer", "workers") if round_number % 2 == 0 else ("workers", "streamer")
        for mode in order:
            rate, cpu_s, _ = run_once(mode, 1, False, messages)
            rates[mode].append(rate)
            cpu[mode].append(cpu_s)
        print(f"round {round_number + 1}: " + ", ".join(f"decompress in {m} {rates[m][-1]:.1f} frames/s "
                                                        f"({1e3 * cpu[m][-1]:.1f} ms streamer CPU/frame)" for m in order),
              flush=True)
    in_streamer, in_workers = statistics.median(rates["streamer"]), statistics.median(rates["workers"])
    ratio = statistics.median(w / s for w, s in zip(rates["workers"], rates["streamer"]))
    cpu_streamer, cpu_workers = statistics.median(cpu["streamer"]), statistics.median(cpu["workers"])
    print(f"streamer rate (ack-only worker, median of {ROUNDS}): decompress in streamer {in_streamer:.1f} frames/s, "
          f"forwarded compressed {in_workers:.1f} frames/s, ratio {ratio:.1f}x (median of per-round ratios; target >= 10x)")
    print(f"streamer CPU per frame: decompress in streamer {1e3 * cpu_streamer:.1f} ms ({1 / cpu_streamer:.1f} frames/s "
          f"per core), forwarded compressed {1e3 * cpu_workers:.1f} ms ({1 / cpu_workers:.1f} frames/s per core), "
          f"ratio {cpu_streamer / cpu_workers:.1f}x")
    end_to_end, worker_cpu = {}, []
    for n_workers in (1, 2):
        runs = [run_once("workers", n_workers, True, messages) for _ in range(ROUNDS)]
        end_to_end[n_workers] = statistics.median(rate for rate, _, _ in runs)
        worker_cpu += [cpu_s for _, _, cpu_s in runs]
    print(f"end to end, forwarded compressed, decompressed in the workers (frame_image, no integration): "
          f"1 worker {end_to_end[1]:.1f} frames/s, 2 workers {end_to_end[2]:.1f} frames/s "
          f"(x{end_to_end[2] / end_to_end[1]:.2f}); worker CPU per frame (receive + frame_image + done) "
          f"{1e3 * statistics.median(worker_cpu):.1f} ms, so {1 / statistics.median(worker_cpu):.1f} frames/s per worker core; "
          f"load average now {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
