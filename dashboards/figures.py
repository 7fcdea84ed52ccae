"""Bokeh figures and histogram geometry shared by the live page and the report.

Units: histogram edges in the quantity's unit (t0 in s, k in 1/s); a density is per unit of that
quantity, or per unit log10 k on a log axis (:func:`density_per_log10`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from bokeh.plotting import figure

from . import style


def _label(fig, x_label: str, y_label: str, title_font_size: str):
    fig.xaxis.axis_label = x_label
    fig.yaxis.axis_label = y_label
    fig.title.text_font_size = title_font_size
    fig.axis.axis_label_text_font_style = "normal"
    return fig


def live_figure(title: str, x_label: str, y_label: str, height: int = style.PLOT_HEIGHT, **kwargs: Any):
    """A plot of the live page: as wide as its grid cell (from ``MIN_PLOT_WIDTH`` px), with hover."""
    fig = figure(title=title, height=height, sizing_mode="stretch_width", min_width=style.MIN_PLOT_WIDTH,
                 tools="pan,wheel_zoom,box_zoom,reset,save,hover", toolbar_location="right", **kwargs)
    _label(fig, x_label, y_label, style.LIVE_TITLE_FONT_SIZE)
    fig.axis.axis_label_text_font_size = style.AXIS_LABEL_FONT_SIZE
    fig.min_border_left = 50
    return fig


def report_figure(title: str, x_label: str, y_label: str, width: int = style.REPORT_PLOT_WIDTH,
                  height: int = style.REPORT_PLOT_HEIGHT, **kwargs: Any):
    """A plot of the static report: fixed size, no hover."""
    fig = figure(title=title, width=width, height=height, tools="pan,wheel_zoom,box_zoom,reset,save",
                 toolbar_location="right", **kwargs)
    return _label(fig, x_label, y_label, style.REPORT_TITLE_FONT_SIZE)


def live_legend(fig, location: str = "top_left") -> None:
    """A small legend whose entries hide their lines when clicked."""
    fig.legend.location = location
    fig.legend.click_policy = "hide"
    fig.legend.label_text_font_size = style.LEGEND_FONT_SIZE
    fig.legend.background_fill_alpha = 0.7
    fig.legend.spacing = 0
    fig.legend.padding = 3


def hist_quads(edges: list[float], density: list[float]) -> dict[str, np.ndarray]:
    """The bars (left, right, top, bottom) of a histogram of ``density`` on ``edges``."""
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


def bar_masses(quads: dict[str, np.ndarray], log_scale: bool) -> np.ndarray:
    """The mass of each bar of :func:`hist_quads`: height times width, the width in log10 units
    on a log axis (where the height is a density per log10 unit)."""
    widths = np.log10(quads["right"] / quads["left"]) if log_scale else quads["right"] - quads["left"]
    return quads["top"] * widths


def central_range(edges: np.ndarray, masses: np.ndarray, log_scale: bool,
                  mass: float = 0.999) -> tuple[float, float] | None:
    """x range holding the central ``mass`` of a histogram whose bins on ``edges`` hold
    ``masses`` (any normalisation), padded by 30 % of its width (by the factor (hi/lo)^0.3 on a
    log axis); None when the histogram holds no mass."""
    edges = np.asarray(edges, dtype=float)
    weights = np.nan_to_num(np.asarray(masses, dtype=float))
    total = weights.sum()
    if not total > 0:
        return None
    cdf = np.cumsum(weights) / total
    n = weights.size
    lo = float(edges[min(np.searchsorted(cdf, (1 - mass) / 2), n - 1)])
    hi = float(edges[min(np.searchsorted(cdf, 1 - (1 - mass) / 2), n - 1) + 1])
    if log_scale and lo > 0:
        pad = (hi / lo) ** 0.3
        return lo / pad, hi * pad
    pad = 0.3 * (hi - lo)
    return lo - pad, hi + pad
