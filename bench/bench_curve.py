"""What CURVE costs on the sockets between hosts (beamkin/security.py): the time to move frames of
a given size over PUSH -> PULL on loopback, plaintext and CURVE, set up by beamkin.sockets and
beamkin.security as the stages do. Prints MB/s and ms per frame for each; the difference is the
encryption (XSalsa20-Poly1305) of both ends.

    .venv/bin/python bench/bench_curve.py [--frame-bytes 4194304] [--frames 200]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import zmq

from beamkin import config as configuration
from beamkin import security, sockets
from beamkin.loopback import LoopbackPorts


def rate(frame_bytes: int, frames: int, curve: bool, keys: Path) -> float:
    """Seconds per frame moved PUSH -> PULL (the PULL bound by sockets.bind, as the inference's)."""
    ports = LoopbackPorts.free()
    config = configuration.defaults()
    config["endpoints"]["reduced"] = f"tcp://127.0.0.1:{ports.reduced}"
    if curve:
        config["security"]["secret_key"] = str(keys / "host.key_secret")
        config["security"]["reduced"] = {"server_key": str(keys / "host.key"), "clients": str(keys / "clients")}
    security.configure(config)
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    sockets.bind(pull, config["endpoints"]["reduced"])
    push = sockets.pusher(context, config["endpoints"]["reduced"])
    payload = bytes(frame_bytes)
    push.send(payload)
    pull.recv()  # connected (handshake done)
    began = time.perf_counter()
    for _ in range(frames):
        push.send(payload, copy=False)
        pull.recv(copy=False)
    elapsed = time.perf_counter() - began
    push.close(0)
    pull.close(0)
    context.term()
    return elapsed / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frame-bytes", type=int, default=4 << 20)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    keys = Path(tempfile.mkdtemp(prefix="beamkin-curve-bench-"))
    try:
        security.create_keys(keys, "host")
        (keys / "clients").mkdir()
        shutil.copy(keys / "host.key", keys / "clients" / "host.key")
        results = {"plaintext": [], "curve": []}
        for _ in range(args.rounds):  # interleaved: the machine's load changes both alike
            results["plaintext"].append(rate(args.frame_bytes, args.frames, False, keys))
            results["curve"].append(rate(args.frame_bytes, args.frames, True, keys))
        for name, seconds in results.items():
            median = statistics.median(seconds)
            print(f"{name:9s}: {args.frame_bytes / median / 1e6:8.1f} MB/s, {median * 1e3:7.3f} ms per "
                  f"{args.frame_bytes}-byte frame (median of {args.rounds} rounds of {args.frames})")
        ratios = [c / p for c, p in zip(results["curve"], results["plaintext"])]
        print(f"CURVE / plaintext time per frame: {statistics.median(ratios):.2f} (median of per-round ratios)")
    finally:
        shutil.rmtree(keys, ignore_errors=True)
        security.configure(None)


if __name__ == "__main__":
    main()
