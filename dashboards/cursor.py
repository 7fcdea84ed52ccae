"""How far one browser session has read a series: what its next refresh must send.

:meth:`SeriesCursor.collect` runs under the state lock and copies only what changed since the
session's previous refresh; the panels (:mod:`dashboards.panels`) then draw that copy outside
the lock. Per-frame quantities are read as increments of the state's ring buffers (streamed by
the panels with the same rollover); the context (latest pattern, heat map) and the trends
against time (t0, k and model probabilities) are sent at most once a second, the posterior of
the newest frame at every refresh.

Units: times in seconds (``time.monotonic`` for the throttles).
"""

from __future__ import annotations

import math
import time
from typing import Any

from .state import SeriesState

#: The context panels (latest pattern, heat map) are redrawn at most this often (seconds): they
#: are the largest payloads and are not the posterior; the posterior panels follow max_refresh_hz.
CONTEXT_MIN_INTERVAL_S = 1.0
#: The trends over time (t0, k and model probabilities against time) likewise; the posterior of
#: the newest frame (text, bars, alpha(t), onset probability, histograms) is never held back.
TRENDS_MIN_INTERVAL_S = 1.0


class SeriesCursor:
    """Counters of what a session has taken from one series (a new cursor for another series)."""

    def __init__(self) -> None:
        self.n_fractions = 0
        self.n_history = 0
        self.n_k_history = 0
        self.n_t0_history = 0
        self.n_model_history = 0
        self.trends_sent_at = -math.inf
        self.pattern_version = -1
        self.reference_frames: tuple[Any, Any] = (None, None)
        self.posterior_version = -1
        self.heatmap_version = -1
        self.context_sent_at = -math.inf
        self.heat_rows_sent = 0
        self.heat_stride = 0
        self.series_version = -1

    def collect(self, series: SeriesState) -> dict[str, Any]:
        """Copy (under the state lock) what changed since the last refresh of this session.

        Always: ``series_id``, ``frame_rate_hz``, ``ess_min``, ``status``; the heat map when due
        (``heatmap_full``: the whole image, or ``heatmap_rows``: (first row, new rows)). When the
        series changed: ``start``, ``unit``, ``ended``, ``alert``, ``frames_seen`` and the
        increments ``fractions``, ``history`` (and, when due, ``t0_history``, ``k_history``,
        ``model_history``: column -> array), the ``pattern`` with ``peaks`` (and the references
        when they changed), ``now``: (posterior on show, the stale estimate it stands in for)."""
        update: dict[str, Any] = {"series_id": series.series_id}
        now = time.monotonic()
        context_due = self._context_due(series, now)
        if context_due:
            self._collect_heatmap(series, update)
        update["frame_rate_hz"] = series.frame_rate_hz()
        update["ess_min"] = series.history.last("ess_min")
        update["status"] = {k: dict(v) for k, v in series.status.items()}
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
            self._collect_pattern(series, update)
        if series.posterior_version != self.posterior_version:
            self.posterior_version = series.posterior_version
            update["now"] = series.now_posterior()
        update["alert"] = series.alert
        update["frames_seen"] = series.fractions.total
        return update

    def _context_due(self, series: SeriesState, now: float) -> bool:
        """The pattern or heat map changed and the context was last sent long enough ago (or the
        series has ended: its final context is sent at once)."""
        heatmap = series.heatmap
        if now - self.context_sent_at < CONTEXT_MIN_INTERVAL_S and series.ended is None:
            return False
        if (heatmap is not None and heatmap.version != self.heatmap_version) \
                or series.pattern_version != self.pattern_version:
            self.context_sent_at = now
            return True
        return False

    def _collect_heatmap(self, series: SeriesState, update: dict[str, Any]) -> None:
        heatmap = series.heatmap
        if heatmap is None or heatmap.version == self.heatmap_version:
            return
        self.heatmap_version = heatmap.version
        if heatmap.stride != self.heat_stride or heatmap.n_rows < self.heat_rows_sent or self.heat_rows_sent == 0:
            full = heatmap.snapshot()
            full["image_full"] = heatmap.image.copy()
            full["row_step"] = heatmap.row_step()
            full["n_rows"] = heatmap.n_rows
            update["heatmap_full"] = full
        else:
            update["heatmap_rows"] = (self.heat_rows_sent, heatmap.image[self.heat_rows_sent: heatmap.n_rows].copy())
        self.heat_stride, self.heat_rows_sent = heatmap.stride, heatmap.n_rows

    def _collect_pattern(self, series: SeriesState, update: dict[str, Any]) -> None:
        self.pattern_version = series.pattern_version
        update["pattern"] = series.latest_pattern
        references = tuple((r or {}).get("frame_index") for r in (series.reference_a, series.reference_b))
        if references != self.reference_frames:
            self.reference_frames = references
            update["reference_a"] = series.reference_a
            update["reference_b"] = series.reference_b
        update["peaks"] = list(series.latest_peaks)
