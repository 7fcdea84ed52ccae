"""``export_csv(recording, out_dir)``: a recording's patterns, fractions and posterior summaries as CSV.

Files written (only those the recording has data for)::

    fractions.csv    series_id, frame_index, time_s, exposure_s, alpha, sigma_alpha, status, reason
    patterns.csv     series_id, frame_index, time_s, unit, radial, intensity, sigma  (one row per point)
    posteriors.csv   series_id, frame_index, time_s, onset_probability, leading_model, then the flattened
                     ``model_averaged`` and ``models`` summaries (nested keys joined with ".")
    alerts.csv       the alert fields, flattened the same way
    series.csv       one row per series: series_id, source, kind, n_frames (announced), frames recorded,
                     end reason, gas_time_s, frame_time_s, exposure_s

A file that is not a beamkin recording, a recording without messages, or one with nothing of the
above to export raises ``RecordingInputError`` (one line naming the file and the problem) before
anything is written; so does an output folder that cannot be written (``OutputPathError``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from beamkin.outputs import check_output_folder
from beamkin.recording import read_messages, RecordingInputError, check_recording
def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": scalar}; lists of scalars are kept as space-separated text."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list):
        out[prefix] = " ".join(str(v) for v in value) if all(not isinstance(v, (dict, list)) for v in value) else str(value)
    else:
        out[prefix] = value
    return out


def _write(path: Path, columns: list[str], rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def recording_arrays(recording: str | Path, series_id: str | None = None) -> dict[str, Any]:
    """One series of a recording as NumPy arrays, for notebooks (default: the first series).

    Keys: ``series_id``; ``start`` (the start message's fields: geometry, ts as ``gas_time_s``, ...);
    per fraction message, in frame order: ``frame_index``, ``time_s`` (s), ``exposure_s`` (s),
    ``alpha``, ``sigma_alpha`` (NaN where the reducer flagged the frame), ``ok`` (bool);
    per pattern, in frame order: ``pattern_frame_index``, ``pattern_time_s`` (s), ``radial``
    (the first pattern's axis, degrees 2theta or 1/nm as ``unit`` says), ``intensity`` and
    ``intensity_sigma`` (frames x points; rows of another length are NaN-padded);
    ``result``: the series' final result (dict) if recorded, else None.
    RecordingInputError for a file that is not a recording or has no such series."""
    check_recording(recording)
    start, result = None, None
    fractions: dict[int, dict] = {}
    patterns: dict[int, tuple] = {}
    for _, message in read_messages(recording, types=("start", "fraction", "pattern", "result")):
        sid = message.series_id
        if series_id is None and message.type == "start":
            series_id = sid
        if sid != series_id:
            continue
        if message.type == "start" and start is None:
            start = dict(message.fields)
        elif message.type == "fraction":
            fractions.setdefault(message.frame_index, message.fields)
        elif message.type == "pattern" and "intensity" in message.arrays:
            patterns.setdefault(message.frame_index, (message["time_s"], message.get("unit"),
                                                      message.arrays.get("radial"), message.arrays["intensity"],
                                                      message.arrays.get("sigma")))
        elif message.type == "result":
            result = dict(message["result"])
    if series_id is None or (start is None and not fractions and not patterns):
        raise RecordingInputError(f"{recording} has no series {series_id!r}" if series_id
                                  else f"{recording} holds no series")
    order = sorted(fractions)

    def fraction_column(name: str) -> np.ndarray:
        return np.array([np.nan if fractions[j].get(name) is None else fractions[j][name] for j in order], float)

    out: dict[str, Any] = {
        "series_id": series_id, "start": start, "result": result,
        "frame_index": np.array(order, dtype=np.int64), "time_s": fraction_column("time_s"),
        "exposure_s": fraction_column("exposure_s"), "alpha": fraction_column("alpha"),
        "sigma_alpha": fraction_column("sigma_alpha"),
        "ok": np.array([fractions[j].get("status") == "ok" and fractions[j].get("alpha") is not None for j in order]),
    }
    rows = sorted(patterns)
    width = max((patterns[j][3].size for j in rows), default=0)

    def padded(index: int) -> np.ndarray:
        table = np.full((len(rows), width), np.nan)
        for i, j in enumerate(rows):
            values = patterns[j][index]
            if values is not None:
                table[i, :values.size] = values
        return table

    out.update(pattern_frame_index=np.array(rows, dtype=np.int64),
               pattern_time_s=np.array([patterns[j][0] for j in rows], float),
               unit=patterns[rows[0]][1] if rows else None,
               radial=np.asarray(patterns[rows[0]][2], float) if rows and patterns[rows[0]][2] is not None else None,
               intensity=padded(3), intensity_sigma=padded(4))
    return out


def export_csv(recording: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the CSV files described in the module doc into ``out_dir``; returns their paths."""
    out_dir = check_output_folder(out_dir, "export folder")
    check_recording(recording)
    fractions, patterns, posteriors, alerts = [], [], [], []
    series: dict[str, dict[str, Any]] = {}
    for _, message in read_messages(recording, types=("start", "frame", "end", "fraction", "pattern", "posterior", "alert"),
                                    with_arrays=True):
        f = message.fields
        if message.type == "start":
            series.setdefault(f["series_id"], {}).update(
                series_id=f["series_id"], source=f.get("source"), kind=f.get("kind"), n_frames=f.get("n_frames"),
                gas_time_s=f.get("gas_time_s"), frame_time_s=f.get("frame_time_s"), exposure_s=f.get("exposure_s"))
            series[f["series_id"]].setdefault("frames_recorded", 0)
        elif message.type == "frame":
            entry = series.setdefault(f["series_id"], {"series_id": f["series_id"], "frames_recorded": 0})
            entry["frames_recorded"] = entry.get("frames_recorded", 0) + 1
        elif message.type == "end":
            series.setdefault(f["series_id"], {"series_id": f["series_id"]})["end_reason"] = f.get("reason")
        elif message.type == "fraction":
            fractions.append(f)
        elif message.type == "pattern":
            radial = message.arrays.get("radial")
            intensity = message.arrays.get("intensity")
            sigma = message.arrays.get("sigma")
            if radial is None or intensity is None:
                continue
            sigma = np.full(len(radial), np.nan) if sigma is None else sigma
            for r, y, s in zip(radial.tolist(), intensity.tolist(), sigma.tolist()):
                patterns.append({"series_id": f["series_id"], "frame_index": f["frame_index"], "time_s": f["time_s"],
                                 "unit": f.get("unit"), "radial": r, "intensity": y, "sigma": s})
        elif message.type == "posterior":
            row = {k: f.get(k) for k in ("series_id", "frame_index", "time_s", "onset_probability", "leading_model")}
            row.update(flatten(f.get("model_averaged", {}), "model_averaged"))
            row.update(flatten(f.get("models", {}), "models"))
            posteriors.append(row)
        elif message.type == "alert":
            alerts.append(flatten(f))
    if not (series or fractions or patterns or posteriors or alerts):
        raise RecordingInputError(f"{recording} holds no series, fractions, patterns, posteriors or alerts: "
                                  "nothing to export")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def emit(name: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
        if rows:
            path = out_dir / name
            _write(path, columns, rows)
            written.append(path)

    emit("series.csv", ["series_id", "source", "kind", "n_frames", "frames_recorded", "end_reason", "gas_time_s",
                        "frame_time_s", "exposure_s"], list(series.values()))
    emit("fractions.csv", ["series_id", "frame_index", "time_s", "exposure_s", "alpha", "sigma_alpha", "status", "reason"],
         fractions)
    emit("patterns.csv", ["series_id", "frame_index", "time_s", "unit", "radial", "intensity", "sigma"], patterns)

    def union(rows: list[dict[str, Any]], first: list[str]) -> list[str]:
        columns = list(first)
        for row in rows:
            columns.extend(k for k in row if k not in columns)
        return columns

    emit("posteriors.csv", union(posteriors, ["series_id", "frame_index", "time_s", "onset_probability", "leading_model"]),
         posteriors)
    emit("alerts.csv", union(alerts, ["series_id", "frame_index", "time_s"]), alerts)
    return written
