"""Observation-model kernels vs NumPy/SciPy references on random inputs."""

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from inference import likelihood as lk
from inference.models import DOMAIN_END, MODEL_NAMES, alpha_numpy, model_code
from inference.smc import FrameHistory


def exposure_mean_reference(name, n, t0, k, lo, hi):
    if hi <= lo:
        return float(alpha_numpy(name, k * (lo - t0), n))
    pts = [p for p in (t0, t0 + DOMAIN_END[name] / k) if lo < p < hi]
    val, _ = scipy.integrate.quad(lambda t: float(alpha_numpy(name, k * (t - t0), n)), lo, hi,
                                  points=pts or None, limit=200, epsabs=1e-13, epsrel=1e-11)
    return val / (hi - lo)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_exposure_mean_matches_adaptive_quadrature(name):
    rng = np.random.default_rng(20 + model_code(name))
    code = model_code(name)
    for _ in range(60):
        t0 = rng.uniform(0, 10)
        k = math.exp(rng.uniform(math.log(0.05), math.log(20)))
        n = rng.uniform(0.5, 4)
        t = rng.uniform(t0 - 1, t0 + 3 / k)
        e = rng.choice([0.0, rng.uniform(0.001, 0.5), rng.uniform(0.5, 3)])
        got = lk.exposure_mean_alpha(code, n, t0, k, t - e / 2, t + e / 2)
        ref = exposure_mean_reference(name, n, t0, k, t - e / 2, t + e / 2)
        assert abs(got - ref) < 2e-6, (name, t0, k, n, t, e, got, ref)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_closed_form_integrals_match_gauss_legendre(name):
    """Where an antiderivative is used, it equals the Gauss-Legendre rule it replaced, from the
    onset to deep saturation (x up to 40) and for tiny ranges."""
    code = model_code(name)
    rng = np.random.default_rng(90 + code)
    xs = min(lk.saturation_x(code, 2.0), 40.0)
    for _ in range(200):
        a = rng.choice([0.0, rng.uniform(0, xs), xs * rng.uniform(0, 1e-6)])
        b = min(xs, a + rng.choice([rng.uniform(0, xs), rng.uniform(0, 1e-7) + 1e-12]))
        if not b > a:
            continue
        exact = lk.closed_form_integral(code, a, b)
        if math.isnan(exact):
            if name in ("A2", "D2") and b - a < 1e-4:  # their antiderivative differences: from 1e-4 up
                continue
            assert name in ("A3", "A4", "An", "D4")
            return
        quadrature = lk.integral_gauss_legendre(code, 2.0, a, b, lk.saturation_x(code, 2.0))
        # what the likelihood uses is the mean over the range: compare integral / (b - a); the
        # Gauss-Legendre rule itself is good to ~1e-11 at D2's logarithmic end point
        tolerance = 1e-10 if name == "D2" else 1e-12
        assert abs(exact - quadrature) <= tolerance * (b - a), (name, a, b, exact, quadrature)


def make_history(rng, m, homo, with_exposure):
    h = FrameHistory(capacity=8)  # forces growth
    t = np.cumsum(rng.uniform(0.2, 0.4, m))
    for j in range(m):
        e = rng.uniform(0.0, 0.2) if with_exposure else 0.0
        sigma = 0.02 if homo else rng.uniform(0.005, 0.05)
        h.append(j * 2 + 1, t[j], e, rng.normal(0.5, 0.5), sigma)
    return h


def frame_reference(name, p, lo, hi, y, sig2, kind, nu):
    t0, k, s, A, n = p[0], math.exp(p[1]), math.exp(p[2]), p[3], p[4]
    mu = A * exposure_mean_reference(name, n, t0, k, lo, hi)
    scale = math.sqrt(sig2 + s * s)
    if kind == lk.NOISE_NORMAL:
        return scipy.stats.norm.logpdf(y, mu, scale)
    return scipy.stats.t.logpdf(y, nu, mu, scale)


def random_particles(rng, count, t_end):
    return np.ascontiguousarray(np.column_stack([
        rng.uniform(-1, t_end + 1, count), rng.uniform(math.log(0.05), math.log(10), count),
        rng.uniform(math.log(1e-3), math.log(0.3), count), rng.uniform(0.5, 1.2, count),
        rng.uniform(0.5, 4, count)]))


@pytest.mark.parametrize("name", ["F1", "F3", "An", "R3", "D2", "D4"])
@pytest.mark.parametrize("kind", [lk.NOISE_NORMAL, lk.NOISE_STUDENT])
@pytest.mark.parametrize("homo", [True, False])
def test_history_and_frame_loglik_match_reference(name, kind, homo):
    rng = np.random.default_rng(hash((name, kind, homo)) % 2**32)
    h = make_history(rng, 24, homo, with_exposure=(name != "F3"))
    assert h.homo_var == (0.02**2 if homo else -1.0)
    params = random_particles(rng, 24, h.t_mid[h.m - 1])
    code, nu = model_code(name), 4.0
    per_frame = np.array([[frame_reference(name, p, h.t_lo[j], h.t_hi[j], h.y[j], h.sig2[j], kind, nu)
                           for j in range(h.m)] for p in params])
    out = np.empty(len(params))
    lk.frame_loglik(code, params, h.t_lo[7], h.t_hi[7], h.y[7], h.sig2[7], kind, nu, out)
    np.testing.assert_allclose(out, per_frame[:, 7], rtol=1e-7, atol=1e-6)
    # (m, m_end, lam): frames [0, m) whole, frames [m, m_end) to the power lam (a tempered batch)
    for m, m_end, lam in ((h.m, h.m, 0.0), (20, 21, 0.3), (0, 1, 0.7), (5, 5, 0.0), (3, 17, 0.45), (0, h.m, 0.2),
                          (10, h.m, 1.0), (8, 12, 0.0)):
        lk.history_loglik(code, params, m, m_end, lam, h.t_lo, h.t_hi, h.y, h.sig2, h.cy, h.cy2,
                          h.homo_var, kind, nu, out)
        ref = per_frame[:, :m].sum(axis=1) + lam * per_frame[:, m:m_end].sum(axis=1)
        np.testing.assert_allclose(out, ref, rtol=1e-7, atol=1e-5)


@pytest.mark.parametrize("kind", [lk.NOISE_NORMAL, lk.NOISE_STUDENT])
def test_null_frames_loglik_matches_reference(kind):
    """"No reaction": every frame has mean 0; one term per scatter s of the grid."""
    rng = np.random.default_rng(5)
    h = make_history(rng, 15, homo=False, with_exposure=True)
    log_s = rng.uniform(math.log(1e-3), math.log(0.5), 9)
    out = np.full(9, 2.5)
    lk.null_frames_loglik(log_s, 3, 12, h.y, h.sig2, kind, 4.0, out)
    for g, u in enumerate(log_s):
        var = h.sig2[3:12] + math.exp(2 * u)
        if kind == lk.NOISE_NORMAL:
            ref = scipy.stats.norm.logpdf(h.y[3:12], 0.0, np.sqrt(var)).sum()
        else:
            ref = scipy.stats.t.logpdf(h.y[3:12], 4.0, 0.0, np.sqrt(var)).sum()
        assert out[g] == pytest.approx(2.5 + ref, rel=1e-10)


def test_alpha_curves_match_numpy():
    rng = np.random.default_rng(3)
    params = random_particles(rng, 20, 10.0)
    times = np.linspace(0, 12, 50)
    out = np.empty((20, 50))
    lk.alpha_curves(model_code("An"), params, times, out)
    for i, p in enumerate(params):
        ref = p[3] * alpha_numpy("An", math.exp(p[1]) * (times - p[0]), p[4])
        np.testing.assert_allclose(out[i], ref, atol=1e-14)


def test_history_rejects_out_of_order_and_bad_frames():
    h = FrameHistory()
    h.append(0, 1.0, 0.1, 0.0, None)
    with pytest.raises(ValueError, match="time order"):
        h.append(1, 0.5, 0.1, 0.0, None)
    with pytest.raises(ValueError, match="finite"):
        h.append(2, 2.0, 0.1, float("nan"), None)
    with pytest.raises(ValueError, match="already assimilated"):
        h.append(0, 3.0, 0.1, 0.0, None)
    with pytest.raises(ValueError, match="sigma"):
        h.append(3, 3.0, 0.1, 0.0, -1.0)


def test_serial_and_parallel_kernels_compute_the_same_numbers():
    """frame_loglik / history_loglik are one body compiled twice (prange serial and parallel)."""
    rng = np.random.default_rng(11)
    n_frames, n_particles = 20, 200
    t_lo = np.arange(n_frames) / 3.0
    t_hi = t_lo + 0.3
    y = np.clip(rng.normal(0.2, 0.3, n_frames), 0, 1)
    sig2 = np.full(n_frames, 0.02 ** 2)
    cy = np.concatenate([[0.0], np.cumsum(y)])
    cy2 = np.concatenate([[0.0], np.cumsum(y * y)])
    params = np.column_stack([rng.uniform(0, 6, n_particles), rng.normal(-0.5, 0.5, n_particles),
                              np.log(rng.uniform(0.005, 0.1, n_particles)), rng.uniform(0.8, 1.1, n_particles),
                              rng.uniform(0.5, 4, n_particles)])
    for kind in (lk.NOISE_NORMAL, lk.NOISE_STUDENT):
        serial, parallel = np.empty(n_particles), np.empty(n_particles)
        lk.history_loglik(model_code("F1"), params, n_frames - 4, n_frames, 0.4, t_lo, t_hi, y, sig2,
                          cy, cy2, 0.02 ** 2, kind, 4.0, serial)
        lk.history_loglik_parallel(model_code("F1"), params, n_frames - 4, n_frames, 0.4, t_lo, t_hi, y, sig2,
                                   cy, cy2, 0.02 ** 2, kind, 4.0, parallel)
        np.testing.assert_allclose(parallel, serial, rtol=1e-12)
        lk.frame_loglik(model_code("A2"), params, t_lo[5], t_hi[5], y[5], sig2[5], kind, 4.0, serial)
        lk.frame_loglik_parallel(model_code("A2"), params, t_lo[5], t_hi[5], y[5], sig2[5], kind, 4.0, parallel)
        np.testing.assert_allclose(parallel, serial, rtol=1e-12)
