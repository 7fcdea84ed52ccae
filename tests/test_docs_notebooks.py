"""docs/notebooks.md runs as written: its code blocks, on a recording like the demo's, give the
numbers the science predicts (F1 leads, t0 near the truth) and arrays of the documented shapes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRUE_T0_S = 7.45


def write_recording(path: Path) -> None:
    """start, 36 patterns and fractions (F1, t0 = 7.45 s, k = 0.62 1/s, sigma 0.02), a result, end."""
    from beamkin.protocol import make
    from inference.models import alpha_numpy
    from sinks.recorder import Recorder
    t = np.arange(36) / 3 + 0.15
    y = alpha_numpy("F1", 0.62 * (t - TRUE_T0_S)) + np.random.default_rng(7).normal(0, 0.02, t.size)
    radial = np.linspace(3.0, 13.0, 50)
    with Recorder(path) as recorder:
        recorder.write(make("start", series_id="nb", kind="image", source="test", detector={}, geometry={},
                            frame_time_s=1 / 3, exposure_s=0.3, n_frames=36, gas_time_s=5.0))
        for j in range(t.size):
            recorder.write(make("pattern", arrays={"radial": radial, "intensity": np.full(50, 100.0 + j),
                                                   "sigma": np.full(50, 10.0)},
                                series_id="nb", frame_index=j, time_s=float(t[j]), unit="2th_deg"))
            flagged = j == 3
            recorder.write(make("fraction", series_id="nb", frame_index=j, time_s=float(t[j]), exposure_s=0.3,
                                alpha=None if flagged else float(y[j]), sigma_alpha=None if flagged else 0.02,
                                status="flagged" if flagged else "ok", reason="test" if flagged else None))
        recorder.write(make("end", series_id="nb", n_frames=36, reason="completed"))


def code_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "notebooks.md").read_text(), flags=re.S)


def test_the_notebook_page_runs_and_gives_the_expected_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_recording(tmp_path / "run.h5")
    blocks = code_blocks()
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/notebooks.md", "exec"), namespace)
    result, series, again = namespace["result"], namespace["series"], namespace["again"]
    for fit in (result, again):
        assert fit["leading_model"] == "F1"
        t0 = fit["model_averaged"]["t0"]
        assert t0["q05"] < TRUE_T0_S < t0["q95"] and t0["sd"] < 0.2
        assert fit["priors"]["t0"]["low"] == 5.0  # ts starts the onset window
    assert series["series_id"] == "nb" and series["ok"].sum() == 35 and not series["ok"][3]
    assert np.isnan(series["alpha"][3]) and series["intensity"].shape == (36, 50)
    assert series["unit"] == "2th_deg" and series["radial"][0] == 3.0
    np.testing.assert_array_equal(series["intensity"][:, 0], 100.0 + np.arange(36))
    assert "F1" in capsys.readouterr().out


def test_analyze_refuses_bad_arrays_and_keys():
    import beamkin
    from beamkin.config import ConfigError
    from inference.analyze import SeriesFormatError

    t = np.arange(5.0)
    with pytest.raises(SeriesFormatError, match="time_s has 5 values and alpha 4"):
        beamkin.analyze(t, np.zeros(4))
    with pytest.raises(SeriesFormatError, match=r"time_s\[2\] = 1.0 is not after"):
        beamkin.analyze([0.0, 1.0, 1.0, 2.0, 3.0], np.zeros(5))
    with pytest.raises(SeriesFormatError, match=r"alpha\[1\] is not finite"):
        beamkin.analyze(t, [0.0, np.nan, 0, 0, 0])
    with pytest.raises(ConfigError, match="did you mean 'inference.particles'"):
        beamkin.analyze(t, np.zeros(5), particle=10)
