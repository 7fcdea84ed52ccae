"""The onset probability P(t0 <= t | data) and P(reaction) of every exact posterior against
time, with the alert threshold, ts and the time the alert was raised.

Units: time in seconds, probabilities dimensionless.
"""

from __future__ import annotations

from typing import Any

from bokeh.models import ColumnDataSource, Range1d, Span

from .. import style
from ..figures import live_figure, live_legend
from ..state import HISTORY_CAPACITY
from .base import Panel, SessionView, TimeWindow, empty
from .fractions import gas_span, show_gas_time

#: Columns of the posterior history the page streams (a subset of the state's history).
HISTORY_COLUMNS = ["frame_index", "time_s", "onset_probability", "reaction_probability",
                   "t0_mean", "t0_q05", "t0_q50", "t0_q95"]


class OnsetPanel(Panel):
    """``onset_history`` (streamed, one row per exact posterior) and the plot ``plot_onset``."""

    def __init__(self, window: TimeWindow, alert_threshold: float) -> None:
        self.history = ColumnDataSource(empty(HISTORY_COLUMNS), name="onset_history")
        fig = live_figure("Onset probability P(t0 ≤ t | data)", style.TIME_AXIS_LABEL, "probability",
                          x_range=window.range, y_range=Range1d(-0.03, 1.05))
        fig.line("time_s", "onset_probability", source=self.history, color=style.COLOR_ONSET, line_width=2,
                 legend_label="onset probability")
        fig.line("time_s", "reaction_probability", source=self.history, color=style.COLOR_NULL, line_width=1.5,
                 line_dash="dotdash", legend_label="P(reaction)")
        fig.add_layout(Span(location=alert_threshold, dimension="width", line_color=style.COLOR_LEADING,
                            line_dash="dashed", line_width=1.5))
        self.span_ts = gas_span()
        fig.add_layout(self.span_ts)
        self.span_alert = Span(location=0, dimension="height", line_color=style.COLOR_LEADING, line_width=2,
                               visible=False, name="alert_time")
        fig.add_layout(self.span_alert)
        live_legend(fig)
        self.figure = fig
        self.alert_seen = False

    def roots(self) -> dict[str, Any]:
        return {"plot_onset": self.figure}

    def reset(self) -> None:
        self.history.data = empty(HISTORY_COLUMNS)
        self.span_alert.visible = False
        self.alert_seen = False

    def update(self, update: dict[str, Any], view: SessionView) -> None:
        if "start" not in update:
            return
        if "history" in update:
            self.history.stream({name: update["history"][name] for name in HISTORY_COLUMNS},
                                rollover=HISTORY_CAPACITY)
        show_gas_time(self.span_ts, update["start"])
        alert = update.get("alert")
        if alert is not None and not self.alert_seen:
            self.alert_seen = True
            if isinstance(alert.get("time_s"), (int, float)):
                self.span_alert.location = float(alert["time_s"])
                self.span_alert.visible = True
