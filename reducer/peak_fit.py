"""The peak fit of one pattern: areas of each phase's lines, with their covariance and line shifts.

The model of reducer.peak_profile is linear in the areas a_P,w and the background terms; it is
fitted to the bins of all windows at once by iteratively reweighted least squares with Poisson
variances predicted by the model (reducer.least_squares). The covariance of the coefficients is
(X^T W X)^-1; S_P = sum_w a_P,w and the 2x2 covariance of (S_A, S_B) are the block sums.

Line positions: per frame, each phase whose lines are detected strongly (summed area above
``position_min_snr`` sigma in the fit at the configured positions) gets a common relative shift
eps of sin(theta), chosen on the model's grid by minimum chi^2 and refined by a parabola; a
weaker phase keeps its configured positions (eps = 0), since a shift chosen from noise would
inflate its area. This absorbs lattice strain and geometry miscalibration without a per-frame
nonlinear optimiser, and depends on the frame alone (docs/design.md, section 3 "Reduction").

A frame that cannot be fitted (a window with too few valid bins, singular normal equations, a
non-finite result) raises :class:`PeakFitError`; the estimator flags such a frame.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from beamkin.errors import ReductionError
from reducer.least_squares import (FIT_ERRORS, irls_linear_fit, model_floor, poisson_variance, variance_scale,
                                   weighted_linear_fit)
from reducer.peak_profile import PeaksModel, shifted_center_deg

__all__ = ["PeakFit", "PeakFitError", "fit_peaks", "refine_shift", "SHIFT_SUBDIVISIONS"]

#: a refined line shift is rounded to position_step_rel / SHIFT_SUBDIVISIONS (5e-5 by default: at
#: 2theta = 5 degrees, 0.00025 degrees, about 1 % of a line's FWHM)
SHIFT_SUBDIVISIONS = 10


class PeakFitError(ReductionError):
    """A pattern whose peaks cannot be fitted (the text says why): the frame is flagged, the
    configuration is fine."""


@dataclasses.dataclass
class PeakFit:
    """Result of :func:`fit_peaks`: summed areas S_P = sum_w a_P,w (pattern intensity x degrees),
    the 2x2 covariance of (S_A, S_B), the reference sums T_P = sum_w T_P,w, one report per window
    and phase component ({"phase", "center_deg", "lo_deg", "hi_deg", "area", "sigma_area",
    "fwhm_deg", "chi2_reduced"}) and the line shift eps of each phase."""

    sums: dict[str, float]
    cov: np.ndarray
    reference_sums: dict[str, float]
    peaks: list[dict]
    eps: dict[str, float]


def refine_shift(m: PeaksModel, good, yy, ss, c, eps: dict, phase: str) -> float:
    """eps of one phase minimising chi^2 on the grid (weights fixed from the current model),
    refined by a parabola through the best grid point and its neighbours and rounded to
    position_step_rel / SHIFT_SUBDIVISIONS."""
    g, _ = variance_scale(yy, ss)
    model = np.ascontiguousarray(m.design_at(eps["A"], eps["B"])[good]) @ c
    var = poisson_variance(g, model, model_floor(model))
    grid = m.eps_grid
    chi2 = np.full(grid.shape[0], np.inf)
    other = "B" if phase == "A" else "A"
    fixed = m.base + m.columns_at(other, eps[other])

    def scan(ks):
        for k in ks:
            if np.isinf(chi2[k]):
                design = np.ascontiguousarray((fixed + m.grid_columns[phase][k])[good])
                chi2[k] = weighted_linear_fit(design, yy, var)[2]

    # Descent on the grid from the configured positions (eps = 0): scan the neighbours of the
    # best point until both are scanned, i.e. the nearest local minimum (3 fits for an
    # unshifted phase, one more per grid step of shift).
    n = grid.shape[0]
    k = int(np.argmin(np.abs(grid - eps[phase])))
    scan(range(max(k - 1, 0), min(k + 2, n)))
    while True:
        k = int(np.argmin(chi2))
        todo = [j for j in (k - 1, k + 1) if 0 <= j < n and np.isinf(chi2[j])]
        if not todo:
            break
        scan(todo)
    if 0 < k < grid.shape[0] - 1:
        curv = chi2[k - 1] - 2 * chi2[k] + chi2[k + 1]
        if np.isfinite(curv) and curv > 0:
            step = grid[k + 1] - grid[k]
            refined = grid[k] + 0.5 * step * (chi2[k - 1] - chi2[k + 1]) / curv
            # rounded so that the design columns of recurring shifts come from the cache
            quantum = step / SHIFT_SUBDIVISIONS
            return float(round(refined / quantum) * quantum)
    return float(grid[k])


def fit_peaks(m: PeaksModel, y: np.ndarray, s: np.ndarray, ok: np.ndarray, n_reweight: int,
              position_min_snr: float) -> PeakFit:
    """Global fit of all windows of model ``m`` to a pattern (intensity y, sigma s, valid bins ok,
    on the model's radial grid): IRLS with n_reweight passes, then the shift search for each
    phase detected above position_min_snr sigma (when the model has a grid of shifts) and a
    refit at the shifts found. Raises PeakFitError when the frame cannot be fitted."""
    good = ok[m.pattern_rows]
    n_good = np.bincount(m.row_window[good], minlength=len(m.windows))
    for wi, spec in enumerate(m.windows):
        if n_good[wi] < len(spec.phases_present()) + 3:
            raise PeakFitError(f"window {spec.phase} [{spec.lo_deg}, {spec.hi_deg}] has {int(n_good[wi])} valid bins")
    yy = np.ascontiguousarray(y[m.pattern_rows][good])
    ss = np.ascontiguousarray(s[m.pattern_rows][good])
    idx = m.area_index
    search = m.eps_grid.shape[0] > 1
    eps = {"A": 0.0, "B": 0.0}
    design = np.ascontiguousarray(m.design[good])
    try:
        c, cv, chi2 = irls_linear_fit(design, yy, ss, n_reweight)
        if search and np.all(np.isfinite(c)):
            for p in ("A", "B"):
                var_p = cv[m.block[p, p]].sum()
                if var_p > 0 and c[idx[p]].sum() > position_min_snr * math.sqrt(var_p):
                    eps[p] = refine_shift(m, good, yy, ss, c, eps, p)
            if eps["A"] != 0.0 or eps["B"] != 0.0:
                design = np.ascontiguousarray(m.design_at(eps["A"], eps["B"])[good])
                c, cv, chi2 = irls_linear_fit(design, yy, ss, n_reweight)
    except FIT_ERRORS as exc:  # singular or non-finite normal equations, a zero variance
        raise PeakFitError(f"peak fit failed: {exc}") from exc
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(cv))):
        raise PeakFitError("non-finite peak fit")
    chi2_red = float(chi2 / max(design.shape[0] - design.shape[1], 1))
    peaks = []
    for (wi, p, j, t) in m.areas:
        spec = m.windows[wi]
        peaks.append({"phase": p, "center_deg": shifted_center_deg(m.centers[(wi, p)], eps[p]),
                      "lo_deg": spec.lo_deg, "hi_deg": spec.hi_deg, "area": float(c[j]),
                      "sigma_area": float(math.sqrt(max(cv[j, j], 0.0))), "fwhm_deg": float(m.fwhm[(wi, p)]),
                      "chi2_reduced": chi2_red})
    ia, ib = idx["A"], idx["B"]
    sums = {"A": float(c[ia].sum()), "B": float(c[ib].sum())}
    cov = np.array([[cv[m.block["A", "A"]].sum(), cv[m.block["A", "B"]].sum()],
                    [cv[m.block["B", "A"]].sum(), cv[m.block["B", "B"]].sum()]])
    return PeakFit(sums, cov, dict(m.total_t), peaks, eps)

