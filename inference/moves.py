"""MCMC rejuvenation of a particle set: the "move" of resample-move SMC (see docs/design.md).

The target of a move is the tempered posterior of IBIS,

    pi(theta)  proportional to  prior(theta) * p(y_0..y_{m-1} | theta) * p(y_m..y_{m_end-1} | theta)^lam

(``likelihood.history_loglik``).  The priors are uniform in the sampling coordinates, so a
Metropolis-Hastings step accepts a proposal inside the prior box with probability
min(1, likelihood ratio [* proposal ratio]); ``likelihood.mh_sweep`` does one such step for
every row of a particle array, with the random numbers drawn here (reproducible per seed).

Proposals (``GaussianFit`` of the weighted particle cloud, mean mu and covariance L L^T):
a random walk x' = x + s 2.38 / sqrt(d) L z, or an independent draw x' = mu + L z, the
random-walk scale s adapted towards 15-45 % acceptance and the independent draws used less
when the Gaussian fits the cloud poorly.

The move (``sweeps``): resample N and sweep every particle until 95 % have moved and the mean
squared Mahalanobis jump from the start reaches ``jump_target * d`` (3 to 30 sweeps), so that
the particles after a move are close to independent draws.  ``segment_variance`` gives the
Monte Carlo variance of an evidence increment over the particles' families.

Waste-free SMC (Dau & Chopin 2022: M = N / P resampled ancestors, P - 1 MH steps each, every
visited state kept) was tried here and rejected: one sweep's cost, but with P = 4 and P = 16
the log evidence of the paper-like F1 series scattered with sd 0.5 nat over 6 seeds (0.075
with ``sweeps``), and D3's on an R3 series was 3.5 to 7.5 nat too low: chains of a few
random-walk steps do not decorrelate the particles of these sharply peaked posteriors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from .resample import systematic_indices

#: random-walk acceptance band the scale is adapted into
RW_ACCEPTANCE = (0.15, 0.45)


@dataclasses.dataclass(frozen=True)
class GaussianFit:
    """Weighted mean and Cholesky factor of the covariance of particles (free coordinates)."""

    mean: np.ndarray
    chol: np.ndarray
    chol_inv: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray, box_width: np.ndarray) -> "GaussianFit":
        """Fit to equally weighted rows ``x`` (sample covariance); a jitter of 1e-7 of the prior
        box width keeps it positive definite (diagonal only if the full one is not)."""
        mean = x.mean(axis=0)
        jitter = np.diag((1e-7 * box_width) ** 2)
        cov = np.atleast_2d(np.cov(x, rowvar=False)) + jitter
        try:
            chol = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            chol = np.linalg.cholesky(np.diag(np.diag(cov)) + jitter)
        return cls(mean, chol, np.linalg.inv(chol))


@dataclasses.dataclass
class AdaptiveProposal:
    """Random-walk scale and share of independent proposals, adapted between MH steps."""

    rw_scale: float = 1.0
    independent_fraction: float = 0.5
    p_independent: float = 0.5

    def adapt(self, accepted: np.ndarray, use_ind: np.ndarray) -> None:
        n_ind = int(use_ind.sum())
        acc_ind = int((accepted & use_ind).sum())
        rate_rw = (int(accepted.sum()) - acc_ind) / max(1, accepted.size - n_ind)
        if rate_rw < RW_ACCEPTANCE[0]:
            self.rw_scale = max(0.02, self.rw_scale * 0.7)
        elif rate_rw > RW_ACCEPTANCE[1]:
            self.rw_scale = min(3.0, self.rw_scale * 1.3)
        self.p_independent = self.independent_fraction if acc_ind >= 0.1 * max(1, n_ind) else 0.1


#: one MH step for every row: step(theta, cur_ll, fit, rw_step, z, use_ind, log_u, accepted), in place
StepKernel = Callable[..., None]


def mh_step(step: StepKernel, theta: np.ndarray, cur_ll: np.ndarray, fit: GaussianFit, d: int,
            proposal: AdaptiveProposal, rng: np.random.Generator) -> np.ndarray:
    """One MH step of every row of ``theta`` (in place); returns which rows moved."""
    n = theta.shape[0]
    z = rng.standard_normal((n, d))
    use_ind = rng.random(n) < proposal.p_independent
    log_u = np.log(rng.random(n))
    accepted = np.zeros(n, dtype=np.bool_)
    step(theta, cur_ll, fit, 2.38 / math.sqrt(d) * proposal.rw_scale, z, use_ind, log_u, accepted)
    proposal.adapt(accepted, use_ind)
    return accepted


@dataclasses.dataclass(frozen=True)
class Moved:
    """A rejuvenated particle set (uniform weights) and what the move did."""

    theta: np.ndarray
    cur_ll: np.ndarray
    #: the resampled ancestor of each particle (its family: particles that began the move as
    #: copies of one particle may stay correlated)
    family: np.ndarray
    acceptance_rate: float
    steps: int


def sweeps(theta: np.ndarray, cur_ll: np.ndarray, weights: np.ndarray, cols: np.ndarray, box_width: np.ndarray,
           step: StepKernel, proposal: AdaptiveProposal, rng: np.random.Generator, min_sweeps: int = 3,
           max_sweeps: int = 30, move_fraction: float = 0.95, jump_target: float = 2.0) -> Moved:
    """Resample N (systematic) and sweep until ``move_fraction`` of the particles have moved
    (at least ``min_sweeps``) and the mean squared Mahalanobis jump from the start reaches
    ``jump_target * d`` (2 d: the distance of two independent posterior draws), at most
    ``max_sweeps``; ``max_sweeps = 1`` is a single sweep."""
    n, d = theta.shape[0], cols.size
    proposal.p_independent = proposal.independent_fraction
    idx = systematic_indices(weights, n, float(rng.random()))
    theta = np.ascontiguousarray(theta[idx])
    cur_ll = cur_ll[idx].copy()
    fit = GaussianFit.of(theta[:, cols], box_width)
    start = theta[:, cols].copy()
    moved = np.zeros(n, dtype=bool)
    accepted = 0
    done = 0
    for done in range(1, max_sweeps + 1):
        accept = mh_step(step, theta, cur_ll, fit, d, proposal, rng)
        moved |= accept
        accepted += int(accept.sum())
        if done >= min(min_sweeps, max_sweeps) and moved.mean() >= move_fraction:
            if jump_target <= 0.0:
                break
            jump = (theta[:, cols] - start) @ fit.chol_inv.T
            if float(np.mean(np.sum(jump * jump, axis=1))) >= jump_target * d:
                break
    return Moved(theta, cur_ll, idx, accepted / (n * done), done)


def segment_variance(weights: np.ndarray, family: np.ndarray | None) -> float:
    """Relative Monte Carlo variance of the importance-sampling evidence estimate
    sum_i W0_i w_i of particles that began the segment with uniform weights W0 = 1/N, grouped in
    M families c of possibly correlated particles (the copies of one resampled ancestor after
    the move; every particle its own family when ``family`` is None, e.g. prior draws):

        Var / Z^2  ~=  M / (M - 1) * sum_c (S_c - e_c)^2

    with S_c the family's share of the normalised weights W now and e_c = n_c / N its share at
    the start: the between-family variance of the family means (for independent particles the
    delta method's N / (N - 1) (1/ESS - 1/N))."""
    n = weights.size
    if family is None:
        shares, expected, m = weights, 1.0 / n, n
    else:
        counts = np.bincount(family)
        present = counts > 0
        shares = np.bincount(family, weights=weights)[present]
        expected, m = counts[present] / n, int(present.sum())
    if m < 2:
        return 0.0
    return m / (m - 1) * float(np.sum((shares - expected) ** 2))
