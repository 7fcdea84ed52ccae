"""NeXus NXdata views in a recording (issue 13, item 7): what silx needs to plot alpha(t), the
patterns against time and the posterior summaries, with the recorded numbers."""

from __future__ import annotations

import h5py
import numpy as np

from beamkin import cli
from beamkin.protocol import make
from beamkin.recording import read_messages
from sinks.recorder import Recorder
def write_recording(path, n=6):
    t = np.arange(n) * 0.5 + 0.25
    radial = np.linspace(4.0, 6.0, 20)
    with Recorder(path) as recorder:
        recorder.write(make("start", series_id="s1", kind="image", source="t", detector={}, geometry={},
                            frame_time_s=0.5, exposure_s=0.5, n_frames=n, gas_time_s=0.5))
        for j in range(n):
            recorder.write(make("pattern", arrays={"radial": radial, "intensity": np.full(20, 10.0 * j),
                                                   "sigma": np.full(20, 1.0)},
                                series_id="s1", frame_index=j, time_s=float(t[j]), unit="2th_deg"))
            flagged = j == 2
            recorder.write(make("fraction", series_id="s1", frame_index=j, time_s=float(t[j]), exposure_s=0.5,
                                alpha=None if flagged else j / 10, sigma_alpha=None if flagged else 0.01,
                                status="flagged" if flagged else "ok", reason="x" if flagged else None))
            stat = {"mean": 1.0 + j, "sd": 0.1, "q05": 0.9 + j, "q50": 1.0 + j, "q95": 1.1 + j}
            recorder.write(make("posterior", series_id="s1", frame_index=j, time_s=float(t[j]),
                                onset_probability=j / n, leading_model="F1",
                                models={"F1": {"probability": 0.8, "params": {"t0": stat}}},
                                model_averaged={"t0": stat}))
        recorder.write(make("end", series_id="s1", n_frames=n, reason="completed"))
    return t


def test_export_nexus_adds_nxdata_views_with_the_recorded_numbers(tmp_path, capsys):
    path = tmp_path / "rec.h5"
    t = write_recording(path)
    before = [(m.type, m.fields) for _, m in read_messages(path, with_arrays=False)]
    assert cli.main(["export", str(path), "--nexus"]) == 0
    assert "NeXus views series_1" in capsys.readouterr().out
    assert cli.main(["export", str(path), "--nexus"]) == 0  # again: replaced, not duplicated
    with h5py.File(path) as f:
        assert f.attrs["NX_class"] == "NXroot" and f.attrs["default"] == "series_1"
        entry = f["series_1"]
        assert entry.attrs["NX_class"] == "NXentry" and entry.attrs["default"] == "alpha"
        alpha = entry["alpha"]
        assert alpha.attrs["NX_class"] == "NXdata" and alpha.attrs["signal"] == "alpha"
        assert list(alpha.attrs["axes"]) == ["time_s"] and alpha["time_s"].attrs["units"] == "s"
        ok = np.array([0, 1, 3, 4, 5])  # frame 2 was flagged
        np.testing.assert_allclose(alpha["alpha"][()], ok / 10)
        np.testing.assert_allclose(alpha["alpha_errors"][()], 0.01)
        np.testing.assert_allclose(alpha["time_s"][()], t[ok])
        patterns = entry["patterns"]
        assert list(patterns.attrs["axes"]) == ["time_s", "two_theta"] and patterns["two_theta"].attrs["units"] == "deg"
        assert patterns["intensity"].shape == (6, 20)
        np.testing.assert_allclose(patterns["intensity"][:, 0], 10.0 * np.arange(6))
        np.testing.assert_allclose(entry["onset/onset_probability"][()], np.arange(6) / 6)
        np.testing.assert_allclose(entry["t0/t0_mean"][()], 1.0 + np.arange(6))
        assert list(entry["t0"].attrs["auxiliary_signals"]) == ["t0_q05", "t0_q95"]
    after = [(m.type, m.fields) for _, m in read_messages(path, with_arrays=False)]
    assert after == before  # the recording's own content is untouched


def test_export_needs_an_output(tmp_path, capsys):
    path = tmp_path / "rec.h5"
    write_recording(path, n=2)
    assert cli.main(["export", str(path)]) == 2
    assert capsys.readouterr().err == "beamkin export: give --csv DIR and/or --nexus\n"
