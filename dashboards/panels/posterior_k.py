"""The rate constant k, per model only (each rate law has its own k; docs/design.md, section 4
"Observation model", "What is averaged"): the leading model's posterior density per unit
log10 k, and every model's median and 90 % interval.

Units: k in 1/s (log axes).
"""

from __future__ import annotations

from typing import Any

from bokeh.models import ColumnDataSource, FactorRange, Range1d

from .. import style
from ..figures import bar_masses, central_range, density_per_log10, hist_quads, live_figure
from .base import HistogramBars, Posterior, PosteriorPanel, empty, follow
from .posterior_t0 import BAR_COLUMNS

K_MODEL_COLUMNS = ["model", "q05", "q50", "q95", "color"]


class KPosteriorPanel(PosteriorPanel):
    """``k_histogram``: the leading model's k, density per unit log10 k (on a log axis the area
    of each bar is its probability); the plot ``plot_k_hist``."""

    def __init__(self) -> None:
        self.source = ColumnDataSource(empty(BAR_COLUMNS), name="k_histogram")
        self.bars = HistogramBars(self.source)
        fig = live_figure("Posterior of k of the leading model", "k (1/s)", "probability per unit log10 k",
                          x_range=Range1d(0.01, 100), x_axis_type="log")
        fig.quad(left="left", right="right", top="top", bottom="bottom", source=self.source,
                 fill_color=style.COLOR_LEADING, fill_alpha=0.3, line_color=style.COLOR_LEADING, line_alpha=0.6)
        self.figure = fig

    def roots(self) -> dict[str, Any]:
        return {"plot_k_hist": self.figure}

    def reset(self) -> None:
        self.bars.reset()

    def show(self, posterior: Posterior) -> None:
        hist = (posterior.get("histograms") or {}).get("k") or {}
        edges = hist.get("edges")
        if edges and hist.get("leading") is not None and min(edges) > 0:
            quads = hist_quads(edges, density_per_log10(edges, hist["leading"]))
            self.bars.show(edges, quads)
            shown = central_range(edges, bar_masses(quads, log_scale=True), log_scale=True)
            follow(self.figure.x_range, *(shown or (edges[0], edges[-1])), log_scale=True)


class KByModelPanel(PosteriorPanel):
    """``k_by_model``: every model's k median and 90 % interval, most probable at the top, the
    leading model red and stale ones pale; the plot ``plot_k_models``."""

    def __init__(self) -> None:
        self.source = ColumnDataSource(empty(K_MODEL_COLUMNS), name="k_by_model")
        fig = live_figure("k per model (median, 90 % interval)", "k (1/s)", "kinetic model",
                          y_range=FactorRange(), x_axis_type="log")
        fig.segment("q05", "model", "q95", "model", source=self.source, color="color", line_width=4)
        fig.scatter("q50", "model", source=self.source, color="color", size=8, line_color="white")
        fig.hover.tooltips = [("model", "@model"), ("k median", "@q50{0.0000} 1/s"),
                              ("90 %", "@q05{0.0000} – @q95{0.0000} 1/s")]
        self.figure = fig

    def roots(self) -> dict[str, Any]:
        return {"plot_k_models": self.figure}

    def show(self, posterior: Posterior) -> None:
        models = posterior.get("models") or {}
        leading = posterior.get("leading_model")
        rows = [(m, ((models[m].get("params") or {}).get("k") or {})) for m in style.by_probability(models)]
        rows = [(m, k) for m, k in rows if all(style.number(k.get(q)) and k[q] > 0 for q in ("q05", "q50", "q95"))]
        rows.reverse()  # most probable at the top
        factors = [m for m, _ in rows]
        if list(self.figure.y_range.factors) != factors:
            self.figure.y_range.factors = factors
        self.source.data = {
            "model": factors, "q05": [k["q05"] for _, k in rows], "q50": [k["q50"] for _, k in rows],
            "q95": [k["q95"] for _, k in rows],
            "color": [style.COLOR_STALE if models[m].get("stale")
                      else (style.COLOR_LEADING if m == leading else style.COLOR_OTHER) for m, _ in rows],
        }
