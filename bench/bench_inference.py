"""Benchmark of the online inference engine (DESIGN section 6).

1. Per-frame latency of ``OnlineInference.update`` (payload included) for 16 models x
   4096 particles on F1 series of 30, 300 and 1000 frames (frame time 1/3 s, onset at 40 %
   of the window, k = 0.6192 1/s, noise 0.02).  Baseline measured in the same run: the bare
   reweighting work of one frame (16 x one-frame likelihood over 4096 particles).
   Target: p99 < 20 ms on 2 cores.
2. Log-evidence error of F1 (t0, k, s free, A = 1) on the paper-like scenario vs the dense
   quadrature of tests/test_inference_quadrature.py, over 10 seeds at 4096 particles.
   Targets: |mean error| < 0.15 nat, spread (sd) < 0.1 nat; the particles library's IBIS
   gives sd 0.46 nat, mean error -0.35 nat (DESIGN).

Usage: python bench/bench_inference.py [--lengths 30,300,1000] [--particles 4096] [--seeds 10]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from inference import likelihood as lk  # noqa: E402
from inference.models import MODEL_NAMES, alpha_numpy, model_code  # noqa: E402
from inference.priors import Priors  # noqa: E402
from inference.smc import OnlineInference  # noqa: E402

FRAME_TIME = 1.0 / 3.0


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bare_reweight_seconds(n_particles: int, repeats: int = 20) -> float:
    """Median time of 16 one-frame likelihood evaluations over n_particles (the floor of a frame)."""
    rng = np.random.default_rng(0)
    params = np.ascontiguousarray(np.column_stack([
        rng.uniform(0, 10, n_particles), rng.uniform(-4, 4, n_particles), rng.uniform(-6, -1, n_particles),
        rng.uniform(0.5, 1.2, n_particles), rng.uniform(0.5, 4, n_particles)]))
    out = np.empty(n_particles)
    lk.frame_loglik(0, params, 5.0, 5.0, 0.3, 0.0, 0, 4.0, out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for name in MODEL_NAMES:
            lk.frame_loglik(model_code(name), params, 5.0, 5.0, 0.3, 0.0, 0, 4.0, out)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def latency(n_frames: int, n_particles: int, parallel: bool) -> np.ndarray:
    t = np.arange(n_frames) * FRAME_TIME
    t_end = n_frames * FRAME_TIME
    t0 = 0.4 * t_end
    y = alpha_numpy("F1", 0.6192 * (t - t0)) + np.random.default_rng(1).normal(0, 0.02, n_frames)
    engine = OnlineInference(models=MODEL_NAMES, priors=Priors.for_series(t_end), n_particles=n_particles,
                             seed=0, parallel=parallel)
    engine.warm_up()
    lat = np.empty(n_frames)
    for j in range(n_frames):
        start = time.perf_counter()
        engine.update(j, float(t[j]), 0.0, float(y[j]), None)
        lat[j] = time.perf_counter() - start
        if (j + 1) % 50 == 0:
            print(f"  ... {j + 1}/{n_frames} frames, p50 so far {1e3 * np.median(lat[:j + 1]):.1f} ms",
                  file=sys.stderr, flush=True)
    return lat


def evidence_errors(n_particles: int, seeds: int) -> tuple[np.ndarray, float]:
    from test_inference_quadrature import T_WINDOW, paper_series, quadrature

    t, y = paper_series()
    ref = quadrature("F1", t, y)["log_evidence"]
    errors = []
    for seed in range(seeds):
        engine = OnlineInference(models=("F1",), priors=Priors(t0=T_WINDOW, fixed={"A": 1.0}),
                                 n_particles=n_particles, seed=seed)
        for j, (tj, yj) in enumerate(zip(t, y)):
            engine.assimilate(j, float(tj), 0.0, float(yj), None)
        errors.append(engine.samplers["F1"].log_evidence - ref)
    return np.array(errors), ref


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="30,300,1000")
    ap.add_argument("--particles", type=int, default=4096)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--parallel", action="store_true", help="use the prange kernels")
    args = ap.parse_args()

    print(f"# bench_inference  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.machine()}  "
          f"{cpu_model()}  cpus={os.cpu_count()}  load={os.getloadavg()[0]:.1f}  parallel={args.parallel}")
    base = bare_reweight_seconds(args.particles)
    print(f"baseline: bare reweight of one frame, 16 models x {args.particles}: {1e3 * base:.2f} ms")
    for n_frames in [int(v) for v in args.lengths.split(",")]:
        lat = latency(n_frames, args.particles, args.parallel)
        p50, p99, worst = np.percentile(lat, 50), np.percentile(lat, 99), lat.max()
        print(f"latency 16 x {args.particles}, {n_frames:5d} frames: p50 {1e3 * p50:7.1f} ms  p99 {1e3 * p99:8.1f} ms  "
              f"max {1e3 * worst:8.1f} ms  (p50/baseline {p50 / base:5.1f}x, p99/target(20 ms) {p99 / 0.020:6.1f}x)")
    errors, ref = evidence_errors(args.particles, args.seeds)
    print(f"log evidence F1 paper scenario, N={args.particles}, {args.seeds} seeds: reference {ref:.3f} nat, "
          f"mean error {errors.mean():+.3f} nat, sd {errors.std(ddof=1):.3f} nat, max |error| "
          f"{np.abs(errors).max():.3f} nat (targets 0.15 / 0.1; particles IBIS per DESIGN: -0.35 / 0.46; "
          f"sd ratio to it {errors.std(ddof=1) / 0.46:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
