"""beamkin's IBIS vs the ``particles`` library's IBIS (Chopin's reference implementation).

Paper-like scenario (docs/design.md section 7), F1 with t0, log k, log s free and A = 1, same
priors, N particles, ESS threshold 0.5, default ``particles`` moves.  Measured in the
same run for both: per-frame time (p50, p99, total) and log-evidence error vs the dense
quadrature of tests/test_inference_quadrature.py over several seeds.  beamkin runs twice:
the exact sampler alone (``OnlineInference``, the same algorithm as ``particles``' IBIS), and
live (``LiveInference``: per-frame time is the immediate estimate, the exact sampler running
behind in its thread; its evidence is the exact one).  Printed ratios: particles time /
beamkin time and evidence sd ratio, and the efficiency at equal N: (mean squared log-evidence
error against quadrature) x (CPU seconds per series, all threads, ``time.process_time``);
target: beamkin's at least 20x smaller than particles'.

Needs ``pip install particles`` (benchmark-only dependency).
Usage: python bench/bench_particles.py [--particles 4096] [--seeds 10]
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

from inference.live import LiveInference  # noqa: E402
from inference.priors import Priors  # noqa: E402
from inference.smc import OnlineInference  # noqa: E402
from test_inference_quadrature import LOGK, LOGS, T_WINDOW, paper_series, quadrature  # noqa: E402


def run_particles(t, y, n, seed):
    if not hasattr(np, "float"):  # particles 0.3alpha calls np.float, an alias NumPy 1.24 removed
        np.float = float
    import particles
    from particles import distributions as dists
    from particles import smc_samplers as ssp

    class F1(ssp.StaticModel):
        def logpyt(self, theta, j):
            k = np.exp(theta["logk"])
            s = np.exp(theta["logs"])
            mu = 1.0 - np.exp(-np.clip(k * (t[j] - theta["t0"]), 0.0, None))
            return -0.5 * np.log(2 * np.pi * s * s) - 0.5 * (self.data[j] - mu) ** 2 / (s * s)

    prior = dists.StructDist({"t0": dists.Uniform(*T_WINDOW), "logk": dists.Uniform(*LOGK),
                              "logs": dists.Uniform(*LOGS)})
    np.random.seed(seed)  # particles draws from numpy's global generator
    alg = particles.SMC(fk=ssp.IBIS(F1(data=y, prior=prior)), N=n, ESSrmin=0.5, verbose=False)
    lat = []
    for _ in range(len(y)):
        start = time.perf_counter()
        next(alg)
        lat.append(time.perf_counter() - start)
    return float(alg.summaries.logLts[-1]), np.array(lat)


def run_beamkin(t, y, n, seed):
    engine = OnlineInference(models=("F1",), priors=Priors(t0=T_WINDOW, fixed={"A": 1.0}), n_particles=n,
                             seed=seed)
    engine.warm_up()
    lat = []
    for j in range(len(y)):
        start = time.perf_counter()
        engine.assimilate(j, float(t[j]), 0.0, float(y[j]), None)
        lat.append(time.perf_counter() - start)
    return engine.samplers["F1"].log_evidence, np.array(lat)


def run_beamkin_live(t, y, n, seed):
    engine = OnlineInference(models=("F1",), priors=Priors(t0=T_WINDOW, fixed={"A": 1.0}), n_particles=n,
                             seed=seed)
    engine.warm_up()
    live = LiveInference(engine)
    lat = []
    for j in range(len(y)):
        start = time.perf_counter()
        live.submit(j, float(t[j]), 0.0, float(y[j]), None)
        lat.append(time.perf_counter() - start)
        while not live.caught_up:  # frames at the pace the exact sampler keeps (no lag to reweight)
            time.sleep(0.0005)
        live.exact_payloads()
    return live.result()["models"]["F1"]["log_evidence"], np.array(lat)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=int, default=4096)
    ap.add_argument("--seeds", type=int, default=10)
    args = ap.parse_args()
    print(f"# bench_particles  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.machine()}  "
          f"cpus={os.cpu_count()}  load={os.getloadavg()[0]:.1f}")
    t, y = paper_series()
    ref = quadrature("F1", t, y)["log_evidence"]
    rows, cpu = {}, {}
    for name, runner in (("beamkin", run_beamkin), ("live", run_beamkin_live), ("particles", run_particles)):
        errs, lats = [], []
        cpu_began = time.process_time()
        for seed in range(args.seeds):
            logz, lat = runner(t, y, args.particles, seed)
            errs.append(logz - ref)
            lats.append(lat)
        cpu_per_series = (time.process_time() - cpu_began) / args.seeds
        lat = np.concatenate(lats)
        errs = np.array(errs)
        rows[name] = (errs, lat)
        cpu[name] = cpu_per_series
        print(f"{name:9s} CPU {cpu_per_series:.2f} s per series, mean squared error {np.mean(errs ** 2):.4f} nat^2, "
              f"efficiency (MSE x CPU) {np.mean(errs ** 2) * cpu_per_series:.5f}")
        print(f"{name:9s} N={args.particles}: evidence error mean {errs.mean():+.3f} sd {errs.std(ddof=1):.3f} nat; "
              f"per frame p50 {1e3 * np.median(lat):.2f} ms p99 {1e3 * np.percentile(lat, 99):.2f} ms, "
              f"series {1e3 * lat.sum() / args.seeds:.0f} ms")
    (e_b, l_b), (e_l, l_l), (e_p, l_p) = rows["beamkin"], rows["live"], rows["particles"]
    print(f"ratio particles/beamkin exact sampler: series time {l_p.sum() / l_b.sum():.1f}x, p50 "
          f"{np.median(l_p) / np.median(l_b):.1f}x, p99 {np.percentile(l_p, 99) / np.percentile(l_b, 99):.1f}x "
          f"(target >= 20x); evidence sd {e_p.std(ddof=1) / max(e_b.std(ddof=1), 1e-12):.1f}x")
    efficiency = {name: float(np.mean(rows[name][0] ** 2)) * cpu[name] for name in rows}
    print(f"efficiency ratio particles/beamkin (MSE x CPU s per series): exact sampler "
          f"{efficiency['particles'] / efficiency['beamkin']:.1f}x (target >= 20x)")
    print(f"ratio particles/beamkin live estimate per frame: p50 {np.median(l_p) / np.median(l_l):.1f}x, p99 "
          f"{np.percentile(l_p, 99) / np.percentile(l_l, 99):.1f}x, mean {l_p.mean() / l_l.mean():.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
