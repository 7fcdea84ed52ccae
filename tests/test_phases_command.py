"""`beamkin phases REF_A REF_B`: a [reducer.fractions] table from two measured references.

The references are synthetic CPL-1 / Ar patterns (docs/examples/cpl1_references.py:
simulator.synthetic's MYTHEN-like profiles, 60 s, Poisson noise). The command must (1) find the lines the phase model put there, so that its table
is the built-in CPL-1 table (reducer.defaults, from the model phases) within the measurement's
precision, and (2) give a table with which a mixture series comes back within its sigma, by both
the peak-window and the whole-pattern method.
"""
import importlib.util
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from beamkin import protocol
from reducer.defaults import cpl1_ar_fraction_config
from reducer.fractions import PhaseFractionEstimator
from reducer.integrate import Pattern
from beamkin.phases_command import load_reference
from reducer.phase_finder import PhaseFinderError
from simulator.synthetic import SyntheticPowderDetector, default_metadata

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_EXPOSURE_S = 60.0


@pytest.fixture(scope="module")
def detector():
    return SyntheticPowderDetector(default_metadata(), seed=5)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The two references of docs/examples/cpl1_references.py (the ones the example table came from)."""
    spec = importlib.util.spec_from_file_location("cpl1_references", ROOT / "docs/examples/cpl1_references.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.EXPOSURE_S == REFERENCE_EXPOSURE_S
    return list(module.write_references(tmp_path_factory.mktemp("references")))


@pytest.fixture(scope="module")
def table(references, tmp_path_factory):
    out = tmp_path_factory.mktemp("table") / "cpl1.toml"
    run = subprocess.run([sys.executable, "-m", "beamkin", "phases", str(references[0]), str(references[1]),
                          "--out", str(out), "--range", "3", "13"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "6 windows" in run.stdout
    return out


def test_command_writes_toml_png_and_whole_pattern_references(table):
    for path in (table, table.with_suffix(".png"), table.parent / "cpl1_phase_a.xy", table.parent / "cpl1_phase_b.xy"):
        assert path.is_file() and path.stat().st_size > 0, path
    assert table.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fractions = tomllib.loads(table.read_text())["reducer"]["fractions"]
    assert fractions["method"] == "peaks" and fractions["whole_pattern_range_deg"] == [3.0, 13.0]
    assert "written by: beamkin phases" in table.read_text()


def test_example_table_is_what_the_command_gives(table):
    """docs/examples/cpl1_ar_phases.toml was written by the command on these references (numbers
    to the last written digit, allowing for another scipy's least-squares path)."""
    example = tomllib.loads((ROOT / "docs/examples/cpl1_ar_phases.toml").read_text())["reducer"]["fractions"]
    now = tomllib.loads(table.read_text())["reducer"]["fractions"]
    for key in ("reference_pattern_a", "reference_pattern_b"):
        name = f"docs/examples/cpl1_ar_phases_phase_{key[-1]}.xy"
        assert example.pop(key) == name and (ROOT / name).is_file()
        now.pop(key)
    windows_example, windows_now = example.pop("windows"), now.pop("windows")
    assert example.pop("whole_pattern_range_deg") == now.pop("whole_pattern_range_deg")
    assert example.pop("method") == now.pop("method") == "peaks"
    assert example == pytest.approx(now, abs=2e-5)
    assert len(windows_example) == len(windows_now)
    for got, want in zip(windows_example, windows_now):
        assert got["phase"] == want["phase"]
        assert (got["lo_deg"], got["hi_deg"]) == pytest.approx((want["lo_deg"], want["hi_deg"]), abs=2e-4)
        assert [l["phase"] for l in got["lines"]] == [l["phase"] for l in want["lines"]]
        for line, other in zip(got["lines"], want["lines"]):
            assert {k: v for k, v in line.items() if k != "phase"} == pytest.approx(
                {k: v for k, v in other.items() if k != "phase"}, rel=1e-3, abs=2e-5)


def test_the_cpl1_table_comes_out_of_the_command(table, references):
    """Same windows as the model-phase table (edges to 0.002 degrees, a tenth of a line width);
    each measured line's centre and relative intensity within 4 of its own fitted sigma of the
    model's, widths to 3 %, and rho = 1 (both phases rendered with the same scale) to 1 %."""
    from reducer.phase_finder import MeasuredPhase, find_lines

    found = tomllib.loads(table.read_text())["reducer"]["fractions"]
    model = cpl1_ar_fraction_config()
    fitted = {name: MeasuredPhase(name, find_lines(load_reference(str(path)))[0])
              for name, path in zip("AB", references)}
    assert found["reference_ratio_b_to_a"] == pytest.approx(1.0, abs=0.01)
    assert len(found["windows"]) == len(model.windows) == 6
    for got, want in zip(found["windows"], model.windows):
        assert got["phase"] == want.phase
        assert got["lo_deg"] == pytest.approx(want.lo_deg, abs=0.002)
        assert got["hi_deg"] == pytest.approx(want.hi_deg, abs=0.002)
        measured = [l for l in got["lines"] if l["phase"] == got["phase"] and got["lo_deg"] <= l["center_deg"] <= got["hi_deg"]]
        expected = [l for l in want.lines if l.phase == want.phase and want.lo_deg <= l.center_deg <= want.hi_deg]
        assert len(measured) == len(expected) == 1
        phase = fitted[want.phase]
        line = min(phase.lines, key=lambda l: abs(l.center_deg - measured[0]["center_deg"]))
        top = max(phase.lines, key=lambda l: l.area)
        sigma_rel = measured[0]["relative_intensity"] * math.hypot(line.sigma_area / line.area, top.sigma_area / top.area)
        assert 0 < line.sigma_center_deg < 3e-4
        assert measured[0]["center_deg"] == pytest.approx(expected[0].center_deg, abs=4 * line.sigma_center_deg + 1e-5)
        assert measured[0]["relative_intensity"] == pytest.approx(expected[0].relative_intensity, abs=4 * sigma_rel + 1e-3)
        assert measured[0]["fwhm_deg"] == pytest.approx(expected[0].fwhm_deg, rel=0.03)


@pytest.mark.parametrize("method", ["peaks", "whole_pattern"])
def test_mixture_series_comes_back_within_sigma(table, detector, method):
    fractions = tomllib.loads(table.read_text())["reducer"]["fractions"]
    estimator = PhaseFractionEstimator.from_config({"fractions": dict(fractions, method=method)}, None)
    truths = np.linspace(0.0, 1.0, 40)
    results = [estimator.estimate(Pattern.from_profile(*detector.profile(a, 1 / 3, seed=900 + i)), 1.0)
               for i, a in enumerate(truths)]
    assert all(r.status == "ok" for r in results)
    z = np.array([(r.alpha - t) / r.sigma_alpha for r, t in zip(results, truths)])
    assert abs(z.mean()) < 3.0 / math.sqrt(len(z)) + 0.1
    assert 0.7 < z.std(ddof=1) < 1.3
    assert np.abs(z).max() < 4.0
    # sigma(alpha) of a 1/3 s profile: ~0.01 (peaks), the whole pattern uses more lines
    assert 0.005 < np.median([r.sigma_alpha for r in results]) < 0.02


def test_pyfai_q_header_is_converted(tmp_path, detector):
    tth, mu = detector.expected_profile(0.0, REFERENCE_EXPOSURE_S)
    wavelength_A = 0.8
    q = 4 * np.pi * np.sin(np.radians(tth) / 2) / (wavelength_A / 10)
    path = tmp_path / "empty_q.dat"
    np.savetxt(path, np.column_stack([q, mu]),
               header=f"== pyFAI calibration ==\nWavelength: {wavelength_A * 1e-10:.6e} m\n  q_nm^-1  I")
    ref = load_reference(str(path))
    np.testing.assert_allclose(ref.two_theta_deg, tth, rtol=1e-10, atol=1e-10)


def test_frames_of_a_recording(tmp_path, detector):
    from sinks.recorder import Recorder
    path = tmp_path / "run.h5"
    profiles = [detector.profile(0.0, 1.0, seed=s) for s in range(4)]
    with Recorder(path) as recorder:
        for index, (tth, counts) in enumerate(profiles):
            pattern = Pattern.from_profile(tth, counts)
            recorder.write(protocol.make("pattern", {"radial": pattern.radial, "intensity": pattern.intensity,
                                                     "sigma": pattern.sigma}, unit="2th_deg", series_id="ref-a",
                                         frame_index=index, time_s=float(index)))
    ref = load_reference(f"{path}:ref-a:1-3")
    mean = np.mean([c for _, c in profiles[1:4]], axis=0)
    keep = mean > 0
    np.testing.assert_allclose(ref.intensity, mean[keep], rtol=1e-12)
    np.testing.assert_allclose(ref.sigma, np.sqrt(np.sum([c for _, c in profiles[1:4]], axis=0))[keep] / 3, rtol=1e-12)
    assert "3 frames" in ref.label
    with pytest.raises(PhaseFinderError, match="holds no pattern"):
        load_reference(f"{path}:other-series")


def test_image_reference_with_geometry_from_the_toml(tmp_path, detector):
    """An EDF frame carries no geometry: the [reducer] TOML keys give it (stream < TOML < PONI)."""
    import fabio

    md = default_metadata()
    image = detector.image(0.0, 20.0, seed=3)
    path = tmp_path / "empty.edf"
    fabio.edfimage.EdfImage(data=image.astype(np.int32)).write(str(path))
    geo = md["geometry"]
    config = {"npt": 3000, "unit": "2th_deg", "method": "", "polarization_factor": 0.99, "mask_file": "",
              "distance_m": geo["distance_m"], "beam_center_px": geo["beam_center_px"],
              "wavelength_A": geo["wavelength_A"], "pixel_size_m": md["detector"]["pixel_size_m"], "poni_file": ""}
    with pytest.raises(PhaseFinderError, match="distance_m is missing"):
        load_reference(str(path), dict(config, distance_m=0.0))
    ref = load_reference(str(path), config)
    from reducer.phase_finder import find_lines

    lines, _ = find_lines(ref)
    strongest = max(lines, key=lambda l: l.area)
    assert strongest.center_deg == pytest.approx(4.86775, abs=0.003)       # (011) of empty CPL-1 at 0.8 A


def test_unusable_references_say_why(tmp_path, references):
    missing = subprocess.run([sys.executable, "-m", "beamkin", "phases", str(tmp_path / "none.xy"),
                              str(references[1])], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    same = subprocess.run([sys.executable, "-m", "beamkin", "phases", str(references[0]), str(references[0]),
                           "--out", str(tmp_path / "x.toml")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert same.returncode == 2 and "free of the other phase's lines" in same.stderr
    (tmp_path / "short.xy").write_text("1 2\n2 3\n3 4\n")
    with pytest.raises(PhaseFinderError, match="usable points"):
        load_reference(str(tmp_path / "short.xy"))


def test_frames_of_an_eiger_master_file(tmp_path, detector):
    from streamer.eiger_h5 import write_eiger_master

    md = default_metadata()
    geo = md["geometry"]
    images = np.stack([detector.image(0.0, 5.0, seed=s) for s in range(3)])
    master = write_eiger_master(tmp_path / "empty_master.h5", images, wavelength=geo["wavelength_A"],
                                beam_center=tuple(geo["beam_center_px"]), distance=geo["distance_m"],
                                pixel_size=md["detector"]["pixel_size_m"][0])
    ref = load_reference(f"{master}:1-2", {"npt": 3000})
    assert "2 frames" in ref.label
    from reducer.phase_finder import find_lines

    strongest = max(find_lines(ref)[0], key=lambda l: l.area)
    assert strongest.center_deg == pytest.approx(4.86775, abs=0.003)       # (011) of empty CPL-1 at 0.8 A
    with pytest.raises(PhaseFinderError, match="no frame in that range"):
        load_reference(f"{master}:7-9", {"npt": 3000})


def test_any_reference_file_gives_a_pattern_or_a_clear_error(tmp_path):
    """Any bytes in a profile file, any numbers in it: a reference and a table, or
    PhaseFinderError saying why (never another exception)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from reducer.phase_finder import ReferencePattern, build_phase_table

    path = tmp_path / "fuzz.xy"
    numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10, 10**6).map(float)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
    @given(st.binary(max_size=400) | st.lists(st.tuples(numbers, numbers), max_size=80).map(
        lambda rows: "\n".join(f"{a!r} {b!r}" for a, b in rows).encode()))
    def check(content):
        path.write_bytes(content)
        try:
            ref = load_reference(str(path))
        except PhaseFinderError:
            return
        assert isinstance(ref, ReferencePattern) and np.all(np.isfinite(ref.sigma)) and np.all(ref.sigma > 0)
        try:
            build_phase_table(ref, ref)
        except PhaseFinderError:
            pass

    check()


def test_any_numbers_give_a_table_or_a_clear_error():
    """Patterns of any counts (zeros, spikes, steps): build_phase_table returns a table or raises
    PhaseFinderError."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from reducer.phase_finder import ReferencePattern, build_phase_table

    counts = st.lists(st.floats(0.0, 1e7) | st.sampled_from([0.0, 1.0, 1e7]), min_size=60, max_size=120)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(counts, counts)
    def check(a, b):
        refs = []
        for name, y in (("a", a), ("b", b)):
            y = np.asarray(y)
            x = np.linspace(3.0, 13.0, y.shape[0])
            refs.append(ReferencePattern(name, x, y, np.sqrt(np.maximum(y, 1.0))))
        try:
            table = build_phase_table(*refs)
        except PhaseFinderError:
            return
        assert {w.phase for w in table.config.windows} == {"A", "B"}

    check()
