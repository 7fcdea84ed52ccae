"""Which hypothesis explains the data: P(model | data) of every kinetic model with "no
reaction" competing when the posterior carries ``null_model`` (docs/design.md, section 4
"Observation model", "No reaction"), as bars and as a table with the log evidences, their Monte
Carlo standard errors and the effective sample sizes.

Units: probabilities dimensionless, log evidences in nat.
"""

from __future__ import annotations

import html
from typing import Any

from bokeh.layouts import column
from bokeh.models import ColumnDataSource, Div, FactorRange, Range1d

from .. import style
from ..figures import live_figure
from ..state import NO_REACTION
from .base import Posterior, PosteriorPanel, empty

MODEL_COLUMNS = ["model", "probability", "color", "log_evidence", "log_evidence_se", "frame_index", "kind"]


def _color(name: str, entry: dict[str, Any], leading: Any) -> str:
    if entry.get("stale"):
        return style.COLOR_STALE
    if name == NO_REACTION:
        return style.COLOR_NULL
    return style.COLOR_LEADING if name == leading else style.COLOR_OTHER


class ModelsPanel(PosteriorPanel):
    """``model_probabilities`` (with the ``frame_index`` and ``kind`` of the posterior shown),
    the plot ``plot_models`` and the text ``model_table``."""

    def __init__(self) -> None:
        self.bars = ColumnDataSource(empty(MODEL_COLUMNS), name="model_probabilities")
        fig = live_figure("Model probabilities now (which posterior: see 'Now')", "hypothesis",
                          "posterior probability", height=340, x_range=FactorRange(), y_range=Range1d(0, 1.05))
        fig.vbar(x="model", top="probability", width=0.8, color="color", source=self.bars)
        fig.hover.tooltips = [("model", "@model"), ("P", "@probability{0.0000}"),
                              ("log Z", "@log_evidence{0.00} ± @log_evidence_se{0.00} nat")]
        fig.xaxis.major_label_orientation = 0.8
        self.figure = fig
        self.table = Div(text="", name="model_table", sizing_mode="stretch_width", styles=style.PANEL_STYLE)

    def roots(self) -> dict[str, Any]:
        return {"beamkin_models": column(self.table, name="beamkin_models", sizing_mode="stretch_width"),
                "plot_models": self.figure}

    def show(self, posterior: Posterior) -> None:
        models = posterior.get("models") or {}
        leading = posterior.get("leading_model")
        entries = [(m, models[m]) for m in models]
        null = posterior.get("null_model")
        if isinstance(null, dict):
            entries.append((NO_REACTION, null))
        entries.sort(key=lambda e: -float(e[1].get("probability") or 0.0))
        labels = [name for name, _ in entries]
        if list(self.figure.x_range.factors) != labels:
            self.figure.x_range.factors = labels
        self.bars.data = {
            "model": labels,
            "probability": [float(e.get("probability") or 0.0) for _, e in entries],
            "log_evidence": [style.number_or_nan(e.get("log_evidence")) for _, e in entries],
            "log_evidence_se": [style.number_or_nan(e.get("log_evidence_se")) for _, e in entries],
            "color": [_color(name, e, leading) for name, e in entries],
            "frame_index": [posterior.get("frame_index")] * len(entries),
            "kind": ["estimate" if posterior.get("estimate") else "exact"] * len(entries),
        }
        self.table.text = self._table(posterior, entries, leading)

    @staticmethod
    def _table(posterior: dict[str, Any], entries: list[tuple[str, dict[str, Any]]], leading: Any) -> str:
        rows = []
        for name, entry in entries:
            se = style.number(entry.get("log_evidence_se"))
            ess = (entry.get("diagnostics") or {}).get("ess")
            weight = "bold" if name == leading else "normal"
            rows.append(
                f"<tr style='font-weight:{weight}'><td>{html.escape(name)}</td>"
                f"<td style='text-align:right'>{style.fixed(entry.get('probability'), 4)}</td>"
                f"<td style='text-align:right'>{style.fixed(entry.get('log_evidence'), 2)}"
                f"{' ± ' + style.fixed(se, 2) if se is not None else ''}</td>"
                f"<td style='text-align:right'>{style.fixed(ess, 0)}</td>"
                f"<td>{'stale' if entry.get('stale') else ''}</td></tr>")
        reaction = style.number(posterior.get("reaction_probability"))
        return ((f"<b>P(reaction) = {style.fixed(reaction, 4)}</b><br>" if reaction is not None else "")
                + "<table style='border-collapse:collapse'><tr><th>hypothesis</th><th>P</th>"
                "<th>log Z ± MC se (nat)</th><th>ESS</th><th></th></tr>" + "".join(rows) + "</table>")
