"""Static HTML report from protocol messages and from an analysis JSON (+ CSV data)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from dashboards.report import REPORT_FILENAME, ReportInputError, build_report, load_analysis_json
from tests.conftest import DEMO_MODELS, TRUE_K_PER_S, TRUE_T0_S

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PLOTS = ("alpha_fit", "t0_posterior", "k_posterior", "model_probabilities")


@pytest.fixture(scope="module")
def series_messages(pipeline_messages):
    return pipeline_messages


@pytest.fixture(scope="module")
def series_id(pipeline_messages):
    return next(m.series_id for m in pipeline_messages if m.type == "start")


def table_rows(page_html: str, series_id: str) -> dict[str, list[str]]:
    table = re.search(rf"<table class='models' id='models-{re.escape(series_id)}'>(.*?)</table>", page_html).group(1)
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", table)[1:]
    cells = [re.findall(r"<td>(.*?)</td>", r) for r in rows]
    return {c[0]: c[1:] for c in cells}


def assert_self_contained(page_html: str) -> None:
    assert "cdn.bokeh.org" not in page_html
    assert not re.search(r"<(script|link)[^>]+(src|href)=[\"']https?:", page_html)


def render_in_browser(path: Path, names: list[str]) -> None:
    """Open the report offline in Chromium: every named plot exists and no console error occurs."""
    assert Path(CHROMIUM).exists(), "Debian chromium missing: `make test` installs it (make browser)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(offline=True)
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(path.as_uri())
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=30000)
            found = page.evaluate("(names) => names.filter((n) => Bokeh.documents.some("
                                  "(d) => d.get_model_by_name(n) !== null))", names)
            assert found == names
            page.locator("canvas").nth(len(names) - 1).wait_for(state="attached", timeout=30000)
            assert page.locator("canvas").count() >= len(names)  # one canvas per plot (shadow DOM pierced)
            assert not errors, f"console errors: {errors}"
        finally:
            browser.close()


def test_report_from_messages(series_messages, series_id, tmp_path):
    path = build_report(series_messages, tmp_path / "out")
    assert path == tmp_path / "out" / REPORT_FILENAME
    page_html = path.read_text()
    assert_self_contained(page_html)
    result = next(m for m in series_messages if m.type == "result")["result"]
    rows = table_rows(page_html, series_id)
    assert set(rows) == {*DEMO_MODELS, "model average"}
    f1 = result["models"]["F1"]
    assert rows["F1"][:2] == [f"{f1['log_evidence']:.2f}", f"{f1['probability']:.4f}"]
    t0 = f1["params"]["t0"]
    assert rows["F1"][2] == f"{t0['mean']:.4f} ± {t0['sd']:.4f}"
    # the fitted numbers are the paper-like truth within a few posterior sd
    assert abs(t0["mean"] - TRUE_T0_S) < 4 * t0["sd"]
    assert abs(f1["params"]["k"]["mean"] - TRUE_K_PER_S) < 4 * f1["params"]["k"]["sd"]
    # at the paper's noise F1 (the simulated model) leads, not necessarily with certainty
    assert max(result["models"], key=lambda name: result["models"][name]["probability"]) == "F1"
    assert "class='leading'><td>F1</td>" in page_html
    assert "Onset alert at t =" in page_html and "no posterior predictive" not in page_html
    names = [f"{series_id}:{plot}" for plot in PLOTS]
    for name in names:
        assert f'"name":"{name}"' in page_html
    render_in_browser(path, names)


def test_report_from_analysis_json_and_csv(series_messages, tmp_path):
    result = dict(next(m for m in series_messages if m.type == "result")["result"])
    for key in ("predictive", "histograms", "series_id"):  # the analyze --json minimum
        result.pop(key, None)
    alert = dict(next(m for m in series_messages if m.type == "alert").fields)
    alert["time"] = alert.pop("time_s")  # beamkin analyze names the alert time "time"
    result["alert"] = alert
    json_path = tmp_path / "run-42.json"
    json_path.write_text(json.dumps(result))
    csv_path = tmp_path / "run-42.csv"
    fractions = [m for m in series_messages if m.type == "fraction"]
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["time_s", "alpha", "sigma_alpha"])
        writer.writerows([m["time_s"], m["alpha"], m["sigma_alpha"]] for m in fractions)

    messages = load_analysis_json(json_path, csv_path)
    assert [m.type for m in messages].count("fraction") == len(fractions)
    path = build_report(messages, tmp_path)
    page_html = path.read_text()
    assert_self_contained(page_html)
    assert "<h2>Series run-42</h2>" in page_html and f"{len(fractions)} data points" in page_html
    assert "no posterior predictive" in page_html and f"Onset alert at t = {alert['time']:.3f} s" in page_html
    rows = table_rows(page_html, "run-42")
    k = result["models"]["A2"]["params"]["k"]
    assert rows["A2"][3] == f"{k['mean']:.4f} ± {k['sd']:.4f}"
    names = [f"run-42:{plot}" for plot in PLOTS]
    render_in_browser(path, names)


def test_report_without_alert_says_nothing_about_one(tmp_path):
    result = {"models": {"F1": {"log_evidence": -3.0, "probability": 1.0,
                                "params": {"t0": {"mean": 7.4, "sd": 0.03, "q05": 7.35, "q50": 7.4, "q95": 7.45},
                                           "k": {"mean": 0.62, "sd": 0.02, "q05": 0.59, "q50": 0.62, "q95": 0.65}}}},
              "model_averaged": {}, "alert": {"time": None, "frame_index": None}}
    path = tmp_path / "quiet.json"
    path.write_text(json.dumps(result))
    recorded = [(float(i), m) for i, m in enumerate(load_analysis_json(path))]  # as read_messages yields them
    page_html = build_report(recorded, tmp_path).read_text()
    assert "Onset alert" not in page_html
    assert table_rows(page_html, "quiet")["F1"] == ["-3.00", "1.0000", "7.4000 ± 0.0300", "0.6200 ± 0.0200"]


def test_report_rejects_input_without_models(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_averaged": {}}))
    with pytest.raises(ReportInputError, match="no 'models' table"):
        load_analysis_json(bad)
    with pytest.raises(ReportInputError, match="nothing to report"):
        build_report([], tmp_path)
    with pytest.raises(ReportInputError, match="not a beamkin Message"):
        build_report([{"type": "result"}], tmp_path)
    data = tmp_path / "data.csv"
    data.write_text("when,value\n1,2\n")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"models": {"F1": {"log_evidence": 1.0, "probability": 1.0, "params": {}}}}))
    with pytest.raises(ReportInputError, match="needs columns time_s and alpha"):
        load_analysis_json(good, data)


def test_report_of_a_result_json_counts_the_frames_it_was_fitted_to(tmp_path):
    """Without --data, the data points are the result's n_frames (36), not the 0 rows given."""
    stat = {"mean": 7.4, "sd": 0.03, "q05": 7.35, "q50": 7.4, "q95": 7.45}
    result = {"models": {"F1": {"log_evidence": -3.0, "probability": 1.0, "params": {"t0": stat, "k": stat}}},
              "model_averaged": {"t0": stat}, "n_frames": 36, "alert": {"time": None}}
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result))
    page_html = build_report(load_analysis_json(path), tmp_path).read_text()
    assert "36 data points (not in the input: give --data CSV to plot them)" in page_html
    assert "0 data points" not in page_html
    del result["n_frames"]
    result["input"] = {"source": "x.csv", "n_frames": 24}  # beamkin analyze also records its input
    path.write_text(json.dumps(result))
    assert "24 data points" in build_report(load_analysis_json(path), tmp_path).read_text()


def test_report_data_csv_from_excel_with_bom_and_crlf(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"models": {"F1": {"log_evidence": 1.0, "probability": 1.0, "params": {}}}}))
    data = tmp_path / "data.csv"
    data.write_bytes("\ufefftime_s,alpha\r\n0,0.1\r\n1,0.2\r\n".encode())
    messages = load_analysis_json(good, data)
    assert [(m["time_s"], m["alpha"]) for m in messages if m.type == "fraction"] == [(0.0, 0.1), (1.0, 0.2)]
    data.write_bytes(b"\xff\xfe\x00\x01binary")
    with pytest.raises(ReportInputError, match="not a text CSV file"):
        load_analysis_json(good, data)


def test_report_formats_missing_numbers_as_the_live_page_does(tmp_path):
    """A number the input lacks reads "–" (never "nan") and an unknown gas time "unknown", in the
    report as on the live page (both format through dashboards.style)."""
    from bokeh.document import Document

    from beamkin import protocol
    from dashboards.layout import DashboardSession
    from dashboards.state import DashboardState

    start = protocol.make("start", series_id="gapped", kind="profile", source="t", detector={}, geometry={},
                          frame_time_s=0.1, exposure_s=0.1, n_frames=None, gas_time_s=None)
    stat = {"mean": 7.4, "sd": 0.03, "q05": 7.35, "q50": 7.4, "q95": 7.45}
    result = protocol.make("result", series_id="gapped", result={
        "models": {"F1": {"probability": 1.0, "params": {"t0": stat, "k": {"mean": 0.62}}}}, "model_averaged": {}})
    page_html = build_report([start, result], tmp_path).read_text()
    assert table_rows(page_html, "gapped")["F1"] == ["–", "1.0000", "7.4000 ± 0.0300", "0.6200"]
    section = page_html[page_html.index("<h2>Series gapped</h2>"): page_html.index("</table>")]
    assert "gas introduced at ts = unknown" in section and "nan" not in section
    state = DashboardState()
    session = DashboardSession(Document(), state)
    state.apply(start)
    session.refresh()
    assert "gas introduced at ts = unknown" in session.header.div.text
