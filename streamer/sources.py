"""``open_source(spec, options)``: one source adapter per input kind, all yielding the normalised series.

Specs::

    dectris2:tcp://HOST:PORT     DECTRIS Stream V2 (CBOR), PULL connected to the detector
    dectris1:tcp://HOST:PORT     DECTRIS Stream V1 (JSON multipart), PULL connected to the detector
    files:FOLDER                 CBF / EDF / TIFF frames, EIGER HDF5 master files, 1D profiles appearing in FOLDER
    replay:FILE                  a beamkin recording (HDF5) or an EIGER HDF5 master file, re-emitted

Every source has ``messages(stop_event)`` (a generator of ``beamkin.protocol.Message``: start,
frames, end, ...; it returns once ``stop_event`` is set) and ``counters`` (a dict of error and
progress counters). Bad input never raises out of ``messages()``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterator, Mapping, Protocol

from beamkin.protocol import Message

log = logging.getLogger(__name__)

SCHEMES = ("dectris2", "dectris1", "files", "replay")


class Source(Protocol):
    counters: Mapping[str, int]

    def messages(self, stop_event: threading.Event) -> Iterator[Message]: ...


def open_source(spec: str, options: Mapping[str, Any] | None = None) -> Source:
    """The source adapter for ``spec`` (see the module doc); raises ValueError for an unknown scheme."""
    scheme, sep, target = spec.partition(":")
    if not sep or not target:
        raise ValueError(f"source spec {spec!r} is not SCHEME:TARGET with SCHEME one of {SCHEMES}")
    options = dict(options or {})
    if scheme == "dectris2":
        from streamer.stream_v2 import StreamV2Source

        return StreamV2Source(target, options, spec=spec)
    if scheme == "dectris1":
        from streamer.stream_v1 import StreamV1Source

        return StreamV1Source(target, options, spec=spec)
    if scheme == "files":
        from streamer.files import FolderSource

        return FolderSource(target, options, spec=spec)
    if scheme == "replay":
        from streamer.replay import open_replay

        return open_replay(target, options, spec=spec)
    raise ValueError(f"unknown source scheme {scheme!r} in {spec!r}; expected one of {SCHEMES}")
