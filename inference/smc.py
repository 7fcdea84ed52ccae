"""Online Bayesian inference of the kinetic models by IBIS (Chopin 2002).

One sequential Monte Carlo sampler per kinetic model; every sampler assimilates every
frame:

1. incremental log likelihood l_i = log p(y_new | theta_i) of each particle;
2. adaptive tempering: when the full frame would drop the effective sample size (ESS)
   below ``temper_threshold * N`` (default: ``ess_threshold``), the frame enters as
   p(y_new | theta)^delta in steps whose exponent increment delta is chosen by bisection
   so that the ESS stays >= ``ess_threshold * N``; each step adds
   log sum_i W_i exp(delta l_i) to the model's log evidence (W: normalised weights);
3. whenever a step stops short of exponent 1, and after the frame when the ESS is
   below the threshold, the particles are resampled (systematic) and rejuvenated by
   Metropolis-Hastings moves that leave the current (tempered) posterior invariant:
   a mixture of a random walk with the particle covariance (scaled 2.38/sqrt(d),
   adapted) and an independent Gaussian fitted to the particles, repeated until 95 % of
   the particles have moved (at least 3 sweeps) and the mean squared Mahalanobis jump
   from the start of the move reaches 2 d (that of independent posterior draws), at
   most 30 sweeps.  Models whose probability is below ``light_probability`` (default
   1e-6) before the frame get a single sweep per rejuvenation: their evidence stays
   unbiased but noisier, which cannot matter for model probabilities below 1e-6.

Particles live in the sampling coordinates of ``priors.py``: (t0 [s], log k, log s, A,
n).  The priors are uniform in these coordinates, so the MH ratio is the likelihood
ratio (times the proposal ratio for independent proposals) inside the prior box.

Model probabilities: softmax over models of log evidence (uniform prior over the
models).  Onset probability: sum over models of P(model) * sum_i W_i [t0_i <= now].

Random numbers: one numpy Generator per model, seeded from (seed, model index); all
random numbers are drawn in NumPy and passed to the Numba kernels, which are
deterministic per particle, so a given seed reproduces the result exactly, with or
without ``parallel=True`` (prange over particles; only worth it on cores that are not
shared with other busy processes).  The parallel kernels must be called from one Python
thread at a time (Numba workqueue layer); ``OnlineInference`` is not thread-safe.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

import numpy as np

from . import likelihood as lk
from .alert import OnsetAlert
from .models import MODEL_EXPONENT, MODEL_NAMES, model_code
from .payload import COL, ParticleView, PayloadBuilder, warm_up_kernels
from .priors import Priors
from .resample import systematic_indices

logger = logging.getLogger(__name__)

#: with ``light_probability`` > 0, models below that posterior probability get LIGHT_SWEEPS
#: sweeps per rejuvenation (their evidence stays unbiased, only its variance grows: measured
#: 0.37 nat error for a model 24 nat behind); default 1e-6, which halved the exact sampler's
#: time on a 300-frame series of 16 models (89 -> 44 s, bench_inference --speed 0)
LIGHT_SWEEPS = 1
#: a move also needs a mean squared Mahalanobis jump >= JUMP_TARGET * d from its start (0: off);
#: 2 d is the distance between two independent posterior draws. Measured (F1 + A2, paper data,
#: N = 4096, 8 seeds): evidence sd F1 0.07, A2 0.055 nat with 2.0; A2 0.17 nat without, at half the time
JUMP_TARGET = 2.0


# --------------------------------------------------------------------------- frame store

class FrameHistory:
    """Frames assimilated so far, in time order, with prefix sums of y and y^2."""

    def __init__(self, capacity: int = 256):
        self.m = 0
        self._alloc(capacity)
        self.frame_indices: list[int] = []
        self._sig2_first: float | None = None
        self.homoscedastic = True

    def _alloc(self, capacity):
        old = getattr(self, "t_lo", None)
        self.capacity = capacity
        new = {name: np.zeros(capacity) for name in ("t_lo", "t_hi", "t_mid", "y", "sig2")}
        new["cy"] = np.zeros(capacity + 1)
        new["cy2"] = np.zeros(capacity + 1)
        if old is not None:
            for name in new:
                arr = getattr(self, name)
                new[name][: arr.shape[0]] = arr
        for name, arr in new.items():
            setattr(self, name, arr)

    @property
    def homo_var(self) -> float:
        """The common sigma_j^2 of all frames, or -1 when it differs between frames."""
        if self.m == 0 or not self.homoscedastic:
            return -1.0
        return float(self._sig2_first)

    def append(self, frame_index: int, time_s: float, exposure_s: float, alpha: float, sigma: float | None) -> int:
        """Validate and store one frame; returns its position."""
        for label, value in (("time_s", time_s), ("exposure_s", exposure_s), ("alpha", alpha)):
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
                raise ValueError(f"frame {frame_index}: {label} must be a finite number, got {value!r}")
        if exposure_s < 0:
            raise ValueError(f"frame {frame_index}: exposure_s must be >= 0, got {exposure_s}")
        if sigma is None:
            sig2 = 0.0
        else:
            if not math.isfinite(sigma) or sigma < 0:
                raise ValueError(f"frame {frame_index}: sigma must be a finite number >= 0 or None, got {sigma!r}")
            sig2 = float(sigma) ** 2
        lo = float(time_s) - 0.5 * float(exposure_s)
        hi = float(time_s) + 0.5 * float(exposure_s)
        if self.m > 0:
            if frame_index in self._index_set:
                raise ValueError(f"frame {frame_index} was already assimilated")
            if lo < self.t_lo[self.m - 1] or hi < self.t_hi[self.m - 1]:
                raise ValueError(
                    f"frame {frame_index}: exposure window [{lo}, {hi}] s starts or ends before that of "
                    f"frame {self.frame_indices[-1]} ([{self.t_lo[self.m - 1]}, {self.t_hi[self.m - 1]}] s); "
                    "frames must arrive in time order")
        else:
            self._index_set = set()
        if self.m == self.capacity:
            self._alloc(2 * self.capacity)
        j = self.m
        self.t_lo[j], self.t_hi[j], self.t_mid[j] = lo, hi, float(time_s)
        self.y[j], self.sig2[j] = float(alpha), sig2
        self.cy[j + 1] = self.cy[j] + float(alpha)
        self.cy2[j + 1] = self.cy2[j] + float(alpha) ** 2
        if self._sig2_first is None:
            self._sig2_first = sig2
        elif sig2 != self._sig2_first:
            self.homoscedastic = False
        self.frame_indices.append(int(frame_index))
        self._index_set.add(int(frame_index))
        self.m += 1
        return j


# --------------------------------------------------------------------------- helpers

def _log_ess(logw: np.ndarray) -> float:
    """log ESS of unnormalised log weights."""
    mx = np.max(logw)
    if not np.isfinite(mx):
        return -math.inf
    w = np.exp(logw - mx)
    return 2.0 * math.log(w.sum()) - math.log(np.dot(w, w))


def _logsumexp(a: np.ndarray) -> float:
    mx = np.max(a)
    if not np.isfinite(mx):
        return mx
    return float(mx + math.log(np.exp(a - mx).sum()))


# --------------------------------------------------------------------------- one model

class ModelSampler:
    """IBIS sampler of one kinetic model."""

    def __init__(self, name: str, priors: Priors, n_particles: int, rng: np.random.Generator,
                 history: FrameHistory, noise_kind: int, student_nu: float, ess_threshold: float,
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
        self.independent_fraction = independent_fraction

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
        self.rw_scale = 1.0
        self.rejuvenations = 0
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

    def _history_loglik(self, params: np.ndarray, m_hist: int, pending: int, lam: float) -> np.ndarray:
        h = self.history
        out = np.empty(params.shape[0])
        self._kernels[1](self.code, params, int(m_hist), int(pending), float(lam), h.t_lo, h.t_hi, h.y,
                          h.sig2, h.cy, h.cy2, h.homo_var, self.noise_kind, self.nu, out)
        return out

    # ------------------------------------------------------------------ IBIS step
    @property
    def weights(self) -> np.ndarray:
        return self.view().weights

    def ess(self) -> float:
        return math.exp(_log_ess(self.logw))

    def _choose_delta(self, l: np.ndarray, remaining: float) -> float:
        """Exponent increment: all of ``remaining`` unless that drops the ESS below
        ``temper_threshold * N``; then the largest increment keeping ESS >= ess_threshold * N
        (bisection)."""
        if _log_ess(self.logw + remaining * l) >= math.log(self.temper_threshold * self.n):
            return remaining
        log_target = math.log(self.ess_threshold * self.n)
        lo, hi = 0.0, remaining
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if _log_ess(self.logw + mid * l) >= log_target:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-6 * remaining:
                break
        return max(lo, 1e-12)

    def assimilate(self, j: int) -> None:
        """Bring the posterior from frames [0, j) to frames [0, j] (j: position in history)."""
        l = self._frame_loglik(j)
        l = np.where(np.isnan(l), -np.inf, l)
        lam = 0.0
        steps = 0
        while lam < 1.0:
            remaining = 1.0 - lam
            delta = self._choose_delta(l, remaining) if steps < 200 else remaining
            step = np.where(np.isfinite(l), delta * l, -np.inf)
            inc = _logsumexp(self.logw + step)
            if not np.isfinite(inc):
                raise FloatingPointError(f"model {self.name}: all particles have zero likelihood at frame {j}")
            self.log_evidence += inc
            self.logw = self.logw + step - inc
            self.cur_ll = self.cur_ll + step
            lam = 1.0 if delta >= remaining else lam + delta
            steps += 1
            if lam < 1.0:
                self._resample_move(m_hist=j, pending=j, lam=lam)
                l = self._frame_loglik(j)  # the particles changed
                l = np.where(np.isnan(l), -np.inf, l)
        self.tempering_steps = steps
        if self.ess() < self.ess_threshold * self.n:
            self._resample_move(m_hist=j + 1, pending=-1, lam=0.0)

    # ------------------------------------------------------------------ rejuvenation
    def _resample_move(self, m_hist: int, pending: int, lam: float) -> None:
        idx = systematic_indices(self.weights, self.n, float(self.rng.random()))
        self.theta = np.ascontiguousarray(self.theta[idx])
        self.cur_ll = self.cur_ll[idx]
        self.logw = np.full(self.n, -math.log(self.n))
        self.rejuvenations += 1
        self._version += 1  # a new theta array: views of the old one stay valid
        if self.free:
            self._move(m_hist, pending, lam)

    def _move(self, m_hist: int, pending: int, lam: float) -> None:
        d = len(self.free)
        cols = self.free_cols
        x = self.theta[:, cols]
        mean = x.mean(axis=0)
        cov = np.atleast_2d(np.cov(x, rowvar=False))
        jitter = np.diag((1e-7 * (self.hi - self.lo)) ** 2)
        cov = cov + jitter
        try:
            chol = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            cov = np.diag(np.diag(cov)) + jitter
            chol = np.linalg.cholesky(cov)
        chol_inv = np.linalg.inv(chol)
        moved = np.zeros(self.n, dtype=bool)
        accept = np.zeros(self.n, dtype=np.bool_)
        start = self.theta[:, cols].copy()
        tried = accepted = 0
        p_independent = self.independent_fraction
        h = self.history
        for sweep in range(self.max_sweeps):
            rw_step = 2.38 / math.sqrt(d) * self.rw_scale
            z = self.rng.standard_normal((self.n, d))
            use_ind = self.rng.random(self.n) < p_independent
            log_u = np.log(self.rng.random(self.n))
            self._kernels[2](self.code, self.theta, self.cur_ll, cols, self.lo, self.hi, mean, chol, chol_inv,
                             rw_step, z, use_ind, log_u, int(m_hist), int(pending), float(lam), h.t_lo, h.t_hi,
                             h.y, h.sig2, h.cy, h.cy2, h.homo_var, self.noise_kind, self.nu, accept)
            moved |= accept
            tried += self.n
            n_acc = int(accept.sum())
            accepted += n_acc
            n_ind = int(use_ind.sum())
            acc_ind = int((accept & use_ind).sum())
            # adapt between sweeps from the population's acceptance: random-walk scale towards
            # 15-45 % acceptance; fewer independent proposals when the Gaussian fit is poor
            rate_rw = (n_acc - acc_ind) / max(1, self.n - n_ind)
            if rate_rw < 0.15:
                self.rw_scale = max(0.02, self.rw_scale * 0.7)
            elif rate_rw > 0.45:
                self.rw_scale = min(3.0, self.rw_scale * 1.3)
            p_independent = self.independent_fraction if acc_ind >= 0.1 * max(1, n_ind) else 0.1
            if self.light and sweep + 1 >= LIGHT_SWEEPS:
                break
            if sweep + 1 >= self.min_sweeps and moved.mean() >= self.move_fraction:
                if self.jump_target <= 0.0:
                    break
                # mean squared Mahalanobis jump from the start of the move; two independent
                # posterior draws are 2 d apart on average
                jump = (self.theta[:, cols] - start) @ chol_inv.T
                if float(np.mean(np.sum(jump * jump, axis=1))) >= self.jump_target * d:
                    break
        self.acceptance_rate = accepted / tried

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
                                            "tempering_steps": self.tempering_steps})


# --------------------------------------------------------------------------- engine

class OnlineInference:
    """Frame-by-frame Bayesian model comparison and parameter estimation (IBIS per model).

    Times are seconds from series start, k in 1/s.  ``priors.t0`` must hold the series
    window (see ``Priors.for_series``).  ``update`` accepts frames in time order with any
    (increasing or not, but unique) frame indices.

    The moves cost up to seconds per frame near the onset; ``inference.live`` runs this
    class in a thread of its own and publishes an immediate estimate per frame meanwhile.
    ``temper_threshold`` < ``ess_threshold`` lets frames that keep the ESS above
    ``temper_threshold * N`` enter whole (measured cost of 0.2: evidence of a misspecified
    model, A2 on F1 data, 0.45 nat off at N = 4096; default: ``ess_threshold``).
    """

    def __init__(self, models: Iterable[str] = MODEL_NAMES, priors: Priors | None = None,
                 n_particles: int = 4096, seed: int = 0, noise: str = "normal", student_nu: float = 4.0,
                 ess_threshold: float = 0.5, alert_threshold: float = 0.99, alert_consecutive: int = 2,
                 gas_time_s: float | None = None, histogram_bins: int = 60, predictive_points: int = 100,
                 predictive_draws: int = 200, series_id: str | None = None, parallel: bool = False,
                 light_probability: float = 1e-6,
                 temper_threshold: float | None = None):
        models = tuple(models)
        if not models:
            raise ValueError("at least one kinetic model is needed")
        for name in models:
            model_code(name)
        if len(set(models)) != len(models):
            raise ValueError(f"duplicate models in {models}")
        if priors is None:
            raise ValueError("priors are required: the t0 window is the series window, e.g. "
                             "Priors.for_series(t_end_s, gas_time_s)")
        t0_lo, t0_hi = priors.require_t0()
        if noise not in ("normal", "student"):
            raise ValueError(f"noise must be 'normal' or 'student', got {noise!r}")
        if noise == "student" and not student_nu > 0:
            raise ValueError(f"student_nu must be > 0, got {student_nu}")
        if not 0.0 < ess_threshold < 1.0:
            raise ValueError(f"ess_threshold must be in (0, 1), got {ess_threshold}")
        if int(n_particles) < 16:
            raise ValueError(f"n_particles must be >= 16, got {n_particles}")
        self.models = models
        self.priors = priors
        self.n_particles = int(n_particles)
        self.seed = int(seed)
        self.noise = noise
        self.student_nu = float(student_nu)
        self.gas_time_s = None if gas_time_s is None else float(gas_time_s)
        self.series_id = series_id
        self.parallel = bool(parallel)
        if not 0.0 <= light_probability < 1.0:
            raise ValueError(f"light_probability must be in [0, 1), got {light_probability}")
        self.light_probability = float(light_probability)
        self.history = FrameHistory()
        #: the likelihood kernels' noise code
        self.noise_kind = kind = lk.NOISE_NORMAL if noise == "normal" else lk.NOISE_STUDENT
        seeds = np.random.SeedSequence(self.seed).spawn(len(MODEL_NAMES))
        self.samplers = {
            name: ModelSampler(name, priors, self.n_particles,
                               np.random.Generator(np.random.PCG64(seeds[model_code(name)])),
                               self.history, kind, self.student_nu, ess_threshold, parallel=parallel,
                               temper_threshold=ess_threshold if temper_threshold is None else temper_threshold)
            for name in models
        }
        self.alert = OnsetAlert(alert_threshold, alert_consecutive)
        if "k" in priors.fixed:
            k_lo, k_hi = 0.5 * priors.fixed["k"], 2.0 * priors.fixed["k"]
        else:
            k_lo, k_hi = priors.k
        #: payload settings: fixed histogram grids (t0 in s, k in 1/s, log-spaced) and the
        #: predictive band's times and draws
        self.payload_settings = dict(models=models, t0_edges=np.linspace(t0_lo, t0_hi, histogram_bins + 1),
                                     k_edges=np.geomspace(k_lo, k_hi, histogram_bins + 1),
                                     predictive_times=np.linspace(t0_lo, t0_hi, predictive_points),
                                     predictive_draws=int(predictive_draws))
        self.payload_builder = PayloadBuilder(**self.payload_settings)
        self.last_time_s: float | None = None
        self.last_frame_index: int | None = None
        self.last_readout_s: float | None = None  # end of the latest frame's exposure (s)

    # ------------------------------------------------------------------ public API
    def warm_up(self) -> None:
        """Compile (or load from the Numba cache) every kernel used by ``update``."""
        h = FrameHistory(4)
        for t in (0.0, 1.0, 2.0):
            h.append(int(t), t, 0.1, 0.0, 0.01)
        params = np.ascontiguousarray(np.tile([0.5, 0.0, math.log(0.02), 1.0, 2.0], (4, 1)))
        out = np.empty(4)
        curves = np.empty((4, 3))
        frame_k, history_k = ((lk.frame_loglik_parallel, lk.history_loglik_parallel) if self.parallel
                              else (lk.frame_loglik, lk.history_loglik))
        for kind in (lk.NOISE_NORMAL, lk.NOISE_STUDENT):
            frame_k(0, params, h.t_lo[0], h.t_hi[0], h.y[0], h.sig2[0], kind, 4.0, out)
            history_k(0, params, 2, 2, 0.5, h.t_lo, h.t_hi, h.y, h.sig2, h.cy, h.cy2, h.homo_var,
                      kind, 4.0, out)
        lk.alpha_curves(0, params, h.t_mid[:3].copy(), curves)
        lk.reweight_frames(0, params, 0, 2, h.t_lo, h.t_hi, h.y, h.sig2, lk.NOISE_NORMAL, 4.0, np.zeros(4),
                           np.full(4, -math.log(4)), np.empty(4))
        warm_up_kernels()
        sweep = lk.mh_sweep_parallel if self.parallel else lk.mh_sweep
        cols = np.array([0, 1, 2], dtype=np.int64)
        eye = np.eye(3)
        sweep(0, params, out, cols, np.full(3, -10.0), np.full(3, 10.0), np.zeros(3), eye, eye, 0.1,
              np.zeros((4, 3)), np.zeros(4, dtype=np.bool_), np.full(4, -1.0), 2, 2, 0.5, h.t_lo, h.t_hi,
              h.y, h.sig2, h.cy, h.cy2, h.homo_var, lk.NOISE_NORMAL, 4.0, np.zeros(4, dtype=np.bool_))

    @property
    def n_frames(self) -> int:
        return self.history.m

    def views(self) -> dict[str, ParticleView]:
        """The weighted particles of every model now (no copies)."""
        return {name: sampler.view() for name, sampler in self.samplers.items()}

    def model_probabilities(self) -> dict[str, float]:
        return PayloadBuilder.probabilities({m: self.samplers[m] for m in self.models})

    def update(self, frame_index: int, time_s: float, exposure_s: float, alpha: float,
               sigma: float | None) -> dict:
        """Assimilate one frame (mid-exposure time and exposure in s); returns the posterior payload."""
        alert = self.assimilate(frame_index, time_s, exposure_s, alpha, sigma)
        payload = self.payload_builder.build(self.views(), int(frame_index), float(time_s), self.last_readout_s,
                                             self.n_frames, alert)
        logger.debug("frame assimilated", extra={"series_id": self.series_id, "frame_index": int(frame_index),
                                                 "leading_model": payload["leading_model"],
                                                 "onset_probability": payload["onset_probability"]})
        return payload

    def assimilate(self, frame_index: int, time_s: float, exposure_s: float, alpha: float,
                   sigma: float | None) -> dict | None:
        """``update`` without building the payload (offline analysis); returns the alert or None.

        The posterior, evidence and alert state are exactly those of ``update``.
        """
        j = self.history.append(frame_index, time_s, exposure_s, alpha, sigma)
        before = self.model_probabilities()
        for name, sampler in self.samplers.items():
            sampler.light = before[name] < self.light_probability
            sampler.assimilate(j)
        self.last_time_s = float(time_s)
        self.last_frame_index = int(frame_index)
        # "now" for the onset is the end of this frame's exposure (when it was read out): a frame
        # whose window holds the onset says t0 <= its end, not t0 <= its middle
        self.last_readout_s = float(time_s) + 0.5 * float(exposure_s)
        probs = self.model_probabilities()
        onset = self.onset_probability(self.last_readout_s, probs)
        if not self.alert.observe(int(frame_index), float(time_s), onset):
            return None
        alert = self.payload_builder.alert(self.views(), probs, int(frame_index), float(time_s), onset,
                                           self.gas_time_s)
        self.alert.content = alert
        logger.debug("onset alert rule fired", extra={
            "series_id": self.series_id, "frame_index": int(frame_index), "t0_mean": alert["t0"]["mean"],
            "leading_model": alert["leading_model"]})
        return alert

    def onset_probability(self, time_s: float, probs: dict[str, float] | None = None) -> float:
        """Model-averaged posterior probability P(t0 <= time_s)."""
        return PayloadBuilder.onset_probability(self.views(), probs or self.model_probabilities(), time_s)

    def result(self) -> dict:
        """Final result (times in s from series start, k in 1/s)."""
        probs = self.model_probabilities()
        views = self.views()
        builder = self.payload_builder
        models = {}
        for name, view in views.items():
            models[name] = {"log_evidence": float(view.log_evidence), "probability": probs[name],
                            "params": builder.summaries(view), "diagnostics": {**view.diagnostics, "ess": view.ess}}
        return {
            "models": models,
            "leading_model": max(probs, key=probs.get),
            "model_averaged": builder.model_averaged(views, probs),
            "alert": self.alert.summary(),
            "priors": self.priors.to_dict(),
            "n_frames": self.n_frames,
            "settings": {"n_particles": self.n_particles, "seed": self.seed, "noise": self.noise,
                         "student_nu": self.student_nu if self.noise == "student" else None,
                         "gas_time_s": self.gas_time_s},
        }
