"""Offline analysis of a recorded alpha(t) series with the online sampler (``beamkin analyze``).

The series is fed frame by frame to the same ``OnlineInference`` used live, so the
offline posterior equals the live one for the same data, priors, particles and seed.

Input: a CSV file with a header row and columns ``time_s`` (mid-exposure time, s),
``alpha`` (transformed fraction, 0..1), optional ``sigma`` (standard uncertainty of alpha) and
optional ``exposure_s`` (s; 0 = instantaneous); UTF-8 with or without a byte-order mark, LF or
CRLF line ends (as Excel writes them).  ``load_series`` dispatches on the file suffix so that
other formats (beamkin recordings) can be added to ``READERS``.  alpha outside [-0.5, 1.5]
(``ALPHA_PLAUSIBLE``) is analysed but warned about: alpha in percent is the usual cause.

Settings: the ``[inference]`` table of the same configuration as the live service
(``beamkin/defaults.toml`` < ``--config FILE`` < ``--inference.KEY VALUE``; ``--models``,
``--particles``, ``--seed``, ``--noise``, ``--student-nu`` are short forms), and the engine
is built by the live stage's own ``inference.series.make_engine`` from the same
``inference.settings.InferenceSettings``, so that ``analyze`` of a
recording reproduces the live posterior by default.  ``--prior`` / ``--fix`` add to
``[inference.priors]``.

The t0 prior window defaults to [ts, t_end] with ts = ``--gas-time`` (else the recording's, else 0)
and t_end = the recording's n_frames * frame_time, else last time + median frame spacing (equal to
n_frames * frame_time for frames at 0, dt, 2 dt, ..., which is what the live service uses).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import pathlib
import sys
import time
from typing import Callable

import numpy as np

from .priors import Priors, parse_fix_option, parse_prior_option
from .settings import InferenceSettings

logger = logging.getLogger(__name__)

#: alpha values outside this range are warned about (alpha is a fraction, not percent)
ALPHA_PLAUSIBLE = (-0.5, 1.5)


@dataclasses.dataclass(frozen=True)
class Series:
    """A time series of phase fractions (times in s)."""

    time_s: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray | None
    exposure_s: np.ndarray
    source: str = ""
    t_end_s: float | None = None  # end of the series window when the source knows it (s)
    gas_time_s: float | None = None  # gas-introduction time ts when the source knows it (s)
    start: dict | None = None  # the recorded start message's fields (recordings only)
    #: frames per exact step of the live run (recordings: from the posteriors' ``batch``), or None
    schedule: tuple | None = None

    def __len__(self) -> int:
        return int(self.time_s.size)

    def default_t_end(self) -> float:
        """The series end when known, else the last time plus the median frame spacing (s)."""
        if self.t_end_s is not None:
            return float(self.t_end_s)
        if len(self) < 2:
            return float(self.time_s[-1] + max(self.exposure_s[-1], 1.0))
        return float(self.time_s[-1] + np.median(np.diff(self.time_s)))


class SeriesFormatError(ValueError):
    """Bad input file; the message names the file and line."""


def _number(text: str, column: str, path: str, line: int) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise SeriesFormatError(f"{path}, line {line}: column {column!r} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise SeriesFormatError(f"{path}, line {line}: column {column!r} must be finite, got {text!r}")
    return value


def load_csv_series(path: str | pathlib.Path) -> Series:
    """Read a CSV series; raises SeriesFormatError naming the line of the first problem.

    A byte-order mark and CRLF line ends are accepted; a binary file is refused by name."""
    path = str(path)
    try:
        return _read_csv_series(path)
    except UnicodeDecodeError as exc:
        raise SeriesFormatError(f"{path}: not a text CSV file (byte {exc.start} is not UTF-8)") from None
    except csv.Error as exc:
        raise SeriesFormatError(f"{path}: not a CSV file ({exc})") from None
    except IsADirectoryError:
        raise SeriesFormatError(f"{path} is a folder, expected a CSV file") from None
    except FileNotFoundError:
        raise SeriesFormatError(f"{path} does not exist") from None
    except OSError as exc:
        raise SeriesFormatError(f"{path} cannot be read: {exc.strerror or exc}") from None


def _read_csv_series(path: str) -> Series:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise SeriesFormatError(f"{path}, line 1: empty file, expected a header with time_s,alpha") from None
        for required in ("time_s", "alpha"):
            if required not in header:
                raise SeriesFormatError(f"{path}, line 1: missing column {required!r} (header: {','.join(header)})")
        unknown = [h for h in header if h not in ("time_s", "alpha", "sigma", "exposure_s")]
        if unknown:
            raise SeriesFormatError(f"{path}, line 1: unknown column(s) {', '.join(map(repr, unknown))}; "
                                    "expected time_s, alpha, optional sigma, exposure_s")
        col = {name: header.index(name) for name in header}
        rows = {name: [] for name in header}
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise SeriesFormatError(f"{path}, line {line_no}: expected {len(header)} fields, got {len(row)}")
            for name, i in col.items():
                value = _number(row[i].strip(), name, path, line_no)
                if name in ("sigma", "exposure_s") and value < 0:
                    raise SeriesFormatError(f"{path}, line {line_no}: column {name!r} must be >= 0, got {value}")
                rows[name].append(value)
            times = rows["time_s"]
            if len(times) >= 2 and times[-1] <= times[-2]:
                raise SeriesFormatError(f"{path}, line {line_no}: time_s {times[-1]} is not after the previous "
                                        f"time {times[-2]}; times must increase")
    if not rows["time_s"]:
        raise SeriesFormatError(f"{path}: no data rows")
    n = len(rows["time_s"])
    return Series(time_s=np.array(rows["time_s"]), alpha=np.array(rows["alpha"]),
                  sigma=np.array(rows["sigma"]) if "sigma" in rows else None,
                  exposure_s=np.array(rows["exposure_s"]) if "exposure_s" in rows else np.zeros(n),
                  source=path)


def series_from_arrays(time_s, alpha, sigma=None, exposure_s=None, source: str = "arrays") -> Series:
    """A Series from arrays (times and exposures in s); SeriesFormatError naming the first problem
    (lengths differ, not finite, times not increasing, negative sigma or exposure)."""
    def column(values, name):
        try:
            array = np.asarray(values, dtype=float).reshape(-1)
        except (TypeError, ValueError):
            raise SeriesFormatError(f"{source}: {name} is not an array of numbers") from None
        if not np.all(np.isfinite(array)):
            raise SeriesFormatError(f"{source}: {name}[{int(np.flatnonzero(~np.isfinite(array))[0])}] is not finite")
        return array

    t, a = column(time_s, "time_s"), column(alpha, "alpha")
    if t.size == 0 or t.size != a.size:
        raise SeriesFormatError(f"{source}: time_s has {t.size} values and alpha {a.size}; need as many, at least one")
    if t.size > 1 and not np.all(np.diff(t) > 0):
        j = int(np.flatnonzero(np.diff(t) <= 0)[0]) + 1
        raise SeriesFormatError(f"{source}: time_s[{j}] = {t[j]} is not after time_s[{j - 1}] = {t[j - 1]}")
    extra = {}
    for name, values in (("sigma", sigma), ("exposure_s", exposure_s)):
        if values is None:
            continue
        array = column(np.broadcast_to(np.asarray(values, dtype=float), t.shape), name)
        if np.any(array < 0):
            raise SeriesFormatError(f"{source}: {name} must be >= 0")
        extra[name] = array
    return Series(time_s=t, alpha=a, sigma=extra.get("sigma"),
                  exposure_s=extra.get("exposure_s", np.zeros(t.size)), source=source)


def analyze(time_s, alpha, sigma=None, exposure_s=None, *, gas_time_s: float | None = None,
            config: str | pathlib.Path | None = None, **inference_keys) -> dict:
    """The posterior of a series given as arrays, for notebooks (``beamkin.analyze``).

    ``time_s``: mid-exposure times (s from the series start); ``alpha``: phase fractions (0..1);
    ``sigma``: their standard uncertainties (None = unknown, absorbed by the scatter s);
    ``exposure_s``: exposure per frame (s; a number or an array; None = instantaneous);
    ``gas_time_s``: ts (s), the start of the t0 prior window. Settings: the ``[inference]`` table of
    beamkin/defaults.toml < the TOML file ``config`` < keyword arguments named like its keys
    (``particles=1024``, ``models=["F1", "A2"]``, ``priors={"k": [0.1, 10.0]}``): the live
    service's defaults, so the same data give the live answer. Returns the result dict of
    docs/protocol.md (``models``, ``model_averaged``, ``alert``, ``priors``, ...).
    """
    from beamkin import config as configuration

    table = configuration.load(config)["inference"]
    for key, value in inference_keys.items():
        configuration.set_path({"inference": table}, f"inference.{key}", value)
    settings = InferenceSettings.from_table(table)
    series = series_from_arrays(time_s, alpha, sigma, exposure_s)
    warning = implausible_alpha(series)
    if warning:
        logger.warning("%s", warning)
    return analyze_series(series, engine=engine_for(series, settings, gas_time_s))


def implausible_alpha(series: Series) -> str | None:
    """A warning when alpha leaves ALPHA_PLAUSIBLE (alpha given in percent, usually); None if not."""
    lo, hi = ALPHA_PLAUSIBLE
    outside = (series.alpha < lo) | (series.alpha > hi)
    if not outside.any():
        return None
    hint = " (in percent? alpha is a fraction, 0 to 1)" if float(np.max(series.alpha)) > 2.0 else ""
    return (f"{series.source}: {int(outside.sum())} of {len(series)} alpha values lie outside [{lo}, {hi}] "
            f"(from {float(np.min(series.alpha)):g} to {float(np.max(series.alpha)):g}){hint}")


def load_recording_series(path: str | pathlib.Path) -> Series:
    """The phase fractions of the first series of a beamkin recording (HDF5, sinks.recorder).

    Frames the reducer flagged are left out, as the live sampler left them out; the series
    window (n_frames x frame time) and ts come from the recorded start message, so the offline
    priors are those of the live run.
    """
    from beamkin.recording import read_messages, RecordingInputError, check_recording
    path = str(path)
    try:
        check_recording(path)  # missing, folder, not HDF5, another HDF5 file, empty: one line saying which
    except RecordingInputError as exc:
        raise SeriesFormatError(str(exc)) from None
    start, fractions, batches = None, {}, []
    for _, message in read_messages(path, types=("start", "fraction", "posterior"), with_arrays=False):
        if start is None and message.type == "start":
            start = message
        elif (start is not None and message.type == "fraction" and message.series_id == start.series_id
              and message["status"] == "ok" and message["alpha"] is not None):
            fractions.setdefault(message["frame_index"], message)
        elif start is not None and message.type == "posterior" and message.series_id == start.series_id:
            batches.append(message.get("batch") or [message["frame_index"]])
    if start is None:
        raise SeriesFormatError(f"{path}: the recording has no series start message")
    if not fractions:
        raise SeriesFormatError(f"{path}: series {start.series_id} has no usable phase fractions")
    rows = [fractions[index] for index in sorted(fractions)]
    n_frames, frame_time = start.get("n_frames"), start.get("frame_time_s")
    return Series(time_s=np.array([m["time_s"] for m in rows], dtype=float),
                  alpha=np.array([m["alpha"] for m in rows], dtype=float),
                  sigma=np.array([m["sigma_alpha"] for m in rows], dtype=float),
                  exposure_s=np.array([m["exposure_s"] for m in rows], dtype=float),
                  source=f"{path} (series {start.series_id})",
                  t_end_s=n_frames * frame_time if n_frames and frame_time else None,
                  gas_time_s=start.get("gas_time_s"), start=dict(start.fields),
                  schedule=recorded_schedule(batches, sorted(fractions)))


def recorded_schedule(batches: list[list[int]], frame_indices: list[int]) -> tuple | None:
    """The live run's frames per exact step, from its posteriors' ``batch`` lists, when they
    cover exactly the assimilated frames in order (else None: the run cannot be reproduced
    step for step, e.g. a recording cut short)."""
    if [j for batch in batches for j in batch] != frame_indices:
        return None
    return tuple(len(batch) for batch in batches)


#: file suffix -> reader
READERS: dict[str, Callable[[str | pathlib.Path], Series]] = {
    ".csv": load_csv_series, ".h5": load_recording_series, ".hdf5": load_recording_series,
}


def load_series(path: str | pathlib.Path) -> Series:
    """Load a series with the reader registered for the file's suffix."""
    suffix = pathlib.Path(path).suffix.lower()
    reader = READERS.get(suffix)
    if reader is None:
        raise SeriesFormatError(f"{path}: no reader for {suffix or 'files without suffix'!r} "
                                f"(known: {', '.join(sorted(READERS))})")
    return reader(path)


def analyze_series(series: Series, models=None, priors: Priors | None = None, n_particles: int | None = None,
                   seed: int | None = None, noise: str | None = None, student_nu: float | None = None,
                   gas_time_s: float | None = None,
                   progress: Callable[[int, int], None] | None = None, engine=None,
                   schedule: tuple | None = None) -> dict:
    """Run the online sampler over a whole series and return ``OnlineInference.result()``.

    ``engine``: an OnlineInference already built (``engine_for``: the live service's settings);
    without it one is built from models, priors, n_particles, seed, noise, student_nu, gas_time_s,
    each not given (None) and every other setting being beamkin/defaults.toml's ``[inference]``.
    ``schedule``: frames per exact step (a live run's, ``Series.schedule``), which reproduces that
    run exactly with the same settings and seed; None = one frame per step, which agrees with
    it within Monte Carlo error."""
    from .smc import OnlineInference

    if engine is None:
        if priors is None:
            priors = Priors.for_series(series.default_t_end(), gas_time_s)
        elif priors.t0 is None:
            priors = priors.with_t0_window(0.0 if gas_time_s is None else gas_time_s, series.default_t_end())
        engine = OnlineInference(models=models, priors=priors, n_particles=n_particles, seed=seed, noise=noise,
                                 student_nu=student_nu, gas_time_s=gas_time_s)
    engine.warm_up()
    sizes = schedule if schedule is not None else (1,) * len(series)
    if sum(sizes) != len(series) or min(sizes, default=1) < 1:
        raise ValueError(f"the schedule covers {sum(sizes)} frames in steps {list(sizes)[:8]}..., "
                         f"the series has {len(series)}")
    first = 0
    for size in sizes:
        engine.assimilate_batch([
            (j, float(series.time_s[j]), float(series.exposure_s[j]), float(series.alpha[j]),
             None if series.sigma is None else float(series.sigma[j])) for j in range(first, first + size)])
        first += size
        if progress is not None:
            progress(first, len(series))
    result = engine.result()
    result["input"] = {"source": series.source, "n_frames": len(series)}
    return result


def format_table(result: dict) -> str:
    """Table in the style of Yokoyama et al. (2023): evidence, probability, t0 and k per model."""
    lines = [f"{'model':<6} {'log evidence':>13} {'probability':>12} {'t0 (s)':>20} {'k (1/s)':>20}"]
    order = sorted(result["models"], key=lambda m: -result["models"][m]["log_evidence"])
    for name in order:
        m = result["models"][name]
        t0, k = m["params"]["t0"], m["params"]["k"]
        lines.append(f"{name:<6} {m['log_evidence']:>13.3f} {100 * m['probability']:>11.2f}% "
                     f"{t0['mean']:>10.4f} +- {t0['sd']:<6.4f} {k['mean']:>10.4f} +- {k['sd']:<6.4f}")
    avg = result["model_averaged"]
    # k means something different in every rate law: only t0 is averaged over the models
    lines.append(f"{'model-averaged':<33} {avg['t0']['mean']:>10.4f} +- {avg['t0']['sd']:<6.4f}")
    if result.get("null_model") is not None:
        lines.append(f"{'no reaction':<6} {result['null_model']['log_evidence']:>13.3f} "
                     f"{100 * result['null_model']['probability']:>11.2f}%   "
                     f"(P(reaction) = {100 * result['reaction_probability']:.2f}%)")
    alert = result.get("alert", {})
    if alert.get("time") is not None:
        lines.append(f"onset alert at t = {alert['time']:.4f} s (frame {alert['frame_index']})")
    else:
        lines.append("no onset alert")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``beamkin analyze``: the input, the [inference] and [logging] keys of the
    shared configuration (with short forms), priors, ts and the JSON output."""
    from beamkin import config as configuration

    parser.add_argument("input", help="CSV with time_s, alpha[, sigma][, exposure_s], or a beamkin recording (.h5)")
    configuration.add_arguments(parser, ("inference", "logging"))
    short = parser.add_argument_group("short forms of [inference] keys")
    short.add_argument("--models", dest="cfg:inference.models", metavar="F1,A2,...",
                       help="comma-separated kinetic models (= --inference.models; default: the live service's)")
    short.add_argument("--particles", dest="cfg:inference.particles", metavar="N",
                       help="particles per model (= --inference.particles)")
    short.add_argument("--seed", dest="cfg:inference.seed", metavar="N", help="random seed (= --inference.seed)")
    short.add_argument("--noise", dest="cfg:inference.noise", choices=("normal", "student"),
                       help="noise model (= --inference.noise)")
    short.add_argument("--student-nu", dest="cfg:inference.student_nu", metavar="NU",
                       help="Student-t degrees of freedom (= --inference.student_nu)")
    parser.add_argument("--prior", action="append", default=[], metavar="NAME=LO:HI",
                        help="prior bounds; t0, A, n uniform, k, s log-uniform (repeatable; adds to [inference.priors])")
    parser.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE",
                        help="fix a parameter, e.g. A=1 (repeatable; adds to [inference.priors] fixed)")
    parser.add_argument("--gas-time", type=float, default=None, metavar="SECONDS",
                        help="gas-introduction time ts: start of the t0 prior window "
                             "(default: the recording's ts, else 0)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write the result as JSON ('-' = stdout)")
    parser.add_argument("--schedule", choices=("recorded", "single"), default="recorded",
                        help="recorded: take the frames in the live run's exact steps (a recording's posteriors), "
                             "which reproduces its posterior exactly; single: one frame per step (default: recorded "
                             "when the recording has it)")


def gas_time_from(args: argparse.Namespace, series: Series) -> float | None:
    """ts from --gas-time, else from the series' source (a recording's start message)."""
    return args.gas_time if args.gas_time is not None else series.gas_time_s


def inference_settings(args: argparse.Namespace) -> InferenceSettings:
    """The settings of the [inference] table (defaults < --config < options, plus --prior / --fix
    in its priors), as the live stage builds them (``InferenceSettings.from_config``)."""
    from beamkin import config as configuration

    table = configuration.from_arguments(args)["inference"]
    priors = dict(table.get("priors") or {})
    for text in args.prior:
        name, bounds = parse_prior_option(text)
        priors[name] = list(bounds)
    fixed = dict(priors.get("fixed") or {})
    fixed.update(parse_fix_option(text) for text in args.fix)
    if fixed:
        priors["fixed"] = fixed
    table["priors"] = priors
    return InferenceSettings.from_table(table)


def series_start(series: Series, gas_time_s: float | None) -> dict:
    """The start-message fields the live service would have had for this series: the recorded
    start (ts replaced by ``gas_time_s``), else n_frames and frame_time_s spanning
    [0, series.default_t_end()] (s)."""
    if series.start is not None:
        return {**series.start, "gas_time_s": gas_time_s}
    n = len(series)
    return {"series_id": pathlib.Path(series.source).stem or "series", "n_frames": n,
            "frame_time_s": series.default_t_end() / n, "gas_time_s": gas_time_s}


def engine_for(series: Series, settings: InferenceSettings, gas_time_s: float | None):
    """The OnlineInference the live stage builds for this series with these settings
    (``series.make_engine``)."""
    from .series import make_engine

    return make_engine(settings, series_start(series, gas_time_s))


def _check_output(path: str | None) -> None:
    from beamkin.outputs import check_output_file

    if path and path != "-":
        check_output_file(path, "--json file")


def main(args: argparse.Namespace) -> int:
    """Run the analysis; returns the process exit status (2 for bad input or settings)."""
    from beamkin.config import ConfigError

    try:
        settings = inference_settings(args)
        _check_output(args.json)
        series = load_series(args.input)
        gas_time_s = gas_time_from(args, series)
        engine = engine_for(series, settings, gas_time_s)
    except (OSError, ValueError, ConfigError) as exc:
        print(f"beamkin analyze: {exc}", file=sys.stderr)
        return 2
    warning = implausible_alpha(series)
    if warning:
        print(f"beamkin analyze: warning: {warning}", file=sys.stderr)
    start = time.monotonic()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or done == total:
            last[0] = now
            print(f"\ranalyze: frame {done}/{total} ({now - start:.1f} s)", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    schedule = series.schedule if args.schedule == "recorded" else None
    if schedule is not None and set(schedule) != {1}:
        print(f"analyze: the live run's schedule, {len(schedule)} steps for {len(series)} frames", file=sys.stderr)
    try:
        result = analyze_series(series, engine=engine, progress=progress, schedule=schedule)
    except ValueError as exc:
        print(f"beamkin analyze: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print(format_table(result))
        if args.json:
            try:
                with open(args.json, "w") as fh:
                    json.dump(result, fh, indent=1)
            except OSError as exc:
                print(f"beamkin analyze: cannot write {args.json}: {exc.strerror or exc}", file=sys.stderr)
                return 2
    return 0
