"""`beamkin analyze` speed: a 300-frame series (3 Hz, 100 s of measurement) with all 16 models
x 4096 particles, the live defaults otherwise (inference.service.make_engine), against the
series' own real time (target: >= 5x faster) and against the same analysis with the model
samplers on one thread (the baseline measured in the same run).

F1 series: onset at 40 % of the window, k = 0.6192 1/s, noise 0.02, exposure 0.3 s, sigma given.

Usage: python bench/bench_analyze.py [--frames 300] [--particles 4096]
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
sys.path.insert(0, str(ROOT / "bench"))

from bench_inference import cpu_model  # noqa: E402
from beamkin import config as configuration  # noqa: E402
from inference.analyze import Series, analyze_series  # noqa: E402
from inference.models import MODEL_NAMES, alpha_numpy  # noqa: E402
from inference.service import make_engine  # noqa: E402

FRAME_TIME, EXPOSURE, NOISE = 1.0 / 3.0, 0.3, 0.02


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--particles", type=int, default=4096)
    args = ap.parse_args()
    print(f"# bench_analyze  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.machine()}  "
          f"{cpu_model()}  cpus={os.cpu_count()}  load={os.getloadavg()[0]:.1f}", flush=True)
    n = args.frames
    t = np.arange(n) * FRAME_TIME + 0.5 * EXPOSURE
    y = alpha_numpy("F1", 0.6192 * (t - 0.4 * n * FRAME_TIME)) + np.random.default_rng(1).normal(0, NOISE, n)
    series = Series(time_s=t, alpha=y, sigma=np.full(n, NOISE), exposure_s=np.full(n, EXPOSURE), source="bench")
    start = {"series_id": "bench", "n_frames": n, "frame_time_s": FRAME_TIME, "gas_time_s": None}
    real_time = n * FRAME_TIME
    walls = {}
    for threads in (1, 0):
        table = configuration.defaults()["inference"]
        table.update(models=list(MODEL_NAMES), particles=args.particles, model_threads=threads)
        engine = make_engine(table, start)
        began = time.perf_counter()
        result = analyze_series(series, engine=engine)
        walls[threads] = time.perf_counter() - began
        engine.close()
        label = "one thread" if threads == 1 else f"{engine.threads} threads"
        print(f"analyze {n} frames, 16 models x {args.particles}, model samplers on {label}: {walls[threads]:.1f} s "
              f"({real_time / walls[threads]:.1f}x faster than the series' {real_time:.0f} s; target >= 5x); "
              f"leading {result['leading_model']}", flush=True)
    print(f"ratio one thread / all cores: {walls[1] / walls[0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
