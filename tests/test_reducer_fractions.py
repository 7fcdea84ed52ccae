"""reducer.fractions: phase fractions from simulated CPL-1 / Ar patterns, calibration, bad input."""
import copy
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

from reducer.defaults import cpl1_ar_fraction_config, cpl1_ar_reducer_table
from reducer.fraction_config import FractionConfig
from reducer.fractions import PhaseFractionEstimator, q_to_two_theta_deg
from reducer.integrate import Integrator, Pattern, ReductionError
from simulator.synthetic import SyntheticPowderDetector, default_metadata

ROOT = Path(__file__).resolve().parents[1]
NPT = 3000


@pytest.fixture(scope="module")
def md():
    return default_metadata()


@pytest.fixture(scope="module")
def detector(md):
    return SyntheticPowderDetector(md, seed=31)


@pytest.fixture(scope="module")
def integrator(md):
    return Integrator.from_metadata(md, npt=NPT)


@pytest.fixture(scope="module")
def estimator(md):
    return PhaseFractionEstimator.from_config({}, md)


# ------------------------------------------------------------------------------ calibration
def _zscores(estimates, truths):
    a = np.array([r.alpha for r in estimates])
    s = np.array([r.sigma_alpha for r in estimates])
    return (a - np.asarray(truths)) / s


@pytest.mark.parametrize("exposure_s", [0.03, 1.0 / 3.0, 3.0])
def test_alpha_recovered_with_calibrated_sigma_2d(detector, integrator, estimator, exposure_s):
    truths = np.linspace(0.0, 1.0, 50)
    results = []
    for i, alpha in enumerate(truths):
        res = estimator.estimate(integrator.integrate(detector.image(alpha, exposure_s, seed=1000 + i)), 20.0)
        assert res.status == "ok", res.reason
        results.append(res)
    z = _zscores(results, truths)
    assert 0.8 < z.std(ddof=1) < 1.25
    assert abs(z.mean()) < 3.0 / math.sqrt(len(z)) + 0.1
    sigmas = np.array([r.sigma_alpha for r in results])
    assert np.all(sigmas < 0.02)
    # Uncertainty scales like exposure^-1/2 (counting statistics): 0.03 s -> ~3.5e-3.
    assert np.median(sigmas) * math.sqrt(exposure_s) == pytest.approx(6.3e-4, rel=0.3)


@pytest.mark.parametrize("exposure_s", [1.0 / 3.0, 3.0])
def test_alpha_recovered_from_profiles(detector, estimator, exposure_s):
    truths = np.linspace(0.0, 1.0, 60)
    results = [estimator.estimate(Pattern.from_profile(*detector.profile(a, exposure_s, seed=2000 + i)), 20.0)
               for i, a in enumerate(truths)]
    assert all(r.status == "ok" for r in results)
    z = _zscores(results, truths)
    assert 0.8 < z.std(ddof=1) < 1.25
    assert abs(z.mean()) < 3.0 / math.sqrt(len(z)) + 0.1


def test_profiles_and_images_agree_within_uncertainties(detector, integrator, md):
    """Same alpha through the 2D path and the MYTHEN-like path: differences consistent with
    the combined sigma (two estimators so both grids are set up once)."""
    est2d = PhaseFractionEstimator.from_config({}, md)
    est1d = PhaseFractionEstimator.from_config({}, None)
    d = []
    for i, alpha in enumerate(np.linspace(0.05, 0.95, 30)):
        r2 = est2d.estimate(integrator.integrate(detector.image(alpha, 1 / 3, seed=3000 + i)), 20.0)
        r1 = est1d.estimate(Pattern.from_profile(*detector.profile(alpha, 1 / 3, seed=4000 + i)), 20.0)
        d.append((r2.alpha - r1.alpha) / math.hypot(r2.sigma_alpha, r1.sigma_alpha))
    d = np.array(d)
    assert abs(d.mean()) < 0.6 and 0.7 < d.std(ddof=1) < 1.35


def test_q_patterns_give_the_same_alpha(md, detector, integrator, estimator):
    integ_q = Integrator.from_metadata(md, npt=NPT, unit="q_nm^-1")
    est_q = PhaseFractionEstimator.from_config({}, md)
    img = detector.image(0.37, 1.0, seed=77)
    r_t = estimator.estimate(integrator.integrate(img), 20.0)
    r_q = est_q.estimate(integ_q.integrate(img), 20.0)
    assert r_q.status == "ok"
    assert abs(r_q.alpha - r_t.alpha) < 2 * r_t.sigma_alpha
    assert q_to_two_theta_deg(np.array([4 * math.pi * math.sin(math.radians(2.5)) / 0.08]), 0.8)[0] == pytest.approx(5.0)


def test_whole_pattern_method(md, detector, integrator):
    config = cpl1_ar_fraction_config()
    config.method = "whole_pattern"
    est = PhaseFractionEstimator(config)
    truths = np.linspace(0.1, 0.9, 20)
    results = [est.estimate(integrator.integrate(detector.image(a, 1 / 3, seed=5000 + i)), 20.0)
               for i, a in enumerate(truths)]
    assert all(r.status == "ok" for r in results)
    z = _zscores(results, truths)
    assert abs(z.mean()) < 1.0 and 0.6 < z.std(ddof=1) < 1.5
    # Same answer with explicit reference patterns (pure phases, noiseless) on the profile grid.
    tth, ref_a = detector.expected_profile(0.0, 1.0)
    _, ref_b = detector.expected_profile(1.0, 1.0)
    bg = detector.profile_gain * detector.background(tth)
    est2 = PhaseFractionEstimator(copy.copy(config))
    est2.set_reference_patterns((tth, ref_a - bg), (tth, ref_b - bg))
    r = est2.estimate(Pattern.from_profile(*detector.profile(0.6, 3.0, seed=9)), 20.0)
    assert r.status == "ok" and abs(r.alpha - 0.6) < 4 * r.sigma_alpha


def test_absolute_reference_gives_amounts_and_drift_cancels(md, detector, integrator):
    # R_A = counts_scale 0.15 per unit relative intensity per second x 1/3 s exposure
    est = PhaseFractionEstimator.from_config({"fractions": {"reference_scale_a": 0.15 / 3}}, md)
    r = est.estimate(integrator.integrate(detector.image(0.5, 1 / 3, seed=6100)), 9.0)
    assert r.amount_a + r.amount_b == pytest.approx(1.0, abs=0.01)
    # Beam intensity drops by 30 %: amounts drop, alpha does not.
    r_dim = est.estimate(integrator.integrate(detector.image(0.5, 0.7 / 3, seed=6101)), 9.3)
    assert r_dim.amount_a + r_dim.amount_b == pytest.approx(0.7, abs=0.015)
    assert abs(r_dim.alpha - 0.5) < 4 * r_dim.sigma_alpha


def test_rho_from_absolute_scale_and_reference_patterns(md, detector, integrator):
    cfg = cpl1_ar_fraction_config()
    cfg.reference_ratio_b_to_a = None
    cfg.reference_scale_b = 0.15 * 2.0          # counts_scale x exposure: R_B per unit relative intensity
    with pytest.raises(ReductionError, match="reference_scale_a"):  # R_A is never learned from the frames
        FractionConfig(**{**cfg.__dict__})
    cfg.reference_scale_a = 0.15 * 2.0 * 1.25   # the two absolute scales give rho = 0.8
    est = PhaseFractionEstimator(FractionConfig(**{**cfg.__dict__}))
    assert est.reference_ratio == pytest.approx(0.8, rel=1e-12)
    r = est.estimate(integrator.integrate(detector.image(0.5, 2.0, seed=2)), 1.0)
    # alpha = v / (u + v) with v scaled by 1 / rho: true 0.5 reads 0.5 / 0.8 / (0.5 + 0.5 / 0.8) = 5/9
    assert abs(r.alpha - 5 / 9) < 4 * r.sigma_alpha
    est2 = PhaseFractionEstimator(cpl1_ar_fraction_config())
    rho = est2.calibrate_from_reference_patterns(integrator.integrate(detector.image(0.0, 3.0, seed=3)),
                                                 integrator.integrate(detector.image(1.0, 3.0, seed=4)))
    assert rho == pytest.approx(1.0, abs=0.01)


def test_peaks_report(detector, integrator, estimator):
    r = estimator.estimate(integrator.integrate(detector.image(0.5, 1.0, seed=88)), 20.0)
    assert {p["phase"] for p in r.peaks} == {"A", "B"}
    for p in r.peaks:
        assert p["lo_deg"] <= p["center_deg"] <= p["hi_deg"] and p["sigma_area"] > 0 and p["fwhm_deg"] > 0
    strongest = max(r.peaks, key=lambda p: p["area"])
    # (011) line: relative intensity 100, scale 0.15 counts/s per unit, 1 s, alpha 0.5 -> area 7.5.
    assert strongest["area"] == pytest.approx(7.5, rel=0.05)


# ------------------------------------------------------------------------------ bad input
def test_window_outside_measured_range_is_a_configuration_error(md):
    fr = cpl1_ar_reducer_table()["fractions"]
    fr["windows"][0] = dict(fr["windows"][0], lo_deg=24.0, hi_deg=24.1,
                            lines=[{"phase": fr["windows"][0]["phase"], "center_deg": 24.05,
                                    "fwhm_deg": 0.03, "relative_intensity": 10.0}])
    with pytest.raises(ReductionError, match="outside the measured"):
        PhaseFractionEstimator.from_config({"fractions": fr}, md)
    est = PhaseFractionEstimator.from_config({"fractions": fr}, None)    # profile: checked on first pattern
    tth = np.arange(2.0, 17.0, 0.006)
    with pytest.raises(ReductionError, match="outside the measured"):
        est.estimate(Pattern.from_profile(tth, np.ones_like(tth)), 1.0)


def test_flagged_inputs_never_give_nan(detector, estimator, integrator):
    tth, counts = detector.profile(0.5, 1.0, seed=5)
    flagged = estimator.estimate(Pattern.from_profile(tth, np.full(tth.shape, np.nan)), 1.0)
    assert flagged.status == "flagged" and flagged.alpha == 0.0 and math.isinf(flagged.sigma_alpha)
    dead = integrator.integrate(np.full(integrator.shape, 2**32 - 1, np.uint32))
    r = estimator.estimate(dead, 1.0)
    assert r.status == "flagged" and "masked" in r.reason
    # NaN inside one window: that window has too few valid bins -> flagged with the reason.
    c = counts.astype(float)
    w = estimator.config.windows[0]
    c[(tth >= w.lo_deg) & (tth <= w.hi_deg)] = np.nan
    r = estimator.estimate(Pattern.from_profile(tth, c), 1.0)
    assert r.status == "flagged" and "valid bins" in r.reason and not math.isnan(r.alpha)
    # A few NaN steps are simply left out.
    c = counts.astype(float)
    c[np.flatnonzero((tth >= w.lo_deg) & (tth <= w.hi_deg))[:2]] = np.nan
    c[::50] = np.nan
    r = estimator.estimate(Pattern.from_profile(tth, c), 1.0)
    assert r.status == "ok" and abs(r.alpha - 0.5) < 5 * r.sigma_alpha
    # Background only (no diffraction): flagged, not a wild alpha.
    bg = detector.profile_gain * detector.background(tth)
    r = estimator.estimate(Pattern.from_profile(tth, np.random.default_rng(1).poisson(bg)), 1.0)
    assert r.status == "flagged" and "no diffraction signal" in r.reason


def test_configuration_errors():
    table = cpl1_ar_reducer_table()["fractions"]
    with pytest.raises(ReductionError, match="unknown"):
        FractionConfig.from_dict(dict(table, colour="blue"))
    with pytest.raises(ReductionError, match="both phases"):
        FractionConfig.from_dict(dict(table, windows=[w for w in table["windows"] if w["phase"] == "A"]))
    with pytest.raises(ReductionError, match="method"):
        FractionConfig.from_dict(dict(table, method="magic"))
    with pytest.raises(ReductionError, match="positive"):
        FractionConfig.from_dict(dict(table, reference_ratio_b_to_a=-1.0))
    bad_window = dict(table["windows"][0], lo_deg=3.0, hi_deg=3.1)
    with pytest.raises(ReductionError, match="centred inside"):
        FractionConfig.from_dict(dict(table, windows=[bad_window] + table["windows"][1:]))
    for retired in ("learn_reference_frames", "position_search_every"):
        with pytest.raises(ReductionError, match=f"{retired} is no longer used"):
            FractionConfig.from_dict(dict(table, **{retired: 4}))


def test_example_toml_matches_python_defaults():
    data = tomllib.loads((ROOT / "docs/examples/cpl1_ar.toml").read_text())["reducer"]
    assert data == cpl1_ar_reducer_table()
    from_file = FractionConfig.from_dict(data["fractions"])
    default = cpl1_ar_fraction_config()
    assert from_file.windows == default.windows
    assert from_file.reference_ratio_b_to_a == default.reference_ratio_b_to_a


def test_reference_pattern_files(tmp_path, detector):
    tth, pure_a = detector.expected_profile(0.0, 10.0)
    _, pure_b = detector.expected_profile(1.0, 10.0)
    bg = 10.0 * detector.profile_gain * detector.background(tth)
    files = {}
    for name, data in (("a", pure_a), ("b", pure_b), ("a_nobg", pure_a - bg), ("b_nobg", pure_b - bg)):
        files[name] = tmp_path / f"{name}.xy"
        np.savetxt(files[name], np.column_stack([tth, data]), header="2theta_deg intensity")
    table = dict(cpl1_ar_reducer_table()["fractions"], reference_ratio_b_to_a=None,
                 reference_pattern_a=str(files["a"]), reference_pattern_b=str(files["b"]))
    est = PhaseFractionEstimator.from_config({"fractions": table}, None)
    assert est.reference_ratio == pytest.approx(1.0, abs=0.002)     # rho from the peak fits of the files
    r = est.estimate(Pattern.from_profile(*detector.profile(0.3, 1.0, seed=12)), 1.0)
    assert r.status == "ok" and abs(r.alpha - 0.3) < 4 * r.sigma_alpha
    wp = dict(table, method="whole_pattern", reference_ratio_b_to_a=1.0,
              reference_pattern_a=str(files["a_nobg"]), reference_pattern_b=str(files["b_nobg"]))
    est_wp = PhaseFractionEstimator.from_config({"fractions": wp}, None)
    r = est_wp.estimate(Pattern.from_profile(*detector.profile(0.3, 1.0, seed=13)), 1.0)
    assert r.status == "ok" and abs(r.alpha - 0.3) < 4 * r.sigma_alpha
    (tmp_path / "bad.xy").write_text("1 2\n3 4\n")
    with pytest.raises(ReductionError, match="reference pattern"):
        PhaseFractionEstimator.from_config({"fractions": dict(table, reference_pattern_a=str(tmp_path / "bad.xy"))}, None)
    with pytest.raises(ReductionError, match="go together"):
        FractionConfig.from_dict(dict(table, reference_pattern_b=None))


def test_line_shift_refinement_removes_strain_bias(md, integrator):
    """Both phases strained (A d +0.1 %, B d -0.15 %) relative to the configured lines: the
    per-phase shift search finds eps = (-0.001, +0.0015) and alpha stays calibrated; with the
    search disabled the areas, hence alpha, are biased."""
    from beamkin.phases import CPL1_AR_CELL, CPL1_EMPTY_CELL, make_phase

    a = make_phase("A", CPL1_EMPTY_CELL.strained(0.001, 0.001, 0.001, 0.0))
    b = make_phase("B", CPL1_AR_CELL.strained(-0.0015, -0.0015, -0.0015, 0.0), intensity_salt=7)
    det = SyntheticPowderDetector(md, a, b, seed=41)
    truths = np.linspace(0.0, 1.0, 30)
    patterns = [integrator.integrate(det.image(t, 1 / 3, seed=7000 + i)) for i, t in enumerate(truths)]
    searching = PhaseFractionEstimator.from_config({}, md)
    fixed = PhaseFractionEstimator.from_config({"fractions": {"position_search_rel": 0.0}}, md)
    found = [searching.estimate(p, 20.0) for p in patterns]
    z = _zscores(found, truths)
    assert abs(z.mean()) < 0.6 and 0.75 < z.std(ddof=1) < 1.3
    mid = found[len(found) // 2]
    assert mid.position_shift_rel["A"] == pytest.approx(-0.001, abs=1e-4)
    assert mid.position_shift_rel["B"] == pytest.approx(0.0015, abs=1e-4)
    z_fixed = _zscores([fixed.estimate(p, 20.0) for p in patterns], truths)
    assert np.sqrt(np.mean(z_fixed**2)) > 3.0


def test_line_law_and_grid_lookup_keep_the_general_rules():
    """The one-pass line law equals the bin-average kernel at zero bin width (bit for bit,
    0 beyond 60 FWHM), and the shift-grid lookup finds exactly what np.isclose(atol=1e-12) finds."""
    from reducer.peak_profile import PeaksModel, line_law
    from beamkin.phases import pseudo_voigt_bin_average

    tth = np.linspace(3.0, 6.0, 20_001)
    for centre, fwhm, eta in [(4.868, 0.022, 0.3), (3.2, 0.05, 0.9), (5.9, 0.004, 0.0)]:
        near = np.abs(tth - centre) < 60.0 * fwhm
        expect = np.zeros_like(tth)
        expect[near] = pseudo_voigt_bin_average(tth[near], np.zeros(near.sum()), centre, fwhm, eta)
        np.testing.assert_array_equal(line_law(centre, fwhm, eta)(tth), expect)
    model = PeaksModel.__new__(PeaksModel)
    model.eps_grid = np.arange(-8, 9) * 0.0005
    model._grid_searchable = True
    for eps in [-0.004, -0.0040000000000001, 0.0, 1e-13, 3e-12, 0.00049999999999995, 0.0012345, 0.004, 0.0045,
                -0.0045, float("nan")]:
        hits = np.flatnonzero(np.isclose(model.eps_grid, eps, rtol=0, atol=1e-12))
        assert model.grid_index(eps) == (int(hits[0]) if hits.size else None), eps


def test_a_frame_that_cannot_be_fitted_raises_peak_fit_error(detector, estimator):
    """fit_peaks raises PeakFitError (a ReductionError) naming the cause; estimate flags the frame
    and calibration from reference patterns reports which reference failed."""
    from reducer.peak_fit import PeakFitError, fit_peaks

    tth, counts = detector.profile(0.5, 1.0, seed=21)
    c = counts.astype(float)
    w = estimator.config.windows[0]
    c[(tth >= w.lo_deg) & (tth <= w.hi_deg)] = np.nan
    empty_window = Pattern.from_profile(tth, c)
    est = PhaseFractionEstimator(cpl1_ar_fraction_config())
    est._prepare_grid(tth)
    with pytest.raises(PeakFitError, match="valid bins"):
        fit_peaks(est._model, empty_window.intensity, empty_window.sigma, empty_window.valid, 2, 20.0)
    assert issubclass(PeakFitError, ReductionError)
    with pytest.raises(ReductionError, match="reference pattern A: window"):
        est.calibrate_from_reference_patterns(empty_window, Pattern.from_profile(tth, counts))
