"""Pipeline health: what this dashboard measures itself (frame rate, sampler lag, missing frames,
smallest ESS), then each stage's own counters from its ``status`` messages.

Units: rates in frames per second, lags in frames.
"""

from __future__ import annotations

import html
import math
import time
from typing import Any

from bokeh.layouts import column
from bokeh.models import Div

from .. import style
from .base import Panel, SessionView, describe, frames_behind

#: The health text changes with every frame (rates, counters): it is redrawn at most this often
#: (seconds), but at once when the series ends or an estimate turns stale or fresh.
HEALTH_MIN_INTERVAL_S = 1.0
#: Counters shown per stage.
COUNTERS_PER_STAGE = 6


class HealthPanel(Panel):
    """``health`` (Div) below the plots."""

    def __init__(self) -> None:
        self.div = Div(text="", name="health", sizing_mode="stretch_width", styles=style.PANEL_STYLE)
        self.numbers: dict[str, Any] | None = None
        self.key: tuple = ()
        self.sent_at = -math.inf

    def roots(self) -> dict[str, Any]:
        return {"beamkin_health": column(self.div, name="beamkin_health", sizing_mode="stretch_width")}

    def update(self, update: dict[str, Any], view: SessionView,
               global_status: dict[str, dict[str, Any]] | None = None) -> None:
        """Redraw when due; ``global_status``: the latest counters of every stage (any series)."""
        key = (view.series_id, view.ended is not None, view.stale is not None)
        now = time.monotonic()
        if key == self.key and now - self.sent_at < HEALTH_MIN_INTERVAL_S:
            return
        self.key, self.sent_at = key, now
        text = "<br>".join(self._lines(update, view, global_status or {}))
        if text != self.div.text:
            self.div.text = text

    def _lines(self, update: dict[str, Any], view: SessionView, global_status: dict[str, dict[str, Any]]) -> list[str]:
        """The lag is that of the posterior on show while the series runs; once it has ended
        nothing lags any more and the final posterior's frame is stated instead."""
        lines = ["<b>Pipeline health</b>"]
        if "frame_rate_hz" in update:
            self.numbers = {k: update.get(k) for k in ("frame_rate_hz", "ess_min")}
        if self.numbers is not None:
            if view.ended is not None:
                lines.append(f"series ended ({html.escape(str(view.ended.get('reason')))}); "
                             f"final posterior: {html.escape(describe(view.posterior, view.stale))}")
            else:
                behind = frames_behind(view.stale or view.posterior)
                lines.append(f"frames in: {style.fixed(self.numbers['frame_rate_hz'], 2)} /s; exact sampler "
                             f"{behind if behind is not None else 0} frame(s) behind"
                             + ("; estimate STALE" if view.stale is not None else ""))
            missing = style.number(((view.posterior or {}).get("diagnostics") or {}).get("frames_missing"))
            lines.append(f"missing frames {int(missing) if missing is not None else style.MISSING}, "
                         f"smallest ESS of the last exact posterior {style.fixed(self.numbers['ess_min'], 0)}")
        status = {**global_status, **update.get("status", {})}
        if not status:
            lines.append("no status messages yet")
        for stage, counters in sorted(status.items()):
            shown = [(k, v) for k, v in counters.items()
                     if k != "series_id" and isinstance(v, (int, float)) and not isinstance(v, bool)
                     and not (view.ended is not None and k in ("lag_s", "latency_s"))][:COUNTERS_PER_STAGE]
            lines.append(f"{html.escape(stage)}: " + ", ".join(
                f"{html.escape(str(k)).replace('_', ' ')} {style.fixed(v, 3) if isinstance(v, float) else v}"
                for k, v in shown))
        return lines
