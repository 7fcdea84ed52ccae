"""A fake EIGER: the sending side of DECTRIS Stream V2 (and V1), for the simulator and tests.

:class:`StreamV2Sender` BINDs a ZeroMQ PUSH socket (as a detector's DCU does on port 31001) and
sends spec-conformant CBOR messages: each a map starting with ``type``, wrapped in the
self-describe tag 55799; images and masks as tag 40 ``[[ny, nx], typed array]`` whose byte string
is a tag 56500 ``["bslz4", elem_size, bytes]`` / ``["lz4", 0, bytes]`` (HDF5 framing) or plain;
times as rationals with a 1 ns time base.

``metadata`` of :meth:`StreamV2Sender.send_start` uses the Stream V2 start field names
(``beam_center_x``, ``count_time``, ``frame_time``, ``incident_wavelength``, ``pixel_size_x``,
``detector_translation``, ``number_of_images``, ``user_data``, ...); ``type``, ``series_id``,
``series_unique_id``, ``arm_date``, ``channels`` and the image size are filled in when missing.
Sends block while no receiver is connected (PUSH semantics), so no frame is dropped.
"""

from __future__ import annotations

import datetime as _dt
import logging
import uuid
from typing import Any, Mapping

import cbor2
import lz4.block
import numpy as np
import zmq

from beamkin import compression
from beamkin.cbor_tags import TAG_DATETIME, TAG_DECTRIS_COMPRESSION, TAG_FOR_DTYPE, TAG_MULTI_DIM_ROW_MAJOR, TAG_SELF_DESCRIBE

log = logging.getLogger(__name__)

#: Time base of the rational times sent (1/s): nanoseconds.
TIME_BASE = 1_000_000_000
COMPRESSIONS = ("bslz4", "lz4", "none")


def _plain(value: Any) -> Any:
    """numpy scalars/arrays in metadata -> plain CBOR-encodable Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def encode_typed_array(array: np.ndarray, compression_name: str = "bslz4") -> cbor2.CBORTag:
    """An RFC 8746 typed array of ``array``'s bytes (little-endian), optionally tag-56500 compressed."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and np.little_endian is False):
        array = array.astype(array.dtype.newbyteorder("<"))
    key = array.dtype.str
    if key not in TAG_FOR_DTYPE:
        raise ValueError(f"no RFC 8746 typed array tag for dtype {array.dtype}")
    if compression_name == "bslz4":
        payload = cbor2.CBORTag(TAG_DECTRIS_COMPRESSION, ["bslz4", array.dtype.itemsize, compression.compress_bslz4(array)])
    elif compression_name == "lz4":
        payload = cbor2.CBORTag(TAG_DECTRIS_COMPRESSION, ["lz4", 0, compression.compress_lz4(array)])
    elif compression_name == "none":
        payload = array.tobytes()
    else:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression_name!r}")
    return cbor2.CBORTag(TAG_FOR_DTYPE[key], payload)


def encode_multi_dim(array: np.ndarray, compression_name: str = "bslz4") -> cbor2.CBORTag:
    """A row-major RFC 8746 multi-dimensional array (tag 40) of a numpy array."""
    return cbor2.CBORTag(TAG_MULTI_DIM_ROW_MAJOR, [list(array.shape), encode_typed_array(array, compression_name)])


def rational(seconds: float) -> list[int]:
    """Seconds as a Stream V2 rational [numerator, denominator] with a 1 ns time base."""
    return [int(round(seconds * TIME_BASE)), TIME_BASE]


def encode_message(message: Mapping[str, Any]) -> bytes:
    """One Stream V2 message: the map wrapped in the self-describe tag 55799."""
    return cbor2.dumps(cbor2.CBORTag(TAG_SELF_DESCRIBE, dict(message)))


class StreamV2Sender:
    """Fake EIGER Stream V2 interface (PUSH, bound to ``endpoint``); see the module doc."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:31001", compression: str = "bslz4", *, sndhwm: int = 100) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
        self.compression = compression
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, sndhwm)
        self._socket.bind(endpoint)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._series_number = 0
        self._series: dict[str, Any] | None = None

    def writable(self, timeout_s: float = 0.0) -> bool:
        """True if a message can be sent now without blocking (a receiver is connected and keeping
        up); waits up to ``timeout_s`` seconds for that."""
        return bool(self._socket.poll(int(timeout_s * 1000), zmq.POLLOUT))

    def send_raw(self, data: bytes) -> None:
        """Send already-encoded bytes as one message (tests use it for corrupt input)."""
        self._socket.send(data, copy=False)

    def send_start(self, metadata: Mapping[str, Any], pixel_mask: np.ndarray | None = None,
                   flatfield: np.ndarray | None = None) -> dict[str, Any]:
        """Send a start message; returns the map sent (without arrays)."""
        self._series_number += 1
        meta = _plain(dict(metadata))
        channels = meta.get("channels") or ["threshold_1"]
        message: dict[str, Any] = {"type": "start"}
        message["series_id"] = int(meta.pop("series_id", self._series_number))
        message["series_unique_id"] = str(meta.pop("series_unique_id", uuid.uuid4().hex))
        arm_date = _dt.datetime.now(_dt.timezone.utc).isoformat()
        message["arm_date"] = cbor2.CBORTag(TAG_DATETIME, str(meta.pop("arm_date", arm_date)))
        message["channels"] = list(channels)
        meta.pop("channels", None)
        shape = None
        for array in (pixel_mask, flatfield):
            if array is not None:
                shape = array.shape
        if shape is not None:
            meta.setdefault("image_size_y", int(shape[0]))
            meta.setdefault("image_size_x", int(shape[1]))
        message.update(meta)
        for field, array, dtype in (("pixel_mask", pixel_mask, np.uint32), ("flatfield", flatfield, np.float32)):
            if array is not None:
                message[field] = {ch: encode_multi_dim(np.asarray(array, dtype=dtype), self.compression) for ch in channels}
                message[f"{field}_enabled"] = True
        self._series = {"series_id": message["series_id"], "series_unique_id": message["series_unique_id"],
                        "series_date": message["arm_date"], "channels": list(channels)}
        self.send_raw(encode_message(message))
        return {k: v for k, v in message.items() if k not in ("pixel_mask", "flatfield")}

    def send_image(self, frame_index: int, image: np.ndarray | Mapping[str, np.ndarray], start_time_s: float,
                   stop_time_s: float, user_data: Any = None) -> None:
        """Send one image message; ``image`` is the first channel's array or a channel -> array map."""
        if self._series is None:
            raise RuntimeError("send_start must come before send_image")
        images = dict(image) if isinstance(image, Mapping) else {self._series["channels"][0]: image}
        message: dict[str, Any] = {
            "type": "image",
            "series_id": self._series["series_id"],
            "series_unique_id": self._series["series_unique_id"],
            "image_id": int(frame_index),
            "series_date": self._series["series_date"],
            "start_time": rational(start_time_s),
            "stop_time": rational(stop_time_s),
            "real_time": rational(stop_time_s - start_time_s),
            "data": {ch: encode_multi_dim(np.asarray(arr), self.compression) for ch, arr in images.items()},
        }
        if user_data is not None:
            message["user_data"] = _plain(user_data)
        self.send_raw(encode_message(message))

    def send_end(self) -> None:
        """Send the end message of the current series."""
        if self._series is None:
            raise RuntimeError("send_start must come before send_end")
        self.send_raw(encode_message({"type": "end", "series_id": self._series["series_id"],
                                      "series_unique_id": self._series["series_unique_id"]}))
        self._series = None

    def close(self, linger_s: float = 5.0) -> None:
        """Close the socket, waiting up to ``linger_s`` for queued messages to go out."""
        self._socket.close(linger=int(linger_s * 1000))

    def __enter__(self) -> "StreamV2Sender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class StreamV1Sender:
    """Fake EIGER in Stream V1 mode: JSON multipart messages on a bound PUSH socket.

    ``compression``: "bslz4" (``bs<bits>-lz4<``, HDF5-framed), "lz4" (``lz4<``) or "none" (``<``).
    ``config`` of :meth:`send_start` uses the SIMPLON detector config names (beam_center_x,
    count_time, frame_time, detector_distance, wavelength, x_pixel_size, x_pixels_in_detector,
    nimages, ntrigger, ...).
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:9999", compression: str = "bslz4", *, sndhwm: int = 100) -> None:
        import json as _json

        self._json = _json
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
        self.compression = compression
        self._socket = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, sndhwm)
        self._socket.bind(endpoint)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.series = 0

    def _dumps(self, value: Any) -> bytes:
        return self._json.dumps(_plain(value)).encode()

    def writable(self, timeout_s: float = 0.0) -> bool:
        """True if a message can be sent now without blocking; waits up to ``timeout_s`` seconds."""
        return bool(self._socket.poll(int(timeout_s * 1000), zmq.POLLOUT))

    def send_parts(self, parts: list[bytes]) -> None:
        self._socket.send_multipart(parts, copy=False)

    def send_start(self, config: Mapping[str, Any], pixel_mask: np.ndarray | None = None,
                   flatfield: np.ndarray | None = None, appendix: Any = None) -> int:
        """Send a dheader-1.0 message ("all" detail when arrays are given); returns the series number."""
        self.series += 1
        detail = "all" if pixel_mask is not None or flatfield is not None else "basic"
        parts = [self._dumps({"htype": "dheader-1.0", "series": self.series, "header_detail": detail}), self._dumps(config)]
        if detail == "all":
            for htype, array, kind in (("dflatfield-1.0", flatfield, "float32"), ("dpixelmask-1.0", pixel_mask, "uint32")):
                if array is None:
                    continue
                array = np.ascontiguousarray(array, dtype=np.dtype(kind).newbyteorder("<"))
                parts += [self._dumps({"htype": htype, "shape": [array.shape[1], array.shape[0]], "type": kind}),
                          array.tobytes()]
        if appendix is not None:
            parts.append(appendix.encode() if isinstance(appendix, str) else self._dumps(appendix))
        self.send_parts(parts)
        return self.series

    def send_image(self, frame_index: int, image: np.ndarray, start_time_s: float, stop_time_s: float,
                   appendix: Any = None) -> None:
        """Send a dimage-1.0 message (header, dimage_d, blob, dconfig in ns[, appendix])."""
        image = np.ascontiguousarray(image)
        image = image.astype(image.dtype.newbyteorder("<"))
        kind = {"u1": "uint8", "u2": "uint16", "u4": "uint32", "i4": "int32", "f4": "float32"}[image.dtype.str[1:]]
        if self.compression == "bslz4":
            encoding, blob = f"bs{8 * image.dtype.itemsize}-lz4<", compression.compress_bslz4(image)
        elif self.compression == "lz4":
            encoding, blob = "lz4<", lz4.block.compress(image.tobytes(), store_size=False)
        else:
            encoding, blob = "<", image.tobytes()
        ns = [int(round(t * 1e9)) for t in (start_time_s, stop_time_s, stop_time_s - start_time_s)]
        parts = [
            self._dumps({"htype": "dimage-1.0", "series": self.series, "frame": int(frame_index), "hash": ""}),
            self._dumps({"htype": "dimage_d-1.0", "shape": [image.shape[1], image.shape[0]], "type": kind,
                         "encoding": encoding, "size": len(blob)}),
            blob,
            self._dumps({"htype": "dconfig-1.0", "start_time": ns[0], "stop_time": ns[1], "real_time": ns[2]}),
        ]
        if appendix is not None:
            parts.append(self._dumps(appendix))
        self.send_parts(parts)

    def send_end(self) -> None:
        self.send_parts([self._dumps({"htype": "dseries_end-1.0", "series": self.series})])

    def close(self, linger_s: float = 5.0) -> None:
        self._socket.close(linger=int(linger_s * 1000))
