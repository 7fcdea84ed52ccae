"""A 1D powder pattern (:class:`Pattern`): what the reducer makes of a frame and fits phase fractions to.

Patterns come from the azimuthal integration of detector frames (reducer.integrate, which sets
``model_response`` so fits can model the exact binning) or directly from strip-detector profiles
(:meth:`Pattern.from_profile`: counts per 2theta step, Poisson sigma).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from beamkin.errors import ReductionError

__all__ = ["Pattern"]


@dataclasses.dataclass
class Pattern:
    """A 1D powder pattern.

    radial: bin centres, degrees 2theta (unit "2th_deg") or 1/nm (unit "q_nm^-1");
    intensity: corrected mean counts per pixel (2D detectors) or counts per step (strip detectors);
    sigma: one-standard-deviation Poisson uncertainty of intensity, 0 for empty bins;
    count: number of (fractional) pixels contributing to each bin, None when not known;
    status: "ok" or "flagged"; reason: why it was flagged ("" when ok).
    """

    radial: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    unit: str = "2th_deg"
    count: np.ndarray | None = None
    status: str = "ok"
    reason: str = ""
    model_response: Any = dataclasses.field(default=None, repr=False, compare=False)
    """Optional callable f -> bins: the noiseless pattern this pattern's reduction gives for a
    scattering law f(two_theta_deg array) -> intensity (set by Integrator; None for profiles,
    where a bin is the mean over its 2theta step). Not serialised."""

    @property
    def valid(self) -> np.ndarray:
        """Bins usable for fitting: finite intensity and sigma, and at least one contributing
        pixel (count > 0) or, when count is unknown, sigma > 0."""
        ok = np.isfinite(self.intensity) & np.isfinite(self.sigma) & (self.sigma >= 0)
        if self.count is not None:
            return ok & (self.count > 0)
        return ok & (self.sigma > 0)

    @classmethod
    def from_profile(cls, two_theta_deg, counts, sigma=None) -> "Pattern":
        """Pattern from a strip-detector profile (MYTHEN): counts per 2theta step, degrees.

        sigma defaults to sqrt(counts) (Poisson). Non-finite or negative counts make the step
        invalid (count = 0, sigma = 0, intensity = 0); count is 1 for the other steps.
        """
        tth = np.asarray(two_theta_deg, dtype=np.float64)
        y = np.asarray(counts, dtype=np.float64)
        if tth.ndim != 1 or y.shape != tth.shape:
            raise ReductionError(f"profile arrays must be 1D and equal length, got {tth.shape} and {y.shape}")
        if sigma is None:
            with np.errstate(invalid="ignore"):
                s = np.sqrt(np.where(y > 0, y, 0.0))
        else:
            s = np.asarray(sigma, dtype=np.float64)
            if s.shape != tth.shape:
                raise ReductionError(f"profile sigma shape {s.shape} differs from counts shape {y.shape}")
        bad = ~np.isfinite(y) | (y < 0) | ~np.isfinite(s) | ~np.isfinite(tth)
        if bad.any():
            y = np.where(bad, 0.0, y)
            s = np.where(bad, 0.0, s)
        status, reason = "ok", ""
        if bad.all():
            status, reason = "flagged", "all profile steps invalid (NaN or negative counts)"
        count = (~bad).astype(np.float64)
        return cls(radial=tth, intensity=y, sigma=s, unit="2th_deg", count=count, status=status, reason=reason)
