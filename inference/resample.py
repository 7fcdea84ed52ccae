"""Systematic resampling (Kitagawa 1996; Douc, Cappe & Moulines 2005).

Given normalised weights W_1..W_N and one uniform u in [0, 1), the N offspring positions
(i + u)/N are located in the cumulative weights.  The random number comes from the
caller's numpy Generator, so the result is reproducible for a given seed.
"""

from __future__ import annotations

import numpy as np


def systematic_indices(weights: np.ndarray, n_out: int, u: float) -> np.ndarray:
    """Indices of ``n_out`` offspring by systematic resampling with offset u in [0, 1)."""
    if not 0.0 <= u < 1.0:
        raise ValueError(f"systematic resampling offset must be in [0, 1), got {u}")
    w = np.asarray(weights, dtype=float)
    if w.ndim != 1 or w.size == 0 or np.any(w < 0) or not np.isfinite(w).all():
        raise ValueError("resampling weights must be a non-empty 1-D array of finite non-negative numbers")
    total = w.sum()
    if total <= 0:
        raise ValueError("resampling weights sum to zero")
    cdf = np.cumsum(w / total)
    cdf[-1] = 1.0
    positions = (np.arange(n_out) + u) / n_out
    return np.minimum(np.searchsorted(cdf, positions, side="right"), w.size - 1)


def systematic_resample(weights: np.ndarray, rng: np.random.Generator, n_out: int | None = None) -> np.ndarray:
    """Systematic resampling indices, with the offset drawn from ``rng``."""
    return systematic_indices(weights, len(weights) if n_out is None else n_out, float(rng.random()))
