"""DECTRIS Stream V2 decoder: CBOR messages (start / image / end) -> the normalised beamkin series.

Public specification: github.com/dectris/documentation, stream_v2/README.md and
cbor/dectris-compression-tag.md. Each ZeroMQ message is one CBOR map (normally wrapped in the
self-describe tag 55799) whose first key is ``type``. What this module understands:

* RFC 8746 typed arrays, tags 64-87: unsigned/signed integers of 8-64 bits and IEEE floats of
  16-128 bits, big and little endian (tag = 0b010_f_s_e_ll: f float, s signed, e little endian,
  ll log2 of the element size minus the float offset). Big-endian arrays are converted to native
  byte order; binary128 floats (83, 87) are converted to float64 exactly where representable.
* RFC 8746 multi-dimensional arrays: tag 40 (row-major) and tag 1040 (column-major), content a
  typed array or a plain array; ``[dims, data]`` with ``prod(dims) == len(data)``.
* Tag 56500 (DECTRIS compression): ``[algorithm, elem_size, bytes]`` with "bslz4" or "lz4" in
  HDF5 framing, equivalent to the decompressed byte string wherever a byte string may appear.
  With ``decompress="workers"`` (the streamer's default, ``[streamer] decompress``) an image is
  not decompressed here: its payload is checked (header, declared size against the typed array
  and dimensions) and forwarded unchanged as the frame's ``image_compressed`` array with its
  ``compression`` field (docs/protocol.md); the reducer worker decompresses it. Start and end
  messages are always decompressed here. With ``decompress="streamer"`` everything is.
* Tag 55799 (self-described CBOR) around the message.
* Rational times ``[numerator, denominator]`` -> seconds; image time is mid-exposure
  ``(start_time + stop_time) / 2`` relative to ``series_date``.
* Geometry from the start message: ``beam_center_x/y`` (pixels), ``pixel_size_x/y`` (metres),
  ``incident_wavelength`` (angstrom) or ``incident_energy`` (eV; lambda = 12398.42 / E), and the
  sample-detector distance (metres): ``detector_distance`` when present, else the magnitude
  ``|z|`` of ``detector_translation = [x, y, z]``. Real detectors send z negative (an EIGER2 Si
  16M: z = -0.237 m, with x and y equal to the beam centre times the pixel size), so the
  magnitude is taken; which convention was used is logged once per series and kept in
  ``user_data.stream_v2.distance_from``. The streamer passes these values on as they are (no
  sign or range check): the reducer applies stream, then TOML, then PONI geometry, and validates.
* Several channels (thresholds): the one reduced is the ``channel`` option (a name or an index
  into ``channels``), default the first. ``pixel_mask`` and ``flatfield`` of that channel become
  the start message's arrays ``pixel_mask`` (uint32, nonzero = bad) and ``flatfield`` (float32).
  These optional calibration arrays are dropped with one WARNING naming the field when they
  cannot be used (a placeholder such as the 4-byte string real detectors send with
  ``header_detail`` other than ``all``, a wrong shape, a non-numeric type); the series goes on.
* 1D (strip) detectors: ``image_size_y`` 1 or absent, images of dimensions ``[nx]`` or
  ``[1, nx]``: the series has detector shape ``(1, nx)``.
* ``gas_time_s`` from the start message's ``user_data`` (the SIMPLON ``header_appendix``).

A start message that cannot be used (no series id, no valid image size, channels not text) is
rejected loudly (:meth:`streamer.series.SeriesAssembler.reject`: one ERROR naming the field and
the value; the series' images and end are counted, not warned about one by one).

The CBOR layer is streamer.cbor_decode (:func:`~streamer.cbor_decode.decode_message` raises only
:class:`beamkin.errors.StreamDecodeError`); header values are read with streamer.header_fields;
:class:`StreamV2Decoder` turns messages into beamkin messages and never raises: bad input is
dropped and counted, and any other exception while handling one message is logged (series and
frame), counted as ``handler_errors`` and survived. :class:`StreamV2Source` PULLs from a
detector endpoint.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Iterator, Mapping

import numpy as np

from beamkin.detector_socket import pull_parts
from beamkin.protocol import Message
from beamkin import compression
from beamkin.errors import StreamDecodeError
from streamer.cbor_decode import UnusableArray, decode_message, materialise_tree, rational_seconds
from streamer.header_fields import MAX_IMAGE_SIDE, integer_field, number_field, short_text, finite_float, json_safe, user_data_dict
from streamer.series import (DEFAULT_FRAME_INDEX_WINDOW, SeriesAssembler, gas_time_from, make_detector, make_geometry,
                             safe_series_id, wavelength_from_energy)

log = logging.getLogger(__name__)

#: Where compressed images are decompressed ([streamer] decompress)
DECOMPRESS_WHERE = ("workers", "streamer")


class StreamV2Decoder:
    """Stateful Stream V2 -> beamkin message normaliser; :meth:`feed` never raises.

    ``channel``: the channel (threshold) to reduce, a name or an index into the start message's
    ``channels``; None takes the first. ``frame_index_window``: see
    :class:`streamer.series.SeriesAssembler`. ``decompress``: where compressed images are
    decompressed, "streamer" (here, the frame carries ``image``) or "workers" (forwarded as they
    came, the frame carries ``image_compressed`` and ``compression``; see the module doc).
    """

    def __init__(
        self,
        source: str = "dectris2:",
        channel: str | int | None = None,
        *,
        max_bytes: int = compression.DEFAULT_MAX_BYTES,
        counters: Counter | None = None,
        frame_index_window: int = DEFAULT_FRAME_INDEX_WINDOW,
        decompress: str = "streamer",
    ) -> None:
        if decompress not in DECOMPRESS_WHERE:
            raise ValueError(f"decompress must be one of {DECOMPRESS_WHERE}, got {decompress!r}")
        self.decompress = decompress
        self.counters: Counter = counters if counters is not None else Counter()
        self.series = SeriesAssembler(source, self.counters, frame_index_window=frame_index_window)
        self.channel_option = None if channel == "" else channel
        self.max_bytes = max_bytes
        self.channel: str | None = None

    def feed(self, data: bytes | memoryview) -> list[Message]:
        """Decode one ZeroMQ message; returns the beamkin messages it yields (maybe none)."""
        try:
            return self._feed(data)
        except Exception:  # a bug must cost one message, never the stage
            self.counters["handler_errors"] += 1
            log.exception("error handling a Stream V2 message", extra={"series_id": self.series.series_id})
            return []

    def _feed(self, data: bytes | memoryview) -> list[Message]:
        try:
            raw, unknown = decode_message(data, max_bytes=self.max_bytes, defer_compression=self.decompress == "workers")
        except StreamDecodeError as exc:
            self.series.count_dropped(exc.counter, "dropping undecodable Stream V2 message (%s): %s", exc.counter, exc,
                                      series_id=self.series.series_id)
            return []
        if self.decompress == "workers" and raw["type"] != "image":
            raw = materialise_tree(raw)  # only images travel compressed
        if unknown:  # kept as they are (the message goes on); counted, logged once per series
            self.series.count_dropped("unknown_tag", "Stream V2 %s message carries unknown CBOR tags %s",
                                      short_text(raw["type"]), dict(unknown), series_id=self.series.series_id,
                                      amount=sum(unknown.values()))
        handler = {"start": self._start, "image": self._image, "end": self._end}.get(raw["type"])
        if handler is None:
            self.series.count_dropped("unknown_type", "dropping Stream V2 message of unknown type %s", short_text(raw["type"]),
                                      series_id=self.series.series_id)
            return []
        try:
            return handler(raw)
        except StreamDecodeError as exc:
            if raw["type"] == "start":
                key = self.series_key(raw)
                return self.series.reject(key, exc.field, exc.value, str(exc))
            frame_index = raw.get("image_id") if isinstance(raw.get("image_id"), int) else None
            self.series.count_dropped(exc.counter, "dropping Stream V2 %s message (%s): %s", raw["type"], exc.counter, exc,
                                      series_id=self.series.series_id, frame_index=frame_index)
            return []

    def close(self) -> list[Message]:
        """Messages to emit when the stream stops (an aborted end for an open series)."""
        return self.series.close()

    @staticmethod
    def series_key(raw: Mapping) -> str | None:
        """The source's id of a Stream V2 message's series: series_unique_id, else str(series_id).
        (The beamkin series id is this, sanitised: :func:`streamer.series.safe_series_id`.)"""
        unique = raw.get("series_unique_id")
        if isinstance(unique, str) and unique:
            return unique
        number = raw.get("series_id")
        if isinstance(number, int) and not isinstance(number, bool):
            return str(number) if number.bit_length() <= 64 else short_text(number)
        return None

    def _select_channel(self, channels: list[str]) -> str | None:
        """The configured channel; a channel the detector does not send falls back to the first
        (counted as ``unknown_channel`` and logged), so a misconfiguration never loses the series."""
        option = self.channel_option
        if option is None:
            return channels[0] if channels else None
        if isinstance(option, int) or (isinstance(option, str) and option.isdigit() and option not in channels):
            index = int(option)
            if 0 <= index < len(channels):
                return channels[index]
        elif not channels or option in channels:
            return option
        self.counters["unknown_channel"] += 1
        log.error("channel %r is not among the active channels %s; reducing %r instead", option, channels,
                  channels[0] if channels else None)
        return channels[0] if channels else None

    def _channel_array(self, raw: Mapping, name: str, shape: tuple[int, int], series_id: str) -> np.ndarray | None:
        """The selected channel's array of the optional start field ``name`` (pixel_mask,
        flatfield), or None: an array that cannot be used is dropped with one WARNING naming the
        field and what is wrong with it (counter ``unusable_calibration``)."""
        mapping = raw.get(name)
        if mapping is None:
            return None
        problem = None
        array = None
        if not isinstance(mapping, Mapping):
            problem = f"is {short_text(mapping)}, not a map of channel -> array"
        else:
            array = mapping.get(self.channel)
            if array is None:
                return None
            if not isinstance(array, np.ndarray):
                problem = f"[{self.channel!r}] is {short_text(array)}, not an array (a placeholder?)"
            elif array.dtype.kind not in "biuf":
                problem = f"[{self.channel!r}] has type {array.dtype}, not numeric"
            elif array.size != shape[0] * shape[1] or array.ndim not in (1, 2) or (array.ndim == 2 and array.shape != shape):
                problem = f"[{self.channel!r}] has shape {list(array.shape)}, the images {list(shape)}"
        if problem is not None:
            self.counters["unusable_calibration"] += 1
            log.warning("start field %s%s: dropped, the series goes on without it", name, problem,
                        extra={"series_id": series_id})
            return None
        return array.reshape(shape)

    @staticmethod
    def _distance(raw: Mapping, series_id: str) -> tuple[float | None, str | None]:
        """(distance in metres, the convention used): ``detector_distance``, else |z| of
        ``detector_translation`` (real detectors send z < 0); the sign is left to the reducer."""
        distance = number_field(raw, "detector_distance", series_id)
        if distance is not None:
            return distance, "detector_distance"
        translation = raw.get("detector_translation")
        if isinstance(translation, np.ndarray):
            translation = translation.tolist()
        if isinstance(translation, (list, tuple)) and len(translation) == 3:
            z = finite_float(translation[2])
            if z is not None:
                return abs(z), "|detector_translation z|"
        if translation is not None:
            log.warning("ignoring start field detector_translation = %s: not [x, y, z] numbers", short_text(translation),
                        extra={"series_id": series_id})
        return None, None

    def _start(self, raw: Mapping) -> list[Message]:
        series_id = self.series_key(raw)
        if series_id is None:
            raise StreamDecodeError("start message has neither series_unique_id nor series_id", field="series_unique_id",
                                    value=short_text(raw.get("series_unique_id")))
        channels = raw.get("channels")
        if channels is None:
            channels = []
        if not isinstance(channels, (list, tuple)) or not all(isinstance(c, str) for c in channels):
            raise StreamDecodeError("start field channels is not an array of text", field="channels", value=short_text(channels))
        self.channel = self._select_channel(list(channels))
        log_id = safe_series_id(series_id)  # logs never carry the raw id (control characters, NUL)
        sizes = {}
        for key in ("image_size_x", "image_size_y"):
            value = raw.get(key)
            if key == "image_size_y" and value is None:
                value = 1  # a strip (1D) detector
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_IMAGE_SIDE:
                raise StreamDecodeError(f"start field {key} must be an integer in [1, {MAX_IMAGE_SIDE}]",
                                        field=key, value=short_text(value))
            sizes[key] = value
        nx, ny = sizes["image_size_x"], sizes["image_size_y"]
        shape = (ny, nx)
        px, py = number_field(raw, "pixel_size_x", log_id), number_field(raw, "pixel_size_y", log_id)
        distance, distance_from = self._distance(raw, log_id)
        if distance_from is not None:
            log.info("series %s: distance %.6g m from %s", log_id, distance, distance_from, extra={"series_id": log_id})
        else:
            log.info("series %s: no distance in the start message (neither detector_distance nor detector_translation)",
                     log_id, extra={"series_id": log_id})
        bx, by = number_field(raw, "beam_center_x", log_id), number_field(raw, "beam_center_y", log_id)
        wavelength = number_field(raw, "incident_wavelength", log_id)
        if wavelength is None or wavelength <= 0:
            wavelength = wavelength_from_energy(number_field(raw, "incident_energy", log_id))
        count_time = number_field(raw, "count_time", log_id)
        frame_time = number_field(raw, "frame_time", log_id)
        if frame_time is None and count_time is None:
            log.warning("start message has neither frame_time nor count_time; frame times need start/stop times",
                        extra={"series_id": log_id})
        frame_time = frame_time if frame_time is not None else (count_time or 0.0)
        count_time = count_time if count_time is not None else frame_time
        n_frames = integer_field(raw, "number_of_images", log_id, low=1, high=1 << 40)
        user_data = user_data_dict(raw.get("user_data")) if raw.get("user_data") is not None else {}
        description = raw.get("detector_description")
        fields = {
            "series_id": series_id,
            "kind": "image",
            "detector": make_detector(
                description[:200] if isinstance(description, str) else "DECTRIS Stream V2 detector",
                shape,
                None if px is None or py is None else (py, px),
                saturation=integer_field(raw, "saturation_value", log_id),
                bit_depth=integer_field(raw, "bit_depth_image", log_id, low=1, high=64),
            ),
            "geometry": make_geometry(distance, None if bx is None or by is None else (bx, by), wavelength),
            "frame_time_s": frame_time,
            "exposure_s": count_time,
            "n_frames": n_frames,
            "gas_time_s": gas_time_from(user_data),
            "user_data": {**user_data, "stream_v2": {"series_id": json_safe(raw.get("series_id")), "channel": self.channel,
                                                     "channels": list(channels), "distance_from": distance_from}},
        }
        arrays = {}
        mask = self._channel_array(raw, "pixel_mask", shape, log_id)
        if mask is not None:
            arrays["pixel_mask"] = np.ascontiguousarray(mask, dtype=np.uint32)
        flat = self._channel_array(raw, "flatfield", shape, log_id)
        if flat is not None:
            arrays["flatfield"] = np.ascontiguousarray(flat, dtype=np.float32)
        return self.series.start(fields, arrays)

    def _image(self, raw: Mapping) -> list[Message]:
        key = self.series_key(raw)
        image_id = raw.get("image_id")
        if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id < 0:
            raise StreamDecodeError(f"image message has invalid image_id {short_text(image_id)}")
        if self.series.rejected is not None and not self.series.is_open:
            return self.series.frame(key, image_id, {})  # counted as a frame of the rejected series
        data = raw.get("data")
        if not isinstance(data, Mapping) or not data:
            raise StreamDecodeError("image message has no data map")
        channel = self.channel if self.channel is not None else next(iter(data))
        image = data.get(channel)
        if image is None:
            raise StreamDecodeError(f"image {image_id} has no data for channel {short_text(channel)}", "missing_channel")
        if isinstance(image, UnusableArray):
            raise StreamDecodeError(f"image {image_id} channel {short_text(channel)}: {image.reason}", image.counter)
        if isinstance(image, compression.CompressedArray):
            if image.dtype is not None:
                return self._compressed_frame(raw, key, image_id, channel, image)
            image = compression.materialise(image)  # a bare byte string: refused below, as when decompressed here
        if not isinstance(image, np.ndarray) or image.ndim not in (1, 2) or image.dtype.kind not in "biuf":
            raise StreamDecodeError(f"image {image_id} channel {short_text(channel)} is {short_text(image)}, not a 1D or 2D "
                                    "numeric array", "shape_mismatch")
        if image.ndim == 1:
            image = image.reshape(1, -1)  # a strip detector's line
        image = np.ascontiguousarray(image)
        time_s, exposure_s = self._image_times(raw)
        return self.series.frame(key, image_id, {"image": image}, time_s, exposure_s)

    @staticmethod
    def _image_times(raw: Mapping) -> tuple[float | None, float | None]:
        """(mid-exposure time, exposure) in seconds of an image message, None where not sent."""
        time_s = exposure_s = None
        if "start_time" in raw and "stop_time" in raw:
            start = rational_seconds(raw["start_time"], "start_time")
            stop = rational_seconds(raw["stop_time"], "stop_time")
            time_s = (start + stop) / 2
            exposure_s = stop - start
        if "real_time" in raw:
            exposure_s = rational_seconds(raw["real_time"], "real_time")
        return time_s, exposure_s

    def _compressed_frame(self, raw: Mapping, key: str | None, image_id: int, channel: Any,
                          image: compression.CompressedArray) -> list[Message]:
        """A frame forwarding the detector's compressed payload unchanged (``image_compressed``,
        uint8) with what decompressing it needs (``compression``: algorithm, elem_size, dtype,
        shape). Only the header was checked here; the worker decompresses it."""
        if image.shape is None or len(image.shape) not in (1, 2):
            raise StreamDecodeError(f"image {image_id} channel {short_text(channel)} is a compressed array of "
                                    f"dimensions {list(image.shape or [])}, not 1D or 2D", "shape_mismatch")
        shape = (1, image.shape[0]) if len(image.shape) == 1 else image.shape  # a strip detector's line
        time_s, exposure_s = self._image_times(raw)
        descriptor = {"algorithm": image.algorithm, "elem_size": image.elem_size, "dtype": image.dtype.str,
                      "shape": list(shape)}
        payload = np.frombuffer(image.data, dtype=np.uint8)
        return self.series.frame(key, image_id, {"image_compressed": payload}, time_s, exposure_s,
                                 fields={"compression": descriptor})

    def _end(self, raw: Mapping) -> list[Message]:
        return self.series.end(self.series_key(raw))


class StreamV2Source:
    """``dectris2:tcp://HOST:PORT``: CONNECTs a PULL socket to a Stream V2 detector endpoint.

    Options: ``channel`` (name or index), ``max_bytes`` (largest decompressed array accepted),
    ``decompress`` ("workers", the default: images forwarded compressed; "streamer": decompressed here),
    ``poll_ms`` (how often the stop event is checked, default 100 ms).
    """

    def __init__(self, endpoint: str, options: Mapping[str, Any] | None = None, *, spec: str | None = None) -> None:
        options = dict(options or {})
        self.endpoint = endpoint
        self.spec = spec or f"dectris2:{endpoint}"
        self.poll_ms = int(options.get("poll_ms", 100))
        self.decoder = StreamV2Decoder(self.spec, options.get("channel"),
                                       max_bytes=int(options.get("max_bytes", compression.DEFAULT_MAX_BYTES)),
                                       frame_index_window=int(options.get("frame_index_window", DEFAULT_FRAME_INDEX_WINDOW)),
                                       decompress=str(options.get("decompress", "workers")))

    @property
    def counters(self) -> Counter:
        return self.decoder.counters

    def messages(self, stop_event: threading.Event) -> Iterator[Message]:
        for frames in pull_parts(self.endpoint, self.poll_ms, stop_event, "Stream V2"):
            if len(frames) != 1:
                self.counters["malformed"] += 1
                log.warning("dropping Stream V2 message of %d parts (expected one)", len(frames))
                continue
            yield from self.decoder.feed(frames[0].buffer)
        yield from self.decoder.close()
