""""No reaction": the null hypothesis that competes with the kinetic models by evidence.

Under the null model nothing has started: alpha(t) = 0 at every frame, so

    y_j ~ Normal(0, sigma_j^2 + s^2)        (or Student-t, as the kinetic models)

with the same prior on the extra scatter s as the kinetic models (log-uniform on [s_lo, s_hi],
or a fixed value).  Its evidence is a one-dimensional integral over u = log s,

    Z_null = 1 / (u_hi - u_lo) * integral_{u_lo}^{u_hi} prod_j p(y_j | 0, sigma_j^2 + e^{2u}) du,

computed by the midpoint rule on ``GRID_POINTS`` nodes, updated frame by frame in O(nodes).
The posterior of u has sd about 1 / sqrt(2 n) for n frames, so 4096 nodes over the default
prior (6.2 units of u) resolve it beyond 10^5 frames; the quadrature error is then far below
the Monte Carlo error of the kinetic models' evidences, and the null evidence is stated with
a standard error of 0.

Model probabilities (see ``inference.payload.model_probabilities``): prior probability
``null_prior`` for "no reaction" and (1 - null_prior) / M for each of the M kinetic models;
P(reaction | y) = 1 - P(null | y).
"""

from __future__ import annotations

import math

import numpy as np

from . import likelihood as lk
from .particles import log_mean_exp
from .priors import Priors

GRID_POINTS = 4096


class NullModel:
    """Evidence of "no reaction" (alpha = 0 throughout) for the frames of a ``FrameHistory``."""

    name = "none"

    def __init__(self, priors: Priors, noise_kind: int, student_nu: float):
        if "s" in priors.fixed:
            self.log_s = np.array([math.log(priors.fixed["s"])])
        else:
            lo, hi = (math.log(b) for b in priors.s)
            width = (hi - lo) / GRID_POINTS
            self.log_s = lo + width * (np.arange(GRID_POINTS) + 0.5)
        self.noise_kind = int(noise_kind)
        self.student_nu = float(student_nu)
        self.loglik = np.zeros(self.log_s.size)  # log p(y_0..y_{m-1} | s) per node
        self.n_frames = 0

    def copy(self) -> "NullModel":
        other = object.__new__(NullModel)
        other.log_s, other.noise_kind, other.student_nu = self.log_s, self.noise_kind, self.student_nu
        other.loglik, other.n_frames = self.loglik.copy(), self.n_frames
        return other

    def advance(self, history, upto: int) -> None:
        """Take in the frames [n_frames, upto) of ``history`` (a ``FrameHistory``)."""
        if upto > self.n_frames:
            lk.null_frames_loglik(self.log_s, self.n_frames, upto, history.y, history.sig2, self.noise_kind,
                                  self.student_nu, self.loglik)
            self.n_frames = upto

    @property
    def log_evidence(self) -> float:
        """log Z_null (nat) of the frames taken in so far (midpoint rule over log s)."""
        return log_mean_exp(self.loglik)

    def summary(self, probability: float) -> dict:
        return {"log_evidence": self.log_evidence, "log_evidence_se": 0.0, "probability": probability}
