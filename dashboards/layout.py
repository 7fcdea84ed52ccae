"""Plots of one dashboard browser session and their periodic refresh from the shared state.

A :class:`DashboardSession` owns the Bokeh models of one document. Its ``refresh`` callback
(run by the Bokeh server at ``max_refresh_hz``) copies, under the state lock, only what
changed since the previous refresh, then updates the models: rolling quantities are
*streamed* (``ColumnDataSource.stream`` with the state's ring capacity as rollover), latest
quantities (pattern, histograms, predictive band, model probabilities) are replaced. So with
frames at 100 Hz a browser still receives at most ``max_refresh_hz`` updates per second, and
several browsers can watch the same state at once.

Models that tests and users look up by name (``Bokeh.documents[0].get_model_by_name``):
``series_select``, ``alert_banner`` (a Div with css class ``beamkin-alert``), ``health``,
``alpha_points`` (ColumnDataSource of alpha(t)), ``pattern_latest``, ``heatmap``,
``onset_history``, ``t0_histogram``, ``k_histogram``, ``model_probabilities``,
``predictive``.

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
    BoxAnnotation,
    ColorBar,
    ColumnDataSource,
    Div,
    FactorRange,
    Legend,
    LinearColorMapper,
    Range1d,
    Select,
    Span,
    Whisker,
)
from bokeh.palettes import Category10_10, Category20_20, Viridis256
from bokeh.plotting import figure
from bokeh.transform import factor_cmap, factor_mark

from .state import HISTORY_CAPACITY, DashboardState, SeriesState

log = logging.getLogger(__name__)

FOLLOW_LATEST = "(follow latest series)"
#: Heat map images are re-sent at most this often (seconds); they are the largest payload.
HEATMAP_MIN_INTERVAL_S = 1.0

COLOR_DATA = "#1f1f1f"
COLOR_FLAGGED = "#9e9e9e"
COLOR_LEADING = "#d62728"
COLOR_AVERAGED = "#1f77b4"
COLOR_TS = "#2ca02c"
COLOR_PHASE = {"A": "#1f77b4", "B": "#ff7f0e"}

ALERT_STYLE = {
    "background-color": "#b71c1c", "color": "white", "padding": "10px 16px", "font-size": "17px",
    "font-weight": "bold", "border-radius": "6px", "width": "100%",
}
PANEL_STYLE = {"font-size": "13px", "line-height": "1.45"}


def _figure(title: str, x_label: str, y_label: str, width: int, height: int, **kwargs: Any):
    fig = figure(title=title, width=width, height=height, tools="pan,wheel_zoom,box_zoom,reset,save,hover",
                 toolbar_location="right", **kwargs)
    fig.xaxis.axis_label = x_label
    fig.yaxis.axis_label = y_label
    fig.title.text_font_size = "13pt"
    fig.axis.axis_label_text_font_size = "11pt"
    fig.axis.axis_label_text_font_style = "normal"
    fig.min_border_left = 60
    return fig


def _legend(fig, location: str = "top_left") -> None:
    fig.legend.location = location
    fig.legend.click_policy = "hide"
    fig.legend.label_text_font_size = "9pt"
    fig.legend.background_fill_alpha = 0.7
    fig.legend.spacing = 0
    fig.legend.padding = 4


def radial_label(unit: str) -> str:
    return "scattering angle 2θ (degrees)" if unit == "2th_deg" else "q (1/nm)"


def _fmt(value: Any, digits: int = 3) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _empty(columns: list[str]) -> dict[str, list]:
    return {name: [] for name in columns}


def _hist_quads(edges: list[float], density: list[float]) -> dict[str, np.ndarray]:
    edges_a = np.asarray(edges, dtype=float)
    density_a = np.asarray(density, dtype=float)
    if edges_a.size != density_a.size + 1:
        raise ValueError(f"histogram has {edges_a.size} edges for {density_a.size} densities")
    return {"left": edges_a[:-1], "right": edges_a[1:], "top": density_a, "bottom": np.zeros_like(density_a)}


def _mass_range(quads: dict[str, np.ndarray], log_scale: bool, mass: float = 0.999) -> tuple[float, float]:
    """x range holding the central ``mass`` of a histogram density, padded by 30 % of its width."""
    left, right, density = quads["left"], quads["right"], np.nan_to_num(quads["top"])
    weights = density * (right - left)
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


class DashboardSession:
    """Bokeh models of one browser session and their refresh from a :class:`DashboardState`."""

    ALPHA_COLUMNS = ["time_s", "alpha", "lower", "upper", "frame_index", "state"]
    HISTORY_COLUMNS = ["time_s", "onset_probability", "t0_mean", "t0_lo", "t0_hi", "k_mean", "k_lo", "k_hi",
                       "t0_lead_mean", "k_lead_mean"]
    PREDICTIVE_COLUMNS = ["time_s", "lead_median", "lead_q05", "lead_q95", "avg_median", "avg_q05", "avg_q95"]

    def __init__(self, doc: Document, state: DashboardState, alert_threshold: float = 0.99,
                 max_refresh_hz: float = 5.0) -> None:
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
        doc.add_root(self.root)
        self.callback = doc.add_periodic_callback(self.refresh, max(int(1000.0 / max_refresh_hz), 20))

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        self.header = Div(text="<b>beamkin</b> – waiting for a series…", name="header", width=900,
                          styles={"font-size": "15px"})
        self.select = Select(title="Series", value=FOLLOW_LATEST, options=[FOLLOW_LATEST], name="series_select",
                             width=300)
        self.select.on_change("value", lambda attr, old, new: self.refresh())
        self.banner = Div(text="", name="alert_banner", css_classes=["beamkin-alert"], visible=False,
                          width=1560, styles=ALERT_STYLE)
        self.health = Div(text="", name="health", width=300, styles=PANEL_STYLE)

        # alpha(t) with errors, predictive bands, ts and t0 marks
        self.src_alpha = ColumnDataSource(_empty(self.ALPHA_COLUMNS), name="alpha_points")
        self.src_pred = ColumnDataSource(_empty(self.PREDICTIVE_COLUMNS), name="predictive")
        fig = _figure("Phase fraction α(t): data, posterior predictive (median and 90 % band)",
                      "time since series start (s)", "fraction of loaded phase α", 1020, 380,
                      y_range=Range1d(-0.12, 1.18))
        fig.varea("time_s", "avg_q05", "avg_q95", source=self.src_pred, fill_color=COLOR_AVERAGED, fill_alpha=0.18,
                  legend_label="model average 90 %")
        fig.line("time_s", "avg_median", source=self.src_pred, color=COLOR_AVERAGED, line_width=2, line_dash="dashed",
                 legend_label="model average median")
        fig.varea("time_s", "lead_q05", "lead_q95", source=self.src_pred, fill_color=COLOR_LEADING, fill_alpha=0.15,
                  legend_label="leading model 90 %")
        fig.line("time_s", "lead_median", source=self.src_pred, color=COLOR_LEADING, line_width=2,
                                  legend_label="leading model median")
        fig.add_layout(Whisker(source=self.src_alpha, base="time_s", upper="upper", lower="lower",
                               line_color="#555555", line_width=1, upper_head=None, lower_head=None))
        fig.scatter("time_s", "alpha", source=self.src_alpha, size=5,
                    color=factor_cmap("state", [COLOR_DATA, COLOR_FLAGGED], ["ok", "flagged"]),
                    marker=factor_mark("state", ["circle", "x"], ["ok", "flagged"]), legend_label="α ± σ (data)")
        self.span_ts = Span(location=0, dimension="height", line_color=COLOR_TS, line_width=2, line_dash="dotted",
                            visible=False)
        self.span_t0 = Span(location=0, dimension="height", line_color=COLOR_LEADING, line_width=2, visible=False)
        self.box_t0 = BoxAnnotation(left=0, right=0, fill_color=COLOR_LEADING, fill_alpha=0.12, visible=False)
        for annotation in (self.box_t0, self.span_ts, self.span_t0):
            fig.add_layout(annotation)
        _legend(fig)
        fig.hover.tooltips = [("t", "@time_s{0.000} s"), ("α", "@alpha{0.000}"), ("frame", "@frame_index")]
        self.mark_note = Div(text="", width=1020, styles={"font-size": "12px", "color": "#444"})
        self.fig_alpha = fig

        # onset probability
        self.src_history = ColumnDataSource(_empty(self.HISTORY_COLUMNS), name="onset_history")
        fig = _figure("Onset probability P(t0 ≤ t | data) (red line: alert)", "time since series start (s)", "probability", 520, 380,
                      x_range=self.fig_alpha.x_range, y_range=Range1d(-0.03, 1.05))
        fig.line("time_s", "onset_probability", source=self.src_history, color="#6a1b9a", line_width=2,
                 legend_label="onset probability")
        fig.add_layout(Span(location=self.alert_threshold, dimension="width", line_color=COLOR_LEADING, line_dash="dashed",
                            line_width=1.5))
        fig.line([], [], color=COLOR_LEADING, line_dash="dashed", legend_label=f"alert threshold {self.alert_threshold:g}")
        self.span_ts_onset = Span(location=0, dimension="height", line_color=COLOR_TS, line_width=2,
                                  line_dash="dotted", visible=False)
        fig.add_layout(self.span_ts_onset)
        self.span_alert = Span(location=0, dimension="height", line_color=COLOR_LEADING, line_width=2,
                               visible=False, name="alert_time")
        fig.add_layout(self.span_alert)
        _legend(fig)
        self.fig_onset = fig

        # latest pattern with references and peak windows
        self.src_pattern = ColumnDataSource({"radial": [], "intensity": []}, name="pattern_latest")
        self.src_ref_a = ColumnDataSource({"radial": [], "intensity": []}, name="reference_a")
        self.src_ref_b = ColumnDataSource({"radial": [], "intensity": []}, name="reference_b")
        self.src_peaks = ColumnDataSource({"left": [], "right": [], "bottom": [], "top": [], "color": [], "phase": []},
                                          name="peak_windows")
        fig = _figure("Latest pattern, phase references and fitted peak windows", radial_label("2th_deg"),
                      "intensity (counts)", 760, 360)
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

        # heat map (radial x time)
        self.color_mapper = LinearColorMapper(palette=Viridis256, nan_color=(0, 0, 0, 0))
        self.src_heat = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []}, name="heatmap")
        fig = _figure("Patterns against time", radial_label("2th_deg"), "time since series start (s)", 780, 360)
        fig.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.src_heat, color_mapper=self.color_mapper)
        fig.add_layout(ColorBar(color_mapper=self.color_mapper, title="counts", width=10), "right")
        fig.hover.tooltips = [("2θ", "$x{0.000}"), ("t", "$y{0.00} s"), ("counts", "@image{0}")]
        self.fig_heat = fig

        # posterior histograms of t0 and k
        self.src_t0_avg = ColumnDataSource({"left": [], "right": [], "top": [], "bottom": []}, name="t0_histogram")
        self.src_t0_lead = ColumnDataSource({"left": [], "right": [], "top": [], "bottom": []}, name="t0_histogram_leading")
        self.src_k_avg = ColumnDataSource({"left": [], "right": [], "top": [], "bottom": []}, name="k_histogram")
        self.src_k_lead = ColumnDataSource({"left": [], "right": [], "top": [], "bottom": []}, name="k_histogram_leading")
        self.fig_t0_hist = self._hist_figure("Posterior of onset time t0 (dashed: mean, band: 90 %)", "t0 (s)", self.src_t0_avg, self.src_t0_lead)
        self.fig_k_hist = self._hist_figure("Posterior of rate constant k (dashed: mean, band: 90 %)", "k (1/s)", self.src_k_avg, self.src_k_lead,
                                            x_axis_type="log")

        # model probabilities now
        self.src_models = ColumnDataSource({"model": [], "probability": [], "color": [], "log_evidence": []},
                                           name="model_probabilities")
        fig = _figure("Model probabilities now", "kinetic model", "posterior probability", 500, 330,
                      x_range=FactorRange(), y_range=Range1d(0, 1.05))
        fig.vbar(x="model", top="probability", width=0.8, color="color", source=self.src_models)
        fig.hover.tooltips = [("model", "@model"), ("P", "@probability{0.0000}"), ("log Z", "@log_evidence{0.00}")]
        fig.xaxis.major_label_orientation = 0.8
        self.fig_models = fig

        # history of t0 and k summaries
        self.fig_t0_time = self._history_figure("t0", "t0 (s)")
        self.fig_k_time = self._history_figure("k", "k (1/s)")

        # model probability history: one line per model, added as models appear
        self.src_model_history = ColumnDataSource({"time_s": []}, name="model_history")
        fig = _figure("Model probabilities over time", "time since series start (s)", "posterior probability",
                      520, 330, x_range=self.fig_alpha.x_range, y_range=Range1d(-0.03, 1.05))
        fig.add_layout(Legend(label_text_font_size="8pt", spacing=0, padding=2, click_policy="hide"), "right")
        fig.line(x=[], y=[])  # placeholder renderer until the first posterior names the models
        self.fig_model_history = fig
        self._model_lines: dict[str, Any] = {}

        top = row(column(self.header, self.mark_note), self.select, self.health)
        self.root = column(
            top,
            self.banner,
            row(self.fig_alpha, self.fig_onset),
            row(self.fig_pattern, self.fig_heat),
            row(self.fig_t0_hist, self.fig_k_hist, self.fig_models),
            row(self.fig_t0_time, self.fig_k_time, self.fig_model_history),
            name="beamkin_dashboard",
        )

    def _hist_figure(self, title: str, x_label: str, src_avg: ColumnDataSource, src_lead: ColumnDataSource,
                     **kwargs: Any):
        fig = _figure(title, x_label, f"probability density (1/{x_label.split('(')[-1].rstrip(')')})", 520, 330,
                      x_range=Range1d(0, 1), **kwargs)
        fig.quad(left="left", right="right", top="top", bottom="bottom", source=src_avg, fill_color=COLOR_AVERAGED,
                 fill_alpha=0.35, line_color=COLOR_AVERAGED, line_alpha=0.5, legend_label="model average")
        fig.quad(left="left", right="right", top="top", bottom="bottom", source=src_lead, fill_alpha=0,
                 line_color=COLOR_LEADING, line_width=1.5, legend_label="leading model")
        _legend(fig, "top_right")
        # model-averaged mean and 90 % interval: readable even when the grid is coarse
        fig.add_layout(BoxAnnotation(left=0, right=0, fill_color=COLOR_AVERAGED, fill_alpha=0.12, visible=False,
                                     name=f"{src_avg.name}_interval"))
        fig.add_layout(Span(location=0, dimension="height", line_color=COLOR_AVERAGED, line_width=2,
                            line_dash="dashed", visible=False, name=f"{src_avg.name}_mean"))
        return fig

    def _show_summary_marks(self, fig, stat: dict[str, Any]) -> None:
        box = next(a for a in fig.center if isinstance(a, BoxAnnotation))
        span = next(a for a in fig.center if isinstance(a, Span))
        if all(isinstance(stat.get(k), (int, float)) for k in ("mean", "q05", "q95")):
            box.left, box.right, span.location = stat["q05"], stat["q95"], stat["mean"]
            box.visible = span.visible = True

    # ------------------------------------------------------------------ refresh
    def _reset_counters(self) -> None:
        self.n_fractions = 0
        self.n_history = 0
        self.n_model_history = 0
        self.pattern_version = -1
        self.posterior_version = -1
        self.heatmap_version = -1
        self.heatmap_sent_at = 0.0
        self.series_version = -1
        self.alert_shown = False

    def _target_series(self) -> str | None:
        choice = self.select.value
        if choice and choice != FOLLOW_LATEST and self.state.get(choice) is not None:
            return choice
        return self.state.latest_series_id()

    def _history_figure(self, param: str, label: str):
        """Model-averaged mean +- sd and the leading model's mean of one parameter over time."""
        fig = _figure(f"{param} posterior mean ± sd over time", "time since series start (s)", label, 520, 330,
                      x_range=self.fig_alpha.x_range)
        fig.varea("time_s", f"{param}_lo", f"{param}_hi", source=self.src_history, fill_color=COLOR_AVERAGED,
                  fill_alpha=0.25, legend_label="model average ± sd")
        fig.line("time_s", f"{param}_mean", source=self.src_history, color=COLOR_AVERAGED, line_width=2,
                 legend_label="model average mean")
        fig.line("time_s", f"{param}_lead_mean", source=self.src_history, color=COLOR_LEADING, line_dash="dashed",
                 legend_label="leading model mean")
        _legend(fig)
        return fig

    def refresh(self) -> None:
        """Pull what changed in the shared state and update this session's models."""
        try:
            self._refresh()
        except Exception:  # a drawing bug must not kill the session's callback
            log.exception("dashboard refresh failed", extra={"series_id": self.series_id})

    def _refresh(self) -> None:
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
            self._apply(update, global_status)
        self._show_health(update or {}, global_status)

    def _switch_series(self, series_id: str) -> None:
        self.series_id = series_id
        self._reset_counters()
        self.src_alpha.data = _empty(self.ALPHA_COLUMNS)
        self.src_history.data = _empty(self.HISTORY_COLUMNS)
        self.src_pred.data = _empty(self.PREDICTIVE_COLUMNS)
        for src in (self.src_pattern, self.src_ref_a, self.src_ref_b):
            src.data = {"radial": [], "intensity": []}
        self.src_heat.data = {"image": [], "x": [], "y": [], "dw": [], "dh": []}
        for line in self._model_lines.values():
            line.visible = False
        self.src_model_history.data = {"time_s": []}
        self.banner.visible = False
        self.span_alert.visible = False

    def _collect(self, series: SeriesState) -> dict[str, Any]:
        """Copy (under the state lock) what changed since the last refresh of this session."""
        update: dict[str, Any] = {"series_id": series.series_id}
        heatmap = series.heatmap
        now = time.monotonic()
        if (heatmap is not None and heatmap.version != self.heatmap_version
                and (now - self.heatmap_sent_at >= HEATMAP_MIN_INTERVAL_S or self.heatmap_version < 0)):
            self.heatmap_version = heatmap.version
            self.heatmap_sent_at = now
            update["heatmap"] = heatmap.snapshot()
        posterior = series.latest_posterior or {}
        diagnostics = posterior.get("diagnostics") or {}
        update["frame_rate_hz"] = series.frame_rate_hz()
        update["lag_s"] = series.history.last("lag_s")
        update["ess_min"] = series.history.last("ess_min")
        missing = diagnostics.get("frames_missing")
        update["frames_missing"] = missing if isinstance(missing, int) and not isinstance(missing, bool) else None
        update["status"] = {k: dict(v) for k, v in series.status.items()}
        if series.version == self.series_version:
            return update
        self.series_version = series.version
        update["start"] = dict(series.start)
        update["unit"] = series.unit
        update["ended"] = series.ended
        if series.fractions.total != self.n_fractions:
            update["fractions"], self.n_fractions = series.fractions.rows_since(self.n_fractions)
        if series.history.total != self.n_history:
            update["history"], self.n_history = series.history.rows_since(self.n_history)
        if series.model_history.total != self.n_model_history:
            update["model_history"], self.n_model_history = series.model_history.rows_since(self.n_model_history)
        if series.pattern_version != self.pattern_version:
            self.pattern_version = series.pattern_version
            update["pattern"] = series.latest_pattern
            update["reference_a"] = series.reference_a
            update["reference_b"] = series.reference_b
            update["peaks"] = list(series.latest_peaks)
        if series.posterior_version != self.posterior_version:
            self.posterior_version = series.posterior_version
            update["posterior"] = series.latest_posterior
        update["alert"] = series.alert
        update["frames_seen"] = series.fractions.total
        return update

    def _apply(self, update: dict[str, Any], global_status: dict[str, dict[str, Any]]) -> None:
        if update.get("heatmap") is not None:
            self._show_heatmap(update["heatmap"])
        if "start" not in update:
            return
        start = update["start"]
        if "fractions" in update:
            self._stream_fractions(update["fractions"])
        if "history" in update:
            self._stream_history(update["history"])
        if "model_history" in update:
            self._stream_model_history(update["model_history"])
        if "pattern" in update:
            self._show_pattern(update)
        if update.get("posterior") is not None:
            self._show_posterior(update["posterior"])
        gas_time = start.get("gas_time_s")
        for span in (self.span_ts, self.span_ts_onset):
            span.visible = gas_time is not None
            if gas_time is not None:
                span.location = float(gas_time)
        if update.get("alert") is not None and not self.alert_shown:
            self._show_alert(update["alert"], gas_time)
        self._show_header(update, start)

    def _stream_fractions(self, rows: dict[str, np.ndarray]) -> None:
        alpha = rows["alpha"]
        sigma = np.nan_to_num(rows["sigma_alpha"], nan=0.0)
        self.src_alpha.stream({
            "time_s": rows["time_s"], "alpha": alpha, "lower": alpha - sigma, "upper": alpha + sigma,
            "frame_index": rows["frame_index"],
            "state": np.where(rows["flagged"] > 0, "flagged", "ok"),
        }, rollover=HISTORY_CAPACITY)

    def _stream_history(self, rows: dict[str, np.ndarray]) -> None:
        self.src_history.stream({
            "time_s": rows["time_s"], "onset_probability": rows["onset_probability"],
            "t0_mean": rows["t0_mean"], "t0_lo": rows["t0_mean"] - rows["t0_sd"], "t0_hi": rows["t0_mean"] + rows["t0_sd"],
            "k_mean": rows["k_mean"], "k_lo": rows["k_mean"] - rows["k_sd"], "k_hi": rows["k_mean"] + rows["k_sd"],
            "t0_lead_mean": rows["t0_lead_mean"], "k_lead_mean": rows["k_lead_mean"],
        }, rollover=HISTORY_CAPACITY)

    def _stream_model_history(self, rows: dict[str, np.ndarray]) -> None:
        current = set(self.src_model_history.data)
        if not set(rows) <= current:  # new model columns: rebuild the source with them
            data = {name: list(values) for name, values in self.src_model_history.data.items()}
            n = len(data.get("time_s", []))
            for name in rows:
                data.setdefault(name, [math.nan] * n)
            self.src_model_history.data = data
        for name in self.src_model_history.data:
            rows.setdefault(name, np.full(len(rows["time_s"]), np.nan))
        self.src_model_history.stream(rows, rollover=HISTORY_CAPACITY)
        names = [name for name in self.src_model_history.data if name != "time_s"]
        palette = Category20_20 if len(names) > 10 else Category10_10
        for i, name in enumerate(names):
            line = self._model_lines.get(name)
            if line is None:
                line = self.fig_model_history.line("time_s", name, source=self.src_model_history, line_width=2,
                                                   color=palette[i % len(palette)], legend_label=name)
                self._model_lines[name] = line
            line.visible = True

    def _show_pattern(self, update: dict[str, Any]) -> None:
        unit = update.get("unit", "2th_deg")
        self.fig_pattern.xaxis.axis_label = radial_label(unit)
        self.fig_heat.xaxis.axis_label = radial_label(unit)
        for src, entry in ((self.src_pattern, update.get("pattern")), (self.src_ref_a, update.get("reference_a")),
                           (self.src_ref_b, update.get("reference_b"))):
            if entry is not None:
                src.data = {"radial": entry["radial"], "intensity": entry["intensity"]}
        pattern = update.get("pattern")
        peaks = [p for p in update.get("peaks") or [] if all(isinstance(p.get(k), (int, float)) for k in ("lo_deg", "hi_deg"))]
        if pattern is not None and peaks and unit == "2th_deg":
            top = float(np.nanmax(pattern["intensity"])) * 1.05
            self.src_peaks.data = {
                "left": [p["lo_deg"] for p in peaks], "right": [p["hi_deg"] for p in peaks],
                "bottom": [0.0] * len(peaks), "top": [top] * len(peaks),
                "color": [COLOR_PHASE.get(str(p.get("phase")), "#777777") for p in peaks],
                "phase": [f"phase {p.get('phase')} peak window" for p in peaks],
            }

    def _show_heatmap(self, snap: dict[str, Any]) -> None:
        image = snap["image"]
        finite = image[np.isfinite(image)]
        if finite.size:
            low, high = np.percentile(finite, [1.0, 99.5])
            self.color_mapper.low, self.color_mapper.high = float(low), float(max(high, low + 1e-9))
        self.src_heat.data = {"image": [image], "x": [snap["radial_min"]], "y": [snap["t_min"]],
                              "dw": [snap["radial_span"]], "dh": [snap["t_span"]]}
        stride = snap["stride"]
        self.fig_heat.title.text = ("Patterns against time" if stride == 1
                                    else f"Patterns against time (each row averages {stride} frames)")

    def _show_posterior(self, posterior: dict[str, Any]) -> None:
        predictive = posterior.get("predictive") or {}
        if predictive.get("time_s"):
            lead, avg = predictive.get("leading") or {}, predictive.get("model_averaged") or {}
            n = len(predictive["time_s"])
            nan = [math.nan] * n
            self.src_pred.data = {
                "time_s": predictive["time_s"],
                "lead_median": lead.get("median", nan), "lead_q05": lead.get("q05", nan), "lead_q95": lead.get("q95", nan),
                "avg_median": avg.get("median", nan), "avg_q05": avg.get("q05", nan), "avg_q95": avg.get("q95", nan),
            }
        histograms = posterior.get("histograms") or {}
        for name, src_avg, src_lead in (("t0", self.src_t0_avg, self.src_t0_lead), ("k", self.src_k_avg, self.src_k_lead)):
            hist = histograms.get(name) or {}
            if hist.get("edges") and hist.get("model_averaged") is not None:
                src_avg.data = quads = _hist_quads(hist["edges"], hist["model_averaged"])
                figure_ = self.fig_t0_hist if name == "t0" else self.fig_k_hist
                figure_.x_range.start, figure_.x_range.end = _mass_range(quads, log_scale=name == "k")
            if hist.get("edges") and hist.get("leading") is not None:
                src_lead.data = _hist_quads(hist["edges"], hist["leading"])
        averaged = posterior.get("model_averaged") or {}
        self._show_summary_marks(self.fig_t0_hist, averaged.get("t0") or {})
        self._show_summary_marks(self.fig_k_hist, averaged.get("k") or {})
        leading = posterior.get("leading_model")
        models = posterior.get("models") or {}
        names = sorted(models, key=lambda m: -float(models[m].get("probability") or 0.0))
        self.fig_models.x_range.factors = names
        self.src_models.data = {
            "model": names,
            "probability": [float(models[m].get("probability") or 0.0) for m in names],
            "log_evidence": [float(models[m].get("log_evidence") or math.nan) for m in names],
            "color": [COLOR_LEADING if m == leading else "#90a4ae" for m in names],
        }
        t0 = (posterior.get("model_averaged") or {}).get("t0") or {}
        if all(isinstance(t0.get(k), (int, float)) for k in ("mean", "q05", "q95")):
            self.span_t0.location = t0["mean"]
            self.box_t0.left, self.box_t0.right = t0["q05"], t0["q95"]
            self.span_t0.visible = self.box_t0.visible = True
        k = (posterior.get("model_averaged") or {}).get("k") or {}
        leading_p = (models.get(leading) or {}).get("probability")
        kind, behind = "Posterior", ""
        if posterior.get("estimate"):
            frames_behind = (posterior.get("diagnostics") or {}).get("frames_behind")
            kind = "Posterior estimate"
            if isinstance(frames_behind, int) and frames_behind > 0:
                behind = f"; exact sampler {frames_behind} frame{'s' if frames_behind != 1 else ''} behind"
        self.mark_note.text = (
            f"{kind} now (frame {posterior.get('frame_index')}, t = {_fmt(posterior.get('time_s'), 2)} s{behind}): "
            f"t0 = {_fmt(t0.get('mean'))} ± {_fmt(t0.get('sd'))} s "
            f"[90 %: {_fmt(t0.get('q05'))} – {_fmt(t0.get('q95'))} s], "
            f"k = {_fmt(k.get('mean'))} ± {_fmt(k.get('sd'))} 1/s, "
            f"leading model {html.escape(str(leading))} (P = {_fmt(leading_p)}), "
            f"onset probability {_fmt(posterior.get('onset_probability'), 4)}. "
            f"<span style='color:{COLOR_TS}'>dotted green: gas introduction ts</span>; "
            f"<span style='color:{COLOR_LEADING}'>red line and band: t0 mean and 90 % interval</span>.")

    def _show_alert(self, alert: dict[str, Any], gas_time: float | None) -> None:
        t0 = alert.get("t0") or {}
        delta = alert.get("t0_minus_ts")
        delta_text = f", t0 − ts = {_fmt(delta)} s" if isinstance(delta, (int, float)) else ""
        self.banner.text = (
            f"⚠ ONSET DETECTED in series {html.escape(str(alert.get('series_id')))} at t = {_fmt(alert.get('time_s'), 2)} s "
            f"(frame {alert.get('frame_index')}): t0 = {_fmt(t0.get('mean'))} s, "
            f"90 % interval {_fmt(t0.get('q05'))} – {_fmt(t0.get('q95'))} s{delta_text}; "
            f"leading model {html.escape(str(alert.get('leading_model')))} "
            f"(P = {_fmt(alert.get('leading_probability'))}), "
            f"onset probability {_fmt(alert.get('onset_probability'), 4)}")
        self.banner.visible = True
        self.alert_shown = True
        if isinstance(alert.get("time_s"), (int, float)):
            self.span_alert.location = float(alert["time_s"])
            self.span_alert.visible = True

    def _show_header(self, update: dict[str, Any], start: dict[str, Any]) -> None:
        geometry = start.get("geometry") or {}
        detector = start.get("detector") or {}
        state = "ended (" + html.escape(str(update["ended"].get("reason"))) + ")" if update.get("ended") else "running"
        gas = start.get("gas_time_s")
        self.header.text = (
            f"<span style='font-size:20px'><b>beamkin</b> live kinetics</span> &nbsp; series "
            f"<b>{html.escape(str(update['series_id']))}</b> ({state})<br>"
            f"{html.escape(str(start.get('kind', '?')))} detector {html.escape(str(detector.get('name', '?')))}, "
            f"λ = {_fmt(geometry.get('wavelength_A'), 4)} Å, frame time {_fmt(start.get('frame_time_s'))} s, "
            f"exposure {_fmt(start.get('exposure_s'))} s, gas introduced at ts = "
            f"{_fmt(gas) + ' s' if isinstance(gas, (int, float)) else 'unknown'}, "
            f"frames {update.get('frames_seen', 0)} / {start.get('n_frames') or '?'}")

    def _show_health(self, update: dict[str, Any], global_status: dict[str, dict[str, Any]]) -> None:
        """Pipeline health: what this dashboard measures itself, then each stage's own counters."""
        lines = ["<b>Pipeline health</b>"]
        if "frame_rate_hz" in update:
            self._health_numbers = {k: update[k] for k in ("frame_rate_hz", "lag_s", "frames_missing", "ess_min")}
        numbers = getattr(self, "_health_numbers", None)
        if numbers is not None:
            lines.append(
                f"frames in: {_fmt(numbers['frame_rate_hz'], 2)} /s, posterior lag {_fmt(numbers['lag_s'], 3)} s, "
                f"missing {html.escape(str(numbers['frames_missing'] if numbers['frames_missing'] is not None else '–'))}, "
                f"smallest ESS {_fmt(numbers['ess_min'], 0)}")
        status = {**global_status, **update.get("status", {})}
        if not status:
            lines.append("no status messages yet")
        for stage, counters in sorted(status.items()):
            shown = [(k, v) for k, v in counters.items()
                     if k != "series_id" and isinstance(v, (int, float)) and not isinstance(v, bool)][:6]
            lines.append(f"{html.escape(stage)}: " + ", ".join(
                f"{html.escape(str(k)).replace('_', ' ')} {_fmt(v, 3) if isinstance(v, float) else v}" for k, v in shown))
        self.health.text = "<br>".join(lines)
