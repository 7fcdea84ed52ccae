"""Crystalline phases for the reduction stage: reflection lists, peak positions and widths.

The reference material is the porous coordination polymer CPL-1, [Cu2(pzdc)2(pyz)]n
(pzdc = pyrazine-2,3-dicarboxylate, pyz = pyrazine), a pillared-layer framework, monoclinic
P2_1/c. The empty cell used here is a 4.7, b 19.6, c 10.8 angstrom, beta 96 degrees, the values
taken from Kitaura et al., Science 298 (2002) 2358; they have NOT been
checked against a deposited CIF in this repository and are good to about 1 %.

Two phases are described:

* A, empty CPL-1 (the cell above);
* B, Ar-loaded CPL-1: the same framework with the cell expanded anisotropically by
  +0.5 % (a), +2.4 % (b), +2.0 % (c) and
  beta reduced by 0.4 degrees, so low-angle peaks move to lower 2theta by up to about 2.5 %.

Intensities are SYNTHETIC. They are not structure factors of CPL-1: each reflection gets
|F|^2 drawn from the acentric Wilson distribution (exponential, mean 1) with a seed derived
from (h, k, l), times multiplicity, the powder Lorentz-polarisation factor
1 / (sin^2 theta cos theta) and a Debye-Waller factor exp(-2 B s^2) with s = 1 / (2 d).
Phase B multiplies phase A's |F|^2 by a second deterministic factor in [0.55, 1.45) so the
relative intensities differ "somewhat", as guest loading does. They are realistic enough to
exercise peak finding and fraction estimation, nothing more.

Peak shape: area-normalised pseudo-Voigt with full width at half maximum from the Caglioti
relation FWHM^2 = U tan^2 theta + V tan theta + W (degrees^2 for FWHM in degrees 2theta).

Units: d-spacings and wavelengths in angstrom, angles in degrees 2theta unless stated.
"""
from __future__ import annotations

import dataclasses
import math

import numba
import numpy as np

__all__ = [
    "MonoclinicCell",
    "Phase",
    "PeakWindow",
    "CPL1_EMPTY_CELL",
    "CPL1_AR_CELL",
    "DEFAULT_WAVELENGTH_A",
    "cpl1_phases",
    "pseudo_voigt",
    "pseudo_voigt_bin_average",
    "two_theta_deg",
    "choose_peak_windows",
]

DEFAULT_WAVELENGTH_A = 0.8
"""BL02B2-like wavelength, angstrom."""


@dataclasses.dataclass(frozen=True)
class MonoclinicCell:
    """Monoclinic cell, unique axis b. Lengths in angstrom, beta in degrees."""

    a_A: float
    b_A: float
    c_A: float
    beta_deg: float

    def __post_init__(self) -> None:
        for name in ("a_A", "b_A", "c_A"):
            if not getattr(self, name) > 0:
                raise ValueError(f"cell length {name} must be positive, got {getattr(self, name)}")
        if not 60.0 < self.beta_deg < 150.0:
            raise ValueError(f"monoclinic beta must be between 60 and 150 degrees, got {self.beta_deg}")

    def d_spacing(self, h, k, l) -> np.ndarray:
        """d(hkl) in angstrom from
        1/d^2 = (h^2/a^2 + k^2 sin^2(beta)/b^2 + l^2/c^2 - 2 h l cos(beta)/(a c)) / sin^2(beta)."""
        h = np.asarray(h, float)
        k = np.asarray(k, float)
        l = np.asarray(l, float)
        beta = math.radians(self.beta_deg)
        sb2 = math.sin(beta) ** 2
        inv_d2 = (h * h / self.a_A**2 + k * k * sb2 / self.b_A**2 + l * l / self.c_A**2
                  - 2.0 * h * l * math.cos(beta) / (self.a_A * self.c_A)) / sb2
        with np.errstate(divide="ignore"):
            return 1.0 / np.sqrt(inv_d2)

    def strained(self, da: float, db: float, dc: float, dbeta_deg: float) -> "MonoclinicCell":
        """Cell with relative length changes da, db, dc (e.g. 0.012 = +1.2 %) and beta + dbeta_deg."""
        return MonoclinicCell(self.a_A * (1 + da), self.b_A * (1 + db), self.c_A * (1 + dc),
                              self.beta_deg + dbeta_deg)

    @property
    def volume_A3(self) -> float:
        return self.a_A * self.b_A * self.c_A * math.sin(math.radians(self.beta_deg))


CPL1_EMPTY_CELL = MonoclinicCell(4.7, 19.6, 10.8, 96.0)
CPL1_AR_CELL = CPL1_EMPTY_CELL.strained(0.005, 0.024, 0.020, -0.4)


def p21c_allowed(h: np.ndarray, k: np.ndarray, l: np.ndarray) -> np.ndarray:
    """Reflection conditions of P2_1/c (unique axis b): h0l: l = 2n; 0k0: k = 2n; 00l: l = 2n."""
    h = np.asarray(h)
    k = np.asarray(k)
    l = np.asarray(l)
    absent = ((k == 0) & (l % 2 != 0)) | ((h == 0) & (l == 0) & (k % 2 != 0))
    return ~absent & ~((h == 0) & (k == 0) & (l == 0))


def two_theta_deg(d_A, wavelength_A: float) -> np.ndarray:
    """Bragg angle 2theta = 2 asin(lambda / (2 d)) in degrees; NaN where lambda > 2 d."""
    x = wavelength_A / (2.0 * np.asarray(d_A, float))
    with np.errstate(invalid="ignore"):
        return np.degrees(2.0 * np.arcsin(np.where(x <= 1.0, x, np.nan)))


def _hash_uniform(h: np.ndarray, k: np.ndarray, l: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic uniform numbers in [0, 1) from integer triples (splitmix64-style mixing)."""
    x = ((h.astype(np.int64) + 64) * 1_000_003 + (k.astype(np.int64) + 64) * 10_007
         + (l.astype(np.int64) + 64) * 101 + salt).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _unique_reflections(cell: MonoclinicCell, d_min_A: float):
    """Unique P2_1/c reflections with d >= d_min_A, their multiplicities (Laue class 2/m)."""
    hmax = int(math.ceil(cell.a_A / d_min_A)) + 1
    kmax = int(math.ceil(cell.b_A / d_min_A)) + 1
    lmax = int(math.ceil(cell.c_A / d_min_A)) + 1
    h, k, l = np.meshgrid(np.arange(-hmax, hmax + 1), np.arange(-kmax, kmax + 1),
                          np.arange(-lmax, lmax + 1), indexing="ij")
    h, k, l = h.ravel(), k.ravel(), l.ravel()
    keep = p21c_allowed(h, k, l)
    h, k, l = h[keep], k[keep], l[keep]
    d = cell.d_spacing(h, k, l)
    keep = d >= d_min_A
    h, k, l, d = h[keep], k[keep], l[keep], d[keep]
    # 2/m equivalents of (h,k,l): (h,k,l), (-h,-k,-l), (-h,k,-l), (h,-k,l).
    # Representative: k >= 0 and, for the +-(h,l) pair, the lexicographically larger.
    rep = (k >= 0) & ((h > 0) | ((h == 0) & (l >= 0)))
    # For k == 0 the representative (h,0,l) with h>0 or h==0,l>=0 covers (-h,0,-l) too.
    h, k, l, d = h[rep], k[rep], l[rep], d[rep]
    mult = np.where(k == 0, 2, 4)
    mult = np.where((h == 0) & (l == 0), 2, mult)       # 0k0 and 0-k0
    order = np.argsort(-d, kind="stable")
    return h[order], k[order], l[order], d[order], mult[order]


@dataclasses.dataclass(frozen=True)
class Phase:
    """A crystalline phase: cell, reflection list and synthetic relative intensities.

    Attributes are arrays over unique reflections sorted by decreasing d:
    ``hkl`` (n, 3) int, ``d_A`` angstrom, ``intensity`` (relative integrated intensity
    of the powder line at ``wavelength_A``, largest line = 100; synthetic, see module docstring).
    ``caglioti_uvw`` gives FWHM^2 = U tan^2 theta + V tan theta + W in degrees^2 (2theta),
    ``eta`` the pseudo-Voigt Lorentzian fraction.
    """

    name: str
    cell: MonoclinicCell
    wavelength_A: float
    hkl: np.ndarray
    d_A: np.ndarray
    intensity: np.ndarray
    caglioti_uvw: tuple[float, float, float] = (0.002, -0.0004, 0.0005)
    eta: float = 0.3

    @property
    def two_theta_deg(self) -> np.ndarray:
        """Peak positions in degrees 2theta for this phase's wavelength."""
        return two_theta_deg(self.d_A, self.wavelength_A)

    def fwhm_deg(self, tth_deg) -> np.ndarray:
        """Caglioti FWHM (degrees 2theta) at 2theta = tth_deg."""
        u, v, w = self.caglioti_uvw
        t = np.tan(np.radians(np.asarray(tth_deg, float)) / 2.0)
        f2 = u * t * t + v * t + w
        return np.sqrt(np.maximum(f2, 1e-8))

    def pattern(self, tth_deg: np.ndarray, scale: float = 1.0, bin_width_deg=0.0) -> np.ndarray:
        """Sum over reflections of intensity * pseudo-Voigt(2theta): the area of each line is
        scale * intensity (units of [scale] x degrees). With bin_width_deg > 0 (scalar or per
        point) each value is the mean over the bin [tth - w/2, tth + w/2] instead of the point value."""
        tth_deg = np.asarray(tth_deg, float)
        centres = self.two_theta_deg
        fwhm = self.fwhm_deg(centres)
        half = np.broadcast_to(0.5 * np.asarray(bin_width_deg, float), tth_deg.shape).ravel().copy()
        return scale * pattern_sum(tth_deg.ravel(), half, centres, fwhm, self.intensity, self.eta).reshape(tth_deg.shape)


@numba.njit(cache=True)
def _pseudo_voigt_constants(fwhm: float) -> tuple[float, float, float, float]:
    """Peak heights of the unit-area Gaussian and Lorentzian of width fwhm, and the factors of
    (x - c)^2 in their exponent / denominator: (2/H) sqrt(ln2/pi), 2/(pi H), 4/H^2, 4 ln2/H^2."""
    k = 4.0 / (fwhm * fwhm)
    return 2.0 / fwhm * math.sqrt(math.log(2.0) / math.pi), 2.0 / (math.pi * fwhm), k, k * math.log(2.0)


@numba.njit(cache=True)
def pseudo_voigt(x: np.ndarray, centre: float, fwhm: float, eta: float) -> np.ndarray:
    """Area-normalised pseudo-Voigt, x, centre and fwhm in the same unit:
    pV = eta * L + (1 - eta) * G with
    G = (2/H) sqrt(ln2/pi) exp(-4 ln2 (x-c)^2 / H^2), L = (2/(pi H)) / (1 + 4 (x-c)^2 / H^2)."""
    out = np.empty(x.shape[0])
    g0, l0, k, kg = _pseudo_voigt_constants(fwhm)
    for i in range(x.shape[0]):
        u = x[i] - centre
        u2 = u * u
        out[i] = eta * l0 / (1.0 + k * u2) + (1.0 - eta) * g0 * math.exp(-kg * u2)
    return out


@numba.njit(cache=True)
def pseudo_voigt_cdf(u: float, fwhm: float, eta: float) -> float:
    """Integral of the area-normalised pseudo-Voigt from -inf to centre + u:
    eta (1/2 + atan(2u/H)/pi) + (1 - eta) (1 + erf(2 sqrt(ln2) u / H)) / 2."""
    return (eta * (0.5 + math.atan(2.0 * u / fwhm) / math.pi)
            + (1.0 - eta) * 0.5 * (1.0 + math.erf(2.0 * math.sqrt(math.log(2.0)) * u / fwhm)))


@numba.njit(cache=True)
def pseudo_voigt_bin_average(x: np.ndarray, half_width: np.ndarray, centre: float, fwhm: float,
                             eta: float) -> np.ndarray:
    """Mean of the area-normalised pseudo-Voigt over each bin [x_i - h_i, x_i + h_i]:
    (CDF(x_i + h_i - c) - CDF(x_i - h_i - c)) / (2 h_i); the point value where h_i = 0.
    This is what a binned pattern (pyFAI bins, strip-detector steps) records."""
    out = np.empty(x.shape[0])
    g0, l0, k, kg = _pseudo_voigt_constants(fwhm)
    for i in range(x.shape[0]):
        h = half_width[i]
        u = x[i] - centre
        if h > 1e-6 * fwhm:
            out[i] = (pseudo_voigt_cdf(u + h, fwhm, eta) - pseudo_voigt_cdf(u - h, fwhm, eta)) / (2.0 * h)
        else:
            out[i] = eta * l0 / (1.0 + k * u * u) + (1.0 - eta) * g0 * math.exp(-kg * u * u)
    return out


@numba.njit(cache=True)
def pattern_sum(x: np.ndarray, half_width: np.ndarray, centres: np.ndarray, fwhm: np.ndarray,
                areas: np.ndarray, eta: float) -> np.ndarray:
    """Sum_j areas[j] * <pV(x; centres[j], fwhm[j], eta)>_bin, bins [x - h, x + h] (h = 0: point
    values). Lines are truncated at 60 FWHM (the Lorentzian tail beyond carries < 0.6 % of
    eta * area)."""
    order = np.argsort(x)
    xs = x[order]
    hs = half_width[order]
    acc = np.zeros(x.shape[0])
    for j in range(centres.shape[0]):
        c = centres[j]
        if not np.isfinite(c):
            continue
        lo = np.searchsorted(xs, c - 60.0 * fwhm[j])
        hi = np.searchsorted(xs, c + 60.0 * fwhm[j])
        if hi <= lo:
            continue
        acc[lo:hi] += areas[j] * pseudo_voigt_bin_average(xs[lo:hi], hs[lo:hi], c, fwhm[j], eta)
    out = np.empty_like(acc)
    out[order] = acc
    return out


def make_phase(name: str, cell: MonoclinicCell, wavelength_A: float = DEFAULT_WAVELENGTH_A,
               d_min_A: float = 1.2, intensity_salt: int | None = None, base_salt: int = 1,
               debye_waller_B_A2: float = 3.0,
               caglioti_uvw=(0.002, -0.0004, 0.0005), eta: float = 0.3) -> Phase:
    """Build a Phase with the synthetic intensities described in the module docstring.

    ``base_salt`` seeds the Wilson |F|^2 (shared by related phases), ``intensity_salt``
    (optional) seeds the multiplicative modification in [0.55, 1.45) of a derived phase.
    """
    if not wavelength_A > 0:
        raise ValueError(f"wavelength must be positive, got {wavelength_A} angstrom")
    h, k, l, d, mult = _unique_reflections(cell, d_min_A)
    u = _hash_uniform(h, k, l, base_salt)
    f2 = -np.log1p(-u)                      # exponential(1): acentric Wilson statistics
    # Porous frameworks have strong low-angle lines: weight by a smooth low-angle envelope.
    f2 = f2 * (1.0 + 4.0 * np.exp(-((1.0 / d) / 0.12) ** 2))
    if intensity_salt is not None:
        f2 = f2 * (0.55 + 0.9 * _hash_uniform(h, k, l, intensity_salt))
    tth = two_theta_deg(d, wavelength_A)
    theta = np.radians(tth) / 2.0
    lp = 1.0 / (np.sin(theta) ** 2 * np.cos(theta))
    s = 1.0 / (2.0 * d)
    inten = mult * f2 * lp * np.exp(-2.0 * debye_waller_B_A2 * s * s)
    inten = np.where(np.isfinite(inten), inten, 0.0)
    inten = 100.0 * inten / inten.max()
    return Phase(name=name, cell=cell, wavelength_A=float(wavelength_A), hkl=np.stack([h, k, l], 1),
                 d_A=d, intensity=inten, caglioti_uvw=tuple(caglioti_uvw), eta=float(eta))


def cpl1_phases(wavelength_A: float = DEFAULT_WAVELENGTH_A, d_min_A: float = 1.2) -> tuple[Phase, Phase]:
    """(A, B) = (empty CPL-1, Ar-loaded CPL-1) with synthetic intensities at ``wavelength_A``."""
    a = make_phase("A", CPL1_EMPTY_CELL, wavelength_A, d_min_A)
    b = make_phase("B", CPL1_AR_CELL, wavelength_A, d_min_A, intensity_salt=7)
    return a, b


@dataclasses.dataclass(frozen=True)
class PeakWindow:
    """A 2theta window [lo_deg, hi_deg] (degrees) used to measure one phase's amount."""

    phase: str
    lo_deg: float
    hi_deg: float

    def __post_init__(self) -> None:
        if self.phase not in ("A", "B"):
            raise ValueError(f"peak window phase must be 'A' or 'B', got {self.phase!r}")
        if not (np.isfinite(self.lo_deg) and np.isfinite(self.hi_deg) and self.hi_deg > self.lo_deg):
            raise ValueError(f"peak window needs lo_deg < hi_deg, got [{self.lo_deg}, {self.hi_deg}]")


def choose_peak_windows(phase_a: Phase, phase_b: Phase, tth_min_deg: float, tth_max_deg: float,
                        n_per_phase: int = 3, half_width_fwhm: float = 2.25,
                        clearance_fwhm: float = 2.0, min_relative_intensity: float = 2.0,
                        blocking_fraction: float = 0.1) -> list[PeakWindow]:
    """Pick up to ``n_per_phase`` strong low-angle windows per phase inside [tth_min, tth_max].

    A candidate window is centre +- half_width_fwhm * FWHM around a line of relative intensity
    >= min_relative_intensity. It is accepted when no line of the OTHER phase with intensity
    > blocking_fraction x the candidate's lies closer than clearance_fwhm * FWHM outside the
    window edge, and it does not overlap an already chosen window. Weaker lines (of either
    phase) near or inside the window are allowed: the window fit models every known line that
    reaches into it. Strongest candidates first; the chosen windows are returned sorted by 2theta.
    """
    phases = {"A": phase_a, "B": phase_b}
    chosen: list[PeakWindow] = []
    for name, other in (("A", "B"), ("B", "A")):
        ph, ot = phases[name], phases[other]
        tth, inten = ph.two_theta_deg, ph.intensity
        ot_tth, ot_int = ot.two_theta_deg, ot.intensity
        fw = ph.fwhm_deg(tth)
        cand = np.flatnonzero((inten >= min_relative_intensity) & (tth > tth_min_deg) & (tth < tth_max_deg))
        cand = cand[np.argsort(-inten[cand])]
        picked = 0
        for j in cand:
            lo = tth[j] - half_width_fwhm * fw[j]
            hi = tth[j] + half_width_fwhm * fw[j]
            if lo < tth_min_deg or hi > tth_max_deg:
                continue
            margin = clearance_fwhm * fw[j]
            near = (ot_tth > lo - margin) & (ot_tth < hi + margin) & (ot_int > blocking_fraction * inten[j])
            if np.any(near):
                continue
            if any(not (hi < w.lo_deg or lo > w.hi_deg) for w in chosen):
                continue
            chosen.append(PeakWindow(name, float(round(lo, 4)), float(round(hi, 4))))
            picked += 1
            if picked >= n_per_phase:
                break
    return sorted(chosen, key=lambda w: w.lo_deg)
