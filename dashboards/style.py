"""The one look of beamkin's pages: colours, fonts, sizes and numbers with their units.

Both the live page (:mod:`dashboards.layout` and :mod:`dashboards.panels`) and the static
report (:mod:`dashboards.report`) take their colours and their number formatting from here, so
a quantity reads the same on both: times in seconds, rate constants k in 1/s (significant
digits: they span decades), probabilities to 4 decimals, log evidences in nat to 2 decimals.
A value that is missing or not finite is shown as an en dash, never as "nan".
"""

from __future__ import annotations

import math
from typing import Any

# ---------------------------------------------------------------------------- colours
#: alpha(t) data points and the latest pattern
COLOR_DATA = "#1f1f1f"
#: frames the reducer flagged (no usable fraction)
COLOR_FLAGGED = "#9e9e9e"
#: error bars of alpha(t)
COLOR_ERROR_BAR = "#777777"
COLOR_WHISKER = "#555555"
#: the leading kinetic model, and t0 on the alpha(t) plot
COLOR_LEADING = "#d62728"
#: quantities averaged over every model (t0 means the same in every rate law)
COLOR_AVERAGED = "#1f77b4"
#: the other kinetic models (bars of the live page and of the report)
COLOR_OTHER = "#90a4ae"
#: the other kinetic models' intervals in the report
COLOR_OTHER_INTERVAL = "#607d8b"
#: the "no reaction" hypothesis
COLOR_NULL = "#455a64"
#: a model or estimate whose particles no longer represent the posterior
COLOR_STALE = "#cfd8dc"
#: the gas introduction time ts
COLOR_TS = "#2ca02c"
#: the onset probability P(t0 <= t | data)
COLOR_ONSET = "#6a1b9a"
#: the phase references and their peak windows (other phases: grey)
COLOR_PHASE = {"A": "#1f77b4", "B": "#ff7f0e"}
COLOR_PHASE_OTHER = "#777777"
#: background of an onset alert (live banner and report paragraph)
COLOR_ALERT = "#b71c1c"

# ---------------------------------------------------------------------------- fonts and sizes
#: plot titles: the live page packs more plots on a screen than the report
LIVE_TITLE_FONT_SIZE = "11pt"
REPORT_TITLE_FONT_SIZE = "12pt"
AXIS_LABEL_FONT_SIZE = "10pt"
LEGEND_FONT_SIZE = "8pt"
REPORT_LEGEND_FONT_SIZE = "9pt"
#: heights (pixels) of the live plots; their widths follow the window (from 1000 px)
PLOT_HEIGHT = 300
MIN_PLOT_WIDTH = 300
#: the report's plot size (pixels)
REPORT_PLOT_WIDTH = 620
REPORT_PLOT_HEIGHT = 360

#: CSS of the live page's text panels
ALERT_STYLE = {
    "background-color": COLOR_ALERT, "color": "white", "padding": "8px 14px", "font-size": "15px",
    "border-radius": "6px", "line-height": "1.5",
}
NOW_STYLE = {"font-size": "14px", "line-height": "1.5", "padding": "6px 10px", "border-radius": "6px",
             "background-color": "#f5f5f5"}
NOW_STALE_STYLE = {**NOW_STYLE, "background-color": "#fff3e0", "border": "2px solid #ef6c00"}
PANEL_STYLE = {"font-size": "12px", "line-height": "1.45"}
HEADER_STYLE = {"font-size": "14px"}

#: placeholder of a missing or non-finite number
MISSING = "–"


# ---------------------------------------------------------------------------- numbers
def number(value: Any) -> float | None:
    """``value`` as a float when it is a number (a bool is not), else None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def number_or_nan(value: Any) -> float:
    """``value`` as a float when it is a number (a bool is not), else NaN (for arrays and sorting)."""
    found = number(value)
    return math.nan if found is None else found


def fixed(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals (times in s, probabilities); "–" when missing or not finite."""
    found = number(value)
    if found is None or not math.isfinite(found):
        return MISSING
    return f"{found:.{digits}f}"


def significant(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (rate constants k in 1/s span decades)."""
    found = number(value)
    if found is None or not math.isfinite(found):
        return MISSING
    return f"{found:.{digits}g}"


def mean_sd(stat: dict[str, Any] | None, digits: int = 4) -> str:
    """A posterior summary ``{"mean", "sd"}`` as "mean ± sd" (the mean alone without a finite sd)."""
    stat = stat or {}
    mean, sd = number_or_nan(stat.get("mean")), number_or_nan(stat.get("sd"))
    if not math.isfinite(mean):
        return MISSING
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if math.isfinite(sd) else f"{mean:.{digits}f}"


def t0_with_interval(t0: dict[str, Any] | None, digits: int = 3) -> str:
    """An onset time summary ``{"mean", "q05", "q95"}`` (s) as "t0 = mean s, 90 % interval q05 – q95 s"."""
    t0 = t0 or {}
    return (f"t0 = {fixed(t0.get('mean'), digits)} s, 90 % interval {fixed(t0.get('q05'), digits)} – "
            f"{fixed(t0.get('q95'), digits)} s")


def seconds_or_unknown(value: Any, digits: int = 3) -> str:
    """A time in seconds with its unit, or "unknown" (the gas introduction time may not be known)."""
    return f"{fixed(value, digits)} s" if number(value) is not None else "unknown"


def by_probability(models: dict[str, dict[str, Any]]) -> list[str]:
    """Model names, most probable first (the order every table and bar chart shows them in)."""
    return sorted(models, key=lambda m: -(number(models[m].get("probability")) or 0.0))


def radial_label(unit: str) -> str:
    """Axis label of a pattern's radial axis: degrees 2theta (``"2th_deg"``) or q in 1/nm."""
    return "scattering angle 2θ (degrees)" if unit == "2th_deg" else "q (1/nm)"


#: axis labels shared by the live page and the report
TIME_AXIS_LABEL = "time since series start (s)"
ALPHA_AXIS_LABEL = "fraction of loaded phase α"
ALPHA_TITLE = "Phase fraction α(t): data and posterior predictive (median, 90 % band)"
