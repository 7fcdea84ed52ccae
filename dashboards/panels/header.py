"""The page header: the series, its state and acquisition, and the series selector.

Units: wavelength in Å, frame and exposure time and the gas introduction time ts in seconds.
"""

from __future__ import annotations

import html
from typing import Any, Callable

from bokeh.layouts import row
from bokeh.models import Div, Select

from .. import style
from .base import Panel, SessionView

#: The selector's entry that follows whichever series started last.
FOLLOW_LATEST = "(follow latest series)"


class HeaderPanel(Panel):
    """``header`` (Div) and ``series_select`` (Select; choosing a series calls ``on_select``)."""

    def __init__(self, on_select: Callable[[], None]) -> None:
        self.div = Div(text="<b>beamkin</b> – waiting for a series…", name="header", sizing_mode="stretch_width",
                       styles=style.HEADER_STYLE)
        self.select = Select(title="Series", value=FOLLOW_LATEST, options=[FOLLOW_LATEST], name="series_select",
                             width=260)
        self.select.on_change("value", lambda attr, old, new: on_select())

    def roots(self) -> dict[str, Any]:
        return {"beamkin_header": row(self.div, self.select, name="beamkin_header", sizing_mode="stretch_width")}

    def chosen(self) -> str | None:
        """The series chosen in the selector, None to follow the latest."""
        choice = self.select.value
        return choice if choice and choice != FOLLOW_LATEST else None

    def list_series(self, series_ids: list[str]) -> None:
        """Offer ``series_ids`` (oldest first), the newest at the top."""
        options = [FOLLOW_LATEST, *reversed(series_ids)]
        if list(self.select.options) != options:
            self.select.options = options

    def update(self, update: dict[str, Any], view: SessionView) -> None:
        if "start" not in update:
            return
        start = update["start"]
        geometry = start.get("geometry") or {}
        detector = start.get("detector") or {}
        state = "ended (" + html.escape(str(update["ended"].get("reason"))) + ")" if update.get("ended") else "running"
        self.div.text = (
            f"<span style='font-size:19px'><b>beamkin</b> live kinetics</span> &nbsp; series "
            f"<b>{html.escape(str(update['series_id']))}</b> ({state}), "
            f"frames {update.get('frames_seen', 0)} / {start.get('n_frames') or '?'}<br>"
            f"{html.escape(str(start.get('kind', '?')))} detector {html.escape(str(detector.get('name', '?')))}, "
            f"λ = {style.fixed(geometry.get('wavelength_A'), 4)} Å, "
            f"frame time {style.fixed(start.get('frame_time_s'))} s, "
            f"exposure {style.fixed(start.get('exposure_s'))} s, gas introduced at ts = "
            f"{style.seconds_or_unknown(start.get('gas_time_s'))}")
