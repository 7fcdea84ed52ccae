"""Offline analysis: CSV input validation and equivalence with the online engine."""

import argparse
import json

import numpy as np
import pytest

from inference import analyze
from inference.models import alpha_numpy
from inference.priors import Priors
from inference.smc import OnlineInference


def write(tmp_path, text, name="series.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("time_s,sigma\n0,0.1\n", "line 1: missing column 'alpha'"),
    ("time_s,alpha\n0,0.1\n0.5,abc\n", "line 3: column 'alpha' is not a number: 'abc'"),
    ("time_s,alpha\n0,0.1\n0.5,0.2\n0.5,0.3\n", "line 4: time_s 0.5 is not after"),
    ("time_s,alpha\n0,0.1\n1,nan\n", "line 3: column 'alpha' must be finite"),
    ("time_s,alpha,sigma\n0,0.1,0.01\n1,0.2,-1\n", "line 3: column 'sigma' must be >= 0"),
    ("time_s,alpha\n0,0.1\n1\n", "line 3: expected 2 fields, got 1"),
    ("time_s,alpha,foo\n0,0.1,1\n", "line 1: unknown column(s) 'foo'"),
    ("", "line 1: empty file"),
    ("time_s,alpha\n", "no data rows"),
])
def test_bad_csv_names_the_line(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(analyze.SeriesFormatError) as info:
        analyze.load_series(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_unknown_suffix_is_rejected(tmp_path):
    with pytest.raises(analyze.SeriesFormatError, match="no reader"):
        analyze.load_series(write(tmp_path, "x", "series.xyz"))


def paper_csv(tmp_path, with_sigma):
    t = np.arange(36) / 3.0
    y = alpha_numpy("F1", 0.6192 * (t - 7.4461)) + np.random.default_rng(0).normal(0, 0.02, t.size)
    lines = ["time_s,alpha" + (",sigma,exposure_s" if with_sigma else "")]
    for tj, yj in zip(t, y):
        lines.append(f"{float(tj)!r},{float(yj)!r}" + (",0.02,0.1" if with_sigma else ""))
    return write(tmp_path, "\n".join(lines) + "\n"), t, y


def test_offline_result_equals_online_engine(tmp_path):
    path, t, y = paper_csv(tmp_path, with_sigma=True)
    series = analyze.load_series(path)
    assert series.default_t_end() == pytest.approx(12.0)
    offline = analyze.analyze_series(series, models=("F1", "R3"), n_particles=256, seed=3)
    engine = OnlineInference(models=("F1", "R3"), priors=Priors.for_series(12.0), n_particles=256, seed=3)
    for j, (tj, yj) in enumerate(zip(t, y)):
        engine.update(j, float(tj), 0.1, float(yj), 0.02)
    online = engine.result()
    offline.pop("input")
    assert offline == online


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    path, _, _ = paper_csv(tmp_path, with_sigma=False)
    parser = argparse.ArgumentParser()
    analyze.add_arguments(parser)
    out = tmp_path / "result.json"
    args = parser.parse_args([str(path), "--models", "F1,A2", "--particles", "512", "--fix", "A=1",
                              "--prior", "k=0.05:20", "--json", str(out)])
    assert analyze.main(args) == 0
    captured = capsys.readouterr()
    assert "F1" in captured.out and "log evidence" in captured.out
    assert "frame 36/36" in captured.err
    result = json.loads(out.read_text())
    assert result["priors"]["A"] == {"distribution": "fixed", "value": 1.0, "unit": "alpha"}
    assert result["priors"]["k"]["low"] == 0.05 and result["priors"]["t0"]["high"] == pytest.approx(12.0)
    assert result["models"]["F1"]["probability"] > 0.99
    assert abs(result["models"]["F1"]["params"]["t0"]["mean"] - 7.4461) < 0.1
    assert result["n_frames"] == 36


def test_cli_reports_bad_input_with_exit_status_2(tmp_path, capsys):
    path = write(tmp_path, "time_s,alpha\n0,0.1\n0.5,x\n")
    parser = argparse.ArgumentParser()
    analyze.add_arguments(parser)
    assert analyze.main(parser.parse_args([str(path)])) == 2
    assert "line 3" in capsys.readouterr().err
    assert analyze.main(parser.parse_args([str(path), "--models", "F1,Q7"])) == 2
    assert "unknown kinetic model 'Q7'" in capsys.readouterr().err


# ------------------------------------------------------- one configuration, clean errors (issue 13)
def run_cli(argv):
    from beamkin import cli

    return cli.main(["analyze", *argv])


def test_excel_csv_with_bom_and_crlf_is_read(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftime_s,alpha\r\n0,0.01\r\n0.5,0.02\r\n1.0,0.5\r\n".encode("utf-8"))
    series = analyze.load_series(path)
    np.testing.assert_array_equal(series.time_s, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(series.alpha, [0.01, 0.02, 0.5])


@pytest.mark.parametrize("payload", [b"\x89HDF\r\n\x1a\n\x00\x00\xff\xfe\x80", b"time_s,alpha\n0,\x001\n"])
def test_binary_file_is_one_line_naming_the_file(tmp_path, capsys, payload):
    path = tmp_path / "data.csv"
    path.write_bytes(payload)
    assert run_cli([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"beamkin analyze: {path}") and "not a" in err and err.count("\n") == 1


def test_missing_input_is_one_line(tmp_path, capsys):
    assert run_cli([str(tmp_path / "nothing.csv")]) == 2
    assert capsys.readouterr().err == f"beamkin analyze: {tmp_path / 'nothing.csv'} does not exist\n"


def test_alpha_in_percent_is_warned_about_before_the_run(tmp_path, capsys):
    t = np.arange(12) / 3.0
    alpha = 100 * alpha_numpy("F1", 0.8 * (t - 2.0))
    path = write(tmp_path, "time_s,alpha\n" + "".join(f"{float(a)!r},{float(b)!r}\n" for a, b in zip(t, alpha)))
    series = analyze.load_series(path)
    n_out = int(np.sum(alpha > 1.5))
    assert n_out > 0
    warning = analyze.implausible_alpha(series)
    assert f"{n_out} of 12 alpha values lie outside [-0.5, 1.5]" in warning and "in percent?" in warning
    run_cli([str(path), "--particles", "64", "--models", "F1"])
    err = capsys.readouterr().err
    assert err.index("warning: ") < err.index("frame 1/12")
    ok = write(tmp_path, "time_s,alpha\n0,-0.4\n1,1.4\n", "ok.csv")
    assert analyze.implausible_alpha(analyze.load_series(ok)) is None


def test_json_output_path_is_checked_before_the_run(tmp_path, capsys):
    path, _, _ = paper_csv(tmp_path, with_sigma=False)
    blocker = tmp_path / "afile"
    blocker.write_text("")
    assert run_cli([str(path), "--json", str(blocker / "result.json")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "frame" not in err  # refused before any frame was analysed
    assert run_cli([str(path), "--json", str(tmp_path)]) == 2
    assert "is a folder, expected a file name" in capsys.readouterr().err


def test_defaults_and_config_are_those_of_the_live_service(tmp_path, capsys):
    from beamkin import config as configuration

    path, _, _ = paper_csv(tmp_path, with_sigma=False)
    out = tmp_path / "r.json"
    assert run_cli([str(path), "--particles", "64", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert sorted(result["models"]) == sorted(configuration.defaults()["inference"]["models"])
    user = tmp_path / "user.toml"
    user.write_text("[inference]\nmodels = ['F1', 'D3']\nparticles = 96\nseed = 5\n[inference.priors]\nk = [0.1, 10.0]\n")
    assert run_cli([str(path), "--config", str(user), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert sorted(result["models"]) == ["D3", "F1"]
    assert result["settings"]["n_particles"] == 96 and result["settings"]["seed"] == 5
    assert result["priors"]["k"]["low"] == 0.1 and result["priors"]["k"]["high"] == 10.0


def test_recording_is_analysed_as_the_live_service_would(tmp_path):
    """analyze of a recording = the live service's engine (make_engine on the recorded start) fed
    the recorded fractions: the same posterior, number for number."""
    from beamkin import config as configuration
    from beamkin.protocol import make
    from inference.service import make_engine
    from sinks.recorder import Recorder
    t = np.arange(24) / 2.0 + 0.25
    y = alpha_numpy("F1", 0.7 * (t - 6.0)) + np.random.default_rng(1).normal(0, 0.02, t.size)
    start = make("start", series_id="live1", kind="profile", source="test", detector={}, geometry={},
                 frame_time_s=0.5, exposure_s=0.5, n_frames=24, gas_time_s=3.0)
    path = tmp_path / "rec.h5"
    with Recorder(path) as recorder:
        recorder.write(start)
        for j, (tj, yj) in enumerate(zip(t, y)):
            recorder.write(make("fraction", series_id="live1", frame_index=j, time_s=float(tj), exposure_s=0.5,
                                alpha=float(yj), sigma_alpha=0.02, status="ok", reason=None))
    table = configuration.defaults()["inference"]
    table["particles"] = 128
    live = make_engine(table, start)
    live.warm_up()
    for j, (tj, yj) in enumerate(zip(t, y)):
        live.assimilate(j, float(tj), 0.5, float(yj), 0.02)
    want = live.result()
    out = tmp_path / "offline.json"
    assert run_cli([str(path), "--inference.particles", "128", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    got.pop("input")
    assert got == json.loads(json.dumps(want))
    assert got["priors"]["t0"]["low"] == 3.0 and got["priors"]["t0"]["high"] == 12.0


@pytest.mark.parametrize("payload, problem", [
    (None, "does not exist"),
    (b"\x00\x01\x02 binary", "is not an HDF5 file"),
])
def test_recording_input_problems_are_one_line(tmp_path, capsys, payload, problem):
    path = tmp_path / "run.h5"
    if payload is not None:
        path.write_bytes(payload)
    assert run_cli([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"beamkin analyze: {path}") and problem in err and err.count("\n") == 1


def test_deploy_and_example_configurations_are_valid():
    from pathlib import Path

    from beamkin import config as configuration

    root = Path(__file__).resolve().parents[1]
    for path in [root / "deploy" / "beamkin.toml.example", *sorted((root / "docs" / "examples").glob("*.toml"))]:
        configuration.load(path)  # ConfigError (a failure) for an unknown key
