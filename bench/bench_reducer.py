"""Reducer benchmark: Integrator.integrate vs bare pyFAI integrate1d, fraction estimate, rendering.

Both integrations run in this process on the same Pilatus 1M-size synthetic frames, the same
geometry, mask, method, number of bins and corrections; rounds alternate between the two so
load from other processes hits both alike. Prints frames per second, the ratio (target >= 0.9),
time per phase-fraction estimate, synthetic frame rendering time and peak memory.

    .venv/bin/python bench/bench_reducer.py [--frames 20] [--rounds 5] [--npt 3000]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reducer.fractions import PhaseFractionEstimator  # noqa: E402
from reducer.integrate import Integrator  # noqa: E402
from simulator.synthetic import SyntheticPowderDetector, default_metadata  # noqa: E402


def bare_integrator(md):
    """A plain pyFAI AzimuthalIntegrator with the start message's geometry (no beamkin code)."""
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    geo, det = md["geometry"], md["detector"]
    py, px = det["pixel_size_m"]
    return AzimuthalIntegrator(dist=geo["distance_m"], poni1=geo["beam_center_px"][1] * py,
                               poni2=geo["beam_center_px"][0] * px,
                               detector=Detector(pixel1=py, pixel2=px, max_shape=tuple(det["shape"])),
                               wavelength=geo["wavelength_A"] * 1e-10)


def time_per_frame(fn, frames) -> float:
    t = time.perf_counter()
    for f in frames:
        fn(f)
    return (time.perf_counter() - t) / len(frames)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--npt", type=int, default=3000)
    args = ap.parse_args(argv)

    md = default_metadata()
    det = SyntheticPowderDetector(md, seed=1)
    render = []
    frames = []
    for i, alpha in enumerate(np.linspace(0, 1, args.frames)):
        t = time.perf_counter()
        frames.append(det.image(float(alpha), 1 / 3))
        render.append(time.perf_counter() - t)
    print(f"synthetic 1M frame rendering: median {1e3 * statistics.median(render[1:]):.1f} ms "
          f"(first {1e3 * render[0]:.0f} ms incl. compiled-code load)")

    dummy = float(2**32 - 1)
    methods = [("no", "csr", "cython"), ("bbox", "csr", "cython"), ("no", "histogram", "cython")]
    print(f"\nbare pyFAI integrate1d, npt={args.npt}, error_model=poisson, Pilatus 1M-size frames:")
    bare_times = {}
    for method in methods:
        ai = bare_integrator(md)
        kw = dict(unit="2th_deg", method=method, error_model="poisson", mask=det.gap_mask, dummy=dummy,
                  delta_dummy=0.5, polarization_factor=0.99, correctSolidAngle=True)
        ai.integrate1d(frames[0], args.npt, **kw)  # builds the engine
        bare_times[method] = min(time_per_frame(lambda f: ai.integrate1d(f, args.npt, **kw), frames)
                                 for _ in range(2))
        print(f"  {','.join(method):22s} {1e3 * bare_times[method]:7.2f} ms/frame  "
              f"{1 / bare_times[method]:7.1f} frames/s")

    print("\nIntegrator.integrate vs bare integrate1d, same frames and method, alternating rounds:")
    results = {}
    for method in methods[:2]:
        ai = bare_integrator(md)
        kw = dict(unit="2th_deg", method=method, error_model="poisson", mask=det.gap_mask, dummy=dummy,
                  delta_dummy=0.5, polarization_factor=0.99, correctSolidAngle=True)
        integ = Integrator.from_metadata(md, npt=args.npt, method=method)
        ai.integrate1d(frames[0], args.npt, **kw)
        integ.integrate(frames[0])
        t_bare, t_ours = [], []
        for _ in range(args.rounds):
            t_bare.append(time_per_frame(lambda f: ai.integrate1d(f, args.npt, **kw), frames))
            t_ours.append(time_per_frame(integ.integrate, frames))
        tb, to = statistics.median(t_bare), statistics.median(t_ours)
        results[method] = (tb, to)
        print(f"  {','.join(method):22s} bare {1 / tb:7.1f} frames/s   Integrator {1 / to:7.1f} frames/s   "
              f"ratio {tb / to:5.2f} of medians, {min(t_bare) / min(t_ours):5.2f} of best rounds  (target >= 0.9)")

    integ = Integrator.from_metadata(md, npt=args.npt)
    patterns = [integ.integrate(f) for f in frames]
    est = PhaseFractionEstimator.from_config({}, md)
    t = time.perf_counter()
    est.estimate(patterns[0], 10.0)
    setup = time.perf_counter() - t
    times = []
    for _ in range(10):
        for p in patterns:
            t = time.perf_counter()
            est.estimate(p, 10.0)
            times.append(time.perf_counter() - t)
    times.sort()
    print(f"\nphase fraction estimate (peaks, 6 windows): median {1e3 * times[len(times) // 2]:.3f} ms, "
          f"p99 {1e3 * times[int(0.99 * len(times))]:.3f} ms; first frame of a series (line responses) "
          f"{1e3 * setup:.0f} ms")
    cfg = est.config
    cfg_wp = type(cfg)(**{**cfg.__dict__, "method": "whole_pattern"})
    est_wp = PhaseFractionEstimator(cfg_wp)
    est_wp.estimate(patterns[0], 10.0)
    t = time.perf_counter()
    for p in patterns:
        est_wp.estimate(p, 10.0)
    print(f"phase fraction estimate (whole pattern NNLS): {1e3 * (time.perf_counter() - t) / len(patterns):.2f} ms")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory of this process: {rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
