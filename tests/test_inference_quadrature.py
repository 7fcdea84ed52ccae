"""IBIS posterior vs a dense-grid quadrature (no code shared with the sampler).

Paper-like scenario (docs/design.md section 7): F1, t0 = 7.4461 s, k = 0.6192 1/s, frames every
1/3 s from t = 0 for 12 s (36 frames), instantaneous, noise sd 0.02, sigma unknown (the
scatter s is a parameter).  Free: t0 uniform [0, 12] s, log k uniform [log 0.01, log 100],
log s uniform [log 1e-3, log 0.5]; A fixed at 1.  The quadrature integrates s out on a 1-D
grid per (t0, k) node (the likelihood depends on s only through the residual sum of
squares) and refines a (t0, log k) grid around the posterior mass.
"""

import math

import numpy as np
import pytest
import scipy.special

from inference.priors import Priors
from inference.smc import OnlineInference

T0_TRUE, K_TRUE, NOISE = 7.4461, 0.6192, 0.02
T_WINDOW = (0.0, 12.0)
LOGK = (math.log(0.01), math.log(100.0))
LOGS = (math.log(1e-3), math.log(0.5))


def paper_series(seed=0):
    t = np.arange(36) / 3.0
    x = np.clip(K_TRUE * (t - T0_TRUE), 0.0, None)
    y = 1.0 - np.exp(-x) + np.random.default_rng(seed).normal(0.0, NOISE, t.size)
    return t, y


def curve(model, t0, k, t):
    x = np.clip(k[..., None] * (t - t0[..., None]), 0.0, None)
    if model == "F1":
        return 1.0 - np.exp(-x)
    if model == "A2":
        return 1.0 - np.exp(-x * x)
    x1 = np.minimum(x, 1.0)  # finite-domain models: alpha = 1 from x = 1 on
    if model == "R3":
        return 1.0 - (1.0 - x1) ** 3
    if model == "D3":
        return 1.0 - (1.0 - np.sqrt(x1)) ** 3
    raise ValueError(model)


def log_marginal_over_s(rss, n):
    """log of the integral over log s (uniform density on LOGS) of prod_j Normal(y_j; mu_j, s^2).

    With u = rss / (2 s^2) the integral is (pi rss)^(-n/2) / 2 * Gamma(n/2) *
    [P(n/2, u(s_lo)) - P(n/2, u(s_hi))] (P: regularised lower incomplete gamma).
    """
    a = 0.5 * n
    u_lo = rss / (2.0 * math.exp(2 * LOGS[0]))
    u_hi = rss / (2.0 * math.exp(2 * LOGS[1]))
    mass = np.maximum(scipy.special.gammainc(a, u_lo) - scipy.special.gammainc(a, u_hi), 1e-300)
    return (-a * np.log(np.pi * rss) - math.log(2.0) + scipy.special.gammaln(a) + np.log(mass)
            - math.log(LOGS[1] - LOGS[0]))


def quadrature(model, t, y):
    def grid_eval(t0_axis, lk_axis):
        k_axis = np.exp(lk_axis)
        rss = np.empty((t0_axis.size, lk_axis.size))
        for i, t0 in enumerate(t0_axis):
            mu = curve(model, np.full(k_axis.size, t0), k_axis, t)
            rss[i] = np.sum((y - mu) ** 2, axis=1)
        return log_marginal_over_s(rss, t.size), rss

    t0_axis = np.linspace(*T_WINDOW, 1201)
    lk_axis = np.linspace(*LOGK, 601)
    lm, _ = grid_eval(t0_axis, lk_axis)
    keep = lm > lm.max() - 40
    i, j = np.nonzero(keep)
    pad_t, pad_k = 3 * (t0_axis[1] - t0_axis[0]), 3 * (lk_axis[1] - lk_axis[0])
    t0_axis = np.linspace(max(T_WINDOW[0], t0_axis[i.min()] - pad_t), min(T_WINDOW[1], t0_axis[i.max()] + pad_t), 801)
    lk_axis = np.linspace(max(LOGK[0], lk_axis[j.min()] - pad_k), min(LOGK[1], lk_axis[j.max()] + pad_k), 801)
    lm, rss = grid_eval(t0_axis, lk_axis)
    mx = lm.max()
    w = np.exp(lm - mx)
    z2 = np.trapezoid(np.trapezoid(w, lk_axis, axis=1), t0_axis)
    log_z = mx + math.log(z2) - math.log(T_WINDOW[1] - T_WINDOW[0]) - math.log(LOGK[1] - LOGK[0])
    p = w / w.sum()
    T0, LK = np.meshgrid(t0_axis, lk_axis, indexing="ij")
    K = np.exp(LK)
    out = {"log_evidence": log_z}
    for name, v in (("t0", T0), ("k", K)):
        mean = float(np.sum(p * v))
        out[name] = {"mean": mean, "sd": math.sqrt(float(np.sum(p * (v - mean) ** 2)))}
    return out


@pytest.fixture(scope="module")
def smc_result():
    t, y = paper_series()
    engine = OnlineInference(models=("F1", "A2"), priors=Priors(t0=T_WINDOW, fixed={"A": 1.0}),
                             n_particles=4096, seed=1, null_prior=0.5)
    for j, (tj, yj) in enumerate(zip(t, y)):
        engine.update(j, float(tj), 0.0, float(yj), None)
    return t, y, engine.result()


@pytest.mark.parametrize("model", ["F1", "A2"])
def test_posterior_and_evidence_match_quadrature(smc_result, model):
    t, y, result = smc_result
    ref = quadrature(model, t, y)
    got = result["models"][model]
    assert abs(got["log_evidence"] - ref["log_evidence"]) < 0.15
    for p in ("t0", "k"):
        sd = ref[p]["sd"]
        assert abs(got["params"][p]["mean"] - ref[p]["mean"]) < 0.1 * sd, (p, got["params"][p], ref[p])
        assert abs(got["params"][p]["sd"] / sd - 1.0) < 0.10, (p, got["params"][p], ref[p])


def r3_series(seed=0):
    """36 frames of R3 kinetics that saturate inside the window (t0 = 4 s, k = 0.2 1/s: alpha = 1
    from 9 s on), noise sd 0.02."""
    t = np.arange(36) / 3.0
    y = curve("R3", np.array(4.0), np.array(0.2), t) + np.random.default_rng(seed).normal(0.0, NOISE, t.size)
    return t, y


#: the exact sampler's batches when it lags: a burst of 12 frames, single frames, then larger ones
BATCHED_SCHEDULE = (12, 1, 1, 2, 6, 1, 13)


def run_batched(models, t, y, seed, schedule=BATCHED_SCHEDULE, n_particles=4096, **settings):
    engine = OnlineInference(models=models, priors=Priors(t0=T_WINDOW, fixed={"A": 1.0}), n_particles=n_particles,
                             seed=seed, **settings)
    first = 0
    for size in schedule:
        engine.assimilate_batch([(j, float(t[j]), 0.0, float(y[j]), None) for j in range(first, first + size)])
        first += size
    assert first == t.size and engine.schedule == list(schedule)
    return engine.result()


#: settings of the singular-model case: smaller tempering steps (ESS >= 0.8 N) and full moves for
#: every model.  Measured over 6 seeds on this series (N = 4096, one frame per step): log evidence
#: error sd R3 0.08, D3 0.10 nat with these; R3 0.12, D3 0.28 nat with the defaults (ESS 0.5 N), and
#: D3, 35 nat behind R3, 0.7 to 1.5 nat low when it gets the single-sweep moves of negligible models
SINGULAR_SETTINGS = {"ess_threshold": 0.8, "light_probability": 0.0}


@pytest.mark.parametrize("data, models", [("paper", ("F1", "A2")), ("r3", ("R3", "D3"))])
def test_batched_steps_match_quadrature(data, models):
    """Frames taken in batches (adaptive tempering over each batch) give the same posterior and
    evidence as quadrature, for smooth models and for a finite-domain (R3) and a diffusion (D3)
    model on a series that saturates inside the window (with ``SINGULAR_SETTINGS``)."""
    t, y = paper_series() if data == "paper" else r3_series()
    result = run_batched(models, t, y, seed=4, **({} if data == "paper" else SINGULAR_SETTINGS))
    for model in models:
        ref = quadrature(model, t, y)
        got = result["models"][model]
        assert abs(got["log_evidence"] - ref["log_evidence"]) < 0.15, (model, got["log_evidence"], ref)
        for p in ("t0", "k"):
            sd = ref[p]["sd"]
            assert abs(got["params"][p]["mean"] - ref[p]["mean"]) < 0.1 * sd, (model, p, got["params"][p], ref[p])
            assert abs(got["params"][p]["sd"] / sd - 1.0) < 0.10, (model, p, got["params"][p], ref[p])


def test_paper_scenario_posterior_width_matches_design():
    """docs/design.md section 7: the exact posterior has sd(t0) about 0.029 s and sd(k) about 0.017 1/s."""
    t, y = paper_series()
    ref = quadrature("F1", t, y)
    assert abs(ref["t0"]["mean"] - T0_TRUE) < 4 * ref["t0"]["sd"]
    assert abs(ref["k"]["mean"] - K_TRUE) < 4 * ref["k"]["sd"]
    assert 0.015 < ref["t0"]["sd"] < 0.05
    assert 0.008 < ref["k"]["sd"] < 0.03


def onset_quadrature(t, y, now):
    """(log Z_F1, P(t0 <= now | y, F1)) for F1 (A = 1) by the same grid: t0 uniform on T_WINDOW,
    log k and log s uniform, s integrated out."""
    t0_axis = np.linspace(*T_WINDOW, 2401)
    lk_axis = np.linspace(*LOGK, 801)
    k_axis = np.exp(lk_axis)
    rss = np.empty((t0_axis.size, lk_axis.size))
    for i, t0 in enumerate(t0_axis):
        rss[i] = np.sum((y - curve("F1", np.full(k_axis.size, t0), k_axis, t)) ** 2, axis=1)
    lm = log_marginal_over_s(rss, t.size)
    top = lm.max()
    w = np.trapezoid(np.exp(lm - top), lk_axis, axis=1)  # density of t0 (unnormalised)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (w[1:] + w[:-1]) * np.diff(t0_axis))])
    log_z = top + math.log(cdf[-1]) - math.log(T_WINDOW[1] - T_WINDOW[0]) - math.log(LOGK[1] - LOGK[0])
    return log_z, float(np.interp(now, t0_axis, cdf) / cdf[-1])


def null_log_evidence(y):
    """log Z of "no reaction" (alpha = 0): only s, integrated out in closed form."""
    return float(log_marginal_over_s(np.array(np.sum(y * y)), y.size))


def test_no_reaction_onset_and_reaction_probability_are_the_exact_ones():
    """alpha == 0 plus noise, F1 against "no reaction" with prior probability 1/2 each: the
    sampler's P(no reaction | y) and onset probability P(F1 and t0 <= now | y) are the exact
    posterior probabilities from quadrature, mid-series and at the end of the window (where
    P(t0 <= now | F1) is 1: the onset probability is then P(reaction | y))."""
    rng = np.random.default_rng(11)
    t = np.arange(36) / 3.0
    y = rng.normal(0.0, NOISE, t.size)
    engine = OnlineInference(models=("F1",), priors=Priors(t0=T_WINDOW, fixed={"A": 1.0}), n_particles=4096,
                             seed=2, null_prior=0.5)
    checked = {}
    for j, (tj, yj) in enumerate(zip(t, y)):
        payload = engine.update(j, float(tj), 0.0, float(yj), None)
        if j + 1 in (12, 18, 30, 36):
            log_z, onset_given_f1 = onset_quadrature(t[: j + 1], y[: j + 1], float(tj))
            log_null = null_log_evidence(y[: j + 1])
            reaction = 1.0 / (1.0 + math.exp(log_null - log_z))
            checked[j + 1] = (payload["reaction_probability"], reaction, payload["onset_probability"],
                              reaction * onset_given_f1)
            assert payload["null_model"]["log_evidence"] == pytest.approx(log_null, abs=1e-5)
            assert payload["reaction_probability"] == pytest.approx(reaction, abs=0.02), (j, checked)
            assert payload["onset_probability"] == pytest.approx(reaction * onset_given_f1, abs=0.01), (j, checked)
    print("(P(reaction), exact, onset probability, exact) after n frames:", checked)
    assert checked[36][1] < 0.5  # flat data favour "no reaction"
    assert max(c[2] for c in checked.values()) < 0.5  # far from an alert


def test_reaction_is_certain_on_the_paper_series(smc_result):
    t, y, result = smc_result
    assert result["reaction_probability"] > 1.0 - 1e-12
    assert result["null_model"]["log_evidence"] == pytest.approx(null_log_evidence(y), abs=1e-5)
