"""Series bookkeeping shared by every source adapter: start -> frames -> end, whatever arrives.

A source decodes its own wire format and hands the :class:`SeriesAssembler` what it found; the
assembler turns that into beamkin protocol messages (``beamkin.protocol.make``) and enforces the
series lifecycle on untrustworthy input:

* a frame before any start, or of another series than the open one: dropped, counted;
* a start while a series is open (its end was lost): an ``end`` with reason ``"aborted"`` is
  synthesised for the open series first (counter ``missing_end``);
* a duplicate frame index: dropped, counted (``duplicate_frame``);
* a frame index at or beyond the announced ``n_frames``, or, when the length is unknown, more
  than ``frame_index_window`` beyond the highest index so far: dropped, counted
  (``frame_index_out_of_range``), so a stray ``image_id`` 200 000 in a 36-frame series never
  reaches the analysis;
* an end of a series that is not open: dropped, counted (``end_without_start``).

Each kind of dropped frame is logged once per series as a WARNING (later ones at DEBUG) and
summed up when the series ends, so a flood of bad frames cannot flood the log.

Series ids are sanitised for every sink (:func:`safe_series_id`: percent-encoded UTF-8 outside
``A-Z a-z 0-9 - _ . : + @``, at most 128 characters); an id that had to change keeps the
original in the start's ``user_data["source_series_id"]``.

A rejected start (:meth:`SeriesAssembler.reject`) is loud: one ERROR naming the field and the
value; the series' images and end are counted as belonging to a rejected series
(``rejected_series_frames``, ``rejected_series_end``) without a warning each; and a ``status``
message with a ``rejected`` object (series id, field, value, reason) is emitted for the stage.

Frame time when the source has no timestamps: ``t_i = i * frame_time + exposure / 2`` seconds
since series start (mid-exposure).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from typing import Any, Mapping
from urllib.parse import quote

import numpy as np

from beamkin.protocol import Message, ProtocolError, make

log = logging.getLogger(__name__)

#: Speed of light times Planck's constant in eV * angstrom: lambda[A] = HC / E[eV].
HC_EV_ANGSTROM = 12398.419843320026


#: Characters a series id keeps as they are, besides ASCII letters and digits.
SAFE_ID_CHARACTERS = "-_.:+@"
MAX_SERIES_ID_LENGTH = 128
#: Frames of a series of unknown length accepted beyond the highest frame index so far.
DEFAULT_FRAME_INDEX_WINDOW = 1024


def safe_series_id(raw: str) -> str:
    """A series id safe for every sink (file names, HDF5 names and strings, logs, URLs).

    Characters outside ASCII letters, digits and ``-_.:+@`` are percent-encoded as UTF-8 (so
    NUL becomes ``%00`` and ``%`` itself ``%25``: the mapping is reversible); an empty id becomes
    ``unnamed``; an id longer than 128 characters keeps its first 111 and ``~`` and 16 hex digits
    of its SHA-256.
    """
    text = quote(raw, safe=SAFE_ID_CHARACTERS, errors="surrogatepass")
    if not text:
        return "unnamed"
    if len(text) > MAX_SERIES_ID_LENGTH:
        digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        text = text[: MAX_SERIES_ID_LENGTH - 17] + "~" + digest
    return text


def _log_id(key: Any) -> str | None:
    """A source's series key as it may appear in a log line (sanitised, never raw control characters)."""
    return safe_series_id(key) if isinstance(key, str) else None if key is None else safe_series_id(repr(key))


def wavelength_from_energy(energy_ev: float | None) -> float | None:
    """Wavelength in angstrom of a photon of ``energy_ev`` electronvolts (lambda = hc / E)."""
    if energy_ev is None or not energy_ev > 0:
        return None
    return HC_EV_ANGSTROM / float(energy_ev)


def make_geometry(
    distance_m: float | None = None,
    beam_center_px: tuple[float, float] | list[float] | None = None,
    wavelength_A: float | None = None,
) -> dict[str, Any]:
    """The start message's geometry dict; beam centre as [x (fast, column), y (slow, row)] pixels."""
    return {
        "distance_m": None if distance_m is None else float(distance_m),
        "beam_center_px": None if beam_center_px is None else [float(beam_center_px[0]), float(beam_center_px[1])],
        "wavelength_A": None if wavelength_A is None else float(wavelength_A),
        "rot1_rad": 0.0,
        "rot2_rad": 0.0,
        "rot3_rad": 0.0,
        "poni_file": None,
    }


def make_detector(
    name: str,
    shape: tuple[int, int] | list[int],
    pixel_size_m: tuple[float, float] | list[float] | None,
    saturation: int | None = None,
    bit_depth: int | None = None,
) -> dict[str, Any]:
    """The start message's detector dict; shape [ny, nx], pixel size [py, px] in metres."""
    return {
        "name": str(name),
        "shape": [int(shape[0]), int(shape[1])],
        "pixel_size_m": None if pixel_size_m is None else [float(pixel_size_m[0]), float(pixel_size_m[1])],
        "saturation": None if saturation is None else int(saturation),
        "bit_depth": None if bit_depth is None else int(bit_depth),
    }


def gas_time_from(*mappings: Any) -> float | None:
    """The gas-introduction time ``gas_time_s`` (seconds from series start) of the first mapping having it."""
    for mapping in mappings:
        if isinstance(mapping, Mapping) and "gas_time_s" in mapping:
            value = mapping["gas_time_s"]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
                return float(value)
            log.warning("ignoring non-numeric gas_time_s %r", value)
    return None


class _SeenIndices:
    """The frame indices of a series seen so far, in memory bounded by how far out of order they
    arrive (not by the series length): every index below ``low`` was seen, plus the set above it."""

    __slots__ = ("low", "above")

    def __init__(self) -> None:
        self.low = 0
        self.above: set[int] = set()

    def __contains__(self, index: int) -> bool:
        return index < self.low or index in self.above

    def add(self, index: int) -> None:
        self.above.add(index)
        while self.low in self.above:
            self.above.discard(self.low)
            self.low += 1


class SeriesAssembler:
    """Turns decoded start/frame/end events into validated beamkin messages (see module doc).

    ``frame_index_window``: frames accepted beyond the highest index so far when the series
    length is unknown.
    """

    def __init__(self, source: str, counters: Counter | None = None, *,
                 frame_index_window: int = DEFAULT_FRAME_INDEX_WINDOW) -> None:
        self.source = source
        self.counters: Counter = counters if counters is not None else Counter()
        self.frame_index_window = max(1, int(frame_index_window))
        self.series_id: str | None = None  # the open series' (sanitised) id
        self.source_key: str | None = None  # its id as the source sent it
        self.start_fields: dict[str, Any] | None = None
        self.rejected: dict[str, Any] | None = None  # the last rejected series, until the next start
        self._seen = _SeenIndices()
        self._frames = 0
        self._highest = -1
        self._dropped: Counter = Counter()  # per kind, for the open (or rejected) series

    @property
    def is_open(self) -> bool:
        return self.series_id is not None

    def count_dropped(self, counter: str, text: str, *args: Any, series_id: str | None = None, frame_index: int | None = None,
                      amount: int = 1) -> None:
        """Count a dropped event (``amount`` of them); WARNING the first time per series and kind,
        DEBUG afterwards."""
        self.counters[counter] += amount
        self._dropped[counter] += amount
        level = logging.WARNING if self._dropped[counter] == amount else logging.DEBUG
        if level == logging.WARNING and self.is_open:
            text += " (further ones in this series are counted, not logged)"
        log.log(level, text, *args, extra={"series_id": series_id, "frame_index": frame_index})

    def _key_matches(self, key: str | None, reference: str | None) -> bool:
        return key is None or key == reference

    def start(self, fields: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> list[Message]:
        """A series starts: ``fields`` are the start fields except ``source``; ``fields["series_id"]``
        is the id as the source sent it (sanitised here)."""
        out = []
        fields = dict(fields)
        raw_id = fields.get("series_id")
        if isinstance(raw_id, str):
            safe = safe_series_id(raw_id)
            if safe != raw_id:
                user_data = dict(fields.get("user_data") or {})
                user_data["source_series_id"] = raw_id
                fields["user_data"] = user_data
                fields["series_id"] = safe
                self.counters["series_id_sanitised"] += 1
                log.warning("series id %r sanitised to %r (the original is kept as user_data.source_series_id)",
                            raw_id[:200], safe, extra={"series_id": safe})
        try:
            message = make("start", arrays=arrays, source=self.source, **fields)
        except ProtocolError as exc:
            return self.reject(raw_id if isinstance(raw_id, str) else None, None, None, str(exc))
        if self.is_open:
            self.counters["missing_end"] += 1
            log.warning("series %s had no end before series %s started; ending it as aborted",
                        self.series_id, message["series_id"], extra={"series_id": self.series_id})
            out.extend(self.end(self.source_key, reason="aborted"))
        self.rejected = None
        self.series_id = message["series_id"]
        self.source_key = raw_id if isinstance(raw_id, str) else message["series_id"]
        self.start_fields = message.fields
        self._seen = _SeenIndices()
        self._frames = 0
        self._highest = -1
        self._dropped = Counter()
        self.counters["series"] += 1
        log.info("series %s started (%s)", self.series_id, self.source, extra={"series_id": self.series_id})
        out.append(message)
        return out

    def reject(self, series_key: str | None, field: str | None, value: Any, reason: str) -> list[Message]:
        """A start message that cannot be used: ERROR naming the field and the value; the series'
        images and end are then counted as belonging to a rejected series. Returns the messages to
        emit: an aborted end of a series left open, and a ``status`` saying what was rejected."""
        out: list[Message] = []
        if self.is_open:
            self.counters["missing_end"] += 1
            out.extend(self.close())
        self.counters["series_rejected"] += 1
        shown = None if value is None else str(value)[:200]
        where = f"field {field} = {shown}: " if field is not None else ""
        safe = safe_series_id(series_key) if isinstance(series_key, str) else None
        log.error("rejected the start of series %s: %s%s; its images and end will be counted, not analysed",
                  safe, where, reason, extra={"series_id": safe})
        self.rejected = {"series_id": safe, "key": series_key, "field": field, "value": shown,
                         "reason": f"{where}{reason}", "at_unix_s": time.time()}
        self._dropped = Counter()
        public = {k: v for k, v in self.rejected.items() if k != "key"}
        out.append(make("status", stage="source", series_id=safe,
                        counters={"series_rejected": self.counters["series_rejected"]}, rejected=public))
        return out

    def _belongs_to_rejected(self, series_key: str | None) -> bool:
        return self.rejected is not None and not self.is_open and self._key_matches(series_key, self.rejected["key"])

    def frame_time(self, frame_index: int) -> float:
        """Mid-exposure time of a frame without timestamps: i * frame_time + exposure / 2 (s)."""
        assert self.start_fields is not None
        return frame_index * float(self.start_fields["frame_time_s"]) + float(self.start_fields["exposure_s"]) / 2

    def frame(
        self,
        series_id: str | None,
        frame_index: int,
        arrays: Mapping[str, np.ndarray],
        time_s: float | None = None,
        exposure_s: float | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> list[Message]:
        """A frame of the series the source calls ``series_id`` (None: the open series);
        ``fields``: further header fields (``compression`` of an ``image_compressed`` frame).
        Returns [] when it is dropped."""
        if self._belongs_to_rejected(series_id):
            self.counters["rejected_series_frames"] += 1
            return []
        if not self.is_open:
            self.count_dropped("frame_before_start", "dropping frame %s: no series is open", frame_index,
                               series_id=_log_id(series_id), frame_index=frame_index)
            return []
        if series_id is not None and series_id != self.source_key:
            self.count_dropped("series_mismatch", "dropping frame %s of series %s while series %s is open",
                        frame_index, _log_id(series_id), self.series_id, series_id=self.series_id, frame_index=frame_index)
            return []
        expected_frames = self.start_fields.get("n_frames")
        if expected_frames is not None and expected_frames >= 0 and frame_index >= expected_frames:
            self.count_dropped("frame_index_out_of_range", "dropping frame %s: the series announced %d frames",
                        frame_index, expected_frames, series_id=self.series_id, frame_index=frame_index)
            return []
        if expected_frames is None and frame_index > self._highest + self.frame_index_window:
            self.count_dropped("frame_index_out_of_range",
                        "dropping frame %s: more than %d beyond the highest frame index so far (%d) of a series of unknown length",
                        frame_index, self.frame_index_window, self._highest, series_id=self.series_id, frame_index=frame_index)
            return []
        if frame_index in self._seen:
            self.count_dropped("duplicate_frame", "dropping duplicate frame %s", frame_index,
                        series_id=self.series_id, frame_index=frame_index)
            return []
        fields = dict(fields or {})
        shape = arrays["image"].shape if "image" in arrays else (
            tuple(fields["compression"]["shape"]) if "image_compressed" in arrays and "compression" in fields else None)
        if shape is not None:
            expected = tuple(self.start_fields["detector"]["shape"])
            if shape != expected:
                self.count_dropped("shape_mismatch", "dropping frame %s: image shape %s, detector shape %s",
                            frame_index, shape, expected,
                            series_id=self.series_id, frame_index=frame_index)
                return []
        if time_s is None:
            time_s = self.frame_time(frame_index)
        if exposure_s is None:
            exposure_s = float(self.start_fields["exposure_s"])
        try:
            message = make("frame", arrays=arrays, series_id=self.series_id, frame_index=int(frame_index),
                           time_s=float(time_s), exposure_s=float(exposure_s), **fields)
        except ProtocolError as exc:
            self.count_dropped("malformed", "dropping invalid frame %s: %s", frame_index, exc,
                        series_id=self.series_id, frame_index=frame_index)
            return []
        self._seen.add(frame_index)
        self._highest = max(self._highest, frame_index)
        self._frames += 1
        self.counters["frames"] += 1
        return [message]

    def end(self, series_id: str | None, reason: str | None = None) -> list[Message]:
        """The end of the series the source calls ``series_id`` (None: the open one); reason
        defaults from the frame count."""
        if self._belongs_to_rejected(series_id):
            self.counters["rejected_series_end"] += 1
            log.info("end of rejected series %s (%d of its images were not analysed)", self.rejected["series_id"],
                     self.counters["rejected_series_frames"], extra={"series_id": self.rejected["series_id"]})
            return []
        if not self.is_open:
            self.count_dropped("end_without_start", "dropping end of series %s: no series is open",
                               _log_id(series_id), series_id=_log_id(series_id))
            return []
        if series_id is not None and series_id != self.source_key:
            self.count_dropped("series_mismatch", "dropping end of series %s while series %s is open",
                               _log_id(series_id), self.series_id, series_id=self.series_id)
            return []
        expected = self.start_fields.get("n_frames")
        if reason is None:
            reason = "completed" if expected is None or self._frames >= expected else "aborted"
        if reason == "aborted":
            log.warning("series %s ended aborted after %d of %s frames", self.series_id, self._frames, expected,
                        extra={"series_id": self.series_id})
        if self._dropped:
            log.warning("series %s: frames dropped at the door: %s", self.series_id, dict(self._dropped),
                        extra={"series_id": self.series_id})
        message = make("end", series_id=self.series_id, n_frames=self._frames, reason=reason)
        log.info("series %s ended (%s, %d frames)", self.series_id, reason, self._frames, extra={"series_id": self.series_id})
        self.series_id = None
        self.source_key = None
        self.start_fields = None
        self._seen = _SeenIndices()
        self._dropped = Counter()
        return [message]

    def close(self) -> list[Message]:
        """The source is stopping: end an open series as aborted so consumers can close it."""
        if self.is_open:
            return self.end(self.source_key, reason="aborted")
        return []
