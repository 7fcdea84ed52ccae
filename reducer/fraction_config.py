"""Configuration of the phase-fraction estimator: the ``[reducer.fractions]`` TOML table.

:class:`FractionConfig` holds the method, the peak windows (:class:`WindowSpec`, each with the
diffraction lines (:class:`Line`) modelled inside it) and the reference intensities; every value
is checked when the configuration is built, and a bad one raises ReductionError naming it.
:meth:`FractionConfig.from_dict` reads the TOML table over a base configuration (the built-in
CPL-1 / Ar one, reducer.defaults, when the reducer reads it). beamkin/config.py knows the same
key names without importing the reducer; tests/test_config.py checks that the two agree.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from beamkin.errors import ReductionError
from beamkin.phases import Phase, PeakWindow

__all__ = ["Line", "WindowSpec", "FractionConfig", "RETIRED_KEYS", "windows_from_phases"]

#: keys of earlier versions whose behaviour made a frame's result depend on the frames seen before it
RETIRED_KEYS = {
    "learn_reference_frames": "R_A is no longer learned from pre-gas frames (results would depend on which "
                              "worker saw them); set reference_scale_a, reference_ratio_b_to_a or reference patterns",
    "position_search_every": "the line-shift search runs on every confident frame (a remembered shift would "
                             "make results depend on the number of workers)",
}


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
    """Configuration of reducer.fractions.PhaseFractionEstimator (``[reducer.fractions]`` in TOML).

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
    def from_dict(cls, d: Mapping[str, Any] | None, base: "FractionConfig | None" = None) -> "FractionConfig":
        """From a ``[reducer.fractions]`` table: keys missing from ``d`` take the values of ``base``
        (the reducer passes the CPL-1 / Ar defaults of reducer.defaults), or without a base the
        dataclass defaults, and then ``windows`` is required. Unknown or retired keys raise
        ReductionError naming them."""
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)} - {"phases"}
        unknown = set(d) - known
        retired = unknown & set(RETIRED_KEYS)
        if retired:
            raise ReductionError("; ".join(f"[reducer.fractions] {key} is no longer used: {RETIRED_KEYS[key]}"
                                           for key in sorted(retired)))
        if unknown:
            raise ReductionError(f"unknown [reducer.fractions] keys: {sorted(unknown)}")
        if base is None and "windows" not in d:
            raise ReductionError("[reducer.fractions] needs its peak windows ([[reducer.fractions.windows]])")
        kwargs = {} if base is None else {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
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
