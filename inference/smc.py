"""Online Bayesian inference of the kinetic models by IBIS (Chopin 2002).

One sequential Monte Carlo sampler per kinetic model (``inference.population.ModelSampler``;
the algorithm, with its tempering, resample-move and evidence error, is described there and in
docs/design.md); every sampler assimilates every frame, one at a time or several together
(a *batch*: the frames that arrived while the sampler was busy, see inference.live).  Models
whose probability is below ``light_probability`` (default 1e-6) before a step get a single
sweep per rejuvenation; their evidence then comes out low by an unknown amount and carries no
stated error.

Because the tempering exponent is chosen from the ESS, a batch of b frames costs about as
many tempering steps as the information it carries, not b times a frame's.  The same seed
and the same batch schedule (``OnlineInference.schedule``: frames per step) give the same
result; ``beamkin analyze --schedule`` replays a live run's schedule.

Model probabilities: Bayes' rule over the kinetic models and the null model "no reaction"
(inference.null_model), prior probability ``null_prior`` for the null and the rest shared
equally by the kinetic models.  Onset probability: P(a kinetic model and t0 <= now | y) =
sum over kinetic models of P(model | y) * sum_i W_i [t0_i <= now].

Random numbers: one numpy Generator per model, seeded from (seed, model index); all
random numbers are drawn in NumPy and passed to the Numba kernels, which are
deterministic per particle, so a given seed reproduces the result exactly, with or
without ``parallel=True`` (prange over particles; only worth it on cores that are not
shared with other busy processes), and whether the models run one after the other or on
``threads`` threads (the models are independent until their evidences are combined, the
kernels release the GIL).  The parallel kernels must be called from one Python thread at a
time (Numba workqueue layer), so ``parallel`` and ``threads`` > 1 exclude each other;
``OnlineInference`` itself is not thread-safe.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import threading
from typing import Iterable, Sequence

import numpy as np

from . import likelihood as lk
from .alert import OnsetAlert
from .models import MODEL_NAMES, model_code
from .null_model import NullModel
from .payload import NullEvidence, ParticleView, PayloadBuilder, model_probabilities, warm_up_kernels
from .population import ModelSampler
from .priors import Priors
from .settings import default_settings

logger = logging.getLogger(__name__)



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

    def truncate(self, m: int) -> None:
        """Forget the frames from position m on (a batch that failed validation)."""
        while self.m > m:
            self.m -= 1
            self._index_set.discard(self.frame_indices.pop())
        self._sig2_first = float(self.sig2[0]) if self.m else None
        self.homoscedastic = bool(np.all(self.sig2[: self.m] == self.sig2[0])) if self.m else True

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

def _renice_thread(increment: int) -> None:
    """Make the calling thread ``increment`` nicer (Linux per-thread nice; elsewhere a no-op)."""
    if increment <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except (AttributeError, OSError) as exc:
        logger.debug("model thread keeps its priority: %s", exc)


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

    A setting left as None (models, n_particles, seed, noise, student_nu, ess_threshold,
    alert_*, histogram_bins, light_probability, null_prior) is that of ``[inference]`` in
    beamkin/defaults.toml (``settings.default_settings``); ``settings.InferenceSettings.
    engine_options`` gives them all from a configuration.
    """

    def __init__(self, models: Iterable[str] | None = None, priors: Priors | None = None,
                 n_particles: int | None = None, seed: int | None = None, noise: str | None = None,
                 student_nu: float | None = None, ess_threshold: float | None = None,
                 alert_threshold: float | None = None, alert_consecutive: int | None = None,
                 gas_time_s: float | None = None, histogram_bins: int | None = None, predictive_points: int = 100,
                 predictive_draws: int = 200, series_id: str | None = None, parallel: bool = False,
                 light_probability: float | None = None,
                 temper_threshold: float | None = None, null_prior: float | None = None, threads: int = 1):
        # an [inference] setting not given is beamkin/defaults.toml's (inference.settings)
        defaults = default_settings()
        models = tuple(defaults.models if models is None else models)
        n_particles = defaults.particles if n_particles is None else n_particles
        seed = defaults.seed if seed is None else seed
        noise = defaults.noise if noise is None else noise
        student_nu = defaults.student_nu if student_nu is None else student_nu
        ess_threshold = defaults.ess_threshold if ess_threshold is None else ess_threshold
        alert_threshold = defaults.alert_threshold if alert_threshold is None else alert_threshold
        alert_consecutive = defaults.alert_consecutive if alert_consecutive is None else alert_consecutive
        histogram_bins = defaults.histogram_bins if histogram_bins is None else histogram_bins
        light_probability = defaults.light_probability if light_probability is None else light_probability
        null_prior = defaults.null_prior if null_prior is None else null_prior
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
        if not 0.0 <= null_prior < 1.0:
            raise ValueError(f"null_prior (prior probability of 'no reaction') must be in [0, 1), got {null_prior}")
        self.null_prior = float(null_prior)
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if parallel and int(threads) > 1:
            raise ValueError("parallel kernels and model threads exclude each other (Numba's workqueue layer)")
        self.threads = int(threads)
        #: niceness added to the model threads (the live path keeps them behind its estimates)
        self.thread_niceness = 0
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
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
        #: "no reaction" (alpha = 0), competing by evidence when null_prior > 0
        self.null_model = NullModel(priors, kind, self.student_nu)
        #: frames per exact step so far (1, 1, ..., then larger batches when the live path lags)
        self.schedule: list[int] = []
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
        lk.null_frames_loglik(np.zeros(2), 0, 2, h.y, h.sig2, lk.NOISE_NORMAL, 4.0, np.zeros(2))
        lk.null_frames_loglik(np.zeros(2), 0, 2, h.y, h.sig2, lk.NOISE_STUDENT, 4.0, np.zeros(2))
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

    def null_evidence(self) -> NullEvidence | None:
        """The null model's part in the model comparison (None when null_prior is 0)."""
        if self.null_prior <= 0.0:
            return None
        return NullEvidence(self.null_model.log_evidence, self.null_prior)

    def model_probabilities(self) -> dict[str, float]:
        """P(model | y) of each kinetic model; they sum to P(reaction | y)."""
        return PayloadBuilder.probabilities({m: self.samplers[m] for m in self.models}, self.null_evidence())

    def reaction_probability(self) -> float:
        """P(reaction | y) = 1 - P(no reaction | y)."""
        return 1.0 - model_probabilities({m: s.log_evidence for m, s in self.samplers.items()},
                                         self.null_evidence())[1]

    def update(self, frame_index: int, time_s: float, exposure_s: float, alpha: float,
               sigma: float | None) -> dict:
        """Assimilate one frame (mid-exposure time and exposure in s); returns the posterior payload."""
        return self.update_batch([(frame_index, time_s, exposure_s, alpha, sigma)])

    def update_batch(self, frames: Sequence[tuple]) -> dict:
        """Assimilate frames (frame_index, time_s, exposure_s, alpha, sigma), in time order, in one
        tempered IBIS step; returns the posterior payload after the last of them, with ``batch``
        (their frame indices)."""
        alert = self.assimilate_batch(frames)
        frame_index, time_s = int(frames[-1][0]), float(frames[-1][1])
        payload = self.payload_builder.build(self.views(), frame_index, time_s, self.last_readout_s,
                                             self.n_frames, alert, self.model_probabilities(),
                                             null=self.null_evidence())
        payload["batch"] = [int(f[0]) for f in frames]
        logger.debug("frames assimilated", extra={"series_id": self.series_id, "frame_index": frame_index,
                                                  "batch": len(frames), "leading_model": payload["leading_model"],
                                                  "onset_probability": payload["onset_probability"]})
        return payload

    def assimilate(self, frame_index: int, time_s: float, exposure_s: float, alpha: float,
                   sigma: float | None) -> dict | None:
        """``update`` without building the payload (offline analysis); returns the alert or None.

        The posterior, evidence and alert state are exactly those of ``update``.
        """
        return self.assimilate_batch([(frame_index, time_s, exposure_s, alpha, sigma)])

    def assimilate_batch(self, frames: Sequence[tuple]) -> dict | None:
        """``update_batch`` without the payload; returns the alert or None.  The alert rule sees
        one onset probability per batch (that of its last frame)."""
        if not frames:
            raise ValueError("an empty batch of frames")
        first = self.history.m
        try:
            for frame_index, time_s, exposure_s, alpha, sigma in frames:
                self.history.append(frame_index, time_s, exposure_s, alpha, sigma)
        except ValueError:
            self.history.truncate(first)  # nothing of a rejected batch is kept
            raise
        last = self.history.m
        before = self.model_probabilities()
        for name, sampler in self.samplers.items():
            sampler.light = before[name] < self.light_probability
        self._run_models(lambda sampler: sampler.assimilate(first, last))
        self.null_model.advance(self.history, last)
        self.schedule.append(last - first)
        frame_index, time_s, exposure_s = int(frames[-1][0]), float(frames[-1][1]), float(frames[-1][2])
        self.last_time_s = time_s
        self.last_frame_index = frame_index
        # "now" for the onset is the end of this frame's exposure (when it was read out): a frame
        # whose window holds the onset says t0 <= its end, not t0 <= its middle
        self.last_readout_s = time_s + 0.5 * exposure_s
        probs = self.model_probabilities()
        onset = self.onset_probability(self.last_readout_s, probs)
        if not self.alert.observe(frame_index, time_s, onset):
            return None
        alert = self.payload_builder.alert(self.views(), probs, frame_index, time_s, onset, self.gas_time_s)
        self.alert.content = alert
        logger.debug("onset alert rule fired", extra={
            "series_id": self.series_id, "frame_index": frame_index, "t0_mean": alert["t0"]["mean"],
            "leading_model": alert["leading_model"]})
        return alert

    def _run_models(self, work) -> None:
        """``work(sampler)`` for every model: in turn, or on ``threads`` threads (each model owns
        its random numbers, so the result does not depend on the threads' timing)."""
        samplers = list(self.samplers.values())
        if self.threads == 1 or len(samplers) == 1:
            for sampler in samplers:
                work(sampler)
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                min(self.threads, len(samplers)), thread_name_prefix="model-sampler", initializer=_renice_thread,
                initargs=(self.thread_niceness,))
        # the costly models (full moves) first, so that the threads finish together
        samplers.sort(key=lambda sampler: sampler.light)
        for future in [self._pool.submit(work, sampler) for sampler in samplers]:
            future.result()

    def close(self) -> None:
        """Stop the model threads (if any)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

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
            models[name] = {"log_evidence": float(view.log_evidence), "log_evidence_se": view.log_evidence_se,
                            "probability": probs[name], "params": builder.summaries(view),
                            "diagnostics": {**view.diagnostics, "ess": view.ess}}
        null = self.null_evidence()
        reaction = self.reaction_probability()
        return {
            "models": models,
            "leading_model": max(probs, key=probs.get),
            "reaction_probability": reaction,
            "null_model": None if null is None else {"log_evidence": null.log_evidence, "log_evidence_se": 0.0,
                                                     "prior_probability": null.prior_probability,
                                                     "probability": 1.0 - reaction},
            "model_averaged": builder.model_averaged(views, probs, params=("t0",)),
            "schedule": list(self.schedule),
            "alert": self.alert.summary(),
            "priors": self.priors.to_dict(),
            "n_frames": self.n_frames,
            "settings": {"n_particles": self.n_particles, "seed": self.seed, "noise": self.noise,
                         "student_nu": self.student_nu if self.noise == "student" else None,
                         "gas_time_s": self.gas_time_s, "null_prior": self.null_prior},
        }
