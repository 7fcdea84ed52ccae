"""One configuration: the schema is beamkin/defaults.toml; unknown keys are errors with a suggestion."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from beamkin import cli
from beamkin import config as configuration

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "cpl1_ar.toml"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "user.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key, nearest", [
    ("[inference]\nparticle = 100\n", "inference.particle", "inference.particles"),
    ("[reducer.fraction]\nmethod = 'peaks'\n", "reducer.fraction", "reducer.fractions"),
    ("[reducer.fractions]\nrefrence_ratio_b_to_a = 1.2\n", "reducer.fractions.refrence_ratio_b_to_a",
     "reducer.fractions.reference_ratio_b_to_a"),
    ("[[reducer.fractions.windows]]\nphase = 'A'\nlo_deg = 4.8\nhi_deg = 4.9\n"
     "lines = [{phase = 'A', centre_deg = 4.87, fwhm_deg = 0.02, relative_intensity = 100.0}]\n",
     "reducer.fractions.windows[0].lines[0].centre_deg", "reducer.fractions.windows[0].lines[0].center_deg"),
    ("[inference.priors]\nkk = [0.1, 10.0]\n", "inference.priors.kk", "inference.priors.k"),
    ("[alert]\nwebhook = 'http://x'\n", "alert", "alerts"),
])
def test_unknown_key_in_a_file_names_it_and_the_nearest(tmp_path, text, key, nearest):
    path = write(tmp_path, text)
    with pytest.raises(configuration.ConfigError) as info:
        configuration.load(path)
    message = str(info.value)
    assert str(path) in message and repr(key) in message and f"did you mean {nearest!r}" in message


def test_documented_optional_tables_are_accepted(tmp_path):
    path = write(tmp_path, "[inference.priors]\nk = [0.1, 10.0]\nfixed = {A = 1.0}\n"
                           "[alerts]\nwebhook = 'http://127.0.0.1:9/x'\n")
    config = configuration.load(path)
    assert config["inference"]["priors"] == {"k": [0.1, 10.0], "fixed": {"A": 1.0}}
    assert config["alerts"]["webhook"] == "http://127.0.0.1:9/x"


def test_the_example_material_file_is_valid():
    config = configuration.load(EXAMPLE)
    assert config["reducer"]["fractions"]["method"] == "peaks"
    assert len(config["reducer"]["fractions"]["windows"]) == 6


def test_the_fraction_schema_is_the_reducer_dataclasses():
    """beamkin/config.py lists the [reducer.fractions] keys without importing the reducer; they are
    the fields of the reducer's FractionConfig (less the in-memory phases), WindowSpec and Line."""
    import dataclasses

    from reducer.fraction_config import FractionConfig, Line, WindowSpec

    def names(cls):
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "phases")

    assert configuration.FRACTION_KEYS == names(FractionConfig)
    assert configuration.FRACTION_WINDOW_KEYS == names(WindowSpec)
    assert configuration.FRACTION_LINE_KEYS == names(Line)
    schema = configuration._fraction_schema()
    assert tuple(schema) == names(FractionConfig)
    assert tuple(schema["windows"][0]) == names(WindowSpec)
    assert tuple(schema["windows"][0]["lines"][0]) == names(Line)


def test_every_key_has_a_description_and_every_default_is_in_the_schema():
    docs = configuration.key_docs()
    leaves = dict(configuration._leaves(configuration.defaults()))
    assert set(leaves) <= set(docs)
    for dotted, value in leaves.items():
        assert docs[dotted].default == value and not docs[dotted].optional
    assert [d for d, doc in docs.items() if not doc.description] == []
    assert docs["inference.particles"].description == "particles per model"
    # a description continued on an indented comment line is joined
    assert docs["simulator.counts_scale"].description.endswith("the noise of the source paper's Ar/CPL-1 data")


def test_new_keys_in_the_defaults_need_no_code(monkeypatch):
    text = configuration.defaults_text().replace(
        "[inference]\n", "[inference]\nnull_probability = 0.5    # prior probability of no reaction\n")
    monkeypatch.setattr(configuration, "defaults_text", lambda: text)
    configuration.key_docs.cache_clear()
    try:
        configuration.check_key("inference.null_probability")
        assert configuration.key_docs()["inference.null_probability"].description == "prior probability of no reaction"
    finally:
        monkeypatch.undo()
        configuration.key_docs.cache_clear()


@pytest.mark.parametrize("argv, nearest", [
    (["infer", "--set", "inference.particle=2048"], "inference.particles"),
    (["infer", "--inference.particle", "2048"], "inference.particles"),
    (["infer", "--set", "reducer.fractions.methd=peaks"], "reducer.fractions.method"),
    (["analyze", "x.csv", "--inference.modles", "F1"], "inference.models"),
])
def test_unknown_key_on_the_command_line_exits_2_with_suggestion(argv, nearest, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"did you mean {nearest!r}" in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_command_line_values_override_the_file(tmp_path):
    path = write(tmp_path, "[inference]\nparticles = 100\n")
    args = cli.build_parser(analyze_arguments=False).parse_args(
        ["infer", "--config", str(path), "--inference.seed", "7", "--set", "inference.priors.k=[0.1, 10]"])
    config = configuration.from_arguments(args)
    assert config["inference"]["particles"] == 100 and config["inference"]["seed"] == 7
    assert config["inference"]["priors"]["k"] == [0.1, 10]


@pytest.mark.parametrize("command", ["analyze", "report", "export", "replay", "run", "demo", "infer"])
def test_every_command_takes_config_and_shows_descriptions(command):
    out = subprocess.run([sys.executable, "-m", "beamkin", command, "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--config FILE" in out
    assert "DEBUG, INFO, WARNING or ERROR" in out  # the comment of [logging] level


def test_help_of_a_key_shows_its_default_and_description():
    parser = cli.build_parser(analyze_arguments=False)
    text = parser._subparsers._group_actions[0].choices["infer"].format_help()
    assert "particles per model (default: 4096)" in " ".join(text.split())


def test_config_that_is_not_text_or_toml(tmp_path):
    binary = tmp_path / "b.toml"
    binary.write_bytes(b"\x89HDF\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(configuration.ConfigError, match="is not text"):
        configuration.load(binary)
    with pytest.raises(configuration.ConfigError, match="does not exist"):
        configuration.load(tmp_path / "missing.toml")
    with pytest.raises(configuration.ConfigError, match="is a folder"):
        configuration.load(tmp_path)


def test_defaults_file_is_valid_toml_and_its_own_schema():
    configuration.check_keys(tomllib.loads(configuration.defaults_text()))


def test_config_command_prints_the_resolved_configuration(tmp_path, capsys):
    import json

    path = write(tmp_path, "[inference]\nparticles = 100\n")
    assert cli.main(["config", "--config", str(path), "--inference.seed", "3"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["inference"]["particles"] == 100 and resolved["inference"]["seed"] == 3
    assert resolved["dashboard"] == configuration.defaults()["dashboard"]
    bad = write(tmp_path, "[dashbord]\nport = 1\n")
    assert cli.main(["config", "--config", str(bad)]) == 2
    assert "did you mean 'dashboard'" in capsys.readouterr().err
