"""The onset alert banner: the alert as it was raised (kept) and the state now, each labelled
(docs/design.md, section 6 "Live: estimates, exact posteriors, staleness, alerts").

Units: times in seconds.
"""

from __future__ import annotations

import html
from typing import Any

from bokeh.layouts import column
from bokeh.models import Div

from .. import style
from .base import Panel, SessionView, describe


class BannerPanel(Panel):
    """``alert_banner`` (a Div with css class ``beamkin-alert``), hidden until the series alerts."""

    def __init__(self) -> None:
        self.div = Div(text="", name="alert_banner", css_classes=["beamkin-alert"], visible=False,
                       sizing_mode="stretch_width", styles=style.ALERT_STYLE)
        self.alert: dict[str, Any] | None = None

    def roots(self) -> dict[str, Any]:
        return {"beamkin_banner": column(self.div, name="beamkin_banner", sizing_mode="stretch_width")}

    def reset(self) -> None:
        self.alert = None
        self.div.visible = False

    def update(self, update: dict[str, Any], view: SessionView) -> None:
        if "start" not in update:
            return
        if update.get("alert") is not None and self.alert is None:
            self.alert = dict(update["alert"])
        if self.alert is not None and ("now" in update or not self.div.visible):
            self.div.text = self._as_raised(view.series_id) + self._now(view)
            self.div.visible = True

    def _as_raised(self, series_id: str | None) -> str:
        alert = self.alert or {}
        delta = alert.get("t0_minus_ts")
        delta_text = f", t0 − ts = {style.fixed(delta)} s" if isinstance(delta, (int, float)) else ""
        return (
            f"⚠ <b>ONSET DETECTED</b> in series {html.escape(str(alert.get('series_id') or series_id))}. "
            f"<b>Alert as raised</b> at t = {style.fixed(alert.get('time_s'), 2)} s "
            f"(frame {alert.get('frame_index')}): "
            f"{style.t0_with_interval(alert.get('t0'))}{delta_text}; leading model then "
            f"{html.escape(str(alert.get('leading_model')))} (P = {style.fixed(alert.get('leading_probability'))}), "
            f"onset probability {style.fixed(alert.get('onset_probability'), 4)}")

    @staticmethod
    def _now(view: SessionView) -> str:
        posterior = view.posterior
        if posterior is None:
            return ""
        models = posterior.get("models") or {}
        leading = posterior.get("leading_model")
        t0 = (posterior.get("model_averaged") or {}).get("t0") or {}
        reaction = style.number(posterior.get("reaction_probability"))
        return (f"<br><b>Now</b> ({html.escape(describe(posterior, view.stale))}): leading model "
                f"{html.escape(str(leading))} (P = {style.fixed((models.get(leading) or {}).get('probability'))}), "
                f"t0 = {style.fixed(t0.get('mean'))} s [90 %: {style.fixed(t0.get('q05'))} – "
                f"{style.fixed(t0.get('q95'))} s]"
                + (f", P(reaction) = {style.fixed(reaction, 4)}" if reaction is not None else ""))
