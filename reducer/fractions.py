"""Phase fraction alpha (loaded phase B) from 1D powder patterns, with Poisson uncertainties.

Peak method (default)
---------------------
The lines of each phase are fitted in a few 2theta windows (model: reducer.peak_profile; fit,
with Poisson weights predicted by the model and per-phase line shifts: reducer.peak_fit),
giving per window w and phase P the integrated intensity a_P,w of the lines centred in the
window and their reference sum T_P,w (summed relative intensity). Amounts, with per-phase
reference intensities R_P (integrated intensity per unit phase fraction per unit relative
intensity):

    amount_P = (sum_w a_P,w) / (R_P sum_w T_P,w),   alpha = amount_B / (amount_A + amount_B)

Only the ratio rho = R_B / R_A enters alpha (beam-intensity drift cancels). sigma_alpha follows
from the 2x2 covariance of (amount_A, amount_B) by the delta method:
var(alpha) = J C J^T, J = (-amount_B, amount_A) / (amount_A + amount_B)^2.
alpha is not clipped to [0, 1]: clipping would bias it near the ends.

Determinism: the result for a frame depends on that frame and the configuration only, never on
the frames a worker happened to see before (no learned reference, no remembered shift), so any
number of reducer workers gives bit-identical fractions (docs/design.md, section 2 "Stages and
data flow": workers finish in any order; tests/test_reducer_determinism.py).

Whole-pattern method
--------------------
Non-negative least squares of the pattern over a 2theta range against reference patterns of both
phases (per unit phase fraction: model patterns from beamkin.phases, or measured files) plus a
smooth non-negative background (Bernstein polynomials), with the Poisson weights of the peak fit
(reducer.least_squares.irls_nonnegative_fit); covariance from the weighted design matrix of the
phase columns and the active background columns.

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
from collections.abc import Mapping
from typing import Any

import numpy as np

from beamkin.errors import ReductionError
from reducer.defaults import cpl1_ar_fraction_config
from reducer.fraction_config import FractionConfig
from reducer.least_squares import irls_nonnegative_fit
from reducer.pattern import Pattern
from reducer.peak_fit import PeakFit, PeakFitError, fit_peaks
from reducer.peak_profile import PeaksModel, bin_half_widths

logger = logging.getLogger(__name__)

__all__ = [
    "FractionResult",
    "PhaseFractionEstimator",
    "q_to_two_theta_deg",
    "load_reference_pattern",
    "image_two_theta_range_deg",
]

FLAGGED_SIGMA = math.inf


def q_to_two_theta_deg(q_per_nm: np.ndarray, wavelength_A: float) -> np.ndarray:
    """2theta (degrees) from q (1/nm): q = 4 pi sin(theta) / lambda, lambda in nm = wavelength_A / 10."""
    s = np.asarray(q_per_nm, float) * (wavelength_A / 10.0) / (4.0 * math.pi)
    return np.degrees(2.0 * np.arcsin(np.clip(s, -1.0, 1.0)))


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


def bernstein_basis(x: np.ndarray, lo: float, hi: float, n_terms: int) -> np.ndarray:
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
        self._model: PeaksModel | None = None
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
        config = FractionConfig.from_dict(fr, base=cpl1_ar_fraction_config())  # missing keys: CPL-1 / Ar
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
        self._model = PeaksModel(cfg.windows, x, response, eps_grid) if cfg.method == "peaks" else None
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

    def _fit_peaks(self, y, s, ok) -> PeakFit:
        """reducer.peak_fit.fit_peaks on the current grid's model (PeakFitError when the frame
        cannot be fitted)."""
        return fit_peaks(self._model, y, s, ok, self.config.n_reweight, self.config.position_min_snr)

    def _estimate_peaks(self, y, s, ok, time_s) -> FractionResult:
        try:
            fit = self._fit_peaks(y, s, ok)
        except PeakFitError as exc:
            return FractionResult.flagged(str(exc), time_s)
        result = self._finish(fit.sums["A"], fit.sums["B"], fit.cov, fit.reference_sums["A"],
                              fit.reference_sums["B"], fit.peaks, time_s)
        result.position_shift_rel = dict(fit.eps)
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
            width = 2.0 * bin_half_widths(xs)
            pa = self.config.phases[0].pattern(xs, bin_width_deg=width)
            pb = self.config.phases[1].pattern(xs, bin_width_deg=width)
        else:
            raise ReductionError("whole-pattern method needs reference patterns (set_reference_patterns) "
                                 "or model phases in the configuration")
        bern = bernstein_basis(xs, lo, hi, self.config.background_terms)
        self._wp_cache = (sel, pa, pb, bern)
        return self._wp_cache

    def _estimate_whole_pattern(self, x, y, s, ok, time_s) -> FractionResult:
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
        coef, var = irls_nonnegative_fit(design, y[sel][good], s[sel][good], self.config.n_reweight)
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
            try:
                fit = self._fit_peaks(np.asarray(pat.intensity, float), np.asarray(pat.sigma, float), pat.valid)
            except PeakFitError as exc:
                raise ReductionError(f"reference pattern {phase}: {exc}") from exc
            res.append(fit.sums[phase] / fit.reference_sums[phase])
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
