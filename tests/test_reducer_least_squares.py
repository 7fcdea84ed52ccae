"""reducer.least_squares: the Poisson-weighted least-squares kernels, each against a plain NumPy /
SciPy reference on random inputs."""
import numpy as np
import pytest
from scipy.optimize import nnls

from reducer.least_squares import (FIT_ERRORS, irls_linear_fit, irls_nonnegative_fit, model_floor,
                                   poisson_variance, variance_scale, weighted_linear_fit)


def reference_variance_scale(y, sigma):
    """g_i = sigma_i^2 / y_i where both are positive, their median elsewhere; half the median positive y."""
    pos = (y > 0) & (sigma > 0)
    g_median = float(np.median(sigma[pos] ** 2 / y[pos])) if pos.any() else 1.0
    g = np.where(pos, sigma * sigma / np.where(pos, y, 1.0), g_median)
    y_floor = 0.5 * float(np.median(y[pos])) if pos.any() else 1.0
    return g, y_floor


def random_pattern(rng, n):
    """Counts with empty and invalid bins: some y = 0, some sigma = 0, a few negative y."""
    gain = rng.uniform(0.2, 3.0)
    y = gain * rng.poisson(rng.uniform(0.0, 20.0, n)).astype(float)
    sigma = np.sqrt(gain * np.maximum(y, 0.0))
    sigma[rng.random(n) < 0.1] = 0.0
    y[rng.random(n) < 0.05] *= -1.0
    return y, sigma


def test_weighted_linear_fit_matches_numpy():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n, p = rng.integers(8, 60), rng.integers(1, 6)
        x = rng.normal(size=(n, p))
        y = rng.normal(size=n)
        var = rng.uniform(0.1, 5.0, n)
        c, cov, chi2 = weighted_linear_fit(x, y, var)
        w = 1 / np.sqrt(var)
        ref, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
        np.testing.assert_allclose(c, ref, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(cov, np.linalg.inv((x * w[:, None]).T @ (x * w[:, None])), rtol=1e-8)
        assert chi2 == pytest.approx(np.sum((y - x @ ref) ** 2 / var), rel=1e-8)


def test_irls_is_a_fixed_point_of_model_weighted_least_squares():
    """IRLS solution = WLS with var = g * model(solution) (checked with numpy lstsq)."""
    rng = np.random.default_rng(4)
    x = np.column_stack([np.exp(-np.linspace(-3, 3, 40) ** 2), np.ones(40)])
    for _ in range(5):
        g = rng.uniform(0.5, 2.0)
        mu = x @ np.array([200.0, 50.0])
        y = g * rng.poisson(mu / g)
        c, cov, _ = irls_linear_fit(x, y.astype(float), np.sqrt(g * np.maximum(y, 0)), 30)
        var = g * (x @ c)
        w = 1 / np.sqrt(var)
        ref, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
        np.testing.assert_allclose(c, ref, rtol=1e-6)



def test_variance_scale_matches_numpy():
    rng = np.random.default_rng(11)
    for _ in range(50):
        y, sigma = random_pattern(rng, int(rng.integers(1, 300)))
        g, y_floor = variance_scale(y, sigma)
        g_ref, y_floor_ref = reference_variance_scale(y, sigma)
        np.testing.assert_array_equal(g, g_ref)
        assert y_floor == y_floor_ref
    g, y_floor = variance_scale(np.zeros(5), np.ones(5))   # no positive bin: scale 1, floor 1
    np.testing.assert_array_equal(g, np.ones(5))
    assert y_floor == 1.0


def test_poisson_variance_and_model_floor_match_numpy():
    rng = np.random.default_rng(12)
    for _ in range(50):
        n = int(rng.integers(1, 300))
        g = rng.uniform(0.1, 4.0, n)
        model = rng.normal(5.0, 10.0, n)
        floor = model_floor(model)
        assert floor == 1e-3 * np.max(np.abs(model))
        np.testing.assert_array_equal(poisson_variance(g, model, floor), g * np.maximum(model, floor))


def test_irls_linear_fit_matches_a_numpy_reference():
    """The whole IRLS sequence: data-weighted pass, then model-weighted passes, each solved with lstsq."""
    rng = np.random.default_rng(13)
    for _ in range(20):
        n, p = int(rng.integers(20, 200)), int(rng.integers(1, 5))
        x = rng.uniform(0.0, 1.0, (n, p))
        y, sigma = random_pattern(rng, n)
        y = np.abs(y) + x @ rng.uniform(5.0, 50.0, p)
        sigma = np.where(sigma > 0, np.sqrt(y), 0.0)
        n_reweight = int(rng.integers(0, 4))
        g, y_floor = reference_variance_scale(y, sigma)
        var = g * np.maximum(y, y_floor)
        for it in range(n_reweight + 1):
            w = 1 / np.sqrt(var)
            ref, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
            model = x @ ref
            var_used = var
            var = g * np.maximum(model, 1e-3 * np.max(np.abs(model)))
        c, cov, chi2 = irls_linear_fit(x, y, sigma, n_reweight)
        np.testing.assert_allclose(c, ref, rtol=1e-8, atol=1e-10)
        xw = x / np.sqrt(var_used)[:, None]
        np.testing.assert_allclose(cov, np.linalg.inv(xw.T @ xw), rtol=1e-8)
        assert chi2 == pytest.approx(np.sum((y - x @ ref) ** 2 / var_used), rel=1e-8)


def test_unsolvable_systems_raise_the_fit_errors():
    x = np.column_stack([np.ones(10), np.ones(10)])   # two equal columns: singular normal equations
    with pytest.raises(np.linalg.LinAlgError):
        weighted_linear_fit(x, np.arange(10.0), np.ones(10))
    with pytest.raises(np.linalg.LinAlgError):
        irls_linear_fit(np.full((10, 1), np.nan), np.ones(10), np.ones(10), 2)
    with pytest.raises(ZeroDivisionError):
        weighted_linear_fit(np.ones((10, 1)), np.ones(10), np.zeros(10))
    assert np.linalg.LinAlgError in FIT_ERRORS and ZeroDivisionError in FIT_ERRORS


def test_irls_nonnegative_fit_matches_scipy_nnls():
    """Same reweighting with scipy's nnls in a plain loop (one true coefficient 0: the bound is active)."""
    rng = np.random.default_rng(14)
    for _ in range(20):
        n, p = int(rng.integers(30, 200)), int(rng.integers(2, 6))
        x = rng.uniform(0.0, 1.0, (n, p))
        truth = rng.uniform(5.0, 50.0, p)
        truth[0] = 0.0
        y = rng.poisson(x @ truth).astype(float)
        sigma = np.sqrt(y)
        n_reweight = int(rng.integers(0, 4))
        g, y_floor = reference_variance_scale(y, sigma)
        var = g * np.maximum(y, y_floor)
        for it in range(n_reweight + 1):
            w = 1 / np.sqrt(var)
            ref, _ = nnls(x * w[:, None], y * w, maxiter=50 * p)
            if it < n_reweight:
                model = x @ ref
                var = g * np.maximum(model, 1e-3 * np.max(np.abs(model)))
        coef, var_used = irls_nonnegative_fit(x, y, sigma, n_reweight)
        np.testing.assert_allclose(coef, ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(var_used, var, rtol=1e-12)
        assert np.all(coef >= 0)
