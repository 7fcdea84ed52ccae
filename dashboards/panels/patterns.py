"""The diffraction patterns: the latest one with the phase references and the fitted peak
windows, and all of them against time as a heat map (rows progressively decimated, see
:class:`dashboards.state.PatternHeatmap`). Both are context, not the posterior: they are
redrawn at most once a second (:data:`dashboards.cursor.CONTEXT_MIN_INTERVAL_S`).

Units: radial axis in degrees 2theta (or 1/nm for q patterns), time in seconds, intensity in
detector counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from bokeh.models import ColorBar, ColumnDataSource, LinearColorMapper, Range1d
from bokeh.palettes import Viridis256

from .. import style
from ..figures import live_figure, live_legend
from .base import Panel, SessionView

#: Peak windows are redrawn when the latest pattern's maximum moves by more than this fraction.
PEAK_TOP_TOLERANCE = 0.1
#: The colour range changes only when an end moves by more than this fraction of its width.
COLOR_RANGE_TOLERANCE = 0.1


def _curve(name: str) -> ColumnDataSource:
    return ColumnDataSource({"radial": [], "intensity": []}, name=name)


class PatternPanel(Panel):
    """``pattern_latest``, ``reference_a`` (first frame), ``reference_b`` (latest frame with
    alpha >= 0.9), ``peak_windows``; the plot ``plot_pattern``."""

    def __init__(self) -> None:
        self.latest, self.reference_a, self.reference_b = (_curve("pattern_latest"), _curve("reference_a"),
                                                           _curve("reference_b"))
        self.peaks = ColumnDataSource({"left": [], "right": [], "bottom": [], "top": [], "color": [], "phase": []},
                                      name="peak_windows")
        fig = live_figure("Latest pattern, phase references and fitted peak windows", style.radial_label("2th_deg"),
                          "intensity (counts)", height=320)
        fig.quad(left="left", right="right", bottom="bottom", top="top", color="color", source=self.peaks,
                 fill_alpha=0.15, line_alpha=0.4, legend_field="phase")
        fig.line("radial", "intensity", source=self.reference_a, color=style.COLOR_PHASE["A"], alpha=0.6,
                 line_dash="dashed", legend_label="phase A reference (first frame)")
        fig.line("radial", "intensity", source=self.reference_b, color=style.COLOR_PHASE["B"], alpha=0.6,
                 line_dash="dashed", legend_label="phase B reference (α ≥ 0.9)")
        fig.line("radial", "intensity", source=self.latest, color=style.COLOR_DATA, line_width=1.2,
                 legend_label="latest frame")
        live_legend(fig, "top_right")
        self.figure = fig

    def roots(self) -> dict[str, Any]:
        return {"plot_pattern": self.figure}

    def reset(self) -> None:
        for source in (self.latest, self.reference_a, self.reference_b):
            source.data = {"radial": [], "intensity": []}

    def update(self, update: dict[str, Any], view: SessionView) -> None:
        if "start" not in update or "pattern" not in update:
            return
        unit = update.get("unit", "2th_deg")
        self.figure.xaxis.axis_label = style.radial_label(unit)
        for source, key in ((self.latest, "pattern"), (self.reference_a, "reference_a"),
                            (self.reference_b, "reference_b")):
            entry = update.get(key)
            if entry is not None:
                source.data = {"radial": entry["radial"], "intensity": entry["intensity"]}
        pattern = update.get("pattern")
        peaks = [p for p in update.get("peaks") or []
                 if all(isinstance(p.get(k), (int, float)) for k in ("lo_deg", "hi_deg"))]
        if pattern is not None and peaks and unit == "2th_deg":
            self._show_peaks(peaks, float(np.nanmax(pattern["intensity"])) * 1.05)

    def _show_peaks(self, peaks: list[dict[str, Any]], top: float) -> None:
        """The fitted windows (degrees 2theta) as bands up to ``top`` (counts): replaced when they
        move, their height patched when the pattern's maximum changes noticeably."""
        data = {
            "left": [p["lo_deg"] for p in peaks], "right": [p["hi_deg"] for p in peaks],
            "bottom": [0.0] * len(peaks), "top": [top] * len(peaks),
            "color": [style.COLOR_PHASE.get(str(p.get("phase")), style.COLOR_PHASE_OTHER) for p in peaks],
            "phase": [f"phase {p.get('phase')} peak window" for p in peaks],
        }
        old = self.peaks.data
        if list(old.get("left", [])) != data["left"] or list(old.get("right", [])) != data["right"]:
            self.peaks.data = data
        elif old.get("top") and abs(old["top"][0] - top) > PEAK_TOP_TOLERANCE * top:
            self.peaks.patch({"top": [(slice(0, len(peaks)), data["top"])]})


class HeatmapPanel(Panel):
    """``heatmap``: a fixed-size image (radial x time rows) whose new rows are patched in; the
    plot ``plot_heatmap``."""

    def __init__(self) -> None:
        self.color_mapper = LinearColorMapper(palette=Viridis256, nan_color=(0, 0, 0, 0))
        self.source = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []}, name="heatmap")
        fig = live_figure("Patterns against time", style.radial_label("2th_deg"), style.TIME_AXIS_LABEL, height=320,
                          y_range=Range1d(0, 1))
        fig.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.source, color_mapper=self.color_mapper)
        fig.add_layout(ColorBar(color_mapper=self.color_mapper, title="counts", width=10), "right")
        fig.hover.tooltips = [("2θ", "$x{0.000}"), ("t", "$y{0.00} s"), ("counts", "@image{0}")]
        self.figure = fig
        #: (time of the first row's lower edge, time between rows), seconds
        self.geometry: tuple[float, float] | None = None

    def roots(self) -> dict[str, Any]:
        return {"plot_heatmap": self.figure}

    def reset(self) -> None:
        self.source.data = {"image": [], "x": [], "y": [], "dw": [], "dh": []}
        self.geometry = None

    def update(self, update: dict[str, Any], view: SessionView) -> None:
        if update.get("heatmap_full") is not None:
            self._show_all(update["heatmap_full"], update.get("start") or {})
        elif update.get("heatmap_rows") is not None:
            self._add_rows(*update["heatmap_rows"])
        if "start" in update and "pattern" in update:
            self.figure.xaxis.axis_label = style.radial_label(update.get("unit", "2th_deg"))

    def _show_all(self, snap: dict[str, Any], start: dict[str, Any]) -> None:
        """The whole heat map (first rows, or after a decimation): a fixed-size image of
        ``rows`` rows ``row_step`` seconds apart; unfilled rows are transparent (NaN)."""
        image = snap["image_full"]
        stride = snap["stride"]
        step = snap["row_step"]
        frame_time = style.number(start.get("frame_time_s"))
        if snap["n_rows"] < 2 and frame_time:
            step = frame_time * stride
        y0 = snap["t_min"] if snap["n_rows"] > 1 else snap["t_min"] + 0.5 - step / 2
        self.geometry = (y0, step)
        self.source.data = {"image": [image], "x": [snap["radial_min"]], "y": [y0],
                            "dw": [snap["radial_span"]], "dh": [step * image.shape[0]]}
        self.figure.y_range.update(start=y0, end=y0 + step * snap["n_rows"])
        self._update_color_range(image[: snap["n_rows"]])
        self.figure.title.text = ("Patterns against time" if stride == 1
                                  else f"Patterns against time (each row averages {stride} frames)")

    def _add_rows(self, first: int, rows: np.ndarray) -> None:
        """Patch the rows ``first``.. of the image in place (only they travel to the browser)."""
        if not len(self.source.data.get("image", [])) or self.geometry is None or rows.shape[0] == 0:
            return
        self.source.patch({"image": [((0, slice(first, first + rows.shape[0]), slice(None)), rows.ravel())]})
        y0, step = self.geometry
        self.figure.y_range.end = y0 + step * (first + rows.shape[0])
        self._update_color_range(rows)

    def _update_color_range(self, image: np.ndarray) -> None:
        """Colours span the 1st to 99.8th percentile of the counts shown."""
        finite = image[np.isfinite(image)]
        if not finite.size:
            return
        low, high = (float(v) for v in np.percentile(finite, [1.0, 99.8]))
        high = max(high, low + 1e-9)
        old_low, old_high = self.color_mapper.low, self.color_mapper.high
        if old_low is None or old_high is None or abs(high - old_high) > COLOR_RANGE_TOLERANCE * (old_high - old_low) \
                or abs(low - old_low) > COLOR_RANGE_TOLERANCE * (old_high - old_low):
            self.color_mapper.update(low=low, high=high)
