"""Detector header values as the streamer takes them (Stream V1 and V2 alike): finite numbers,
bounded integers, times, JSON-safe user data, and short renderings of bad values for the log.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from typing import Any, Mapping

import cbor2
import numpy as np

log = logging.getLogger(__name__)

#: Largest image side accepted (pixels); the largest detectors have about 4 400.
MAX_IMAGE_SIDE = 1 << 20

#: Largest time (s, about 31.7 years) a rational time may give: any more is corrupt input.
MAX_TIME_S = 1e9


def short_text(value: Any, limit: int = 80) -> str:
    """A short rendering of a value for messages, safe for integers of any size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"<integer of {value.bit_length()} bits>"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(short_text(v, limit) for v in list(value)[:4])
        text = f"[{inner}{', ...' if len(value) > 4 else ''}]"
    elif isinstance(value, np.ndarray):
        text = f"<array {value.dtype} {list(value.shape)}>"
    elif isinstance(value, (bytes, bytearray)):
        text = f"<{len(value)}-byte string>"
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{short_text(k, 20)}: {short_text(v, 40)}" for k, v in list(value.items())[:4]) + "}"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def json_safe(value: Any, *, max_list: int = 4096, depth: int = 0) -> Any:
    """User data made JSON-safe: datetimes -> ISO text, small arrays -> lists, bytes/tags described."""
    if depth > 32:
        return "<nested too deep>"
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if -(1 << 63) <= value < (1 << 64) else short_text(value)
    if isinstance(value, float):
        return value if np.isfinite(value) else str(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, np.ndarray):
        if value.size <= max_list and value.dtype.kind in "biuf":
            return json_safe(value.tolist(), max_list=max_list, depth=depth + 1)
        return f"<array {value.dtype} {list(value.shape)}>"
    if isinstance(value, np.generic):
        return json_safe(value.item(), depth=depth + 1)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else short_text(k): json_safe(v, max_list=max_list, depth=depth + 1)
                for k, v in list(value.items())[:max_list]}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v, max_list=max_list, depth=depth + 1) for v in list(value)[:max_list]]
    if isinstance(value, cbor2.CBORTag):
        return {"cbor_tag": value.tag, "value": json_safe(value.value, max_list=max_list, depth=depth + 1)}
    return short_text(value, 200)


def user_data_dict(value: Any) -> dict:
    """``user_data`` as a JSON-safe dict (a JSON text object is parsed; anything else is wrapped)."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            parsed = value
        value = parsed
    value = json_safe(value)
    return value if isinstance(value, dict) else {"value": value}


def finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or None (not a number, a bool, NaN, infinite, or an integer too
    large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def number_field(raw: Mapping, key: str, series_id: str | None = None) -> float | None:
    value = raw.get(key)
    number = finite_float(value)
    if number is None and value is not None:
        log.warning("ignoring start field %s = %s: not a finite number", key, short_text(value), extra={"series_id": series_id})
    return number


def integer_field(raw: Mapping, key: str, series_id: str | None = None, *, low: int = -(1 << 63), high: int = (1 << 63) - 1) -> int | None:
    value = raw.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    if value is not None:
        log.warning("ignoring start field %s = %s: not an integer in [%d, %d]", key, short_text(value), low, high,
                    extra={"series_id": series_id})
    return None
