"""One population of weighted particles of one kinetic model, moved by IBIS (Chopin 2002).

A population assimilates frames (one or a batch) by adaptively tempered reweighting: the
incremental log likelihood l_i of the new frames enters as exponent steps delta, each the
whole remainder unless that drops the ESS below ``temper_threshold * N``, else the largest
keeping it >= ``ess_threshold * N`` (bisection); each step adds log sum_i W_i exp(delta l_i)
to the log evidence.  A step that stops short of exponent 1, and a frame that leaves the ESS
below the threshold, are followed by a resample-move (inference.moves) that leaves the
current tempered posterior invariant.  Particle rows are (t0 [s], log k, log s, A, n) in the
sampling coordinates of inference.priors (uniform priors there).

Monte Carlo error of the log evidence: between two resamplings the particles are reweighted
by the incremental likelihoods of every step, which together form one importance-sampling
estimate of that segment's evidence increment, sum_i W0_i prod_steps w_i (W0 = 1/N after a
resampling).  Its relative variance is estimated between the *families* of particles that
descend from one resampled ancestor (``moves.segment_variance``), which stays valid when the
move leaves a family correlated; the segments' variances add up.  This ignores the
correlation that resampling carries from one segment into the next, so it understates the
error where a series has many resamplings in a row (see docs/benchmarks.md for the measured
ratio to the spread over seeds).
"""

from __future__ import annotations

import math

import numpy as np

from . import likelihood as lk
from . import moves
from .models import MODEL_EXPONENT, model_code
from .particles import log_ess, logsumexp, normalised_weights
from .payload import COL, ParticleView
from .priors import Priors
from .resample import systematic_indices

#: with ``light`` set (the model's probability is below ``light_probability``, default 1e-6), a
#: rejuvenation is LIGHT_SWEEPS sweeps: it halved the exact sampler's time on a 300-frame series of
#: 16 models, but such a model's log evidence comes out low (D3 on an R3 series, 35 nat behind:
#: 0.7 to 1.5 nat low over 3 of 4 seeds), which cannot change probabilities below 1e-6 but is why
#: no standard error is stated for it (``light_moves``)
LIGHT_SWEEPS = 1
#: a move also needs a mean squared Mahalanobis jump >= JUMP_TARGET * d from its start (0: off);
#: 2 d is the distance between two independent posterior draws. Measured (F1 + A2, paper data,
#: N = 4096, 8 seeds): evidence sd F1 0.07, A2 0.055 nat with 2.0; A2 0.17 nat without, at half the time
JUMP_TARGET = 2.0


class ModelSampler:
    """IBIS sampler of one kinetic model: its weighted particles, log evidence and the Monte
    Carlo variance of that log evidence."""

    def __init__(self, name: str, priors: Priors, n_particles: int, rng: np.random.Generator,
                 history, noise_kind: int, student_nu: float, ess_threshold: float,
                 move_fraction: float = 0.95, min_sweeps: int = 3, max_sweeps: int = 30,
                 independent_fraction: float = 0.5, parallel: bool = False, temper_threshold: float = 0.5):
        self.name = name
        self._kernels = ((lk.frame_loglik_parallel, lk.history_loglik_parallel, lk.mh_sweep_parallel) if parallel
                         else (lk.frame_loglik, lk.history_loglik, lk.mh_sweep))
        self.code = model_code(name)
        self.priors = priors
        self.n = int(n_particles)
        self.rng = rng
        self.history = history
        self.noise_kind = noise_kind
        self.nu = float(student_nu)
        self.ess_threshold = float(ess_threshold)
        self.temper_threshold = min(float(temper_threshold), self.ess_threshold)
        self.move_fraction = move_fraction
        self.jump_target = JUMP_TARGET
        self.min_sweeps = min_sweeps
        #: True while the model's posterior probability is negligible: rejuvenate with fewer sweeps
        self.light = False
        self.max_sweeps = max_sweeps
        #: resampled ancestor of each particle since the last move (None: independent prior draws)
        self.family: np.ndarray | None = None
        self.proposal = moves.AdaptiveProposal(independent_fraction=independent_fraction,
                                               p_independent=independent_fraction)

        used = ["t0", "k", "s", "A"] + (["n"] if name == "An" else [])
        self.reported = tuple(used)
        self.free = tuple(p for p in used if p not in priors.fixed)
        self.free_cols = np.array([COL[p] for p in self.free], dtype=np.int64)
        self.lo = np.array([priors.bounds(p)[0] for p in self.free])
        self.hi = np.array([priors.bounds(p)[1] for p in self.free])

        theta = np.empty((self.n, 5))
        theta[:, 4] = MODEL_EXPONENT.get(name, 1.0)
        for p, v in priors.fixed.items():
            if p in used:
                theta[:, COL[p]] = priors.sampling_value(p, v)
        if self.free:
            theta[:, self.free_cols] = priors.sample(self.free, self.n, rng)
        self.theta = np.ascontiguousarray(theta)
        self.logw = np.full(self.n, -math.log(self.n))
        self.cur_ll = np.zeros(self.n)
        self.log_evidence = 0.0
        #: Monte Carlo variance (nat^2) of the log evidence up to the last resampling
        self._var_done = 0.0
        self.rejuvenations = 0
        #: rejuvenations with single-sweep moves (``light``): the evidence is then biased low by
        #: an unknown amount, so no standard error is stated for it
        self.light_moves = 0
        self.tempering_steps = 0
        self.acceptance_rate: float | None = None
        #: incremented whenever ``theta`` is replaced (resampling); a ParticleView is keyed by it
        self._version = 0

    # ------------------------------------------------------------------ kernels
    def _frame_loglik(self, j: int) -> np.ndarray:
        h = self.history
        out = np.empty(self.n)
        self._kernels[0](self.code, self.theta, h.t_lo[j], h.t_hi[j], h.y[j], h.sig2[j],
                        self.noise_kind, self.nu, out)
        return out

    def _batch_loglik(self, first: int, last: int) -> np.ndarray:
        """sum_{j=first}^{last-1} log p(y_j | theta_i) per particle (NaN counts as -inf)."""
        total = self._frame_loglik(first)
        for j in range(first + 1, last):
            total += self._frame_loglik(j)
        return np.where(np.isnan(total), -np.inf, total)

    # ------------------------------------------------------------------ IBIS step
    @property
    def weights(self) -> np.ndarray:
        """Normalised weights W_i (``particles.normalised_weights``)."""
        return normalised_weights(self.logw)

    def ess(self) -> float:
        """Effective sample size exp(``particles.log_ess``) of the current weights (particles)."""
        return math.exp(log_ess(self.logw))

    def _choose_delta(self, l: np.ndarray, remaining: float) -> float:
        """Exponent increment: all of ``remaining`` unless that drops the ESS below
        ``temper_threshold * N``; then the largest increment keeping ESS >= ess_threshold * N
        (bisection)."""
        if log_ess(self.logw + remaining * l) >= math.log(self.temper_threshold * self.n):
            return remaining
        log_target = math.log(self.ess_threshold * self.n)
        lo, hi = 0.0, remaining
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if log_ess(self.logw + mid * l) >= log_target:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-6 * remaining:
                break
        return max(lo, 1e-12)

    def assimilate(self, first: int, last: int | None = None) -> None:
        """Bring the posterior from frames [0, first) to frames [0, last) (positions in the
        history; ``last`` defaults to first + 1), tempering the batch in adaptively."""
        last = first + 1 if last is None else int(last)
        if last <= first:
            raise ValueError(f"empty batch [{first}, {last})")
        l = self._batch_loglik(first, last)
        lam = 0.0
        steps = 0
        while lam < 1.0:
            remaining = 1.0 - lam
            delta = self._choose_delta(l, remaining) if steps < 200 else remaining
            step = np.where(np.isfinite(l), delta * l, -np.inf)
            inc = logsumexp(self.logw + step)
            if not np.isfinite(inc):
                raise FloatingPointError(
                    f"model {self.name}: all particles have zero likelihood at frames {first}..{last - 1}")
            self.log_evidence += inc
            self.logw = self.logw + step - inc
            self.cur_ll = self.cur_ll + step
            lam = 1.0 if delta >= remaining else lam + delta
            steps += 1
            if lam < 1.0:
                self._resample_move(m_hist=first, m_end=last, lam=lam)
                l = self._batch_loglik(first, last)  # the particles changed
        self.tempering_steps = steps
        if self.ess() < self.ess_threshold * self.n:
            self._resample_move(m_hist=last, m_end=last, lam=0.0)

    # ------------------------------------------------------------------ rejuvenation
    @property
    def log_evidence_var(self) -> float:
        """Monte Carlo variance of ``log_evidence`` (nat^2): the completed segments' and the
        current one's, which began with uniform weights (``moves.segment_variance``)."""
        return self._var_done + moves.segment_variance(self.weights, self.family)

    def _resample_move(self, m_hist: int, m_end: int, lam: float) -> None:
        """Resample and move with MH targeting the tempered posterior of frames [0, m_hist) and,
        to the power lam, frames [m_hist, m_end) (``moves.sweeps``)."""
        self._var_done = self.log_evidence_var
        weights = self.weights
        self.rejuvenations += 1
        self.light_moves += int(self.light)
        self._version += 1  # a new theta array: views of the old one stay valid
        if not self.free:
            idx = systematic_indices(weights, self.n, float(self.rng.random()))
            self.theta, self.cur_ll, self.family = np.ascontiguousarray(self.theta[idx]), self.cur_ll[idx], idx
        else:
            moved = moves.sweeps(self.theta, self.cur_ll, weights, self.free_cols, self.hi - self.lo,
                                 self._step_kernel(m_hist, m_end, lam), self.proposal, self.rng,
                                 min_sweeps=self.min_sweeps, max_sweeps=LIGHT_SWEEPS if self.light else self.max_sweeps,
                                 move_fraction=self.move_fraction, jump_target=self.jump_target)
            self.theta, self.cur_ll, self.family = moved.theta, moved.cur_ll, moved.family
            self.acceptance_rate = moved.acceptance_rate
        self.logw = np.full(self.n, -math.log(self.n))

    def _step_kernel(self, m_hist: int, m_end: int, lam: float):
        """One MH step of every row towards the tempered posterior (``likelihood.mh_sweep``)."""
        h, kernel = self.history, self._kernels[2]
        m_hist, m_end, lam = int(m_hist), int(m_end), float(lam)

        def step(theta, cur_ll, fit, rw_step, z, use_ind, log_u, accepted):
            kernel(self.code, theta, cur_ll, self.free_cols, self.lo, self.hi, fit.mean, fit.chol, fit.chol_inv,
                   rw_step, z, use_ind, log_u, m_hist, m_end, lam, h.t_lo, h.t_hi, h.y, h.sig2, h.cy, h.cy2,
                   h.homo_var, self.noise_kind, self.nu, accepted)
        return step

    # ------------------------------------------------------------------ summaries
    def values(self, param: str) -> np.ndarray:
        """Particle values of ``param`` in natural units (k in 1/s, t0 in s)."""
        return self.view().values(param)

    def view(self) -> ParticleView:
        """The current weighted particles (no copy: ``theta`` and ``logw`` are replaced, never
        written in place, once assimilation of a frame or a move has finished)."""
        return ParticleView(self.name, self.code, self.reported, self.theta, self.logw, float(self.log_evidence),
                            self._version, {"acceptance_rate": self.acceptance_rate,
                                            "rejuvenations": self.rejuvenations,
                                            "tempering_steps": self.tempering_steps,
                                            "light_moves": self.light_moves},
                            math.nan if self.light_moves else float(self.log_evidence_var))
