"""Frame messages into arrays: the one place a reducer worker gets a frame's image.

A ``frame`` message carries its 2D image either as ``image`` (decompressed, as the streamer sent
it with ``[streamer] decompress = "streamer"`` and for every non-DECTRIS source) or as
``image_compressed``: the detector's HDF5-framed bslz4 / lz4 payload, unchanged (uint8, 1D),
with the header field ``compression`` = ``{"algorithm": "bslz4" | "lz4", "elem_size": bytes per
bitshuffle element, "dtype": numpy dtype string, "shape": [ny, nx]}`` (docs/protocol.md,
"Compressed frames"). :func:`frame_image` returns the image either way; a payload that does not
decompress to exactly ``shape`` x ``dtype`` raises :class:`FrameDecodeError` naming the series
and frame, which the worker turns into a flagged fraction.
"""

from __future__ import annotations

import math

import numpy as np

from beamkin.protocol import Message
from beamkin.compression import DEFAULT_MAX_BYTES, SUPPORTED_ALGORITHMS, CompressedArray
from beamkin.errors import StreamDecodeError


class FrameDecodeError(ValueError):
    """A frame whose image cannot be had (no image, bad compression descriptor, corrupt payload)."""


def _where(frame: Message) -> str:
    return f"series {frame.get('series_id')!r} frame {frame.get('frame_index')}"


def compression_descriptor(frame: Message) -> tuple[str, int, np.dtype, tuple[int, int]]:
    """(algorithm, elem_size, dtype, shape) of a frame's ``compression`` field, checked; raises
    FrameDecodeError."""
    spec = frame.get("compression")
    if not isinstance(spec, dict):
        raise FrameDecodeError(f"{_where(frame)}: image_compressed without a compression field")
    algorithm, elem_size, dtype_text, shape = (spec.get(k) for k in ("algorithm", "elem_size", "dtype", "shape"))
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise FrameDecodeError(f"{_where(frame)}: compression algorithm {algorithm!r:.40} is not one of {SUPPORTED_ALGORITHMS}")
    if not isinstance(elem_size, int) or isinstance(elem_size, bool) or not 0 <= elem_size <= 8:
        raise FrameDecodeError(f"{_where(frame)}: compression elem_size {elem_size!r:.40} is not an integer in [0, 8]")
    try:
        dtype = np.dtype(dtype_text) if isinstance(dtype_text, str) and len(dtype_text) <= 16 else None
    except (TypeError, ValueError, SyntaxError):
        dtype = None
    if dtype is None or dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise FrameDecodeError(f"{_where(frame)}: compression dtype {dtype_text!r:.40} is not a numeric dtype")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
            or math.prod(shape) * dtype.itemsize > DEFAULT_MAX_BYTES):
        raise FrameDecodeError(f"{_where(frame)}: compression shape {shape!r:.60} is not 2 positive sizes within "
                               f"{DEFAULT_MAX_BYTES} bytes")
    return algorithm, elem_size, dtype, (shape[0], shape[1])


def frame_image(frame: Message) -> np.ndarray:
    """The 2D image of a frame message (native byte order): ``image`` as it is, or
    ``image_compressed`` decompressed. Raises FrameDecodeError (naming series and frame)."""
    if "image" in frame.arrays:
        return frame.arrays["image"]
    payload = frame.arrays.get("image_compressed")
    if payload is None:
        raise FrameDecodeError(f"{_where(frame)}: the frame carries neither image nor image_compressed")
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise FrameDecodeError(f"{_where(frame)}: image_compressed is {payload.dtype} of shape {list(payload.shape)}, "
                               "not 1D uint8 bytes")
    algorithm, elem_size, dtype, shape = compression_descriptor(frame)
    try:
        compressed = CompressedArray.checked(memoryview(np.ascontiguousarray(payload)).cast("B"), algorithm, elem_size)
        return compressed.with_dtype(dtype).with_shape(shape).to_array()
    except StreamDecodeError as exc:
        raise FrameDecodeError(f"{_where(frame)}: {algorithm} payload of {payload.size} bytes "
                               f"(image {list(shape)} {dtype}) cannot be decompressed: {exc}") from None
