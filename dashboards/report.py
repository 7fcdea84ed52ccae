"""Self-contained HTML report of a finished series (static Bokeh plots, resources inlined).

Sources:

* :func:`build_report` takes protocol messages (from a recording or a live run): ``start``,
  ``fraction`` (the data), the last ``posterior`` and/or the ``result`` (the fit), ``alert``;
* :func:`load_analysis_json` turns the ``--json`` output of ``beamkin analyze`` (schema
  ``{"series_id"?, "models": {name: {"log_evidence", "probability", "params": {"t0": {mean, sd,
  q05, q50, q95}, "k": {...}}}}, "model_averaged": {...}, "alert": {...}, "priors": {...},
  "predictive"?, "histograms"?}``) plus an optional CSV of the data (columns ``time_s``,
  ``alpha``, ``sigma_alpha``; aliases ``time``/``t`` and ``sigma``) into such messages.

The page holds, per series: alpha(t) data with error bars and the posterior-predictive median
and 90 % band (leading model and model average) with ts and t0 marks; the posteriors of t0 (s)
and k (1/s) (density histograms when the input has them, otherwise per-model 90 % intervals
with mean +- sd); the model probabilities; and the per-model table (log evidence, probability,
t0 and k as mean +- sd) in the style of Yokoyama et al., Sci. Rep. 13 (2023). No network
access is needed to view it (BokehJS is inlined).
"""

from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from bokeh.embed import components
from bokeh.layouts import column, row
from bokeh.models import BoxAnnotation, ColumnDataSource, FactorRange, Range1d, Span, Whisker
from bokeh.resources import Resources

from beamkin import protocol
from beamkin.protocol import Message

from . import style
from .figures import central_range, report_figure
from .style import COLOR_AVERAGED, COLOR_DATA, COLOR_LEADING, COLOR_TS

REPORT_FILENAME = "report.html"


class ReportInputError(ValueError):
    """The report input lacks what a report needs (the text says what)."""


@dataclass
class SeriesReport:
    """What the report shows about one series (times in s, k in 1/s)."""

    series_id: str
    start: dict[str, Any] = field(default_factory=dict)
    time_s: list[float] = field(default_factory=list)
    alpha: list[float] = field(default_factory=list)
    sigma_alpha: list[float] = field(default_factory=list)
    flagged: list[bool] = field(default_factory=list)
    fit: dict[str, Any] = field(default_factory=dict)  # models, model_averaged, predictive, histograms, priors
    alert: dict[str, Any] | None = None
    source: str = "messages"

    @property
    def leading_model(self) -> str | None:
        models = self.fit.get("models") or {}
        if not models:
            return None
        return max(models, key=lambda m: float(models[m].get("probability") or 0.0))


def collect_series(messages: Iterable[Message]) -> list[SeriesReport]:
    """Group messages by series; the ``result`` of a series overrides its last ``posterior``.

    Items may also be ``(received_s, Message)`` pairs, as ``sinks.recorder.read_messages``
    yields them.
    """
    series: dict[str, SeriesReport] = {}
    results: dict[str, dict] = {}
    for item in messages:
        message = item[-1] if isinstance(item, tuple) else item
        if not isinstance(message, Message):
            raise ReportInputError(f"report input item is {type(message).__name__}, not a beamkin Message")
        sid = message.series_id
        if sid is None:
            continue
        report = series.setdefault(sid, SeriesReport(sid))
        if message.type == "start":
            report.start = dict(message.fields)
        elif message.type == "fraction":
            alpha = message.get("alpha")
            report.time_s.append(float(message["time_s"]))
            report.alpha.append(math.nan if alpha is None else float(alpha))
            sigma = message.get("sigma_alpha")
            report.sigma_alpha.append(math.nan if sigma is None else float(sigma))
            report.flagged.append(message.get("status") != "ok" or alpha is None)
        elif message.type == "posterior":
            report.fit = {k: message.fields.get(k) for k in
                          ("models", "model_averaged", "predictive", "histograms", "priors", "leading_model",
                           "onset_probability", "time_s", "frame_index")}
        elif message.type == "result":
            results[sid] = dict(message["result"])
        elif message.type == "alert" and report.alert is None:
            report.alert = dict(message.fields)
    for sid, result in results.items():
        fit = series[sid].fit
        fit.update({k: v for k, v in result.items() if v is not None and k != "alert"})
        alert = result.get("alert")
        if series[sid].alert is None and isinstance(alert, dict) and isinstance(alert.get("t0"), dict):
            # the result's alert names its time "time" (beamkin analyze) or "time_s" (alert message)
            series[sid].alert = {**alert, "time_s": alert.get("time_s", alert.get("time"))}
    reports = [r for r in series.values() if r.fit.get("models")]
    if not reports:
        raise ReportInputError("no posterior or result message with models in the input: nothing to report")
    return reports


def load_report_input(path: str | Path, data_csv: str | Path | None = None) -> Iterable[Message]:
    """The messages of a recording (an HDF5 file) or of an analyze/demo ``--json`` result (any
    other file); ReportInputError, one line naming the file, for anything else."""
    from beamkin.recording import HDF5_SIGNATURE, RecordingInputError, check_recording, read_messages
    path = Path(path)
    if not path.exists():
        raise ReportInputError(f"{path} does not exist")
    if path.is_dir():
        raise ReportInputError(f"{path} is a folder, expected a beamkin recording (.h5) or a --json result")
    with path.open("rb") as handle:
        hdf5 = handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    if not hdf5:
        return load_analysis_json(path, data_csv)
    try:
        check_recording(path)
    except RecordingInputError as exc:
        raise ReportInputError(str(exc)) from None
    return (message for _, message in read_messages(path))


def load_analysis_json(path: str | Path, data_csv: str | Path | None = None, series_id: str | None = None) -> list[Message]:
    """Messages equivalent to an ``beamkin analyze --json`` result (and its data CSV, if given)."""
    path = Path(path)
    try:
        result = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise ReportInputError(f"{path} is neither a beamkin recording (HDF5) nor a JSON result "
                               "(binary content)") from None
    except FileNotFoundError:
        raise ReportInputError(f"{path} does not exist") from None
    except OSError as exc:
        raise ReportInputError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ReportInputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(result, dict) or not isinstance(result.get("models"), dict) or not result["models"]:
        raise ReportInputError(f"{path} has no 'models' table (expected the --json output of beamkin analyze)")
    sid = series_id or result.get("series_id") or path.stem
    messages: list[Message] = []
    if data_csv is not None:
        messages += _fractions_from_csv(Path(data_csv), sid)
    messages.append(protocol.make("result", series_id=sid, result=result))
    return messages


def _fractions_from_csv(path: Path, series_id: str) -> list[Message]:
    aliases = {"time_s": ("time_s", "time", "t"), "alpha": ("alpha",), "sigma_alpha": ("sigma_alpha", "sigma")}
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return _read_fractions_csv(path, handle, aliases, series_id)
    except UnicodeDecodeError:
        raise ReportInputError(f"--data {path} is not a text CSV file (binary content)") from None
    except (csv.Error, ValueError) as exc:
        if isinstance(exc, ReportInputError):
            raise
        raise ReportInputError(f"--data {path}: {exc}") from None
    except FileNotFoundError:
        raise ReportInputError(f"--data {path} does not exist") from None
    except OSError as exc:
        raise ReportInputError(f"--data {path} cannot be read: {exc.strerror or exc}") from None


def _read_fractions_csv(path: Path, handle, aliases: dict, series_id: str) -> list[Message]:
    reader = csv.DictReader(row for row in handle if not row.lstrip().startswith("#"))
    names = {name.strip().lower(): name for name in reader.fieldnames or []}
    columns = {}
    for key, options in aliases.items():
        columns[key] = next((names[o] for o in options if o in names), None)
    if columns["time_s"] is None or columns["alpha"] is None:
        raise ReportInputError(f"{path} needs columns time_s and alpha, has {reader.fieldnames}")
    messages = []
    for index, record in enumerate(reader):
        sigma = record.get(columns["sigma_alpha"]) if columns["sigma_alpha"] else None
        try:
            time_s, alpha = float(record[columns["time_s"]]), float(record[columns["alpha"]])
            sigma = float(sigma) if sigma not in (None, "") else None
        except (TypeError, ValueError):
            raise ReportInputError(f"{path}, line {reader.line_num}: time_s, alpha and sigma must be numbers") from None
        messages.append(protocol.make(
            "fraction", series_id=series_id, frame_index=index, time_s=time_s,
            exposure_s=0.0, alpha=alpha, sigma_alpha=sigma, status="ok", reason=None))
    return messages


# ---------------------------------------------------------------------------- plots
def _alpha_figure(report: SeriesReport):
    fig = report_figure(style.ALPHA_TITLE, style.TIME_AXIS_LABEL, style.ALPHA_AXIS_LABEL, width=1260, height=420,
                        y_range=Range1d(-0.12, 1.18), name=f"{report.series_id}:alpha_fit")
    predictive = report.fit.get("predictive") or {}
    if predictive.get("time_s"):
        times = predictive["time_s"]
        for key, color, dash, label in (("model_averaged", COLOR_AVERAGED, "dashed", "model average"),
                                        ("leading", COLOR_LEADING, "solid", f"leading model ({report.leading_model})")):
            band = predictive.get(key) or {}
            if band.get("q05") is not None and band.get("q95") is not None:
                fig.varea(x=times, y1=band["q05"], y2=band["q95"], fill_color=color, fill_alpha=0.15,
                          legend_label=f"{label} 90 %")
            if band.get("median") is not None:
                fig.line(times, band["median"], color=color, line_width=2, line_dash=dash,
                         legend_label=f"{label} median")
    if report.time_s:
        alpha = np.asarray(report.alpha)
        sigma = np.nan_to_num(np.asarray(report.sigma_alpha), nan=0.0)
        flagged = np.asarray(report.flagged)
        source = ColumnDataSource({"time_s": report.time_s, "alpha": alpha, "lower": alpha - sigma,
                                   "upper": alpha + sigma})
        fig.add_layout(Whisker(source=source, base="time_s", lower="lower", upper="upper", line_color=style.COLOR_WHISKER,
                               upper_head=None, lower_head=None))
        ok = ~flagged
        fig.scatter(np.asarray(report.time_s)[ok], alpha[ok], size=5, color=COLOR_DATA, legend_label="α ± σ (data)")
        if flagged.any():
            fig.scatter(np.asarray(report.time_s)[flagged], alpha[flagged], size=7, marker="x", color=style.COLOR_FLAGGED,
                        legend_label="flagged frames")
    gas = report.start.get("gas_time_s")
    if isinstance(gas, (int, float)):
        fig.add_layout(Span(location=gas, dimension="height", line_color=COLOR_TS, line_dash="dotted", line_width=2))
        fig.line([], [], color=COLOR_TS, line_dash="dotted", legend_label=f"gas introduced ts = {gas:.3f} s")
    t0 = (report.fit.get("model_averaged") or {}).get("t0") or {}
    if all(isinstance(t0.get(k), (int, float)) for k in ("mean", "q05", "q95")):
        fig.add_layout(BoxAnnotation(left=t0["q05"], right=t0["q95"], fill_color=COLOR_LEADING, fill_alpha=0.12))
        fig.add_layout(Span(location=t0["mean"], dimension="height", line_color=COLOR_LEADING, line_width=2))
        fig.line([], [], color=COLOR_LEADING, legend_label=f"t0 = {t0['mean']:.4f} s (90 %: {t0['q05']:.4f}–{t0['q95']:.4f})")
    if fig.legend:
        fig.legend.location = "top_left"
        fig.legend.label_text_font_size = style.REPORT_LEGEND_FONT_SIZE
    if not fig.renderers:
        fig.line([], [])
    return fig


def _posterior_figure(report: SeriesReport, name: str, label: str):
    hist = (report.fit.get("histograms") or {}).get(name) or {}
    log_axis = name == "k"
    title = f"Posterior of {'onset time t0' if name == 't0' else 'rate constant k'}"
    if hist.get("edges") and hist.get("model_averaged") is not None:
        fig = report_figure(title, label, f"probability density (1/{label.split('(')[-1].rstrip(')')})",
                            x_axis_type="log" if log_axis else "linear", name=f"{report.series_id}:{name}_posterior")
        edges = np.asarray(hist["edges"], dtype=float)
        for key, fill, color, legend in (("model_averaged", 0.35, COLOR_AVERAGED, "model average"),
                                         ("leading", 0.0, COLOR_LEADING, f"leading model ({report.leading_model})")):
            if hist.get(key) is None:
                continue
            density = np.asarray(hist[key], dtype=float)
            if density.size != edges.size - 1:
                raise ReportInputError(f"{name} histogram has {edges.size} edges for {density.size} densities")
            fig.quad(left=edges[:-1], right=edges[1:], bottom=0, top=density, fill_color=color, fill_alpha=fill,
                     line_color=color, legend_label=legend)
        _zoom_to_mass(fig, edges, np.asarray(hist["model_averaged"], dtype=float), log_axis)
        stat = (report.fit.get("model_averaged") or {}).get(name) or {}
        if all(isinstance(stat.get(k), (int, float)) for k in ("mean", "q05", "q95")):
            fig.add_layout(BoxAnnotation(left=stat["q05"], right=stat["q95"], fill_color=COLOR_AVERAGED, fill_alpha=0.12))
            fig.add_layout(Span(location=stat["mean"], dimension="height", line_color=COLOR_AVERAGED, line_width=2,
                                line_dash="dashed"))
            fig.title.text = f"{title} (dashed: mean, band: 90 %)"
        fig.legend.location = "top_right"
        return fig
    return _interval_figure(report, name, label, title + " (90 % intervals, mean ± sd)")


def _zoom_to_mass(fig, edges: np.ndarray, density: np.ndarray, log_axis: bool) -> None:
    """Show the central 99.9 % of a density per unit x on ``edges`` (see figures.central_range)."""
    shown = central_range(edges, density * np.diff(edges), log_axis)
    if shown is not None:
        fig.x_range = Range1d(*shown)


def _interval_figure(report: SeriesReport, name: str, label: str, title: str):
    models = report.fit.get("models") or {}
    names = style.by_probability(models)
    rows = [("model average", (report.fit.get("model_averaged") or {}).get(name) or {})]
    rows += [(m, ((models[m].get("params") or {}).get(name)) or {}) for m in names]
    rows = [(m, s) for m, s in rows if isinstance(s.get("mean"), (int, float))]
    factors = [m for m, _ in reversed(rows)]
    num = style.number_or_nan
    log_axis = name == "k" and all(num(s.get("q05")) > 0 for _, s in rows)
    fig = report_figure(title, label, "model", y_range=FactorRange(*factors), height=max(260, 24 * len(rows) + 90),
                        x_axis_type="log" if log_axis else "linear", name=f"{report.series_id}:{name}_posterior")
    data = {"model": [m for m, _ in rows], "mean": [num(s.get("mean")) for _, s in rows],
            "lo": [num(s.get("q05")) for _, s in rows], "hi": [num(s.get("q95")) for _, s in rows],
            "sd_lo": [num(s.get("mean")) - num(s.get("sd")) for _, s in rows],
            "sd_hi": [num(s.get("mean")) + num(s.get("sd")) for _, s in rows],
            "color": [COLOR_AVERAGED if m == "model average"
                      else (COLOR_LEADING if m == report.leading_model else style.COLOR_OTHER_INTERVAL)
                      for m, _ in rows]}
    source = ColumnDataSource(data)
    fig.hbar(y="model", left="lo", right="hi", height=0.15, color="color", source=source, legend_label="90 % interval")
    fig.hbar(y="model", left="sd_lo", right="sd_hi", height=0.45, color="color", alpha=0.5, source=source,
             legend_label="mean ± sd")
    fig.scatter(x="mean", y="model", size=8, color="color", source=source, legend_label="mean")
    fig.legend.location = "top_right"
    fig.legend.label_text_font_size = style.LEGEND_FONT_SIZE
    return fig


def _models_figure(report: SeriesReport):
    models = report.fit.get("models") or {}
    names = style.by_probability(models)
    fig = report_figure("Model probabilities", "kinetic model", "posterior probability", x_range=FactorRange(*names),
                        y_range=Range1d(0, 1.05), name=f"{report.series_id}:model_probabilities")
    fig.vbar(x=names, top=[style.number_or_nan(models[m].get("probability")) for m in names], width=0.8,
             color=[COLOR_LEADING if m == report.leading_model else style.COLOR_OTHER for m in names])
    fig.xaxis.major_label_orientation = 0.8
    return fig


# ---------------------------------------------------------------------------- text
def model_table_html(report: SeriesReport) -> str:
    """The per-model table: log evidence, probability, t0 (s) and k (1/s) as mean ± sd."""
    models = report.fit.get("models") or {}
    names = style.by_probability(models)
    has_n = any("n" in (models[m].get("params") or {}) for m in names)
    head = ("<tr><th>model</th><th>log evidence</th><th>probability</th><th>t0 (s)</th><th>k (1/s)</th>"
            + ("<th>n</th>" if has_n else "") + "</tr>")
    body = []
    for m in names:
        params = models[m].get("params") or {}
        cls = " class='leading'" if m == report.leading_model else ""
        body.append(
            f"<tr{cls}><td>{html.escape(m)}</td><td>{style.fixed(models[m].get('log_evidence'), 2)}</td>"
            f"<td>{style.fixed(models[m].get('probability'), 4)}</td><td>{style.mean_sd(params.get('t0'))}</td>"
            f"<td>{style.mean_sd(params.get('k'))}</td>"
            + (f"<td>{style.mean_sd(params.get('n'), 2)}</td>" if has_n else "") + "</tr>")
    averaged = report.fit.get("model_averaged") or {}
    body.append(f"<tr class='average'><td>model average</td><td></td><td>1</td>"
                f"<td>{style.mean_sd(averaged.get('t0'))}</td>"
                f"<td>{style.mean_sd(averaged.get('k'))}</td>" + ("<td></td>" if has_n else "") + "</tr>")
    return f"<table class='models' id='models-{html.escape(report.series_id)}'>{head}{''.join(body)}</table>"


def _data_points(report: SeriesReport) -> str:
    """"N data points": the fractions in the input, else the frames the result says it was fitted to."""
    if report.time_s:
        return f"{len(report.time_s)} data points"
    fitted = report.fit.get("n_frames")
    if fitted is None:
        fitted = (report.fit.get("input") or {}).get("n_frames")
    if fitted is None:
        return "No data points in the input"
    return f"{int(fitted)} data points (not in the input: give --data CSV to plot them)"


def _summary_html(report: SeriesReport) -> str:
    start = report.start
    averaged = report.fit.get("model_averaged") or {}
    leading = report.leading_model
    models = report.fit.get("models") or {}
    parts = [f"<h2>Series {html.escape(report.series_id)}</h2><p>"]
    if start:
        geometry = start.get("geometry") or {}
        parts.append(f"{html.escape(str(start.get('kind', '')))} data from {html.escape(str(start.get('source', '?')))}, "
                     f"frame time {style.fixed(start.get('frame_time_s'), 4)} s, exposure {style.fixed(start.get('exposure_s'), 4)} s, "
                     f"wavelength {style.fixed(geometry.get('wavelength_A'), 4)} Å, "
                     f"gas introduced at ts = {style.seconds_or_unknown(start.get('gas_time_s'))}. ")
    parts.append(f"{_data_points(report)}. Model-averaged onset t0 = {style.mean_sd(averaged.get('t0'))} s, "
                 f"rate k = {style.mean_sd(averaged.get('k'))} 1/s; leading model {html.escape(str(leading))} "
                 f"(probability {style.fixed((models.get(leading) or {}).get('probability'), 4)}).")
    gas = start.get("gas_time_s")
    t0 = averaged.get("t0") or {}
    if isinstance(gas, (int, float)) and isinstance(t0.get("mean"), (int, float)):
        parts.append(f" t0 − ts = {t0['mean'] - gas:.4f} s.")
    parts.append("</p>")
    if report.alert:
        a = report.alert
        parts.append(f"<p class='alert'>Onset alert at t = {style.fixed(a.get('time_s'), 3)} s "
                     f"(frame {a.get('frame_index')}): {style.t0_with_interval(a.get('t0'), 4)}, "
                     f"leading model {html.escape(str(a.get('leading_model')))}, "
                     f"onset probability {style.fixed(a.get('onset_probability'), 4)}.</p>")
    if not (report.fit.get("predictive") or {}).get("time_s"):
        parts.append("<p class='note'>The input has no posterior predictive: the α(t) plot shows the data only.</p>")
    settings = report.fit.get("settings")
    if settings:
        parts.append(f"<p class='priors'>Sampler settings: <code>{html.escape(json.dumps(settings))}</code></p>")
    priors = report.fit.get("priors")
    if priors:
        parts.append(f"<p class='priors'>Priors: <code>{html.escape(json.dumps(priors))}</code></p>")
    return "".join(parts)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
{resources}
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; max-width: 1320px; }}
table.models {{ border-collapse: collapse; margin: 8px 0 24px 0; font-size: 14px; }}
table.models th, table.models td {{ border: 1px solid #bbb; padding: 4px 10px; text-align: right; }}
table.models td:first-child, table.models th:first-child {{ text-align: left; }}
table.models tr.leading {{ background: #fdecea; font-weight: bold; }}
table.models tr.average {{ background: #e8f1fa; }}
p.alert {{ background: {alert_color}; color: white; padding: 8px 12px; border-radius: 4px; }}
p.note {{ color: #8a4b00; }} p.priors {{ font-size: 12px; color: #555; }}
</style></head><body>
<h1>{title}</h1>
<p>Generated {generated} by beamkin. Times in seconds since series start, rate constants in 1/s.</p>
{sections}
{script}
</body></html>
"""


def build_report(messages: Iterable[Message], out_dir: str | Path, title: str = "beamkin kinetics report") -> Path:
    """Write ``out_dir/report.html`` for every series with a fit in ``messages``; returns its path."""
    reports = collect_series(messages)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layouts = {}
    for report in reports:
        layouts[report.series_id] = column(
            _alpha_figure(report),
            row(_posterior_figure(report, "t0", "t0 (s)"), _posterior_figure(report, "k", "k (1/s)")),
            row(_models_figure(report)),
        )
    script, divs = components(layouts)
    sections = []
    for report in reports:
        sections.append(_summary_html(report) + divs[report.series_id]
                        + "<h3>Kinetic models</h3>" + model_table_html(report))
    page = PAGE.format(title=html.escape(title), alert_color=style.COLOR_ALERT, resources=Resources(mode="inline", components=["bokeh"]).render(), script=script,
                       sections="\n".join(sections),
                       generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    path = out_dir / REPORT_FILENAME
    path.write_text(page, encoding="utf-8")
    return path
