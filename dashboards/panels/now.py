"""The "now" text: which posterior the page presents (exact, estimate, or the exact one standing
in for a stale estimate; docs/design.md, section 6 "Live: estimates, exact posteriors,
staleness, alerts"), P(reaction), the leading model and its own k, and t0 over all models.

Units: t and t0 in seconds, k in 1/s.
"""

from __future__ import annotations

import html
from typing import Any

from bokeh.layouts import column
from bokeh.models import Div

from .. import style
from .base import Panel, SessionView, describe


class NowPanel(Panel):
    """``now`` (Div), marked (border, orange background) while the newest estimate is stale."""

    def __init__(self) -> None:
        self.div = Div(text="no posterior yet", name="now", sizing_mode="stretch_width", styles=style.NOW_STYLE)

    def roots(self) -> dict[str, Any]:
        return {"beamkin_now": column(self.div, name="beamkin_now", sizing_mode="stretch_width")}

    def update(self, update: dict[str, Any], view: SessionView) -> None:
        if "now" not in update:
            return
        posterior, stale = update["now"]
        described = html.escape(describe(posterior, stale))
        self.div.styles = style.NOW_STALE_STYLE if stale is not None else style.NOW_STYLE
        if posterior is None:
            self.div.text = f"<b>Now:</b> {described}"
            return
        models = posterior.get("models") or {}
        leading = posterior.get("leading_model")
        name = html.escape(str(leading))
        k = ((models.get(leading) or {}).get("params") or {}).get("k") or {}
        leading_p = (models.get(leading) or {}).get("probability")
        t0 = (posterior.get("model_averaged") or {}).get("t0") or {}
        reaction = style.number(posterior.get("reaction_probability"))
        self.div.text = (
            f"<b>Now</b> ({described}, t = {style.fixed(posterior.get('time_s'), 2)} s): "
            + (f"P(reaction) = {style.fixed(reaction, 4)}; " if reaction is not None else "")
            + f"leading model <b>{name}</b> (P = {style.fixed(leading_p)}), "
            f"k({name}) = {style.significant(k.get('q50'))} 1/s "
            f"[90 %: {style.significant(k.get('q05'))} – {style.significant(k.get('q95'))}]; "
            f"t0 (all models) = {style.fixed(t0.get('mean'))} ± {style.fixed(t0.get('sd'))} s "
            f"[90 %: {style.fixed(t0.get('q05'))} – {style.fixed(t0.get('q95'))} s]; "
            f"onset probability {style.fixed(posterior.get('onset_probability'), 4)}. "
            f"<span style='color:{style.COLOR_TS}'>dotted green: gas introduction ts</span>; "
            f"<span style='color:{style.COLOR_LEADING}'>red line and band on α(t): t0 mean and 90 % interval</span>.")
