"""Shared dashboard state: bounded ring buffers, heat-map decimation, series limit, session refresh."""

from __future__ import annotations

import numpy as np
import pytest
from bokeh.document import Document

from beamkin import protocol
from dashboards.layout import FOLLOW_LATEST, DashboardSession
from dashboards.state import NO_REACTION, DashboardState, PatternHeatmap, RollingColumns, thin_pattern
from tests.conftest import DEMO_MODELS, GAS_TIME_S


def renamed(messages, series_id: str, until_posterior: int | None = None,
            frames: int | None = None) -> list[protocol.Message]:
    """The pipeline run's messages as series `series_id`: cut before the posterior of frame
    `until_posterior`, or only those of the first `frames` frames (and none of the series end)."""
    out = []
    for message in messages:
        if until_posterior is not None and message.type == "posterior" and message["frame_index"] >= until_posterior:
            break
        if frames is not None and (message.type in ("alert", "result", "end")
                                   or (message.frame_index is not None and message.frame_index >= frames)):
            continue
        fields = dict(message.fields)
        if "series_id" in fields and fields["series_id"] is not None:
            fields["series_id"] = series_id
        out.append(protocol.Message(message.type, fields, message.arrays))
    return out


def test_rolling_columns_return_increments_and_keep_capacity():
    ring = RollingColumns(["x"], capacity=5)
    for i in range(3):
        ring.append({"x": i})
    rows, total = ring.rows_since(0)
    assert total == 3 and rows["x"].tolist() == [0, 1, 2]
    for i in range(3, 12):
        ring.append({"x": i, "y": 10 * i})  # a new column appears: earlier rows read NaN
    rows, total = ring.rows_since(3)
    assert total == 12 and len(ring) == 5
    assert rows["x"].tolist() == [7, 8, 9, 10, 11]  # rows 3..6 were overwritten
    assert rows["y"].tolist() == [70, 80, 90, 100, 110]
    assert ring.rows_since(12)[0]["x"].size == 0
    with pytest.raises(ValueError, match="capacity"):
        RollingColumns(["x"], 0)


def test_thin_pattern_keeps_mean_intensity():
    rng = np.random.default_rng(0)
    radial = np.linspace(5, 30, 4000)
    intensity = rng.poisson(100, radial.size).astype(float)
    r, y = thin_pattern(radial, intensity, max_points=1500)
    assert r.size == 1333 and y.size == 1333  # block of 3 points
    assert y.mean() == pytest.approx(intensity[: 3 * 1333].mean())
    with pytest.raises(ValueError, match="differ in length"):
        thin_pattern(radial, intensity[:-1])


def test_heatmap_decimates_pairwise_when_full():
    heat = PatternHeatmap(0.0, 1.0, bins=3, rows=4)
    radial = np.array([0.0, 0.5, 1.0])
    for i in range(8):  # rows full after 4, then pairs merge and each row averages 2 frames
        heat.add(float(i), radial, np.full(3, float(i)))
    snap = heat.snapshot()
    assert heat.stride == 2 and snap["image"].shape == (4, 3)
    assert snap["image"][:, 0].tolist() == [0.5, 2.5, 4.5, 6.5]
    assert heat.times[:4].tolist() == [0.5, 2.5, 4.5, 6.5]


def test_state_keeps_at_most_max_series_and_flat_memory(pipeline_messages):
    state = DashboardState(max_series=2)
    for i in range(3):
        for message in renamed(pipeline_messages, f"s{i}", frames=6):
            state.apply(message)
    assert state.series_ids() == ["s1", "s2"]
    s2 = state.get("s2")
    assert s2.fractions.total == 6 and s2.reference_a["frame_index"] == 0
    assert s2.heatmap.n_rows == 6 and s2.latest_pattern["frame_index"] == 5
    assert set(state.global_status) == {"inference", "streamer"}  # both stages report their health


def test_session_streams_increments_and_follows_series(pipeline_messages):
    state = DashboardState()
    doc = Document()
    session = DashboardSession(doc, state, alert_threshold=0.99, max_refresh_hz=5.0)
    session.refresh()  # nothing yet
    assert session.fractions.points.data["time_s"] == [] and "no status messages yet" in session.health.div.text

    messages = renamed(pipeline_messages, "a")
    posteriors_before_refresh = 10
    cut = [i for i, m in enumerate(messages) if m.type == "posterior"][posteriors_before_refresh - 1] + 1
    for message in messages[:cut]:
        state.apply(message)
    session.refresh()  # 10 exact posteriors arrived between two refreshes: one streamed increment
    # (the frames run ahead of the exact posteriors while the sampler is behind)
    assert len(session.fractions.points.data["time_s"]) == sum(m.type == "fraction" for m in messages[:cut]) >= 10
    assert len(session.onset.history.data["onset_probability"]) == 10
    for message in messages[cut:]:
        state.apply(message)
    session.refresh()
    fractions = [m for m in messages if m.type == "fraction"]
    assert list(session.fractions.points.data["alpha"]) == pytest.approx([m["alpha"] for m in fractions])
    alert = next(m for m in messages if m.type == "alert")
    assert session.banner.div.visible and "ONSET DETECTED" in session.banner.div.text and "in series a" in session.banner.div.text
    # the alert as it was raised (its frame and leading model) and the state now, each labelled
    final = [m for m in messages if m.type == "posterior"][-1]
    assert f"Alert as raised</b> at t = {alert['time_s']:.2f} s (frame {alert['frame_index']})" in session.banner.div.text
    assert f"leading model then {alert['leading_model']}" in session.banner.div.text
    assert (f"<b>Now</b> (exact posterior of frame {final['frame_index']}): leading model {final['leading_model']}"
            in session.banner.div.text)
    # health is current: after the end nothing lags, the final posterior is named
    assert "series ended (completed)" in session.health.div.text and "behind" not in session.health.div.text
    assert "lag s" not in session.health.div.text and "posterior lag" not in session.health.div.text
    assert session.onset.span_alert.visible and session.onset.span_alert.location == alert["time_s"]
    assert session.fractions.span_ts.visible and session.fractions.span_ts.location == GAS_TIME_S
    marks = session.posterior_t0.marks.data
    assert marks["q05"][0] < marks["mean"][0] < marks["q95"][0]
    assert set(session.model_history.source.data) - {NO_REACTION} == {"time_s", *DEMO_MODELS}
    assert "(ended (completed))" in session.header.div.text

    # a second series appears: the session follows it and starts from empty plots
    second = renamed(pipeline_messages, "b", until_posterior=4)
    for message in second:
        state.apply(message)
    session.refresh()
    # stopped before the posterior of frame 4, with the fractions sent before it (at least five:
    # the fraction of frame 4 comes before its posterior)
    fractions_b = sum(m.type == "fraction" for m in second)
    assert session.series_id == "b" and len(session.fractions.points.data["time_s"]) == fractions_b >= 5
    assert len(session.onset.history.data["time_s"]) == sum(m.type == "posterior" for m in second) <= 4
    assert not session.banner.div.visible
    assert list(session.header.select.options) == [FOLLOW_LATEST, "b", "a"]
    session.header.select.value = "a"  # pick the first series again: its full history comes back
    assert session.series_id == "a" and len(session.fractions.points.data["time_s"]) == len(fractions)
    assert session.banner.div.visible


def test_malformed_values_do_not_break_refresh():
    state = DashboardState()
    session = DashboardSession(Document(), state)
    state.apply(protocol.make("start", series_id="x", kind="profile", source="t", detector={}, geometry={},
                              frame_time_s=0.1, exposure_s=0.1, n_frames=None, gas_time_s=None))
    state.apply(protocol.make("fraction", series_id="x", frame_index=0, time_s=0.05, exposure_s=0.1, alpha=None,
                              sigma_alpha=None, status="flagged", reason="no peaks"))
    session.refresh()
    assert list(session.fractions.points.data["state"]) == ["flagged"]
    assert "unknown" in session.header.div.text  # gas time not known


def test_every_root_of_the_page_template_is_one_panel_root():
    """The page template places each panel's root by name: every name it embeds is a root of a
    session's document, and every root is placed (none left off the page)."""
    import re

    from dashboards.layout import PAGE_TEMPLATE

    doc = Document()
    DashboardSession(doc, DashboardState())
    placed = re.findall(r"embed\(roots\.(\w+)\)", PAGE_TEMPLATE)
    assert sorted(placed) == sorted(root.name for root in doc.roots) and len(set(placed)) == len(placed) == 16


def test_heatmap_bins_keep_a_narrow_line():
    """A line narrower than a heat-map bin keeps its integrated intensity (point sampling would
    catch it or miss it depending on where the grid falls)."""
    heat = PatternHeatmap(0.0, 10.0, bins=101)  # bins 0.1 wide
    radial = np.arange(0.0, 10.0, 0.02)
    line = np.exp(-0.5 * ((radial - 4.93) / 0.015) ** 2)
    row = heat.bin_means(radial, line)
    # each bin mean times the points per bin (5) times the point spacing = the line's integral
    assert np.nansum(row) * 0.1 == pytest.approx(line.sum() * 0.02, rel=1e-9)
    assert np.nanargmax(row) == 49  # the bin centred on 4.9 holds 4.85..4.95


def test_density_per_log10_k():
    """A log-uniform k has a flat density per log10 k; the bars' masses are the histogram's."""
    from dashboards.figures import density_per_log10
    edges = np.logspace(-2, 2, 41)
    per_k = 1.0 / (np.log(10) * 4.0) / np.sqrt(edges[:-1] * edges[1:])  # log-uniform on [0.01, 100]: 1/(k ln10 4)
    per_k *= (np.log10(edges[1:] / edges[:-1]) / np.diff(edges)) / per_k * 0.25  # exact bin means: mass 0.025 each
    per_log10 = density_per_log10(edges, per_k)
    assert per_log10 == pytest.approx(np.full(40, 0.25))  # 1 / (4 decades)
    assert np.sum(per_log10 * np.diff(np.log10(edges))) == pytest.approx(np.sum(per_k * np.diff(edges)))
    with pytest.raises(ValueError, match="positive"):
        density_per_log10(np.linspace(0, 1, 5), np.ones(4))


def _with(message: protocol.Message, **fields) -> protocol.Message:
    return protocol.Message(message.type, {**message.fields, **fields}, message.arrays)


def test_stale_estimate_gives_way_to_the_exact_posterior(pipeline_messages):
    """A stale estimate of a later frame is not presented as the posterior: the panels show the
    newest exact posterior, labelled with the stale estimate's frame and the sampler's lag."""
    messages = renamed(pipeline_messages, "s")
    posteriors = [i for i, m in enumerate(messages) if m.type == "posterior"]
    cut = posteriors[5] + 1
    state = DashboardState()
    session = DashboardSession(Document(), state)
    for message in messages[:cut]:
        if message.type not in ("end", "result"):  # the series is still running
            state.apply(message)
    exact = messages[posteriors[5]]
    template = next(m for m in messages if m.type == "estimate")
    state.apply(_with(template, frame_index=exact["frame_index"] + 3, time_s=exact["time_s"] + 1.0, stale=True,
                      diagnostics={"frames_behind": 3}))
    session.refresh()
    assert list(session.models.bars.data["frame_index"])[0] == exact["frame_index"]
    assert list(session.models.bars.data["kind"])[0] == "exact"
    label = f"exact posterior of frame {exact['frame_index']}; estimate of frame {exact['frame_index'] + 3} STALE"
    assert label in session.now.div.text and "exact sampler 3 frames behind" in session.now.div.text
    assert session.now.div.styles.get("border")  # marked where the eye is
    assert "estimate STALE" in session.health.div.text
    # a fresh (not stale) estimate of a later frame is shown as what it is
    state.apply(_with(template, frame_index=exact["frame_index"] + 4, time_s=exact["time_s"] + 1.3, stale=False,
                      diagnostics={"frames_behind": 1}))
    session.refresh()
    assert list(session.models.bars.data["kind"])[0] == "estimate"
    assert f"estimate of frame {exact['frame_index'] + 4}, exact sampler 1 frame behind" in session.now.div.text
    assert not session.now.div.styles.get("border")


def test_k_is_never_averaged_across_models_and_no_reaction_competes(pipeline_messages):
    """k appears per model only (the header and history follow the leading model, the density
    is the leading model's per log10 k); "no reaction" is a bar; probabilities sum to one."""
    messages = renamed(pipeline_messages, "k")
    state = DashboardState()
    session = DashboardSession(Document(), state)
    final = [m for m in messages if m.type == "posterior"][-1]
    null = {"log_evidence": -30.0, "log_evidence_se": 0.0, "probability": 0.25}
    models = {name: {**model, "probability": 0.75 * model["probability"], "log_evidence_se": 0.05}
              for name, model in final["models"].items()}
    for message in messages:
        if message is final or (message.type == "posterior" and message["frame_index"] == final["frame_index"]):
            message = _with(message, models=models, null_model=null, reaction_probability=0.75)
        state.apply(message)
    session.refresh()
    data = session.models.bars.data
    assert NO_REACTION in data["model"] and sum(data["probability"]) == pytest.approx(1.0)
    assert "P(reaction) = 0.7500" in session.models.table.text and "± 0.05" in session.models.table.text
    leading = final["leading_model"]
    k = final["models"][leading]["params"]["k"]
    assert f"k({leading}) = {k['q50']:.3g} 1/s" in session.now.div.text
    assert session.k_history.line.glyph.y == f"k_q50_{leading}" and session.k_history.line.visible
    assert session.k_history.source.data[f"k_q05_{leading}"][-1] == pytest.approx(k["q05"])
    assert min(v for v in session.k_history.source.data[f"k_q05_{leading}"] if np.isfinite(v)) > 0  # log axis
    assert list(session.k_by_model.source.data["q50"]) == pytest.approx(
        [final["models"][m]["params"]["k"]["q50"] for m in session.k_by_model.source.data["model"]])
    hist = final["histograms"]["k"]
    edges = np.asarray(hist["edges"])
    expected = np.asarray(hist["leading"]) * np.diff(edges) / np.diff(np.log10(edges))
    assert list(session.posterior_k.source.data["top"]) == pytest.approx(expected.tolist())
    assert "model_averaged" not in str(session.posterior_k.source.data) and "k_mean" not in session.onset.history.data
