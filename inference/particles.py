"""Weighted particle sets: log-weight normalisation, normalised weights, ESS and log-sum-exp.

A particle set is N parameter rows with log weights l_i (natural log, unnormalised unless said
otherwise).  Everything the samplers need from the weights alone is here, so that no module
computes it by hand (see docs/design.md, section 5, "The sampler"):

* ``logsumexp(l)``          log sum_i exp(l_i), computed as m + log sum_i exp(l_i - m), m = max l
* ``log_mean_exp(l)``       log (1/N) sum_i exp(l_i), same shift
* ``normalised_weights(l)`` W_i = exp(l_i - m) / sum_j exp(l_j - m)   (sum_i W_i = 1)
* ``ess_of_weights(W)``     ESS = 1 / sum_i W_i^2 of normalised weights (particles, 1..N)
* ``effective_sample_size(l)``  the same from log weights
* ``log_ess(l)``            log ESS = 2 log sum_i w_i - log sum_i w_i^2, w_i = exp(l_i - m), from
                            unnormalised log weights without normalising them (tempering bisection)
* ``logsumexp_scalars(values)`` log-sum-exp of a short list of Python floats (model evidences)
* ``log_normalise(unnormalised, out)``  Numba kernel: c = logsumexp, out_i = l_i - c (in place
                            allowed); used inside the Numba reweighting kernel of inference.likelihood

The NumPy functions are those the samplers have always used (the same operations in the same
order), so moving them here changed no number; tests/test_inference_particles.py checks them
and the kernel against scipy.special.logsumexp on random inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numba
import numpy as np


def logsumexp(log_values: np.ndarray) -> float:
    """log sum_i exp(l_i) = m + log sum_i exp(l_i - m), m = max l (nat).  -inf when every l_i is
    -inf (m itself when m is not finite)."""
    top = np.max(log_values)
    if not np.isfinite(top):
        return top
    return float(top + math.log(np.exp(log_values - top).sum()))


def log_mean_exp(log_values: np.ndarray) -> float:
    """log (1/N) sum_i exp(l_i) = m + log mean_i exp(l_i - m), m = max l (nat); e.g. the midpoint
    rule over N equal cells of a log integrand."""
    top = float(np.max(log_values))
    return top + math.log(float(np.mean(np.exp(log_values - top))))


def logsumexp_scalars(log_values: Sequence[float]) -> float:
    """log sum_i exp(l_i) of a short sequence of Python floats (math.exp, summed in order):
    m + log sum_i exp(l_i - m), m = max l."""
    top = max(log_values)
    return top + math.log(sum(math.exp(v - top) for v in log_values))


def normalised_weights(log_weights: np.ndarray) -> np.ndarray:
    """Normalised weights W_i = exp(l_i - m) / sum_j exp(l_j - m), m = max l (sum 1)."""
    w = np.exp(log_weights - np.max(log_weights))
    return w / w.sum()


def ess_of_weights(weights: np.ndarray) -> float:
    """Effective sample size 1 / sum_i W_i^2 of normalised weights W (particles, 1..N)."""
    return float(1.0 / np.dot(weights, weights))


def effective_sample_size(log_weights: np.ndarray) -> float:
    """ESS = 1 / sum_i W_i^2 of the normalised weights of log weights l (particles)."""
    return ess_of_weights(normalised_weights(log_weights))


def log_ess(log_weights: np.ndarray) -> float:
    """log ESS of unnormalised log weights l: 2 log sum_i w_i - log sum_i w_i^2 with
    w_i = exp(l_i - m), m = max l; -inf when no weight is positive."""
    top = np.max(log_weights)
    if not np.isfinite(top):
        return -math.inf
    w = np.exp(log_weights - top)
    return 2.0 * math.log(w.sum()) - math.log(np.dot(w, w))


@numba.njit(cache=True, nogil=True)
def log_normalise(unnormalised, out):
    """Normalise log weights: returns c = log sum_i exp(l_i) (= m + log sum_i exp(l_i - m),
    m = max l, summed in index order) and writes out_i = l_i - c (``out`` may be
    ``unnormalised`` itself).  When every l_i is -inf, returns -inf and leaves ``out`` as it is."""
    n = unnormalised.shape[0]
    top = -math.inf
    for i in range(n):
        top = max(top, unnormalised[i])
    if top == -math.inf:
        return top
    total = 0.0
    for i in range(n):
        total += math.exp(unnormalised[i] - top)
    c = top + math.log(total)
    for i in range(n):
        out[i] = unnormalised[i] - c
    return c
