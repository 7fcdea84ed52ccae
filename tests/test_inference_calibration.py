"""Simulation-based calibration (Talts et al. 2018) of the online F1 posteriors.

Truths are drawn from a narrower proper prior (t0 uniform [2, 10] s, k log-uniform
[0.3, 3] 1/s, s log-uniform [0.01, 0.05], A uniform [0.8, 1.2]) to keep the runs short;
each simulated series (frames every 1/3 s for 12 s, instantaneous, sigma unknown) is
assimilated with the same prior by a 512-particle sampler (N small enough for speed;
SBC checks the posterior shape, and 512 particles keep the Monte Carlo error of a rank
far below the bin width).  The rank of the truth among posterior draws is represented by
its limit for many draws, the posterior CDF at the truth; for a calibrated posterior it is
uniform on [0, 1] at every time, here checked mid-series and at the end with a chi-square
test over 10 bins.
"""

import math

import numpy as np
import pytest
import scipy.stats

from inference.models import alpha_numpy
from inference.priors import Priors
from inference.smc import OnlineInference

PRIORS = Priors(t0=(2.0, 10.0), k=(0.3, 3.0), s=(0.01, 0.05), A=(0.8, 1.2))
N_SERIES = 200
TIMES = np.arange(36) / 3.0
CHECKPOINTS = {"mid": 17, "end": 35}


def posterior_cdf_at(sampler, param, value):
    return float(np.dot(sampler.weights, sampler.values(param) < value))


@pytest.fixture(scope="module")
def ranks():
    rng = np.random.default_rng(2024)
    out = {(c, p): [] for c in CHECKPOINTS for p in ("t0", "k")}
    for i in range(N_SERIES):
        t0 = rng.uniform(*PRIORS.t0)
        k = math.exp(rng.uniform(math.log(PRIORS.k[0]), math.log(PRIORS.k[1])))
        s = math.exp(rng.uniform(math.log(PRIORS.s[0]), math.log(PRIORS.s[1])))
        A = rng.uniform(*PRIORS.A)
        y = A * alpha_numpy("F1", k * (TIMES - t0)) + rng.normal(0.0, s, TIMES.size)
        engine = OnlineInference(models=("F1",), priors=PRIORS, n_particles=512, seed=i)
        sampler = engine.samplers["F1"]
        for j, (tj, yj) in enumerate(zip(TIMES, y)):
            engine.assimilate(j, float(tj), 0.0, float(yj), None)  # update() minus the payload
            for c, jc in CHECKPOINTS.items():
                if j == jc:
                    out[(c, "t0")].append(posterior_cdf_at(sampler, "t0", t0))
                    out[(c, "k")].append(posterior_cdf_at(sampler, "k", k))
    return {key: np.array(v) for key, v in out.items()}


@pytest.mark.parametrize("checkpoint", list(CHECKPOINTS))
@pytest.mark.parametrize("param", ["t0", "k"])
def test_ranks_are_uniform(ranks, checkpoint, param):
    u = ranks[(checkpoint, param)]
    assert u.size == N_SERIES
    counts = np.histogram(u, bins=10, range=(0.0, 1.0))[0]
    p_value = scipy.stats.chisquare(counts).pvalue
    assert p_value > 0.001, (checkpoint, param, counts)
    # central 90 % credible intervals cover the truth about 90 % of the time
    coverage = np.mean((u > 0.05) & (u < 0.95))
    assert 0.83 < coverage < 0.96, (checkpoint, param, coverage)
