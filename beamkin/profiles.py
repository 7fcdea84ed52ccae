"""1D powder profiles (MYTHEN-like strip detectors): .xy, .xye, .dat text files.

Format: whitespace- or comma-separated numeric columns, two (2theta in degrees, counts) or three
(2theta, counts, sigma); lines starting with ``#``, ``!``, ``;`` or ``'`` and non-numeric header
lines before the data are skipped. :func:`read_profile` raises StreamDecodeError for anything
else (ragged columns, non-finite values, 2theta not increasing, fewer than two points).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from beamkin.errors import StreamDecodeError

PROFILE_SUFFIXES = (".xy", ".xye", ".dat")
_COMMENT = ("#", "!", ";", "'")


def parse_profile(text: str, name: str = "profile") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(two_theta_deg, counts, sigma or None) of a profile's text; raises StreamDecodeError."""
    rows: list[list[float]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(_COMMENT):
            continue
        tokens = stripped.replace(",", " ").split()
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            if rows:
                raise StreamDecodeError(f"{name} line {number} is not numeric: {stripped[:60]!r}") from None
            continue  # a column-title line before the data
        if len(values) not in (2, 3):
            raise StreamDecodeError(f"{name} line {number} has {len(values)} columns, expected 2 or 3")
        if rows and len(values) != len(rows[0]):
            raise StreamDecodeError(f"{name} line {number} has {len(values)} columns, earlier lines {len(rows[0])}")
        if not all(math.isfinite(v) for v in values):
            raise StreamDecodeError(f"{name} line {number} has a non-finite value")
        rows.append(values)
    if len(rows) < 2:
        raise StreamDecodeError(f"{name} has {len(rows)} data line(s), expected at least 2")
    data = np.asarray(rows, dtype=np.float64)
    two_theta = np.ascontiguousarray(data[:, 0])
    if not np.all(np.diff(two_theta) > 0):
        raise StreamDecodeError(f"{name}: 2theta is not strictly increasing")
    counts = np.ascontiguousarray(data[:, 1])
    sigma = np.ascontiguousarray(data[:, 2]) if data.shape[1] == 3 else None
    if sigma is not None and np.any(sigma < 0):
        raise StreamDecodeError(f"{name}: negative sigma")
    return two_theta, counts, sigma


def read_profile(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read a .xy / .xye / .dat profile file (see module doc)."""
    path = Path(path)
    try:
        text = path.read_text(errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise StreamDecodeError(f"cannot read profile {path}: {exc}") from exc
    return parse_profile(text, path.name)
