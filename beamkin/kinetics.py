"""Solid-state kinetic models alpha(x), x = k (t - t0) >= 0 (Khawam & Flanagan 2006): the table
and the plain NumPy curves that every part of beamkin shares (docs/design.md, "The kinetic models").

Each model is the inverse of its integral rate law g(alpha) = x. ``alpha`` is the transformed
fraction (dimensionless, 0..1), ``x`` is dimensionless (k in 1/s times a time in seconds). Models
with a finite domain reach alpha = 1 at ``x = domain end`` and stay there.

* ``alpha_numpy(name, x, n=None)``: vectorised NumPy/SciPy; the simulator draws its experiments
  with it, and tests use it as the reference for the inference's Numba kernels
  (inference.models.alpha_of_x).
* ``integral_g(name, alpha, n=None)``: g(alpha), for tests.
"""


from __future__ import annotations

import math

import numpy as np
import scipy.special

MODEL_NAMES: tuple[str, ...] = (
    "F1", "F2", "F3", "A2", "A3", "A4", "An", "R2", "R3",
    "D1", "D2", "D3", "D4", "P2", "P3", "P4",
)
MODEL_CODES: dict[str, int] = {name: i for i, name in enumerate(MODEL_NAMES)}

MODEL_DESCRIPTIONS: dict[str, str] = {
    "F1": "first order", "F2": "second order", "F3": "third order",
    "A2": "Avrami-Erofeev n=2", "A3": "Avrami-Erofeev n=3", "A4": "Avrami-Erofeev n=4",
    "An": "Avrami-Erofeev, free n", "R2": "contracting area", "R3": "contracting volume",
    "D1": "1D diffusion", "D2": "2D diffusion", "D3": "Jander 3D diffusion",
    "D4": "Ginstling-Brounshtein", "P2": "power law n=2", "P3": "power law n=3",
    "P4": "power law n=4",
}

#: Fixed exponent of each model (NaN where the model has none or it is free).
MODEL_EXPONENT: dict[str, float] = {
    "A2": 2.0, "A3": 3.0, "A4": 4.0, "P2": 2.0, "P3": 3.0, "P4": 4.0,
}

#: x at which alpha reaches 1 (inf: never, exactly).
DOMAIN_END: dict[str, float] = {
    "F1": math.inf, "F2": math.inf, "F3": math.inf, "A2": math.inf, "A3": math.inf,
    "A4": math.inf, "An": math.inf, "R2": 1.0, "R3": 1.0, "D1": 1.0, "D2": 1.0,
    "D3": 1.0, "D4": 1.0 / 3.0, "P2": 1.0, "P3": 1.0, "P4": 1.0,
}

# exp(-X_ROUNDS_TO_ONE) < 2**-54: beyond it 1 - exp(-x) is exactly 1.0 in float64.
X_ROUNDS_TO_ONE = 37.5


def model_code(name: str) -> int:
    """Index of a model name in MODEL_NAMES; ValueError for an unknown name."""
    try:
        return MODEL_CODES[name]
    except KeyError:
        raise ValueError(f"unknown kinetic model {name!r}; known: {', '.join(MODEL_NAMES)}") from None


def has_free_exponent(name: str) -> bool:
    return name == "An"


def alpha_numpy(name: str, x, n: float | None = None) -> np.ndarray:
    """alpha(x) for model ``name`` with plain NumPy (x dimensionless, any shape; x <= 0 -> 0).

    ``n`` is required for ``An`` and ignored otherwise.
    """
    model_code(name)
    x = np.asarray(x, dtype=float)
    xp = np.clip(x, 0.0, None)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if name == "F1":
            a = -np.expm1(-xp)
        elif name == "F2":
            a = xp / (1.0 + xp)
        elif name == "F3":
            a = 1.0 - (1.0 + 2.0 * xp) ** -0.5
        elif name in ("A2", "A3", "A4", "An"):
            if name == "An":
                if n is None:
                    raise ValueError("model An needs the Avrami exponent n")
                expo = float(n)
            else:
                expo = MODEL_EXPONENT[name]
            a = -np.expm1(-(xp ** expo))
        else:
            xc = np.clip(xp, 0.0, DOMAIN_END[name])
            if name == "R2":
                a = 1.0 - (1.0 - xc) ** 2
            elif name == "R3":
                a = 1.0 - (1.0 - xc) ** 3
            elif name == "D1":
                a = np.sqrt(xc)
            elif name == "D2":
                z = (np.minimum(xc, 1.0 - 1e-300) - 1.0) / math.e
                w = np.real(scipy.special.lambertw(z, k=-1))
                a = 1.0 - np.exp(1.0 + w)
            elif name == "D3":
                a = 1.0 - (1.0 - np.sqrt(xc)) ** 3
            elif name == "D4":
                v = 0.5 + np.cos(np.arccos(np.clip(6.0 * xc - 1.0, -1, 1)) / 3.0 - 2.0 * math.pi / 3.0)
                a = 1.0 - np.clip(v, 0.0, None) ** 3
            else:  # P2, P3, P4
                a = xc ** MODEL_EXPONENT[name]
            a = np.where(xp >= DOMAIN_END[name], 1.0, a)
    return np.where(x > 0.0, a, 0.0)


def integral_g(name: str, alpha, n: float | None = None) -> np.ndarray:
    """Integral rate law g(alpha) = k t of Khawam & Flanagan (2006), Table 1."""
    model_code(name)
    a = np.asarray(alpha, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if name == "F1":
            return -np.log1p(-a)
        if name == "F2":
            return 1.0 / (1.0 - a) - 1.0
        if name == "F3":
            return 0.5 * ((1.0 - a) ** -2 - 1.0)
        if name in ("A2", "A3", "A4", "An"):
            expo = float(n) if name == "An" else MODEL_EXPONENT[name]
            return (-np.log1p(-a)) ** (1.0 / expo)
        if name == "R2":
            return 1.0 - (1.0 - a) ** 0.5
        if name == "R3":
            return 1.0 - (1.0 - a) ** (1.0 / 3.0)
        if name == "D1":
            return a ** 2
        if name == "D2":
            return (1.0 - a) * np.log1p(-a) + a
        if name == "D3":
            return (1.0 - (1.0 - a) ** (1.0 / 3.0)) ** 2
        if name == "D4":
            return 1.0 - 2.0 * a / 3.0 - (1.0 - a) ** (2.0 / 3.0)
        return a ** (1.0 / MODEL_EXPONENT[name])  # P2, P3, P4
