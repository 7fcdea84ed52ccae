"""Is what the live path publishes the Bayesian answer?  (docs/design.md, live exactness)

For each scenario a paper-like F1 series (t0 at 62 % of a 12 s window for 36 frames, else at
40 %, k = 0.6192 1/s, noise 0.02 on alpha, exposure 0.3 s) goes through ``LiveInference`` as
the inference stage runs it, with the exact sampler in its thread (batched steps):

* ``realtime``: 36 frames at 3 Hz;
* ``burst``: 36 frames back to back (a folder of 1D files that all arrive at once);
* ``replay10x``: 36 frames at 30 Hz;
* ``long10Hz``: 1000 frames at 10 Hz.

Every published estimate is compared with the exact posterior of the same frame (a separate
run of the exact sampler, one frame per step, another seed): an estimate not marked stale must
have its model-averaged t0 within one exact sd and every model probability (and P(reaction))
within 0.1.  Reported: estimates stale (target: at most 1 in 36), disagreements among the
others (target: 0), how far the exact sampler lagged (p99, in frames; target for 16 models x
4096 at 3 Hz: <= 2, for the default 5 models: <= 1), the alert frame, and the estimate latency
against a baseline measured in the same run (the bare likelihood of one frame, all models).

Then, the exact sampler's lag alone for 16 models x 4096 at 3 Hz; and false alarms: the alert
rule on ``--flat`` series with alpha = 0 plus noise 0.02 (target 0), exact sampler frame by
frame (the rule the live path applies to its posteriors).

Usage: python bench/bench_live_exactness.py [--particles 4096] [--scenarios realtime,burst,...]
                                            [--flat 200] [--flat-particles 1024] [--lag16 36]
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

from bench_inference import bare_reweight_seconds, cpu_model  # noqa: E402
from inference.interpreter import tune_interpreter_for_latency  # noqa: E402
from inference.live import LiveInference  # noqa: E402
from inference.models import MODEL_NAMES, alpha_numpy  # noqa: E402
from inference.priors import Priors  # noqa: E402
from inference.smc import OnlineInference  # noqa: E402

DEFAULT_MODELS = ("F1", "A2", "A3", "R3", "D3")
EXPOSURE, NOISE, K_TRUE = 0.3, 0.02, 0.6192
SCENARIOS = {"realtime": (36, 3.0), "burst": (36, 0.0), "replay10x": (36, 30.0), "long10Hz": (1000, 10.0)}


def series(n_frames: int, rate_hz: float, seed: int, flat: bool = False):
    period = 1.0 / 3.0 if rate_hz in (0.0, 30.0) else 1.0 / rate_hz
    t = np.arange(n_frames) * period + 0.5 * EXPOSURE
    t_end = n_frames * period
    t0 = 7.4461 if n_frames == 36 else 0.4 * t_end
    mean = np.zeros(n_frames) if flat else alpha_numpy("F1", K_TRUE * (t - t0))
    return t, mean + np.random.default_rng(seed).normal(0, NOISE, n_frames), t_end, t0


def engine(models, n_particles, t_end, seed, threads=1):
    return OnlineInference(models=models, priors=Priors.for_series(t_end, gas_time_s=0.0), n_particles=n_particles,
                           seed=seed, gas_time_s=0.0, threads=threads)


def run_live(models, n_particles, n_frames, rate_hz, seed=0):
    """Feed one series in (rate 0: back to back); returns the estimates, latencies and result."""
    t, y, t_end, t0 = series(n_frames, rate_hz, seed=1)
    sampler = engine(models, n_particles, t_end, seed, threads=os.cpu_count() or 1)
    sampler.warm_up()
    live = LiveInference(sampler)
    estimates, latency, exact = [], [], []
    began = time.perf_counter()
    for j in range(n_frames):
        due = began + j / rate_hz if rate_hz > 0 else 0.0
        while time.perf_counter() < due:  # between frames: what the stage's idle loop does
            exact += live.exact_payloads()
            if not live.prepare():
                time.sleep(0.001)
        start = time.perf_counter()
        estimates.append(live.submit(j, float(t[j]), EXPOSURE, float(y[j]), NOISE))
        latency.append(time.perf_counter() - start)
        exact += live.exact_payloads()
    while not live.caught_up:
        exact += live.exact_payloads()
        time.sleep(0.005)
    exact += live.exact_payloads()
    return t, y, t0, estimates, np.array(latency), exact, live.result()


def reference(models, n_particles, t, y, t_end, seed=12345):
    sampler = engine(models, n_particles, t_end, seed)
    return [sampler.update(j, float(t[j]), EXPOSURE, float(y[j]), NOISE) for j in range(t.size)]


def compare(estimates, refs):
    """(stale count, disagreements among the others, worst t0 offset in exact sd, worst probability gap)."""
    stale = disagree = 0
    worst_t0 = worst_p = 0.0
    for est, ref in zip(estimates, refs):
        if est["stale"]:
            stale += 1
            continue
        t0 = ref["model_averaged"]["t0"]
        offset = abs(est["model_averaged"]["t0"]["mean"] - t0["mean"]) / t0["sd"]
        gap = max([abs(est["models"][m]["probability"] - ref["models"][m]["probability"]) for m in est["models"]]
                  + [abs(est["reaction_probability"] - ref["reaction_probability"])])
        worst_t0, worst_p = max(worst_t0, offset), max(worst_p, gap)
        disagree += int(offset > 1.0 or gap > 0.1)
    return stale, disagree, worst_t0, worst_p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=int, default=4096)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--flat", type=int, default=200, help="flat series for the false-alarm count (0: skip)")
    ap.add_argument("--flat-particles", type=int, default=1024)
    ap.add_argument("--lag16", type=int, default=36, help="frames of the 16-model lag run at 3 Hz (0: skip)")
    args = ap.parse_args()
    print(f"# bench_live_exactness  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.machine()}  "
          f"{cpu_model()}  cpus={os.cpu_count()}  load={os.getloadavg()[0]:.1f}", flush=True)
    base = bare_reweight_seconds(args.particles)
    print(f"baseline: bare likelihood of one frame, 16 models x {args.particles}: {1e3 * base:.2f} ms", flush=True)
    tune_interpreter_for_latency()
    for name in [s for s in args.scenarios.split(",") if s]:
        n_frames, rate = SCENARIOS[name]
        t, y, t0, estimates, latency, exact, result = run_live(DEFAULT_MODELS, args.particles, n_frames, rate)
        refs = reference(DEFAULT_MODELS, args.particles, t, y, n_frames * (1 / 3 if rate in (0, 30) else 1 / rate))
        stale, disagree, worst_t0, worst_p = compare(estimates, refs)
        behind = np.array([e["diagnostics"]["frames_behind"] for e in estimates])
        onset_frame = int(np.argmax(t + EXPOSURE / 2 > t0))
        alert = result["alert"]["frame_index"]
        print(f"{name:9s} {n_frames:4d} frames, 5 models x {args.particles}: stale {stale}/{n_frames} "
              f"(target <= {n_frames / 36:.0f}); disagreeing {disagree} (target 0; worst t0 {worst_t0:.2f} sd, "
              f"worst probability {worst_p:.3f}); exact sampler behind p50 {np.percentile(behind, 50):.0f} "
              f"p99 {np.percentile(behind, 99):.0f} max {behind.max()} frames in {len(exact)} steps; alert at frame "
              f"{alert} (onset frame {onset_frame}); estimate latency p50 {1e3 * np.median(latency):.1f} ms p99 "
              f"{1e3 * np.percentile(latency, 99):.1f} ms (p50/baseline {np.median(latency) / base:.1f}x)", flush=True)
    if args.lag16:
        t, y, t0, estimates, latency, exact, result = run_live(MODEL_NAMES, args.particles, args.lag16, 3.0)
        behind = np.array([e["diagnostics"]["frames_behind"] for e in estimates])
        stale = sum(e["stale"] for e in estimates)
        print(f"lag16     {args.lag16:4d} frames at 3 Hz, 16 models x {args.particles}: exact sampler behind p50 "
              f"{np.percentile(behind, 50):.0f} p99 {np.percentile(behind, 99):.0f} max {behind.max()} frames "
              f"(target p99 <= 2), {len(exact)} steps; stale {stale}/{args.lag16}; estimate latency p99 "
              f"{1e3 * np.percentile(latency, 99):.1f} ms", flush=True)
    if args.flat:
        alerts, reaction = 0, []
        began = time.perf_counter()
        for i in range(args.flat):
            t, y, t_end, _ = series(36, 3.0, seed=10_000 + i, flat=True)
            sampler = engine(DEFAULT_MODELS, args.flat_particles, t_end, seed=i)
            for j in range(t.size):
                alerts += sampler.assimilate(j, float(t[j]), EXPOSURE, float(y[j]), NOISE) is not None
            reaction.append(sampler.reaction_probability())
            if (i + 1) % 20 == 0:
                print(f"  ... {i + 1}/{args.flat} flat series, {alerts} alerts, {time.perf_counter() - began:.0f} s",
                      file=sys.stderr, flush=True)
        reaction = np.array(reaction)
        print(f"false alarms: {alerts} alerts on {args.flat} flat series (target 0), 5 models x "
              f"{args.flat_particles}; final P(reaction) median {np.median(reaction):.3f}, max {reaction.max():.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
