"""What every panel of the live page shares: the update it receives, the view it presents, and
the helpers for incremental updates of its ColumnDataSources.

A panel owns its Bokeh models (ColumnDataSources, figures, texts) and draws the part of an
*update* that concerns it. An update is the dict a :class:`dashboards.cursor.SeriesCursor`
copies from the shared state under its lock: only what changed since the previous refresh
(keys ``start``, ``unit``, ``ended``, ``fractions``, ``history``, ``t0_history``,
``k_history``, ``model_history``, ``pattern``, ``reference_a``, ``reference_b``, ``peaks``,
``heatmap_full``, ``heatmap_rows``, ``now``, ``alert``, ``frames_seen``, ``frame_rate_hz``,
``ess_min``, ``status``; see that class). Without ``start`` the series has not changed and only
the heat map and the health counters may be new.

Units: time in seconds, k in 1/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from bokeh.models import ColumnDataSource, Range1d

from .. import style
from ..state import HISTORY_CAPACITY

Posterior = dict[str, Any]


@dataclass
class SessionView:
    """What a session presents of its series, kept across refreshes: the posterior on show and
    the stale estimate it stands in for (docs/design.md, section 6 "Live: estimates, exact
    posteriors, staleness, alerts"), and the series' end message once it has ended."""

    series_id: str | None = None
    posterior: Posterior | None = None
    stale: Posterior | None = None
    ended: dict[str, Any] | None = None

    def take(self, update: dict[str, Any]) -> None:
        """Keep what ``update`` changes: the end of the series and the posterior on show."""
        if "start" in update:
            self.ended = update.get("ended")
        if "now" in update:
            self.posterior, self.stale = update["now"]


class Panel:
    """One panel of the live page: its Bokeh models and their update."""

    def roots(self) -> dict[str, Any]:
        """The page roots of this panel by name (placed by the page template)."""
        return {}

    def reset(self) -> None:
        """Forget the series shown so far (the session switched to another series)."""

    def update(self, update: dict[str, Any], view: SessionView) -> None:
        """Draw what ``update`` changes for this panel."""


class PosteriorPanel(Panel):
    """A panel that draws only the posterior on show, whenever it changes."""

    def update(self, update: dict[str, Any], view: SessionView) -> None:
        posterior = new_posterior(update)
        if posterior is not None:
            self.show(posterior)

    def show(self, posterior: Posterior) -> None:
        """Draw ``posterior`` (an exact posterior or an estimate; the fields of the message)."""


def new_posterior(update: dict[str, Any]) -> Posterior | None:
    """The posterior on show when ``update`` changes it; None when unchanged or none to show."""
    return update["now"][0] if "now" in update else None


def empty(columns: list[str]) -> dict[str, list]:
    return {name: [] for name in columns}


def frames_behind(posterior: Posterior | None) -> int | None:
    """How many frames the exact sampler lags, as the posterior's diagnostics state it."""
    value = ((posterior or {}).get("diagnostics") or {}).get("frames_behind")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _lag(posterior: Posterior | None) -> str:
    behind = frames_behind(posterior)
    return f", exact sampler {behind} frame{'s' if behind != 1 else ''} behind" if behind else ""


def describe(posterior: Posterior | None, stale: Posterior | None) -> str:
    """What the "now" panels present: the kind of posterior, its frame and the sampler's lag."""
    if stale is not None:
        if posterior is None:
            return (f"estimate of frame {stale.get('frame_index')} STALE (its particles no longer represent "
                    f"the posterior{_lag(stale)}); no exact posterior yet")
        return (f"exact posterior of frame {posterior.get('frame_index')}; estimate of frame "
                f"{stale.get('frame_index')} STALE{_lag(stale)}")
    if posterior is None:
        return "no posterior yet"
    if posterior.get("estimate"):
        return f"estimate of frame {posterior.get('frame_index')}{_lag(posterior)}"
    return f"exact posterior of frame {posterior.get('frame_index')}"


def stream_per_model_columns(source: ColumnDataSource, rows: dict[str, np.ndarray]) -> None:
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


def follow(axis_range: Range1d, low: float, high: float, log_scale: bool) -> None:
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


class HistogramBars:
    """The bars of one histogram source, patched when the bin edges are those of last time
    (only the heights travel to the browser) and replaced otherwise."""

    def __init__(self, source: ColumnDataSource) -> None:
        self.source = source
        self.edges: list[float] | None = None

    def reset(self) -> None:
        self.edges = None

    def show(self, edges: list[float], quads: dict[str, np.ndarray]) -> None:
        if self.edges == edges and len(self.source.data.get("top", [])) == len(quads["top"]):
            self.source.patch({"top": [(slice(0, len(quads["top"])), quads["top"])]})
        else:
            self.edges = list(edges)
            self.source.data = quads


class TimeWindow:
    """The one time axis (s) of every plot against time, fixed to the series window (a range
    that follows the data would repaint all of them on every frame)."""

    def __init__(self) -> None:
        self.range = Range1d(-0.5, 60.0)

    def fit(self, start: dict[str, Any], latest_s: float | None) -> None:
        """The series window (n_frames x frame_time) when the start message gives it; otherwise
        a window that doubles whenever a frame falls beyond it (so it rarely changes)."""
        n_frames, frame_time = style.number(start.get("n_frames")), style.number(start.get("frame_time_s"))
        if n_frames and frame_time and n_frames > 0 and frame_time > 0:
            end = n_frames * frame_time
        else:
            end = self.range.end if self.range.end and self.range.end > 1.0 else 60.0
            while latest_s is not None and latest_s > end:
                end *= 2.0
        pad = 0.02 * end
        if (self.range.start, self.range.end) != (-pad, end + pad):
            self.range.update(start=-pad, end=end + pad)
