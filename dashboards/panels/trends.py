"""The posterior against time: t0 over all models, k of the model leading now, and the
probability of every hypothesis. These trends are streamed at most once a second (see
:data:`dashboards.cursor.TRENDS_MIN_INTERVAL_S`); k is never averaged across rate laws
(docs/design.md, section 4 "Observation model", "What is averaged").

Units: time and t0 in seconds, k in 1/s (log axis), probabilities dimensionless.
"""

from __future__ import annotations

from typing import Any

from bokeh.models import ColumnDataSource, Legend, LegendItem, Range1d
from bokeh.palettes import Category10_10, Category20_20

from .. import style
from ..figures import live_figure
from ..state import HISTORY_CAPACITY, NO_REACTION
from .base import Panel, SessionView, TimeWindow, empty, new_posterior, stream_per_model_columns
from .onset import HISTORY_COLUMNS

#: Lines ready for the model-probability history: every rate law of the inference stage and "no reaction".
MODEL_LINE_SLOTS = 18


class T0HistoryPanel(Panel):
    """``t0_history``: the model-averaged median and 90 % band of t0 (the same quantity in every model)."""

    def __init__(self, window: TimeWindow) -> None:
        self.source = ColumnDataSource(empty(HISTORY_COLUMNS), name="t0_history")
        fig = live_figure("Onset time t0 over time (all models: median, 90 % band)", style.TIME_AXIS_LABEL,
                          "t0 (s)", x_range=window.range)
        fig.varea("time_s", "t0_q05", "t0_q95", source=self.source, fill_color=style.COLOR_AVERAGED, fill_alpha=0.25)
        fig.line("time_s", "t0_q50", source=self.source, color=style.COLOR_AVERAGED, line_width=2)
        self.figure = fig

    def roots(self) -> dict[str, Any]:
        return {"plot_t0_time": self.figure}

    def reset(self) -> None:
        self.source.data = empty(HISTORY_COLUMNS)

    def update(self, update: dict[str, Any], view: SessionView) -> None:
        if "t0_history" in update:
            self.source.stream({name: update["t0_history"][name] for name in HISTORY_COLUMNS},
                               rollover=HISTORY_CAPACITY)


class KHistoryPanel(Panel):
    """``k_history`` (columns ``k_q05_<model>``, ``k_q50_<model>``, ``k_q95_<model>`` per model):
    the band and line show one model's k at a time, the model leading now."""

    def __init__(self, window: TimeWindow) -> None:
        self.source = ColumnDataSource({"frame_index": [], "time_s": []}, name="k_history")
        fig = live_figure("Rate constant k over time", style.TIME_AXIS_LABEL, "k (1/s)",
                          x_range=window.range, y_axis_type="log")
        self.band = fig.varea("time_s", "time_s", "time_s", source=self.source, fill_color=style.COLOR_LEADING,
                              fill_alpha=0.2, visible=False)
        self.line = fig.line("time_s", "time_s", source=self.source, color=style.COLOR_LEADING, line_width=2,
                             visible=False)
        self.figure = fig
        self.model: str | None = None

    def roots(self) -> dict[str, Any]:
        return {"plot_k_time": self.figure}

    def reset(self) -> None:
        self.source.data = {"frame_index": [], "time_s": []}
        self.band.visible = self.line.visible = False
        self.model = None

    def update(self, update: dict[str, Any], view: SessionView) -> None:
        if "k_history" in update:
            stream_per_model_columns(self.source, update["k_history"])
        posterior = new_posterior(update)
        if posterior is not None:
            self._show_model(posterior.get("leading_model"))

    def _show_model(self, model: str | None) -> None:
        """Point the band and line at ``model``'s columns (one rate law at a time)."""
        if model is None or f"k_q50_{model}" not in self.source.data:
            return
        if model != self.model:
            self.model = model
            self.band.glyph.update(y1=f"k_q05_{model}", y2=f"k_q95_{model}")
            self.line.glyph.y = f"k_q50_{model}"
            self.figure.title.text = f"k of {model} (leading now) over time: median, 90 % band"
        self.band.visible = self.line.visible = True


class ModelHistoryPanel(Panel):
    """``model_history``: one line per hypothesis. The lines exist from the start (hidden):
    creating renderers while a series runs costs a model-graph rebuild on the server and new
    views in the browser just when the first posteriors arrive."""

    def __init__(self, window: TimeWindow) -> None:
        self.source = ColumnDataSource({"time_s": []}, name="model_history")
        fig = live_figure("Model probabilities over time", style.TIME_AXIS_LABEL, "posterior probability",
                          x_range=window.range, y_range=Range1d(-0.03, 1.05))
        self.legend = Legend(items=[], label_text_font_size=style.LEGEND_FONT_SIZE, spacing=0, padding=2,
                             click_policy="hide")
        fig.add_layout(self.legend, "right")
        self.slots = [fig.line("time_s", "time_s", source=self.source, line_width=2, color=Category20_20[i % 20],
                               visible=False) for i in range(MODEL_LINE_SLOTS)]
        self.figure = fig
        self.lines: dict[str, Any] = {}

    def roots(self) -> dict[str, Any]:
        return {"plot_model_history": self.figure}

    def reset(self) -> None:
        for line in self.lines.values():
            line.visible = False
        self.lines = {}
        self.legend.items = []
        self.source.data = {"time_s": []}

    def update(self, update: dict[str, Any], view: SessionView) -> None:
        if "model_history" not in update:
            return
        stream_per_model_columns(self.source, update["model_history"])
        names = [name for name in self.source.data if name != "time_s"]
        if all(name in self.lines for name in names):
            return
        palette = Category20_20 if len(names) > 10 else Category10_10
        free = [line for line in self.slots if line not in self.lines.values()]
        for i, name in enumerate(names):
            if name in self.lines or not free:
                continue  # (more hypotheses than slots: the extra ones are listed in the table only)
            line = free.pop(0)
            line.glyph.update(y=name, line_color=style.COLOR_NULL if name == NO_REACTION else palette[i % len(palette)],
                              line_dash="dotdash" if name == NO_REACTION else "solid")
            line.visible = True
            self.lines[name] = line
        self.legend.items = [LegendItem(label=name, renderers=[line]) for name, line in self.lines.items()]
