"""Series bookkeeping shared by every source adapter: start -> frames -> end, whatever arrives.

A source decodes its own wire format and hands the :class:`SeriesAssembler` what it found; the
assembler turns that into beamkin protocol messages (``beamkin.protocol.make``) and enforces the
series lifecycle on untrustworthy input:

* a frame before any start, or of another series than the open one: dropped, counted;
* a start while a series is open (its end was lost): an ``end`` with reason ``"aborted"`` is
  synthesised for the open series first (counter ``missing_end``);
* a duplicate frame index: dropped, counted (``duplicate_frame``);
* an end of a series that is not open: dropped, counted (``end_without_start``).

Frame time when the source has no timestamps: ``t_i = i * frame_time + exposure / 2`` seconds
since series start (mid-exposure).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Mapping

import numpy as np

from beamkin.protocol import Message, ProtocolError, make

log = logging.getLogger(__name__)

#: Speed of light times Planck's constant in eV * angstrom: lambda[A] = HC / E[eV].
HC_EV_ANGSTROM = 12398.419843320026


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


class SeriesAssembler:
    """Turns decoded start/frame/end events into validated beamkin messages (see module doc)."""

    def __init__(self, source: str, counters: Counter | None = None) -> None:
        self.source = source
        self.counters: Counter = counters if counters is not None else Counter()
        self.series_id: str | None = None
        self.start_fields: dict[str, Any] | None = None
        self._seen: set[int] = set()
        self._frames = 0

    @property
    def is_open(self) -> bool:
        return self.series_id is not None

    def _count(self, counter: str, text: str, *args: Any, series_id: str | None = None, frame_index: int | None = None) -> None:
        self.counters[counter] += 1
        log.warning(text, *args, extra={"series_id": series_id, "frame_index": frame_index})

    def start(self, fields: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> list[Message]:
        """A series starts: ``fields`` are the start fields except ``source``."""
        out = []
        try:
            message = make("start", arrays=arrays, source=self.source, **fields)
        except ProtocolError as exc:
            self._count("malformed", "dropping invalid start message: %s", exc, series_id=fields.get("series_id"))
            return out
        if self.is_open:
            self._count(
                "missing_end", "series %s had no end before series %s started; ending it as aborted",
                self.series_id, message["series_id"], series_id=self.series_id,
            )
            out.extend(self.end(self.series_id, reason="aborted"))
        self.series_id = message["series_id"]
        self.start_fields = message.fields
        self._seen = set()
        self._frames = 0
        self.counters["series"] += 1
        log.info("series %s started (%s)", self.series_id, self.source, extra={"series_id": self.series_id})
        out.append(message)
        return out

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
    ) -> list[Message]:
        """A frame of ``series_id`` (None: the open series). Returns [] when it is dropped."""
        if not self.is_open:
            self._count("frame_before_start", "dropping frame %s: no series is open", frame_index,
                        series_id=series_id, frame_index=frame_index)
            return []
        if series_id is not None and series_id != self.series_id:
            self._count("series_mismatch", "dropping frame %s of series %s while series %s is open",
                        frame_index, series_id, self.series_id, series_id=series_id, frame_index=frame_index)
            return []
        if frame_index in self._seen:
            self._count("duplicate_frame", "dropping duplicate frame %s", frame_index,
                        series_id=self.series_id, frame_index=frame_index)
            return []
        if "image" in arrays:
            expected = tuple(self.start_fields["detector"]["shape"])
            if arrays["image"].shape != expected:
                self._count("shape_mismatch", "dropping frame %s: image shape %s, detector shape %s",
                            frame_index, arrays["image"].shape, expected,
                            series_id=self.series_id, frame_index=frame_index)
                return []
        if time_s is None:
            time_s = self.frame_time(frame_index)
        if exposure_s is None:
            exposure_s = float(self.start_fields["exposure_s"])
        try:
            message = make("frame", arrays=arrays, series_id=self.series_id, frame_index=int(frame_index),
                           time_s=float(time_s), exposure_s=float(exposure_s))
        except ProtocolError as exc:
            self._count("malformed", "dropping invalid frame %s: %s", frame_index, exc,
                        series_id=self.series_id, frame_index=frame_index)
            return []
        self._seen.add(frame_index)
        self._frames += 1
        self.counters["frames"] += 1
        return [message]

    def end(self, series_id: str | None, reason: str | None = None) -> list[Message]:
        """The end of ``series_id`` (None: the open one); reason defaults from the frame count."""
        if not self.is_open:
            self._count("end_without_start", "dropping end of series %s: no series is open", series_id, series_id=series_id)
            return []
        if series_id is not None and series_id != self.series_id:
            self._count("series_mismatch", "dropping end of series %s while series %s is open",
                        series_id, self.series_id, series_id=series_id)
            return []
        expected = self.start_fields.get("n_frames")
        if reason is None:
            reason = "completed" if expected is None or self._frames >= expected else "aborted"
        if reason == "aborted":
            log.warning("series %s ended aborted after %d of %s frames", self.series_id, self._frames, expected,
                        extra={"series_id": self.series_id})
        message = make("end", series_id=self.series_id, n_frames=self._frames, reason=reason)
        log.info("series %s ended (%s, %d frames)", self.series_id, reason, self._frames, extra={"series_id": self.series_id})
        self.series_id = None
        self.start_fields = None
        self._seen = set()
        return [message]

    def close(self) -> list[Message]:
        """The source is stopping: end an open series as aborted so consumers can close it."""
        if self.is_open:
            return self.end(self.series_id, reason="aborted")
        return []
