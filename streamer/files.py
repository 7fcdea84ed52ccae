"""``files:FOLDER``: frames appearing in a folder, emitted as series in acquisition order.

Watched files: CBF / EDF / TIFF images (fabio), EIGER HDF5 master files (``*_master.h5``, h5py +
hdf5plugin) and 1D profiles (.xy / .xye / .dat, :mod:`beamkin.profiles`).

A file is read once, when complete: its size and modification time are unchanged over
``settle_polls`` consecutive polls (option, default 2, every ``poll_s`` = 0.2 s), and for CBF and
EDF the binary section declared in the header (``X-Binary-Size``, ``Size``) is all there (fabio
can hang on a truncated CBF). A file that still fails to read is retried, up to ``max_retries``.

Series: files are ordered by (prefix, frame number in the name, mtime); a series is a run of files
with the same prefix (name without its trailing number and extension). A new prefix ends the open
series; so does ``series_timeout_s`` (option, default 30 s) without a new file, or reaching
``n_frames`` (option). The start message comes from the first file's header (Pilatus mini-CBF keys
``Exposure_time``, ``Exposure_period``, ``Wavelength``, ``Detector_distance``, ``Beam_xy``,
``Pixel_size``) completed by options ``frame_time_s``, ``exposure_s``, ``wavelength_A``,
``distance_m``, ``beam_center_px`` [x, y], ``pixel_size_m`` [py, px], ``gas_time_s``.
Frame i's time: ``i * frame_time + exposure / 2`` seconds since the first frame.
An EIGER master file is one series by itself, its frames emitted as its data files appear.
Files present before the source started are read too unless option ``skip_existing`` is true.

What the source remembers is bounded by the folder: the names of the files it has read (229 B
each, measured with Python's free lists) and the sizes of the files still settling, both
forgotten once a file leaves the folder. Each poll lists the folder once (``os.scandir``) and
looks at a file's name before anything else, so a poll of a folder of 60,000 read files costs a
set lookup per name (40 ms measured, docs/benchmarks.md).

Bad files never stop the source: a file that cannot be read is retried and then counted, and
any other exception while reading one file is logged with the file name, counted as
``handler_errors`` and the file skipped.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from beamkin.protocol import Message
from streamer.eiger_h5 import iter_master_frames, read_master_start
from beamkin.errors import StreamDecodeError
from beamkin.profiles import PROFILE_SUFFIXES, read_profile
from streamer.series import DEFAULT_FRAME_INDEX_WINDOW, SeriesAssembler, make_detector, make_geometry

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".cbf", ".edf", ".tif", ".tiff")
MASTER_SUFFIX = "_master.h5"
#: polls between two checks for files that left the folder (their names are then forgotten)
FORGET_EVERY_POLLS = 50
_NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<number>\d+)$")


def split_name(path: Path) -> tuple[str, int]:
    """(series prefix, frame number or -1) of a file name: "run1_00017.cbf" -> ("run1_", 17)."""
    stem = path.name
    for suffix in (MASTER_SUFFIX, *IMAGE_SUFFIXES, *PROFILE_SUFFIXES):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    match = _NUMBERED.match(stem)
    return (match["prefix"], int(match["number"])) if match else (stem, -1)


def binary_section_complete(path: Path, size: int) -> bool:
    """For CBF / EDF: does the file hold the whole binary section its header declares?"""
    suffix = path.suffix.lower()
    if suffix not in (".cbf", ".edf"):
        return True
    with path.open("rb") as handle:
        head = handle.read(min(size, 65536))
    if suffix == ".cbf":
        match = re.search(rb"X-Binary-Size:\s*(\d+)", head)
        marker = head.find(b"\x0c\x1a\x04\xd5")
        return bool(match) and marker >= 0 and size >= marker + 4 + int(match[1])
    end = head.find(b"}")
    match = re.search(rb"\bSize\s*=\s*(\d+)\s*;", head[: max(end, 0)])
    if end < 0 or not match:
        return False
    header_end = end + 1 + (head[end + 1 : end + 2] == b"\n")
    return size >= header_end + int(match[1])


_CBF_KEYS = {
    "Exposure_time": r"Exposure_time\s+([-+0-9.eE]+)",
    "Exposure_period": r"Exposure_period\s+([-+0-9.eE]+)",
    "Wavelength": r"Wavelength\s+([-+0-9.eE]+)",
    "Detector_distance": r"Detector_distance\s+([-+0-9.eE]+)",
    "Beam_xy": r"Beam_xy\s*\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*\)",
    "Pixel_size": r"Pixel_size\s+([-+0-9.eE]+)\s*m\s*x\s*([-+0-9.eE]+)",
    "Detector": r"Detector:\s*([^\r\n]+)",
}


def mini_cbf_header(header: Mapping[str, Any]) -> dict[str, Any]:
    """Pilatus mini-CBF header values (seconds, angstrom, metres, pixels) found in a fabio header."""
    text = "\n".join(str(v) for v in header.values())
    found: dict[str, Any] = {}
    for key, pattern in _CBF_KEYS.items():
        match = re.search(pattern, text)
        if match is None:
            continue
        if key == "Detector":
            found[key] = match[1].strip()
        elif match.lastindex == 2:
            found[key] = (float(match[1]), float(match[2]))
        else:
            found[key] = float(match[1])
    return found


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    stable_polls: int = 0
    retries: int = 0


class FolderSource:
    """Watches a folder and emits the frames of the files appearing in it (see module doc)."""

    def __init__(self, folder: str | Path, options: Mapping[str, Any] | None = None, *, spec: str | None = None) -> None:
        self.options = dict(options or {})
        self.folder = Path(folder)
        self.spec = spec or f"files:{folder}"
        self.poll_s = float(self.options.get("poll_s", 0.2))
        self.settle_polls = int(self.options.get("settle_polls", 2))
        self.series_timeout_s = float(self.options.get("series_timeout_s", 30.0))
        self.max_retries = int(self.options.get("max_retries", 20))
        self.n_frames = self.options.get("n_frames")
        self.counters: Counter = Counter()
        self.series = SeriesAssembler(self.spec, self.counters,
                                      frame_index_window=int(self.options.get("frame_index_window", DEFAULT_FRAME_INDEX_WINDOW)))
        self._seen: dict[str, _Seen] = {}  # files not yet read, by name: size and mtime over the polls
        self._done: set[str] = set()  # names of the files read, given up or skipped
        self._polls = 0
        self._prefix: str | None = None
        self._index = 0
        self._idle_s = 0.0
        self._master: Path | None = None

    # ------------------------------------------------------------------ polling
    def _candidates(self) -> list[Path]:
        """Complete files not yet read, in acquisition order."""
        ready = []
        try:
            entries = list(os.scandir(self.folder))
        except OSError as exc:
            self.counters["folder_error"] += 1
            log.warning("cannot list %s: %s", self.folder, exc)
            return []
        self._polls += 1
        if self._polls % FORGET_EVERY_POLLS == 0:
            self._forget_gone({entry.name for entry in entries})
        for entry in entries:
            if entry.name in self._done:  # most names of a busy folder: one set lookup, nothing else
                continue
            name = entry.name.lower()
            if name.startswith(".") or not (name.endswith(IMAGE_SUFFIXES) or name.endswith(PROFILE_SUFFIXES)
                                            or name.endswith(MASTER_SUFFIX)):
                continue
            if not entry.is_file():
                continue
            stat = entry.stat()
            seen = self._seen.get(entry.name)
            if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                self._seen[entry.name] = _Seen(stat.st_size, stat.st_mtime_ns, 0, seen.retries if seen else 0)
                continue
            seen.stable_polls += 1
            if seen.stable_polls >= self.settle_polls and stat.st_size > 0:
                path = Path(entry.path)
                ready.append((split_name(path), stat.st_mtime_ns, path))
        first_mtime: dict[str, int] = {}
        for (prefix, _), mtime, _ in ready:
            first_mtime[prefix] = min(mtime, first_mtime.get(prefix, mtime))
        # the open series' files first, then series by their first file's mtime, frames by number
        ready.sort(key=lambda item: (item[0][0] != self._prefix, first_mtime[item[0][0]], item[0][0], item[0][1], item[2].name))
        return [path for _, _, path in ready]

    @property
    def remembered_files(self) -> tuple[int, int]:
        """(names of files read, files still settling) that the source holds in memory."""
        return len(self._done), len(self._seen)

    def _forget_gone(self, listed: set[str]) -> None:
        """Forget files no longer in the folder (moved away or deleted): the memory follows the folder."""
        self._done &= listed
        for name in [name for name in self._seen if name not in listed]:
            del self._seen[name]

    def _finished(self, path: Path) -> None:
        """A file is read, given up or skipped: only its name is kept (so it is not read again)."""
        self._done.add(path.name)
        self._seen.pop(path.name, None)

    def messages(self, stop_event: threading.Event) -> Iterator[Message]:
        if self.options.get("skip_existing"):
            self._done.update(entry.name for entry in os.scandir(self.folder))
        log.info("watching %s for frames", self.folder)
        while not stop_event.is_set():
            got_any = False
            if self._master is not None:
                out = self._master_frames()
                got_any = bool(out)
                yield from out
            for path in self._candidates():
                if stop_event.is_set():
                    break
                out = self._read(path)
                if out is None:
                    continue
                got_any = True
                yield from out
            self._idle_s = 0.0 if got_any else self._idle_s + self.poll_s
            if self.series.is_open and self._idle_s >= self.series_timeout_s:
                log.info("no new file for %.1f s: ending series %s", self._idle_s, self.series.series_id)
                yield from self._end_series()
            if not got_any:
                stop_event.wait(self.poll_s)
        yield from self.series.close()

    def _end_series(self) -> list[Message]:
        self._prefix = None
        self._master = None
        return self.series.end(None) if self.series.is_open else []

    # ------------------------------------------------------------------ reading
    def _read(self, path: Path) -> list[Message] | None:
        """Messages for one complete file; None when it should be retried later (or was skipped)."""
        try:
            return self._read_file(path)
        except Exception:  # a bug must cost one file, never the source
            self._finished(path)
            self.counters["handler_errors"] += 1
            log.exception("error reading %s; skipping it", path, extra={"series_id": self.series.series_id})
            return None

    def _read_file(self, path: Path) -> list[Message] | None:
        seen = self._seen[path.name]
        try:
            if not binary_section_complete(path, seen.size):
                raise StreamDecodeError(f"{path.name}: binary section incomplete", "incomplete_file")
            if path.name.lower().endswith(MASTER_SUFFIX):
                out = self._start_master(path)
                self._finished(path)
                return out
            if path.name.lower().endswith(PROFILE_SUFFIXES):
                two_theta, counts, sigma = read_profile(path)
                arrays = {"two_theta_deg": two_theta, "counts": counts}
                if sigma is not None:
                    arrays["sigma"] = sigma
                out = self._frame(path, arrays, header={}, kind="profile")
            else:
                import fabio

                try:
                    image = fabio.open(str(path))
                    data = np.ascontiguousarray(image.data)
                    header = dict(image.header)
                except Exception as exc:  # fabio raises many types for bad files
                    raise StreamDecodeError(f"fabio cannot read {path.name}: {type(exc).__name__}: {exc}") from exc
                if data.ndim != 2:
                    raise StreamDecodeError(f"{path.name} holds a {data.ndim}D array, expected 2D", "shape_mismatch")
                out = self._frame(path, {"image": data}, header=header, kind="image")
        except StreamDecodeError as exc:
            seen.retries += 1
            seen.stable_polls = 0
            if seen.retries > self.max_retries:
                self._finished(path)
                self.counters[exc.counter] += 1
                log.warning("giving up on %s after %d tries: %s", path, seen.retries, exc)
            return None
        self._finished(path)
        return out

    def _start_fields(self, path: Path, header: Mapping[str, Any], shape: tuple[int, int], kind: str) -> dict[str, Any]:
        cbf = mini_cbf_header(header)
        opt = self.options
        exposure = opt.get("exposure_s", cbf.get("Exposure_time"))
        frame_time = opt.get("frame_time_s", cbf.get("Exposure_period", exposure))
        if frame_time is None:
            frame_time = exposure if exposure is not None else 1.0
            log.warning("%s: no frame time in the header or options; assuming %.3f s", path.name, frame_time)
        exposure = frame_time if exposure is None else exposure
        pixel = opt.get("pixel_size_m")
        if pixel is None and "Pixel_size" in cbf:
            pixel = (cbf["Pixel_size"][1], cbf["Pixel_size"][0])
        prefix, _ = split_name(path)
        return {
            "series_id": f"{prefix.rstrip('_-.') or path.stem}",
            "kind": kind,
            "detector": make_detector(opt.get("detector_name", cbf.get("Detector", f"{path.suffix.lstrip('.')} files")),
                                      shape, pixel, opt.get("saturation"), opt.get("bit_depth")),
            "geometry": make_geometry(opt.get("distance_m", cbf.get("Detector_distance")),
                                      opt.get("beam_center_px", cbf.get("Beam_xy")),
                                      opt.get("wavelength_A", cbf.get("Wavelength"))),
            "frame_time_s": float(frame_time),
            "exposure_s": float(exposure),
            "n_frames": None if self.n_frames is None else int(self.n_frames),
            "gas_time_s": None if opt.get("gas_time_s") is None else float(opt["gas_time_s"]),
            "user_data": {"folder": str(self.folder), "first_file": path.name},
        }

    def _frame(self, path: Path, arrays: dict[str, np.ndarray], header: Mapping[str, Any], kind: str) -> list[Message]:
        out: list[Message] = []
        prefix, _ = split_name(path)
        if self.series.is_open and (prefix != self._prefix or self._master is not None):
            out.extend(self._end_series())
        if not self.series.is_open:
            shape = arrays["image"].shape if kind == "image" else (1, arrays["two_theta_deg"].size)
            out.extend(self.series.start(self._start_fields(path, header, shape, kind)))
            self._prefix = prefix
            self._index = 0
        out.extend(self.series.frame(None, self._index, arrays))
        self._index += 1
        if self.n_frames is not None and self._index >= int(self.n_frames):
            out.extend(self._end_series())
        return out

    def _start_master(self, path: Path) -> list[Message]:
        fields, arrays = read_master_start(path, path.name[: -len(MASTER_SUFFIX)], self.spec)
        out = self._end_series() if self.series.is_open else []
        if self.options.get("gas_time_s") is not None:
            fields["gas_time_s"] = float(self.options["gas_time_s"])
        out.extend(self.series.start(fields, arrays))
        self._master = path
        self._index = 0
        out.extend(self._master_frames())
        return out

    def _master_frames(self) -> list[Message]:
        out: list[Message] = []
        try:
            for index, image in iter_master_frames(self._master, self._index):
                out.extend(self.series.frame(None, index, {"image": image}))
                self._index = index + 1
        except (OSError, KeyError, ValueError, RuntimeError) as exc:  # a data file still being written
            log.debug("EIGER data not readable yet (%s); retrying", exc)
        except Exception:  # anything else: this master file is given up, the source goes on
            self.counters["handler_errors"] += 1
            log.exception("error reading the frames of %s; ending its series", self._master,
                          extra={"series_id": self.series.series_id})
            return out + self._end_series()
        announced = self.series.start_fields.get("n_frames") if self.series.is_open else None
        if announced is not None and self._index >= announced:
            out.extend(self._end_series())
        return out
