"""Shared, bounded, per-series state of the live dashboard.

One receiver thread feeds inference-stage messages (``start``, ``pattern``, ``fraction``,
``estimate``, ``posterior``, ``alert``, ``status``, ``end``, ``result``) into :class:`DashboardState`; every
browser session reads from it at its own refresh rate. Everything is bounded so memory stays
flat over long runs:

* at most ``max_series`` series are kept (the oldest is dropped first);
* per-frame quantities (alpha, posterior summaries) live in :class:`RollingColumns` ring
  buffers of fixed capacity; a session asks for "rows since total count n" and streams them
  into its ColumnDataSource with the same rollover;
* the pattern heat map (2theta x time) has a fixed number of rows: when it is full, adjacent
  rows are averaged pairwise and each later row averages twice as many frames
  (progressive decimation), so the whole series stays visible at coarser time resolution;
* only the latest pattern, the phase-A reference (first pattern of the series) and the
  phase-B reference (latest pattern whose frame has alpha >= ``PHASE_B_ALPHA``) are kept.

Units: time in seconds, radial axis in degrees 2theta (``unit == "2th_deg"``) or nm^-1
(``"q_nm^-1"``), rates in 1/s, intensities in detector counts.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from beamkin.protocol import Message

log = logging.getLogger(__name__)

#: Patterns are thinned to at most this many points (block means) before they are stored.
MAX_PATTERN_POINTS = 1500
#: Radial bins of the heat map (about one line width, 0.03 degrees, over a 2D detector's range) and its
#: maximum number of time rows.
HEATMAP_BINS = 600
HEATMAP_ROWS = 128
#: A pattern whose frame has alpha at least this large serves as phase-B reference.
PHASE_B_ALPHA = 0.9
#: Capacity of the per-frame ring buffers (alpha points, posterior history).
HISTORY_CAPACITY = 5000
#: Name of the "no reaction" hypothesis (alpha = 0 throughout) among the model probabilities.
NO_REACTION = "no reaction"


class RollingColumns:
    """Fixed-capacity ring buffer of named float columns with a running total row count.

    ``rows_since(n)`` returns the rows appended after the first ``n`` ever appended (as far
    as they are still held) in append order, plus the new total, so readers can stream
    increments without copying the whole buffer.
    """

    def __init__(self, names: list[str], capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"ring buffer capacity must be positive, got {capacity}")
        self.names = list(names)
        self.capacity = int(capacity)
        self._data = {name: np.full(self.capacity, np.nan) for name in self.names}
        self.total = 0

    def add_column(self, name: str) -> None:
        """Add a column (NaN for rows appended before it existed)."""
        if name not in self._data:
            self.names.append(name)
            self._data[name] = np.full(self.capacity, np.nan)

    def append(self, row: dict[str, float]) -> None:
        for name in row:
            self.add_column(name)
        slot = self.total % self.capacity
        for name in self.names:
            value = row.get(name)
            self._data[name][slot] = np.nan if value is None else float(value)
        self.total += 1

    def __len__(self) -> int:
        return min(self.total, self.capacity)

    def rows_since(self, n_seen: int) -> tuple[dict[str, np.ndarray], int]:
        """Rows appended after the first ``n_seen`` rows, oldest first, and the new total."""
        first = max(int(n_seen), self.total - self.capacity, 0)
        indices = np.arange(first, self.total) % self.capacity
        return {name: self._data[name][indices].copy() for name in self.names}, self.total

    def last(self, name: str) -> float:
        if self.total == 0:
            return math.nan
        return float(self._data[name][(self.total - 1) % self.capacity])


def thin_pattern(radial: np.ndarray, intensity: np.ndarray, max_points: int = MAX_PATTERN_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Block-mean a 1D pattern down to at most ``max_points`` points (integrated intensity kept)."""
    radial = np.asarray(radial, dtype=np.float64).ravel()
    intensity = np.asarray(intensity, dtype=np.float64).ravel()
    if radial.shape != intensity.shape:
        raise ValueError(f"pattern radial ({radial.size}) and intensity ({intensity.size}) differ in length")
    block = max(1, math.ceil(radial.size / max_points))
    if block == 1:
        return radial.copy(), intensity.copy()
    n = (radial.size // block) * block
    return radial[:n].reshape(-1, block).mean(axis=1), intensity[:n].reshape(-1, block).mean(axis=1)


class PatternHeatmap:
    """Pattern intensity on a fixed radial grid against time, progressively decimated in time.

    Row r holds the mean of ``stride`` consecutive patterns; ``times`` holds their mean time
    (seconds). When ``rows`` rows are filled, pairs are averaged and ``stride`` doubles.
    """

    def __init__(self, radial_min: float, radial_max: float, bins: int = HEATMAP_BINS, rows: int = HEATMAP_ROWS) -> None:
        if not radial_max > radial_min:
            raise ValueError(f"heat map radial range [{radial_min}, {radial_max}] is empty")
        self.grid = np.linspace(radial_min, radial_max, bins)
        self.capacity = rows - rows % 2
        self.image = np.full((self.capacity, bins), np.nan, dtype=np.float32)
        self.times = np.full(self.capacity, np.nan)
        self.n_rows = 0
        self.stride = 1
        self._pending = np.zeros(bins)
        self._pending_time = 0.0
        self._pending_count = 0
        self.version = 0

    def bin_means(self, radial: np.ndarray, intensity: np.ndarray) -> np.ndarray:
        """Mean intensity of the pattern points in each radial bin of width grid step centred on
        the grid points (a narrow line keeps its integrated intensity, unlike point sampling);
        bins holding no point are interpolated, bins outside the pattern are NaN."""
        step = self.grid[1] - self.grid[0] if self.grid.size > 1 else 1.0
        index = np.floor((radial - self.grid[0]) / step + 0.5).astype(np.int64)
        inside = (index >= 0) & (index < self.grid.size) & np.isfinite(intensity)
        sums = np.bincount(index[inside], weights=intensity[inside], minlength=self.grid.size)
        counts = np.bincount(index[inside], minlength=self.grid.size)
        row = np.interp(self.grid, radial, intensity, left=np.nan, right=np.nan)
        filled = counts > 0
        row[filled] = sums[filled] / counts[filled]
        return row

    def add(self, time_s: float, radial: np.ndarray, intensity: np.ndarray) -> None:
        row = self.bin_means(np.asarray(radial, dtype=float), np.asarray(intensity, dtype=float))
        self._pending += row
        self._pending_time += time_s
        self._pending_count += 1
        if self._pending_count < self.stride:
            return
        if self.n_rows == self.capacity:
            half = self.capacity // 2
            self.image[:half] = 0.5 * (self.image[0::2] + self.image[1::2])
            self.times[:half] = 0.5 * (self.times[0::2] + self.times[1::2])
            self.image[half:] = np.nan
            self.times[half:] = np.nan
            self.n_rows = half
            self.stride *= 2
            if self._pending_count < self.stride:  # the pending row now needs more frames
                return
        self.image[self.n_rows] = self._pending / self._pending_count
        self.times[self.n_rows] = self._pending_time / self._pending_count
        self.n_rows += 1
        self._pending[:] = 0.0
        self._pending_time = 0.0
        self._pending_count = 0
        self.version += 1

    def row_step(self) -> float:
        """Time between adjacent rows (seconds): the median spacing, 1 s before two rows exist."""
        if self.n_rows < 2:
            return 1.0
        step = float(np.median(np.diff(self.times[: self.n_rows])))
        return step if step > 0 else 1.0

    def snapshot(self) -> dict[str, Any] | None:
        """Filled rows (time x radial, float32), their time extent and the radial extent."""
        if self.n_rows == 0:
            return None
        times = self.times[: self.n_rows]
        step = float(np.median(np.diff(times))) if self.n_rows > 1 else 1.0
        if not step > 0:
            step = 1.0
        return {
            "image": self.image[: self.n_rows].copy(),
            "t_min": float(times[0] - step / 2),
            "t_span": float(times[-1] - times[0] + step),
            "radial_min": float(self.grid[0]),
            "radial_span": float(self.grid[-1] - self.grid[0]),
            "stride": self.stride,
            "version": self.version,
        }


@dataclass
class SeriesState:
    """Everything the dashboard shows about one series. Mutated only under the state lock."""

    series_id: str
    start: dict[str, Any] = field(default_factory=dict)
    unit: str = "2th_deg"
    version: int = 0
    fractions: RollingColumns = field(default_factory=lambda: RollingColumns(
        ["frame_index", "time_s", "alpha", "sigma_alpha", "flagged"], HISTORY_CAPACITY))
    history: RollingColumns = field(default_factory=lambda: RollingColumns(
        ["frame_index", "time_s", "onset_probability", "reaction_probability",
         "t0_mean", "t0_sd", "t0_q05", "t0_q50", "t0_q95", "ess_min", "lag_s"], HISTORY_CAPACITY))
    #: per model m: k_q05_m, k_q50_m, k_q95_m (1/s) of every exact posterior (k is never averaged
    #: across models: each rate law has its own k)
    k_history: RollingColumns = field(default_factory=lambda: RollingColumns(["frame_index", "time_s"], HISTORY_CAPACITY))
    model_history: RollingColumns = field(default_factory=lambda: RollingColumns(["time_s"], HISTORY_CAPACITY))
    latest_pattern: dict[str, Any] | None = None
    reference_a: dict[str, Any] | None = None
    reference_b: dict[str, Any] | None = None
    pattern_version: int = 0
    heatmap: PatternHeatmap | None = None
    latest_peaks: list[dict[str, Any]] = field(default_factory=list)
    latest_posterior: dict[str, Any] | None = None
    latest_exact: dict[str, Any] | None = None
    posterior_version: int = 0
    alert: dict[str, Any] | None = None
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    ended: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    recent_alpha: "OrderedDict[int, float]" = field(default_factory=OrderedDict)
    pending_patterns: "OrderedDict[int, dict[str, Any]]" = field(default_factory=OrderedDict)
    fraction_arrivals: deque = field(default_factory=lambda: deque(maxlen=64))

    def frame_rate_hz(self, now: float | None = None, window_s: float = 5.0) -> float | None:
        """Fractions received per second (wall clock) over the last ``window_s`` seconds."""
        now = time.monotonic() if now is None else now
        recent = [t for t in self.fraction_arrivals if now - t <= window_s]
        if len(recent) < 2 or recent[-1] <= recent[0]:
            return None
        return (len(recent) - 1) / (recent[-1] - recent[0])

    def now_posterior(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(the posterior the "now" panels present, the stale estimate it stands in for or None).

        The newest posterior (estimate or exact) is presented unless it is an estimate marked
        ``stale`` (its ESS collapsed: not a trustworthy posterior); then the newest exact
        posterior is presented instead (None before the first one), labelled with the stale
        estimate's frame and how far the exact sampler lags."""
        latest = self.latest_posterior
        if latest is not None and latest.get("estimate") and latest.get("stale"):
            return self.latest_exact, latest
        return latest, None

    @property
    def gas_time_s(self) -> float | None:
        value = self.start.get("gas_time_s")
        return None if value is None else float(value)


class DashboardState:
    """Thread-safe store of the series seen by the dashboard (at most ``max_series``)."""

    def __init__(self, max_series: int = 16) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be at least 1, got {max_series}")
        self.max_series = max_series
        self.lock = threading.RLock()
        self._series: OrderedDict[str, SeriesState] = OrderedDict()
        self.global_status: dict[str, dict[str, Any]] = {}
        self.messages_received = 0
        self.version = 0

    # ---------------------------------------------------------------- reading
    def series_ids(self) -> list[str]:
        with self.lock:
            return list(self._series)

    def latest_series_id(self) -> str | None:
        with self.lock:
            return next(reversed(self._series), None)

    def get(self, series_id: str) -> SeriesState | None:
        """The live series object; read it only while holding ``self.lock``."""
        return self._series.get(series_id)

    # ---------------------------------------------------------------- writing
    def _series_for(self, series_id: str) -> SeriesState:
        series = self._series.get(series_id)
        if series is None:
            series = SeriesState(series_id)
            self._series[series_id] = series
            while len(self._series) > self.max_series:
                dropped, _ = self._series.popitem(last=False)
                log.info("dashboard drops oldest series %s", dropped, extra={"series_id": dropped})
        return series

    def apply(self, message: Message) -> None:
        """Fold one protocol message into the state (unknown types are ignored)."""
        handler = getattr(self, f"_on_{message.type}", None)
        with self.lock:
            self.messages_received += 1
            if message.type == "status":
                self._on_status(message)
                self.version += 1
                return
            if handler is None or message.series_id is None:
                return
            series = self._series_for(message.series_id)
            handler(series, message)
            series.version += 1
            self.version += 1

    def _on_start(self, series: SeriesState, message: Message) -> None:
        series.start = dict(message.fields)

    def _on_end(self, series: SeriesState, message: Message) -> None:
        series.ended = dict(message.fields)

    def _on_result(self, series: SeriesState, message: Message) -> None:
        series.result = dict(message.fields.get("result") or {})

    def _on_alert(self, series: SeriesState, message: Message) -> None:
        if series.alert is None:
            series.alert = dict(message.fields)

    def _on_status(self, message: Message) -> None:
        stage = str(message.fields.get("stage"))
        entry = {"series_id": message.fields.get("series_id"), **dict(message.fields.get("counters") or {})}
        self.global_status[stage] = entry
        series_id = message.fields.get("series_id")
        if series_id is not None and series_id in self._series:
            self._series[series_id].status[stage] = entry
            self._series[series_id].version += 1

    def _on_fraction(self, series: SeriesState, message: Message) -> None:
        f = message.fields
        series.fraction_arrivals.append(time.monotonic())
        alpha = f.get("alpha")
        flagged = f.get("status") != "ok" or alpha is None
        series.fractions.append({
            "frame_index": f["frame_index"], "time_s": f["time_s"],
            "alpha": alpha, "sigma_alpha": f.get("sigma_alpha"), "flagged": 1.0 if flagged else 0.0,
        })
        series.latest_peaks = list(f.get("peaks") or [])
        if alpha is not None and not flagged:
            series.recent_alpha[f["frame_index"]] = float(alpha)
            while len(series.recent_alpha) > 64:
                series.recent_alpha.popitem(last=False)
            pending = series.pending_patterns.pop(f["frame_index"], None)
            if pending is not None and alpha >= PHASE_B_ALPHA:
                series.reference_b = pending
                series.pattern_version += 1

    def _on_pattern(self, series: SeriesState, message: Message) -> None:
        f = message.fields
        radial, intensity = thin_pattern(message.arrays["radial"], message.arrays["intensity"])
        entry = {"frame_index": f["frame_index"], "time_s": float(f["time_s"]), "radial": radial, "intensity": intensity}
        series.unit = f.get("unit", series.unit)
        series.latest_pattern = entry
        if series.reference_a is None:
            series.reference_a = entry
        alpha = series.recent_alpha.get(f["frame_index"])
        if alpha is not None:
            if alpha >= PHASE_B_ALPHA:
                series.reference_b = entry
        else:  # fraction of this frame not seen yet: keep a few patterns waiting for it
            series.pending_patterns[f["frame_index"]] = entry
            while len(series.pending_patterns) > 8:
                series.pending_patterns.popitem(last=False)
        finite = np.isfinite(radial)
        if series.heatmap is None and finite.sum() >= 2:
            series.heatmap = PatternHeatmap(float(radial[finite].min()), float(radial[finite].max()))
        if series.heatmap is not None:
            series.heatmap.add(float(f["time_s"]), radial, intensity)
        series.pattern_version += 1

    def _show_latest(self, series: SeriesState, fields: dict[str, Any], exact: bool) -> None:
        """The "now" panels show the newest frame's posterior: the immediate estimate until the
        exact posterior of the same or a later frame arrives."""
        shown = series.latest_posterior
        if shown is not None and (fields["frame_index"] < shown["frame_index"]
                                  or (fields["frame_index"] == shown["frame_index"] and not exact
                                      and not shown.get("estimate"))):
            return
        series.latest_posterior = {**fields, "estimate": not exact}
        series.posterior_version += 1

    def _on_estimate(self, series: SeriesState, message: Message) -> None:
        self._show_latest(series, message.fields, exact=False)

    def _on_posterior(self, series: SeriesState, message: Message) -> None:
        """Exact posteriors: the "now" panels (unless an estimate of a later frame is shown) and
        the per-frame history (estimates are not kept in the history)."""
        f = message.fields
        self._show_latest(series, f, exact=True)
        if series.latest_exact is None or f["frame_index"] >= series.latest_exact["frame_index"]:
            series.latest_exact = {**f, "estimate": False}
            series.posterior_version += 1  # a stale estimate on show gives way to it
        averaged = f.get("model_averaged") or {}
        diagnostics = f.get("diagnostics") or {}
        ess_values = [m.get("diagnostics", {}).get("ess") for m in (f.get("models") or {}).values()]
        ess_values = [float(v) for v in ess_values if isinstance(v, (int, float))]
        reaction = f.get("reaction_probability")
        series.history.append({
            "frame_index": f["frame_index"], "time_s": f["time_s"],
            "onset_probability": f["onset_probability"],
            "reaction_probability": float(reaction) if isinstance(reaction, (int, float)) else None,
            "t0_mean": _stat(averaged, "t0", "mean"), "t0_sd": _stat(averaged, "t0", "sd"),
            "t0_q05": _stat(averaged, "t0", "q05"), "t0_q50": _stat(averaged, "t0", "q50"),
            "t0_q95": _stat(averaged, "t0", "q95"),
            "ess_min": min(ess_values) if ess_values else None,
            "lag_s": next((float(diagnostics[k]) for k in ("lag_s", "latency_s")
                           if isinstance(diagnostics.get(k), (int, float))), None),
        })
        row = {"time_s": f["time_s"]}
        for name, model in (f.get("models") or {}).items():
            probability = model.get("probability")
            row[name] = probability if isinstance(probability, (int, float)) else None
        null = f.get("null_model")
        if isinstance(null, dict) and isinstance(null.get("probability"), (int, float)):
            row[NO_REACTION] = float(null["probability"])
        series.model_history.append(row)
        k_row: dict[str, float | None] = {"frame_index": f["frame_index"], "time_s": f["time_s"]}
        for name, model in (f.get("models") or {}).items():
            k = (model.get("params") or {}).get("k") or {}
            for q in ("q05", "q50", "q95"):
                k_row[f"k_{q}_{name}"] = _stat({"k": k}, "k", q)
        series.k_history.append(k_row)


def _stat(params: dict[str, Any], name: str, key: str) -> float | None:
    value = (params.get(name) or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None
