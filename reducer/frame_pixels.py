"""A detector frame made ready for pyFAI: the dynamic mask and the float32 conversion, per frame.

EIGER and PILATUS mark module gaps and dead pixels with the all-ones value of the integer pixel
type (65535 for uint16, -1 for int32); pyFAI skips that value when given it as ``dummy``.
:func:`prepare_frame` checks a frame's shape and type and returns it with its dummy value,
rewriting it only when needed (rare): negative integers other than the marker and values above
the saturation value become the marker; for floating-point frames NaN, infinite, negative or
saturated values become -1 (the float dummy). Integer frames of up to 32 bits can come back as
float32 (pyFAI's CSR working type), converted in the same pass as the checks by the small Numba
kernels below (each checked against NumPy in tests/test_reducer_integrate.py).
"""
from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np

from beamkin.errors import ReductionError

__all__ = ["all_ones_value", "prepare_frame"]


def all_ones_value(dtype) -> int | None:
    """The all-ones bit pattern of an integer pixel type as a number (uint16 -> 65535, int32 -> -1);
    None for floating-point types."""
    dt = np.dtype(dtype)
    if dt.kind == "u":
        return int(np.iinfo(dt).max)
    if dt.kind == "i":
        return -1
    return None


@numba.njit(cache=True)
def _min_max(flat: np.ndarray) -> tuple[int, int]:
    """(minimum, maximum) of a 1D signed-integer array in one pass (vectorised by LLVM; about
    0.33 ms for a 4 MB Pilatus 1M frame, against 0.5 ms for a branchy count)."""
    lo = flat[0]
    hi = flat[0]
    for i in range(flat.shape[0]):
        v = flat[i]
        lo = min(lo, v)
        hi = max(hi, v)
    return lo, hi


@numba.njit(cache=True)
def _min_max_to_float32(flat: np.ndarray, signed: np.ndarray, out: np.ndarray) -> tuple[int, int]:
    """_min_max of signed (the same pixels as flat, viewed as signed) while writing flat as
    float32 into out (round to nearest, as numpy's astype): one read of the frame instead of a
    check here and pyFAI's own float32 conversion (a 4 MB allocation) later."""
    lo = signed[0]
    hi = signed[0]
    for i in range(flat.shape[0]):
        v = signed[i]
        lo = min(lo, v)
        hi = max(hi, v)
        out[i] = np.float32(flat[i])
    return lo, hi


@numba.njit(cache=True)
def _to_float32(flat: np.ndarray, out: np.ndarray) -> None:
    """flat as float32 into out (round to nearest, as numpy's astype)."""
    for i in range(flat.shape[0]):
        out[i] = np.float32(flat[i])


@numba.njit(cache=True)
def _any_outside(flat: np.ndarray, upper: float) -> bool:
    """True when a value of a 1D float array is NaN, infinite, negative or above upper."""
    for i in range(flat.shape[0]):
        v = flat[i]
        if not (v >= 0.0 and v <= upper):  # NaN fails both comparisons
            return True
    return False


def prepare_frame(image: np.ndarray, shape: tuple[int, int], saturation: float | None,
                  float32_buffer: Callable[[], np.ndarray] | None = None) -> tuple[np.ndarray, float]:
    """Frame ready for pyFAI and its dummy value (dynamic mask).

    ``shape``: the detector's (rows, columns); ``saturation``: counts above it are masked (None:
    no limit). ``float32_buffer``: when given, integer frames of up to 32 bits come back as
    float32 (pyFAI's CSR working type) in the flat buffer it returns (reused by the next call),
    converted in the same pass as the checks. ReductionError for a frame of the wrong shape or type."""
    to_float32 = float32_buffer is not None
    if not isinstance(image, np.ndarray):
        raise ReductionError(f"frame must be a numpy array, got {type(image).__name__}")
    if image.ndim != 2 or tuple(image.shape) != shape:
        raise ReductionError(f"frame shape {tuple(image.shape)} differs from detector shape {shape}")
    kind = image.dtype.kind
    if kind in "uif" and not image.dtype.isnative:
        image = image.astype(image.dtype.newbyteorder("="))
    if kind in "ui":
        all_ones = all_ones_value(image.dtype)
        dummy = float(all_ones)
        to_float32 = to_float32 and image.dtype.itemsize <= 4 and image.flags.c_contiguous
        if kind == "u" and saturation is None:
            # no negatives, no NaN; pyFAI masks the all-ones value (dummy)
            if to_float32:
                _to_float32(image.reshape(-1), float32_buffer())
                return float32_buffer().reshape(shape), dummy
            return image, dummy
        # One min/max pass decides whether the frame needs rewriting (rare). Unsigned frames are
        # viewed as the signed type of the same width: the all-ones marker reads -1, and any
        # value >= 2**(bits - 1) reads below -1, so the check is conservative, never lax.
        signed = image if kind == "i" else image.view(np.dtype(f"i{image.dtype.itemsize}"))
        if to_float32:
            lo, hi = _min_max_to_float32(image.reshape(-1), signed.reshape(-1), float32_buffer())
            rewrite = (kind == "i" and lo < -1) or (saturation is not None and hi > saturation)
            if not (rewrite or (kind == "u" and lo < -1)):
                return float32_buffer().reshape(shape), dummy
        else:
            lo, hi = _min_max(signed.reshape(-1))
        if kind == "i" and lo < -1:  # negatives other than the -1 marker: dead pixels too
            image = np.where(image < 0, image.dtype.type(-1), image)
        if saturation is not None and (hi > saturation or (kind == "u" and lo < -1)):
            image = np.where(image > saturation, image.dtype.type(all_ones), image)
        return image, dummy
    if kind == "f":
        upper = np.inf if saturation is None else saturation
        compiled = image.dtype in (np.float32, np.float64)  # numba has no float16
        if not compiled or _any_outside(image.reshape(-1), upper):
            bad = ~np.isfinite(image) | (image < 0)
            if saturation is not None:
                bad |= image > saturation
            image = np.where(bad, image.dtype.type(-1.0), image)
        return image, -1.0
    raise ReductionError(f"unsupported frame dtype {image.dtype} (need an integer or float image)")
