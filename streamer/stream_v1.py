"""DECTRIS Stream V1 ("legacy" SIMPLON stream): JSON multipart messages -> the normalised series.

Each ZeroMQ multipart message is one of (``htype`` of its first part)::

    dheader-1.0      [{"htype", "series", "header_detail"}, config JSON (basic/all),
                      (all:) {"htype": "dflatfield-1.0", "shape": [x, y], "type"}, blob,
                             {"htype": "dpixelmask-1.0", ...}, blob, {"htype": "dcountrate_table-1.0", ...}, blob,
                      optional header appendix (text, JSON for beamkin: {"gas_time_s": ...})]
    dimage-1.0       [{"htype": "dimage-1.0", "series", "frame", "hash"},
                      {"htype": "dimage_d-1.0", "shape": [x, y], "type", "encoding", "size"}, blob,
                      {"htype": "dconfig-1.0", "start_time", "stop_time", "real_time"} (nanoseconds),
                      optional image appendix]
    dseries_end-1.0  [{"htype": "dseries_end-1.0", "series"}]

Shapes are [x (width), y (height)]; arrays become (y, x). Encodings: ``<`` (raw little endian),
``lz4<`` (one LZ4 block of the whole image), ``bs8-lz4<`` / ``bs16-lz4<`` / ``bs32-lz4<``
(bitshuffle + LZ4, with or without the 12-byte HDF5 framing header). Frame time: mid-exposure
``(start_time + stop_time) / 2 * 1e-9`` s. The config part gives the geometry (beam_center_x/y
in pixels, detector_distance and x/y_pixel_size in metres, wavelength in angstrom or
photon_energy in eV), nimages * ntrigger frames, count_time and frame_time (s).

Every multipart message is decoded on its own ``htype``, so the decoder resynchronises after an
aborted series: a new header while a series is open ends it as ``aborted``. With
``header_detail = "none"`` the start message is emitted at the first image (shape from it).

:meth:`StreamV1Decoder.feed` never raises: bad input is dropped and counted (JSON nested too
deep, times that are not finite numbers of nanoseconds, sizes out of range included), a header
that cannot start a series is rejected loudly (one ERROR naming the field and the value, see
:meth:`streamer.series.SeriesAssembler.reject`), and any other exception while handling one
message is logged, counted as ``handler_errors`` and survived.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from typing import Any, Iterator, Mapping, Sequence

import bitshuffle
import lz4.block
import numpy as np

from beamkin.detector_socket import pull_parts
from beamkin.protocol import Message
from beamkin import compression
from beamkin.errors import StreamDecodeError
from streamer.series import (DEFAULT_FRAME_INDEX_WINDOW, SeriesAssembler, gas_time_from, make_detector, make_geometry,
                             wavelength_from_energy)
from streamer.header_fields import MAX_IMAGE_SIDE, MAX_TIME_S, finite_float, short_text, user_data_dict

log = logging.getLogger(__name__)

DTYPES = {"uint8": "<u1", "uint16": "<u2", "uint32": "<u4", "int32": "<i4", "float32": "<f4", "float64": "<f8"}
ENCODINGS = ("<", "lz4<", "bs8-lz4<", "bs16-lz4<", "bs32-lz4<")


def _part_bytes(part: Any) -> bytes:
    buffer = getattr(part, "buffer", part)
    return bytes(buffer)


def _json_part(part: Any, what: str) -> dict:
    try:
        value = json.loads(_part_bytes(part))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StreamDecodeError(f"{what} is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise StreamDecodeError(f"{what} nests JSON too deeply") from exc
    if not isinstance(value, dict):
        raise StreamDecodeError(f"{what} is a JSON {type(value).__name__}, not an object")
    return value


def _shape_yx(shape: Any, what: str) -> tuple[int, int]:
    if (
        not isinstance(shape, list) or len(shape) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n < 1 << 20 for n in shape)
    ):
        raise StreamDecodeError(f"{what} shape {shape!r:.60} is not [x, y] positive integers")
    return shape[1], shape[0]


def _dtype(name: Any, what: str) -> np.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise StreamDecodeError(f"{what} type {name!r:.40} is not one of {sorted(DTYPES)}")
    return np.dtype(DTYPES[name])


def decode_blob(blob: bytes, shape_yx: tuple[int, int], dtype: np.dtype, encoding: str, *,
                max_bytes: int = compression.DEFAULT_MAX_BYTES) -> np.ndarray:
    """An image blob in one of the V1 encodings -> (y, x) array; raises StreamDecodeError."""
    nbytes = shape_yx[0] * shape_yx[1] * dtype.itemsize
    if nbytes > max_bytes:
        raise StreamDecodeError(f"image of {nbytes} bytes exceeds the limit {max_bytes}")
    if encoding != "<" and nbytes > compression.max_lz4_output(len(blob)):
        raise StreamDecodeError(f"{len(blob)} compressed bytes cannot hold a {list(shape_yx)} {dtype} image")
    if encoding == "<":
        raw = blob
    elif encoding == "lz4<":
        try:
            raw = lz4.block.decompress(blob, uncompressed_size=nbytes)
        except lz4.block.LZ4BlockError as exc:
            raise StreamDecodeError(f"lz4 decompression failed: {exc}") from exc
    elif encoding in ("bs8-lz4<", "bs16-lz4<", "bs32-lz4<"):
        elem_size = int(encoding[2:-5]) // 8
        if elem_size != dtype.itemsize:
            raise StreamDecodeError(f"encoding {encoding} does not match type {dtype}")
        if len(blob) >= 12 and int.from_bytes(blob[:8], "big") == nbytes:  # HDF5-framed
            raw = compression.decompress(blob, "bslz4", elem_size, max_bytes=max_bytes)
        else:
            try:
                raw = bitshuffle.decompress_lz4(np.frombuffer(blob, np.uint8), (shape_yx[0] * shape_yx[1],), dtype).tobytes()
            except Exception as exc:  # the C extension raises several types for corrupt data
                raise StreamDecodeError(f"bitshuffle-lz4 decompression failed: {type(exc).__name__}: {exc}") from exc
    else:
        raise StreamDecodeError(f"unknown encoding {encoding!r:.40}", "unsupported_compression")
    if len(raw) != nbytes:
        raise StreamDecodeError(f"image data has {len(raw)} bytes, shape {list(shape_yx)} of {dtype} needs {nbytes}",
                                "shape_mismatch")
    return np.frombuffer(raw, dtype=dtype).reshape(shape_yx)


def _num(config: Mapping, key: str) -> float | None:
    """A finite number of the header config (SIMPLON ``{"value": x}`` or plain), else None."""
    value = config.get(key)
    if isinstance(value, dict):  # SIMPLON style {"value": ...}
        value = value.get("value")
    return finite_float(value)


def _nanoseconds(times: Mapping, key: str) -> float | None:
    """A dconfig time in nanoseconds as seconds; StreamDecodeError unless a finite number within
    +-MAX_TIME_S seconds; None when absent."""
    value = times.get(key)
    if value is None:
        return None
    number = finite_float(value)
    if number is None or abs(number) * 1e-9 > MAX_TIME_S:
        raise StreamDecodeError(f"dconfig {key} {short_text(value)} is not a time in nanoseconds within +-{MAX_TIME_S:g} s",
                                field=key, value=short_text(value))
    return number * 1e-9


class StreamV1Decoder:
    """Stateful Stream V1 -> beamkin message normaliser; :meth:`feed` never raises for bad input."""

    def __init__(self, source: str = "dectris1:", *, max_bytes: int = compression.DEFAULT_MAX_BYTES,
                 counters: Counter | None = None, frame_index_window: int = DEFAULT_FRAME_INDEX_WINDOW) -> None:
        self.counters: Counter = counters if counters is not None else Counter()
        self.series = SeriesAssembler(source, self.counters, frame_index_window=frame_index_window)
        self.max_bytes = max_bytes
        self._pending: dict[str, Any] | None = None  # header without config, waiting for the first image

    def feed(self, parts: Sequence[Any]) -> list[Message]:
        """Decode one multipart message; returns the beamkin messages it yields (maybe none)."""
        try:
            return self._feed(parts)
        except Exception:  # a bug must cost one message, never the stage
            self.counters["handler_errors"] += 1
            log.exception("error handling a Stream V1 message", extra={"series_id": self.series.series_id})
            return []

    def _feed(self, parts: Sequence[Any]) -> list[Message]:
        htype = None
        first: Mapping = {}
        try:
            if not parts:
                raise StreamDecodeError("empty multipart message")
            first = _json_part(parts[0], "first part")
            htype = first.get("htype")
            if htype == "dheader-1.0":
                return self._header(first, parts)
            if htype == "dimage-1.0":
                return self._image(first, parts)
            if htype == "dseries_end-1.0":
                return self._end(first)
            raise StreamDecodeError(f"unknown htype {short_text(htype, 40)}", "unknown_htype")
        except StreamDecodeError as exc:
            if htype == "dheader-1.0":
                key = first.get("series")
                key = str(key) if isinstance(key, (int, str)) and not isinstance(key, bool) else None
                return self.series.reject(key, exc.field, exc.value, str(exc))
            frame = first.get("frame") if isinstance(first.get("frame"), int) else None
            self.series.count_dropped(exc.counter, "dropping Stream V1 message (%s): %s", exc.counter, exc,
                                      series_id=self.series.series_id, frame_index=frame)
            return []

    def close(self) -> list[Message]:
        return self.series.close()

    @staticmethod
    def _series(value: Any) -> str:
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            raise StreamDecodeError(f"series {short_text(value, 40)} is not a number", field="series", value=short_text(value))
        return str(value)

    def _header(self, first: Mapping, parts: Sequence[Any]) -> list[Message]:
        series_id = self._series(first.get("series"))
        config: dict = {}
        arrays: dict[str, np.ndarray] = {}
        appendix: Any = None
        rest = list(parts[1:])
        if rest and first.get("header_detail", "basic") != "none":
            config = _json_part(rest.pop(0), "header config part")
        while rest:
            part = rest.pop(0)
            try:
                meta = json.loads(_part_bytes(part))
            except (UnicodeDecodeError, ValueError, RecursionError):
                meta = None
            htype = meta.get("htype") if isinstance(meta, dict) else None
            if htype in ("dflatfield-1.0", "dpixelmask-1.0", "dcountrate_table-1.0"):
                if not rest:
                    raise StreamDecodeError(f"{htype} part has no data part")
                blob = _part_bytes(rest.pop(0))
                if htype == "dcountrate_table-1.0":
                    continue
                try:
                    dtype = _dtype(meta.get("type"), htype)
                    shape = _shape_yx(meta.get("shape"), htype)
                    array = decode_blob(blob, shape, dtype, "<", max_bytes=self.max_bytes)
                except StreamDecodeError as exc:  # an optional calibration array: the series goes on without it
                    self.counters["unusable_calibration"] += 1
                    log.warning("header part %s: %s; dropped, the series goes on without it", htype, exc,
                                extra={"series_id": series_id})
                    continue
                if htype == "dflatfield-1.0":
                    arrays["flatfield"] = np.ascontiguousarray(array, dtype=np.float32)
                else:
                    arrays["pixel_mask"] = np.ascontiguousarray(array, dtype=np.uint32)
            else:
                appendix = meta if meta is not None else _part_bytes(part).decode(errors="replace")
        user_data = user_data_dict(appendix) if appendix is not None else {}
        if not config:
            out = self.series.close() if self.series.is_open else []
            if out:
                self.counters["missing_end"] += 1
            self._pending = {"series_id": series_id, "user_data": user_data, "arrays": arrays}
            return out
        self._pending = None
        return self.series.start(self._start_fields(series_id, config, user_data, None), arrays)

    def _start_fields(self, series_id: str, config: Mapping, user_data: dict, shape: tuple[int, int] | None) -> dict:
        nx, ny = _num(config, "x_pixels_in_detector"), _num(config, "y_pixels_in_detector")
        if nx is not None and ny is not None:
            for name, value in (("x_pixels_in_detector", nx), ("y_pixels_in_detector", ny)):
                if not (1 <= value <= MAX_IMAGE_SIDE and value == int(value)):
                    raise StreamDecodeError(f"header config {name} must be an integer in [1, {MAX_IMAGE_SIDE}]",
                                            field=name, value=short_text(value))
            shape = (int(ny), int(nx))
        if shape is None:
            raise StreamDecodeError("header config lacks x/y_pixels_in_detector", field="x_pixels_in_detector",
                                    value=short_text(config.get("x_pixels_in_detector")))
        px, py = _num(config, "x_pixel_size"), _num(config, "y_pixel_size")
        bx, by = _num(config, "beam_center_x"), _num(config, "beam_center_y")
        wavelength = _num(config, "wavelength") or wavelength_from_energy(_num(config, "photon_energy"))
        count_time, frame_time = _num(config, "count_time"), _num(config, "frame_time")
        frame_time = frame_time if frame_time is not None else (count_time or 0.0)
        count_time = count_time if count_time is not None else frame_time
        nimages, ntrigger = _num(config, "nimages"), _num(config, "ntrigger")
        if nimages is not None and not 1 <= nimages * (ntrigger or 1) <= 1 << 40:
            log.warning("ignoring header config nimages = %s x ntrigger = %s: not a frame count", nimages, ntrigger,
                        extra={"series_id": series_id})
            nimages = None
        saturation = _num(config, "countrate_correction_count_cutoff")
        bit_depth = _num(config, "bit_depth_image")
        description = config.get("description")
        return {
            "series_id": series_id,
            "kind": "image",
            "detector": make_detector(description if isinstance(description, str) else "DECTRIS Stream V1 detector",
                                      shape, None if px is None or py is None else (py, px),
                                      None if saturation is None else int(saturation),
                                      None if bit_depth is None else int(bit_depth)),
            "geometry": make_geometry(_num(config, "detector_distance"), None if bx is None or by is None else (bx, by),
                                      wavelength),
            "frame_time_s": frame_time,
            "exposure_s": count_time,
            "n_frames": None if nimages is None else int(nimages * (ntrigger or 1)),
            "gas_time_s": gas_time_from(user_data),
            "user_data": user_data,
        }

    def _image(self, first: Mapping, parts: Sequence[Any]) -> list[Message]:
        series_id = self._series(first.get("series"))
        frame = first.get("frame")
        if not isinstance(frame, int) or isinstance(frame, bool) or frame < 0:
            raise StreamDecodeError(f"image frame number {frame!r:.40} is invalid")
        if len(parts) < 3:
            raise StreamDecodeError(f"image message has {len(parts)} parts, expected at least 3")
        meta = _json_part(parts[1], "dimage_d part")
        if meta.get("htype") != "dimage_d-1.0":
            raise StreamDecodeError(f"second image part has htype {meta.get('htype')!r:.40}, expected dimage_d-1.0")
        shape = _shape_yx(meta.get("shape"), "image")
        dtype = _dtype(meta.get("type"), "image")
        image = decode_blob(_part_bytes(parts[2]), shape, dtype, str(meta.get("encoding", "<")), max_bytes=self.max_bytes)
        out: list[Message] = []
        if self._pending is not None and self._pending["series_id"] == series_id:
            pending, self._pending = self._pending, None
            out.extend(self.series.start(self._start_fields(series_id, {}, pending["user_data"], shape), pending["arrays"]))
        time_s = exposure_s = None
        if len(parts) >= 4:
            times = _json_part(parts[3], "dconfig part")
            start, stop, real = (_nanoseconds(times, k) for k in ("start_time", "stop_time", "real_time"))
            if start is not None and stop is not None:
                time_s = (start + stop) / 2
                exposure_s = stop - start
            if real is not None:
                exposure_s = real
        out.extend(self.series.frame(series_id, frame, {"image": image}, time_s, exposure_s))
        return out

    def _end(self, first: Mapping) -> list[Message]:
        series_id = self._series(first.get("series"))
        if self._pending is not None and self._pending["series_id"] == series_id:
            self._pending = None  # a series without a single image
            return []
        return self.series.end(series_id)


class StreamV1Source:
    """``dectris1:tcp://HOST:PORT``: CONNECTs a PULL socket to a Stream V1 endpoint (default port 9999)."""

    def __init__(self, endpoint: str, options: Mapping[str, Any] | None = None, *, spec: str | None = None) -> None:
        options = dict(options or {})
        self.endpoint = endpoint
        self.spec = spec or f"dectris1:{endpoint}"
        self.poll_ms = int(options.get("poll_ms", 100))
        self.decoder = StreamV1Decoder(self.spec, max_bytes=int(options.get("max_bytes", compression.DEFAULT_MAX_BYTES)),
                                       frame_index_window=int(options.get("frame_index_window", DEFAULT_FRAME_INDEX_WINDOW)))

    @property
    def counters(self) -> Counter:
        return self.decoder.counters

    def messages(self, stop_event: threading.Event) -> Iterator[Message]:
        for parts in pull_parts(self.endpoint, self.poll_ms, stop_event, "Stream V1"):
            yield from self.decoder.feed(parts)
        yield from self.decoder.close()
