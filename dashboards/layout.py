"""Plots of one dashboard browser session and their periodic refresh from the shared state.

A :class:`DashboardSession` owns the Bokeh models of one document. Its ``refresh`` callback
(run by the Bokeh server at ``max_refresh_hz``) copies, under the state lock, only what
changed since the previous refresh, then updates the models incrementally, so the browser
redraws only what changed:

* per-frame quantities are *streamed* (``ColumnDataSource.stream`` with the state's ring
  capacity as rollover): alpha(t), the posterior history, the model-probability history;
* fixed-grid quantities are *patched*: histogram heights on unchanged bin edges, the new rows of
  the heat map (decimated rows, see :class:`dashboards.state.PatternHeatmap`), predictive bands
  on an unchanged time grid;
* the latest pattern is replaced; the phase references only when they change.

With frames at 100 Hz a browser still receives at most ``max_refresh_hz`` updates per second.

What the page claims (docs/design.md, "Inference"):

* k is shown per model, never averaged across rate laws: the header gives the leading model's
  k, the k history shows the leading model's median and 90 % band on a log axis, the k panel
  each model's 90 % interval and the leading model's density per unit log10 k. Only t0 (the
  same quantity in every model) is model-averaged.
* An estimate marked ``stale`` (collapsed ESS) is not shown as the posterior: the "now" panels
  show the newest exact posterior, labelled "exact posterior of frame N; estimate of frame M
  stale", and say how many frames the exact sampler lags.
* "No reaction" competes with the kinetic models when the payload carries ``null_model``;
  P(reaction) is shown beside the model probabilities and their log-evidence standard errors.
* The alert banner keeps the alert as it was raised and shows the state now, each labelled.

Models that tests and users look up by name (``Bokeh.documents[0].get_model_by_name``):
``series_select``, ``header``, ``now``, ``alert_banner`` (a Div with css class
``beamkin-alert``), ``health``, ``alpha_points`` (ColumnDataSource of alpha(t)),
``pattern_latest``, ``heatmap``, ``onset_history``, ``k_history``, ``t0_histogram``,
``k_histogram`` (leading model, density per log10 k), ``k_by_model``, ``model_probabilities``
(with the ``frame_index`` and ``kind`` of the posterior shown), ``model_table``, ``predictive``.

Units: time in seconds, k in 1/s, radial axis in degrees 2theta (or nm^-1 for q patterns).
"""

from __future__ import annotations

import html
import logging
import math
import time
from typing import Any

import numpy as np
from bokeh.document import Document
from bokeh.layouts import column, row
from bokeh.models import (
    ColorBar,
    ColumnDataSource,
    Div,
    FactorRange,
    Legend,
    LegendItem,
    LinearColorMapper,
    Range1d,
    Select,
    Span,
)
from bokeh.palettes import Category10_10, Category20_20, Viridis256
from bokeh.plotting import figure
from bokeh.transform import factor_cmap, factor_mark

from .state import HISTORY_CAPACITY, NO_REACTION, DashboardState, SeriesState

log = logging.getLogger(__name__)

FOLLOW_LATEST = "(follow latest series)"
#: The context panels (latest pattern, heat map) are redrawn at most this often (seconds): they
#: are the largest payloads and are not the posterior; the posterior panels follow max_refresh_hz.
CONTEXT_MIN_INTERVAL_S = 1.0
#: The trends over time (t0, k and model probabilities against time) likewise; the posterior of
#: the newest frame (text, bars, alpha(t), onset probability, histograms) is never held back.
TRENDS_MIN_INTERVAL_S = 1.0
#: Lines ready for the model-probability history: every rate law of inference.models and "no reaction".
MODEL_LINE_SLOTS = 18
#: The pipeline-health text likewise (staleness and the end of a series are shown at once).
HEALTH_MIN_INTERVAL_S = 1.0

COLOR_DATA = "#1f1f1f"
COLOR_FLAGGED = "#9e9e9e"
COLOR_LEADING = "#d62728"
COLOR_AVERAGED = "#1f77b4"
COLOR_OTHER = "#90a4ae"
COLOR_NULL = "#455a64"
COLOR_STALE = "#cfd8dc"
COLOR_TS = "#2ca02c"
COLOR_PHASE = {"A": "#1f77b4", "B": "#ff7f0e"}

ALERT_STYLE = {
    "background-color": "#b71c1c", "color": "white", "padding": "8px 14px", "font-size": "15px",
    "border-radius": "6px", "line-height": "1.5",
}
NOW_STYLE = {"font-size": "14px", "line-height": "1.5", "padding": "6px 10px", "border-radius": "6px",
             "background-color": "#f5f5f5"}
NOW_STALE_STYLE = {**NOW_STYLE, "background-color": "#fff3e0", "border": "2px solid #ef6c00"}
PANEL_STYLE = {"font-size": "12px", "line-height": "1.45"}
#: The page: the roots of a session placed by a CSS grid (texts beside each other above the
#: plots, health below); widths follow the window from 1000 px.
PLOT_NAMES = ("plot_alpha", "plot_models", "plot_onset", "plot_t0_time", "plot_k_time", "plot_k_models",
              "plot_k_hist", "plot_t0_hist", "plot_pattern", "plot_heatmap", "plot_model_history")


def plot_roots(session: "DashboardSession") -> list[tuple[str, Any]]:
    """(root name, figure) of every plot of a session, in page order."""
    return list(zip(PLOT_NAMES, (
        session.fig_alpha, session.fig_models, session.fig_onset, session.fig_t0_time, session.fig_k_time,
        session.fig_k_models, session.fig_k_hist, session.fig_t0_hist, session.fig_pattern, session.fig_heat,
        session.fig_model_history)))


PAGE_TEMPLATE = """{% block contents %}
<style>
  body { margin: 6px 10px; font-family: sans-serif; }
  .beamkin-texts { display: grid; grid-template-columns: minmax(0, 1fr) minmax(300px, 34%); gap: 8px;
                   align-items: start; margin: 4px 0; }
  .beamkin-plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 6px; }
  .beamkin-plots > .wide { grid-column: 1 / -1; }
  .beamkin-plots > div { min-width: 0; }
</style>
{{ embed(roots.beamkin_header) }}
{{ embed(roots.beamkin_banner) }}
<div class="beamkin-texts"><div>{{ embed(roots.beamkin_now) }}</div><div>{{ embed(roots.beamkin_models) }}</div></div>
<div class="beamkin-plots">
  <div class="wide">{{ embed(roots.plot_alpha) }}</div>
  <div>{{ embed(roots.plot_models) }}</div><div>{{ embed(roots.plot_onset) }}</div>
  <div>{{ embed(roots.plot_t0_time) }}</div><div>{{ embed(roots.plot_k_time) }}</div>
  <div>{{ embed(roots.plot_k_models) }}</div><div>{{ embed(roots.plot_k_hist) }}</div>
  <div>{{ embed(roots.plot_t0_hist) }}</div><div>{{ embed(roots.plot_model_history) }}</div>
  <div class="wide">{{ embed(roots.plot_pattern) }}</div>
  <div class="wide">{{ embed(roots.plot_heatmap) }}</div>
</div>
{{ embed(roots.beamkin_health) }}
{% endblock %}"""
#: Heights (pixels) of the plot rows; widths follow the window (from 1000 px).
PLOT_HEIGHT = 300
MIN_PLOT_WIDTH = 300


def _figure(title: str, x_label: str, y_label: str, height: int = PLOT_HEIGHT, **kwargs: Any):
    fig = figure(title=title, height=height, sizing_mode="stretch_width", min_width=MIN_PLOT_WIDTH,
                 tools="pan,wheel_zoom,box_zoom,reset,save,hover", toolbar_location="right", **kwargs)
    fig.xaxis.axis_label = x_label
    fig.yaxis.axis_label = y_label
    fig.title.text_font_size = "11pt"
    fig.axis.axis_label_text_font_size = "10pt"
    fig.axis.axis_label_text_font_style = "normal"
    fig.min_border_left = 50
    return fig


def _legend(fig, location: str = "top_left") -> None:
    fig.legend.location = location
    fig.legend.click_policy = "hide"
    fig.legend.label_text_font_size = "8pt"
    fig.legend.background_fill_alpha = 0.7
    fig.legend.spacing = 0
    fig.legend.padding = 3


def radial_label(unit: str) -> str:
    return "scattering angle 2θ (degrees)" if unit == "2th_deg" else "q (1/nm)"


def _fmt(value: Any, digits: int = 3) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _fmt_g(value: Any, digits: int = 3) -> str:
    """Significant digits (rate constants span decades)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _empty(columns: list[str]) -> dict[str, list]:
    return {name: [] for name in columns}


def _hist_quads(edges: list[float], density: list[float]) -> dict[str, np.ndarray]:
    edges_a = np.asarray(edges, dtype=float)
    density_a = np.asarray(density, dtype=float)
    if edges_a.size != density_a.size + 1:
        raise ValueError(f"histogram has {edges_a.size} edges for {density_a.size} densities")
    return {"left": edges_a[:-1], "right": edges_a[1:], "top": density_a, "bottom": np.zeros_like(density_a)}


def density_per_log10(edges: list[float], density: list[float]) -> np.ndarray:
    """Density per unit log10 k of a histogram given as density per unit k on ``edges`` (1/s):
    bin mass = density * (right - left), divided by log10(right / left). On a log axis the area
    of each bar is then its probability, so the tallest bar holds the most mass."""
    edges_a = np.asarray(edges, dtype=float)
    density_a = np.asarray(density, dtype=float)
    if edges_a.size != density_a.size + 1 or not np.all(edges_a > 0):
        raise ValueError("a density per log10 k needs positive bin edges, one more than the densities")
    return density_a * np.diff(edges_a) / np.diff(np.log10(edges_a))


def _mass_range(quads: dict[str, np.ndarray], log_scale: bool, mass: float = 0.999) -> tuple[float, float]:
    """x range holding the central ``mass`` of a histogram, padded by 30 % of its width
    (on a log axis ``top`` is a density per log10 unit)."""
    left, right, density = quads["left"], quads["right"], np.nan_to_num(quads["top"])
    widths = np.log10(right / left) if log_scale else right - left
    weights = density * widths
    total = weights.sum()
    if not total > 0:
        return float(left[0]), float(right[-1])
    cdf = np.cumsum(weights) / total
    lo = float(left[min(np.searchsorted(cdf, (1 - mass) / 2), left.size - 1)])
    hi = float(right[min(np.searchsorted(cdf, 1 - (1 - mass) / 2), right.size - 1)])
    if log_scale and lo > 0:
        pad = (hi / lo) ** 0.3
        return lo / pad, hi * pad
    pad = 0.3 * (hi - lo)
    return lo - pad, hi + pad


def _follow(axis_range: Range1d, low: float, high: float, log_scale: bool) -> None:
    """Move ``axis_range`` to [low, high] only when either end is off by more than 15 % of the
    width (each change is a message and a repaint; small shifts are not worth one)."""
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        return
    f = (lambda v: math.log10(v) if v and v > 0 else -math.inf) if log_scale else (lambda v: v)
    width = f(high) - f(low)
    start, end = axis_range.start, axis_range.end
    if start is None or end is None or not (abs(f(start) - f(low)) <= 0.15 * width
                                            and abs(f(end) - f(high)) <= 0.15 * width):
        axis_range.update(start=low, end=high)


def _frames_behind(posterior: dict[str, Any] | None) -> int | None:
    value = ((posterior or {}).get("diagnostics") or {}).get("frames_behind")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _describe(posterior: dict[str, Any] | None, stale: dict[str, Any] | None) -> str:
    """What the "now" panels present: the kind of posterior, its frame and the sampler's lag."""
    if stale is not None:
        behind = _frames_behind(stale)
        lag = f", exact sampler {behind} frame{'s' if behind != 1 else ''} behind" if behind else ""
        if posterior is None:
            return (f"estimate of frame {stale.get('frame_index')} STALE (its particles no longer represent "
                    f"the posterior{lag}); no exact posterior yet")
        return (f"exact posterior of frame {posterior.get('frame_index')}; estimate of frame "
                f"{stale.get('frame_index')} STALE{lag}")
    if posterior is None:
        return "no posterior yet"
    if posterior.get("estimate"):
        behind = _frames_behind(posterior)
        lag = f", exact sampler {behind} frame{'s' if behind != 1 else ''} behind" if behind else ""
        return f"estimate of frame {posterior.get('frame_index')}{lag}"
    return f"exact posterior of frame {posterior.get('frame_index')}"


def _stream_per_model_columns(source: ColumnDataSource, rows: dict[str, np.ndarray]) -> None:
    """Stream history ``rows`` (a ``time_s`` column and one column per model quantity) into
    ``source``; columns of models seen for the first time are added (NaN before), and models
    absent from ``rows`` get NaN."""
    if not set(rows) <= set(source.data):  # new model columns: rebuild the source with them
        data = {name: list(values) for name, values in source.data.items()}
        n = len(data.get("time_s", []))
        for name in rows:
            data.setdefault(name, [math.nan] * n)
        source.data = data
    for name in source.data:
        rows.setdefault(name, np.full(len(rows["time_s"]), np.nan))
    source.stream(rows, rollover=HISTORY_CAPACITY)


class DashboardSession:
    """Bokeh models of one browser session and their refresh from a :class:`DashboardState`."""

    ALPHA_COLUMNS = ["time_s", "alpha", "lower", "upper", "frame_index", "state"]
    HISTORY_COLUMNS = ["frame_index", "time_s", "onset_probability", "reaction_probability",
                       "t0_mean", "t0_q05", "t0_q50", "t0_q95"]
    PREDICTIVE_COLUMNS = ["time_s", "lead_median", "lead_q05", "lead_q95", "avg_median", "avg_q05", "avg_q95"]
    MODEL_COLUMNS = ["model", "probability", "color", "log_evidence", "log_evidence_se", "frame_index", "kind"]
    K_MODEL_COLUMNS = ["model", "q05", "q50", "q95", "color"]

    def __init__(self, doc: Document, state: DashboardState, alert_threshold: float = 0.99,
                 max_refresh_hz: float = 5.0) -> None:
        self.health_key: tuple = ()
        self.health_sent_at = -math.inf
        if not 0.0 < alert_threshold <= 1.0:
            raise ValueError(f"alert_threshold must be in (0, 1], got {alert_threshold}")
        if not max_refresh_hz > 0:
            raise ValueError(f"max_refresh_hz must be positive, got {max_refresh_hz}")
        self.doc = doc
        self.state = state
        self.alert_threshold = alert_threshold
        self.series_id: str | None = None
        self._reset_counters()
        self._build()
        doc.title = "beamkin live kinetics"
        for root in self.roots.values():
            doc.add_root(root)
        doc.template = PAGE_TEMPLATE
        self.callback = doc.add_periodic_callback(self.refresh, max(int(1000.0 / max_refresh_hz), 20))

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        self.header = Div(text="<b>beamkin</b> – waiting for a series…", name="header", sizing_mode="stretch_width",
                          styles={"font-size": "14px"})
        self.select = Select(title="Series", value=FOLLOW_LATEST, options=[FOLLOW_LATEST], name="series_select",
                             width=260)
        self.select.on_change("value", lambda attr, old, new: self.refresh())
        self.banner = Div(text="", name="alert_banner", css_classes=["beamkin-alert"], visible=False,
                          sizing_mode="stretch_width", styles=ALERT_STYLE)
        self.now = Div(text="no posterior yet", name="now", sizing_mode="stretch_width", styles=NOW_STYLE)
        self.health = Div(text="", name="health", sizing_mode="stretch_width", styles=PANEL_STYLE)
        self.model_table = Div(text="", name="model_table", sizing_mode="stretch_width", styles=PANEL_STYLE)

        # alpha(t) with errors, predictive bands, ts and t0 marks
        self.src_alpha = ColumnDataSource(_empty(self.ALPHA_COLUMNS), name="alpha_points")
        self.src_pred = ColumnDataSource(_empty(self.PREDICTIVE_COLUMNS), name="predictive")
        # one time axis for every plot against time, fixed to the series window (a range that
        # follows the data would repaint all of them on every frame)
        self.time_range = Range1d(-0.5, 60.0)
        fig = _figure("Phase fraction α(t): data and posterior predictive (median, 90 % band)",
                      "time since series start (s)", "fraction of loaded phase α", height=340,
                      x_range=self.time_range, y_range=Range1d(-0.12, 1.18))
        fig.varea("time_s", "avg_q05", "avg_q95", source=self.src_pred, fill_color=COLOR_AVERAGED, fill_alpha=0.18,
                  legend_label="all models 90 %")
        fig.line("time_s", "avg_median", source=self.src_pred, color=COLOR_AVERAGED, line_width=2, line_dash="dashed",
                 legend_label="all models median")
        fig.line("time_s", "lead_median", source=self.src_pred, color=COLOR_LEADING, line_width=2,
                 legend_label="leading model median")
        fig.segment("time_s", "lower", "time_s", "upper", source=self.src_alpha, line_color="#777777", line_width=1)
        fig.scatter("time_s", "alpha", source=self.src_alpha, size=5,
                    color=factor_cmap("state", [COLOR_DATA, COLOR_FLAGGED], ["ok", "flagged"]),
                    marker=factor_mark("state", ["circle", "x"], ["ok", "flagged"]), legend_label="α ± σ (data)")
        self.span_ts = Span(location=0, dimension="height", line_color=COLOR_TS, line_width=2, line_dash="dotted",
                            visible=False)
        # t0 (all models): mean and 90 % interval, one source for this plot and the t0 posterior
        self.src_t0_marks = ColumnDataSource({"mean": [], "q05": [], "q95": []}, name="t0_marks")
        fig.vstrip("q05", "q95", source=self.src_t0_marks, fill_color=COLOR_LEADING, fill_alpha=0.12, line_alpha=0)
        fig.vspan("mean", source=self.src_t0_marks, line_color=COLOR_LEADING, line_width=2)
        fig.add_layout(self.span_ts)
        _legend(fig)
        fig.hover.tooltips = [("t", "@time_s{0.000} s"), ("α", "@alpha{0.000}"), ("frame", "@frame_index")]
        self.fig_alpha = fig

        # model probabilities now, "no reaction" among them
        self.src_models = ColumnDataSource(_empty(self.MODEL_COLUMNS), name="model_probabilities")
        fig = _figure("Model probabilities now (which posterior: see 'Now')", "hypothesis", "posterior probability",
                      height=340,
                      x_range=FactorRange(), y_range=Range1d(0, 1.05))
        fig.vbar(x="model", top="probability", width=0.8, color="color", source=self.src_models)
        fig.hover.tooltips = [("model", "@model"), ("P", "@probability{0.0000}"),
                              ("log Z", "@log_evidence{0.00} ± @log_evidence_se{0.00} nat")]
        fig.xaxis.major_label_orientation = 0.8
        self.fig_models = fig

        # onset probability and P(reaction)
        self.src_history = ColumnDataSource(_empty(self.HISTORY_COLUMNS), name="onset_history")
        fig = _figure("Onset probability P(t0 ≤ t | data)", "time since series start (s)", "probability",
                      x_range=self.time_range, y_range=Range1d(-0.03, 1.05))
        fig.line("time_s", "onset_probability", source=self.src_history, color="#6a1b9a", line_width=2,
                 legend_label="onset probability")
        fig.line("time_s", "reaction_probability", source=self.src_history, color=COLOR_NULL, line_width=1.5,
                 line_dash="dotdash", legend_label="P(reaction)")
        fig.add_layout(Span(location=self.alert_threshold, dimension="width", line_color=COLOR_LEADING,
                            line_dash="dashed", line_width=1.5))
        self.span_ts_onset = Span(location=0, dimension="height", line_color=COLOR_TS, line_width=2,
                                  line_dash="dotted", visible=False)
        fig.add_layout(self.span_ts_onset)
        self.span_alert = Span(location=0, dimension="height", line_color=COLOR_LEADING, line_width=2,
                               visible=False, name="alert_time")
        fig.add_layout(self.span_alert)
        _legend(fig)
        self.fig_onset = fig

        # t0 over time: model-averaged median and 90 % band (t0 means the same in every model)
        fig = _figure("Onset time t0 over time (all models: median, 90 % band)", "time since series start (s)",
                      "t0 (s)", x_range=self.time_range)
        self.src_t0_history = ColumnDataSource(_empty(self.HISTORY_COLUMNS), name="t0_history")
        fig.varea("time_s", "t0_q05", "t0_q95", source=self.src_t0_history, fill_color=COLOR_AVERAGED, fill_alpha=0.25)
        fig.line("time_s", "t0_q50", source=self.src_t0_history, color=COLOR_AVERAGED, line_width=2)
        self.fig_t0_time = fig

        # k over time: one model's k (the model leading now), log axis, quantile band (never below 0)
        self.src_k_history = ColumnDataSource({"frame_index": [], "time_s": []}, name="k_history")
        fig = _figure("Rate constant k over time", "time since series start (s)", "k (1/s)",
                      x_range=self.time_range, y_axis_type="log")
        self.k_band = fig.varea("time_s", "time_s", "time_s", source=self.src_k_history, fill_color=COLOR_LEADING,
                                fill_alpha=0.2, visible=False)
        self.k_line = fig.line("time_s", "time_s", source=self.src_k_history, color=COLOR_LEADING, line_width=2,
                               visible=False)
        self.fig_k_time = fig
        self.k_history_model: str | None = None

        # latest pattern with references and peak windows
        self.src_pattern = ColumnDataSource({"radial": [], "intensity": []}, name="pattern_latest")
        self.src_ref_a = ColumnDataSource({"radial": [], "intensity": []}, name="reference_a")
        self.src_ref_b = ColumnDataSource({"radial": [], "intensity": []}, name="reference_b")
        self.src_peaks = ColumnDataSource({"left": [], "right": [], "bottom": [], "top": [], "color": [], "phase": []},
                                          name="peak_windows")
        fig = _figure("Latest pattern, phase references and fitted peak windows", radial_label("2th_deg"),
                      "intensity (counts)", height=320)
        fig.quad(left="left", right="right", bottom="bottom", top="top", color="color", source=self.src_peaks,
                 fill_alpha=0.15, line_alpha=0.4, legend_field="phase")
        fig.line("radial", "intensity", source=self.src_ref_a, color=COLOR_PHASE["A"], alpha=0.6, line_dash="dashed",
                 legend_label="phase A reference (first frame)")
        fig.line("radial", "intensity", source=self.src_ref_b, color=COLOR_PHASE["B"], alpha=0.6, line_dash="dashed",
                 legend_label="phase B reference (α ≥ 0.9)")
        fig.line("radial", "intensity", source=self.src_pattern, color=COLOR_DATA, line_width=1.2,
                 legend_label="latest frame")
        _legend(fig, "top_right")
        self.fig_pattern = fig

        # heat map (radial x time): a fixed-size image whose new rows are patched in
        self.color_mapper = LinearColorMapper(palette=Viridis256, nan_color=(0, 0, 0, 0))
        self.src_heat = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []}, name="heatmap")
        fig = _figure("Patterns against time", radial_label("2th_deg"), "time since series start (s)", height=320,
                      y_range=Range1d(0, 1))
        fig.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.src_heat, color_mapper=self.color_mapper)
        fig.add_layout(ColorBar(color_mapper=self.color_mapper, title="counts", width=10), "right")
        fig.hover.tooltips = [("2θ", "$x{0.000}"), ("t", "$y{0.00} s"), ("counts", "@image{0}")]
        self.fig_heat = fig

        # posterior of t0 (all models and the leading one) and of k (the leading model, per log10 k)
        self.src_t0_avg = ColumnDataSource(_empty(["left", "right", "top", "bottom"]), name="t0_histogram")
        self.src_t0_lead = ColumnDataSource(_empty(["left", "right", "top", "bottom"]), name="t0_histogram_leading")
        fig = _figure("Posterior of onset time t0 (dashed: mean, band: 90 %)", "t0 (s)",
                      "probability density (1/s)", x_range=Range1d(0, 1))
        fig.quad(left="left", right="right", top="top", bottom="bottom", source=self.src_t0_avg,
                 fill_color=COLOR_AVERAGED, fill_alpha=0.35, line_color=COLOR_AVERAGED, line_alpha=0.5,
                 legend_label="all models")
        fig.quad(left="left", right="right", top="top", bottom="bottom", source=self.src_t0_lead, fill_alpha=0,
                 line_color=COLOR_LEADING, line_width=1.5, legend_label="leading model")
        fig.vstrip("q05", "q95", source=self.src_t0_marks, fill_color=COLOR_AVERAGED, fill_alpha=0.12, line_alpha=0)
        fig.vspan("mean", source=self.src_t0_marks, line_color=COLOR_AVERAGED, line_width=2, line_dash="dashed")
        _legend(fig, "top_right")
        self.fig_t0_hist = fig

        self.src_k_lead = ColumnDataSource(_empty(["left", "right", "top", "bottom"]), name="k_histogram")
        fig = _figure("Posterior of k of the leading model", "k (1/s)", "probability per unit log10 k",
                      x_range=Range1d(0.01, 100), x_axis_type="log")
        fig.quad(left="left", right="right", top="top", bottom="bottom", source=self.src_k_lead,
                 fill_color=COLOR_LEADING, fill_alpha=0.3, line_color=COLOR_LEADING, line_alpha=0.6)
        self.fig_k_hist = fig

        # k of every model: median and 90 % interval (log axis); each rate law has its own k
        self.src_k_models = ColumnDataSource(_empty(self.K_MODEL_COLUMNS), name="k_by_model")
        fig = _figure("k per model (median, 90 % interval)", "k (1/s)", "kinetic model",
                      y_range=FactorRange(), x_axis_type="log")
        fig.segment("q05", "model", "q95", "model", source=self.src_k_models, color="color", line_width=4)
        fig.scatter("q50", "model", source=self.src_k_models, color="color", size=8, line_color="white")
        fig.hover.tooltips = [("model", "@model"), ("k median", "@q50{0.0000} 1/s"),
                              ("90 %", "@q05{0.0000} – @q95{0.0000} 1/s")]
        self.fig_k_models = fig

        # model probability history: one line per hypothesis. The lines exist from the start
        # (hidden): creating renderers while a series runs costs a model-graph rebuild on the
        # server and new views in the browser just when the first posteriors arrive.
        self.src_model_history = ColumnDataSource({"time_s": []}, name="model_history")
        fig = _figure("Model probabilities over time", "time since series start (s)", "posterior probability",
                      x_range=self.time_range, y_range=Range1d(-0.03, 1.05))
        self.model_legend = Legend(items=[], label_text_font_size="8pt", spacing=0, padding=2, click_policy="hide")
        fig.add_layout(self.model_legend, "right")
        self._slot_lines = [fig.line("time_s", "time_s", source=self.src_model_history, line_width=2,
                                     color=Category20_20[i % 20], visible=False) for i in range(MODEL_LINE_SLOTS)]
        self.fig_model_history = fig
        self._model_lines: dict[str, Any] = {}

        # One root per panel, placed by the page template's CSS grid. BokehJS recomputes the
        # layout of a whole root (and repaints every plot in it) when a Div's text changes or an
        # axis or title changes size, so each text and each plot is a root of its own.
        stretch = {"sizing_mode": "stretch_width"}
        self.roots = {
            "beamkin_header": row(self.header, self.select, name="beamkin_header", **stretch),
            "beamkin_banner": column(self.banner, name="beamkin_banner", **stretch),
            "beamkin_now": column(self.now, name="beamkin_now", **stretch),
            "beamkin_models": column(self.model_table, name="beamkin_models", **stretch),
            "beamkin_health": column(self.health, name="beamkin_health", **stretch),
        }
        for name, fig in plot_roots(self):
            fig.name = name
            self.roots[name] = fig

    # ------------------------------------------------------------------ refresh
    def _reset_counters(self) -> None:
        self.n_fractions = 0
        self.n_history = 0
        self.n_k_history = 0
        self.n_t0_history = 0
        self.trends_sent_at = -math.inf
        self.n_model_history = 0
        self.pattern_version = -1
        self.reference_frames: tuple[Any, Any] = (None, None)
        self.posterior_version = -1
        self.heatmap_version = -1
        self.context_sent_at = -math.inf
        self.heat_rows_sent = 0
        self.heat_stride = 0
        self.heat_geometry: tuple[float, float] | None = None
        self.hist_edges: dict[str, list[float]] = {}
        self.pred_times: list[float] | None = None
        self.series_version = -1
        self.alert_shown = False
        self.alert_fields: dict[str, Any] | None = None
        self.shown: tuple[dict[str, Any] | None, dict[str, Any] | None] = (None, None)
        self.ended: dict[str, Any] | None = None

    def _target_series(self) -> str | None:
        choice = self.select.value
        if choice and choice != FOLLOW_LATEST and self.state.get(choice) is not None:
            return choice
        return self.state.latest_series_id()

    def refresh(self) -> None:
        """Pull what changed in the shared state and update this session's models."""
        try:
            self._refresh()
        except Exception:  # a drawing bug must not kill the session's callback
            log.exception("dashboard refresh failed", extra={"series_id": self.series_id})

    def _refresh(self) -> None:
        # (no doc.hold("combine"): it would send a replaced source's final data *and* the rows
        # streamed into it after the replacement, so the browser would hold them twice)
        with self.state.lock:
            ids = self.state.series_ids()
            target = self._target_series()
            series = self.state.get(target) if target is not None else None
            if series is None:
                update = None
            else:
                if target != self.series_id:
                    self._switch_series(target)
                update = self._collect(series)
            global_status = {k: dict(v) for k, v in self.state.global_status.items()}
        options = [FOLLOW_LATEST, *reversed(ids)]
        if list(self.select.options) != options:
            self.select.options = options
        if update is not None:
            self._apply(update)
        # the health text changes with every frame (rates, counters): at most once a second, but
        # at once when the series ends or an estimate turns stale or fresh
        key = (self.series_id, self.ended is not None, self.shown[1] is not None)
        now = time.monotonic()
        if key != self.health_key or now - self.health_sent_at >= HEALTH_MIN_INTERVAL_S:
            self.health_key, self.health_sent_at = key, now
            self._show_health(update or {}, global_status)

    def _switch_series(self, series_id: str) -> None:
        self.series_id = series_id
        self._reset_counters()
        self.src_alpha.data = _empty(self.ALPHA_COLUMNS)
        self.src_history.data = _empty(self.HISTORY_COLUMNS)
        self.src_t0_history.data = _empty(self.HISTORY_COLUMNS)
        self.src_t0_marks.data = {"mean": [], "q05": [], "q95": []}
        self.src_pred.data = _empty(self.PREDICTIVE_COLUMNS)
        self.src_k_history.data = {"frame_index": [], "time_s": []}
        self.k_band.visible = self.k_line.visible = False
        self.k_history_model = None
        for src in (self.src_pattern, self.src_ref_a, self.src_ref_b):
            src.data = {"radial": [], "intensity": []}
        self.src_heat.data = {"image": [], "x": [], "y": [], "dw": [], "dh": []}
        for line in self._model_lines.values():
            line.visible = False
        self._model_lines = {}
        self.model_legend.items = []
        self.src_model_history.data = {"time_s": []}
        self.banner.visible = False
        self.span_alert.visible = False

    def _collect(self, series: SeriesState) -> dict[str, Any]:
        """Copy (under the state lock) what changed since the last refresh of this session."""
        update: dict[str, Any] = {"series_id": series.series_id}
        heatmap = series.heatmap
        now = time.monotonic()
        context_due = now - self.context_sent_at >= CONTEXT_MIN_INTERVAL_S or series.ended is not None
        if context_due and ((heatmap is not None and heatmap.version != self.heatmap_version)
                            or series.pattern_version != self.pattern_version):
            self.context_sent_at = now
        else:
            context_due = False
        if context_due and heatmap is not None and heatmap.version != self.heatmap_version:
            self.heatmap_version = heatmap.version
            if heatmap.stride != self.heat_stride or heatmap.n_rows < self.heat_rows_sent or self.heat_rows_sent == 0:
                update["heatmap_full"] = heatmap.snapshot()
                update["heatmap_full"]["image_full"] = heatmap.image.copy()
                update["heatmap_full"]["row_step"] = heatmap.row_step()
                update["heatmap_full"]["n_rows"] = heatmap.n_rows
            else:
                update["heatmap_rows"] = (self.heat_rows_sent, heatmap.image[self.heat_rows_sent: heatmap.n_rows].copy())
            self.heat_stride, self.heat_rows_sent = heatmap.stride, heatmap.n_rows
        update["frame_rate_hz"] = series.frame_rate_hz()
        update["ess_min"] = series.history.last("ess_min")
        update["status"] = {k: dict(v) for k, v in series.status.items()}
        # the trends over time (t0, k, model probabilities) follow at most once a second
        trends_due = ((now - self.trends_sent_at >= TRENDS_MIN_INTERVAL_S or series.ended is not None)
                      and (series.history.total, series.k_history.total, series.model_history.total)
                      != (self.n_t0_history, self.n_k_history, self.n_model_history))
        if series.version == self.series_version and not context_due and not trends_due:
            return update
        self.series_version = series.version
        update["start"] = dict(series.start)
        update["unit"] = series.unit
        update["ended"] = series.ended
        if series.fractions.total != self.n_fractions:
            update["fractions"], self.n_fractions = series.fractions.rows_since(self.n_fractions)
        if series.history.total != self.n_history:
            update["history"], self.n_history = series.history.rows_since(self.n_history)
        if trends_due:
            self.trends_sent_at = now
            if series.history.total != self.n_t0_history:
                update["t0_history"], self.n_t0_history = series.history.rows_since(self.n_t0_history)
            if series.k_history.total != self.n_k_history:
                update["k_history"], self.n_k_history = series.k_history.rows_since(self.n_k_history)
            if series.model_history.total != self.n_model_history:
                update["model_history"], self.n_model_history = series.model_history.rows_since(self.n_model_history)
        if context_due and series.pattern_version != self.pattern_version:
            self.pattern_version = series.pattern_version
            update["pattern"] = series.latest_pattern
            references = tuple((r or {}).get("frame_index") for r in (series.reference_a, series.reference_b))
            if references != self.reference_frames:
                self.reference_frames = references
                update["reference_a"] = series.reference_a
                update["reference_b"] = series.reference_b
            update["peaks"] = list(series.latest_peaks)
        if series.posterior_version != self.posterior_version:
            self.posterior_version = series.posterior_version
            update["now"] = series.now_posterior()
        update["alert"] = series.alert
        update["frames_seen"] = series.fractions.total
        return update

    def _apply(self, update: dict[str, Any]) -> None:
        if update.get("heatmap_full") is not None:
            self._show_heatmap(update["heatmap_full"], update.get("start") or {})
        elif update.get("heatmap_rows") is not None:
            self._add_heatmap_rows(*update["heatmap_rows"])
        if "start" not in update:
            return
        start = update["start"]
        self.ended = update.get("ended")
        if "fractions" in update:
            self._stream_fractions(update["fractions"])
        times = update.get("fractions", {}).get("time_s")
        self._fit_time_range(start, float(np.nanmax(times)) if times is not None and len(times) else None)
        if "history" in update:
            self._stream_history(update["history"])
        if "t0_history" in update:
            self.src_t0_history.stream({name: update["t0_history"][name] for name in self.HISTORY_COLUMNS},
                                       rollover=HISTORY_CAPACITY)
        if "model_history" in update:
            self._stream_model_history(update["model_history"])
        if "k_history" in update:
            self._stream_k_history(update["k_history"])
        if "pattern" in update:
            self._show_pattern(update)
        if "now" in update:
            self.shown = update["now"]
            self._show_posterior(*update["now"])
        gas_time = start.get("gas_time_s")
        for span in (self.span_ts, self.span_ts_onset):
            span.visible = gas_time is not None
            if gas_time is not None:
                span.location = float(gas_time)
        if update.get("alert") is not None and not self.alert_shown:
            self.alert_fields = dict(update["alert"])
            self.alert_shown = True
            if isinstance(self.alert_fields.get("time_s"), (int, float)):
                self.span_alert.location = float(self.alert_fields["time_s"])
                self.span_alert.visible = True
        if self.alert_shown and ("now" in update or not self.banner.visible):
            self._show_alert(self.alert_fields or {})
        self._show_header(update, start)

    def _fit_time_range(self, start: dict[str, Any], latest_s: float | None) -> None:
        """The series window (n_frames x frame_time) when the start message gives it; otherwise
        a window that doubles whenever a frame falls beyond it (so it rarely changes)."""
        n_frames, frame_time = _number(start.get("n_frames")), _number(start.get("frame_time_s"))
        if n_frames and frame_time and n_frames > 0 and frame_time > 0:
            end = n_frames * frame_time
        else:
            end = self.time_range.end if self.time_range.end and self.time_range.end > 1.0 else 60.0
            while latest_s is not None and latest_s > end:
                end *= 2.0
        pad = 0.02 * end
        if (self.time_range.start, self.time_range.end) != (-pad, end + pad):
            self.time_range.update(start=-pad, end=end + pad)

    def _stream_fractions(self, rows: dict[str, np.ndarray]) -> None:
        alpha = rows["alpha"]
        sigma = np.nan_to_num(rows["sigma_alpha"], nan=0.0)
        self.src_alpha.stream({
            "time_s": rows["time_s"], "alpha": alpha, "lower": alpha - sigma, "upper": alpha + sigma,
            "frame_index": rows["frame_index"],
            "state": np.where(rows["flagged"] > 0, "flagged", "ok"),
        }, rollover=HISTORY_CAPACITY)

    def _stream_history(self, rows: dict[str, np.ndarray]) -> None:
        self.src_history.stream({name: rows[name] for name in self.HISTORY_COLUMNS}, rollover=HISTORY_CAPACITY)

    def _stream_k_history(self, rows: dict[str, np.ndarray]) -> None:
        _stream_per_model_columns(self.src_k_history, rows)

    def _show_k_history_of(self, model: str | None) -> None:
        """Point the k history band and line at ``model``'s columns (one rate law at a time)."""
        if model is None or f"k_q50_{model}" not in self.src_k_history.data:
            return
        if model != self.k_history_model:
            self.k_history_model = model
            self.k_band.glyph.update(y1=f"k_q05_{model}", y2=f"k_q95_{model}")
            self.k_line.glyph.y = f"k_q50_{model}"
            self.fig_k_time.title.text = f"k of {model} (leading now) over time: median, 90 % band"
        self.k_band.visible = self.k_line.visible = True

    def _stream_model_history(self, rows: dict[str, np.ndarray]) -> None:
        _stream_per_model_columns(self.src_model_history, rows)
        names = [name for name in self.src_model_history.data if name != "time_s"]
        new = [name for name in names if name not in self._model_lines]
        if not new:
            return
        palette = Category20_20 if len(names) > 10 else Category10_10
        free = [line for line in self._slot_lines if line not in self._model_lines.values()]
        for i, name in enumerate(names):
            if name in self._model_lines or not free:
                continue  # (more hypotheses than slots: the extra ones are listed in the table only)
            line = free.pop(0)
            line.glyph.update(y=name, line_color=COLOR_NULL if name == NO_REACTION else palette[i % len(palette)],
                              line_dash="dotdash" if name == NO_REACTION else "solid")
            line.visible = True
            self._model_lines[name] = line
        self.model_legend.items = [LegendItem(label=name, renderers=[line]) for name, line in self._model_lines.items()]

    def _show_pattern(self, update: dict[str, Any]) -> None:
        unit = update.get("unit", "2th_deg")
        self.fig_pattern.xaxis.axis_label = radial_label(unit)
        self.fig_heat.xaxis.axis_label = radial_label(unit)
        for src, key in ((self.src_pattern, "pattern"), (self.src_ref_a, "reference_a"), (self.src_ref_b, "reference_b")):
            entry = update.get(key)
            if entry is not None:
                src.data = {"radial": entry["radial"], "intensity": entry["intensity"]}
        pattern = update.get("pattern")
        peaks = [p for p in update.get("peaks") or [] if all(isinstance(p.get(k), (int, float)) for k in ("lo_deg", "hi_deg"))]
        if pattern is not None and peaks and unit == "2th_deg":
            top = float(np.nanmax(pattern["intensity"])) * 1.05
            data = {
                "left": [p["lo_deg"] for p in peaks], "right": [p["hi_deg"] for p in peaks],
                "bottom": [0.0] * len(peaks), "top": [top] * len(peaks),
                "color": [COLOR_PHASE.get(str(p.get("phase")), "#777777") for p in peaks],
                "phase": [f"phase {p.get('phase')} peak window" for p in peaks],
            }
            old = self.src_peaks.data
            if list(old.get("left", [])) != data["left"] or list(old.get("right", [])) != data["right"]:
                self.src_peaks.data = data
            elif old.get("top") and abs(old["top"][0] - top) > 0.1 * top:
                self.src_peaks.patch({"top": [(slice(0, len(peaks)), data["top"])]})

    # ------------------------------------------------------------------ heat map
    def _update_color_range(self, image: np.ndarray) -> None:
        finite = image[np.isfinite(image)]
        if finite.size:
            low, high = (float(v) for v in np.percentile(finite, [1.0, 99.8]))
            high = max(high, low + 1e-9)
            old_low, old_high = self.color_mapper.low, self.color_mapper.high
            if old_low is None or old_high is None or abs(high - old_high) > 0.1 * (old_high - old_low) \
                    or abs(low - old_low) > 0.1 * (old_high - old_low):
                self.color_mapper.update(low=low, high=high)

    def _show_heatmap(self, snap: dict[str, Any], start: dict[str, Any]) -> None:
        """The whole heat map (first rows, or after a decimation): a fixed-size image of
        ``rows`` rows ``row_step`` seconds apart; unfilled rows are transparent (NaN)."""
        image = snap["image_full"]
        stride = snap["stride"]
        step = snap["row_step"]
        frame_time = _number(start.get("frame_time_s"))
        if snap["n_rows"] < 2 and frame_time:
            step = frame_time * stride
        y0 = snap["t_min"] if snap["n_rows"] > 1 else snap["t_min"] + 0.5 - step / 2
        self.heat_geometry = (y0, step)
        self.src_heat.data = {"image": [image], "x": [snap["radial_min"]], "y": [y0],
                              "dw": [snap["radial_span"]], "dh": [step * image.shape[0]]}
        self.fig_heat.y_range.update(start=y0, end=y0 + step * snap["n_rows"])
        self._update_color_range(image[: snap["n_rows"]])
        self.fig_heat.title.text = ("Patterns against time" if stride == 1
                                    else f"Patterns against time (each row averages {stride} frames)")

    def _add_heatmap_rows(self, first: int, rows: np.ndarray) -> None:
        """Patch the rows ``first``.. of the image in place (only they travel to the browser)."""
        if not len(self.src_heat.data.get("image", [])) or self.heat_geometry is None or rows.shape[0] == 0:
            return
        self.src_heat.patch({"image": [((0, slice(first, first + rows.shape[0]), slice(None)), rows.ravel())]})
        y0, step = self.heat_geometry
        self.fig_heat.y_range.end = y0 + step * (first + rows.shape[0])
        self._update_color_range(rows)

    # ------------------------------------------------------------------ posterior
    def _patch_or_replace(self, src: ColumnDataSource, key: str, edges: list[float], quads: dict[str, np.ndarray]) -> None:
        """Same bin edges as last time: patch the heights only; otherwise replace the bars."""
        if self.hist_edges.get(key) == edges and len(src.data.get("top", [])) == len(quads["top"]):
            src.patch({"top": [(slice(0, len(quads["top"])), quads["top"])]})
        else:
            self.hist_edges[key] = list(edges)
            src.data = quads

    def _show_posterior(self, posterior: dict[str, Any] | None, stale: dict[str, Any] | None) -> None:
        described = _describe(posterior, stale)
        if posterior is None:
            self.now.styles = NOW_STALE_STYLE if stale is not None else NOW_STYLE
            self.now.text = f"<b>Now:</b> {html.escape(described)}"
            return
        predictive = posterior.get("predictive") or {}
        if predictive.get("time_s"):
            lead, avg = predictive.get("leading") or {}, predictive.get("model_averaged") or {}
            n = len(predictive["time_s"])
            nan = [math.nan] * n
            columns = {"lead_median": lead.get("median", nan), "lead_q05": lead.get("q05", nan),
                       "lead_q95": lead.get("q95", nan), "avg_median": avg.get("median", nan),
                       "avg_q05": avg.get("q05", nan), "avg_q95": avg.get("q95", nan)}
            if self.pred_times == list(predictive["time_s"]):
                self.src_pred.patch({name: [(slice(0, n), values)] for name, values in columns.items()})
            else:
                self.pred_times = list(predictive["time_s"])
                self.src_pred.data = {"time_s": predictive["time_s"], **columns}
        histograms = posterior.get("histograms") or {}
        t0_hist = histograms.get("t0") or {}
        if t0_hist.get("edges") and t0_hist.get("model_averaged") is not None:
            quads = _hist_quads(t0_hist["edges"], t0_hist["model_averaged"])
            self._patch_or_replace(self.src_t0_avg, "t0", t0_hist["edges"], quads)
            _follow(self.fig_t0_hist.x_range, *_mass_range(quads, log_scale=False), log_scale=False)
        if t0_hist.get("edges") and t0_hist.get("leading") is not None:
            self._patch_or_replace(self.src_t0_lead, "t0_lead", t0_hist["edges"],
                                   _hist_quads(t0_hist["edges"], t0_hist["leading"]))
        k_hist = histograms.get("k") or {}
        if k_hist.get("edges") and k_hist.get("leading") is not None and min(k_hist["edges"]) > 0:
            quads = _hist_quads(k_hist["edges"], density_per_log10(k_hist["edges"], k_hist["leading"]))
            self._patch_or_replace(self.src_k_lead, "k_lead", k_hist["edges"], quads)
            _follow(self.fig_k_hist.x_range, *_mass_range(quads, log_scale=True), log_scale=True)
        t0 = (posterior.get("model_averaged") or {}).get("t0") or {}
        if all(isinstance(t0.get(k), (int, float)) for k in ("mean", "q05", "q95")):
            self.src_t0_marks.data = {"mean": [t0["mean"]], "q05": [t0["q05"]], "q95": [t0["q95"]]}

        leading = posterior.get("leading_model")
        models = posterior.get("models") or {}
        self._show_models(posterior, models, leading, stale)
        self._show_k_history_of(leading)
        k = ((models.get(leading) or {}).get("params") or {}).get("k") or {}
        leading_p = (models.get(leading) or {}).get("probability")
        reaction = _number(posterior.get("reaction_probability"))
        self.now.styles = NOW_STALE_STYLE if stale is not None else NOW_STYLE
        self.now.text = (
            f"<b>Now</b> ({html.escape(described)}, t = {_fmt(posterior.get('time_s'), 2)} s): "
            + (f"P(reaction) = {_fmt(reaction, 4)}; " if reaction is not None else "")
            + f"leading model <b>{html.escape(str(leading))}</b> (P = {_fmt(leading_p)}), "
            f"k({html.escape(str(leading))}) = {_fmt_g(k.get('q50'))} 1/s "
            f"[90 %: {_fmt_g(k.get('q05'))} – {_fmt_g(k.get('q95'))}]; "
            f"t0 (all models) = {_fmt(t0.get('mean'))} ± {_fmt(t0.get('sd'))} s "
            f"[90 %: {_fmt(t0.get('q05'))} – {_fmt(t0.get('q95'))} s]; "
            f"onset probability {_fmt(posterior.get('onset_probability'), 4)}. "
            f"<span style='color:{COLOR_TS}'>dotted green: gas introduction ts</span>; "
            f"<span style='color:{COLOR_LEADING}'>red line and band on α(t): t0 mean and 90 % interval</span>.")

    def _show_models(self, posterior: dict[str, Any], models: dict[str, Any], leading: Any,
                     stale: dict[str, Any] | None) -> None:
        """Bars of P(model | data) with "no reaction" as a competitor, the k intervals per model,
        and a table with log evidences and their Monte Carlo standard errors."""
        names = sorted(models, key=lambda m: -float(models[m].get("probability") or 0.0))
        null = posterior.get("null_model") if isinstance(posterior.get("null_model"), dict) else None
        entries = [(m, models[m]) for m in names]
        if null is not None:
            entries.append((NO_REACTION, null))
        entries.sort(key=lambda e: -float(e[1].get("probability") or 0.0))

        def color(name: str, entry: dict[str, Any]) -> str:
            if entry.get("stale"):
                return COLOR_STALE
            if name == NO_REACTION:
                return COLOR_NULL
            return COLOR_LEADING if name == leading else COLOR_OTHER

        kind = "estimate" if posterior.get("estimate") else "exact"
        labels = [name for name, _ in entries]
        if list(self.fig_models.x_range.factors) != labels:
            self.fig_models.x_range.factors = labels
        self.src_models.data = {
            "model": labels,
            "probability": [float(e.get("probability") or 0.0) for _, e in entries],
            "log_evidence": [_number(e.get("log_evidence")) if _number(e.get("log_evidence")) is not None else math.nan
                             for _, e in entries],
            "log_evidence_se": [_number(e.get("log_evidence_se")) if _number(e.get("log_evidence_se")) is not None
                                else math.nan for _, e in entries],
            "color": [color(name, e) for name, e in entries],
            "frame_index": [posterior.get("frame_index")] * len(entries),
            "kind": [kind] * len(entries),
        }
        k_rows = [(m, ((models[m].get("params") or {}).get("k") or {})) for m in names]
        k_rows = [(m, k) for m, k in k_rows if all(_number(k.get(q)) and k[q] > 0 for q in ("q05", "q50", "q95"))]
        k_rows.reverse()  # most probable at the top
        factors = [m for m, _ in k_rows]
        if list(self.fig_k_models.y_range.factors) != factors:
            self.fig_k_models.y_range.factors = factors
        self.src_k_models.data = {
            "model": factors, "q05": [k["q05"] for _, k in k_rows], "q50": [k["q50"] for _, k in k_rows],
            "q95": [k["q95"] for _, k in k_rows],
            "color": [COLOR_STALE if models[m].get("stale") else (COLOR_LEADING if m == leading else COLOR_OTHER)
                      for m, _ in k_rows],
        }
        rows = []
        for name, entry in entries:
            se = _number(entry.get("log_evidence_se"))
            ess = ((entry.get("diagnostics") or {}).get("ess"))
            state = "stale" if entry.get("stale") else ""
            weight = "bold" if name == leading else "normal"
            rows.append(
                f"<tr style='font-weight:{weight}'><td>{html.escape(name)}</td>"
                f"<td style='text-align:right'>{_fmt(_number(entry.get('probability')), 4)}</td>"
                f"<td style='text-align:right'>{_fmt(_number(entry.get('log_evidence')), 2)}"
                f"{' ± ' + _fmt(se, 2) if se is not None else ''}</td>"
                f"<td style='text-align:right'>{_fmt(_number(ess), 0)}</td><td>{state}</td></tr>")
        reaction = _number(posterior.get("reaction_probability"))
        self.model_table.text = (
            (f"<b>P(reaction) = {_fmt(reaction, 4)}</b><br>" if reaction is not None else "")
            + "<table style='border-collapse:collapse'><tr><th>hypothesis</th><th>P</th>"
            "<th>log Z ± MC se (nat)</th><th>ESS</th><th></th></tr>" + "".join(rows) + "</table>")

    # ------------------------------------------------------------------ banner, header, health
    def _show_alert(self, alert: dict[str, Any]) -> None:
        """The alert as it was raised (kept) and the state now (from the posterior on show)."""
        t0 = alert.get("t0") or {}
        delta = alert.get("t0_minus_ts")
        delta_text = f", t0 − ts = {_fmt(delta)} s" if isinstance(delta, (int, float)) else ""
        as_raised = (
            f"⚠ <b>ONSET DETECTED</b> in series {html.escape(str(alert.get('series_id') or self.series_id))}. "
            f"<b>Alert as raised</b> at t = {_fmt(alert.get('time_s'), 2)} s (frame {alert.get('frame_index')}): "
            f"t0 = {_fmt(t0.get('mean'))} s, 90 % interval {_fmt(t0.get('q05'))} – {_fmt(t0.get('q95'))} s{delta_text}; "
            f"leading model then {html.escape(str(alert.get('leading_model')))} "
            f"(P = {_fmt(alert.get('leading_probability'))}), onset probability {_fmt(alert.get('onset_probability'), 4)}")
        posterior, stale = self.shown
        now = ""
        if posterior is not None:
            models = posterior.get("models") or {}
            leading = posterior.get("leading_model")
            t0_now = (posterior.get("model_averaged") or {}).get("t0") or {}
            reaction = _number(posterior.get("reaction_probability"))
            now = (f"<br><b>Now</b> ({html.escape(_describe(posterior, stale))}): leading model "
                   f"{html.escape(str(leading))} (P = {_fmt((models.get(leading) or {}).get('probability'))}), "
                   f"t0 = {_fmt(t0_now.get('mean'))} s [90 %: {_fmt(t0_now.get('q05'))} – {_fmt(t0_now.get('q95'))} s]"
                   + (f", P(reaction) = {_fmt(reaction, 4)}" if reaction is not None else ""))
        self.banner.text = as_raised + now
        self.banner.visible = True

    def _show_header(self, update: dict[str, Any], start: dict[str, Any]) -> None:
        geometry = start.get("geometry") or {}
        detector = start.get("detector") or {}
        state = "ended (" + html.escape(str(update["ended"].get("reason"))) + ")" if update.get("ended") else "running"
        gas = start.get("gas_time_s")
        self.header.text = (
            f"<span style='font-size:19px'><b>beamkin</b> live kinetics</span> &nbsp; series "
            f"<b>{html.escape(str(update['series_id']))}</b> ({state}), "
            f"frames {update.get('frames_seen', 0)} / {start.get('n_frames') or '?'}<br>"
            f"{html.escape(str(start.get('kind', '?')))} detector {html.escape(str(detector.get('name', '?')))}, "
            f"λ = {_fmt(geometry.get('wavelength_A'), 4)} Å, frame time {_fmt(start.get('frame_time_s'))} s, "
            f"exposure {_fmt(start.get('exposure_s'))} s, gas introduced at ts = "
            f"{_fmt(gas) + ' s' if isinstance(gas, (int, float)) else 'unknown'}")

    def _show_health(self, update: dict[str, Any], global_status: dict[str, dict[str, Any]]) -> None:
        """Pipeline health now: what this dashboard measures itself, then each stage's own
        counters. The lag is that of the posterior on show while the series runs; once it has
        ended nothing lags any more and the final posterior's frame is stated instead."""
        lines = ["<b>Pipeline health</b>"]
        if "frame_rate_hz" in update:
            self._health_numbers = {k: update.get(k) for k in ("frame_rate_hz", "ess_min")}
        numbers = getattr(self, "_health_numbers", None)
        posterior, stale = self.shown
        if numbers is not None:
            if self.ended is not None:
                lines.append(f"series ended ({html.escape(str(self.ended.get('reason')))}); "
                             f"final posterior: {html.escape(_describe(posterior, stale))}")
            else:
                behind = _frames_behind(stale or posterior)
                lines.append(f"frames in: {_fmt(numbers['frame_rate_hz'], 2)} /s; exact sampler "
                             f"{behind if behind is not None else 0} frame(s) behind"
                             + ("; estimate STALE" if stale is not None else ""))
            missing = _number(((posterior or {}).get("diagnostics") or {}).get("frames_missing"))
            lines.append(f"missing frames {int(missing) if missing is not None else '–'}, "
                         f"smallest ESS of the last exact posterior {_fmt(numbers['ess_min'], 0)}")
        status = {**global_status, **update.get("status", {})}
        if not status:
            lines.append("no status messages yet")
        for stage, counters in sorted(status.items()):
            shown = [(k, v) for k, v in counters.items()
                     if k != "series_id" and isinstance(v, (int, float)) and not isinstance(v, bool)
                     and not (self.ended is not None and k in ("lag_s", "latency_s"))][:6]
            lines.append(f"{html.escape(stage)}: " + ", ".join(
                f"{html.escape(str(k)).replace('_', ' ')} {_fmt(v, 3) if isinstance(v, float) else v}" for k, v in shown))
        text = "<br>".join(lines)
        if text != self.health.text:
            self.health.text = text
