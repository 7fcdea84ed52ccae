"""Phase fraction alpha (loaded phase B) from 1D powder patterns, with Poisson uncertainties.

Peak method (default)
---------------------
Each phase is measured in a few 2theta windows. In window w the pattern is modelled as

    y(x) = a_A,w S_A,w(x) + a_B,w S_B,w(x) + b0 + b1 (x - x_w)

where S_P,w(x) = sum_k I_k pV(x; c_k, H_k, eta_k) / T_P,w is the composite pseudo-Voigt profile
of phase P's known lines near the window (fixed positions, widths and relative intensities I_k,
T_P,w = sum of I_k of the lines whose centres lie inside the window), so a_P,w is the
integrated intensity of those lines. A component appears only when the phase has a line centred
in the window. The model is linear in (a_A, a_B, b0, b1): a weighted linear least-squares fit
with Poisson weights, iterated (IRLS) with the variance predicted by the model,
var_i = g_i * model_i, g_i = sigma_i^2 / y_i (data-independent for pyFAI's Poisson model and 1
for raw counts), which removes the bias of data-derived weights at low counts. The covariance
of the coefficients is (X^T W X)^-1.

Line positions: per frame, each phase whose lines are detected strongly (summed area above
``position_min_snr`` sigma in the fit at the configured positions) gets a common relative shift
eps of sin(theta) (d -> d / (1 + eps)), chosen on a grid by minimum chi^2 and refined by a
parabola; a weaker phase keeps its configured positions (eps = 0), since a shift chosen from
noise would inflate its area. This absorbs lattice strain and geometry miscalibration without a
per-frame nonlinear optimiser. In 2D the line profiles are the integrator's exact bin responses
(sparse CSR rows of the window bins), which carry the pixel-centre aliasing of fine bins.

Determinism: the result for a frame depends on that frame and the configuration only, never on
the frames a worker happened to see before (no learned reference, no remembered shift), so any
number of reducer workers gives bit-identical fractions (docs/design.md; issue 11.3).

Amounts, with per-phase reference intensities R_P (integrated intensity per unit phase
fraction per unit relative intensity):

    amount_P = (sum_w a_P,w) / (R_P sum_w T_P,w),   alpha = amount_B / (amount_A + amount_B)

Only the ratio rho = R_B / R_A enters alpha (beam-intensity drift cancels). sigma_alpha follows
from the 2x2 covariance of (amount_A, amount_B) by the delta method:
var(alpha) = J C J^T, J = (-amount_B, amount_A) / (amount_A + amount_B)^2.
alpha is not clipped to [0, 1]: clipping would bias it near the ends.

Whole-pattern method
--------------------
Non-negative least squares of the pattern over a 2theta range against reference patterns of both
phases (per unit phase fraction: model patterns from beamkin.phases, or measured files) plus a
smooth non-negative background (Bernstein polynomials), IRLS weights as above; covariance from
the weighted design matrix of the phase columns and the active background columns.

References
----------
rho comes from configuration (``reference_ratio_b_to_a``), from absolute R_A and R_B
(``reference_scale_a``/``reference_scale_b``), or from two pure-phase reference patterns
(:meth:`PhaseFractionEstimator.calibrate_from_reference_patterns`, or ``beamkin phases``, which
writes the ratio into the TOML). With an absolute R_A (``reference_scale_a`` or the reference
patterns) the amounts are in units of R_A, and amount_A + amount_B is a beam-drift diagnostic
(about 1 while the beam is stable). R_A is not learned from the series' own frames: that would
make a frame's result depend on which earlier frames its worker saw.

Flagged results carry alpha = 0.0 and sigma_alpha = inf (never NaN): a consumer that forgets
to check ``status`` gives such a frame zero weight.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numba
import numpy as np

from reducer.integrate import Pattern, ReductionError
from beamkin.phases import Phase, PeakWindow, _pseudo_voigt_constants, pseudo_voigt_bin_average

logger = logging.getLogger(__name__)

__all__ = [
    "Line",
    "WindowSpec",
    "FractionConfig",
    "FractionResult",
    "PhaseFractionEstimator",
    "weighted_linear_fit",
    "irls_linear_fit",
    "windows_from_phases",
    "q_to_two_theta_deg",
    "load_reference_pattern",
    "shifted_center_deg",
]

FLAGGED_SIGMA = math.inf
#: a refined line shift is rounded to position_step_rel / SHIFT_SUBDIVISIONS (5e-5 by default: at
#: 2theta = 5 degrees, 0.00025 degrees, about 1 % of a line's FWHM)
SHIFT_SUBDIVISIONS = 10
#: off-grid shifts whose design columns are kept per phase
SHIFT_COLUMNS_CACHED = 32

#: keys of earlier versions whose behaviour made a frame's result depend on the frames seen before it
RETIRED_KEYS = {
    "learn_reference_frames": "R_A is no longer learned from pre-gas frames (results would depend on which "
                              "worker saw them); set reference_scale_a, reference_ratio_b_to_a or reference patterns",
    "position_search_every": "the line-shift search runs on every confident frame (a remembered shift would "
                             "make results depend on the number of workers)",
}


# ---------------------------------------------------------------------------------- kernels
@numba.njit(cache=True)
def weighted_linear_fit(design: np.ndarray, y: np.ndarray, var: np.ndarray):
    """Weighted least squares: minimise sum_i (y_i - X_i c)^2 / var_i.

    Returns (c, cov, chi2) with cov = (X^T W X)^-1, W = diag(1/var). Raises on a singular system
    (numba raises the LinAlgError of the failed inversion)."""
    n, p = design.shape
    xtwx = np.zeros((p, p))
    xtwy = np.zeros(p)
    for i in range(n):
        w = 1.0 / var[i]
        for a in range(p):
            xa = design[i, a] * w
            xtwy[a] += xa * y[i]
            for b in range(a, p):
                xtwx[a, b] += xa * design[i, b]
    for a in range(p):
        for b in range(a):
            xtwx[a, b] = xtwx[b, a]
    cov = np.linalg.inv(xtwx)
    c = cov @ xtwy
    chi2 = 0.0
    for i in range(n):
        r = y[i]
        for a in range(p):
            r -= design[i, a] * c[a]
        chi2 += r * r / var[i]
    return c, cov, chi2


@numba.njit(cache=True)
def irls_linear_fit(design: np.ndarray, y: np.ndarray, sigma: np.ndarray, n_reweight: int):
    """Linear fit with Poisson variance predicted by the model (iteratively reweighted LS).

    Variance scale per bin g_i = sigma_i^2 / y_i where y_i > 0 and sigma_i > 0 (for Poisson bins
    this does not depend on the counts), the median of those elsewhere. First pass:
    var_i = g_i * max(y_i, m), m = half the median positive y (so empty bins keep a weight);
    then n_reweight passes with var_i = g_i * max(model_i, 1e-3 max(model)).
    Returns (c, cov, chi2) of the last pass."""
    n = y.shape[0]
    var = np.empty(n)
    g = np.empty(n)
    pos = (y > 0) & (sigma > 0)
    if pos.sum() > 0:
        gmed = np.median(sigma[pos] ** 2 / y[pos])
        ymin = 0.5 * np.median(y[pos])
    else:
        gmed = 1.0
        ymin = 1.0
    for i in range(n):
        g[i] = sigma[i] ** 2 / y[i] if pos[i] else gmed
        var[i] = g[i] * max(y[i], ymin)
    c, cov, chi2 = weighted_linear_fit(design, y, var)
    for _ in range(n_reweight):
        model = design @ c
        floor = 1e-3 * np.max(np.abs(model))
        if floor <= 0:
            break
        for i in range(n):
            var[i] = g[i] * max(model[i], floor)
        c, cov, chi2 = weighted_linear_fit(design, y, var)
    return c, cov, chi2


def q_to_two_theta_deg(q_per_nm: np.ndarray, wavelength_A: float) -> np.ndarray:
    """2theta (degrees) from q (1/nm): q = 4 pi sin(theta) / lambda, lambda in nm = wavelength_A / 10."""
    s = np.asarray(q_per_nm, float) * (wavelength_A / 10.0) / (4.0 * math.pi)
    return np.degrees(2.0 * np.arcsin(np.clip(s, -1.0, 1.0)))


# ---------------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class Line:
    """One diffraction line: phase "A" or "B", centre and FWHM in degrees 2theta, pseudo-Voigt
    Lorentzian fraction eta, relative integrated intensity (per unit phase fraction)."""

    phase: str
    center_deg: float
    fwhm_deg: float
    relative_intensity: float
    eta: float = 0.3

    def __post_init__(self) -> None:
        if self.phase not in ("A", "B"):
            raise ReductionError(f"line phase must be 'A' or 'B', got {self.phase!r}")
        if not (self.fwhm_deg > 0 and math.isfinite(self.center_deg) and self.relative_intensity > 0
                and 0.0 <= self.eta <= 1.0):
            raise ReductionError(f"invalid line {self}: need fwhm > 0, intensity > 0, 0 <= eta <= 1")


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    """A 2theta window [lo_deg, hi_deg] owned by ``phase`` and the lines modelled inside it."""

    phase: str
    lo_deg: float
    hi_deg: float
    lines: tuple[Line, ...]

    def __post_init__(self) -> None:
        PeakWindow(self.phase, self.lo_deg, self.hi_deg)  # validates phase and bounds
        if not any(self._centred(l) for l in self.lines if l.phase == self.phase):
            raise ReductionError(f"window {self.phase} [{self.lo_deg}, {self.hi_deg}] deg has no line of its "
                                 "own phase centred inside it")

    def _centred(self, line: Line) -> bool:
        return self.lo_deg <= line.center_deg <= self.hi_deg

    def phases_present(self) -> list[str]:
        """Phases with at least one line centred inside the window (fitted components)."""
        return [p for p in ("A", "B") if any(self._centred(l) for l in self.lines if l.phase == p)]

    def reference_sum(self, phase: str) -> float:
        """T_P,w: summed relative intensity of the phase's lines centred in the window."""
        return float(sum(l.relative_intensity for l in self.lines if l.phase == phase and self._centred(l)))

    def to_dict(self) -> dict:
        return {"phase": self.phase, "lo_deg": self.lo_deg, "hi_deg": self.hi_deg,
                "lines": [dataclasses.asdict(l) for l in self.lines]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "WindowSpec":
        try:
            lines = tuple(Line(**{k: v for k, v in dict(l).items()}) for l in d["lines"])
            return cls(str(d["phase"]), float(d["lo_deg"]), float(d["hi_deg"]), lines)
        except (KeyError, TypeError) as exc:
            raise ReductionError(f"bad peak window configuration {dict(d)!r}: {exc}") from exc


def windows_from_phases(phase_a: Phase, phase_b: Phase, windows: Sequence[PeakWindow],
                        tail_fwhm: float = 6.0, min_fraction: float = 0.002) -> list[WindowSpec]:
    """WindowSpecs whose lines come from the phase models: every line of either phase with centre
    within tail_fwhm * FWHM of the window and intensity >= min_fraction x the strongest such line."""
    specs = []
    for w in windows:
        lines = []
        for ph in (phase_a, phase_b):
            tth = ph.two_theta_deg
            fw = ph.fwhm_deg(tth)
            near = np.flatnonzero((tth > w.lo_deg - tail_fwhm * fw) & (tth < w.hi_deg + tail_fwhm * fw))
            for k in near:
                lines.append(Line(ph.name, float(round(tth[k], 5)), float(round(fw[k], 5)),
                                  float(round(ph.intensity[k], 4)), float(ph.eta)))
        top = max(l.relative_intensity for l in lines)
        lines = [l for l in lines if l.relative_intensity >= min_fraction * top]
        specs.append(WindowSpec(w.phase, w.lo_deg, w.hi_deg, tuple(lines)))
    return specs


@dataclasses.dataclass
class FractionConfig:
    """Configuration of :class:`PhaseFractionEstimator` (``[reducer.fractions]`` in TOML).

    method: "peaks" or "whole_pattern". windows: peak windows with their lines (peaks method).
    reference_ratio_b_to_a: rho = R_B / R_A, or None to take it from the absolute scales.
    reference_scale_a / reference_scale_b: absolute R_A / R_B (pattern intensity x degrees per unit
    relative intensity per unit fraction), None = unknown; both together give rho.
    min_signal_sigma: a frame whose
    amount_A + amount_B is below this many standard deviations is flagged. n_reweight: IRLS passes.
    wavelength_A: needed only for patterns in q. whole_pattern_range_deg, background_terms:
    whole-pattern fit range (degrees) and number of Bernstein background terms.
    reference_pattern_a / reference_pattern_b: text files (columns 2theta in degrees, intensity,
    optional sigma) of the pure phases recorded with equal flux and exposure; they set rho when
    reference_ratio_b_to_a is None (peak fits on both) and, background-subtracted, serve as the
    whole-pattern references (otherwise the model phases do).
    position_search_rel, position_step_rel, position_min_snr: per frame, the lines of a phase
    whose summed area exceeds position_min_snr standard deviations are moved together by the
    relative change eps of sin(theta) in [-search, +search] that minimises chi^2 (grid of
    position_step_rel, refined by a parabola through the best three points and rounded to
    position_step_rel / 10), searched on every frame by descent from eps = 0; a weaker phase keeps its configured positions (eps = 0), since a
    shift chosen from noise would inflate its area. 0 disables.
    """

    windows: list[WindowSpec]
    method: str = "peaks"
    reference_ratio_b_to_a: float | None = 1.0
    reference_scale_a: float | None = None
    reference_scale_b: float | None = None
    min_signal_sigma: float = 3.0
    n_reweight: int = 2
    wavelength_A: float | None = None
    whole_pattern_range_deg: tuple[float, float] | None = None
    background_terms: int = 6
    reference_pattern_a: str | None = None
    reference_pattern_b: str | None = None
    position_search_rel: float = 0.004
    position_step_rel: float = 0.0005
    position_min_snr: float = 20.0
    phases: tuple[Phase, Phase] | None = None   # model phases (whole-pattern references)

    def __post_init__(self) -> None:
        if self.method not in ("peaks", "whole_pattern"):
            raise ReductionError(f"fractions.method must be 'peaks' or 'whole_pattern', got {self.method!r}")
        if self.method == "peaks":
            have = {w.phase for w in self.windows}
            if have != {"A", "B"}:
                raise ReductionError(f"peak windows needed for both phases A and B, got phases {sorted(have)}")
        if self.reference_ratio_b_to_a is not None and not self.reference_ratio_b_to_a > 0:
            raise ReductionError(f"reference_ratio_b_to_a must be positive, got {self.reference_ratio_b_to_a}")
        for name in ("reference_scale_a", "reference_scale_b"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ReductionError(f"{name} must be positive, got {v}")
        if (self.reference_pattern_a is None) != (self.reference_pattern_b is None):
            raise ReductionError("reference_pattern_a and reference_pattern_b go together")
        if (self.reference_ratio_b_to_a is None and self.reference_pattern_a is None
                and (self.reference_scale_a is None or self.reference_scale_b is None)):
            raise ReductionError("need reference_ratio_b_to_a, reference_pattern_a/_b files, or both reference_scale_a "
                                 "and reference_scale_b (`beamkin phases REF_A REF_B` measures the ratio)")
        if self.background_terms < 1:
            raise ReductionError("background_terms must be >= 1")
        if not (0.0 <= self.position_search_rel < 0.05 and self.position_step_rel > 0):
            raise ReductionError("position_search_rel must be in [0, 0.05) and position_step_rel > 0")

    def span_deg(self) -> tuple[float, float]:
        """Smallest 2theta range (degrees) the configuration needs."""
        if self.method == "whole_pattern" and self.whole_pattern_range_deg is not None:
            return tuple(float(v) for v in self.whole_pattern_range_deg)
        return (min(w.lo_deg for w in self.windows), max(w.hi_deg for w in self.windows))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "FractionConfig":
        """From the ``[reducer.fractions]`` table; missing keys take the CPL-1 / Ar defaults."""
        from reducer.defaults import cpl1_ar_fraction_config

        base = cpl1_ar_fraction_config()
        if not d:
            return base
        known = {f.name for f in dataclasses.fields(cls)} - {"phases"}
        unknown = set(d) - known
        retired = unknown & set(RETIRED_KEYS)
        if retired:
            raise ReductionError("; ".join(f"[reducer.fractions] {key} is no longer used: {RETIRED_KEYS[key]}"
                                           for key in sorted(retired)))
        if unknown:
            raise ReductionError(f"unknown [reducer.fractions] keys: {sorted(unknown)}")
        kwargs = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
        for key, value in d.items():
            if key == "windows":
                value = [WindowSpec.from_dict(w) for w in value]
            elif key == "whole_pattern_range_deg" and value is not None:
                value = (float(value[0]), float(value[1]))
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict:
        out = {"method": self.method, "reference_ratio_b_to_a": self.reference_ratio_b_to_a,
               "min_signal_sigma": self.min_signal_sigma,
               "n_reweight": self.n_reweight, "background_terms": self.background_terms,
               "position_search_rel": self.position_search_rel, "position_step_rel": self.position_step_rel,
               "position_min_snr": self.position_min_snr,
               "windows": [w.to_dict() for w in self.windows]}
        for key in ("reference_scale_a", "reference_scale_b", "wavelength_A", "whole_pattern_range_deg",
                    "reference_pattern_a", "reference_pattern_b"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclasses.dataclass
class FractionResult:
    """alpha (fraction of loaded phase B) and its one-sigma uncertainty; status "ok" or "flagged"
    (then alpha = 0.0, sigma_alpha = inf and reason says why); peaks: per window and phase
    component {"phase", "center_deg", "lo_deg", "hi_deg", "area", "sigma_area", "fwhm_deg"};
    amount_a/amount_b: amounts in units of R_A (amount_a + amount_b ~ 1 with a stable beam when
    R_A is known, otherwise relative)."""

    alpha: float
    sigma_alpha: float
    status: str = "ok"
    reason: str = ""
    peaks: list[dict] = dataclasses.field(default_factory=list)
    amount_a: float = 0.0
    amount_b: float = 0.0
    sigma_amount_a: float = 0.0
    sigma_amount_b: float = 0.0
    time_s: float | None = None
    position_shift_rel: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def flagged(cls, reason: str, time_s: float | None = None, peaks=None) -> "FractionResult":
        return cls(0.0, FLAGGED_SIGMA, "flagged", reason, list(peaks or []), time_s=time_s)


# ---------------------------------------------------------------------------------- estimator
def _bin_half_widths(x: np.ndarray) -> np.ndarray:
    """Half widths of the bins centred on x (half the local spacing)."""
    if x.shape[0] < 2:
        return np.zeros_like(x)
    return 0.5 * np.abs(np.gradient(x))


@numba.njit(cache=True)
def _line_point_values(tth: np.ndarray, center_deg: float, fwhm_deg: float, eta: float) -> np.ndarray:
    """Area-normalised pV at each 2theta (degrees), 0 beyond 60 FWHM from the centre: in one pass
    the same arithmetic as pseudo_voigt_bin_average's point branch (bin half width 0)."""
    out = np.zeros(tth.shape[0])
    g0, l0, k, kg = _pseudo_voigt_constants(fwhm_deg)
    reach = 60.0 * fwhm_deg
    for i in range(tth.shape[0]):
        u = tth[i] - center_deg
        if abs(u) < reach:
            out[i] = eta * l0 / (1.0 + k * u * u) + (1.0 - eta) * g0 * math.exp(-kg * u * u)
    return out


def _line_law(center_deg: float, fwhm_deg: float, eta: float):
    """Scattering law of one area-normalised line: pV at pixel-centre 2theta values (degrees)."""
    if not fwhm_deg > 0:  # the point branch needs a positive width; keep the general kernel's rules
        def law(tth):
            tth = np.ascontiguousarray(tth, dtype=np.float64)
            out = np.zeros(tth.shape[0])
            near = np.abs(tth - center_deg) < 60.0 * fwhm_deg
            xs = np.ascontiguousarray(tth[near])
            out[near] = pseudo_voigt_bin_average(xs, np.zeros(xs.shape[0]), center_deg, fwhm_deg, eta)
            return out
        return law

    def law(tth):
        return _line_point_values(np.ascontiguousarray(tth, dtype=np.float64), float(center_deg),
                                  float(fwhm_deg), float(eta))
    return law


def shifted_center_deg(center_deg: float, eps: float) -> float:
    """Line centre after a relative change eps of sin(theta) (d -> d / (1 + eps)):
    2theta' = 2 asin((1 + eps) sin(2theta / 2)), degrees."""
    s = (1.0 + eps) * math.sin(math.radians(center_deg) / 2.0)
    return math.degrees(2.0 * math.asin(min(max(s, -1.0), 1.0)))


class _PeaksModel:
    """Global linear model of all windows on one radial grid.

    Parameters: for each window w and each phase P with a line centred in w, a_P,w (the integrated
    intensity of those lines); for each window a constant and a slope. Lines of P near but not
    centred in w (tails reaching in) are scaled by the phase's mean amount per unit relative
    intensity, sum_w' a_P,w' / sum_w' T_P,w', which keeps the model linear.

    Line profiles come from the pattern's model_response when it has one (2D integration: the
    exact binning and pixel sampling, restricted to the window bins), else they are averaged
    analytically over each bin. Each phase's lines can be moved together by a relative change eps
    of sin(theta) (lattice strain, miscalibration); the phase's columns are precomputed on a grid
    of eps values and computed on demand elsewhere."""

    def __init__(self, windows: Sequence[WindowSpec], x_all: np.ndarray, response=None,
                 eps_grid: np.ndarray | None = None):
        self.x_all = x_all
        self.h_all = _bin_half_widths(x_all)
        self.response = response
        self.windows = list(windows)
        self.rows = []          # pattern indices per window
        self.areas = []         # (window index, phase, parameter index, T_P,w)
        n_par = 0
        for wi, spec in enumerate(self.windows):
            sel = np.flatnonzero((x_all >= spec.lo_deg) & (x_all <= spec.hi_deg))
            if sel.shape[0] < len(spec.phases_present()) + 4:
                raise ReductionError(f"peak window {spec.phase} [{spec.lo_deg}, {spec.hi_deg}] deg holds only "
                                     f"{sel.shape[0]} bins: widen it or use more radial bins")
            self.rows.append(sel)
            for p in spec.phases_present():
                self.areas.append((wi, p, n_par, spec.reference_sum(p)))
                n_par += 1
        self.bg_index = []
        for wi in range(len(self.windows)):
            self.bg_index.append((n_par, n_par + 1))
            n_par += 2
        self.n_par = n_par
        self.total_t = {p: sum(t for (_, q, _, t) in self.areas if q == p) for p in ("A", "B")}
        self.row_offsets = np.cumsum([0] + [r.shape[0] for r in self.rows])
        self.pattern_rows = np.concatenate(self.rows)
        self.row_window = np.repeat(np.arange(len(self.windows)), [r.shape[0] for r in self.rows])
        base = np.zeros((self.row_offsets[-1], n_par))
        for wi, spec in enumerate(self.windows):
            x = x_all[self.rows[wi]]
            r0, r1 = self.row_offsets[wi], self.row_offsets[wi + 1]
            b0, b1 = self.bg_index[wi]
            base[r0:r1, b0] = 1.0
            base[r0:r1, b1] = (x - 0.5 * (spec.lo_deg + spec.hi_deg)) / (0.5 * (spec.hi_deg - spec.lo_deg))
        self.base = base
        self.centers, self.fwhm = {}, {}
        for (wi, p, j, t) in self.areas:
            spec = self.windows[wi]
            ls = [l for l in spec.lines if l.phase == p and spec.lo_deg <= l.center_deg <= spec.hi_deg]
            self.centers[(wi, p)] = sum(l.center_deg * l.relative_intensity for l in ls) / t
            self.fwhm[(wi, p)] = max(ls, key=lambda l: l.relative_intensity).fwhm_deg
        self.eps_grid = np.zeros(1) if eps_grid is None else np.asarray(eps_grid, float)
        self._grid_searchable = not np.any(np.diff(self.eps_grid) <= 2e-12)
        # parameter indices of each phase's areas and their index meshes (covariance blocks)
        self.area_index = {p: np.array([j for (_, q, j, _) in self.areas if q == p]) for p in ("A", "B")}
        self.block = {(p, q): np.ix_(self.area_index[p], self.area_index[q]) for p in ("A", "B") for q in ("A", "B")}
        self.grid_columns = {p: np.stack([self.phase_columns(p, e) for e in self.eps_grid]) for p in ("A", "B")}
        self.i0 = int(np.argmin(np.abs(self.eps_grid)))
        self._cache: dict[str, dict[float, np.ndarray]] = {}
        self.design = self.base + self.grid_columns["A"][self.i0] + self.grid_columns["B"][self.i0]

    def _profile(self, wi: int, line: Line, eps: float) -> np.ndarray:
        sel = self.rows[wi]
        c = shifted_center_deg(line.center_deg, eps) if eps else line.center_deg
        if self.response is None:
            return pseudo_voigt_bin_average(self.x_all[sel], self.h_all[sel], c, line.fwhm_deg, line.eta)
        return self.response(_line_law(c, line.fwhm_deg, line.eta), rows=sel)

    def phase_columns(self, phase: str, eps: float) -> np.ndarray:
        """Design-matrix contribution (rows x parameters) of one phase's lines moved by eps."""
        cols = np.zeros_like(self.base)
        for wi, spec in enumerate(self.windows):
            r0, r1 = self.row_offsets[wi], self.row_offsets[wi + 1]
            centred = np.zeros(r1 - r0)
            tail = np.zeros(r1 - r0)
            for l in spec.lines:
                if l.phase != phase:
                    continue
                prof = l.relative_intensity * self._profile(wi, l, eps)
                if spec.lo_deg <= l.center_deg <= spec.hi_deg:
                    centred += prof
                else:
                    tail += prof
            own = [(j, t) for (w2, q, j, t) in self.areas if w2 == wi and q == phase]
            if own:
                j, t = own[0]
                cols[r0:r1, j] += centred / t
            if np.any(tail) and self.total_t[phase] > 0:
                for (_, q, j2, _) in self.areas:
                    if q == phase:
                        cols[r0:r1, j2] += tail / self.total_t[phase]
        return cols

    def grid_index(self, eps: float) -> int | None:
        """Index of the first grid value within 1e-12 of eps (None if none). The grid is
        ascending with steps far above 1e-12, so only the two neighbours of eps can match: a
        binary search instead of comparing the whole grid (np.isclose costs ~35 us a call)."""
        grid = self.eps_grid
        if not self._grid_searchable:  # never from FractionConfig's arange grid
            k = np.flatnonzero(np.isclose(grid, eps, rtol=0, atol=1e-12))
            return int(k[0]) if k.size else None
        j = int(np.searchsorted(grid, eps))
        for k in (j - 1, j):
            if 0 <= k < grid.shape[0] and abs(grid[k] - eps) <= 1e-12:
                return k
        return None

    def columns_at(self, phase: str, eps: float) -> np.ndarray:
        """phase_columns from the grid, a small cache of recent off-grid values, or computed."""
        k = self.grid_index(eps)
        if k is not None:
            return self.grid_columns[phase][k]
        cache = self._cache.setdefault(phase, {})
        if eps not in cache:
            if len(cache) >= SHIFT_COLUMNS_CACHED:
                cache.pop(next(iter(cache)))
            cache[eps] = self.phase_columns(phase, eps)
        return cache[eps]

    def design_at(self, eps_a: float, eps_b: float) -> np.ndarray:
        return self.base + self.columns_at("A", eps_a) + self.columns_at("B", eps_b)


def _bernstein(x: np.ndarray, lo: float, hi: float, n_terms: int) -> np.ndarray:
    """Bernstein basis of degree n_terms - 1 on [lo, hi] (non-negative, sums to 1)."""
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    n = n_terms - 1
    return np.stack([math.comb(n, k) * t**k * (1 - t) ** (n - k) for k in range(n_terms)], axis=1)


class PhaseFractionEstimator:
    """Frame-by-frame phase fraction estimator (see module docstring for the equations).

    ``measured_range_deg``: when given, every window must lie inside it (ReductionError otherwise,
    at construction). The estimate of a frame depends on that frame and the configuration only
    (no state carried from frame to frame besides caches of the radial grid's design matrices).
    """

    def __init__(self, config: FractionConfig, measured_range_deg: tuple[float, float] | None = None,
                 series_id: str | None = None):
        self.config = config
        self.series_id = series_id
        self._grid_key = None
        self._model: _PeaksModel | None = None
        self._wp_cache = None
        self._reference_patterns = None
        self._rho = config.reference_ratio_b_to_a
        self.reference_scale_a = config.reference_scale_a
        if self._rho is None and config.reference_scale_a is not None and config.reference_scale_b is not None:
            self._rho = config.reference_scale_b / config.reference_scale_a
        if config.reference_pattern_a is not None:
            ref_a = load_reference_pattern(config.reference_pattern_a)
            ref_b = load_reference_pattern(config.reference_pattern_b)
            self.set_reference_patterns(ref_a, ref_b)
            if self._rho is None and config.reference_scale_b is None:
                self.calibrate_from_reference_patterns(ref_a, ref_b)
        if measured_range_deg is not None:
            self.check_range(measured_range_deg)

    # ---------------------------------------------------------------- construction helpers
    @classmethod
    def from_config(cls, reducer_config: Mapping[str, Any] | None, metadata: Mapping[str, Any] | None = None
                    ) -> "PhaseFractionEstimator":
        """Estimator from the ``[reducer]`` table (its ``fractions`` sub-table) and the series'
        start message: measured range from the geometry of image series (windows outside it raise
        ReductionError here)."""
        fr = dict((reducer_config or {}).get("fractions") or {})
        config = FractionConfig.from_dict(fr)
        metadata = metadata or {}
        geo = metadata.get("geometry") or {}
        measured = None
        wavelength_A = geo.get("wavelength_A")
        if metadata.get("kind") == "image" and metadata.get("detector") and geo:
            from beamkin.geometry import resolve_geometry

            geometry = resolve_geometry(metadata, reducer_config)  # stream, TOML, PONI
            wavelength_A = geometry.wavelength_A
            measured = image_two_theta_range_deg(geometry)
        if config.wavelength_A is None and wavelength_A:
            config.wavelength_A = float(wavelength_A)
        return cls(config, measured_range_deg=measured, series_id=metadata.get("series_id"))

    def check_range(self, measured_range_deg: tuple[float, float]) -> None:
        """ReductionError when a window (or the whole-pattern range) is outside the measured range."""
        lo, hi = measured_range_deg
        if self.config.method == "whole_pattern" and self.config.whole_pattern_range_deg is not None:
            a, b = self.config.whole_pattern_range_deg
            if a < lo or b > hi:
                raise ReductionError(f"whole-pattern range [{a}, {b}] deg lies outside the measured 2theta range "
                                     f"[{lo:.4f}, {hi:.4f}] deg")
            return
        for w in self.config.windows:
            if w.lo_deg < lo or w.hi_deg > hi:
                raise ReductionError(f"peak window {w.phase} [{w.lo_deg}, {w.hi_deg}] deg lies outside the measured "
                                     f"2theta range [{lo:.4f}, {hi:.4f}] deg")

    @property
    def reference_ratio(self) -> float | None:
        """rho = R_B / R_A in use."""
        if self._rho is not None:
            return self._rho
        if self.config.reference_scale_b is not None and self.reference_scale_a is not None:
            return self.config.reference_scale_b / self.reference_scale_a
        return None

    # ---------------------------------------------------------------- per pattern
    def _two_theta(self, pattern: Pattern) -> np.ndarray:
        if pattern.unit == "2th_deg":
            return np.asarray(pattern.radial, float)
        if pattern.unit == "q_nm^-1":
            if not self.config.wavelength_A:
                raise ReductionError("pattern in q_nm^-1 needs fractions.wavelength_A (or the series wavelength)")
            return q_to_two_theta_deg(pattern.radial, self.config.wavelength_A)
        raise ReductionError(f"unsupported pattern unit {pattern.unit!r}")

    def _prepare_grid(self, x: np.ndarray, response=None) -> None:
        key = (x.shape[0], float(x[0]), float(x[-1]), float(x[x.shape[0] // 2]), id(getattr(response, "__self__", response)))
        if key == self._grid_key:
            return
        valid_lo, valid_hi = float(np.min(x)), float(np.max(x))
        self.check_range((valid_lo, valid_hi))
        cfg = self.config
        eps_grid = None
        if cfg.position_search_rel > 0:
            n = int(round(cfg.position_search_rel / cfg.position_step_rel))
            eps_grid = np.arange(-n, n + 1) * cfg.position_step_rel
        self._model = _PeaksModel(cfg.windows, x, response, eps_grid) if cfg.method == "peaks" else None
        self._response = response
        self._wp_cache = None
        self._grid_key = key

    def estimate(self, pattern: Pattern, time_s: float | None = None) -> FractionResult:
        """Phase fraction of one pattern. Configuration problems (window outside the pattern's
        range, too few bins) raise ReductionError; a frame that cannot be fitted is flagged."""
        if pattern.status != "ok":
            return FractionResult.flagged(f"pattern flagged: {pattern.reason}", time_s)
        x = self._two_theta(pattern)
        if x.ndim != 1 or x.shape[0] < 2:
            raise ReductionError(f"pattern radial axis must be 1D with >= 2 bins, got shape {x.shape}")
        self._prepare_grid(x, pattern.model_response)
        y = np.asarray(pattern.intensity, float)
        s = np.asarray(pattern.sigma, float)
        ok = pattern.valid
        if self.config.method == "whole_pattern":
            result = self._estimate_whole_pattern(x, y, s, ok, time_s)
        else:
            result = self._estimate_peaks(y, s, ok, time_s)
        if result.status != "ok":
            logger.info("phase fraction flagged at t = %s s: %s", time_s, result.reason,
                        extra={"series_id": self.series_id})
        return result

    def _refine_shift(self, m: "_PeaksModel", good, yy, ss, c, eps: dict, phase: str) -> float:
        """eps of one phase minimising chi^2 on the grid (weights fixed from the current model),
        refined by a parabola through the best grid point and its neighbours and rounded to
        position_step_rel / SHIFT_SUBDIVISIONS."""
        pos = (yy > 0) & (ss > 0)
        gmed = float(np.median(ss[pos] ** 2 / yy[pos])) if pos.any() else 1.0
        g = np.where(pos, ss * ss / np.where(pos, yy, 1.0), gmed)
        model = np.ascontiguousarray(m.design_at(eps["A"], eps["B"])[good]) @ c
        var = g * np.maximum(model, 1e-3 * np.max(np.abs(model)))
        grid = m.eps_grid
        chi2 = np.full(grid.shape[0], np.inf)
        other = "B" if phase == "A" else "A"
        fixed = m.base + m.columns_at(other, eps[other])

        def scan(ks):
            for k in ks:
                if np.isinf(chi2[k]):
                    design = np.ascontiguousarray((fixed + m.grid_columns[phase][k])[good])
                    chi2[k] = weighted_linear_fit(design, yy, var)[2]

        # Descent on the grid from the configured positions (eps = 0): scan the neighbours of the
        # best point until both are scanned, i.e. the nearest local minimum (3 fits for an
        # unshifted phase, one more per grid step of shift).
        n = grid.shape[0]
        k = int(np.argmin(np.abs(grid - eps[phase])))
        scan(range(max(k - 1, 0), min(k + 2, n)))
        while True:
            k = int(np.argmin(chi2))
            todo = [j for j in (k - 1, k + 1) if 0 <= j < n and np.isinf(chi2[j])]
            if not todo:
                break
            scan(todo)
        if 0 < k < grid.shape[0] - 1:
            curv = chi2[k - 1] - 2 * chi2[k] + chi2[k + 1]
            if np.isfinite(curv) and curv > 0:
                step = grid[k + 1] - grid[k]
                refined = grid[k] + 0.5 * step * (chi2[k - 1] - chi2[k + 1]) / curv
                # rounded so that the design columns of recurring shifts come from the cache
                quantum = step / SHIFT_SUBDIVISIONS
                return float(round(refined / quantum) * quantum)
        return float(grid[k])

    def _fit_windows(self, y, s, ok):
        """Global fit of all windows. Returns (sums {P: S_P}, 2x2 covariance of (S_A, S_B),
        reference sums {P: T_P}, peaks list, eps {P: shift}) or a str reason when the frame cannot
        be fitted."""
        m = self._model
        good = ok[m.pattern_rows]
        n_good = np.bincount(m.row_window[good], minlength=len(m.windows))
        for wi, spec in enumerate(m.windows):
            if n_good[wi] < len(spec.phases_present()) + 3:
                return f"window {spec.phase} [{spec.lo_deg}, {spec.hi_deg}] has {int(n_good[wi])} valid bins"
        yy = np.ascontiguousarray(y[m.pattern_rows][good])
        ss = np.ascontiguousarray(s[m.pattern_rows][good])
        idx = m.area_index
        search = m.eps_grid.shape[0] > 1
        eps = {"A": 0.0, "B": 0.0}
        design = np.ascontiguousarray(m.design[good])
        try:
            c, cv, chi2 = irls_linear_fit(design, yy, ss, self.config.n_reweight)
            if search and np.all(np.isfinite(c)):
                for p in ("A", "B"):
                    var_p = cv[m.block[p, p]].sum()
                    if var_p > 0 and c[idx[p]].sum() > self.config.position_min_snr * math.sqrt(var_p):
                        eps[p] = self._refine_shift(m, good, yy, ss, c, eps, p)
                if eps["A"] != 0.0 or eps["B"] != 0.0:
                    design = np.ascontiguousarray(m.design_at(eps["A"], eps["B"])[good])
                    c, cv, chi2 = irls_linear_fit(design, yy, ss, self.config.n_reweight)
        except Exception as exc:  # singular normal equations
            return f"peak fit failed: {exc}"
        if not (np.all(np.isfinite(c)) and np.all(np.isfinite(cv))):
            return "non-finite peak fit"
        chi2_red = float(chi2 / max(design.shape[0] - design.shape[1], 1))
        peaks = []
        for (wi, p, j, t) in m.areas:
            spec = m.windows[wi]
            peaks.append({"phase": p, "center_deg": shifted_center_deg(m.centers[(wi, p)], eps[p]),
                          "lo_deg": spec.lo_deg, "hi_deg": spec.hi_deg, "area": float(c[j]),
                          "sigma_area": float(math.sqrt(max(cv[j, j], 0.0))), "fwhm_deg": float(m.fwhm[(wi, p)]),
                          "chi2_reduced": chi2_red})
        ia, ib = idx["A"], idx["B"]
        sums = {"A": float(c[ia].sum()), "B": float(c[ib].sum())}
        cov = np.array([[cv[m.block["A", "A"]].sum(), cv[m.block["A", "B"]].sum()],
                        [cv[m.block["B", "A"]].sum(), cv[m.block["B", "B"]].sum()]])
        return sums, cov, dict(m.total_t), peaks, eps

    def _finish(self, sa, sb, cov_ab, ta, tb, peaks, time_s, rho: float | None = None) -> FractionResult:
        """alpha from summed areas (sa, sb) with covariance cov_ab and reference sums (ta, tb);
        rho = R_B / R_A (default: the estimator's)."""
        if ta <= 0 or tb <= 0:
            return FractionResult.flagged("no line of one phase inside the fitted windows", time_s, peaks)
        # Relative amounts with R_A = 1: u = S_A / T_A, v = S_B / (rho T_B).
        rho = self.reference_ratio if rho is None else rho
        if rho is None:
            return FractionResult.flagged("reference ratio R_B/R_A unknown", time_s, peaks)
        scale_a = self.reference_scale_a if self.reference_scale_a is not None else 1.0
        da, db = 1.0 / (ta * scale_a), 1.0 / (tb * rho * scale_a)
        u, v = sa * da, sb * db
        cov = np.array([[cov_ab[0, 0] * da * da, cov_ab[0, 1] * da * db],
                        [cov_ab[1, 0] * da * db, cov_ab[1, 1] * db * db]])
        total = u + v
        var_total = cov[0, 0] + cov[1, 1] + 2 * cov[0, 1]
        if not (np.isfinite(total) and np.isfinite(var_total) and var_total > 0):
            return FractionResult.flagged("non-finite amounts", time_s, peaks)
        if total < self.config.min_signal_sigma * math.sqrt(var_total):
            return FractionResult.flagged(f"no diffraction signal: amount_A + amount_B = {total:.3g} "
                                          f"+- {math.sqrt(var_total):.2g}", time_s, peaks)
        alpha = v / total
        jac = np.array([-v, u]) / total**2
        var_alpha = float(jac @ cov @ jac)
        if not (np.isfinite(alpha) and np.isfinite(var_alpha) and var_alpha > 0):
            return FractionResult.flagged("non-finite alpha", time_s, peaks)
        return FractionResult(float(alpha), math.sqrt(var_alpha), "ok", "", peaks, float(u), float(v),
                              math.sqrt(max(cov[0, 0], 0.0)), math.sqrt(max(cov[1, 1], 0.0)), time_s)

    def _estimate_peaks(self, y, s, ok, time_s) -> FractionResult:
        fit = self._fit_windows(y, s, ok)
        if isinstance(fit, str):
            return FractionResult.flagged(fit, time_s)
        sums, cov, tsum, peaks, eps = fit
        result = self._finish(sums["A"], sums["B"], cov, tsum["A"], tsum["B"], peaks, time_s)
        result.position_shift_rel = dict(eps)
        return result

    # ---------------------------------------------------------------- whole pattern
    def set_reference_patterns(self, ref_a: Pattern | tuple, ref_b: Pattern | tuple) -> None:
        """Whole-pattern references: background-free pure-phase patterns (Pattern or
        (two_theta_deg, intensity)) recorded with equal flux and exposure, so each is the pattern per
        unit phase fraction (rho is implied); interpolated onto each pattern's grid. At a bound
        (one phase coefficient 0) alpha is exactly 0 or 1 and sigma_alpha comes from the
        unconstrained covariance."""
        def as_xy(r):
            if isinstance(r, Pattern):
                return self._two_theta(r), np.asarray(r.intensity, float)
            x, yv = r
            return np.asarray(x, float), np.asarray(yv, float)
        self._reference_patterns = (as_xy(ref_a), as_xy(ref_b))
        self._wp_cache = None

    def _whole_pattern_basis(self, x: np.ndarray):
        if self._wp_cache is not None:
            return self._wp_cache
        lo, hi = self.config.whole_pattern_range_deg or self.config.span_deg()
        sel = np.flatnonzero((x >= lo) & (x <= hi))
        xs = x[sel]
        if self._reference_patterns is not None:
            (xa, ya), (xb, yb) = self._reference_patterns
            pa = np.interp(xs, xa, ya, left=0.0, right=0.0)
            pb = np.interp(xs, xb, yb, left=0.0, right=0.0)
        elif self.config.phases is not None and self._response is not None:
            pa = self._response(self.config.phases[0].pattern, rows=sel)
            pb = self._response(self.config.phases[1].pattern, rows=sel)
        elif self.config.phases is not None:
            width = 2.0 * _bin_half_widths(xs)
            pa = self.config.phases[0].pattern(xs, bin_width_deg=width)
            pb = self.config.phases[1].pattern(xs, bin_width_deg=width)
        else:
            raise ReductionError("whole-pattern method needs reference patterns (set_reference_patterns) "
                                 "or model phases in the configuration")
        bern = _bernstein(xs, lo, hi, self.config.background_terms)
        self._wp_cache = (sel, pa, pb, bern)
        return self._wp_cache

    def _estimate_whole_pattern(self, x, y, s, ok, time_s) -> FractionResult:
        from scipy.optimize import nnls

        sel, pa, pb, bern = self._whole_pattern_basis(x)
        good = ok[sel]
        if good.sum() < bern.shape[1] + 4:
            return FractionResult.flagged("too few valid bins in the whole-pattern range", time_s)
        if self._reference_patterns is not None:
            rho = 1.0                      # measured pure-phase patterns: already per unit fraction
        else:
            rho = self.reference_ratio     # model phases: relative intensities, scaled by rho
            if rho is None:
                return FractionResult.flagged("reference ratio R_B/R_A unknown", time_s)
        design = np.column_stack([pa, rho * pb, bern])[good]
        yy, ss = y[sel][good], s[sel][good]
        pos = (yy > 0) & (ss > 0)
        gmed = float(np.median(ss[pos] ** 2 / yy[pos])) if pos.any() else 1.0
        g = np.where(pos, ss * ss / np.where(pos, yy, 1.0), gmed)
        ymin = 0.5 * float(np.median(yy[pos])) if pos.any() else 1.0
        var = g * np.maximum(yy, ymin)
        for it in range(self.config.n_reweight + 1):
            w = 1.0 / np.sqrt(var)
            coef, _ = nnls(design * w[:, None], yy * w, maxiter=50 * design.shape[1])
            model = design @ coef
            if it < self.config.n_reweight:
                var = g * np.maximum(model, 1e-3 * model.max())
        active = np.concatenate([[True, True], coef[2:] > 0])
        xa = design[:, active] * (1.0 / np.sqrt(var))[:, None]
        try:
            cov_full = np.linalg.inv(xa.T @ xa)
        except np.linalg.LinAlgError as exc:
            return FractionResult.flagged(f"singular whole-pattern fit: {exc}", time_s)
        # coef[0], coef[1] = amount_A R_A, amount_B R_A: reference sums 1 and rho 1 in _finish.
        return self._finish(coef[0], coef[1], cov_full[:2, :2], 1.0, 1.0, [], time_s, rho=1.0)

    # ---------------------------------------------------------------- references
    def calibrate_from_reference_patterns(self, pattern_a: Pattern, pattern_b: Pattern) -> float:
        """Set rho = R_B / R_A from two pure-phase patterns recorded with the same incident flux and
        exposure (pattern_a: empty phase only, pattern_b: loaded phase only). Returns rho."""
        res = []
        for pat, phase in ((pattern_a, "A"), (pattern_b, "B")):
            x = self._two_theta(pat)
            self._prepare_grid(x, pat.model_response)
            fit = self._fit_windows(np.asarray(pat.intensity, float), np.asarray(pat.sigma, float), pat.valid)
            if isinstance(fit, str):
                raise ReductionError(f"reference pattern {phase}: {fit}")
            sums, _, tsum, _, _ = fit
            res.append(sums[phase] / tsum[phase])
        self._grid_key = None   # the next frame sets up its own grid
        if not (res[0] > 0 and res[1] > 0):
            raise ReductionError(f"reference patterns give non-positive intensities {res}")
        self._rho = res[1] / res[0]
        self.reference_scale_a = res[0]
        return self._rho


def load_reference_pattern(path: str) -> Pattern:
    """Pure-phase reference pattern from a text file: columns 2theta (degrees), intensity and
    optionally sigma (default sqrt(max(intensity, 1))); '#' starts a comment."""
    try:
        data = np.loadtxt(str(path), comments="#", ndmin=2)
    except (OSError, ValueError) as exc:
        raise ReductionError(f"cannot read reference pattern {path!r}: {exc}") from exc
    if data.shape[1] not in (2, 3) or data.shape[0] < 10:
        raise ReductionError(f"reference pattern {path!r} needs >= 10 rows of 2 or 3 columns, got {data.shape}")
    sigma = data[:, 2] if data.shape[1] == 3 else np.sqrt(np.maximum(data[:, 1], 1.0))
    pattern = Pattern.from_profile(data[:, 0], data[:, 1], sigma)
    if not np.all(np.diff(pattern.radial) > 0):
        raise ReductionError(f"reference pattern {path!r}: 2theta must increase")
    return pattern


def image_two_theta_range_deg(geometry) -> tuple[float, float]:
    """(min, max) 2theta (degrees) of the pixel centres of an image series' detector, from a
    beamkin.geometry.SeriesGeometry."""
    ai = geometry.azimuthal_integrator()
    tth = ai.center_array(geometry.shape, unit="2th_deg")
    return float(np.min(tth)), float(np.max(tth))
