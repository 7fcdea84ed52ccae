"""Offline analysis of a recorded alpha(t) series with the online sampler (``beamkin analyze``).

The series is fed frame by frame to the same ``OnlineInference`` used live, so the
offline posterior equals the live one for the same data, priors, particles and seed.

Input: a CSV file with a header row and columns ``time_s`` (mid-exposure time, s),
``alpha`` (transformed fraction), optional ``sigma`` (standard uncertainty of alpha) and
optional ``exposure_s`` (s; 0 = instantaneous).  ``load_series`` dispatches on the file
suffix so that other formats (beamkin recordings) can be added to ``READERS``.

The t0 prior window defaults to [ts, t_end] with ts = ``--gas-time`` (else 0) and t_end
= last time + median frame spacing (equal to n_frames * frame_time for frames at
0, dt, 2 dt, ..., which is what the live service uses).
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

from .models import MODEL_NAMES, model_code
from .priors import Priors, parse_fix_option, parse_prior_option

logger = logging.getLogger(__name__)


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
    """Read a CSV series; raises SeriesFormatError naming the line of the first problem."""
    path = str(path)
    with open(path, newline="") as fh:
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


def load_recording_series(path: str | pathlib.Path) -> Series:
    """The phase fractions of the first series of a beamkin recording (HDF5, streamer.recorder).

    Frames the reducer flagged are left out, as the live sampler left them out; the series
    window (n_frames x frame time) and ts come from the recorded start message, so the offline
    priors are those of the live run.
    """
    from streamer.recorder import is_recording, read_messages

    path = str(path)
    if not is_recording(path):
        raise SeriesFormatError(f"{path}: not a beamkin recording")
    start, fractions = None, {}
    for _, message in read_messages(path, types=("start", "fraction"), with_arrays=False):
        if start is None and message.type == "start":
            start = message
        elif (start is not None and message.type == "fraction" and message.series_id == start.series_id
              and message["status"] == "ok" and message["alpha"] is not None):
            fractions.setdefault(message["frame_index"], message)
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
                  gas_time_s=start.get("gas_time_s"))


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


def analyze_series(series: Series, models=MODEL_NAMES, priors: Priors | None = None, n_particles: int = 4096,
                   seed: int = 0, noise: str = "normal", student_nu: float = 4.0, gas_time_s: float | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Run the online sampler over a whole series and return ``OnlineInference.result()``."""
    from .smc import OnlineInference

    if priors is None:
        priors = Priors.for_series(series.default_t_end(), gas_time_s)
    elif priors.t0 is None:
        priors = priors.with_t0_window(0.0 if gas_time_s is None else gas_time_s, series.default_t_end())
    engine = OnlineInference(models=models, priors=priors, n_particles=n_particles, seed=seed, noise=noise,
                             student_nu=student_nu, gas_time_s=gas_time_s)
    engine.warm_up()
    for j in range(len(series)):
        sigma = None if series.sigma is None else float(series.sigma[j])
        engine.assimilate(j, float(series.time_s[j]), float(series.exposure_s[j]), float(series.alpha[j]), sigma)
        if progress is not None:
            progress(j + 1, len(series))
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
    lines.append(f"{'model-averaged':<33} {avg['t0']['mean']:>10.4f} +- {avg['t0']['sd']:<6.4f} "
                 f"{avg['k']['mean']:>10.4f} +- {avg['k']['sd']:<6.4f}")
    alert = result.get("alert", {})
    if alert.get("time") is not None:
        lines.append(f"onset alert at t = {alert['time']:.4f} s (frame {alert['frame_index']})")
    else:
        lines.append("no onset alert")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="CSV with time_s, alpha[, sigma][, exposure_s], or a beamkin recording (.h5)")
    parser.add_argument("--models", default=",".join(MODEL_NAMES),
                        help="comma-separated kinetic models (default: all 16)")
    parser.add_argument("--prior", action="append", default=[], metavar="NAME=LO:HI",
                        help="prior bounds; t0, A, n uniform, k, s log-uniform (repeatable)")
    parser.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE",
                        help="fix a parameter, e.g. A=1 (repeatable)")
    parser.add_argument("--particles", type=int, default=4096, help="particles per model (default 4096)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--noise", choices=("normal", "student"), default="normal", help="noise model")
    parser.add_argument("--student-nu", type=float, default=4.0, help="Student-t degrees of freedom")
    parser.add_argument("--gas-time", type=float, default=None, metavar="SECONDS",
                        help="gas-introduction time ts: start of the t0 prior window (default 0)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write the result as JSON ('-' = stdout)")


def gas_time_from(args: argparse.Namespace, series: Series) -> float | None:
    """ts from --gas-time, else from the series' source (a recording's start message)."""
    return args.gas_time if args.gas_time is not None else series.gas_time_s


def priors_from_args(args: argparse.Namespace, series: Series) -> Priors:
    gas_time_s = gas_time_from(args, series)
    t_lo = 0.0 if gas_time_s is None else float(gas_time_s)
    values: dict = {"t0": (t_lo, series.default_t_end())}
    for text in args.prior:
        name, bounds = parse_prior_option(text)
        values[name] = bounds
    fixed = dict(parse_fix_option(text) for text in args.fix)
    return Priors(**values, fixed=fixed)


def main(args: argparse.Namespace) -> int:
    """Run the analysis; returns the process exit status (2 for bad input)."""
    try:
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        for m in models:
            model_code(m)
        series = load_series(args.input)
        priors = priors_from_args(args, series)
    except (OSError, ValueError) as exc:
        print(f"beamkin analyze: {exc}", file=sys.stderr)
        return 2
    start = time.monotonic()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or done == total:
            last[0] = now
            print(f"\ranalyze: frame {done}/{total} ({now - start:.1f} s)", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    try:
        result = analyze_series(series, models=models, priors=priors, n_particles=args.particles, seed=args.seed,
                                noise=args.noise, student_nu=args.student_nu,
                                gas_time_s=gas_time_from(args, series),
                                progress=progress)
    except ValueError as exc:
        print(f"beamkin analyze: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print(format_table(result))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
    return 0
