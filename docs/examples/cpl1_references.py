"""Synthetic reference patterns of pure empty (A) and Ar-loaded (B) CPL-1, for `beamkin phases`.

The two patterns are what the simulator's MYTHEN-like strip detector (simulator.synthetic, the
default experiment: 0.8 angstrom, 2 - 17 degrees 2theta in 0.006 degree steps) records in
``exposure_s`` seconds of each pure phase, with Poisson noise: the stand-in for the two reference
measurements a user makes before a dosing experiment.

docs/examples/cpl1_ar_phases.toml (with its .png and the whole-pattern references
cpl1_ar_phases_phase_a.xy / _phase_b.xy) was produced from the repository root by

    python docs/examples/cpl1_references.py /tmp/cpl1-references
    beamkin phases /tmp/cpl1-references/cpl1_empty.xy /tmp/cpl1-references/cpl1_ar.xy \\
        --range 3 13 --out docs/examples/cpl1_ar_phases.toml

and tests/test_phases_command.py checks that the command still gives that table.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

EXPOSURE_S = 60.0
DETECTOR_SEED = 5
NOISE_SEED = 1


def write_references(folder: str | Path, exposure_s: float = EXPOSURE_S) -> tuple[Path, Path]:
    """Write cpl1_empty.xy and cpl1_ar.xy (columns: 2theta in degrees, counts) into folder."""
    from simulator.synthetic import SyntheticPowderDetector, default_metadata

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    detector = SyntheticPowderDetector(default_metadata(), seed=DETECTOR_SEED)
    rng = np.random.default_rng(NOISE_SEED)
    paths = []
    for name, alpha in (("cpl1_empty", 0.0), ("cpl1_ar", 1.0)):
        tth, expected = detector.expected_profile(alpha, exposure_s)
        path = folder / f"{name}.xy"
        np.savetxt(path, np.column_stack([tth, rng.poisson(expected)]), fmt="%.6f %d",
                   header=f"synthetic CPL-1 reference, alpha = {alpha}, {exposure_s} s (docs/examples/cpl1_references.py)\n"
                          "2theta_deg counts")
        paths.append(path)
    return paths[0], paths[1]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/examples/cpl1_references.py FOLDER")
    for written in write_references(sys.argv[1]):
        print(written)
