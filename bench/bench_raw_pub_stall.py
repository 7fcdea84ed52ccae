"""Streamer memory with a stalled subscriber on the raw PUB: this checkout against a baseline commit.

Issue 11: a subscriber that stops reading the raw PUB pinned every frame (XPUB_NODROP, high-water
mark 10 000 messages): streamer RSS 48 -> 426 MB over 100 frames. Now the raw PUB drops for a slow
subscriber once it holds ``[streamer] raw_budget_bytes`` (64 MiB by default) of frames.

For each of the baseline (``git archive BASELINE``, default the commit before the change) and this
checkout, in the same run: a real ``beamkin stream`` process reads a fake EIGER (Stream V2, bslz4,
Pilatus 1M-size uint32 frames, 4.1 MB each), one fake reducer worker acknowledges every frame at
once, and one SUB connects to the raw endpoint and never reads (RCVHWM 1). After all frames were
dispatched and acknowledged the streamer's peak RSS (VmHWM) and RSS are read from /proc. Prints
both, the growth over the RSS before the first frame, and the ratio of the growths.

    .venv/bin/python bench/bench_raw_pub_stall.py [--frames 100] [--baseline 029cafd]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from beamkin import protocol  # noqa: E402
from simulator.fake_eiger import StreamV2Sender  # noqa: E402

SHAPE = (1043, 981)  # Pilatus 1M


def free_ports(n: int) -> list[int]:
    held = [socket.socket() for _ in range(n)]
    for s in held:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in held]
    for s in held:
        s.close()
    return ports


def memory_mb(pid: int) -> dict[str, float]:
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values


def fake_worker(context: zmq.Context, endpoint: str, n_frames: int, done: threading.Event) -> None:
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"bench-worker")
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    ready = protocol.make("ready", worker="bench-worker", capacity=4)
    protocol.send(dealer, ready)
    last_ready = time.monotonic()
    frames = 0
    while frames < n_frames and not done.is_set():
        if time.monotonic() - last_ready > 1.0:
            protocol.send(dealer, ready)
            last_ready = time.monotonic()
        if not dealer.poll(100):
            continue
        _, message = protocol.recv(dealer)
        if message.type == "frame":
            frames += 1
            protocol.send(dealer, protocol.make("done", worker="bench-worker", series_id=message["series_id"],
                                                frame_index=message["frame_index"]))
    done.set()
    dealer.close(0)


def run(code_root: Path, n_frames: int, images: list[np.ndarray], label: str) -> dict[str, float]:
    frames_port, raw_port, reduced_port, record_port = free_ports(4)
    sender = StreamV2Sender("tcp://127.0.0.1:0", compression="bslz4", sndhwm=4)
    args = [sys.executable, "-m", "beamkin", "stream", "--streamer.source", f"dectris2:{sender.endpoint}",
            "--endpoints.frames", f"tcp://127.0.0.1:{frames_port}", "--endpoints.raw", f"tcp://127.0.0.1:{raw_port}",
            "--endpoints.reduced", f"tcp://127.0.0.1:{reduced_port}", "--logging.level", "WARNING"]
    if (code_root / "beamkin" / "defaults.toml").read_text().find("\nrecord = ") >= 0:
        args += ["--endpoints.record", f"tcp://127.0.0.1:{record_port}"]
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    stage = subprocess.Popen(args, cwd=tempfile.gettempdir(), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, start_new_session=True)
    context = zmq.Context()
    stalled = context.socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 65536)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.connect(f"tcp://127.0.0.1:{raw_port}")
    done = threading.Event()
    try:
        assert stage.stdout.readline().strip() == "BEAMKIN-READY", "the streamer did not start"
        worker = threading.Thread(target=fake_worker, args=(context, f"tcp://127.0.0.1:{frames_port}", n_frames, done))
        worker.start()
        assert sender.writable(20.0), "the streamer did not connect to the fake EIGER"
        time.sleep(1.0)  # the stalled subscriber is connected and subscribed
        before = memory_mb(stage.pid)["VmRSS"]
        sender.send_start({"image_size_x": SHAPE[1], "image_size_y": SHAPE[0], "count_time": 0.3, "frame_time": 0.3,
                           "number_of_images": n_frames, "bit_depth_image": 32, "pixel_size_x": 172e-6,
                           "pixel_size_y": 172e-6, "beam_center_x": 490.0, "beam_center_y": 520.0,
                           "detector_distance": 0.25, "incident_wavelength": 0.8})
        for i in range(n_frames):
            sender.send_image(i, images[i % len(images)], 0.3 * i, 0.3 * i + 0.3)
        worker.join(timeout=300)
        time.sleep(1.0)
        after = memory_mb(stage.pid)
        sender.send_end()
    finally:
        done.set()
        os.killpg(stage.pid, signal.SIGINT)
        try:
            stage.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(stage.pid, signal.SIGKILL)
        stalled.close(0)
        sender.close(0)
        context.term()
    result = {"before_MB": before, "peak_MB": after["VmHWM"], "after_MB": after["VmRSS"]}
    result["growth_MB"] = result["peak_MB"] - before
    print(f"{label:>9}: RSS before the first frame {before:7.1f} MB, peak {after['VmHWM']:7.1f} MB, "
          f"after {n_frames} frames {after['VmRSS']:7.1f} MB (growth {result['growth_MB']:.1f} MB)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--baseline", default="029cafd", help="commit measured as the baseline (before issue 11)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [rng.poisson(1.0, size=SHAPE).astype(np.uint32) for _ in range(4)]
    frame_mb = images[0].nbytes / 1e6
    print(f"{args.frames} frames of {SHAPE[1]} x {SHAPE[0]} uint32 ({frame_mb:.1f} MB each, "
          f"{args.frames * frame_mb:.0f} MB in all), one stalled SUB on the raw PUB", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(f"git -C {ROOT} archive {args.baseline} | tar -x -C {folder}", shell=True, check=True)
        baseline = run(Path(folder), args.frames, images, args.baseline)
    current = run(ROOT, args.frames, images, "this")
    print(f"growth ratio this / {args.baseline}: {current['growth_MB'] / max(baseline['growth_MB'], 1e-9):.3f}")


if __name__ == "__main__":
    main()
