"""Live inference: an immediate posterior estimate per frame, the exact sampler behind it.

The exact IBIS sampler (``inference.smc.OnlineInference``) assimilates every frame in order
in a worker thread; its resample-moves and tempering near the onset cost up to seconds per
frame, so they run off the frame's critical path (docs/design.md, section 6).  Each frame gets at once
an *estimate*: the newest exact posterior, after frames [0, m), importance-reweighted by the
frames [m, j] it has not assimilated yet::

    w_i  proportional to  W_i * prod_{p=m}^{j} p(y_p | theta_i)
    log Z_j(model) = log Z_m(model) + log sum_i W_i prod_{p=m}^{j} p(y_p | theta_i)

(W_i: the exact posterior's normalised weights).  This is the IBIS reweighting step without
the move, a consistent estimate of the same posterior and evidence; its effective sample size
says how good it is (``diagnostics.ess`` per model) and ``frames_behind`` = j + 1 - m how
far the exact sampler lags.  Once the worker has assimilated frame j, the exact posterior
of frame j follows (``exact_payloads``): it, never the estimate, is what the final result,
the recording's ``posterior`` messages and ``beamkin analyze`` agree on to rounding.

The frames that arrived while the exact sampler was busy enter together, in one adaptively
tempered IBIS step (``OnlineInference.update_batch``), whose tempering follows the information
rather than the frame count (its moves still cost in proportion to the history, so it can lag
on long fast series); the exact posterior is published for the last frame of each batch
(``batch``: the frames it took in), and the batch sizes are the run's ``schedule``.

An estimate never passes for a posterior it is not: when the frames it adds are informative,
the reweighting degenerates.  A model whose estimate ESS falls below ``ess_floor * N`` is
*stale* (its probability is then at least ``STALE_RELEVANCE`` in the estimate or in the exact
posterior it came from; models ruled out in both do not count), and so is the estimate
(``stale``); the dashboard then shows the newest exact posterior instead.  The onset alert is
decided on posteriors that are not stale, so that it comes with the frame that shows the onset
rather than when the sampler's moves have caught up: on the estimates that are not stale, on
the exact posteriors of newer frames, and, for a stale estimate, on a lower bound of its onset
probability that does not rely on the collapsed weights (``onset_lower_bound``).

"No reaction" (inference.null_model) competes with the kinetic models in the estimates too:
its evidence is exact and cheap, so the estimate carries it up to the newest frame.

The Numba kernels release the GIL (``nogil=True``); the worker thread is the only caller of
the parallel kernels (if any), the estimate uses the serial ones.  Parallel kernels must not
run in two threads at once (Numba's workqueue layer aborts), so at most one LiveInference
per process may hold an engine built with ``parallel=True``; the inference stage builds
serial engines only.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import os
import queue
import threading
import time

import numpy as np

from . import likelihood as lk
from .alert import OnsetAlert
from .null_model import NullModel
from .particles import logsumexp_scalars
from .payload import NullEvidence, ParticleView, PayloadBuilder
from .settings import default_settings
from .smc import FrameHistory, OnlineInference

log = logging.getLogger(__name__)

_STOP = object()
_FLUSH = object()  # no more frames are coming: a scheduled step takes what it has
#: a new exact snapshot behind by at most this many frames is taken up on a frame's arrival;
#: one further behind only once ``prepare`` has summed its frames between arrivals
MAX_FRAMES_ON_CRITICAL_PATH = 2
#: frames of likelihood one ``prepare`` call sums per model (~5 ms for 16 x 4096 per frame)
PREPARE_FRAMES_PER_CALL = 1
#: threads sharing out the models of an estimate's reweighting (the critical path)
ESTIMATE_THREADS = 2
#: the exact sampler's thread runs this much nicer than the estimates (Linux per-thread nice)
WORKER_NICENESS = 10
#: a model below this probability both in the estimate and in its exact base cannot mislead:
#: its ESS does not make the estimate stale
STALE_RELEVANCE = 1e-6
#: the onset bound of a stale estimate holds with probability >= 1 - M * ALERT_BOUND_ALPHA
#: (``onset_lower_bound``): log Z of each kinetic model is lowered by log(1/alpha) = 6.9 nat
ALERT_BOUND_ALPHA = 1e-3


class _Snapshot:
    """The exact posterior after its first ``n_frames`` frames (views share no mutable state),
    with its model probabilities (null model included)."""

    __slots__ = ("n_frames", "views", "serial", "probabilities")

    def __init__(self, n_frames: int, views: dict[str, ParticleView], serial: int, probabilities: dict[str, float]):
        self.n_frames = n_frames
        self.views = views
        self.serial = serial
        self.probabilities = probabilities


class LiveInference:
    """Immediate estimates on the caller's thread, the exact sampler on a worker thread.

    ``submit`` validates a frame, queues it for the exact sampler and returns the estimate's
    payload; ``exact_payloads`` returns the exact payloads finished since the last call;
    ``caught_up`` is True when every submitted frame is assimilated; ``result`` (only when
    caught up) is the exact result with the alert that was raised live.  An exception in the
    worker is raised again by the next call of ``exact_payloads``, ``submit`` or ``result``.
    """

    def __init__(self, engine: OnlineInference, ess_floor: float | None = None, schedule=None):
        """``ess_floor``: ESS per model (fraction of N) below which an estimate is stale (None: the
        TOML's ``[inference] ess_floor``).  ``schedule``: frames per exact step to follow (a recorded
        run's, e.g. from a replay), which reproduces its exact posterior; None: the frames that
        arrived while the sampler was busy."""
        ess_floor = default_settings().ess_floor if ess_floor is None else ess_floor
        if not 0.0 <= ess_floor < 1.0:
            raise ValueError(f"ess_floor must be in [0, 1), got {ess_floor}")
        self._schedule = collections.deque(int(size) for size in (schedule or ()))
        if any(size < 1 for size in self._schedule):
            raise ValueError("a schedule lists positive numbers of frames per step")
        self.engine = engine
        engine.thread_niceness = WORKER_NICENESS
        self.ess_floor = float(ess_floor)
        self.history = FrameHistory()  # the caller's copy of the frames, validated on arrival
        self.null = NullModel(engine.priors, engine.noise_kind, engine.student_nu)  # up to the newest frame
        self.builder = PayloadBuilder(**engine.payload_settings, cache=engine.payload_builder.cache)
        self.alert = OnsetAlert(engine.alert.threshold, engine.alert.consecutive)
        self.counters = collections.Counter()  # estimates published, stale, exact steps
        self._alert_position = -1  # history position of the newest posterior the alert rule has seen
        self._snapshot = _Snapshot(0, engine.views(), 0, engine.model_probabilities())  # the worker's newest
        self._base = self._snapshot  # the one the latest estimate was reweighted from
        self.builder.warm(self._snapshot.views)
        # one payload from the prior particles, discarded: the first frame's estimate then finds
        # every code path of the payload run once (first calls cost several ms)
        self.builder.build(self._snapshot.views, -1, 0.0, 0.0, 0, None)
        self._candidate: _Snapshot | None = None  # a newer snapshot being prepared as the next base
        self._candidate_sums: dict[str, tuple[int, np.ndarray]] = {}
        # per model: (snapshot serial, frames [m, upto) summed) -> log likelihood of those frames
        self._pending: dict[str, tuple[int, int, np.ndarray]] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._finished: collections.deque = collections.deque()
        self._submitted = 0
        self._assimilated = 0
        self._error: BaseException | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(ESTIMATE_THREADS, thread_name_prefix="estimate")
        for future in [self._pool.submit(time.sleep, 0.001) for _ in range(ESTIMATE_THREADS)]:
            future.result()  # start the threads now, not on the first frame
        self._thread = threading.Thread(target=self._run, name=f"exact-sampler-{engine.series_id}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        engine = self.engine
        try:  # the estimates are the critical path: the exact sampler yields the CPU to them
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + WORKER_NICENESS)
        except (AttributeError, OSError) as exc:  # not Linux, or not allowed: run at equal priority
            log.debug("exact sampler thread keeps its priority: %s", exc)
        stopping = False
        while not stopping:
            item = self._inbox.get()
            if item is _STOP:
                break
            if item is _FLUSH:
                continue
            batch = [item]
            if self._schedule:  # a recorded run's step: wait for exactly its frames (or the flush)
                size = self._schedule.popleft()
                while len(batch) < size:
                    item = self._inbox.get()
                    if item is _STOP:
                        stopping = True
                        break
                    if item is _FLUSH:
                        log.warning("the recorded schedule expected %d frames in this step, %d came: the rest "
                                    "of the schedule is dropped", size, len(batch),
                                    extra={"series_id": engine.series_id, "frame_index": batch[-1][0]})
                        self._schedule.clear()
                        break
                    batch.append(item)
            else:  # every frame that arrived while the sampler was busy
                while True:
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stopping = True
                        break
                    if item is not _FLUSH:
                        batch.append(item)
            try:
                began = time.perf_counter()
                payload = engine.update_batch(batch)
                payload["diagnostics"] = {"exact_update_s": time.perf_counter() - began, "batch_size": len(batch)}
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, else the series hangs
                self._error = exc
                # no particle explains the frames, a degenerate cloud, bad input; else a bug: traceback
                expected = isinstance(exc, (FloatingPointError, np.linalg.LinAlgError, ValueError))
                log.error("exact sampler failed at frames %s..%s: %s: %s", batch[0][0], batch[-1][0],
                          type(exc).__name__, exc, exc_info=not expected,
                          extra={"series_id": engine.series_id, "frame_index": batch[-1][0]})
                break
            payload.pop("alert", None)  # the alert is decided on the estimates (caller's thread)
            # for the alert rule (``exact_payloads``): P(t0 <= end of the frame consecutive - 1 back)
            back = max(engine.n_frames - self.alert.consecutive, 0)
            payload["_onset_confirmed"] = engine.onset_probability(float(engine.history.t_hi[back]))
            self._snapshot = _Snapshot(engine.n_frames, engine.views(), self._snapshot.serial + 1,
                                       engine.model_probabilities())
            self._finished.append(payload)
            self._assimilated += len(batch)
        engine.close()

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"exact sampler of series {self.engine.series_id} failed: {self._error}") \
                from self._error

    # ------------------------------------------------------------------ caller's thread
    @property
    def frames_behind(self) -> int:
        """Frames submitted but not yet assimilated by the exact sampler."""
        return self._submitted - self._assimilated

    @property
    def caught_up(self) -> bool:
        return self._assimilated == self._submitted or self._error is not None

    def exact_payloads(self) -> list[dict]:
        """Exact payloads finished since the last call, in frame order.  An exact posterior of a
        frame newer than any the alert rule has seen (its estimate was stale) goes to the alert
        rule; the payload then carries the ``alert`` if it fired."""
        out = []
        while self._finished:
            payload = self._finished.popleft()
            confirmed = payload.pop("_onset_confirmed")
            position = payload["n_frames"] - 1
            if position > self._alert_position:
                new_frames = position - self._alert_position
                payload["alert"] = self._observe(position, payload["frame_index"], payload["time_s"],
                                                 payload["onset_probability"],
                                                 lambda: PayloadBuilder.alert_from_payload(payload,
                                                                                           self.engine.gas_time_s),
                                                 "exact", new_frames, confirmed)
            out.append(payload)
        if not out:  # the posteriors finished before a failure are delivered first
            self._raise_worker_error()
        return out

    def _observe(self, position: int, frame_index: int, time_s: float, onset: float, content, source: str,
                 new_frames: int = 1, onset_confirmed: float = 0.0):
        """Feed the alert rule one posterior that is not stale (frame at history ``position``,
        ``new_frames`` after the previous one it saw; see ``OnsetAlert.observe_batch``); returns
        the alert's content (``content()``, plus its ``source``) when it fires, else None."""
        self._alert_position = position
        if not self.alert.observe_batch(int(frame_index), float(time_s), onset, new_frames, onset_confirmed):
            return None
        alert = self.alert.content = {**content(), "source": source}
        log.info("onset alert", extra={"series_id": self.engine.series_id, "frame_index": int(frame_index),
                                       "t0_mean": alert["t0"]["mean"], "leading_model": alert["leading_model"],
                                       "source": source})
        return alert

    def submit(self, frame_index: int, time_s: float, exposure_s: float, alpha: float,
               sigma: float | None) -> dict:
        """Queue a frame (mid-exposure time and exposure in s) and return its estimate's payload.

        Raises ValueError (nothing queued) for a frame the sampler cannot take: non-finite
        values, a window before the previous frame's, a repeated index.
        """
        self._raise_worker_error()
        j = self.history.append(frame_index, time_s, exposure_s, alpha, sigma)
        self._inbox.put((int(frame_index), float(time_s), float(exposure_s), float(alpha), sigma))
        self._submitted += 1
        self.null.advance(self.history, j + 1)
        snapshot = self._estimate_base()
        views = self._reweighted_all(snapshot, j + 1)
        self._base = snapshot
        readout_s = float(time_s) + 0.5 * float(exposure_s)
        null = self._null_evidence()
        probs = PayloadBuilder.probabilities(views, null)
        stale = self.stale_models(views, probs, snapshot)
        onset = PayloadBuilder.onset_probability(views, probs, readout_s)
        alert = None
        self.counters["estimates"] += 1
        bound = None
        if stale:  # not a posterior: the alert rule sees only a bound that holds whatever the weights
            self.counters["estimates_stale"] += 1
            bound = self.onset_lower_bound(views, readout_s)
            log.debug("estimate stale", extra={"series_id": self.engine.series_id, "frame_index": int(frame_index),
                                               "stale_models": sorted(stale), "onset_probability_bound": bound})
            alert = self._observe(j, frame_index, time_s, bound,
                                  lambda: self._bound_alert(snapshot, int(frame_index), float(time_s), readout_s,
                                                            bound),
                                  "estimate-bound")
        else:
            alert = self._observe(j, frame_index, time_s, onset,
                                  lambda: self.builder.alert(views, probs, int(frame_index), float(time_s), onset,
                                                             self.engine.gas_time_s), "estimate")
        payload = self.builder.build(views, int(frame_index), float(time_s), readout_s, j + 1, alert, probs, onset,
                                     null=null, stale_models=stale)
        payload["diagnostics"] = {"frames_behind": j + 1 - snapshot.n_frames, "onset_probability_bound": bound,
                                  "exact_frame_index": self.history.frame_indices[snapshot.n_frames - 1]
                                  if snapshot.n_frames else None}
        return payload

    def onset_lower_bound(self, views: dict[str, ParticleView], readout_s: float) -> float:
        """A lower bound of P(a kinetic model and t0 <= now | y) that does not use the particle
        weights, only the evidences, and holds with probability >= 1 - M * ALERT_BOUND_ALPHA.

        For t0 after "now" (the end of the latest exposure) every frame has mean 0, so
        p(y, t0 > now | model) = P_prior(t0 > now) * Z_null exactly, whatever k, A, n (the scatter
        s has the null model's prior).  With prior probabilities pi_0 (no reaction) and pi_m:

            P(onset | y) = 1 - Z_null (pi_0 + sum_m pi_m q) / (pi_0 Z_null + sum_m pi_m Z_m),

        q = P_prior(t0 > now), increasing in every Z_m.  Z_null is exact (quadrature); each Z_m
        is estimated without bias, so by Markov's inequality Z_m >= alpha * Z_m(estimate) with
        probability >= 1 - alpha: putting alpha * Z_m(estimate) in gives the bound.
        """
        engine = self.engine
        models = list(views)
        pi_null = engine.null_prior
        pi_model = (1.0 - pi_null) / len(models)
        if "t0" in engine.priors.fixed:
            q = 1.0 if engine.priors.fixed["t0"] > readout_s else 0.0
        else:
            lo, hi = engine.priors.t0
            q = (hi - min(max(readout_s, lo), hi)) / (hi - lo)
        log_null = self.null.log_evidence
        rest = pi_null + pi_model * len(models) * q
        if rest <= 0.0:
            return 1.0
        terms = [math.log(pi_model) + math.log(ALERT_BOUND_ALPHA) + views[m].log_evidence for m in models]
        if pi_null > 0.0:
            terms.append(math.log(pi_null) + log_null)
        log_den = logsumexp_scalars(terms)
        return min(1.0, max(0.0, 1.0 - math.exp(log_null + math.log(rest) - log_den)))

    def _bound_alert(self, snapshot: _Snapshot, frame_index: int, time_s: float, readout_s: float,
                     bound: float) -> dict:
        """The alert raised on a stale estimate's onset bound.  Its t0 and leading model come from
        the newest exact posterior (``posterior_frame_index``), not from the collapsed weights,
        conditioned on what the bound establishes: a reaction whose onset lies before the end of
        this frame's exposure, p(model, t0 | older frames, reaction, t0 <= readout_s) (each
        model's particles with t0 <= readout_s, its evidence times their posterior mass).  The
        alert's ``onset_probability`` and ``reaction_probability`` are the bound."""
        conditioned = {}
        for name, view in snapshot.views.items():
            keep = view.theta[:, 0] <= readout_s
            mass = float(np.dot(view.weights, keep))
            if mass <= 0.0:
                conditioned[name] = dataclasses.replace(view, log_evidence=-math.inf)
                continue
            logw = np.where(keep, view.logw - math.log(mass), -math.inf)
            conditioned[name] = dataclasses.replace(view, logw=logw, log_evidence=view.log_evidence + math.log(mass))
        if all(v.log_evidence == -math.inf for v in conditioned.values()):
            conditioned = snapshot.views  # no particle has its onset before now: say what the posterior says
        probs = PayloadBuilder.given_reaction(conditioned)
        alert = self.builder.alert(conditioned, probs, frame_index, time_s, bound, self.engine.gas_time_s)
        alert["reaction_probability"] = bound
        alert["t0_condition"] = f"t0 <= {readout_s:.4f} s"
        alert["posterior_frame_index"] = (self.history.frame_indices[snapshot.n_frames - 1]
                                          if snapshot.n_frames else None)
        return alert

    def _null_evidence(self) -> NullEvidence | None:
        if self.engine.null_prior <= 0.0:
            return None
        return NullEvidence(self.null.log_evidence, self.engine.null_prior)

    def stale_models(self, views: dict[str, ParticleView], probs: dict[str, float], snapshot: _Snapshot
                     ) -> frozenset:
        """Models whose reweighted particles no longer represent their posterior: ESS below
        ``ess_floor * N`` while the model matters (probability >= STALE_RELEVANCE in the estimate
        or in the exact base).  Reweighting an exact snapshot by no frame is never stale."""
        out = []
        for name, view in views.items():
            if view is snapshot.views[name]:
                continue
            if max(probs[name], snapshot.probabilities.get(name, 0.0)) < STALE_RELEVANCE:
                continue
            if view.diagnostics.get("reweight_failed") or view.ess < self.ess_floor * view.theta.shape[0]:
                out.append(name)
        return frozenset(out)

    def _estimate_base(self) -> _Snapshot:
        """The snapshot to reweight the next frame from: the newest one when it is at most
        MAX_FRAMES_ON_CRITICAL_PATH frames behind, else the current base (one new frame to add);
        ``prepare`` moves the base forward between frames."""
        newest = self._snapshot
        if newest is not self._base and self.history.m - newest.n_frames <= MAX_FRAMES_ON_CRITICAL_PATH:
            self._candidate = None
            return newest
        return self._base

    def prepare(self, max_frames: int = PREPARE_FRAMES_PER_CALL) -> bool:
        """Idle-time work, in slices of at most ``max_frames`` frames' likelihood: sum the
        frames a newer exact snapshot has not assimilated; when done, that snapshot becomes
        the base of the next estimates (which then cost one frame).  True if there was work.
        """
        self._raise_worker_error()
        if self._candidate is None:
            newest = self._snapshot
            if newest.n_frames <= self._base.n_frames:
                return False
            self._candidate = newest
            self._candidate_sums = {name: (newest.n_frames, np.zeros(view.theta.shape[0]))
                                    for name, view in newest.views.items()}
        candidate, h = self._candidate, self.history
        scratch = None
        for name, view in candidate.views.items():
            done, ll = self._candidate_sums[name]
            upto = min(done + max_frames, h.m)
            if upto > done:
                scratch = np.empty_like(ll) if scratch is None else scratch
                lk.reweight_frames(view.code, view.theta, done, upto, h.t_lo, h.t_hi, h.y, h.sig2,
                                   self.engine.noise_kind, self.engine.student_nu, ll, view.logw, scratch)
                self._candidate_sums[name] = (upto, ll)
        if all(done == h.m for done, _ in self._candidate_sums.values()):
            self.builder.warm(candidate.views)
            self._pending = {name: (candidate.serial, done, ll) for name, (done, ll) in self._candidate_sums.items()}
            self._base, self._candidate = candidate, None
        return True

    def _reweighted_all(self, snapshot: _Snapshot, upto: int) -> dict[str, ParticleView]:
        """Every model's view reweighted by frames [snapshot.n_frames, upto), the models shared
        out to ``ESTIMATE_THREADS`` threads (the kernel releases the GIL)."""
        if self._pool is None:
            raise RuntimeError(f"live inference of series {self.engine.series_id} is closed")
        futures = {name: self._pool.submit(self._reweighted, view, snapshot, upto)
                   for name, view in snapshot.views.items()}
        return {name: future.result() for name, future in futures.items()}

    def _reweighted(self, view: ParticleView, snapshot: _Snapshot, upto: int) -> ParticleView:
        """``view`` (posterior after snapshot.n_frames frames) reweighted by frames [m, upto)."""
        m = snapshot.n_frames
        if upto == m:
            return view
        serial, done, ll = self._pending.get(view.name, (-1, m, None))
        if serial != snapshot.serial or ll is None:
            done, ll = m, np.zeros(view.theta.shape[0])
        h = self.history
        logw = np.empty_like(ll)
        inc = lk.reweight_frames(view.code, view.theta, done, upto, h.t_lo, h.t_hi, h.y, h.sig2,
                                 self.engine.noise_kind, self.engine.student_nu, ll, view.logw, logw)
        self._pending[view.name] = (snapshot.serial, upto, ll)
        if not math.isfinite(inc):  # no particle explains the new frames: the model is ruled out
            return dataclasses.replace(view, log_evidence=-math.inf,
                                       diagnostics={**view.diagnostics, "reweight_failed": True})
        # the reweighting's own importance-sampling variance adds to the exact posterior's (delta
        # method over the particles: sum_i (W'_i - W_i)^2)
        added = float(np.sum((np.exp(logw) - view.weights) ** 2))
        return dataclasses.replace(view, logw=logw, log_evidence=view.log_evidence + inc,
                                   log_evidence_var=view.log_evidence_var + added)

    def result(self) -> dict:
        """The exact final result (call when ``caught_up``) with the alert raised live."""
        self._raise_worker_error()
        if not self.caught_up:
            raise RuntimeError("result() before the exact sampler has caught up")
        self.close()
        result = self.engine.result()
        result["alert"] = self.alert.summary()
        result["estimates"] = {"published": self.counters["estimates"], "stale": self.counters["estimates_stale"],
                               "ess_floor": self.ess_floor}
        return result

    def flush(self) -> None:
        """No more frames will come: a scheduled step waiting for more takes the frames it has."""
        self._inbox.put(_FLUSH)

    def close(self, finish_queued: bool = True) -> None:
        """Stop the worker thread and the estimate threads.

        ``finish_queued`` True: the worker first assimilates the frames already queued, and this
        waits for it (a series' result needs them). False, for a series given up (aborted): the
        queued frames are dropped and this does not wait for the exact step in progress, which
        takes minutes when the sampler is thousands of frames behind; the worker ends after
        that step and releases its engine."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._thread.is_alive():
            idle = self.caught_up  # nothing queued nor in progress: the worker ends at once
            if not finish_queued:
                while True:
                    try:
                        self._inbox.get_nowait()
                    except queue.Empty:
                        break
            self._inbox.put(_STOP)
            if finish_queued or idle:
                self._thread.join()

