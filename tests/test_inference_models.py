"""Kinetic models: alpha(x) inverts Khawam & Flanagan's g(alpha) = x; Numba vs NumPy; W_-1."""

import math

import numpy as np
import pytest
import scipy.special

from inference.models import (DOMAIN_END, MODEL_NAMES, alpha_numpy, alpha_of_x, integral_g, lambertw_m1,
                              model_code, saturation_x)

N_FREE = 2.7  # Avrami exponent used for An


def random_x(rng, name):
    end = DOMAIN_END[name]
    top = 5.0 if math.isinf(end) else end
    return np.concatenate([rng.uniform(0.0, top, 400), top * 10 ** rng.uniform(-9, 0, 200)])


def test_model_table_order():
    assert MODEL_NAMES == ("F1", "F2", "F3", "A2", "A3", "A4", "An", "R2", "R3",
                           "D1", "D2", "D3", "D4", "P2", "P3", "P4")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_alpha_inverts_integral_rate_law(name):
    rng = np.random.default_rng(model_code(name))
    x = random_x(rng, name)
    a = np.array([alpha_of_x(model_code(name), xi, N_FREE) for xi in x])
    inside = a < 1.0 - 1e-9  # g is ill-conditioned where alpha rounds to 1
    assert inside.sum() > 300
    np.testing.assert_allclose(integral_g(name, a[inside], N_FREE), x[inside], rtol=1e-8, atol=1e-14)
    assert np.all((a >= 0.0) & (a <= 1.0))
    assert np.all(np.diff(a[np.argsort(x)]) >= -1e-15), "alpha must be nondecreasing in x"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_numba_matches_numpy_and_domain_limits(name):
    rng = np.random.default_rng(100 + model_code(name))
    x = np.concatenate([rng.uniform(-2.0, 3.0, 500), [0.0, 1.0 / 3.0, 1.0, 1.5, 40.0, 1e6]])
    code = model_code(name)
    nb = np.array([alpha_of_x(code, xi, N_FREE) for xi in x])
    np.testing.assert_allclose(nb, alpha_numpy(name, x, N_FREE), rtol=0, atol=1e-11)
    assert np.all(nb[x <= 0] == 0.0)
    end = DOMAIN_END[name]
    if math.isfinite(end):
        assert np.all(nb[x >= end] == 1.0)
    xs = saturation_x(code, N_FREE)
    if math.isfinite(xs):
        assert alpha_of_x(code, xs, N_FREE) == 1.0
        assert alpha_of_x(code, xs * 0.9, N_FREE) < 1.0 or xs == end


def test_lambert_w_minus_one_matches_scipy():
    rng = np.random.default_rng(7)
    z = np.concatenate([-1 / math.e + rng.uniform(1e-6, 1 / math.e, 2000), -(10 ** rng.uniform(-300, -1, 200))])
    ours = np.array([lambertw_m1(zi) for zi in z])
    np.testing.assert_allclose(ours, np.real(scipy.special.lambertw(z, k=-1)), rtol=1e-9)
    np.testing.assert_allclose(ours * np.exp(ours), z, rtol=1e-12, atol=1e-300)


def test_lambert_w_minus_one_near_branch_point():
    # scipy loses accuracy within ~1e-6 of -1/e; check the defining equation and the series
    # W_-1(-1/e + d) = -1 - p - p^2/3 - ..., p = sqrt(2 e d)
    d = 10 ** np.random.default_rng(8).uniform(-15, -6, 300)
    z = -1 / math.e + d
    ours = np.array([lambertw_m1(zi) for zi in z])
    np.testing.assert_allclose(ours * np.exp(ours), z, rtol=1e-15)
    p = np.sqrt(2 * math.e * ((z + 1 / math.e)))  # the d actually represented in z
    assert np.all(np.abs(ours - (-1 - p - p * p / 3)) <= 1e-7 + p**3)
    assert abs(lambertw_m1(-1 / math.e) + 1.0) < 1e-7
    assert math.isnan(lambertw_m1(-1.0)) and math.isnan(lambertw_m1(0.5))
    assert lambertw_m1(0.0) == -math.inf


def test_d2_small_x_keeps_relative_precision():
    # g_D2(alpha) ~ alpha^2 / 2 for small alpha -> alpha ~ sqrt(2 x)
    for x in (1e-12, 1e-8, 1e-4):
        a = alpha_of_x(model_code("D2"), x, 0.0)
        assert abs(a / math.sqrt(2 * x) - 1) < 2 * math.sqrt(x) + 1e-12


def test_alpha_numpy_needs_n_for_an_and_known_names():
    with pytest.raises(ValueError, match="exponent"):
        alpha_numpy("An", [0.5])
    with pytest.raises(ValueError, match="unknown kinetic model"):
        alpha_numpy("Z9", [0.5])
