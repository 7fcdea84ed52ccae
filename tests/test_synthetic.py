"""Synthetic detector (simulator/synthetic.py) and the CPL-1 phase model (beamkin/phases.py)."""
import math

import numpy as np
import pytest
from scipy import integrate as sp_integrate

from beamkin import phases
from simulator.synthetic import SyntheticPowderDetector, default_metadata


@pytest.fixture(scope="module")
def detector():
    return SyntheticPowderDetector(seed=11)


# ------------------------------------------------------------------------------ phases
def test_monoclinic_d_spacing_matches_metric_tensor():
    """1/d^2 = h^T G* h with G* the inverse of the direct metric tensor (independent formula)."""
    cell = phases.CPL1_EMPTY_CELL
    b = math.radians(cell.beta_deg)
    g = np.array([[cell.a_A**2, 0, cell.a_A * cell.c_A * math.cos(b)],
                  [0, cell.b_A**2, 0],
                  [cell.a_A * cell.c_A * math.cos(b), 0, cell.c_A**2]])
    gstar = np.linalg.inv(g)
    rng = np.random.default_rng(1)
    hkl = rng.integers(-6, 7, size=(200, 3))
    hkl = hkl[np.any(hkl != 0, axis=1)]
    ref = 1.0 / np.sqrt(np.einsum("ni,ij,nj->n", hkl, gstar, hkl))
    got = cell.d_spacing(hkl[:, 0], hkl[:, 1], hkl[:, 2])
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_p21c_absences_and_cell():
    a, b = phases.cpl1_phases()
    h, k, l = a.hkl.T
    assert not np.any((k == 0) & (l % 2 == 1)), "h0l with l odd must be absent (c glide)"
    assert not np.any((h == 0) & (l == 0) & (k % 2 == 1)), "0k0 with k odd must be absent (2_1 screw)"
    assert [0, 1, 0] not in a.hkl.tolist() and [0, 2, 0] in a.hkl.tolist()
    # Ar loading expands the cell (a few % in volume) and moves lines to lower angle.
    expansion = b.cell.volume_A3 / a.cell.volume_A3  # Ar loading swells the cell by 2-6 %
    assert expansion == pytest.approx(1.04, abs=0.02)
    i011 = a.hkl.tolist().index([0, 1, 1])
    shift = (a.two_theta_deg[i011] - b.two_theta_deg[i011]) / a.two_theta_deg[i011]
    assert 0.01 < shift < 0.03
    # (011) at 0.8 angstrom: d = 9.42 angstrom, 2theta = 4.87 degrees.
    assert a.d_A[i011] == pytest.approx(1 / math.sqrt(1 / 19.6**2 / 1 + 1 / 10.8**2 / math.sin(math.radians(96))**2), rel=1e-3)
    assert a.two_theta_deg[i011] == pytest.approx(2 * math.degrees(math.asin(0.8 / (2 * a.d_A[i011]))))


def test_pseudo_voigt_area_and_bin_average_against_quad():
    rng = np.random.default_rng(2)
    for _ in range(5):
        c, fw, eta = rng.uniform(4, 6), rng.uniform(0.01, 0.05), rng.uniform(0, 1)
        area, _ = sp_integrate.quad(lambda t: phases.pseudo_voigt(np.array([t]), c, fw, eta)[0],
                                    -np.inf, np.inf, points=None, limit=500)
        assert area == pytest.approx(1.0, abs=1e-6)
        x = c + rng.uniform(-3 * fw, 3 * fw, 10)
        hw = rng.uniform(0.0005, 0.01, 10)
        ref = [sp_integrate.quad(lambda t: phases.pseudo_voigt(np.array([t]), c, fw, eta)[0], xi - h, xi + h)[0] / (2 * h)
               for xi, h in zip(x, hw)]
        got = phases.pseudo_voigt_bin_average(x, hw, c, fw, eta)
        np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-9)
        # Reference formula of the point profile.
        g = 2 / fw * math.sqrt(math.log(2) / math.pi) * np.exp(-4 * math.log(2) * (x - c) ** 2 / fw**2)
        lor = 2 / (math.pi * fw) / (1 + 4 * (x - c) ** 2 / fw**2)
        np.testing.assert_allclose(phases.pseudo_voigt(x, c, fw, eta), eta * lor + (1 - eta) * g, rtol=1e-12)


def test_default_windows_do_not_overlap_and_are_isolated():
    a, b = phases.cpl1_phases()
    windows = phases.choose_peak_windows(a, b, 3.0, 13.0)
    assert {w.phase for w in windows} == {"A", "B"}
    assert sum(w.phase == "A" for w in windows) == 3 and sum(w.phase == "B" for w in windows) == 3
    for w1, w2 in zip(windows, windows[1:]):
        assert w1.hi_deg < w2.lo_deg
    for w in windows:
        other = b if w.phase == "A" else a
        own = a if w.phase == "A" else b
        inside_other = (other.two_theta_deg > w.lo_deg) & (other.two_theta_deg < w.hi_deg)
        assert not np.any(inside_other & (other.intensity > 0.1 * own.intensity.max() / 10)), w


# ------------------------------------------------------------------------------ detector
def test_geometry_and_gaps(detector):
    md = default_metadata()
    bx, by = md["geometry"]["beam_center_px"]
    tth = detector.two_theta_deg
    iy, ix = np.unravel_index(np.argmin(tth), tth.shape)
    assert abs(iy - by) <= 1 and abs(ix - bx) <= 1
    # Pixel i spans [i, i + 1): the centre of row 700 lies 299.5 pixels above y = 1000,
    # column 490's centre 0.5 pixel right of x = 490; 2theta = atan(r * 172 um / 0.6 m).
    r = math.hypot(299.5, 0.5) * 172e-6
    assert tth[int(by) - 300, int(bx)] == pytest.approx(math.degrees(math.atan(r / 0.6)), abs=1e-6)
    img = detector.image(0.4, 1 / 3, seed=5)
    assert img.dtype == np.uint32 and img.shape == (1043, 981)
    gaps = img == np.iinfo(np.uint32).max
    assert np.array_equal(gaps, detector.gap_mask)
    assert 0.06 < gaps.mean() < 0.08  # Pilatus 1M: 7 % of the area in module gaps


def test_frame_is_poisson_around_expectation(detector):
    mu = detector.expected_image(0.3, 1 / 3)
    img = detector.image(0.3, 1 / 3, seed=9).astype(float)
    ok = np.isfinite(mu)
    z = (img[ok] - mu[ok]) / np.sqrt(mu[ok])
    assert abs(z.mean()) < 0.005       # 1e6 pixels: standard error 0.001
    assert z.var() == pytest.approx(1.0, abs=0.01)
    strong = ok & (mu > 30)
    zs = (img[strong] - mu[strong]) / np.sqrt(mu[strong])
    assert strong.sum() > 1000 and zs.var() == pytest.approx(1.0, abs=0.1)
    # Same seed, same frame; next frame differs.
    assert np.array_equal(detector.image(0.3, 1 / 3, seed=9), detector.image(0.3, 1 / 3, seed=9))
    assert not np.array_equal(detector.image(0.3, 1 / 3), detector.image(0.3, 1 / 3))


def test_phase_mixture_is_linear_in_alpha(detector):
    m0, m1, mh = (detector.expected_image(a, 1.0) for a in (0.0, 1.0, 0.5))
    np.testing.assert_allclose(mh, 0.5 * (m0 + m1), rtol=1e-12)


def test_profile_counts_and_steps(detector):
    tth, mu = detector.expected_profile(0.0, 10.0)
    assert np.allclose(np.diff(tth), 0.006)
    low = (tth > 3.0) & (tth < 4.0)  # no line there: background only
    assert 700 < np.median(mu[low]) < 1500  # ~10^3 counts per step in a 10 s exposure
    tth, counts = detector.profile(0.0, 1 / 3, seed=3)
    assert counts.dtype == np.int64 and np.median(counts[low]) < 60
    with pytest.raises(ValueError, match="alpha"):
        detector.profile(1.5, 1.0)
    with pytest.raises(ValueError, match="exposure"):
        detector.image(0.5, 0.0)


def test_pattern_sum_matches_numpy_sum_of_lines():
    rng = np.random.default_rng(5)
    centres = np.sort(rng.uniform(3, 8, 25))
    fwhm = rng.uniform(0.01, 0.05, 25)
    areas = rng.uniform(0.1, 10, 25)
    x = rng.uniform(2.5, 8.5, 500)          # unsorted on purpose
    half = rng.uniform(0, 0.004, 500)
    eta = 0.4
    ref = np.zeros_like(x)
    for c, f, a in zip(centres, fwhm, areas):
        ref += a * phases.pseudo_voigt_bin_average(x, half, c, f, eta)
    got = phases.pattern_sum(x, half, centres, fwhm, areas, eta)
    # Lines are cut at 60 FWHM: the Lorentzian tail beyond is below eta * 2/(pi * 4 * 60^2 * FWHM) per unit area.
    np.testing.assert_allclose(got, ref, rtol=0, atol=areas.sum() * eta / (2 * np.pi * 3600 * fwhm.min()))


# ------------------------------------------------------------------------------ simulator defaults
@pytest.fixture(scope="module")
def simulator_options():
    from beamkin.config import defaults
    return dict(defaults()["simulator"])


@pytest.fixture(scope="module")
def simulator_detector(simulator_options):
    from simulator.experiment import make_detector
    md = default_metadata(frame_time_s=simulator_options["frame_time_s"], exposure_s=simulator_options["exposure_s"])
    return make_detector(simulator_options, md)


def test_sparse_frames_are_poisson_by_splitting(simulator_detector, simulator_options):
    """The simulator's 0.3 s frames hold well under 2 counts per pixel: they are drawn by Poisson
    splitting. Per pixel the counts must still be Poisson(mu): standardised residuals of mean 0
    and variance 1, and the fraction of empty pixels equal to the mean of exp(-mu) (a Gaussian or
    rounded draw of the same mean and variance fails this at these counts)."""
    from simulator import synthetic
    exposure = simulator_options["exposure_s"]
    mu = simulator_detector.expected_image(0.4, exposure)
    ok = np.isfinite(mu)
    assert mu[ok].mean() < synthetic.SPARSE_COUNTS_PER_PIXEL  # the splitting path is the one tested
    img = simulator_detector.image(0.4, exposure, seed=17)
    assert np.array_equal(img == np.iinfo(np.uint32).max, simulator_detector.gap_mask)
    counts = img[ok].astype(float)
    z = (counts - mu[ok]) / np.sqrt(mu[ok])
    assert abs(z.mean()) < 0.005 and z.var() == pytest.approx(1.0, abs=0.01)  # 1e6 pixels
    p_zero = np.exp(-mu[ok])
    n = ok.sum()
    assert (counts == 0).mean() == pytest.approx(p_zero.mean(), abs=5 * math.sqrt(p_zero.mean() * (1 - p_zero.mean()) / n))
    # total counts of a frame: Poisson(sum mu), so within 5 sd of it
    assert abs(counts.sum() - mu[ok].sum()) < 5 * math.sqrt(mu[ok].sum())
    assert np.array_equal(simulator_detector.image(0.4, exposure, seed=17), img)


def test_alias_table_reproduces_the_distribution():
    from simulator.synthetic import _alias_table
    rates = np.array([0.0, 1.0, 2.0, 0.5, 0.0, 6.5])
    prob, alias = _alias_table(rates)
    # P(i) = (prob_i + sum over j aliasing to i of (1 - prob_j)) / n
    n = rates.size
    got = prob / n
    for j in range(n):
        got[alias[j]] += (1 - prob[j]) / n
    np.testing.assert_allclose(got, rates / rates.sum(), atol=1e-12)


def test_simulator_defaults_give_paper_noise_and_a_visible_transition(simulator_detector, simulator_options):
    """At the [simulator] defaults, reduced with the real integrator and fraction estimator:
    sigma(alpha) ~ 0.02 per 0.3 s frame (the source paper's noise), calibrated (z-scores of unit
    spread), while the strongest line stands >= 10 times above the background of the integrated
    pattern and the empty-phase lines vanish as alpha goes 0 -> 1 (a visible transition)."""
    from reducer.fractions import PhaseFractionEstimator
    from reducer.integrate import Integrator
    md = simulator_detector.metadata
    exposure = simulator_options["exposure_s"]
    integrator = Integrator.from_metadata(md, npt=2000)
    estimator = PhaseFractionEstimator.from_config({}, md)
    alphas, sigmas, z = [], [], []
    for i, alpha in enumerate(np.repeat([0.0, 0.5, 1.0], 15)):
        res = estimator.estimate(integrator.integrate(simulator_detector.image(alpha, exposure, seed=500 + i)), 20.0)
        assert res.status == "ok", res.reason
        sigmas.append(res.sigma_alpha)
        z.append((res.alpha - alpha) / res.sigma_alpha)
    assert 0.014 < np.median(sigmas) < 0.028
    assert 0.7 < np.std(z, ddof=1) < 1.35 and abs(np.mean(z)) < 0.5

    empty = integrator.integrate(simulator_detector.image(0.0, exposure, seed=1))
    loaded = integrator.integrate(simulator_detector.image(1.0, exposure, seed=2))
    tth = np.asarray(empty.radial)
    inside = (tth > 3.0) & (tth < 13.0)
    background = np.median(np.asarray(empty.intensity)[inside])
    strongest = simulator_detector.phase_a.two_theta_deg[np.argmax(simulator_detector.phase_a.intensity)]
    at_line = np.abs(tth - strongest) < 0.02
    assert np.asarray(empty.intensity)[at_line].max() > 10 * background
    drop = np.asarray(empty.intensity)[at_line].max() - np.asarray(loaded.intensity)[at_line].max()
    noise = np.asarray(empty.sigma)[at_line].max()
    assert drop > 10 * noise  # the empty phase's strongest line disappears, far beyond the noise
