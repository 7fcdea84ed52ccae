"""One settings object for the live stage and `beamkin analyze` (inference.settings).

The stage (InferenceStage, from the resolved configuration) and `beamkin analyze` (from its
command line: --config FILE and options) must build identical settings, and so identical
samplers, from the same configuration; every default is beamkin/defaults.toml's.
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest

from beamkin import config as configuration
from inference import analyze
from inference.priors import Priors
from inference.series import make_engine
from inference.settings import InferenceSettings, default_settings
from inference.smc import OnlineInference
from inference.stage import InferenceStage

TOML_INFERENCE = tomllib.loads((Path(configuration.__file__).parent / "defaults.toml").read_text())["inference"]


def stage_settings(config: dict) -> InferenceSettings:
    stage = InferenceStage(config, publisher=None, stop=threading.Event())
    return stage.settings


def analyze_settings(tmp_path, *options: str) -> InferenceSettings:
    csv = tmp_path / "series.csv"
    csv.write_text("time_s,alpha\n0.5,0.0\n1.5,0.1\n2.5,0.5\n")
    parser = argparse.ArgumentParser()
    analyze.add_arguments(parser)
    return analyze.inference_settings(parser.parse_args([str(csv), *options]))


def test_every_inference_key_of_the_toml_is_a_setting():
    fields = {f.name for f in dataclasses.fields(InferenceSettings)}
    assert fields == set(TOML_INFERENCE)


def test_the_defaults_are_the_toml_ones_on_both_paths(tmp_path):
    live = stage_settings(configuration.defaults())
    offline = analyze_settings(tmp_path)
    assert live == offline == default_settings()
    assert live.histogram_bins == TOML_INFERENCE["histogram_bins"]
    assert live.models == tuple(TOML_INFERENCE["models"])
    assert live.particles == TOML_INFERENCE["particles"]


def test_stage_and_analyze_build_identical_settings_from_the_same_configuration(tmp_path):
    path = tmp_path / "beamkin.toml"
    path.write_text('[inference]\nmodels = ["F1", "A2", "D3"]\nparticles = 256\nseed = 7\nhistogram_bins = 30\n'
                    'null_prior = 0.25\nmodel_threads = 1\n\n[inference.priors]\nk = [0.1, 10.0]\nfixed = {A = 1.0}\n')
    live = stage_settings(configuration.load(path))
    offline = analyze_settings(tmp_path, "--config", str(path))
    assert live == offline
    assert live.models == ("F1", "A2", "D3") and live.histogram_bins == 30 and live.particles == 256
    assert dict(live.priors) == {"k": (0.1, 10.0), "fixed": {"A": 1.0}}
    # the same sampler for the same series
    start = {"series_id": "s", "n_frames": 24, "frame_time_s": 0.5, "gas_time_s": 2.0}
    a, b = make_engine(live, start), make_engine(offline, start)
    assert a.models == b.models and a.n_particles == b.n_particles == 256 and a.seed == b.seed == 7
    assert a.priors.to_dict() == b.priors.to_dict()
    for key in ("t0_edges", "k_edges", "predictive_times"):
        assert np.array_equal(a.payload_settings[key], b.payload_settings[key])
    assert a.payload_settings["t0_edges"].size == 31 and a.null_prior == 0.25


def test_an_option_changes_both_paths_alike(tmp_path):
    config = configuration.defaults()
    config["inference"]["particles"] = 512
    config["inference"]["histogram_bins"] = 40
    offline = analyze_settings(tmp_path, "--particles", "512", "--inference.histogram_bins", "40")
    assert stage_settings(config) == offline
    assert offline != default_settings()


def test_the_sampler_library_defaults_are_the_toml_ones():
    engine = OnlineInference(priors=Priors.for_series(12.0))
    assert engine.models == tuple(TOML_INFERENCE["models"])
    assert engine.payload_settings["t0_edges"].size == TOML_INFERENCE["histogram_bins"] + 1
    assert engine.n_particles == TOML_INFERENCE["particles"] and engine.null_prior == TOML_INFERENCE["null_prior"]


@pytest.mark.parametrize("change, problem", [
    ({"particles": "many"}, "particles = 'many' is not an int"),
    ({"models": "F1"}, "models = 'F1' is not a tuple"),
    ({"models": ["F1", "Z9"]}, "unknown kinetic model 'Z9'"),
    ({"once": "yes"}, "once = 'yes' is not a bool"),
    ({"particls": 10}, "particls not known"),
])
def test_a_bad_table_names_its_key(change, problem):
    table = {**configuration.defaults()["inference"], **change}
    with pytest.raises(ValueError, match=problem):
        InferenceSettings.from_table(table)
    table = configuration.defaults()["inference"]
    del table["seed"]
    with pytest.raises(ValueError, match="lacks seed"):
        InferenceSettings.from_table(table)


def test_settings_are_read_only():
    settings = default_settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.particles = 1
    with pytest.raises(TypeError):
        settings.priors["k"] = [1.0, 2.0]
