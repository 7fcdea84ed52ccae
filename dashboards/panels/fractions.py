"""alpha(t): the reducer's phase fractions with their errors, the posterior predictive (leading
model and all models: median and 90 % band), the gas introduction time ts and t0 (all models:
mean and 90 % interval).

Units: time in seconds, alpha dimensionless (0 before the onset, 1 when converted).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from bokeh.models import ColumnDataSource, Range1d, Span
from bokeh.transform import factor_cmap, factor_mark

from .. import style
from ..figures import live_figure, live_legend
from ..state import HISTORY_CAPACITY
from .base import Panel, SessionView, TimeWindow, empty, new_posterior

ALPHA_COLUMNS = ["time_s", "alpha", "lower", "upper", "frame_index", "state"]
PREDICTIVE_COLUMNS = ["time_s", "lead_median", "lead_q05", "lead_q95", "avg_median", "avg_q05", "avg_q95"]
T0_MARK_COLUMNS = ["mean", "q05", "q95"]


def gas_span() -> Span:
    """The vertical line at the gas introduction time ts (hidden while ts is unknown)."""
    return Span(location=0, dimension="height", line_color=style.COLOR_TS, line_width=2, line_dash="dotted",
                visible=False)


def show_gas_time(span: Span, start: dict[str, Any]) -> None:
    """Put ``span`` at the start message's ``gas_time_s`` (s), hide it when unknown."""
    gas_time = start.get("gas_time_s")
    span.visible = gas_time is not None
    if gas_time is not None:
        span.location = float(gas_time)


class FractionsPanel(Panel):
    """``alpha_points`` (streamed), ``predictive`` (patched on an unchanged time grid) and the
    plot ``plot_alpha``; ``t0_marks`` is the t0 posterior panel's source of the t0 marks."""

    def __init__(self, window: TimeWindow, t0_marks: ColumnDataSource) -> None:
        self.window = window
        self.points = ColumnDataSource(empty(ALPHA_COLUMNS), name="alpha_points")
        self.predictive = ColumnDataSource(empty(PREDICTIVE_COLUMNS), name="predictive")
        self.predictive_times: list[float] | None = None
        fig = live_figure(style.ALPHA_TITLE, style.TIME_AXIS_LABEL, style.ALPHA_AXIS_LABEL, height=340,
                          x_range=window.range, y_range=Range1d(-0.12, 1.18))
        fig.varea("time_s", "avg_q05", "avg_q95", source=self.predictive, fill_color=style.COLOR_AVERAGED,
                  fill_alpha=0.18, legend_label="all models 90 %")
        fig.line("time_s", "avg_median", source=self.predictive, color=style.COLOR_AVERAGED, line_width=2,
                 line_dash="dashed", legend_label="all models median")
        fig.line("time_s", "lead_median", source=self.predictive, color=style.COLOR_LEADING, line_width=2,
                 legend_label="leading model median")
        fig.segment("time_s", "lower", "time_s", "upper", source=self.points, line_color=style.COLOR_ERROR_BAR,
                    line_width=1)
        fig.scatter("time_s", "alpha", source=self.points, size=5,
                    color=factor_cmap("state", [style.COLOR_DATA, style.COLOR_FLAGGED], ["ok", "flagged"]),
                    marker=factor_mark("state", ["circle", "x"], ["ok", "flagged"]), legend_label="α ± σ (data)")
        self.span_ts = gas_span()
        fig.vstrip("q05", "q95", source=t0_marks, fill_color=style.COLOR_LEADING, fill_alpha=0.12, line_alpha=0)
        fig.vspan("mean", source=t0_marks, line_color=style.COLOR_LEADING, line_width=2)
        fig.add_layout(self.span_ts)
        live_legend(fig)
        fig.hover.tooltips = [("t", "@time_s{0.000} s"), ("α", "@alpha{0.000}"), ("frame", "@frame_index")]
        self.figure = fig

    def roots(self) -> dict[str, Any]:
        return {"plot_alpha": self.figure}

    def reset(self) -> None:
        self.points.data = empty(ALPHA_COLUMNS)
        self.predictive.data = empty(PREDICTIVE_COLUMNS)
        self.predictive_times = None

    def update(self, update: dict[str, Any], view: SessionView) -> None:
        if "start" not in update:
            return
        rows = update.get("fractions")
        if rows is not None:
            alpha = rows["alpha"]
            sigma = np.nan_to_num(rows["sigma_alpha"], nan=0.0)
            self.points.stream({
                "time_s": rows["time_s"], "alpha": alpha, "lower": alpha - sigma, "upper": alpha + sigma,
                "frame_index": rows["frame_index"], "state": np.where(rows["flagged"] > 0, "flagged", "ok"),
            }, rollover=HISTORY_CAPACITY)
        times = (rows or {}).get("time_s")
        self.window.fit(update["start"], float(np.nanmax(times)) if times is not None and len(times) else None)
        posterior = new_posterior(update)
        if posterior is not None:
            self._show_predictive(posterior.get("predictive") or {})
        show_gas_time(self.span_ts, update["start"])

    def _show_predictive(self, predictive: dict[str, Any]) -> None:
        """Bands on the same time grid as last time are patched, otherwise replaced."""
        if not predictive.get("time_s"):
            return
        lead, avg = predictive.get("leading") or {}, predictive.get("model_averaged") or {}
        n = len(predictive["time_s"])
        nan = [math.nan] * n
        columns = {"lead_median": lead.get("median", nan), "lead_q05": lead.get("q05", nan),
                   "lead_q95": lead.get("q95", nan), "avg_median": avg.get("median", nan),
                   "avg_q05": avg.get("q05", nan), "avg_q95": avg.get("q95", nan)}
        if self.predictive_times == list(predictive["time_s"]):
            self.predictive.patch({name: [(slice(0, n), values)] for name, values in columns.items()})
        else:
            self.predictive_times = list(predictive["time_s"])
            self.predictive.data = {"time_s": predictive["time_s"], **columns}
