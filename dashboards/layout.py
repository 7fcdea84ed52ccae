"""One browser session of the live dashboard: its panels, their places on the page and their
periodic refresh from the shared state.

A :class:`DashboardSession` composes the panels of :mod:`dashboards.panels` (one class per
panel, each owning its Bokeh models and their update). Its ``refresh`` callback (run by the
Bokeh server at ``max_refresh_hz``) copies, under the state lock, only what changed since the
previous refresh (:class:`dashboards.cursor.SeriesCursor`), then lets every panel update its
models incrementally, so the browser redraws only what changed:

* per-frame quantities are *streamed* (``ColumnDataSource.stream`` with the state's ring
  capacity as rollover): alpha(t), the posterior history, the model-probability history;
* fixed-grid quantities are *patched*: histogram heights on unchanged bin edges, the new rows of
  the heat map (decimated rows, see :class:`dashboards.state.PatternHeatmap`), predictive bands
  on an unchanged time grid;
* the latest pattern is replaced; the phase references only when they change.

With frames at 100 Hz a browser still receives at most ``max_refresh_hz`` updates per second.

What the page claims (docs/design.md, section 4 "Observation model" and section 6 "Live:
estimates, exact posteriors, staleness, alerts"):

* k is shown per model, never averaged across rate laws: the header gives the leading model's
  k, the k history shows the leading model's median and 90 % band on a log axis, the k panel
  each model's 90 % interval and the leading model's density per unit log10 k. Only t0 (the
  same quantity in every model) is model-averaged.
* An estimate marked ``stale`` (collapsed ESS) is not shown as the posterior: the "now" panels
  show the newest exact posterior, labelled "exact posterior of frame N; estimate of frame M
  stale", and say how many frames the exact sampler lags.
* "No reaction" competes with the kinetic models when the payload carries ``null_model``;
  P(reaction) is shown beside the model probabilities and their log-evidence standard errors.
* The alert banner keeps the alert as it was raised and shows the state now, each labelled.

Models that tests and users look up by name (``Bokeh.documents[0].get_model_by_name``):
``series_select``, ``header``, ``now``, ``alert_banner`` (a Div with css class
``beamkin-alert``), ``health``, ``alpha_points`` (ColumnDataSource of alpha(t)),
``pattern_latest``, ``heatmap``, ``onset_history``, ``k_history``, ``t0_histogram``,
``k_histogram`` (leading model, density per log10 k), ``k_by_model``, ``model_probabilities``
(with the ``frame_index`` and ``kind`` of the posterior shown), ``model_table``, ``predictive``.

Units: time in seconds, k in 1/s, radial axis in degrees 2theta (or nm^-1 for q patterns).
"""

from __future__ import annotations

import logging

from bokeh.document import Document

from .cursor import SeriesCursor
from .panels.banner import BannerPanel
from .panels.base import Panel, SessionView, TimeWindow
from .panels.fractions import FractionsPanel
from .panels.header import FOLLOW_LATEST, HeaderPanel
from .panels.health import HealthPanel
from .panels.models import ModelsPanel
from .panels.now import NowPanel
from .panels.onset import OnsetPanel
from .panels.patterns import HeatmapPanel, PatternPanel
from .panels.posterior_k import KByModelPanel, KPosteriorPanel
from .panels.posterior_t0 import T0PosteriorPanel
from .panels.trends import KHistoryPanel, ModelHistoryPanel, T0HistoryPanel
from .state import DashboardState

__all__ = ["FOLLOW_LATEST", "PAGE_TEMPLATE", "DashboardSession"]

log = logging.getLogger(__name__)

#: The page: one root per panel (BokehJS recomputes the layout of a whole root, and repaints
#: every plot in it, when a Div's text changes or an axis or title changes size), placed by a
#: CSS grid: texts beside each other above the plots, health below; widths follow the window
#: from 1000 px.
PAGE_TEMPLATE = """{% block contents %}
<style>
  body { margin: 6px 10px; font-family: sans-serif; }
  .beamkin-texts { display: grid; grid-template-columns: minmax(0, 1fr) minmax(300px, 34%); gap: 8px;
                   align-items: start; margin: 4px 0; }
  .beamkin-plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 6px; }
  .beamkin-plots > .wide { grid-column: 1 / -1; }
  .beamkin-plots > div { min-width: 0; }
</style>
{{ embed(roots.beamkin_header) }}
{{ embed(roots.beamkin_banner) }}
<div class="beamkin-texts"><div>{{ embed(roots.beamkin_now) }}</div><div>{{ embed(roots.beamkin_models) }}</div></div>
<div class="beamkin-plots">
  <div class="wide">{{ embed(roots.plot_alpha) }}</div>
  <div>{{ embed(roots.plot_models) }}</div><div>{{ embed(roots.plot_onset) }}</div>
  <div>{{ embed(roots.plot_t0_time) }}</div><div>{{ embed(roots.plot_k_time) }}</div>
  <div>{{ embed(roots.plot_k_models) }}</div><div>{{ embed(roots.plot_k_hist) }}</div>
  <div>{{ embed(roots.plot_t0_hist) }}</div><div>{{ embed(roots.plot_model_history) }}</div>
  <div class="wide">{{ embed(roots.plot_pattern) }}</div>
  <div class="wide">{{ embed(roots.plot_heatmap) }}</div>
</div>
{{ embed(roots.beamkin_health) }}
{% endblock %}"""
#: The roots in the order they are added to the document.
ROOT_ORDER = ("beamkin_header", "beamkin_banner", "beamkin_now", "beamkin_models", "beamkin_health",
              "plot_alpha", "plot_models", "plot_onset", "plot_t0_time", "plot_k_time", "plot_k_models",
              "plot_k_hist", "plot_t0_hist", "plot_pattern", "plot_heatmap", "plot_model_history")


class DashboardSession:
    """The panels of one browser session and their refresh from a :class:`DashboardState`."""

    def __init__(self, doc: Document, state: DashboardState, alert_threshold: float = 0.99,
                 max_refresh_hz: float = 5.0) -> None:
        if not 0.0 < alert_threshold <= 1.0:
            raise ValueError(f"alert_threshold must be in (0, 1], got {alert_threshold}")
        if not max_refresh_hz > 0:
            raise ValueError(f"max_refresh_hz must be positive, got {max_refresh_hz}")
        self.doc = doc
        self.state = state
        self.view = SessionView()
        self.cursor = SeriesCursor()
        window = TimeWindow()
        self.header = HeaderPanel(on_select=self.refresh)
        self.banner = BannerPanel()
        self.now = NowPanel()
        self.health = HealthPanel()
        self.posterior_t0 = T0PosteriorPanel()
        self.fractions = FractionsPanel(window, self.posterior_t0.marks)
        self.models = ModelsPanel()
        self.onset = OnsetPanel(window, alert_threshold)
        self.t0_history = T0HistoryPanel(window)
        self.k_history = KHistoryPanel(window)
        self.k_by_model = KByModelPanel()
        self.posterior_k = KPosteriorPanel()
        self.patterns = PatternPanel()
        self.heatmap = HeatmapPanel()
        self.model_history = ModelHistoryPanel(window)
        #: every panel in update order (the health text last: it reads what the others show)
        self.panels: list[Panel] = [
            self.heatmap, self.fractions, self.onset, self.t0_history, self.model_history, self.k_history,
            self.patterns, self.posterior_t0, self.posterior_k, self.models, self.k_by_model, self.now,
            self.banner, self.header]
        roots = {name: root for panel in [*self.panels, self.health] for name, root in panel.roots().items()}
        doc.title = "beamkin live kinetics"
        with doc.models.freeze():  # one recomputation of the model graph for all roots, not one per root
            for name in ROOT_ORDER:
                roots[name].name = name
                doc.add_root(roots[name])
        doc.template = PAGE_TEMPLATE
        self.callback = doc.add_periodic_callback(self.refresh, max(int(1000.0 / max_refresh_hz), 20))

    @property
    def series_id(self) -> str | None:
        """The series this session shows (None before the first one)."""
        return self.view.series_id

    def refresh(self) -> None:
        """Pull what changed in the shared state and update this session's models."""
        try:
            self._refresh()
        except Exception:  # a drawing bug must not kill the session's callback
            log.exception("dashboard refresh failed", extra={"series_id": self.series_id})

    def _refresh(self) -> None:
        # (no doc.hold("combine"): it would send a replaced source's final data *and* the rows
        # streamed into it after the replacement, so the browser would hold them twice)
        with self.state.lock:
            ids = self.state.series_ids()
            chosen = self.header.chosen()
            target = chosen if chosen is not None and self.state.get(chosen) is not None \
                else self.state.latest_series_id()
            series = self.state.get(target) if target is not None else None
            if series is not None and target != self.series_id:
                self._switch_series(target)
            update = self.cursor.collect(series) if series is not None else {}
            global_status = {k: dict(v) for k, v in self.state.global_status.items()}
        self.header.list_series(ids)
        if update:
            self.view.take(update)
            for panel in self.panels:
                panel.update(update, self.view)
        self.health.update(update, self.view, global_status)

    def _switch_series(self, series_id: str) -> None:
        """Show another series: a new cursor, the panels emptied."""
        log.info("dashboard session shows series %s", series_id, extra={"series_id": series_id})
        self.view = SessionView(series_id)
        self.cursor = SeriesCursor()
        for panel in self.panels:
            panel.reset()
