"""beamkin.geometry: stream < TOML < PONI, merged before validation; EIGER2 translation convention."""
import copy
import logging

import pytest

from beamkin.geometry import resolve_geometry
from reducer.integrate import Integrator, ReductionError
from simulator.synthetic import default_metadata

# detector_translation of a real EIGER2 Si 16M Stream V2 start message (tickit-devices test data):
# x, y = beam centre px * pixel size, z negative
TRANSLATION_M = (0.15370380680006296, 0.1622715786431361, -0.23715919962215962)
EIGER_PIXEL_M = 75e-6


def eiger2_16m_start() -> dict:
    """Start-message dict of that EIGER2 16M as the streamer passes it on (distance = |z|)."""
    return {
        "series_id": "eiger2-real", "kind": "image",
        "detector": {"name": "Dectris EIGER2 Si 16M", "shape": [4362, 4148], "pixel_size_m": [EIGER_PIXEL_M] * 2},
        "geometry": {"distance_m": abs(TRANSLATION_M[2]),
                     "beam_center_px": [TRANSLATION_M[0] / EIGER_PIXEL_M, TRANSLATION_M[1] / EIGER_PIXEL_M],
                     "wavelength_A": 0.9762, "rot1_rad": 0.0, "rot2_rad": 0.0, "rot3_rad": 0.0, "poni_file": None},
        "user_data": {"stream_v2": {"distance_from": "|detector_translation z|"}},
    }


@pytest.fixture()
def md():
    return copy.deepcopy(default_metadata())


@pytest.fixture()
def poni_file(md, tmp_path):
    """A PONI of the synthetic Pilatus 1M geometry with distance 0.55 m and wavelength 0.7 A."""
    from pyFAI.detectors import detector_factory
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    bx, by = md["geometry"]["beam_center_px"]
    ai = AzimuthalIntegrator(dist=0.55, poni1=(by + 3) * 172e-6, poni2=(bx - 2) * 172e-6,
                             detector=detector_factory("Pilatus1M"), wavelength=0.7e-10)
    path = tmp_path / "calib.poni"
    ai.save(str(path))
    return path


def test_eiger2_translation_gives_distance_and_beam_centre():
    geometry = resolve_geometry(eiger2_16m_start())
    assert geometry.distance_m == pytest.approx(0.23715919962215962, rel=1e-15)
    poni1, poni2 = geometry.poni
    # pyFAI's poni1 (slow axis) and poni2 (fast axis) are the translation's y and x
    assert poni1 == pytest.approx(TRANSLATION_M[1], rel=1e-12) and poni2 == pytest.approx(TRANSLATION_M[0], rel=1e-12)
    assert "|detector_translation z|" in geometry.sources["distance_m"]
    assert geometry.detector.pyfai_name == "eiger2_16m"
    assert geometry.sources["pixel_size_m"] == "pyFAI detector eiger2_16m"


def test_negative_stream_distance_is_reported_with_its_source(md):
    md["geometry"]["distance_m"] = -0.237
    with pytest.raises(ReductionError, match=r"distance_m must be positive, got -0.237 \(from the stream\)"):
        resolve_geometry(md)


def test_toml_overrides_the_stream_before_validation(md):
    md["geometry"]["distance_m"] = -0.237
    md["geometry"]["beam_center_px"] = None
    config = {"distance_m": 0.6, "beam_center_px": [490.5, 520.25], "wavelength_A": 0.0, "pixel_size_m": []}
    geometry = resolve_geometry(md, config)
    assert geometry.distance_m == 0.6 and geometry.sources["distance_m"] == "the TOML [reducer] distance_m"
    assert geometry.poni == pytest.approx((520.25 * 172e-6, 490.5 * 172e-6), rel=1e-15)
    assert geometry.wavelength_A == md["geometry"]["wavelength_A"]      # 0 = keep the stream's
    assert geometry.sources["wavelength_A"] == "the stream"


def test_poni_overrides_toml_and_stream(md, poni_file):
    md["geometry"]["distance_m"] = -0.237                              # unusable stream value
    config = {"distance_m": 0.5, "beam_center_px": [1.0, 2.0], "wavelength_A": 0.9, "poni_file": str(poni_file)}
    geometry = resolve_geometry(md, config)
    bx, by = default_metadata()["geometry"]["beam_center_px"]
    assert geometry.distance_m == pytest.approx(0.55, rel=1e-12)
    assert geometry.wavelength_A == pytest.approx(0.7, rel=1e-12)
    assert geometry.poni == pytest.approx(((by + 3) * 172e-6, (bx - 2) * 172e-6), rel=1e-12)
    assert all(str(poni_file) in geometry.sources[k] for k in ("distance_m", "beam_center", "wavelength_A"))
    ai = geometry.azimuthal_integrator()
    assert ai.dist == pytest.approx(0.55, rel=1e-12) and ai.wavelength == pytest.approx(0.7e-10, rel=1e-12)


def test_poni_repairs_a_stream_an_integrator_would_reject(md, poni_file, caplog):
    """The issue's case: --reducer.poni_file with a correct geometry, stream distance negative."""
    md["geometry"]["distance_m"] = -0.237
    with pytest.raises(ReductionError, match="distance_m must be positive"):
        Integrator.from_metadata(md, npt=500)
    with caplog.at_level(logging.INFO, logger="reducer.integrate"):
        integrator = Integrator.from_metadata(md, npt=500, config={"poni_file": str(poni_file)})
    assert integrator.ai.dist == pytest.approx(0.55, rel=1e-12)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("geometry:")]
    assert len(said) == 1 and "distance 0.55 m from the PONI file" in said[0]


def test_poni_for_another_detector_shape_is_rejected(md, tmp_path):
    from pyFAI.detectors import detector_factory
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    path = tmp_path / "other.poni"
    AzimuthalIntegrator(dist=0.3, detector=detector_factory("Pilatus2M"), wavelength=1e-10).save(str(path))
    with pytest.raises(ReductionError, match="PONI detector shape"):
        resolve_geometry(md, {"poni_file": str(path)})


@pytest.mark.parametrize("change, message", [
    (lambda md: md["geometry"].update(distance_m=None), "distance_m is missing"),
    (lambda md: md["geometry"].update(beam_center_px=None), "beam_center_px is missing"),
    (lambda md: md["geometry"].update(wavelength_A=None), "wavelength_A is missing"),
    (lambda md: md["geometry"].update(wavelength_A="fast"), "wavelength_A from the stream must be a number"),
    (lambda md: md["geometry"].update(beam_center_px=[1.0]), "beam_center_px from the stream must be two numbers"),
    (lambda md: md["detector"].update(shape=[0, 5]), "positive sizes"),
    (lambda md: md.pop("detector"), "lacks 'detector'"),
])
def test_unusable_geometry_names_the_parameter(md, change, message):
    change(md)
    with pytest.raises(ReductionError, match=message):
        resolve_geometry(md)


def test_geometry_logged_once_per_series_and_toml_keys_key_the_integrator(caplog):
    """A series reusing an earlier series' integrator still says where its geometry came from;
    a [reducer] geometry key is part of what an integrator depends on."""
    import collections

    from beamkin import config as configuration
    from beamkin import protocol
    from reducer.service import SeriesReduction

    reducer_config = configuration.defaults()["reducer"]
    integrators = collections.OrderedDict()
    with caplog.at_level(logging.INFO):
        for series_id in ("s1", "s2"):
            SeriesReduction(protocol.make("start", source="test", **default_metadata(series_id=series_id)),
                            reducer_config, integrators)
    said = [getattr(r, "series_id", None) for r in caplog.records if r.getMessage().startswith("geometry:")]
    assert said == ["s1", "s2"]
    moved = SeriesReduction(protocol.make("start", source="test", **default_metadata(series_id="s3")),
                            dict(reducer_config, distance_m=0.65), integrators)
    assert not moved.reused_integrator and moved.integrator.ai.dist == 0.65


def _start_fields():
    """Start-message parts: each known key absent, or a scalar / short list of the kinds a
    decoder can produce (huge and non-finite numbers, text, nesting)."""
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6)
               | st.sampled_from([0, -1, 1, 2.5, 1e-300, 1e300, float("inf"), float("nan"), -0.237, 981, 1043]))
    values = scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=4), scalars, max_size=2)
    detector = st.dictionaries(st.sampled_from(["shape", "name", "pixel_size_m"]), values, max_size=3)
    geometry = st.dictionaries(st.sampled_from(["distance_m", "beam_center_px", "wavelength_A", "rot1_rad",
                                                "rot2_rad", "rot3_rad"]), values, max_size=4)
    user_data = st.one_of(values, st.fixed_dictionaries({"stream_v2": values}))
    return st.fixed_dictionaries({}, optional={"detector": detector | values, "geometry": geometry | values,
                                               "user_data": user_data})


def test_any_start_message_gives_a_geometry_or_a_reduction_error():
    """Whatever a start message holds, resolve_geometry returns a geometry or raises
    ReductionError naming the problem (never another exception)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base = default_metadata()

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_start_fields(), st.booleans())
    def check(override, merge):
        metadata = copy.deepcopy(base)
        for key, value in override.items():
            if merge and isinstance(value, dict) and isinstance(metadata.get(key), dict):
                metadata[key].update(value)
            else:
                metadata[key] = value
        try:
            geometry = resolve_geometry(metadata)
        except ReductionError:
            return
        geometry.validate()
        assert geometry.distance_m > 0 and geometry.wavelength_A > 0

    check()
