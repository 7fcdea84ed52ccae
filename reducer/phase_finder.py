"""``beamkin phases REF_A REF_B``: a [reducer.fractions] table from two measured reference patterns
(the analysis; beamkin.phases_command reads the references and runs it).

A new material in minutes (docs/design.md; issue 12.5). Input: a pattern of the pure empty phase
A and one of the pure loaded phase B, recorded with the same incident flux and exposure, as

* 1D text profiles, the formats the ``files:`` source reads and pyFAI writes (``.xy``, ``.xye``,
  ``.dat``: columns 2theta in degrees, intensity, optional sigma; a pyFAI header naming the unit
  ``q_nm^-1`` or ``q_A^-1`` and the ``Wavelength`` is converted to 2theta);
* 2D frames (CBF / EDF / TIFF, any format fabio reads) and EIGER master files
  (``NAME_master.h5`` or ``NAME_master.h5:FIRST-LAST``, the mean pattern of those frames):
  integrated with the reducer's own integrator, geometry from the file header, the ``[reducer]``
  keys and PONI file (stream < TOML < PONI, beamkin.geometry);
* frames of a beamkin recording: ``RUN.h5:SERIES`` or ``RUN.h5:SERIES:FIRST-LAST`` (frame
  indices, inclusive), the mean of the recorded patterns of those frames.

Steps (each a function below):

1. background: SNIP clipping (Ryan et al., NIM B 34 (1988) 396; Morhac et al., NIM A 401 (1997)
   113) on the log-log-sqrt transformed pattern, with a clipping half-width of
   ``background_width_deg``;
2. lines: local maxima of the net pattern with a prominence above ``min_snr`` sigma
   (scipy.signal.find_peaks); overlapping lines are fitted together by weighted least squares
   (scipy.optimize.least_squares) as bin-averaged area-normalised pseudo-Voigt profiles
   (beamkin.phases) on a local linear background: centre and FWHM (degrees 2theta), Lorentzian
   fraction eta, integrated intensity (area, pattern units x degrees);
3. relative intensities: area / area of the phase's strongest line x 100;
4. windows: beamkin.phases.choose_peak_windows picks, per phase, strong lines with no line of the
   other phase within ``clearance`` FWHM (the lines that separate the two phases); each window
   lists every line of either phase that reaches into it (within 6 FWHM, >= 0.2 % of the
   strongest such line), as the peaks method models them;
5. reference ratio rho = R_B / R_A: the peaks method's own fit of the two references
   (PhaseFractionEstimator.calibrate_from_reference_patterns), so the table is self-consistent;
6. whole-pattern references: the fitted lines of each phase summed without background (per unit
   phase fraction, since both references were recorded alike), written next to the TOML as
   ``<stem>_phase_a.xy`` and ``<stem>_phase_b.xy``.

Output: the TOML (``method = "peaks"``; ``method = "whole_pattern"`` uses the same table) and
``<stem>.png``, the references with the chosen windows shaded and the fitted lines marked.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "ReferencePattern", "MeasuredLine", "MeasuredPhase", "PhaseTable",
    "reference_pattern", "snip_background", "find_lines", "build_phase_table", "write_outputs",
]

MAX_GROUP_LINES = 6     # overlapping lines fitted together at most (a longer run is split at its widest gaps)
MAX_LINES = 400         # lines kept per reference (the most prominent)
MAX_FIT_EVALUATIONS = 60  # least-squares iterations per group (clean lines converge in about 10)
TAIL_FWHM = 6.0          # lines of either phase within this many FWHM of a window are modelled in it
MIN_LINE_FRACTION = 0.002  # ... if at least this fraction of the strongest such line


class PhaseFinderError(ValueError):
    """A reference that cannot be read or analysed (the message names the file and the problem)."""


@dataclasses.dataclass
class ReferencePattern:
    """A reference pattern: 2theta (degrees, increasing), intensity and its one-sigma noise."""

    label: str
    two_theta_deg: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray

    def pattern(self):
        from reducer.integrate import Pattern

        return Pattern.from_profile(self.two_theta_deg, self.intensity, self.sigma)


@dataclasses.dataclass(frozen=True)
class MeasuredLine:
    """A fitted line: centre and FWHM in degrees 2theta, pseudo-Voigt eta, integrated intensity
    (pattern units x degrees), and the one-sigma uncertainties of area and centre."""

    center_deg: float
    fwhm_deg: float
    eta: float
    area: float
    sigma_area: float
    sigma_center_deg: float


class MeasuredPhase:
    """A phase as beamkin.phases.choose_peak_windows sees it: line positions (degrees 2theta),
    relative intensities (strongest = 100) and FWHM per line (interpolated between lines)."""

    def __init__(self, name: str, lines: Sequence[MeasuredLine]):
        if not lines:
            raise PhaseFinderError(f"reference {name}: no diffraction line found")
        order = np.argsort([l.center_deg for l in lines])
        self.name = name
        self.lines = [lines[i] for i in order]
        top = max(l.area for l in self.lines)
        self.two_theta_deg = np.array([l.center_deg for l in self.lines])
        self.intensity = np.array([100.0 * l.area / top for l in self.lines])
        self._fwhm = np.array([l.fwhm_deg for l in self.lines])
        self.strongest_area = top

    def fwhm_deg(self, tth_deg) -> np.ndarray:
        return np.interp(np.asarray(tth_deg, float), self.two_theta_deg, self._fwhm)

    def pattern(self, tth_deg: np.ndarray) -> np.ndarray:
        """The fitted lines summed on a grid (bin-averaged over the grid's steps), no background."""
        from beamkin.phases import pseudo_voigt_bin_average

        x = np.ascontiguousarray(tth_deg, dtype=float)
        half = 0.5 * np.abs(np.gradient(x)) if x.shape[0] > 1 else np.zeros_like(x)
        out = np.zeros_like(x)
        for line in self.lines:
            near = np.flatnonzero(np.abs(x - line.center_deg) < 60.0 * line.fwhm_deg)
            if near.size:
                out[near] += line.area * pseudo_voigt_bin_average(
                    np.ascontiguousarray(x[near]), np.ascontiguousarray(half[near]), line.center_deg,
                    line.fwhm_deg, line.eta)
        return out


# ------------------------------------------------------------------------------------ input
def reference_pattern(label: str, x, y, s=None) -> ReferencePattern:
    """A ReferencePattern from arrays (2theta in degrees, intensity, sigma or None): non-finite points
    and sigma <= 0 dropped; sigma estimated from the data (:func:`_noise_from_data`) when not given.
    PhaseFinderError for fewer than 50 usable points or 2theta not increasing."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if s is not None:
        s = np.asarray(s, float)
        ok &= np.isfinite(s) & (s > 0)
    x, y = x[ok], y[ok]
    if x.shape[0] < 50:
        raise PhaseFinderError(f"reference {label} has {x.shape[0]} usable points, need at least 50")
    if not np.all(np.diff(x) > 0):
        raise PhaseFinderError(f"reference {label}: 2theta must increase")
    s = s[ok] if s is not None else _noise_from_data(y)
    return ReferencePattern(label, x, y, s)


def _noise_from_data(y: np.ndarray) -> np.ndarray:
    """sigma_i = sqrt(g max(y_i, y_floor)) with the gain g from the scatter of second differences
    (var(y[i-1] - 2 y[i] + y[i+1]) = 6 sigma^2 for independent noise): g = 1 for raw counts."""
    d2 = y[:-2] - 2.0 * y[1:-1] + y[2:]
    mad = 1.4826 * float(np.median(np.abs(d2 - np.median(d2))))
    level = max(float(np.median(y)), 1e-12)
    gain = max(mad * mad / 6.0 / level, 1e-12)
    return np.sqrt(gain * np.maximum(y, 0.5 * level))


# ------------------------------------------------------------------------------------ analysis
def snip_background(y: np.ndarray, half_width_bins: int) -> np.ndarray:
    """SNIP background of a pattern: on v = ln(ln(sqrt(y + 1) + 1) + 1), for p = 1 .. m,
    v_i <- min(v_i, (v_{i-p} + v_{i+p}) / 2); then transformed back. m = half_width_bins."""
    v = np.log(np.log(np.sqrt(np.maximum(y, 0.0) + 1.0) + 1.0) + 1.0)
    n = v.shape[0]
    for p in range(1, min(int(half_width_bins), (n - 1) // 2) + 1):
        mean = 0.5 * (v[: n - 2 * p] + v[2 * p:])
        v[p: n - p] = np.minimum(v[p: n - p], mean)
    return (np.exp(np.exp(v) - 1.0) - 1.0) ** 2 - 1.0


def _fit_group(x, net, sigma, half, peaks: list[tuple[float, float, float]]):
    """Least-squares fit of overlapping lines [(centre, fwhm, height)] on a linear background.
    Returns [MeasuredLine]."""
    from scipy.optimize import least_squares

    from beamkin.phases import pseudo_voigt_bin_average

    lo = min(c - 4.0 * w for c, w, _ in peaks)
    hi = max(c + 4.0 * w for c, w, _ in peaks)
    sel = np.flatnonzero((x >= lo) & (x <= hi))
    xs, ys, ss, hs = (np.ascontiguousarray(a[sel]) for a in (x, net, sigma, half))
    mid = 0.5 * (lo + hi)
    p0, lower, upper = [], [], []
    for c, w, height in peaks:
        area = max(height, 1e-12) * w * 1.2
        p0 += [c, w, 0.3, area]
        lower += [c - 0.5 * w, 0.3 * w, 0.0, 0.0]
        upper += [c + 0.5 * w, 3.0 * w, 1.0, np.inf]
    p0 += [0.0, 0.0]
    lower += [-np.inf, -np.inf]
    upper += [np.inf, np.inf]

    def model(p):
        out = p[-2] + p[-1] * (xs - mid)
        for j in range(len(peaks)):
            c, w, eta, area = p[4 * j: 4 * j + 4]
            out = out + area * pseudo_voigt_bin_average(xs, hs, c, w, eta)
        return out

    result = least_squares(lambda p: (model(p) - ys) / ss, np.array(p0), bounds=(lower, upper), x_scale="jac",
                           max_nfev=MAX_FIT_EVALUATIONS)
    p = result.x
    dof = max(sel.shape[0] - p.shape[0], 1)
    chi2_red = float(np.sum(result.fun**2) / dof)
    try:
        cov = np.linalg.pinv(result.jac.T @ result.jac) * max(chi2_red, 1.0)
    except np.linalg.LinAlgError:
        cov = np.full((p.shape[0], p.shape[0]), np.nan)
    lines = []
    for j in range(len(peaks)):
        c, w, eta, area = (float(v) for v in p[4 * j: 4 * j + 4])
        lines.append(MeasuredLine(c, w, eta, area, float(math.sqrt(max(cov[4 * j + 3, 4 * j + 3], 0.0))),
                                  float(math.sqrt(max(cov[4 * j, 4 * j], 0.0)))))
    return lines


def find_lines(ref: ReferencePattern, min_snr: float = 5.0, background_width_deg: float = 0.2
               ) -> tuple[list[MeasuredLine], np.ndarray]:
    """(fitted lines, SNIP background) of one reference (steps 1-2 of the module doc)."""
    from scipy.signal import find_peaks, peak_widths

    x, y, s = ref.two_theta_deg, ref.intensity, ref.sigma
    step = float(np.median(np.diff(x)))
    background = snip_background(y, max(2, int(round(background_width_deg / step))))
    net = y - background
    peaks, props = find_peaks(net, prominence=min_snr * s, width=1.0)
    if peaks.size == 0:
        return [], background
    if peaks.size > MAX_LINES:
        keep = np.sort(np.argsort(-props["prominences"])[:MAX_LINES])
        peaks = peaks[keep]
    widths = peak_widths(net, peaks, rel_height=0.5)[0] * step
    half = 0.5 * np.abs(np.gradient(x))
    found = sorted((float(x[i]), max(float(w), 1.5 * step), float(net[i])) for i, w in zip(peaks, widths))
    groups, current = [], [found[0]]
    for peak in found[1:]:
        previous = current[-1]
        if peak[0] - previous[0] < 2.0 * (peak[1] + previous[1]):
            current.append(peak)
        else:
            groups.append(current)
            current = [peak]
    groups.append(current)
    groups = [part for group in groups for part in _split_group(group)]
    lines = []
    for group in groups:
        lines += [l for l in _fit_group(x, net, s, half, group) if l.area > 0]
    return lines, background


def _split_group(group: list) -> list[list]:
    """A run of overlapping lines cut at its widest gaps into parts of at most MAX_GROUP_LINES
    (the fit's cost grows with the cube of the number of lines)."""
    if len(group) <= MAX_GROUP_LINES:
        return [group]
    gaps = np.diff([p[0] for p in group])
    cut = int(np.argmax(gaps[1:-1])) + 2 if len(group) > 3 else len(group) // 2
    return _split_group(group[:cut]) + _split_group(group[cut:])


@dataclasses.dataclass
class PhaseTable:
    """What `beamkin phases` found: both phases' lines, the chosen windows (reducer.fractions
    WindowSpec), rho = R_B / R_A and the FractionConfig written out."""

    phase_a: MeasuredPhase
    phase_b: MeasuredPhase
    background_a: np.ndarray
    background_b: np.ndarray
    config: Any   # reducer.fractions.FractionConfig
    search_range_deg: tuple[float, float]


def _windows_from_lines(phase_a: MeasuredPhase, phase_b: MeasuredPhase, windows) -> list:
    """WindowSpecs: every line of either phase within TAIL_FWHM FWHM of the window and at least
    MIN_LINE_FRACTION of the strongest such line (relative intensities, eta per line)."""
    from reducer.fraction_config import Line, WindowSpec

    specs = []
    for w in windows:
        near = [(phase.name, line, float(rel)) for phase in (phase_a, phase_b)
                for line, rel in zip(phase.lines, phase.intensity)
                if w.lo_deg - TAIL_FWHM * line.fwhm_deg < line.center_deg < w.hi_deg + TAIL_FWHM * line.fwhm_deg]
        top = max(rel for _, _, rel in near)
        lines = tuple(Line(name, round(line.center_deg, 5), float(f"{line.fwhm_deg:.5g}"), float(f"{rel:.5g}"),
                           round(min(max(line.eta, 0.0), 1.0), 3))
                      for name, line, rel in near if rel >= MIN_LINE_FRACTION * top and rel > 0)
        specs.append(WindowSpec(w.phase, w.lo_deg, w.hi_deg, lines))
    return specs


def build_phase_table(ref_a: ReferencePattern, ref_b: ReferencePattern,
                      search_range_deg: tuple[float, float] | None = None, n_per_phase: int = 3,
                      min_snr: float = 5.0, background_width_deg: float = 0.2,
                      reference_files: tuple[str, str] | None = None) -> PhaseTable:
    """Steps 1-5 of the module doc. ``search_range_deg``: where windows may lie (default: the
    range both references cover, less 1 % at each end); ``reference_files``: the whole-pattern
    reference paths written into the table (None: no whole-pattern references)."""
    from reducer.fraction_config import FractionConfig
    from reducer.fractions import PhaseFractionEstimator
    from reducer.integrate import ReductionError
    from beamkin.phases import choose_peak_windows

    lines_a, bg_a = find_lines(ref_a, min_snr, background_width_deg)
    lines_b, bg_b = find_lines(ref_b, min_snr, background_width_deg)
    phase_a, phase_b = MeasuredPhase("A", lines_a), MeasuredPhase("B", lines_b)
    lo = max(ref_a.two_theta_deg[0], ref_b.two_theta_deg[0])
    hi = min(ref_a.two_theta_deg[-1], ref_b.two_theta_deg[-1])
    if search_range_deg is None:
        margin = 0.01 * (hi - lo)
        search_range_deg = (float(lo + margin), float(hi - margin))
    search_range_deg = (max(float(search_range_deg[0]), float(lo)), min(float(search_range_deg[1]), float(hi)))
    windows = choose_peak_windows(phase_a, phase_b, *search_range_deg, n_per_phase=n_per_phase)
    have = {w.phase for w in windows}
    if have != {"A", "B"}:
        missing = sorted({"A", "B"} - have)
        raise PhaseFinderError(f"no line of phase {', '.join(missing)} in [{search_range_deg[0]:.4g}, "
                               f"{search_range_deg[1]:.4g}] deg is free of the other "
                               "phase's lines: widen --range or measure longer references")
    try:
        specs = _windows_from_lines(phase_a, phase_b, windows)
    except ReductionError as exc:
        raise PhaseFinderError(f"the lines found do not make usable windows: {exc}") from exc
    extra = {}
    if reference_files is not None:
        extra = {"reference_pattern_a": reference_files[0], "reference_pattern_b": reference_files[1]}
    try:
        config = FractionConfig(windows=specs, method="peaks", reference_ratio_b_to_a=1.0,
                                whole_pattern_range_deg=search_range_deg)
        rho = PhaseFractionEstimator(config).calibrate_from_reference_patterns(ref_a.pattern(), ref_b.pattern())
        config = FractionConfig(windows=specs, method="peaks", reference_ratio_b_to_a=float(f"{rho:.6g}"),
                                whole_pattern_range_deg=search_range_deg, **extra)
    except ReductionError as exc:
        raise PhaseFinderError(f"the chosen windows do not fit the references: {exc}") from exc
    return PhaseTable(phase_a, phase_b, bg_a, bg_b, config, search_range_deg)


# ------------------------------------------------------------------------------------ output
def _toml_text(table: PhaseTable, header_lines: Sequence[str]) -> str:
    from reducer.defaults import to_toml

    fractions = table.config.to_dict()
    fractions["whole_pattern_range_deg"] = [round(v, 4) for v in table.config.whole_pattern_range_deg]
    body = to_toml({"fractions": fractions})
    return "".join(f"# {line}\n" if line else "#\n" for line in header_lines) + "\n" + body


def write_outputs(table: PhaseTable, ref_a: ReferencePattern, ref_b: ReferencePattern, out: Path,
                  command: str) -> dict[str, Path]:
    """Write the TOML, the whole-pattern references (``<stem>_phase_a.xy``, ``_phase_b.xy``) and
    ``<stem>.png``. Returns their paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"toml": out, "png": out.with_suffix(".png"),
             "phase_a": Path(table.config.reference_pattern_a), "phase_b": Path(table.config.reference_pattern_b)}
    for key, phase, ref in (("phase_a", table.phase_a, ref_a), ("phase_b", table.phase_b, ref_b)):
        model = phase.pattern(ref.two_theta_deg)
        np.savetxt(paths[key], np.column_stack([ref.two_theta_deg, model]), fmt="%.6f %.8g",
                   header=f"phase {phase.name}: fitted lines of {ref.label} without background (beamkin phases)\n"
                          "2theta_deg intensity")
    cfg = table.config
    header = [
        f"[reducer.fractions] written by: {command}",
        f"A (empty) = {ref_a.label}: {len(table.phase_a.lines)} lines; B (loaded) = {ref_b.label}: "
        f"{len(table.phase_b.lines)} lines.",
        "Each window lists every line of either phase reaching into it (centre, FWHM in degrees 2theta,",
        "pseudo-Voigt eta, intensity relative to the phase's strongest line = 100); only the lines of the",
        "window's own phase centred inside it are measured. reference_ratio_b_to_a = R_B / R_A from the",
        "peaks fit of the two references (recorded with equal flux and exposure).",
        'method = "whole_pattern" uses the same table: the fitted lines of each reference without',
        f"background ({paths['phase_a'].name}, {paths['phase_b'].name}) over whole_pattern_range_deg.",
        f"Image: {paths['png'].name}.",
    ]
    out.write_text(_toml_text(table, header))
    _draw(table, ref_a, ref_b, paths["png"])
    logger.info("phase table: %d windows, rho = %.6g; wrote %s", len(cfg.windows), cfg.reference_ratio_b_to_a, out)
    return paths


def _draw(table: PhaseTable, ref_a: ReferencePattern, ref_b: ReferencePattern, path: Path) -> None:
    """PNG of the references (and their backgrounds) over the search range, the chosen windows
    shaded in the colour of their phase and every fitted line marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"A": "tab:blue", "B": "tab:orange"}
    lo, hi = table.search_range_deg
    fig, axes = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax = axes[0]
    for ref, bg, phase in ((ref_a, table.background_a, table.phase_a), (ref_b, table.background_b, table.phase_b)):
        keep = (ref.two_theta_deg >= lo) & (ref.two_theta_deg <= hi)
        ax.plot(ref.two_theta_deg[keep], ref.intensity[keep], lw=0.8, color=colours[phase.name],
                label=f"{phase.name}: {ref.label}")
        ax.plot(ref.two_theta_deg[keep], bg[keep], lw=0.6, ls="--", color=colours[phase.name], alpha=0.6)
    for w in table.config.windows:
        for a in axes:
            a.axvspan(w.lo_deg, w.hi_deg, color=colours[w.phase], alpha=0.2, lw=0)
        ax.text(0.5 * (w.lo_deg + w.hi_deg), 1.0, w.phase, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", color=colours[w.phase], fontsize=9)
    ax.set_ylabel("intensity")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"beamkin phases: {len(table.config.windows)} windows, "
                 f"R_B / R_A = {table.config.reference_ratio_b_to_a:.4g}", fontsize=10)
    sticks = axes[1]
    for offset, phase in ((0.0, table.phase_a), (-1.0, table.phase_b)):
        keep = (phase.two_theta_deg >= lo) & (phase.two_theta_deg <= hi)
        sticks.vlines(phase.two_theta_deg[keep], offset, offset + phase.intensity[keep] / 100.0 * 0.9,
                      color=colours[phase.name], lw=1.0)
    sticks.set_yticks([0.45, -0.55], ["A", "B"])
    sticks.set_xlabel("2theta (degrees)")
    sticks.set_xlim(lo, hi)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
