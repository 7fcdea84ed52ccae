"""End-to-end latency and start-up of the live pipeline (targets and figures: docs/benchmarks.md).

Runs `beamkin demo --once` at real speed (3 Hz frames, every stage its own process) on free
loopback ports and reads, from each published `estimate` (the frame's posterior estimate, see
inference.live), `latency_s`: the time from the streamer receiving a frame to its posterior
being published; the same from each exact `posterior` (published when the exact sampler has
assimilated the frame). Baseline, measured in the same run: the same work done in one process
without any sockets (integrate + phase fraction + LiveInference.submit on the same simulated
frames at the same 3 Hz, the exact sampler running in its thread). Prints p50/p99 of both and
their ratio, plus start-up (launch to all stages ready, launch to first posterior estimate).

Targets: latency p50 < 50 ms, p99 < 150 ms at 3 Hz; first frame processed < 5 s after start.
Usage: python bench/bench_pipeline.py [--frames 36] [--particles 4096]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import zmq

from beamkin import config as configuration
from beamkin import protocol
from beamkin.loopback import LoopbackPorts, beamkin_process, results_listener


def pipeline_latencies(frames: int, particles: int) -> tuple[list[float], list[float], list[float], float, float]:
    ports = LoopbackPorts.free()
    context = zmq.Context()
    listener = results_listener(context, ports)
    launched = time.monotonic()
    demo = beamkin_process("demo", "--once", "--speed", "1", *ports.options(), "--simulator.n_frames", str(frames),
                           "--inference.particles", str(particles))
    ready_s = first_posterior_s = float("nan")
    latencies, exact_latencies, published = [], [], []
    import threading

    def watch_stdout():
        nonlocal ready_s
        for line in demo.stdout:
            if "beamkin dashboard: http://" in line and ready_s != ready_s:
                ready_s = time.monotonic() - launched

    threading.Thread(target=watch_stdout, daemon=True).start()
    while demo.poll() is None:
        if listener.poll(200):
            message = protocol.decode(listener.recv_multipart())
            if message.type == "estimate":
                if first_posterior_s != first_posterior_s:
                    first_posterior_s = time.monotonic() - launched
                latencies.append(message["diagnostics"]["latency_s"])
                published.append(time.time())
            elif message.type == "posterior":
                exact_latencies.append(message["diagnostics"]["latency_s"])
    listener.close(0)
    context.term()
    if demo.returncode != 0:
        raise SystemExit(f"demo failed with code {demo.returncode}")
    # frames received before the series' first estimate was out waited for the series set-up
    # (the reducer's integrator build): steady state is the frames received after it
    steady = [lat for lat, out in zip(latencies, published) if out - lat >= published[0]]
    return latencies, steady, exact_latencies, ready_s, first_posterior_s


def in_process_work(frames: int, particles: int) -> list[float]:
    """Per-frame time of the same work without processes or sockets."""
    from inference.live import LiveInference
    from inference.service import make_engine
    from reducer.fractions import PhaseFractionEstimator
    from reducer.integrate import Integrator
    from simulator.experiment import exposure_averaged_alpha
    from simulator.synthetic import SyntheticPowderDetector, default_metadata

    cfg = configuration.defaults()
    sim = cfg["simulator"]
    cfg["inference"]["particles"] = particles
    metadata = default_metadata(series_id="bench", frame_time_s=sim["frame_time_s"], exposure_s=sim["exposure_s"],
                                n_frames=frames, gas_time_s=sim["gas_time_s"])
    detector = SyntheticPowderDetector(metadata, seed=1)
    integrator = Integrator.from_metadata(metadata, npt=cfg["reducer"]["npt"])
    estimator = PhaseFractionEstimator.from_config(cfg["reducer"], metadata)
    start = protocol.make("start", source="bench", **metadata)
    engine = make_engine(cfg["inference"], start)
    engine.warm_up()
    live = LiveInference(engine)
    times = np.arange(frames) * sim["frame_time_s"] + sim["exposure_s"] / 2
    alphas = exposure_averaged_alpha(sim["model"], sim["t0_s"], sim["k_per_s"], 1.0, 2.0, times, sim["exposure_s"])
    work = []
    started = time.perf_counter()
    for index in range(frames):
        image = detector.image(float(alphas[index]), sim["exposure_s"])
        while time.perf_counter() < started + index * sim["frame_time_s"]:  # 3 Hz, as the demo
            live.exact_payloads()
            if not live.prepare():
                time.sleep(0.001)
        began = time.perf_counter()
        result = estimator.estimate(integrator.integrate(image), float(times[index]))
        live.submit(frame_index=index, time_s=float(times[index]), exposure_s=sim["exposure_s"],
                    alpha=result.alpha, sigma=result.sigma_alpha)
        work.append(time.perf_counter() - began)
    live.close()
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=36)
    parser.add_argument("--particles", type=int, default=4096)
    args = parser.parse_args()
    latencies, steady, exact_latencies, ready_s, first_s = pipeline_latencies(args.frames, args.particles)
    work = in_process_work(args.frames, args.particles)
    p = lambda values, q: 1e3 * float(np.percentile(values, q))  # noqa: E731  (ms)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {len(latencies)} frames at 3 Hz, "
          f"{args.particles} particles x 5 models")
    print(f"start-up: all stages ready {ready_s:.2f} s after launch; first posterior estimate {first_s:.2f} s after launch "
          f"(the first frame is read out 0.3 s after the simulator starts)")
    print(f"end-to-end latency (streamer receipt -> posterior estimate published): p50 {p(latencies, 50):.1f} ms, "
          f"p99 {p(latencies, 99):.1f} ms  [targets 50 / 150 ms]")
    print(f"  of which the {len(steady)} frames received after the series' first estimate (not queued behind the "
          f"integrator build): p50 {p(steady, 50):.1f} ms, p99 {p(steady, 99):.1f} ms")
    print(f"exact posterior (streamer receipt -> exact posterior published): p50 {p(exact_latencies, 50):.0f} ms, "
          f"p99 {p(exact_latencies, 99):.0f} ms, max {p(exact_latencies, 100):.0f} ms")
    print(f"baseline, same work in one process: p50 {p(work, 50):.1f} ms, p99 {p(work, 99):.1f} ms")
    print(f"ratio pipeline / in-process: p50 {p(latencies, 50) / p(work, 50):.2f}, p99 {p(latencies, 99) / p(work, 99):.2f}")


if __name__ == "__main__":
    main()
