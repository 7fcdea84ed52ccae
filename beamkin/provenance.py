"""Provenance of a series' result: who reduced which frame, what was flagged, replaced or in conflict.

The inference keeps one :class:`SeriesProvenance` per series and puts its :meth:`~SeriesProvenance.
as_dict` into every ``result`` (``result.provenance``) and ``end`` (``provenance``) message it
publishes (fields documented in docs/protocol.md, "Provenance"). What it knows comes from the
fraction headers: the reducer worker stamps each fraction with its identity (``worker``, the
DEALER identity ``NAME/PID`` the streamer's ROUTER knows it by) and ``host``; the streamer adds
``reassigned`` (the workers a frame was taken from, and why) to a frame it hands to another
worker, and the worker copies it into the fraction.

A frame of a series that arrives twice (two workers after a reassignment, or a replayed copy) is a
*conflict*: the first fraction stays, the second is reported (logged, counted, listed), never a
silent replacement. Lists are bounded (:data:`MAX_LISTED` entries each, the counts are exact).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import Any

#: Entries kept per list (flagged, replaced, conflicts, missing); ``counts`` stays exact beyond.
MAX_LISTED = 1000
#: Longest worker or host name kept (a hostile header cannot make the provenance large).
MAX_NAME = 128


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 (hex) of the resolved configuration as canonical JSON: keys sorted, no spaces
    (``separators=(",", ":")``), UTF-8; the same configuration gives the same hash on any host."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _name(value: Any) -> str:
    return value[:MAX_NAME] if isinstance(value, str) and value else "?"


class SeriesProvenance:
    """Contributors and exceptions of one series, from the fractions the inference received."""

    def __init__(self, config_hash: str):
        self.config_hash = config_hash
        self.sources: dict[int, tuple[str, str]] = {}  # frame index -> (worker, host) of the fraction kept
        self.frames_by_worker: dict[tuple[str, str], int] = {}
        self.flagged: list[dict[str, Any]] = []
        self.replaced: list[dict[str, Any]] = []
        self.conflicts: list[dict[str, Any]] = []
        self.missing: list[int] = []
        self._replaced: set[int] = set()
        self.counts = {"flagged": 0, "replaced": 0, "conflicts": 0, "missing": 0}

    @staticmethod
    def peer(fraction) -> tuple[str, str]:
        """(worker identity, host) a fraction names ("?" for a field absent or not a string)."""
        return _name(fraction.get("worker")), _name(fraction.get("host"))

    def _add(self, kind: str, entry: Any) -> None:
        self.counts[kind] += 1
        listed = getattr(self, kind)
        if len(listed) < MAX_LISTED:
            listed.append(entry)

    def received(self, fraction) -> dict[str, Any] | None:
        """Note a fraction's sender; returns the conflict (the frame was already received, the
        first fraction is kept) or None. Frames the streamer reassigned are noted as replaced."""
        index = fraction["frame_index"]
        worker, host = self.peer(fraction)
        reassigned = fraction.get("reassigned")
        if isinstance(reassigned, list) and reassigned and index not in self._replaced:
            # the streamer took the frame from a worker: so, whichever copy arrives first
            self._replaced.add(index)
            taken_from = [{"worker": _name(item.get("worker")), "reason": str(item.get("reason", ""))[:200]}
                          for item in reassigned[:8] if isinstance(item, dict)]
            self._add("replaced", {"frame_index": index, "reduced_by": worker, "taken_from": taken_from})
        first = self.sources.get(index)
        if first is not None:
            conflict = {"frame_index": index, "kept": {"worker": first[0], "host": first[1]},
                        "reported": {"worker": worker, "host": host}, "reason": "duplicate frame"}
            self._add("conflicts", conflict)
            return conflict
        self.sources[index] = (worker, host)
        self.frames_by_worker[(worker, host)] = self.frames_by_worker.get((worker, host), 0) + 1
        if fraction.get("status") != "ok":
            self._add("flagged", {"frame_index": index, "reason": str(fraction.get("reason") or "")[:200],
                                  "worker": worker})
        return None

    def frame_missing(self, index: int) -> None:
        self._add("missing", int(index))

    def as_dict(self) -> dict[str, Any]:
        """The ``provenance`` object of result and end messages (docs/protocol.md)."""
        workers = [{"worker": worker, "host": host, "frames": n}
                   for (worker, host), n in sorted(self.frames_by_worker.items())]
        return {
            "config_sha256": self.config_hash,
            "workers": workers,
            "hosts": sorted({host for _, host in self.frames_by_worker}),
            "inference": {"host": socket.gethostname(), "pid": os.getpid()},
            "flagged": list(self.flagged),
            "replaced": list(self.replaced),
            "conflicts": list(self.conflicts),
            "missing": list(self.missing),
            "counts": dict(self.counts),
        }
