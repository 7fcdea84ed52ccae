"""Reading beamkin recordings (the HDF5 message log of docs/recording.md): the one reader that the
recorder sink, replay, export, report, ``analyze`` and ``beamkin phases`` share.

The layout (written by sinks.recorder) is in docs/recording.md and sinks.recorder's docstring.

:func:`read_messages` reads the rows every /log dataset has, so a file whose writer was killed
reads up to its last flushed message. :func:`recording_segments` lists a recording's segments
(``run.h5``, ``run.part2.h5``, ...). :func:`check_recording` says in one line, naming the file,
why a file cannot be read as a recording (missing, a folder, not HDF5, an EIGER master file,
another format version, no message), so ``export``, ``report`` and ``replay`` never show a
traceback for a wrong file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle/LZ4 filters sinks.recorder writes with)
import numpy as np

from beamkin.protocol import Message

log = logging.getLogger(__name__)

FORMAT_NAME = "beamkin-recording"


FORMAT_VERSION = 1


#: Arrays of at least this many elements (images, masks, long patterns) are stored bitshuffle+LZ4 compressed.
COMPRESS_MIN_ELEMENTS = 1024


LOG_FIELDS = ("received_s", "type", "series_id", "frame_index", "header", "arrays")


_STR = h5py.string_dtype("utf-8")


def hdf5_text(text: str) -> str:
    """``text`` with what an HDF5 string cannot hold percent-encoded: NUL as ``%00``, a lone
    surrogate as ``%uXXXX``. Text without them is returned unchanged."""
    if "\0" not in text:
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
    return "".join("%00" if c == "\0" else f"%u{ord(c):04X}" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def group_name(series_id: str | None) -> str:
    """HDF5-safe group name of a series id ("%", "/" and "." quoted, then :func:`hdf5_text`;
    None -> "_none")."""
    if series_id is None or series_id == "":
        return "_none"
    return hdf5_text(series_id.replace("%", "%25").replace("/", "%2F").replace(".", "%2E"))


def segment_path(path: str | Path, segment: int) -> Path:
    """File of segment ``segment`` of the recording at ``path``: the path itself for 1, else
    ``STEM.partN.SUFFIX`` next to it (run.h5 -> run.part2.h5)."""
    path = Path(path)
    return path if segment == 1 else path.with_name(f"{path.stem}.part{segment}{path.suffix}")


def recording_attrs(path: Path) -> dict[str, Any] | None:
    """``recording_id`` and ``segment`` of a recording file, or None if it is not one (or unreadable)."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT_NAME:
                return None
            return {key: f.attrs[key] for key in ("recording_id", "segment") if key in f.attrs}
    except (OSError, ValueError):
        return None


def recording_segments(path: str | Path) -> list[Path]:
    """The segments of the recording whose first segment is ``path``, in order: ``path``, then
    each ``STEM.partN.SUFFIX`` next to it with the same ``recording_id``."""
    path = Path(path)
    first = recording_attrs(path)
    if first is None:
        return [path] if path.exists() else []
    pattern = re.compile(re.escape(path.stem) + r"\.part(\d+)" + re.escape(path.suffix) + "$")
    parts = []
    for candidate in path.parent.iterdir():
        match = pattern.match(candidate.name)
        if match is None:
            continue
        attrs = recording_attrs(candidate)
        if attrs is not None and first.get("recording_id") is not None and attrs.get("recording_id") == first["recording_id"]:
            parts.append((int(match.group(1)), candidate))
    return [path] + [candidate for _, candidate in sorted(parts)]


def _stored_payload(dataset: h5py.Dataset, row: int, fields: dict) -> np.ndarray | None:
    """The bytes of a frame image row written as a compressed payload (``compression`` in the
    frame's header) that the HDF5 filter cannot decode, as ``image_compressed`` (uint8), or None."""
    if not isinstance(fields.get("compression"), dict) or dataset.attrs.get("filter") not in ("bslz4", "lz4"):
        return None
    try:
        _mask, chunk = dataset.id.read_direct_chunk((row,) + (0,) * (dataset.ndim - 1))
    except (OSError, ValueError, RuntimeError):
        return None
    return np.frombuffer(chunk, dtype=np.uint8)


def is_recording(path: str | Path) -> bool:
    """True if ``path`` is an HDF5 file written by :class:`Recorder`."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT_NAME
    except (OSError, ValueError):
        return False


def count_messages(path: str | Path, types: Iterable[str] | None = None) -> int:
    """Number of messages (of the given types) in a recording, without decoding them."""
    with h5py.File(path, "r") as f:
        group = f["log"]
        n = min(group[name].shape[0] for name in LOG_FIELDS)
        return sum(1 for t in group["type"].asstr()[:n] if t and (types is None or t in set(types)))


def read_messages(path: str | Path, types: Iterable[str] | None = None, *, with_arrays: bool = True):
    """Yield (received_s, Message) of a recording in recorded order; ``types`` filters by message type.

    Works on files whose writer was killed: it reads the rows every /log dataset has. A message
    whose arrays were not recorded (raw frames off) carries only the arrays that were.
    """
    wanted = None if types is None else set(types)
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a beamkin recording (format attribute {f.attrs.get('format')!r})")
        version = int(f.attrs.get("format_version", 0))
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} is a beamkin recording of format version {version}, this reads {FORMAT_VERSION}")
        group = f["log"]
        n = min(group[name].shape[0] for name in LOG_FIELDS)
        types_column = group["type"].asstr()[:n]
        received = group["received_s"][:n]
        headers = group["header"].asstr()
        refs_column = group["arrays"].asstr()
        for i in range(n):
            message_type = types_column[i]
            if not message_type or (wanted is not None and message_type not in wanted):
                continue  # an empty type marks a row whose writing was not finished
            fields = json.loads(headers[i])
            arrays = {}
            if with_arrays:
                for name, ref in json.loads(refs_column[i]).items():
                    if ref is None:
                        continue
                    dataset_path, row = ref
                    dataset = f.get(dataset_path)
                    if dataset is None or row >= dataset.shape[0]:
                        continue
                    try:
                        arrays[name] = dataset[row]
                    except OSError as exc:  # a corrupt compressed payload stored as it came
                        stored = _stored_payload(dataset, row, fields)
                        if stored is None:
                            log.warning("cannot read %s row %d of %s: %s", dataset_path, row, path, exc)
                            continue
                        arrays["image_compressed"] = stored
            yield float(received[i]), Message(message_type, fields, arrays)


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class RecordingInputError(ValueError):
    """A file that is not a readable beamkin recording (the text names the file and why)."""


def _hdf5_signature(path: Path) -> bool:
    """True if the file starts with the HDF5 signature (at offset 0; user blocks are not used here)."""
    with path.open("rb") as handle:
        return handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE


def check_recording(path: str | os.PathLike, require_messages: bool = True) -> int:
    """The number of messages in the recording at ``path``; RecordingInputError if it is none."""
    path = Path(path)
    if not path.exists():
        raise RecordingInputError(f"{path} does not exist")
    if path.is_dir():
        raise RecordingInputError(f"{path} is a folder, expected a beamkin recording (.h5)")
    try:
        if not _hdf5_signature(path):
            raise RecordingInputError(f"{path} is not an HDF5 file (expected a beamkin recording)")
        with h5py.File(path, "r") as f:
            kind = f.attrs.get("format")
            if kind != FORMAT_NAME:
                if "entry/data" in f and "entry/instrument/detector" in f:
                    raise RecordingInputError(f"{path} is an EIGER master file, not a beamkin recording "
                                              "(beamkin replay runs the pipeline on it)")
                raise RecordingInputError(f"{path} is an HDF5 file but not a beamkin recording "
                                          f"(format attribute {kind!r})")
            version = int(f.attrs.get("format_version", 0))
            if version != FORMAT_VERSION:
                raise RecordingInputError(f"{path} is a beamkin recording of format version {version}; "
                                          f"this beamkin reads version {FORMAT_VERSION}")
            missing = [name for name in LOG_FIELDS if f"log/{name}" not in f]
            if missing:
                raise RecordingInputError(f"{path} is a damaged beamkin recording (no /log/{missing[0]})")
        n = count_messages(path)
    except PermissionError as exc:
        raise RecordingInputError(f"{path} cannot be read: {exc.strerror}") from None
    except (OSError, KeyError) as exc:
        raise RecordingInputError(f"{path} is a damaged HDF5 file: {exc}") from None
    if require_messages and n == 0:
        raise RecordingInputError(f"{path} is a beamkin recording without any message: nothing to read")
    return n
