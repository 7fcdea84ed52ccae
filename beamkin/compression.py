"""HDF5-framed LZ4 and bitshuffle+LZ4 ("bslz4") byte strings, as DECTRIS detectors send them.

Framing (the bitshuffle HDF5 filter / HDF5 LZ4 filter format, used by CBOR tag 56500 and the
Stream V1 ``bs*-lz4<`` encodings)::

    uint64 big-endian   total uncompressed size in bytes
    uint32 big-endian   block size in bytes
    per block: uint32 big-endian compressed size, then the LZ4 block (bslz4: of the bit-transposed
               block; lz4: a block whose compressed size equals its raw size is stored raw)

Decompression goes through ``dectris.compression.decompress``; the declared size is checked
against a limit first so a hostile 12-byte header cannot make us allocate terabytes.

Frames forwarded compressed (issue 12): the streamer does not decompress images (25 ms per 16M
frame); it checks the 12-byte header only (:func:`check_header`) and keeps the payload as a
:class:`CompressedArray`, which travels to the reducer workers unchanged (docs/protocol.md,
"Compressed frames"); a worker turns it into an array with :meth:`CompressedArray.to_array`
(via :func:`beamkin.frames.frame_image`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

import bitshuffle
import lz4.block
import numpy as np
from dectris.compression import decompress as _dectris_decompress

from beamkin.errors import StreamDecodeError

#: Largest decompressed payload accepted by default (bytes): a 16M-pixel 32-bit frame is 64 MiB.
DEFAULT_MAX_BYTES = 1 << 30

_HEADER = struct.Struct(">QI")
SUPPORTED_ALGORITHMS = ("bslz4", "lz4")


def bslz4_block_elements(elem_size: int) -> int:
    """Bitshuffle block size in elements: 8 KiB worth of elements, a multiple of 8 (min 128)."""
    return max(128, (8192 // elem_size) // 8 * 8)


def compress_bslz4(array: np.ndarray) -> bytes:
    """Bitshuffle + LZ4 with HDF5 framing (12-byte header) of a C-contiguous array's bytes."""
    array = np.ascontiguousarray(array)
    elem_size = array.dtype.itemsize
    block = bslz4_block_elements(elem_size)
    body = bitshuffle.compress_lz4(array.reshape(-1), block)
    return _HEADER.pack(array.nbytes, block * elem_size) + body.tobytes()


def compress_lz4(data: bytes | memoryview | np.ndarray, block_bytes: int = 1 << 20) -> bytes:
    """LZ4 with HDF5 framing: blocks of ``block_bytes``; incompressible blocks stored raw."""
    raw = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data).cast("B")
    parts = [_HEADER.pack(raw.nbytes, block_bytes)]
    for offset in range(0, raw.nbytes, block_bytes):
        block = raw[offset : offset + block_bytes]
        packed = lz4.block.compress(block, store_size=False)
        if len(packed) >= block.nbytes:
            packed = bytes(block)
        parts.append(struct.pack(">I", len(packed)))
        parts.append(packed)
    return b"".join(parts)


def max_lz4_output(compressed_bytes: int) -> int:
    """Upper bound of what ``compressed_bytes`` of LZ4 data can expand to (ratio <= 255, plus slack)."""
    return 256 * compressed_bytes + 1024


def declared_size(data: bytes | memoryview) -> int:
    """Uncompressed size in bytes declared by an HDF5-framed buffer's header."""
    if len(data) < _HEADER.size:
        raise StreamDecodeError(f"compressed buffer of {len(data)} bytes is shorter than its 12-byte header")
    total, _block = _HEADER.unpack_from(data, 0)
    return total


def check_header(data: bytes | memoryview, algorithm: str, elem_size: int, *, max_bytes: int = DEFAULT_MAX_BYTES) -> int:
    """Check what can be checked without decompressing (algorithm, element size, the declared
    size against ``max_bytes`` and against the LZ4 ratio bound); returns the declared uncompressed
    size in bytes. Raises StreamDecodeError."""
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise StreamDecodeError(f"unsupported compression algorithm {algorithm!r}", "unsupported_compression")
    if algorithm == "bslz4" and elem_size not in (1, 2, 4, 8):
        raise StreamDecodeError(f"bslz4 element size {elem_size!r} is not 1, 2, 4 or 8")
    total = declared_size(data)
    if total > max_bytes:
        raise StreamDecodeError(f"compressed buffer declares {total} bytes, more than the limit {max_bytes}")
    if total > max_lz4_output(len(data)):
        raise StreamDecodeError(f"{len(data)} compressed bytes cannot hold the declared {total} bytes (LZ4 ratio <= 255)")
    return total


def decompress(data: bytes | memoryview, algorithm: str, elem_size: int, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Decompress an HDF5-framed "bslz4" or "lz4" buffer; raises StreamDecodeError."""
    total = check_header(data, algorithm, elem_size, max_bytes=max_bytes)
    try:
        out = _dectris_decompress(bytes(data), algorithm, elem_size=elem_size if algorithm == "bslz4" else 1)
    except (RuntimeError, ValueError) as exc:
        raise StreamDecodeError(f"{algorithm} decompression failed: {exc}") from exc
    if len(out) != total:
        raise StreamDecodeError(f"{algorithm} buffer declared {total} bytes but decompressed to {len(out)}")
    return out


@dataclass(frozen=True)
class CompressedArray:
    """An array still compressed as the detector sent it (CBOR tag 56500, not yet decompressed).

    ``data``: the HDF5-framed payload (bytes, unchanged); ``algorithm``: "bslz4" or "lz4";
    ``elem_size``: the tag's element size in bytes (bitshuffle's element); ``nbytes``: the
    uncompressed size in bytes its header declares (checked by :func:`check_header`).
    ``dtype`` and ``shape`` are those of the typed array (RFC 8746) and multi-dimensional array
    (tag 40) around it, None until known. ``max_bytes``: the limit to decompress under.
    """

    algorithm: str
    elem_size: int
    data: bytes
    nbytes: int
    dtype: np.dtype | None = None
    shape: tuple[int, ...] | None = None
    max_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def checked(cls, data: bytes, algorithm: str, elem_size: int, *, max_bytes: int = DEFAULT_MAX_BYTES) -> "CompressedArray":
        """The payload after :func:`check_header` (raises StreamDecodeError)."""
        total = check_header(data, algorithm, elem_size, max_bytes=max_bytes)
        return cls(algorithm, elem_size, bytes(data), total, max_bytes=max_bytes)

    def with_dtype(self, dtype: np.dtype) -> "CompressedArray":
        """This payload as a typed array of ``dtype`` (1D); raises StreamDecodeError when the
        declared size is not a whole number of elements."""
        if self.nbytes % dtype.itemsize:
            raise StreamDecodeError(f"compressed typed array declares {self.nbytes} bytes, not a multiple of its "
                                    f"element size {dtype.itemsize}", "shape_mismatch")
        return replace(self, dtype=dtype, shape=(self.nbytes // dtype.itemsize,))

    def with_shape(self, shape: tuple[int, ...]) -> "CompressedArray":
        """This typed array reshaped (row-major) to ``shape``; raises StreamDecodeError when the
        element count differs."""
        count = 1
        for n in shape:
            count *= n
        if self.dtype is None or count != self.size:
            have = "an unknown number of" if self.dtype is None else str(self.size)
            raise StreamDecodeError(f"multi-dimensional array declares dimensions {list(shape)} ({count} elements) "
                                    f"but its compressed data holds {have} elements", "shape_mismatch")
        return replace(self, shape=tuple(shape))

    @property
    def size(self) -> int:
        """Number of elements (0 when the dtype is unknown)."""
        return 0 if self.dtype is None else self.nbytes // self.dtype.itemsize

    def to_bytes(self) -> bytes:
        """The decompressed bytes (checked against the declared size); raises StreamDecodeError."""
        return decompress(self.data, self.algorithm, self.elem_size, max_bytes=self.max_bytes)

    def to_array(self) -> np.ndarray:
        """The decompressed array of ``dtype`` and ``shape`` in native byte order; raises
        StreamDecodeError (corrupt payload, dtype unknown)."""
        if self.dtype is None or self.shape is None:
            raise StreamDecodeError("compressed payload has no typed array (dtype unknown)")
        array = np.frombuffer(self.to_bytes(), dtype=self.dtype).reshape(self.shape)
        if self.dtype.byteorder == ">" and self.dtype.itemsize > 1:
            array = array.astype(self.dtype.newbyteorder("="))
        return array


def materialise(value):
    """``value`` with a :class:`CompressedArray` decompressed (an array when its dtype is known,
    else bytes); anything else unchanged. Raises StreamDecodeError."""
    if isinstance(value, CompressedArray):
        return value.to_bytes() if value.dtype is None else value.to_array()
    return value
