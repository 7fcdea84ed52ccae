"""The peak-profile model of the phase-fraction fit: one linear design matrix for all windows.

Each phase is measured in a few 2theta windows. In window w the pattern is modelled as

    y(x) = a_A,w S_A,w(x) + a_B,w S_B,w(x) + b0 + b1 (x - x_w)

where S_P,w(x) = sum_k I_k pV(x; c_k, H_k, eta_k) / T_P,w is the composite pseudo-Voigt profile
of phase P's known lines near the window (fixed positions, widths and relative intensities I_k,
T_P,w = sum of I_k of the lines whose centres lie inside the window), so a_P,w is the
integrated intensity of those lines. A component appears only when the phase has a line centred
in the window. The model is linear in (a_A, a_B, b0, b1); reducer.peak_fit fits it.

Line profiles: in 2D the integrator's exact bin responses (sparse CSR rows of the window bins,
reducer.integrate.Integrator.model_pattern), which carry the pixel-centre aliasing of fine bins;
for profiles the pseudo-Voigt averaged over each bin (beamkin.phases.pseudo_voigt_bin_average).

Line positions: each phase's lines can be moved together by a relative change eps of sin(theta)
(d -> d / (1 + eps): lattice strain, geometry miscalibration); the phase's design columns are
precomputed on a grid of eps values and computed on demand (with a small cache) elsewhere.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numba
import numpy as np

from beamkin.errors import ReductionError
from beamkin.phases import _pseudo_voigt_constants, pseudo_voigt_bin_average
from reducer.fraction_config import Line, WindowSpec

__all__ = ["PeaksModel", "bin_half_widths", "line_law", "shifted_center_deg", "SHIFT_COLUMNS_CACHED"]

#: off-grid shifts whose design columns are kept per phase
SHIFT_COLUMNS_CACHED = 32


def bin_half_widths(x: np.ndarray) -> np.ndarray:
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


def line_law(center_deg: float, fwhm_deg: float, eta: float):
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


class PeaksModel:
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
        self.h_all = bin_half_widths(x_all)
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
        return self.response(line_law(c, line.fwhm_deg, line.eta), rows=sel)

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
