"""The per-frame posterior payload (issue 3, item 4), built from weighted particle sets.

A payload holds, per kinetic model, the log evidence, the probability and the weighted
mean, sd and 5/50/95 % quantiles of its parameters (t0 in s, k in 1/s, s, A, n); the same
summaries averaged over models; histograms of t0 and k on fixed grids (density per unit of
t0 in s or of k in 1/s); the onset probability; the posterior-predictive median and 90 %
band of alpha(t).

Weighted quantile q of particles (v_i, W_i), sorted by v: the smallest v_i whose cumulative
weight sum_{j <= i} W_j >= q.  The model average is the mixture sum_m P(m) p(theta | m, y):
its cumulative distribution F(v) = sum_m P(m) F_m(v), its quantiles found by bisection on F
(``mixture_quantiles``), its mean sum_m P(m) mu_m and variance
sum_m P(m) (sd_m^2 + mu_m^2) - mu^2.

The same builder serves the exact sampler (``inference.smc``) and the immediate estimate of
``inference.live``; each owns one builder, which caches sort orders and histogram bins per
particle array (``ParticleView.version``), so only the weights are new work when a frame
reweights particles that did not move.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading

import numba
import numpy as np

from . import likelihood as lk
from .particles import ess_of_weights, normalised_weights
from .resample import systematic_indices

# column of each parameter in a particle row
COL = {"t0": 0, "k": 1, "s": 2, "A": 3, "n": 4}
QUANTILES = (0.05, 0.5, 0.95)
_QS = np.array(QUANTILES)
#: models below this probability are left out of model-averaged summaries and histograms
NEGLIGIBLE_PROBABILITY = 1e-12


@dataclasses.dataclass(frozen=True)
class ParticleView:
    """The weighted particles of one model at one moment.

    ``theta`` rows are (t0 [s], log k [log 1/s], log s, A, n); ``logw`` are normalised log
    weights (logsumexp 0).  Samplers never modify a viewed ``theta`` in place (resampling
    makes a new array), and ``version`` changes exactly when ``theta`` does, so a view stays
    valid while its sampler goes on and cached sort orders are keyed by it.
    """

    name: str
    code: int
    reported: tuple
    theta: np.ndarray
    logw: np.ndarray
    log_evidence: float
    version: int
    diagnostics: dict
    #: Monte Carlo variance of ``log_evidence`` (nat^2; NaN = unknown), see ``ModelSampler`` in
    #: inference.smc
    log_evidence_var: float = math.nan

    @property
    def log_evidence_se(self) -> float | None:
        """Monte Carlo standard error of the log evidence (nat); None when unknown (one island)."""
        if not math.isfinite(self.log_evidence_var):
            return None
        return math.sqrt(max(self.log_evidence_var, 0.0))

    @functools.cached_property
    def weights(self) -> np.ndarray:
        """Normalised weights W_i (``particles.normalised_weights``)."""
        return normalised_weights(self.logw)

    @property
    def ess(self) -> float:
        """Effective sample size 1 / sum_i W_i^2 (particles)."""
        return ess_of_weights(self.weights)

    def values(self, param: str) -> np.ndarray:
        """Particle values of ``param`` in natural units (t0 in s, k in 1/s)."""
        v = self.theta[:, COL[param]]
        return np.exp(v) if param in ("k", "s") else v


@numba.njit(cache=True, nogil=True)
def _mixture_cdf(sorted_values, cdf, probs, v):
    """F(v) = sum_m probs[m] * (cumulative weight of model m's particles with value <= v)."""
    total = 0.0
    n = sorted_values.shape[1]
    for m in range(sorted_values.shape[0]):
        lo, hi = 0, n  # first index with value > v
        while lo < hi:
            mid = (lo + hi) // 2
            if sorted_values[m, mid] <= v:
                lo = mid + 1
            else:
                hi = mid
        if lo > 0:
            total += probs[m] * cdf[m, lo - 1]
    return total


@numba.njit(cache=True, nogil=True)
def mixture_quantiles(sorted_values, cdf, probs, qs, out):
    """Quantiles of a mixture of weighted particle sets, into ``out``.

    ``sorted_values[m]``: model m's particle values in increasing order; ``cdf[m]``: their
    normalised cumulative weights; ``probs``: mixture weights summing to 1.  For each q the
    result is the smallest particle value v with F(v) >= q, found by bisecting the real line
    until the bracket (lo, hi] with F(lo) < q <= F(hi) holds no other float, so hi is that value.
    """
    lo0 = sorted_values[0, 0]
    hi0 = sorted_values[0, sorted_values.shape[1] - 1]
    for m in range(1, sorted_values.shape[0]):
        lo0 = min(lo0, sorted_values[m, 0])
        hi0 = max(hi0, sorted_values[m, sorted_values.shape[1] - 1])
    for iq in range(qs.shape[0]):
        q = qs[iq]
        if _mixture_cdf(sorted_values, cdf, probs, lo0) >= q:
            out[iq] = lo0
            continue
        lo, hi = lo0, hi0
        for _ in range(2200):  # enough to reach adjacent floats from any bracket
            mid = 0.5 * (lo + hi)
            if mid <= lo or mid >= hi:
                break
            if _mixture_cdf(sorted_values, cdf, probs, mid) >= q:
                hi = mid
            else:
                lo = mid
        out[iq] = hi


@numba.njit(cache=True, nogil=True)
def weighted_summary(sorted_values, order, weights, qs, stats, cdf):
    """Weighted mean, sd and quantiles of particles given in increasing order.

    ``sorted_values[i]`` is the value of particle ``order[i]``, whose weight is
    ``weights[order[i]]`` (any positive scale).  Writes the normalised cumulative weights
    to ``cdf`` and (mean, sd, quantile of each q in ``qs``) to ``stats``:
    mean = sum W_i v_i, sd^2 = sum W_i (v_i - mean)^2, quantile q = the smallest v_i with
    cdf_i >= q (the last value if rounding leaves every cdf_i < q).
    """
    n = sorted_values.shape[0]
    total = 0.0
    first = 0.0
    for i in range(n):
        w = weights[order[i]]
        total += w
        cdf[i] = total
        first += w * sorted_values[i]
    mean = first / total
    second = 0.0
    for i in range(n):
        d = sorted_values[i] - mean
        second += weights[order[i]] * d * d
        cdf[i] /= total
    stats[0] = mean
    stats[1] = math.sqrt(max(second / total, 0.0))
    for iq in range(qs.shape[0]):
        lo, hi = 0, n  # first index with cdf >= q
        while lo < hi:
            mid = (lo + hi) // 2
            if cdf[mid] < qs[iq]:
                lo = mid + 1
            else:
                hi = mid
        stats[2 + iq] = sorted_values[min(lo, n - 1)]


def warm_up_kernels() -> None:
    """Compile (or load from the Numba cache) the payload kernels."""
    values = np.array([[0.0, 1.0, 2.0]])
    cdf = np.array([[0.2, 0.6, 1.0]])
    stats = np.empty(2 + len(QUANTILES))
    weighted_summary(values[0], np.arange(3), np.array([0.2, 0.4, 0.4]), _QS, stats, np.empty(3))
    mixture_quantiles(values, cdf, np.ones(1), _QS, np.empty(len(QUANTILES)))


@dataclasses.dataclass(frozen=True)
class NullEvidence:
    """The "no reaction" hypothesis in a model comparison: its log evidence (nat) and prior
    probability (see inference.null_model)."""

    log_evidence: float
    prior_probability: float


def model_probabilities(log_evidences: dict[str, float], null: NullEvidence | None = None
                        ) -> tuple[dict[str, float], float]:
    """Posterior model probabilities from log evidences (Bayes' rule over models).

    Prior: ``null.prior_probability`` = p0 for "no reaction" and (1 - p0) / M for each of the M
    kinetic models (uniform over kinetic models without ``null``):

        P(m | y) = pi_m Z_m / (p0 Z_null + sum_m' pi_m' Z_m')

    Returns (P(m | y) per kinetic model, P(no reaction | y)); the kinetic ones sum to
    P(reaction | y) = 1 - P(no reaction | y).
    """
    names = list(log_evidences)
    logz = np.array([log_evidences[m] for m in names], dtype=float)
    if null is not None and null.prior_probability > 0.0:
        p0 = float(null.prior_probability)
        log_post = np.append(logz + math.log((1.0 - p0) / len(names)), null.log_evidence + math.log(p0))
    else:
        log_post = logz.copy()
    top = np.max(log_post)
    if not np.isfinite(top):  # every model ruled out: say so rather than divide by zero
        raise FloatingPointError("every model has zero evidence")
    p = normalised_weights(log_post)
    null_probability = float(p[-1]) if p.size > len(names) else 0.0
    return {m: float(v) for m, v in zip(names, p)}, null_probability


def alert_content(frame_index: int, time_s: float, t0: dict, leading: str, leading_probability: float,
                  onset: float, gas_time_s: float | None, reaction_probability: float) -> dict:
    """The onset alert: when (frame, mid-exposure time in s), the model-averaged t0 (s) with its
    90 % interval, t0 - ts when the gas time ts is known, the leading model and its probability,
    the onset probability and P(reaction)."""
    return {"time_s": float(time_s), "frame_index": int(frame_index),
            "t0": {"mean": float(t0["mean"]), "q05": float(t0["q05"]), "q95": float(t0["q95"])},
            "t0_minus_ts": None if gas_time_s is None else float(t0["mean"]) - gas_time_s,
            "leading_model": leading, "leading_probability": float(leading_probability),
            "onset_probability": float(onset), "reaction_probability": float(reaction_probability)}


class ParticleCache:
    """Sort orders and histogram bins of particle arrays, keyed by (what, model, parameter,
    version); the newest ``keep`` versions of each are kept.  Shared (thread-safe) between the
    exact sampler's builder, which fills it off the critical path, and the immediate
    estimate's builder, which then finds the sorts of a new snapshot done."""

    def __init__(self, keep: int = 3):
        self.keep = int(keep)
        self._data: dict = {}
        self._lock = threading.Lock()

    def get(self, key: tuple, version: int, compute):
        with self._lock:
            hit = self._data.get(key, {}).get(version)
        if hit is not None:
            return hit
        data = compute()
        with self._lock:
            versions = self._data.setdefault(key, {})
            versions[version] = data
            while len(versions) > self.keep:
                versions.pop(min(versions))
        return data


class PayloadBuilder:
    """Builds payloads and summaries from ``ParticleView`` s; caches per particle array."""

    def __init__(self, models: tuple, t0_edges: np.ndarray, k_edges: np.ndarray,
                 predictive_times: np.ndarray, predictive_draws: int, cache: ParticleCache | None = None):
        self.models = tuple(models)
        self.t0_edges = np.asarray(t0_edges, dtype=float)
        self.k_edges = np.asarray(k_edges, dtype=float)
        self.predictive_times = np.ascontiguousarray(predictive_times, dtype=float)
        self.predictive_draws = int(predictive_draws)
        self.cache = cache if cache is not None else ParticleCache()

    # ------------------------------------------------------------------ cached per theta
    def _cached(self, kind: str, view: ParticleView, param: str, compute):
        return self.cache.get((kind, view.name, param), view.version, compute)

    def _sorted(self, view: ParticleView, param: str) -> tuple[np.ndarray, np.ndarray]:
        """(order, values in increasing order) of ``param``."""
        def compute():
            values = view.values(param)
            order = np.argsort(values, kind="stable")
            return order, values[order]
        return self._cached("sorted", view, param, compute)

    def _bins(self, view: ParticleView, param: str, edges: np.ndarray) -> np.ndarray:
        """Histogram bin of each particle (edges.size - 1 for values outside the grid),
        with numpy.histogram's convention: the last bin includes its right edge."""
        def compute():
            values = view.values(param)
            idx = np.searchsorted(edges, values, side="right") - 1
            idx[values == edges[-1]] = edges.size - 2
            idx[(values < edges[0]) | (values > edges[-1])] = edges.size - 1
            return idx
        return self._cached("bins", view, param, compute)

    def warm(self, views: dict) -> None:
        """Sort and bin the particles of ``views`` now (idle time), so a payload built from them
        or from reweightings of them only has the weights left to do."""
        for view in views.values():
            for param in view.reported:
                self._sorted(view, param)
            self._bins(view, "t0", self.t0_edges)
            self._bins(view, "k", self.k_edges)

    # ------------------------------------------------------------------ summaries
    def _param_summary(self, view: ParticleView, param: str, memo: dict | None = None
                       ) -> tuple[dict, np.ndarray, np.ndarray]:
        """Summary of one parameter plus (sorted values, normalised cdf) for mixtures;
        ``memo`` (one per payload) keeps them for the model averages."""
        if memo is not None and (view.name, param) in memo:
            return memo[(view.name, param)]
        order, sorted_values = self._sorted(view, param)
        stats = np.empty(2 + len(QUANTILES))
        cdf = np.empty(sorted_values.size)
        weighted_summary(sorted_values, order, view.weights, _QS, stats, cdf)
        summary = {"mean": float(stats[0]), "sd": float(stats[1]), "q05": float(stats[2]), "q50": float(stats[3]),
                   "q95": float(stats[4])}
        if memo is not None:
            memo[(view.name, param)] = (summary, sorted_values, cdf)
        return summary, sorted_values, cdf

    def summaries(self, view: ParticleView, memo: dict | None = None) -> dict:
        """Weighted mean, sd and 5/50/95 % quantiles of every parameter the model uses."""
        return {p: self._param_summary(view, p, memo)[0] for p in view.reported}

    def model_averaged(self, views: dict, probs: dict[str, float], params=("t0",),
                       memo: dict | None = None) -> dict:
        """Summaries of the mixture over models, conditional on a reaction (the kinetic models'
        probabilities renormalised).  Only parameters that mean the same in every model (t0)
        should be averaged: k is a different quantity in every rate law."""
        probs = self.given_reaction(views)  # the mixture is over kinetic models, given a reaction
        active = [m for m in self.models if probs[m] > NEGLIGIBLE_PROBABILITY]
        p = np.array([probs[m] for m in active])
        p /= p.sum()
        out = {}
        for param in params:
            parts = [self._param_summary(views[m], param, memo) for m in active]
            mean = float(sum(pm * s["mean"] for pm, (s, _, _) in zip(p, parts)))
            second = float(sum(pm * (s["sd"] ** 2 + s["mean"] ** 2) for pm, (s, _, _) in zip(p, parts)))
            quantiles = np.empty(len(QUANTILES))
            # the sorted values of the models change only when their particles do: stack once
            stacked = self.cache.get(("stacked", param, tuple(active)), tuple(views[m].version for m in active),
                                     lambda: np.stack([v for _, v, _ in parts]))
            mixture_quantiles(stacked, np.stack([c for _, _, c in parts]), p, _QS, quantiles)
            out[param] = {"mean": mean, "sd": math.sqrt(max(second - mean * mean, 0.0)),
                          "q05": float(quantiles[0]), "q50": float(quantiles[1]), "q95": float(quantiles[2])}
        return out

    @staticmethod
    def given_reaction(views: dict) -> dict[str, float]:
        """P(model | y, reaction) from the kinetic models' evidences alone (no underflow when
        "no reaction" holds nearly all the probability)."""
        return model_probabilities({m: v.log_evidence for m, v in views.items()}, None)[0]

    @staticmethod
    def probabilities(views: dict, null: NullEvidence | None = None) -> dict[str, float]:
        """P(model | y) of each kinetic model (``model_probabilities``); with ``null`` they sum
        to P(reaction | y), else to 1."""
        return model_probabilities({m: v.log_evidence for m, v in views.items()}, null)[0]

    @staticmethod
    def onset_probability(views: dict, probs: dict[str, float], time_s: float) -> float:
        """Model-averaged P(t0 <= time_s) = sum_m P(m) sum_i W_i [t0_i <= time_s]."""
        onset = sum(probs[m] * float(np.dot(v.weights, v.theta[:, 0] <= time_s)) for m, v in views.items())
        return min(1.0, max(0.0, onset))

    def alert(self, views: dict, probs: dict[str, float], frame_index: int, time_s: float, onset: float,
              gas_time_s: float | None) -> dict:
        """The onset alert's content (``alert_content``) from weighted particles."""
        leading = max(probs, key=probs.get)
        t0 = self.model_averaged(views, probs, params=("t0",))["t0"]
        return alert_content(frame_index, time_s, t0, leading, probs[leading], onset, gas_time_s,
                             sum(probs.values()))

    @staticmethod
    def alert_from_payload(payload: dict, gas_time_s: float | None) -> dict:
        """The onset alert's content (``alert_content``) from a built payload."""
        leading = payload["leading_model"]
        return alert_content(payload["frame_index"], payload["time_s"], payload["model_averaged"]["t0"], leading,
                             payload["models"][leading]["probability"], payload["onset_probability"], gas_time_s,
                             payload.get("reaction_probability", 1.0))

    # ------------------------------------------------------------------ payload pieces
    def _histogram(self, views: dict, weights: dict[str, float], param: str, edges: np.ndarray) -> list[float]:
        """Weighted density on the grid ``edges``: sum over models of weight * histogram."""
        nbins = edges.size - 1
        total = np.zeros(nbins + 1)
        for m, pm in weights.items():
            total += pm * np.bincount(self._bins(views[m], param, edges), weights=views[m].weights,
                                      minlength=nbins + 1)
        return (total[:nbins] / np.diff(edges)).tolist()

    def _predictive(self, views: dict, probs: dict[str, float], null_probability: float, leading: str) -> dict:
        """Posterior-predictive median and 90 % band of alpha(t) for the leading model and for
        all hypotheses (kinetic models with their probabilities ``probs``, and "no reaction",
        alpha = 0, with ``null_probability``)."""
        times = self.predictive_times

        def curves(view: ParticleView, n_draws: int) -> np.ndarray:
            idx = systematic_indices(view.weights, n_draws, 0.5)
            out = np.empty((n_draws, times.size))
            lk.alpha_curves(view.code, np.ascontiguousarray(view.theta[idx]), times, out)
            return out

        def bands(c: np.ndarray) -> dict:
            c = np.sort(c, axis=0)
            rows = [int(round(q * (c.shape[0] - 1))) for q in QUANTILES]
            return {"median": c[rows[1]].tolist(), "q05": c[rows[0]].tolist(), "q95": c[rows[2]].tolist()}

        lead = curves(views[leading], self.predictive_draws)
        p = np.array([probs[m] for m in self.models] + [null_probability])
        alloc = np.bincount(systematic_indices(p, 2 * self.predictive_draws, 0.5), minlength=p.size)
        mix = np.concatenate([curves(views[m], int(c)) for m, c in zip(self.models, alloc) if c > 0]
                             + [np.zeros((int(alloc[-1]), times.size))])
        return {"time_s": times.tolist(), "leading": bands(lead), "model_averaged": bands(mix)}

    def build(self, views: dict, frame_index: int, time_s: float, readout_s: float, n_frames: int,
              alert: dict | None, probs: dict[str, float] | None = None, onset: float | None = None,
              null: NullEvidence | None = None, stale_models: frozenset = frozenset()) -> dict:
        """The payload of one frame (``readout_s``: end of its exposure, "now" for the onset);
        ``probs`` and ``onset`` when the caller has computed them already (for the alert rule);
        ``null``: the "no reaction" hypothesis (``reaction_probability`` and ``null_model``);
        ``stale_models``: models whose particles no longer represent their posterior
        (``stale`` per model and for the payload, see inference.live)."""
        all_probs, null_probability = model_probabilities({m: v.log_evidence for m, v in views.items()}, null)
        probs = probs if probs is not None else all_probs
        leading = max(probs, key=probs.get)
        memo: dict = {}
        models = {}
        for name in self.models:
            view = views[name]
            models[name] = {"log_evidence": float(view.log_evidence), "log_evidence_se": view.log_evidence_se,
                            "probability": probs[name], "stale": name in stale_models,
                            "params": self.summaries(view, memo), "diagnostics": {**view.diagnostics, "ess": view.ess}}
        given_reaction = self.given_reaction(views)
        active = {m: given_reaction[m] for m in self.models if given_reaction[m] > NEGLIGIBLE_PROBABILITY}
        histograms = {}
        for param, edges in (("t0", self.t0_edges), ("k", self.k_edges)):
            histograms[param] = {
                "edges": edges.tolist(),
                # k means something different in every rate law: no mixture of k over models
                "model_averaged": self._histogram(views, active, param, edges) if param == "t0" else None,
                "leading": self._histogram(views, {leading: 1.0}, param, edges),
            }
        return {
            "frame_index": frame_index,
            "time_s": time_s,
            "n_frames": n_frames,
            "onset_probability": onset if onset is not None else self.onset_probability(views, probs, readout_s),
            "reaction_probability": 1.0 - null_probability,
            "null_model": (None if null is None else
                           {"log_evidence": float(null.log_evidence), "log_evidence_se": 0.0,
                            "prior_probability": float(null.prior_probability), "probability": null_probability}),
            "stale": bool(stale_models),
            "leading_model": leading,
            "models": models,
            "model_averaged": self.model_averaged(views, probs, params=("t0",), memo=memo),
            "histograms": histograms,
            "predictive": self._predictive(views, probs, null_probability, leading),
            "alert": alert,
        }
