"""The documents say what the code does: documented defaults equal beamkin/defaults.toml, the
documented ports, result schema, models and priors are those of the code, and links resolve."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from beamkin import config as configuration

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md", ROOT / "deploy" / "README.md"]


def text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def documented_settings() -> list[tuple[Path, str, str]]:
    """(file, dotted key, value text) of every `[section] key = value` or `section.key = value`
    written in inline code in the documents."""
    found = []
    for path in DOCS:
        body = path.read_text(encoding="utf-8")
        for section, key, value in re.findall(r"`\[([a-z_.]+)\] ([A-Za-z_]+) = ([^`]+)`", body):
            found.append((path, f"{section}.{key}", value))
        for dotted, value in re.findall(r"`([a-z_]+\.[A-Za-z_.]+) = ([^`]+)`", body):
            found.append((path, dotted, value))
    return found


def test_documented_defaults_equal_the_defaults_file():
    docs = configuration.key_docs()
    settings = [(p, k, v) for p, k, v in documented_settings() if k in docs and not docs[k].optional]
    assert len(settings) >= 4  # the check is not vacuous
    for path, dotted, value in settings:
        assert configuration.parse_value(value, docs[dotted].default) == docs[dotted].default, \
            f"{path.name}: {dotted} = {value} but beamkin/defaults.toml has {docs[dotted].default!r}"


def test_documented_optional_keys_exist():
    for path, dotted, _ in documented_settings():
        if dotted.split(".")[0] in configuration.defaults():
            configuration.check_key(dotted)  # ConfigError (test failure) for a key the code does not know


def test_protocol_socket_table_ports_are_the_default_endpoints():
    endpoints = configuration.defaults()["endpoints"]
    rows = re.findall(r"^\| `([a-z]+)`, :(\d+) \|", text("docs/protocol.md"), flags=re.M)
    assert {name for name, _ in rows} == {k for k, v in endpoints.items() if str(v).startswith("tcp://")}
    for name, port in rows:
        assert endpoints[name].endswith(f":{port}"), (name, port, endpoints[name])


def test_dashboard_example_uses_the_default_results_endpoint_and_settings():
    defaults = configuration.defaults()
    body = text("docs/dashboard.md")
    endpoint = re.search(r'serve_dashboard\("([^"]+)"', body).group(1)
    assert endpoint == defaults["endpoints"]["results"]
    assert f"port={defaults['dashboard']['port']}" in body
    assert f"max_refresh_hz={defaults['dashboard']['max_refresh_hz']}" in body
    assert f"alert_threshold={defaults['inference']['alert_threshold']}" in body


@pytest.fixture(scope="module")
def real_result() -> dict:
    """A result of the live service's engine on a small F1 series (2 models, 128 particles)."""
    from inference.models import alpha_numpy
    from inference.service import make_engine

    t = np.arange(16) / 2 + 0.25
    y = alpha_numpy("F1", 0.9 * (t - 3.0)) + np.random.default_rng(4).normal(0, 0.02, t.size)
    table = configuration.defaults()["inference"]
    table.update(particles=128, models=["F1", "D3"], priors={"fixed": {"A": 1.0}})
    engine = make_engine(table, {"series_id": "doc", "n_frames": 16, "frame_time_s": 0.5, "gas_time_s": 1.0})
    engine.warm_up()
    for j in range(t.size):
        engine.assimilate(j, float(t[j]), 0.5, float(y[j]), 0.02)
    return json.loads(json.dumps(engine.result()))


def test_protocol_result_example_has_the_keys_of_a_real_result(real_result):
    body = text("docs/protocol.md")
    section = body[body.index("### `result`"):]
    example = json.loads(re.search(r"```json\n(.*?)```", section, flags=re.S).group(1))
    assert set(example) <= set(real_result), set(example) - set(real_result)
    assert set(real_result) - set(example) == set()  # every key of a result is documented
    model = example["models"]["F1"]
    assert set(model) <= set(real_result["models"]["F1"])
    assert set(model["params"]["t0"]) == set(real_result["models"]["F1"]["params"]["t0"])
    assert set(example["model_averaged"]) == set(real_result["model_averaged"])
    assert set(example["null_model"]) == set(real_result["null_model"])
    for name, prior in example["priors"].items():
        same_kind = next(p for p in real_result["priors"].values()
                         if p and p["distribution"] == prior["distribution"])
        assert set(prior) == set(same_kind) - {"applies_to"}, name
    assert set(example["settings"]) <= set(real_result["settings"])
    assert set(example["alert"]) <= set(real_result["alert"])


def test_glossary_lists_every_model_and_parameter_with_the_default_priors():
    from inference import priors
    from inference.models import MODEL_DESCRIPTIONS, MODEL_NAMES

    body = text("docs/glossary.md")
    models = re.findall(r"^\| (F1|F2|F3|A2|A3|A4|An|R2|R3|D1|D2|D3|D4|P2|P3|P4) \| ([^|]+) \|", body, flags=re.M)
    assert [code for code, _ in models] == list(MODEL_NAMES)
    for code, name in models:  # the names are the code's descriptions
        assert name.strip() == MODEL_DESCRIPTIONS[code], (code, name)
    params = dict(re.findall(r"^\| (t0|ts|k|A|s|n) \| [^|]+ \| [^|]+ \| [^|]+ \| ([^|]+) \|", body, flags=re.M))
    assert set(params) == {"t0", "ts", "k", "A", "s", "n"}
    for name, (lo, hi) in {"k": priors.DEFAULT_K, "s": priors.DEFAULT_S, "A": priors.DEFAULT_A,
                           "n": priors.DEFAULT_N}.items():
        assert f"[{lo:g}, {hi:g}]" in params[name], (name, params[name])
    assert "log-uniform" in params["k"] and "log-uniform" in params["s"] and "uniform" in params["A"]
    assert set(configuration.defaults()["inference"]["models"]) <= set(MODEL_NAMES)
    assert "`[inference] models = " in body or "[inference] models" in body


def test_relative_links_resolve():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to missing {target}"


def test_readme_starts_with_the_two_set_up_commands_and_links_the_user_documents():
    readme = text("README.md")
    assert readme.startswith("# beamkin\n\n```\nmake demo\nmake test\n```\n")
    for name in ("docs/glossary.md", "docs/detectors.md", "docs/configuration.md"):
        assert f"]({name})" in readme, name
