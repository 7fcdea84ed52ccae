"""Synthetic powder-diffraction detector for the simulator: two-phase CPL-1 frames and profiles.

Expected counts of pixel p in a frame of exposure e (seconds) at phase fraction alpha:

    mu_p = e * [ S * ((1 - alpha) P_A(tth_p) + alpha P_B(tth_p)) + b(tth_p) ] * Omega_p * Pol_p

* P_X(tth) = sum_k I_k pV(tth; tth_k, FWHM_k, eta): the phase's line profile (beamkin.phases),
  relative intensities I_k (largest line 100) times area-normalised pseudo-Voigts (1/degree);
* S = ``counts_scale``: counts per second per pixel per (relative-intensity x degree);
* b(tth) = ``background``: counts per second per pixel, a float (flat) or a callable of 2theta
  in degrees; the default falls from ~30 /s/pixel at low angle to ~12 /s/pixel at 18 degrees;
  :func:`background_for_contrast` scales it so that the strongest line of phase A stands a given
  number of times above the background under it (a synchrotron MOF pattern: 10-50 times);
* Omega_p, Pol_p: pyFAI's relative solid angle and polarisation factor (0.99, synchrotron) of the
  pixel, so that pyFAI integration with the same corrections returns the bracket exactly.

The frame is a Poisson draw of mu (uint32); module gaps of the Pilatus layout are set to the
all-ones value 2**32 - 1 (masked by the reducer). The three terms (phase A, phase B, background)
are fixed pixel maps precomputed when the detector is built; a frame only mixes them per alpha.
Two exact Poisson samplers, chosen per frame by the expected counts per pixel:

* sparse frames (< ``SPARSE_COUNTS_PER_PIXEL`` counts per pixel, e.g. the simulator's 0.3 s
  frames): Poisson splitting. For each term c with weight w_c (e (1 - alpha), e alpha, e) and
  pixel rates r_cp, draw N_c ~ Poisson(w_c sum_p r_cp) and drop each of the N_c counts on pixel p
  with probability r_cp / sum_p r_cp (Walker alias table, one uniform per count). The counts of
  distinct pixels are then independent Poisson(w_c r_cp), and the sum over terms is
  Poisson(mu_p): the cost is O(counts), not O(pixels);
* dense frames: one draw per pixel (inversion of the cumulative distribution for mu < 25,
  numba's PTRS sampler above).

The MYTHEN-like profile mode returns counts per 0.006 degree step,
Poisson(e * G * [S * ((1 - alpha) <P_A> + alpha <P_B>) + b]) with gain G = ``profile_gain``
and <P> the line profile averaged over the step (default G = 4: ~10^3 background counts per
step at low angle in a 10 s exposure, ~40 in 333 ms; the strongest line peaks ~20 times higher).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import numba
import numpy as np

from beamkin.geometry import azimuthal_integrator_from_metadata
from beamkin.phases import Phase, cpl1_phases

__all__ = ["SyntheticPowderDetector", "default_metadata", "default_background", "background_for_contrast"]

PILATUS_1M_SHAPE = (1043, 981)
PILATUS_PIXEL_M = 172e-6
ALL_ONES_U32 = np.uint32(0xFFFFFFFF)
#: Below this many expected counts per pixel a frame is drawn by Poisson splitting (O(counts)).
SPARSE_COUNTS_PER_PIXEL = 2.0


def default_metadata(series_id: str = "synthetic-cpl1-ar", frame_time_s: float = 1.0 / 3.0,
                     exposure_s: float = 1.0 / 3.0, n_frames: int | None = 37,
                     gas_time_s: float | None = 7.0) -> dict:
    """Start-message dict of the synthetic Pilatus 1M-size experiment (BL02B2-like).

    Geometry: 0.6 m sample-detector distance, beam centre at x = 490, y = 1000 pixels (near the
    lower edge), wavelength 0.8 angstrom: 2theta from ~0 to 17.7 degrees, the strong CPL-1
    lines at 4.5 - 6.5 degrees on rings of radius ~270 - 380 pixels.
    """
    return {
        "series_id": series_id,
        "kind": "image",
        "detector": {"name": "Pilatus 1M", "shape": list(PILATUS_1M_SHAPE),
                     "pixel_size_m": [PILATUS_PIXEL_M, PILATUS_PIXEL_M], "saturation": 1_048_500},
        "geometry": {"distance_m": 0.6, "beam_center_px": [490.0, 1000.0], "wavelength_A": 0.8,
                     "rot1_rad": 0.0, "rot2_rad": 0.0, "rot3_rad": 0.0, "poni_file": None},
        "frame_time_s": float(frame_time_s),
        "exposure_s": float(exposure_s),
        "n_frames": n_frames,
        "gas_time_s": gas_time_s,
    }


def default_background(tth_deg: np.ndarray) -> np.ndarray:
    """Smooth background, counts per second per pixel: 12 + 18 exp(-(2theta - 2 deg) / 6 deg)
    (air and amorphous scattering falling with angle)."""
    tth = np.asarray(tth_deg, dtype=np.float64)
    return 12.0 + 18.0 * np.exp(-(tth - 2.0) / 6.0)


def background_for_contrast(phase: Phase, counts_scale: float, peak_to_background: float,
                            shape: Callable = default_background) -> Callable:
    """Background b(2theta) = c * shape(2theta) (counts per second per pixel) with c chosen so that
    the strongest line of ``phase`` peaks ``peak_to_background`` times above the background
    under it:  S * max_tth P(tth) = peak_to_background * b(tth at that maximum).

    Solid angle and polarisation multiply line and background alike, so the ratio holds in
    every pixel and in the integrated pattern. Real synchrotron patterns of MOF powders show
    their strong low-angle lines 10-50 times above the background.
    """
    if not (peak_to_background > 0 and math.isfinite(peak_to_background)):
        raise ValueError(f"peak_to_background must be a positive number, got {peak_to_background}")
    centres = phase.two_theta_deg[np.argsort(phase.intensity)[-8:]]  # the strongest lines
    grid = (centres[:, None] + np.linspace(-0.05, 0.05, 201)[None, :]).ravel()
    profile = phase.pattern(grid)
    peak_tth = float(grid[np.argmax(profile)])
    peak_rate = counts_scale * float(profile.max())
    factor = peak_rate / (peak_to_background * float(np.asarray(shape(np.array([peak_tth])))[0]))

    def background(tth_deg: np.ndarray) -> np.ndarray:
        return factor * np.asarray(shape(tth_deg), dtype=np.float64)

    background.scale = factor  # type: ignore[attr-defined]
    return background


def _pilatus_gap_mask(shape: tuple[int, int]) -> np.ndarray:
    """Pilatus module gaps: modules of 195 rows x 487 columns separated by 17-row and 7-column gaps."""
    mask = np.zeros(shape, dtype=bool)
    ny, nx = shape
    for y0 in range(195, ny, 195 + 17):
        mask[y0:y0 + 17, :] = True
    for x0 in range(487, nx, 487 + 7):
        mask[:, x0:x0 + 7] = True
    return mask


@numba.njit(cache=True)
def _render_frame(rate_a: np.ndarray, rate_b: np.ndarray, rate_bg: np.ndarray, alpha: float,
                  exposure: float, seed: int, out: np.ndarray) -> None:
    """out[i] = Poisson(exposure * ((1-alpha) rate_a[i] + alpha rate_b[i] + rate_bg[i]));
    rate_bg < 0 marks a gap pixel, set to the all-ones value. Single-threaded: reproducible.

    Exact Poisson draws: inversion of the cumulative distribution with one uniform for
    mu < 25 (the bulk of the pixels), numba's PTRS sampler above."""
    np.random.seed(seed)
    wa = exposure * (1.0 - alpha)
    wb = exposure * alpha
    for i in range(out.shape[0]):
        bg = rate_bg[i]
        if bg < 0.0:
            out[i] = 0xFFFFFFFF
            continue
        mu = wa * rate_a[i] + wb * rate_b[i] + exposure * bg
        if mu < 25.0:
            u = np.random.random()
            p = math.exp(-mu)
            cdf = p
            k = 0
            while u > cdf and k < 200:
                k += 1
                p *= mu / k
                cdf += p
            out[i] = k
        else:
            out[i] = np.random.poisson(mu)


@numba.njit(cache=True)
def _alias_table(rates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table of the distribution p_i = rates_i / sum(rates): draw
    u ~ U(0, n), i = floor(u); take i if u - i < prob[i], else alias[i]."""
    n = rates.shape[0]
    total = 0.0
    for i in range(n):
        total += rates[i]
    prob = np.ones(n)
    alias = np.arange(n).astype(np.int32)
    if not total > 0.0:  # an empty term: never sampled (its Poisson total is 0)
        return prob, alias
    small = np.empty(n, dtype=np.int32)
    large = np.empty(n, dtype=np.int32)
    n_small = 0
    n_large = 0
    for i in range(n):
        prob[i] = rates[i] * n / total
        if prob[i] < 1.0:
            small[n_small] = i
            n_small += 1
        else:
            large[n_large] = i
            n_large += 1
    while n_small > 0 and n_large > 0:
        n_small -= 1
        s = small[n_small]
        g = large[n_large - 1]
        alias[s] = g
        prob[g] = (prob[g] + prob[s]) - 1.0
        if prob[g] < 1.0:
            n_large -= 1
            small[n_small] = g
            n_small += 1
    for j in range(n_large):
        prob[large[j]] = 1.0
    for j in range(n_small):  # round-off leftovers
        prob[small[j]] = 1.0
    return prob, alias


@numba.njit(cache=True)
def _split_counts(totals: np.ndarray, weights: np.ndarray, probs: np.ndarray, aliases: np.ndarray,
                  gaps: np.ndarray, seed: int, out: np.ndarray) -> None:
    """out = sum over terms c of Poisson(weights[c] * rate_c) by Poisson splitting: N_c ~
    Poisson(weights[c] * totals[c]) counts, each placed by the alias table (probs[c], aliases[c]);
    gap pixels (gaps[i] true) are set to the all-ones value. Single-threaded: reproducible."""
    np.random.seed(seed)
    out[:] = 0
    n = out.shape[0]
    for c in range(totals.shape[0]):
        lam = weights[c] * totals[c]
        if lam <= 0.0:
            continue
        count = np.random.poisson(lam)
        prob = probs[c]
        alias = aliases[c]
        for _ in range(count):
            u = np.random.random() * n
            i = int(u)
            if i >= n:
                i = n - 1
            if u - i < prob[i]:
                out[i] += 1
            else:
                out[alias[i]] += 1
    for i in range(n):
        if gaps[i]:
            out[i] = 0xFFFFFFFF


class SyntheticPowderDetector:
    """Renders two-phase powder frames (2D, uint32) and strip-detector profiles.

    ``metadata``: start-message dict (``default_metadata()`` when None); ``phase_a``/``phase_b``:
    beamkin.phases.Phase objects (CPL-1 empty / Ar-loaded by default); ``background``: counts per
    second per pixel, float or callable of 2theta (degrees); ``counts_scale``: S in the module
    docstring; ``seed``: RNG seed (frames are reproducible: frame n uses seed + n);
    ``peak_to_background``: when given, ``background`` (its shape) is rescaled by
    :func:`background_for_contrast` so that phase A's strongest line peaks this many times above
    the background under it.
    """

    def __init__(self, metadata: Mapping[str, Any] | None = None, phase_a: Phase | None = None,
                 phase_b: Phase | None = None, background: float | Callable = default_background,
                 counts_scale: float = 0.15, seed: int = 0, profile_step_deg: float = 0.006,
                 profile_range_deg: tuple[float, float] = (2.0, 17.0), profile_gain: float = 4.0,
                 polarization_factor: float = 0.99, peak_to_background: float | None = None):
        self.metadata = copy.deepcopy(dict(default_metadata() if metadata is None else metadata))
        if phase_a is None or phase_b is None:
            wl = float(self.metadata["geometry"]["wavelength_A"])
            da, db = cpl1_phases(wl)
            phase_a = phase_a or da
            phase_b = phase_b or db
        if not counts_scale > 0:
            raise ValueError(f"counts_scale must be positive, got {counts_scale}")
        self.phase_a, self.phase_b = phase_a, phase_b
        self.counts_scale = float(counts_scale)
        self.background = background if callable(background) else (lambda t, b=float(background): np.full_like(np.asarray(t, float), b))
        if peak_to_background is not None:
            self.background = background_for_contrast(self.phase_a, self.counts_scale, float(peak_to_background),
                                                      shape=self.background)
        self.seed = int(seed)
        self._frame_counter = 0
        self.shape = tuple(int(v) for v in self.metadata["detector"]["shape"])

        ai = azimuthal_integrator_from_metadata(self.metadata)
        tth = ai.center_array(self.shape, unit="2th_deg")
        corr = ai.solidAngleArray(self.shape) * ai.polarization(self.shape, factor=polarization_factor)
        self.two_theta_deg = tth.astype(np.float64)
        # Phase profiles on a fine grid, interpolated at pixel centres (step 0.0005 deg << FWHM).
        grid = np.arange(max(tth.min() - 0.01, 0.0), tth.max() + 0.01, 0.0005)
        pa = self.phase_a.pattern(grid)
        pb = self.phase_b.pattern(grid)
        flat_tth = tth.ravel()
        self._rate_a = (self.counts_scale * np.interp(flat_tth, grid, pa) * corr.ravel()).astype(np.float64)
        self._rate_b = (self.counts_scale * np.interp(flat_tth, grid, pb) * corr.ravel()).astype(np.float64)
        bg = np.asarray(self.background(flat_tth), dtype=np.float64) * corr.ravel()
        if np.any(bg < 0):
            raise ValueError("background must be non-negative")
        gaps = _pilatus_gap_mask(self.shape) if self.shape == PILATUS_1M_SHAPE else np.zeros(self.shape, bool)
        self.gap_mask = gaps
        self._rate_bg = np.where(gaps.ravel(), -1.0, bg)
        # Poisson splitting tables of the three terms (gap pixels have rate 0), built on first use.
        self._gaps_flat = np.ascontiguousarray(gaps.ravel())
        self._split_tables: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        # Profile mode grid (MYTHEN-like).
        lo, hi = profile_range_deg
        if not (hi > lo and profile_step_deg > 0):
            raise ValueError(f"bad profile range {profile_range_deg} or step {profile_step_deg}")
        self.profile_two_theta_deg = np.arange(lo, hi + 0.5 * profile_step_deg, profile_step_deg)
        self.profile_gain = float(profile_gain)
        pt = self.profile_two_theta_deg
        # A strip integrates over its step: bin-averaged line profiles.
        self._prof_a = self.profile_gain * self.counts_scale * self.phase_a.pattern(pt, bin_width_deg=profile_step_deg)
        self._prof_b = self.profile_gain * self.counts_scale * self.phase_b.pattern(pt, bin_width_deg=profile_step_deg)
        self._prof_bg = self.profile_gain * np.asarray(self.background(pt), dtype=np.float64)

    # -------------------------------------------------------------------------------------------
    def _next_seed(self, seed: int | None) -> int:
        if seed is not None:
            return int(seed)
        self._frame_counter += 1
        return (self.seed * 1_000_003 + self._frame_counter) % (2**31 - 1)

    @staticmethod
    def _check(alpha: float, exposure_s: float) -> None:
        if not (0.0 <= alpha <= 1.0):
            raise ValueError(f"phase fraction alpha must be in [0, 1], got {alpha}")
        if not (exposure_s > 0 and math.isfinite(exposure_s)):
            raise ValueError(f"exposure must be positive seconds, got {exposure_s}")

    def expected_image(self, alpha: float, exposure_s: float) -> np.ndarray:
        """Expected counts per pixel (float64, gaps = NaN) for phase fraction alpha and exposure (s)."""
        self._check(alpha, exposure_s)
        mu = exposure_s * ((1 - alpha) * self._rate_a + alpha * self._rate_b + np.where(self._rate_bg < 0, np.nan, self._rate_bg))
        return mu.reshape(self.shape)

    def image(self, alpha: float, exposure_s: float, seed: int | None = None) -> np.ndarray:
        """Poisson frame (uint32, shape [ny, nx]) at phase fraction alpha after exposure_s seconds;
        gap pixels hold 2**32 - 1."""
        self._check(alpha, exposure_s)
        out = np.empty(self._rate_a.shape[0], dtype=np.uint32)
        weights = np.array([exposure_s * (1.0 - alpha), exposure_s * alpha, exposure_s])
        tables = self._poisson_split_tables()
        if float(weights @ tables[0]) < SPARSE_COUNTS_PER_PIXEL * out.size:
            _split_counts(tables[0], weights, tables[1], tables[2], self._gaps_flat, self._next_seed(seed), out)
        else:
            _render_frame(self._rate_a, self._rate_b, self._rate_bg, float(alpha), float(exposure_s),
                          self._next_seed(seed), out)
        return out.reshape(self.shape)

    def _poisson_split_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(total rate of each term in counts/s, alias probabilities [3, P], aliases [3, P])."""
        if self._split_tables is None:
            bg = np.where(self._gaps_flat, 0.0, self._rate_bg)
            terms = [np.where(self._gaps_flat, 0.0, rate) for rate in (self._rate_a, self._rate_b)] + [bg]
            tables = [_alias_table(np.ascontiguousarray(rate)) for rate in terms]
            self._split_tables = (np.array([rate.sum() for rate in terms]),
                                  np.stack([t[0] for t in tables]), np.stack([t[1] for t in tables]))
        return self._split_tables

    def expected_profile(self, alpha: float, exposure_s: float) -> tuple[np.ndarray, np.ndarray]:
        """(2theta degrees, expected counts per step) of the strip-detector mode."""
        self._check(alpha, exposure_s)
        mu = exposure_s * ((1 - alpha) * self._prof_a + alpha * self._prof_b + self._prof_bg)
        return self.profile_two_theta_deg.copy(), mu

    def profile(self, alpha: float, exposure_s: float, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(2theta degrees, Poisson counts per 0.006 degree step as int64) of the MYTHEN-like mode."""
        tth, mu = self.expected_profile(alpha, exposure_s)
        rng = np.random.default_rng(self._next_seed(seed))
        return tth, rng.poisson(mu).astype(np.int64)
