"""The particle-set arithmetic of inference.particles against SciPy on random inputs.

Log weights are drawn over a wide range (spreads up to 10^4 nat, as after a sharp frame) and
with some particles ruled out (-inf); every function must agree with scipy.special.logsumexp /
softmax, and the Numba kernel ``log_normalise`` with the NumPy functions.
"""

import math

import numpy as np
import pytest
import scipy.special

from inference import particles
from inference.likelihood import NOISE_NORMAL, frame_loglik, reweight_frames


def random_log_weights(rng, n, spread, ruled_out=0.0):
    """n log weights centred anywhere in [-1e3, 1e3], uniform over ``spread`` nat, with a
    fraction ``ruled_out`` of them -inf (never all)."""
    l = rng.uniform(-1e3, 1e3) + rng.uniform(-spread, 0.0, n)
    if ruled_out:
        dead = rng.random(n) < ruled_out
        dead[rng.integers(n)] = False
        l[dead] = -np.inf
    return l


CASES = [(n, spread, ruled_out, seed) for seed, (n, spread, ruled_out) in enumerate(
    [(1, 1.0, 0.0), (2, 0.0, 0.0), (7, 5.0, 0.0), (100, 50.0, 0.3), (4096, 1e4, 0.0), (4096, 20.0, 0.9),
     (10_000, 700.0, 0.5), (33, 1e-12, 0.0)])]


@pytest.mark.parametrize("n, spread, ruled_out, seed", CASES)
def test_log_sum_exp_and_weights_agree_with_scipy(n, spread, ruled_out, seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        l = random_log_weights(rng, n, spread, ruled_out)
        reference = scipy.special.logsumexp(l)
        assert particles.logsumexp(l) == pytest.approx(reference, rel=1e-13, abs=1e-12)
        assert particles.logsumexp_scalars(list(l)) == pytest.approx(reference, rel=1e-13, abs=1e-12)
        assert particles.log_mean_exp(l) == pytest.approx(reference - math.log(n), rel=1e-13, abs=1e-12)

        w = particles.normalised_weights(l)
        expected = scipy.special.softmax(l)
        np.testing.assert_allclose(w, expected, rtol=1e-12, atol=1e-300)
        assert w.sum() == pytest.approx(1.0, rel=1e-13)

        ess = 1.0 / np.sum(expected ** 2)
        assert 1.0 <= particles.effective_sample_size(l) <= n * (1 + 1e-12)
        assert particles.effective_sample_size(l) == pytest.approx(ess, rel=1e-11)
        assert particles.ess_of_weights(w) == pytest.approx(ess, rel=1e-11)
        assert math.exp(particles.log_ess(l)) == pytest.approx(ess, rel=1e-11)
        # ESS of unnormalised log weights does not depend on their normalisation
        assert particles.log_ess(l + 123.0) == pytest.approx(particles.log_ess(l), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n, spread, ruled_out, seed", CASES)
def test_numba_log_normalise_agrees_with_scipy_and_numpy(n, spread, ruled_out, seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(20):
        l = random_log_weights(rng, n, spread, ruled_out)
        out = np.full(n, np.nan)
        c = particles.log_normalise(l, out)
        assert c == pytest.approx(scipy.special.logsumexp(l), rel=1e-13, abs=1e-12)
        assert c == particles.logsumexp(l) or c == pytest.approx(particles.logsumexp(l), rel=1e-15)
        np.testing.assert_array_equal(out, l - c)  # out_i = l_i - c exactly, -inf stays -inf
        assert scipy.special.logsumexp(out) == pytest.approx(0.0, abs=1e-12)
        in_place = l.copy()
        assert particles.log_normalise(in_place, in_place) == c
        np.testing.assert_array_equal(in_place, out)


def test_all_ruled_out_gives_minus_infinity_and_no_nan():
    l = np.full(5, -np.inf)
    out = np.zeros(5)
    assert particles.log_normalise(l, out) == -np.inf
    np.testing.assert_array_equal(out, np.zeros(5))  # left as it was
    assert particles.logsumexp(l) == -np.inf
    assert particles.log_ess(l) == -np.inf


def test_reweighting_kernel_is_the_reference_reweighting():
    """likelihood.reweight_frames (Numba, uses log_normalise) against the same reweighting done
    with NumPy/SciPy from the per-frame log likelihoods of random particles."""
    rng = np.random.default_rng(7)
    n, m = 512, 6
    theta = np.column_stack([rng.uniform(0.0, 4.0, n), np.log(rng.uniform(0.2, 2.0, n)),
                             np.log(rng.uniform(0.005, 0.05, n)), rng.uniform(0.8, 1.2, n), np.ones(n)])
    t = np.arange(m) * 0.5 + 1.0
    t_lo, t_hi = t - 0.15, t + 0.15
    y = np.clip(1.0 - np.exp(-0.6 * (t - 2.0)), 0.0, None) + rng.normal(0, 0.02, m)
    sig2 = np.full(m, 0.02 ** 2)
    base = np.log(rng.dirichlet(np.ones(n)))
    loglik = np.zeros(n)
    logw = np.empty(n)
    c = reweight_frames(0, theta, 2, m, t_lo, t_hi, y, sig2, NOISE_NORMAL, 4.0, loglik, base, logw)

    per_frame = np.zeros(n)
    for j in range(2, m):
        out = np.empty(n)
        frame_loglik(0, theta, t_lo[j], t_hi[j], y[j], sig2[j], NOISE_NORMAL, 4.0, out)
        per_frame += np.where(np.isnan(out), -np.inf, out)
    np.testing.assert_allclose(loglik, per_frame, rtol=1e-12)
    assert c == pytest.approx(scipy.special.logsumexp(base + per_frame), rel=1e-12)
    np.testing.assert_allclose(np.exp(logw), scipy.special.softmax(base + per_frame), rtol=1e-9, atol=1e-300)
