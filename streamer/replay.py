"""``replay:FILE``: re-emit a beamkin recording, or an EIGER HDF5 master file, as a source.

A recording is re-emitted message for message in the recorded order; the pause before message
i is ``(received_s[i] - received_s[i-1]) / speed`` (option ``speed``, default 1.0; 0 = no pauses).
Only ``start``, ``frame`` and ``end`` messages are emitted unless option ``types`` lists others
(e.g. ``["start", "frame", "end", "fraction"]``, or ``"all"``). Frames recorded without their
image (``raw_frames = false``) cannot be re-emitted and are counted as ``frames_not_recorded``.
A series whose end is missing from the file (recorder killed) gets an ``aborted`` end.

An EIGER master file is emitted as one series paced at ``frame_time / speed``; option
``gas_time_s`` sets the start message's gas-introduction time.

Progress goes to stderr about once a second (option ``progress``, default True).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping

from beamkin.protocol import Message, make
from streamer.eiger_h5 import is_eiger_master, iter_master_frames, read_master_start
from streamer.errors import StreamDecodeError
from streamer.recorder import count_messages, is_recording, read_messages
from streamer.series import SeriesAssembler

log = logging.getLogger(__name__)

DEFAULT_TYPES = ("start", "frame", "end")


class _Pacer:
    """Waits until a message's scheduled time: start + (t - t_first) / speed (s)."""

    def __init__(self, speed: float, stop_event: threading.Event) -> None:
        if speed < 0:
            raise ValueError(f"replay speed must be >= 0, got {speed}")
        self.speed = speed
        self.stop_event = stop_event
        self.origin: tuple[float, float] | None = None

    def wait(self, t: float) -> bool:
        """Sleep until the scheduled time of original time ``t``; False if stopped meanwhile."""
        if self.origin is None:
            self.origin = (time.monotonic(), t)
            return not self.stop_event.is_set()
        if self.speed == 0:
            return not self.stop_event.is_set()
        due = self.origin[0] + (t - self.origin[1]) / self.speed
        delay = due - time.monotonic()
        if delay > 0:
            return not self.stop_event.wait(delay)
        return not self.stop_event.is_set()


class _Progress:
    def __init__(self, label: str, total: int | None, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < 1.0):
            return
        self.last = now
        share = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        print(f"replay {self.label}: {done}/{self.total if self.total is not None else '?'} messages{share}",
              file=sys.stderr, flush=True)


class _FileReplay:
    """What every replay source takes: the file, its source spec, the pace (``speed``: times
    the original pace, 0 = as fast as possible), progress lines on stderr, counters."""

    def __init__(self, path: str | Path, options: Mapping[str, Any] | None = None, *, spec: str | None = None) -> None:
        self.options = dict(options or {})
        self.path = Path(path)
        self.spec = spec or f"replay:{path}"
        self.speed = float(self.options.get("speed", 1.0))
        self.progress = bool(self.options.get("progress", True))
        self.counters: Counter = Counter()


class RecordingReplay(_FileReplay):
    """Source re-emitting a beamkin recording (see module doc)."""

    def __init__(self, path: str | Path, options: Mapping[str, Any] | None = None, *, spec: str | None = None) -> None:
        super().__init__(path, options, spec=spec)
        types = self.options.get("types", DEFAULT_TYPES)
        self.types = None if types == "all" else tuple(types)

    def messages(self, stop_event: threading.Event) -> Iterator[Message]:
        pacer = _Pacer(self.speed, stop_event)
        open_series: str | None = None
        emitted = 0
        try:
            total = count_messages(self.path, self.types)
            progress = _Progress(self.path.name, total, self.progress)
            for received_s, message in read_messages(self.path, self.types):
                if not pacer.wait(received_s):
                    break
                if message.type == "frame" and "image" not in message.arrays and "counts" not in message.arrays:
                    self.counters["frames_not_recorded"] += 1
                    continue
                if message.type == "start":
                    if open_series is not None:
                        self.counters["missing_end"] += 1
                        yield make("end", series_id=open_series, n_frames=self.counters["frames_in_series"], reason="aborted")
                    open_series = message.series_id
                    self.counters["frames_in_series"] = 0
                elif message.type == "frame":
                    self.counters["frames_in_series"] += 1
                    self.counters["frames"] += 1
                elif message.type == "end" and message.series_id == open_series:
                    open_series = None
                emitted += 1
                self.counters["messages"] += 1
                yield message
                progress.update(emitted)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:  # a damaged recording
            self.counters["malformed"] += 1
            log.error("replay of %s stopped at a damaged message: %s", self.path, exc)
            progress = _Progress(self.path.name, None, self.progress)
        if open_series is not None:
            self.counters["missing_end"] += 1
            yield make("end", series_id=open_series, n_frames=self.counters["frames_in_series"], reason="aborted")
        progress.update(emitted, force=True)


class EigerMasterReplay(_FileReplay):
    """Source emitting an EIGER HDF5 master file's frames as one series (see module doc)."""

    def __init__(self, path: str | Path, options: Mapping[str, Any] | None = None, *, spec: str | None = None) -> None:
        super().__init__(path, options, spec=spec)
        self.gas_time_s = self.options.get("gas_time_s")

    def messages(self, stop_event: threading.Event) -> Iterator[Message]:
        assembler = SeriesAssembler(self.spec, self.counters)
        try:
            fields, arrays = read_master_start(self.path, self.path.stem, self.spec)
        except StreamDecodeError as exc:
            self.counters[exc.counter] += 1
            log.error("cannot replay %s: %s", self.path, exc)
            return
        if self.gas_time_s is not None:
            fields["gas_time_s"] = float(self.gas_time_s)
        yield from assembler.start(fields, arrays)
        pacer = _Pacer(self.speed, stop_event)
        progress = _Progress(self.path.name, fields["n_frames"], self.progress)
        aborted = False
        try:
            for index, image in iter_master_frames(self.path, missing_ok=False):
                if not pacer.wait(index * fields["frame_time_s"]):
                    aborted = True
                    break
                yield from assembler.frame(None, index, {"image": image})
                progress.update(index + 1)
        except (OSError, KeyError, ValueError, RuntimeError) as exc:  # missing or corrupt data file
            self.counters["malformed"] += 1
            log.error("cannot read the frames of %s: %s", self.path, exc, extra={"series_id": assembler.series_id})
            aborted = True
        yield from (assembler.close() if aborted else assembler.end(None))


def open_replay(path: str, options: Mapping[str, Any] | None = None, *, spec: str | None = None):
    """The replay source for a recording or an EIGER master file; ValueError for anything else."""
    if is_recording(path):
        return RecordingReplay(path, options, spec=spec)
    if is_eiger_master(path):
        return EigerMasterReplay(path, options, spec=spec)
    raise ValueError(f"{path} is neither a beamkin recording nor an EIGER HDF5 master file")
