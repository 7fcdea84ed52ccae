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
