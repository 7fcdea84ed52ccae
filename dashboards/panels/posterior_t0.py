"""The posterior of the onset time t0: the model-averaged density (t0 means the same in every
model; docs/design.md, section 4 "Observation model", "What is averaged"), the leading
model's, and the mean and 90 % interval (also drawn on alpha(t)).

Units: t0 in seconds, densities per second.
"""

from __future__ import annotations

from typing import Any

from bokeh.models import ColumnDataSource, Range1d

from .. import style
from ..figures import bar_masses, central_range, hist_quads, live_figure, live_legend
from .base import HistogramBars, Posterior, PosteriorPanel, empty, follow

BAR_COLUMNS = ["left", "right", "top", "bottom"]


class T0PosteriorPanel(PosteriorPanel):
    """``t0_histogram`` (all models), ``t0_histogram_leading`` and ``t0_marks`` (mean, q05,
    q95 of t0 over all models); the plot ``plot_t0_hist``."""

    def __init__(self) -> None:
        averaged = ColumnDataSource(empty(BAR_COLUMNS), name="t0_histogram")
        leading = ColumnDataSource(empty(BAR_COLUMNS), name="t0_histogram_leading")
        self.averaged, self.leading = HistogramBars(averaged), HistogramBars(leading)
        self.marks = ColumnDataSource({"mean": [], "q05": [], "q95": []}, name="t0_marks")
        fig = live_figure("Posterior of onset time t0 (dashed: mean, band: 90 %)", "t0 (s)",
                          "probability density (1/s)", x_range=Range1d(0, 1))
        fig.quad(left="left", right="right", top="top", bottom="bottom", source=averaged,
                 fill_color=style.COLOR_AVERAGED, fill_alpha=0.35, line_color=style.COLOR_AVERAGED, line_alpha=0.5,
                 legend_label="all models")
        fig.quad(left="left", right="right", top="top", bottom="bottom", source=leading, fill_alpha=0,
                 line_color=style.COLOR_LEADING, line_width=1.5, legend_label="leading model")
        fig.vstrip("q05", "q95", source=self.marks, fill_color=style.COLOR_AVERAGED, fill_alpha=0.12, line_alpha=0)
        fig.vspan("mean", source=self.marks, line_color=style.COLOR_AVERAGED, line_width=2, line_dash="dashed")
        live_legend(fig, "top_right")
        self.figure = fig

    def roots(self) -> dict[str, Any]:
        return {"plot_t0_hist": self.figure}

    def reset(self) -> None:
        self.averaged.reset()
        self.leading.reset()
        self.marks.data = {"mean": [], "q05": [], "q95": []}

    def show(self, posterior: Posterior) -> None:
        hist = (posterior.get("histograms") or {}).get("t0") or {}
        edges = hist.get("edges")
        if edges and hist.get("model_averaged") is not None:
            quads = hist_quads(edges, hist["model_averaged"])
            self.averaged.show(edges, quads)
            shown = central_range(edges, bar_masses(quads, log_scale=False), log_scale=False)
            follow(self.figure.x_range, *(shown or (edges[0], edges[-1])), log_scale=False)
        if edges and hist.get("leading") is not None:
            self.leading.show(edges, hist_quads(edges, hist["leading"]))
        t0 = (posterior.get("model_averaged") or {}).get("t0") or {}
        if all(isinstance(t0.get(k), (int, float)) for k in ("mean", "q05", "q95")):
            self.marks.data = {"mean": [t0["mean"]], "q05": [t0["q05"]], "q95": [t0["q95"]]}
