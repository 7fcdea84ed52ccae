"""Why a file cannot be read as a beamkin recording, in one line naming the file.

``check_recording(path)`` returns the number of complete messages a recording holds, or raises
:class:`RecordingInputError` (a ``ValueError``) saying what the file is instead: missing, a
folder, unreadable, not HDF5 (a binary or text file), HDF5 but not a beamkin recording (an
EIGER master file is named as such), a recording of another format version, or (with
``require_messages``) a recording without a single message. ``export``, ``report`` and
``replay`` call it before they start, so their errors are this one line, never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py

from streamer.recorder import FORMAT_NAME, FORMAT_VERSION, LOG_FIELDS, count_messages

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
