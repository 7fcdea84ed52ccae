"""Output paths checked before a long run starts, so a typo does not cost the run's result.

``check_output_file(path, what)`` and ``check_output_folder(path, what)`` raise
:class:`OutputPathError` (a ``ValueError``) with one line naming the path and the problem:
the parent folder is missing or not writable, the path is a folder where a file is expected
(or a file where a folder is expected). Nothing is created or truncated by the check itself.
"""

from __future__ import annotations

import os
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that cannot be written (the text names the path and why)."""


def _writable_parent(path: Path, what: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists():  # a folder we will create: its nearest existing ancestor must be writable
        if existing == existing.parent:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path}: folder {existing} is not writable")


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """The path of a file about to be written (created or replaced); OutputPathError if it cannot be.

    The parent folder need not exist yet if it can be created (the writers create it)."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder, expected a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{what} {path} exists and is not writable")
    _writable_parent(path, what)
    return path


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """The path of a folder about to be filled (created if missing); OutputPathError if it cannot be."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputPathError(f"{what} {path} is a file, expected a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{what} {path} is not writable")
        return path
    _writable_parent(path, what)
    return path
