"""NeXus ``NXdata`` views in a beamkin recording, so facility tools (``silx view rec.h5``) plot it.

``add_nxdata_views(path)`` adds, after the recording is closed, one ``NXentry`` per series
(``/series_<n>``, n = 1, 2, ... in recording order; the root's ``default`` names the first):

``alpha``        alpha(t) with its errors: signal ``alpha`` (dimensionless, 0..1), ``alpha_errors``
                 (one sigma), axis ``time_s`` (s from the series start); frames the reducer
                 flagged are left out.
``patterns``     the integrated patterns against time: signal ``intensity`` (frames x points,
                 counts), ``intensity_errors``, axes ``time_s`` (s) and ``two_theta`` (degrees) or
                 ``q`` (1/nm).
``onset``        the exact posteriors after each frame: signal ``onset_probability``, auxiliary
                 signals ``reaction_probability`` and ``leading_probability``, axis ``time_s``.
``t0``           the model-averaged onset time t0 (s) after each frame: signal ``t0_mean`` with
                 ``t0_mean_errors`` (posterior sd) and auxiliary signals ``t0_q05``, ``t0_q95``.

The entry's ``default`` is ``alpha``. Every group carries ``NX_class``; every dataset its
``units``. The views are copies of what ``/log`` and ``/series`` already hold (readers of the
recording format ignore them), written once the file is complete; running it again replaces them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from sinks.export import recording_arrays
from beamkin.recording import read_messages, check_recording
ENTRY_PREFIX = "series_"
RADIAL_NAMES = {"2th_deg": ("two_theta", "deg"), "q_nm^-1": ("q", "1/nm")}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _posterior_rows(path: str | Path) -> dict[str, list[dict]]:
    """Per series, the exact posteriors' summaries in recorded order (times in s)."""
    rows: dict[str, list[dict]] = {}
    for _, message in read_messages(path, types=("posterior",), with_arrays=False):
        averaged = (message.get("model_averaged") or {}).get("t0") or {}
        models = message.get("models") or {}
        leading = models.get(message.get("leading_model")) or {}
        rows.setdefault(message.series_id, []).append({
            "time_s": _number(message.get("time_s")),
            "onset_probability": _number(message.get("onset_probability")),
            "reaction_probability": _number(message.get("reaction_probability", 1.0)),
            "leading_probability": _number(leading.get("probability")),
            "t0_mean": _number(averaged.get("mean")), "t0_sd": _number(averaged.get("sd")),
            "t0_q05": _number(averaged.get("q05")), "t0_q95": _number(averaged.get("q95")),
        })
    return rows


def _series_ids(path: str | Path) -> list[str]:
    ids: list[str] = []
    for _, message in read_messages(path, types=("start",), with_arrays=False):
        if message.series_id not in ids:
            ids.append(message.series_id)
    return ids


def _nxdata(entry: h5py.Group, name: str, signal: str, axes: list[str], datasets: dict[str, tuple],
            auxiliary: list[str] | None = None, title: str = "") -> None:
    group = entry.create_group(name)
    group.attrs["NX_class"] = "NXdata"
    group.attrs["signal"] = signal
    group.attrs["axes"] = np.array(axes, dtype=h5py.string_dtype())
    if auxiliary:
        group.attrs["auxiliary_signals"] = np.array(auxiliary, dtype=h5py.string_dtype())
    if title:
        group.attrs["title"] = title
    for key, (values, units) in datasets.items():
        dataset = group.create_dataset(key, data=np.asarray(values, dtype=float))
        dataset.attrs["units"] = units
    for index, axis in enumerate(axes):
        group.attrs[f"{axis}_indices"] = index


def add_nxdata_views(path: str | Path) -> list[str]:
    """Write the NXentry views of every series of the recording at ``path``; returns their names.

    RecordingInputError (beamkin.recording) if the file is not a recording."""
    check_recording(path)
    series = [(sid, recording_arrays(path, sid)) for sid in _series_ids(path)]
    posteriors = _posterior_rows(path)
    names = []
    with h5py.File(path, "r+") as f:
        for name in [key for key in f if key.startswith(ENTRY_PREFIX)]:
            del f[name]
        for number, (sid, arrays) in enumerate(series, start=1):
            name = f"{ENTRY_PREFIX}{number}"
            entry = f.create_group(name)
            entry.attrs["NX_class"] = "NXentry"
            entry.attrs["default"] = "alpha"
            entry.create_dataset("title", data=f"beamkin series {sid}")
            entry.create_dataset("series_id", data=sid)
            ok = arrays["ok"]
            _nxdata(entry, "alpha", "alpha", ["time_s"], {
                "alpha": (arrays["alpha"][ok], ""), "alpha_errors": (arrays["sigma_alpha"][ok], ""),
                "time_s": (arrays["time_s"][ok], "s")}, title="phase fraction alpha(t)")
            if arrays["radial"] is not None:
                radial_name, radial_units = RADIAL_NAMES.get(arrays["unit"], ("radial", ""))
                _nxdata(entry, "patterns", "intensity", ["time_s", radial_name], {
                    "intensity": (arrays["intensity"], "counts"),
                    "intensity_errors": (arrays["intensity_sigma"], "counts"),
                    "time_s": (arrays["pattern_time_s"], "s"), radial_name: (arrays["radial"], radial_units)},
                    title="integrated patterns against time")
            rows = posteriors.get(sid) or []
            if rows:
                column = {key: [row[key] for row in rows] for key in rows[0]}
                _nxdata(entry, "onset", "onset_probability", ["time_s"], {
                    "onset_probability": (column["onset_probability"], ""),
                    "reaction_probability": (column["reaction_probability"], ""),
                    "leading_probability": (column["leading_probability"], ""),
                    "time_s": (column["time_s"], "s")},
                    auxiliary=["reaction_probability", "leading_probability"], title="onset probability after each frame")
                _nxdata(entry, "t0", "t0_mean", ["time_s"], {
                    "t0_mean": (column["t0_mean"], "s"), "t0_mean_errors": (column["t0_sd"], "s"),
                    "t0_q05": (column["t0_q05"], "s"), "t0_q95": (column["t0_q95"], "s"),
                    "time_s": (column["time_s"], "s")},
                    auxiliary=["t0_q05", "t0_q95"], title="model-averaged onset time t0 after each frame")
            names.append(name)
        if names:
            f.attrs["NX_class"] = "NXroot"
            f.attrs["default"] = names[0]
    return names
