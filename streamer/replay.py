"""``replay:FILE``: re-emit a beamkin recording, or an EIGER HDF5 master file, as a source.

A recording is re-emitted message for message in the recorded order; the pause before message
i is ``(received_s[i] - received_s[i-1]) / speed`` (option ``speed``, default 1.0; 0 = no pauses).
Only ``start``, ``frame`` and ``end`` messages are emitted unless option ``types`` lists others
(e.g. ``["start", "frame", "end", "fraction"]``, or ``"all"``). Frames recorded without their
image (``raw_frames = false``) cannot be re-emitted and are counted as ``frames_not_recorded``.
A series whose end is missing from the file (recorder killed) gets an ``aborted`` end.

An EIGER master file is emitted as one series paced at ``frame_time / speed``; option
``gas_time_s`` sets the start message's gas-introduction time.

What a recording holds decides how it is replayed (:func:`replay_plan`): a recording whose frames
all carry their image or profile is replayed from the frames (through reducers); one without raw
frames (``raw_frames = false``, the default) is replayed from its reduced messages: its first
series' ``start``, ``pattern``, ``fraction`` and ``end`` messages are pushed straight to the
inference (:func:`feed_reduced`), which then computes the same posterior as live for the same
[inference] settings, because it is fed the same fractions. A recording with neither is refused
with the reason (:class:`~beamkin.recording.RecordingInputError`).

Progress goes to stderr about once a second (option ``progress``, default True).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping

from beamkin import protocol, security
from beamkin.protocol import Message, make
from streamer.eiger_h5 import is_eiger_master, iter_master_frames, read_master_start
from beamkin.errors import StreamDecodeError
from beamkin.recording import LOG_FIELDS, count_messages, is_recording, read_messages, RecordingInputError, check_recording
from streamer.series import SeriesAssembler

log = logging.getLogger(__name__)

DEFAULT_TYPES = ("start", "frame", "end")
#: what a recording without raw frames is replayed from (into the inference)
REDUCED_TYPES = ("start", "pattern", "fraction", "end")
#: replay_plan modes: from the raw frames (reducers run again) or from the reduced messages
FROM_FRAMES, FROM_FRACTIONS = "frames", "fractions"


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
                elif message.type == "end":
                    if message.series_id != open_series:  # the inference's copy of an end already sent
                        self.counters["repeated_end"] += 1
                        continue
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


def recording_contents(path: str | Path) -> Counter:
    """What the first series of a recording holds: counts of its ``frame`` messages, of those whose
    image or profile was recorded (``frames_with_data``), of ``fraction`` (``fractions_ok``: status
    "ok") and ``pattern`` messages; ``series`` is the number of series started in the file."""
    import h5py

    contents: Counter = Counter()
    first: str | None = None
    with h5py.File(path, "r") as f:
        group = f["log"]
        n = min(group[name].shape[0] for name in LOG_FIELDS)
        types = group["type"].asstr()[:n]
        series_ids = group["series_id"].asstr()[:n]
        refs_column = group["arrays"].asstr()[:n]
        headers = group["header"].asstr()
        for i in range(n):
            kind, series_id = types[i], series_ids[i]
            if kind == "start" and series_id != first:
                contents["series"] += 1
                first = first or series_id
            if first is None or series_id != first:
                continue
            if kind == "frame":
                contents["frames"] += 1
                refs = json.loads(refs_column[i])
                if refs.get("image") is not None or refs.get("counts") is not None:
                    contents["frames_with_data"] += 1
            elif kind == "fraction":
                contents["fractions"] += 1
                if json.loads(headers[i]).get("status") == "ok":
                    contents["fractions_ok"] += 1
            elif kind == "pattern":
                contents["patterns"] += 1
    return contents


def replay_plan(path: str | Path, requested: str = "auto") -> tuple[str, Counter]:
    """How to replay a recording: FROM_FRAMES or FROM_FRACTIONS, and its contents.

    ``requested``: "auto" (frames when every recorded frame has its data, else fractions),
    "frames" or "fractions". RecordingInputError says why a requested replay cannot be done."""
    check_recording(path)
    contents = recording_contents(path)
    if contents["series"] == 0:
        raise RecordingInputError(f"{path} has no series start message: nothing to replay")
    frames_complete = contents["frames"] > 0 and contents["frames_with_data"] == contents["frames"]
    have_fractions = contents["fractions"] > 0
    if requested == FROM_FRAMES or (requested == "auto" and frames_complete):
        if not frames_complete:
            missing = contents["frames"] - contents["frames_with_data"]
            raise RecordingInputError(
                f"{path}: {missing} of {contents['frames']} frames were recorded without their image "
                f"(raw_frames = false){'; --from fractions replays its phase fractions' if have_fractions else ''}")
        return FROM_FRAMES, contents
    if requested not in ("auto", FROM_FRACTIONS):
        raise ValueError(f"replay from {requested!r}: expected auto, {FROM_FRAMES} or {FROM_FRACTIONS}")
    if not have_fractions:
        why = ("its frames were recorded without their images (raw_frames = false)" if contents["frames"]
               else "it holds no frames")
        raise RecordingInputError(f"{path} cannot be replayed: {why} and it holds no phase fractions")
    return FROM_FRACTIONS, contents


class ReducedReplay(RecordingReplay):
    """The first series of a recording as its reduced messages (REDUCED_TYPES), paced as recorded."""

    def __init__(self, path: str | Path, options: Mapping[str, Any] | None = None, *, spec: str | None = None) -> None:
        super().__init__(path, {**dict(options or {}), "types": REDUCED_TYPES}, spec=spec)

    def messages(self, stop_event: threading.Event) -> Iterator[Message]:
        """The first series' messages; its ``end`` goes last, after the fractions recorded after it
        (the inference publishes a series' last fractions after the streamer's ``end``)."""
        first: str | None = None
        end: Message | None = None
        fractions: set[int] = set()
        for message in super().messages(stop_event):
            if message.type == "start" and first is not None and message.series_id != first:
                break  # the next series: the first one is complete
            if first is None and message.type == "start":
                first = message.series_id
                schedule = recorded_schedule(self.path, first)
                if schedule is not None:  # the inference then takes the frames in the live run's steps
                    message = Message("start", {**message.fields, "exact_schedule": schedule}, message.arrays)
            if message.series_id != first:
                continue
            if message.type == "end":
                end = end or message
            else:
                if message.type == "fraction":
                    self.counters["fractions"] += 1
                    fractions.add(message.frame_index)
                elif message.type == "pattern":
                    self.counters["patterns"] += 1
                yield message
            if end is not None and len(fractions) >= int(end["n_frames"]):
                break
        if end is not None:
            yield end


def recorded_schedule(path: str | Path, series_id: str) -> list[int] | None:
    """Frames per exact step of the recorded live run of ``series_id`` (its posteriors' ``batch``
    lists, in order), or None when the recording has no posteriors with batches."""

    batches = [m.get("batch") for _, m in read_messages(path, types=("posterior",), with_arrays=False)
               if m.series_id == series_id]
    if not batches or any(not isinstance(b, list) or not b for b in batches):
        return None
    return [len(b) for b in batches]


def feed_reduced(path: str | Path, endpoint: str, stop_event: threading.Event,
                 options: Mapping[str, Any] | None = None, send_timeout_s: float = 0.2) -> Counter:
    """PUSH the first series' reduced messages of a recording to the inference at ``endpoint``
    (its ``reduced`` PULL socket), paced by ``options["speed"]``; returns the replay counters.

    A message the inference does not take (queue full, not started yet) is retried every
    ``send_timeout_s`` seconds until ``stop_event`` is set; nothing is dropped."""
    import zmq

    replay = ReducedReplay(path, options)
    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1000))
    socket.setsockopt(zmq.LINGER, 5000)
    security.secure_client(socket, endpoint, "reduced")  # CURVE when [security.reduced] requires it
    socket.connect(endpoint)
    try:
        for message in replay.messages(stop_event):
            while not stop_event.is_set():
                try:
                    protocol.send(socket, message)
                    replay.counters["sent"] += 1
                    break
                except zmq.Again:
                    continue
            if stop_event.is_set():
                break
    finally:
        socket.close()
        context.term()
    log.info("replayed %d fractions and %d patterns of %s into the inference", replay.counters["fractions"],
             replay.counters["patterns"], path)
    return replay.counters
