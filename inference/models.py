"""Solid-state kinetic models alpha(x), x = k (t - t0) >= 0 (Khawam & Flanagan 2006).

Each model is the inverse of its integral rate law g(alpha) = x. ``alpha`` is the
transformed fraction (dimensionless, 0..1), ``x`` is dimensionless (k in 1/s times a
time in seconds).  Models with a finite domain reach alpha = 1 at ``x = domain end``
and stay there.

Two implementations share the table below:

* ``alpha_of_x(code, x, n)``: a scalar Numba kernel used by the likelihood.  ``code`` is
  the index of the model in ``MODEL_NAMES``; ``n`` is the Avrami exponent (used only by
  ``An``; the other models carry their exponent in the code).
* ``alpha_numpy(name, x, n=None)``: plain NumPy/SciPy, vectorised, in beamkin.kinetics (with
  the table), shared with the simulator and used as the reference in tests.
"""

from __future__ import annotations

import math

import numba

from beamkin.kinetics import (DOMAIN_END, MODEL_CODES, MODEL_DESCRIPTIONS, MODEL_EXPONENT, MODEL_NAMES, X_ROUNDS_TO_ONE,
                              alpha_numpy, has_free_exponent, integral_g, model_code)

__all__ = ["DOMAIN_END", "MODEL_CODES", "MODEL_DESCRIPTIONS", "MODEL_EXPONENT", "MODEL_NAMES", "X_ROUNDS_TO_ONE",
           "alpha_numpy", "has_free_exponent", "integral_g", "model_code", "alpha_of_x", "saturation_x", "lambertw_m1"]


# --------------------------------------------------------------------------- Numba kernels

@numba.njit(cache=True, nogil=True)
def _solve_u(c):
    """Root u >= 0 of u - log1p(u) = c (c >= 0), by Halley iteration.

    This is the Lambert W_-1 branch in disguise: W_-1(z) = -1 - u with c = -1 - log(-z).
    """
    if c <= 0.0:
        return 0.0
    if c < 1.0:
        p = math.sqrt(2.0 * c)
        u = p + p * p / 3.0 + p * p * p / 36.0
    else:
        u = c + math.log1p(c) + 1.0
    for _ in range(60):
        f = u - math.log1p(u) - c
        d1 = u / (1.0 + u)
        d2 = 1.0 / ((1.0 + u) * (1.0 + u))
        den = 2.0 * d1 * d1 - f * d2
        if den == 0.0:
            break
        step = 2.0 * f * d1 / den
        u_new = u - step
        if u_new < 0.0:
            u_new = 0.5 * u
        if abs(u_new - u) <= 1e-15 * max(1.0, u):
            u = u_new
            break
        u = u_new
    return u


@numba.njit(cache=True, nogil=True)
def lambertw_m1(z):
    """Lower branch W_-1(z) of the Lambert W function for -1/e <= z < 0.

    Solves w exp(w) = z with w <= -1 (Halley iteration on w = -1 - u). NaN outside the
    domain; -inf at z = 0.
    """
    if not (z >= -1.0 / math.e) or z > 0.0:
        return math.nan
    if z == 0.0:
        return -math.inf
    c = -1.0 - math.log(-z)
    return -1.0 - _solve_u(max(c, 0.0))


@numba.njit(cache=True, nogil=True)
def alpha_d2(x):
    """D2: alpha = 1 - exp(1 + W_-1((x - 1)/e)), alpha = 1 for x >= 1.

    Computed as alpha = 1 - exp(-u) with u - log1p(u) = -log1p(-x), which is W_-1 with
    the argument written so that small x keeps full relative precision.
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    u = _solve_u(-math.log1p(-x))
    return -math.expm1(-u)


@numba.njit(cache=True, nogil=True)
def alpha_d4(x):
    """D4: alpha = 1 - v^3, v = 1/2 + cos(arccos(6x - 1)/3 - 2 pi/3); alpha = 1 for x >= 1/3."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0 / 3.0:
        return 1.0
    arg = min(1.0, max(-1.0, 6.0 * x - 1.0))
    v = 0.5 + math.cos(math.acos(arg) / 3.0 - 2.0 * math.pi / 3.0)
    v = max(v, 0.0)
    return 1.0 - v * v * v


@numba.njit(cache=True, nogil=True)
def alpha_of_x(code, x, n):
    """alpha(x) of model ``code`` (index in MODEL_NAMES); x <= 0 gives 0.

    ``n`` is the Avrami exponent of the free-exponent model An (ignored otherwise).
    """
    if not (x > 0.0):
        return 0.0
    if code == 0:  # F1
        return -math.expm1(-x)
    elif code == 1:  # F2
        return x / (1.0 + x)
    elif code == 2:  # F3
        return 1.0 - 1.0 / math.sqrt(1.0 + 2.0 * x)
    elif code == 3:  # A2
        return -math.expm1(-x * x)
    elif code == 4:  # A3
        return -math.expm1(-x * x * x)
    elif code == 5:  # A4
        x2 = x * x
        return -math.expm1(-x2 * x2)
    elif code == 6:  # An
        return -math.expm1(-(x ** n))
    elif code == 7:  # R2
        if x >= 1.0:
            return 1.0
        r = 1.0 - x
        return 1.0 - r * r
    elif code == 8:  # R3
        if x >= 1.0:
            return 1.0
        r = 1.0 - x
        return 1.0 - r * r * r
    elif code == 9:  # D1
        if x >= 1.0:
            return 1.0
        return math.sqrt(x)
    elif code == 10:  # D2
        return alpha_d2(x)
    elif code == 11:  # D3
        if x >= 1.0:
            return 1.0
        r = 1.0 - math.sqrt(x)
        return 1.0 - r * r * r
    elif code == 12:  # D4
        return alpha_d4(x)
    elif code == 13:  # P2
        if x >= 1.0:
            return 1.0
        return x * x
    elif code == 14:  # P3
        if x >= 1.0:
            return 1.0
        return x * x * x
    elif code == 15:  # P4
        if x >= 1.0:
            return 1.0
        x2 = x * x
        return x2 * x2
    return math.nan


@numba.njit(cache=True, nogil=True)
def saturation_x(code, n):
    """Smallest x beyond which alpha(x) == 1.0 exactly in float64 (inf if never).

    Finite-domain models: their domain end.  F1 and the Avrami models: 1 - exp(-x^n)
    rounds to 1.0 for x^n >= 37.5.  F2 and F3 approach 1 algebraically: inf.
    """
    if code == 0:
        return 37.5
    elif code == 3:
        return math.sqrt(37.5)
    elif code == 4:
        return 37.5 ** (1.0 / 3.0)
    elif code == 5:
        return 37.5 ** 0.25
    elif code == 6:
        return 37.5 ** (1.0 / n)
    elif code == 1 or code == 2:
        return math.inf
    elif code == 12:
        return 1.0 / 3.0
    return 1.0
