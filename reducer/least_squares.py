"""Weighted least squares with Poisson variances: the kernels of the phase-fraction fits.

A pattern bin i holds y_i with one-sigma uncertainty sigma_i. For Poisson counts reduced by a
linear normalisation (pyFAI's mean corrected intensity, or raw counts with scale 1) the variance
is proportional to the expected value:

    var_i = g_i * mu_i,   g_i = sigma_i^2 / y_i

where g_i does not depend on the counts (:func:`variance_scale`). The fits first take mu_i from
the data, floored at half the median positive y (empty bins keep a finite weight), then
re-weight with mu_i = the model's prediction, floored at 1e-3 of its largest magnitude
(:func:`poisson_variance`, :func:`model_floor`): weights from the model remove the downward
bias that data-derived weights give at low counts (docs/design.md, section 3 "Reduction").

The kernels are small pure Numba functions (callable from Python as well); each is checked
against a plain NumPy / SciPy reference in tests/test_reducer_least_squares.py. A singular
system raises numpy.linalg.LinAlgError (Numba raises the LinAlgError of the failed inversion,
also for non-finite input); a zero variance raises ZeroDivisionError.
"""
from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "MODEL_FLOOR_REL",
    "FIT_ERRORS",
    "variance_scale",
    "poisson_variance",
    "model_floor",
    "weighted_linear_fit",
    "irls_linear_fit",
    "irls_nonnegative_fit",
]

#: the model's prediction used as a variance is floored at this fraction of its largest magnitude
MODEL_FLOOR_REL = 1e-3
#: what the kernels raise when a system cannot be solved (singular or non-finite normal
#: equations, a zero variance): the exceptions a caller turns into a flagged frame
FIT_ERRORS = (np.linalg.LinAlgError, ZeroDivisionError)


@numba.njit(cache=True)
def variance_scale(y: np.ndarray, sigma: np.ndarray):
    """Per-bin variance scale g and the floor of the data used as expected values.

    g_i = sigma_i^2 / y_i where y_i > 0 and sigma_i > 0, the median of those values elsewhere
    (1 when there is none); y_floor = half the median positive y (1 when there is none).
    Returns (g, y_floor)."""
    n = y.shape[0]
    g = np.empty(n)
    pos = (y > 0) & (sigma > 0)
    if pos.sum() > 0:
        g_median = np.median(sigma[pos] ** 2 / y[pos])
        y_floor = 0.5 * np.median(y[pos])
    else:
        g_median = 1.0
        y_floor = 1.0
    for i in range(n):
        g[i] = sigma[i] ** 2 / y[i] if pos[i] else g_median
    return g, y_floor


@numba.njit(cache=True)
def poisson_variance(g: np.ndarray, expected: np.ndarray, floor: float) -> np.ndarray:
    """var_i = g_i * max(expected_i, floor): Poisson variance of bins whose expected value is
    ``expected`` (data or model), in the units of the pattern squared."""
    var = np.empty(g.shape[0])
    for i in range(g.shape[0]):
        var[i] = g[i] * max(expected[i], floor)
    return var


@numba.njit(cache=True)
def model_floor(model: np.ndarray) -> float:
    """Floor of a model's prediction used as the expected value: MODEL_FLOOR_REL * max_i |model_i|."""
    return MODEL_FLOOR_REL * np.max(np.abs(model))


@numba.njit(cache=True)
def weighted_linear_fit(design: np.ndarray, y: np.ndarray, var: np.ndarray):
    """Weighted least squares: minimise sum_i (y_i - X_i c)^2 / var_i.

    Returns (c, cov, chi2) with cov = (X^T W X)^-1, W = diag(1/var). Raises on a singular system
    (numba raises the LinAlgError of the failed inversion)."""
    n, p = design.shape
    xtwx = np.zeros((p, p))
    xtwy = np.zeros(p)
    for i in range(n):
        w = 1.0 / var[i]
        for a in range(p):
            xa = design[i, a] * w
            xtwy[a] += xa * y[i]
            for b in range(a, p):
                xtwx[a, b] += xa * design[i, b]
    for a in range(p):
        for b in range(a):
            xtwx[a, b] = xtwx[b, a]
    cov = np.linalg.inv(xtwx)
    c = cov @ xtwy
    chi2 = 0.0
    for i in range(n):
        r = y[i]
        for a in range(p):
            r -= design[i, a] * c[a]
        chi2 += r * r / var[i]
    return c, cov, chi2


@numba.njit(cache=True)
def irls_linear_fit(design: np.ndarray, y: np.ndarray, sigma: np.ndarray, n_reweight: int):
    """Linear fit with Poisson variance predicted by the model (iteratively reweighted LS).

    First pass: var_i = g_i * max(y_i, y_floor) (:func:`variance_scale`); then n_reweight passes
    with var_i = g_i * max(model_i, :func:`model_floor`) (stopping early if the model is zero).
    Returns (c, cov, chi2) of the last pass."""
    g, y_floor = variance_scale(y, sigma)
    var = poisson_variance(g, y, y_floor)
    c, cov, chi2 = weighted_linear_fit(design, y, var)
    for _ in range(n_reweight):
        model = design @ c
        floor = model_floor(model)
        if floor <= 0:
            break
        var = poisson_variance(g, model, floor)
        c, cov, chi2 = weighted_linear_fit(design, y, var)
    return c, cov, chi2


def irls_nonnegative_fit(design: np.ndarray, y: np.ndarray, sigma: np.ndarray, n_reweight: int):
    """Non-negative least squares (scipy.optimize.nnls) of y on the columns of ``design`` with
    the Poisson variances of :func:`irls_linear_fit`: minimise sum_i (y_i - X_i c)^2 / var_i over
    c >= 0, first with var from the data, then n_reweight times with var from the model.
    Returns (c, var) with var the variances of the last fit (for its covariance)."""
    from scipy.optimize import nnls

    g, y_floor = variance_scale(y, sigma)
    var = poisson_variance(g, y, y_floor)
    for it in range(n_reweight + 1):
        w = 1.0 / np.sqrt(var)
        coef, _ = nnls(design * w[:, None], y * w, maxiter=50 * design.shape[1])
        if it < n_reweight:
            model = design @ coef
            var = poisson_variance(g, model, model_floor(model))
    return coef, var
