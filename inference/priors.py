"""Proper priors of the kinetic parameters (docs/design.md, section 4, "Observation model").

Parameters and their sampling coordinates (the SMC works in these coordinates):

=====  ======================  ===========================  =====================
name   meaning                 prior                        sampled as
=====  ======================  ===========================  =====================
t0     onset time (s)          uniform on [t_lo, t_hi]      t0
k      rate constant (1/s)     log-uniform on [lo, hi]      log k
s      extra scatter on alpha  log-uniform on [lo, hi]      log s
A      final extent            uniform on [lo, hi]          A
n      Avrami exponent (An)    uniform on [lo, hi]          n
=====  ======================  ===========================  =====================

Defaults: t0 over the series window [t_lo, t_hi] (t_lo = gas-introduction time ts when
known, else 0; t_hi = series end), k in [0.01, 100] 1/s, s in [1e-3, 0.5], A in
[0.5, 1.2], n in [0.5, 4].  Any parameter can be fixed (a point mass), which removes it
from sampling.  Because the priors are uniform in the sampling coordinates, the prior
density there is constant inside the box and zero outside.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

PARAM_NAMES: tuple[str, ...] = ("t0", "k", "s", "A", "n")
LOG_PARAMS = frozenset({"k", "s"})
PARAM_UNITS = {"t0": "s", "k": "1/s", "s": "alpha", "A": "alpha", "n": "1"}

DEFAULT_K = (0.01, 100.0)
DEFAULT_S = (1e-3, 0.5)
DEFAULT_A = (0.5, 1.2)
DEFAULT_N = (0.5, 4.0)


def _check_range(name: str, lo: float, hi: float) -> tuple[float, float]:
    try:
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"prior {name}: bounds must be numbers, got {lo!r}, {hi!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"prior {name}: bounds must be finite, got [{lo}, {hi}]")
    if not lo < hi:
        raise ValueError(f"prior {name}: lower bound {lo} must be below upper bound {hi}")
    if name in LOG_PARAMS and lo <= 0.0:
        raise ValueError(f"prior {name}: log-uniform bounds must be positive, got [{lo}, {hi}]")
    return lo, hi


@dataclasses.dataclass(frozen=True)
class Priors:
    """Box priors; ``t0`` must be set (seconds from series start) before sampling."""

    t0: tuple[float, float] | None = None
    k: tuple[float, float] = DEFAULT_K
    s: tuple[float, float] = DEFAULT_S
    A: tuple[float, float] = DEFAULT_A
    n: tuple[float, float] = DEFAULT_N
    fixed: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in PARAM_NAMES:
            rng = getattr(self, name)
            if rng is None:
                continue
            object.__setattr__(self, name, _check_range(name, *rng))
        fixed = {}
        for name, value in dict(self.fixed).items():
            if name not in PARAM_NAMES:
                raise ValueError(f"cannot fix unknown parameter {name!r}; known: {', '.join(PARAM_NAMES)}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"fixed value of {name} must be finite, got {value}")
            if name in LOG_PARAMS and value <= 0.0:
                raise ValueError(f"fixed value of {name} must be positive, got {value}")
            fixed[name] = value
        object.__setattr__(self, "fixed", fixed)

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_series(cls, t_end_s: float, gas_time_s: float | None = None, **overrides) -> "Priors":
        """Default priors with t0 uniform on [ts or 0, t_end_s] (seconds)."""
        t_lo = 0.0 if gas_time_s is None else float(gas_time_s)
        if "t0" not in overrides:
            overrides["t0"] = (t_lo, float(t_end_s))
        return cls(**overrides)

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], base: "Priors | None" = None) -> "Priors":
        """Priors from a TOML-like table, e.g. ``{"k": [0.01, 100], "fixed": {"A": 1.0}}``.

        Keys: t0, k, s, A, n (two-element lists [lo, hi]) and ``fixed`` (name -> value).
        Unset keys keep the values of ``base`` (default: the defaults).
        """
        base = base or cls()
        values = {name: getattr(base, name) for name in PARAM_NAMES}
        fixed = dict(base.fixed)
        for key, value in table.items():
            if key in ("fixed", "fix"):
                if not isinstance(value, Mapping):
                    raise ValueError(f"[inference.priors] {key} must be a table name = value")
                fixed.update({str(k): v for k, v in value.items()})
                continue
            if key not in PARAM_NAMES:
                raise ValueError(f"[inference.priors] unknown key {key!r}; known: {', '.join(PARAM_NAMES)}, fixed")
            if isinstance(value, (int, float)):
                fixed[key] = value
                continue
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError(f"[inference.priors] {key} must be [low, high], got {value!r}")
            values[key] = (value[0], value[1])
        return cls(**values, fixed=fixed)

    def with_t0_window(self, t_lo: float, t_hi: float) -> "Priors":
        return dataclasses.replace(self, t0=(t_lo, t_hi))

    # ------------------------------------------------------------------ use
    def require_t0(self) -> tuple[float, float]:
        if self.t0 is None:
            raise ValueError("the t0 prior window is not set: give Priors(t0=(t_lo, t_hi)) in seconds")
        return self.t0

    def bounds(self, name: str) -> tuple[float, float]:
        """Bounds of ``name`` in sampling coordinates (log for k and s)."""
        lo, hi = self.require_t0() if name == "t0" else getattr(self, name)
        if name in LOG_PARAMS:
            return math.log(lo), math.log(hi)
        return lo, hi

    def sampling_value(self, name: str, value: float) -> float:
        return math.log(value) if name in LOG_PARAMS else float(value)

    def to_dict(self) -> dict:
        """JSON-serialisable statement of the priors (written into every result)."""
        out: dict[str, Any] = {}
        for name in PARAM_NAMES:
            rng = getattr(self, name)
            if name in self.fixed:
                out[name] = {"distribution": "fixed", "value": self.fixed[name], "unit": PARAM_UNITS[name]}
            elif rng is None:
                out[name] = None
            else:
                out[name] = {
                    "distribution": "log-uniform" if name in LOG_PARAMS else "uniform",
                    "low": rng[0], "high": rng[1], "unit": PARAM_UNITS[name],
                }
        out["n"]["applies_to"] = ["An"]
        return out

    def sample(self, names: tuple[str, ...], size: int, rng: np.random.Generator) -> np.ndarray:
        """Prior draws in sampling coordinates, shape (size, len(names))."""
        out = np.empty((size, len(names)))
        for j, name in enumerate(names):
            lo, hi = self.bounds(name)
            out[:, j] = rng.uniform(lo, hi, size)
        return out


def parse_prior_option(text: str) -> tuple[str, tuple[float, float]]:
    """Parse ``NAME=LO:HI`` (command line ``--prior``), e.g. ``k=0.01:100``."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or name not in PARAM_NAMES:
        raise ValueError(f"--prior {text!r}: expected NAME=LO:HI with NAME one of {', '.join(PARAM_NAMES)}")
    lo, sep2, hi = rest.partition(":")
    if not sep2:
        raise ValueError(f"--prior {text!r}: expected NAME=LO:HI, e.g. k=0.01:100")
    try:
        return name, _check_range(name, float(lo), float(hi))
    except ValueError as exc:
        raise ValueError(f"--prior {text!r}: {exc}") from None


def parse_fix_option(text: str) -> tuple[str, float]:
    """Parse ``NAME=VALUE`` (command line ``--fix``), e.g. ``A=1``."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or name not in PARAM_NAMES:
        raise ValueError(f"--fix {text!r}: expected NAME=VALUE with NAME one of {', '.join(PARAM_NAMES)}")
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"--fix {text!r}: {value!r} is not a number") from None
    if not math.isfinite(v) or (name in LOG_PARAMS and v <= 0):
        raise ValueError(f"--fix {text!r}: value must be finite{' and positive' if name in LOG_PARAMS else ''}")
    return name, v
