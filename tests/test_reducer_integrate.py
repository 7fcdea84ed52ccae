"""reducer.integrate: pyFAI integration wrapper, masks and bad input."""
import copy

import numpy as np
import pytest

from beamkin.geometry import azimuthal_integrator_from_metadata
from reducer.integrate import Integrator, Pattern, ReductionError
from simulator.synthetic import SyntheticPowderDetector, default_metadata

METHOD = ("no", "csr", "cython")
NPT = 1500


@pytest.fixture(scope="module")
def md():
    return default_metadata()


@pytest.fixture(scope="module")
def detector(md):
    return SyntheticPowderDetector(md, seed=21)


@pytest.fixture(scope="module")
def integrator(md):
    return Integrator.from_metadata(md, npt=NPT, method=METHOD)


@pytest.fixture(scope="module")
def bright_frame(detector):
    # 20 s exposure: every pixel has >= 1 count, so pyFAI's Poisson floor (variance >= 1) is inactive.
    img = detector.image(0.4, 20.0, seed=1)
    assert img[~detector.gap_mask].min() >= 1
    return img


def bare_pyfai(md, frame, method, npt, unit="2th_deg", mask=None):
    """Plain pyFAI: the same geometry, gaps masked through the dummy value, Poisson error model."""
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    geo, det = md["geometry"], md["detector"]
    py, px = det["pixel_size_m"]
    ai = AzimuthalIntegrator(dist=geo["distance_m"], poni1=geo["beam_center_px"][1] * py,
                             poni2=geo["beam_center_px"][0] * px,
                             detector=Detector(pixel1=py, pixel2=px, max_shape=tuple(det["shape"])),
                             wavelength=geo["wavelength_A"] * 1e-10)
    return ai.integrate1d(frame, npt, unit=unit, method=method, error_model="poisson", mask=mask,
                          dummy=float(2**32 - 1), delta_dummy=0.5, polarization_factor=0.99,
                          correctSolidAngle=True)


@pytest.mark.parametrize("method", [("no", "csr", "cython"), ("bbox", "csr", "cython")])
def test_equals_bare_integrate1d(md, detector, bright_frame, method):
    integ = Integrator.from_metadata(md, npt=NPT, method=method)
    pat = integ.integrate(bright_frame)
    ref = bare_pyfai(md, bright_frame, method, NPT, mask=detector.gap_mask)
    np.testing.assert_allclose(pat.radial, ref.radial, rtol=1e-12)
    ok = pat.valid
    assert ok.sum() > 0.95 * NPT
    np.testing.assert_allclose(pat.intensity[ok], ref.intensity[ok], rtol=2e-6)
    np.testing.assert_allclose(pat.sigma[ok], ref.sigma[ok], rtol=2e-5)


def test_q_unit_equals_bare(md, detector, bright_frame):
    integ = Integrator.from_metadata(md, npt=NPT, unit="q_nm^-1")
    pat = integ.integrate(bright_frame)
    ref = bare_pyfai(md, bright_frame, METHOD, NPT, unit="q_nm^-1", mask=detector.gap_mask)
    assert pat.unit == "q_nm^-1"
    np.testing.assert_allclose(pat.radial, ref.radial, rtol=1e-12)
    np.testing.assert_allclose(pat.intensity[pat.valid], ref.intensity[pat.valid], rtol=2e-6)


def test_sigma_is_sum_of_counts_for_sparse_frames(integrator, detector):
    """At ~1 count per pixel the bin variance is the sum of counts (pyFAI's model floors at 1)."""
    img = detector.image(0.0, 0.03, seed=4)
    pat = integrator.integrate(img)
    res = integrator.ai.integrate1d(img, dummy=float(2**32 - 1), delta_dummy=0.5,
                                    **dict(integrator.integrate1d_kwargs(), error_model=None))
    expect = np.sqrt(res.sum_signal.ravel()) / res.sum_normalization.ravel()
    ok = pat.valid
    np.testing.assert_allclose(pat.sigma[ok], expect[ok], rtol=1e-6)


def test_masked_hot_pixel_blocks_change_nothing(md, detector):
    clean = detector.image(0.5, 1.0, seed=8)
    hot = clean.copy()
    mask = np.zeros(clean.shape, dtype=np.uint8)
    for y, x in [(700, 450), (650, 300), (800, 600)]:   # on the 4-7 degree rings
        hot[y:y + 6, x:x + 6] = 900_000
        mask[y:y + 6, x:x + 6] = 1
    masked = Integrator.from_metadata(md, mask=mask, npt=NPT)
    a = masked.integrate(hot)
    b = masked.integrate(clean)
    np.testing.assert_array_equal(a.intensity, b.intensity)
    np.testing.assert_array_equal(a.sigma, b.sigma)
    unmasked = Integrator.from_metadata(md, npt=NPT).integrate(hot)
    assert np.max(unmasked.intensity - b.intensity) > 1000   # the blocks do matter when not masked


def test_dead_saturated_and_pixel_mask_are_excluded(md, detector):
    clean = detector.image(0.5, 1.0, seed=12)
    block = (slice(700, 705), slice(420, 430))
    mask = np.zeros(clean.shape, dtype=np.uint32)
    mask[block] = 1
    md_mask = copy.deepcopy(md)
    md_mask["pixel_mask"] = mask
    ref = Integrator.from_metadata(md_mask, npt=NPT).integrate(clean)
    integ = Integrator.from_metadata(md, npt=NPT)
    dead = clean.copy()
    dead[block] = np.iinfo(np.uint32).max            # EIGER/PILATUS dead-pixel marker
    np.testing.assert_array_equal(integ.integrate(dead).intensity, ref.intensity)
    sat = clean.copy()
    sat[block] = md["detector"]["saturation"] + 5    # above the saturation value
    np.testing.assert_array_equal(integ.integrate(sat).intensity, ref.intensity)


def test_nan_and_negative_float_pixels_are_excluded(md, detector):
    clean = detector.image(0.5, 1.0, seed=13)
    block = (slice(600, 606), slice(500, 510))
    mask = np.zeros(clean.shape, bool)
    mask[block] = True
    ref = Integrator.from_metadata(md, mask=mask, npt=NPT).integrate(clean.astype(np.float32))
    bad = clean.astype(np.float32)
    bad[block] = np.nan
    bad[600, 500] = -5.0
    bad[601, 501] = np.inf
    pat = Integrator.from_metadata(md, npt=NPT).integrate(bad)
    assert np.all(np.isfinite(pat.intensity)) and np.all(np.isfinite(pat.sigma))
    np.testing.assert_allclose(pat.intensity, ref.intensity, rtol=1e-6)


def test_mask_file_any_fabio_format(md, detector, tmp_path):
    import fabio.edfimage

    mask = np.zeros(tuple(md["detector"]["shape"]), dtype=np.uint8)
    mask[650:700, 400:500] = 1
    path = tmp_path / "mask.edf"
    fabio.edfimage.EdfImage(data=mask).write(str(path))
    img = detector.image(0.5, 1.0, seed=14)
    a = Integrator.from_metadata(md, npt=NPT, mask_file=str(path)).integrate(img)
    b = Integrator.from_metadata(md, npt=NPT, mask=mask).integrate(img)
    np.testing.assert_array_equal(a.intensity, b.intensity)
    with pytest.raises(ReductionError, match="mask file"):
        Integrator.from_metadata(md, mask_file=str(tmp_path / "missing.edf"))


def test_poni_file_geometry(md, tmp_path, bright_frame):
    ai = azimuthal_integrator_from_metadata(md)
    poni = tmp_path / "geom.poni"
    ai.write(str(poni))
    from_poni = Integrator.from_metadata(md, npt=NPT, config={"poni_file": str(poni)})
    np.testing.assert_allclose(from_poni.integrate(bright_frame).intensity,
                               Integrator.from_metadata(md, npt=NPT).integrate(bright_frame).intensity, rtol=1e-6)


def test_dark_and_flat(md, detector):
    """pyFAI's bin value is sum(raw - dark) / sum(flat * corrections): for a noiseless frame it
    equals the plain frame's value up to the 2theta spread inside a bin."""
    img = detector.expected_image(0.5, 5.0).astype(np.float32)     # gaps are NaN
    shape = img.shape
    dark = np.full(shape, 2.0, np.float32)
    flat = np.full(shape, 1.0, np.float32)
    flat[:, :300] = 0.5                                # half-efficient columns
    gaps = detector.gap_mask
    raw = np.where(gaps, np.nan, img * flat + dark)    # what a detector with that dark and flat records
    corrected = Integrator.from_metadata(md, npt=NPT, dark=dark, flat=flat).integrate(raw)
    plain = Integrator.from_metadata(md, npt=NPT).integrate(img)
    ok = corrected.valid & plain.valid & (plain.intensity > 0)
    np.testing.assert_allclose(corrected.intensity[ok], plain.intensity[ok], rtol=2e-3)
    assert not np.allclose(Integrator.from_metadata(md, npt=NPT).integrate(raw).intensity[ok],
                           plain.intensity[ok], rtol=2e-2)   # uncorrected differs


def test_bad_frames(integrator):
    with pytest.raises(ReductionError, match="shape"):
        integrator.integrate(np.zeros((100, 100), np.uint32))
    with pytest.raises(ReductionError, match="dtype"):
        integrator.integrate(np.zeros(integrator.shape, complex))
    with pytest.raises(ReductionError, match="numpy array"):
        integrator.integrate([[1, 2], [3, 4]])
    dead = np.full(integrator.shape, np.iinfo(np.uint32).max, np.uint32)
    pat = integrator.integrate(dead)
    assert pat.status == "flagged" and "masked" in pat.reason
    assert np.all(np.isfinite(pat.intensity)) and not pat.valid.any()
    nan = np.full(integrator.shape, np.nan, np.float32)
    assert integrator.integrate(nan).status == "flagged"


def test_bad_configuration(md):
    broken = copy.deepcopy(md)
    broken["geometry"]["wavelength_A"] = -1
    with pytest.raises(ReductionError, match="wavelength"):
        Integrator.from_metadata(broken)
    broken = copy.deepcopy(md)
    del broken["geometry"]["distance_m"]
    with pytest.raises(ReductionError, match="distance_m"):
        Integrator.from_metadata(broken)
    with pytest.raises(ReductionError, match="mask shape"):
        Integrator.from_metadata(md, mask=np.zeros((10, 10)))
    with pytest.raises(ReductionError, match="every pixel"):
        Integrator.from_metadata(md, mask=np.ones(tuple(md["detector"]["shape"])))
    with pytest.raises(ReductionError, match="unit"):
        Integrator.from_metadata(md, unit="r_mm")
    profile_md = dict(md, kind="profile")
    with pytest.raises(ReductionError, match="profile"):
        Integrator.from_metadata(profile_md)


def test_profile_pattern():
    tth = np.arange(2, 3, 0.006)
    counts = np.arange(tth.size).astype(float)
    counts[5] = np.nan
    counts[6] = -3
    pat = Pattern.from_profile(tth, counts)
    assert pat.status == "ok"
    assert not pat.valid[5] and not pat.valid[6] and pat.valid[0] and pat.valid[7]
    np.testing.assert_allclose(pat.sigma[7:], np.sqrt(counts[7:]))
    assert Pattern.from_profile(tth, np.full(tth.size, np.nan)).status == "flagged"
    with pytest.raises(ReductionError, match="equal length"):
        Pattern.from_profile(tth, counts[:-1])


@pytest.mark.parametrize("method", [("no", "csr", "cython"), ("bbox", "csr", "cython"), ("no", "histogram", "cython")])
def test_model_pattern_rows_match_full_integration(md, detector, method):
    """The sparse per-bin response (CSR rows) equals integrating the noiseless law image."""
    from beamkin.phases import pseudo_voigt

    integ = Integrator.from_metadata(md, npt=NPT, method=method)
    pat = integ.integrate(detector.image(0.5, 1.0, seed=3))
    rows = np.flatnonzero((pat.radial > 4.7) & (pat.radial < 5.0))
    law = lambda t: pseudo_voigt(np.ascontiguousarray(t), 4.868, 0.022, 0.3)   # noqa: E731
    full = integ.model_pattern(law)
    np.testing.assert_allclose(pat.model_response(law, rows=rows), full[rows], rtol=1e-6, atol=1e-9 * full.max())
    # The binning roughly preserves the line's area (1); pixel-centre aliasing of bins finer than
    # a pixel moves it by up to ~1 %, which is why the fit uses these responses, not analytic shapes.
    step = pat.radial[1] - pat.radial[0]
    assert np.sum(full) * step == pytest.approx(1.0, rel=0.02)


def test_signed_frames_and_config_table(md, detector):
    """int32 frames mark bad pixels with -1 (all ones); the [reducer] table sets npt and method."""
    clean = detector.image(0.5, 1.0, seed=16).astype(np.int64)
    gaps = detector.gap_mask
    block = (slice(640, 646), slice(470, 480))
    mask = np.zeros(clean.shape, bool)
    mask[block] = True
    signed = np.where(gaps, -1, clean).astype(np.int32)
    signed[block] = -1
    integ = Integrator.from_metadata(md, config={"npt": 900, "method": "bbox,csr,cython", "unit": "2th_deg",
                                                 "mask_file": "", "poni_file": "", "workers": 2})
    assert integ.npt == 900 and integ.method == ("bbox", "csr", "cython")
    ref = Integrator.from_metadata(md, mask=mask, npt=900, method=("bbox", "csr", "cython"))
    np.testing.assert_allclose(integ.integrate(signed).intensity,
                               ref.integrate(np.where(gaps, 2**32 - 1, clean).astype(np.uint32)).intensity, rtol=1e-6)
    with pytest.raises(ReductionError, match="method"):
        Integrator.from_metadata(md, method="csr")


@pytest.mark.parametrize("dtype", ["<u2", "<u4", ">u4", "<i4", "<f8"])
def test_dynamic_mask_for_every_pixel_type(md, detector, dtype):
    """Per-frame masking (all-ones marker, saturation, negatives, NaN) gives exactly what a static
    mask of the same pixels gives, for each pixel type; counts between half the type's range and
    the saturation value stay valid (the one-pass check views unsigned frames as signed)."""
    dt = np.dtype(dtype)
    saturation = 60_000 if dt.itemsize == 2 else md["detector"]["saturation"]
    md_sat = copy.deepcopy(md)
    md_sat["detector"]["saturation"] = saturation
    clean = detector.image(0.5, 1.0, seed=17).astype(np.int64)
    gaps = detector.gap_mask
    marker = -1 if dt.kind in "if" else np.iinfo(dt).max
    valid_high, bad = (slice(700, 704), slice(420, 430)), {}
    bad["saturated"] = (slice(710, 714), slice(420, 430)), saturation + 1
    bad["marker"] = (slice(720, 724), slice(420, 430)), marker
    if dt.kind == "u":
        bad["upper half"] = (slice(730, 734), slice(420, 430)), np.iinfo(dt).max - 7
    else:
        bad["negative"] = (slice(730, 734), slice(420, 430)), -2
    if dt.kind == "f":
        bad["nan"] = (slice(740, 744), slice(420, 430)), np.nan
        bad["inf"] = (slice(750, 754), slice(420, 430)), np.inf
    frame = np.where(gaps, marker, clean).astype(dt)
    expected = np.where(gaps, marker, clean).astype(dt)
    mask = np.zeros(clean.shape, bool)
    frame[valid_high] = expected[valid_high] = 40_000 if dt.itemsize == 2 else saturation  # still valid
    for block, value in bad.values():
        frame[block] = value
        mask[block] = True
    ref = Integrator.from_metadata(md_sat, mask=mask, npt=NPT).integrate(expected)
    integ = Integrator.from_metadata(md_sat, npt=NPT)
    # the first frame goes through integrate1d, the next through the engine (integer frames as float32)
    for pat in (integ.integrate(frame), integ.integrate(frame)):
        assert pat.status == "ok"
        np.testing.assert_array_equal(pat.intensity, ref.intensity)
        np.testing.assert_array_equal(pat.sigma, ref.sigma)
        np.testing.assert_array_equal(pat.count, ref.count)
    assert integ._float32_frames == (dt.kind in "ui")


@pytest.mark.parametrize("method", [("no", "csr", "cython"), ("bbox", "csr", "cython"), ("no", "histogram", "cython")])
def test_every_frame_equals_integrate1d(md, detector, method):
    """From the series' second frame on, CSR methods call pyFAI's engine directly (the first
    frame checks that this reproduces integrate1d): every frame still equals integrate1d exactly,
    with dark and flat corrections too."""
    shape = tuple(md["detector"]["shape"])
    dark = np.full(shape, 1.5, np.float32)
    flat = np.linspace(0.8, 1.2, shape[1], dtype=np.float32)[None, :].repeat(shape[0], 0)
    integ = Integrator.from_metadata(md, npt=NPT, method=method, dark=dark, flat=flat)
    for seed in range(3):
        frame = detector.image(0.4 * seed, 1.0, seed=30 + seed)
        pat = integ.integrate(frame)
        kwargs = dict(integ.integrate1d_kwargs(), error_model=None)
        if method[0] != "no":
            kwargs["variance"] = frame.astype(np.float32) + dark
        res = integ.ai.integrate1d(frame, dummy=float(2**32 - 1), delta_dummy=0.5, **kwargs)
        ok = res.count > 0
        assert ok.sum() > 0.9 * NPT
        np.testing.assert_array_equal(pat.radial, res.radial)
        np.testing.assert_array_equal(pat.count, res.count)
        np.testing.assert_array_equal(pat.intensity[ok], res.intensity[ok])
        if method[0] != "no":
            np.testing.assert_array_equal(pat.sigma[ok], res.sigma[ok])
    assert (integ._engine_call is not None) == (method[1] == "csr")  # the direct path is in use


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32])
def test_float32_conversion_matches_numpy(dtype):
    """The frame conversion fused with the checks rounds like numpy's astype over the whole range."""
    from reducer.frame_pixels import _min_max, _min_max_to_float32, _to_float32

    info = np.iinfo(dtype)
    values = np.random.default_rng(5).integers(info.min, info.max, 200_000, dtype=np.int64, endpoint=True)
    values = np.concatenate([values, [info.min, info.max, 2**24 + 1, 2**25 + 3]]).astype(dtype)
    signed = values.view(np.dtype(f"i{values.dtype.itemsize}"))
    out = np.empty(values.shape, np.float32)
    assert _min_max_to_float32(values, signed, out) == _min_max(signed) == (signed.min(), signed.max())
    np.testing.assert_array_equal(out, values.astype(np.float32))
    out[:] = 0
    _to_float32(values, out)
    np.testing.assert_array_equal(out, values.astype(np.float32))


def test_a_series_with_the_same_geometry_reuses_the_integrator():
    """A worker keeps the integrators of earlier series: a new series with the same detector,
    geometry and options reuses one (no CSR rebuild) and gives the same pattern; a changed
    distance or a changed pixel mask builds a new one."""
    import collections

    from beamkin import config as configuration
    from beamkin import protocol
    from reducer.service import SeriesReduction
    from simulator.synthetic import SyntheticPowderDetector, default_metadata

    reducer_config = configuration.defaults()["reducer"]
    integrators = collections.OrderedDict()
    first_md = default_metadata(series_id="s1")
    first = SeriesReduction(protocol.make("start", source="test", **first_md), reducer_config, integrators)
    same = SeriesReduction(protocol.make("start", source="test", **default_metadata(series_id="s2")),
                           reducer_config, integrators)
    assert not first.reused_integrator and same.reused_integrator
    assert same.integrator.series_id == "s2" and first.integrator.series_id == "s1"
    image = SyntheticPowderDetector(first_md, seed=4).image(0.3, 0.3)
    a, b = first.integrator.integrate(image), same.integrator.integrate(image)
    np.testing.assert_array_equal(a.intensity, b.intensity)
    np.testing.assert_array_equal(a.sigma, b.sigma)

    moved_md = default_metadata(series_id="s3")
    moved_md["geometry"]["distance_m"] = 0.65
    moved = SeriesReduction(protocol.make("start", source="test", **moved_md), reducer_config, integrators)
    assert not moved.reused_integrator
    mask = np.zeros(tuple(first_md["detector"]["shape"]), np.uint32)
    mask[10:20, 10:20] = 1
    masked = SeriesReduction(protocol.make("start", {"pixel_mask": mask}, source="test",
                                           **default_metadata(series_id="s4")), reducer_config, integrators)
    assert not masked.reused_integrator
    assert len(integrators) == 3
