"""The recorder sink: every beamkin message of every series, to HDF5, flushed per message (layout:
docs/recording.md; the reader is beamkin.recording).

The file is an append-only message log plus stacked arrays::

    /                       attrs format="beamkin-recording", format_version=1, raw_frames
    /log/received_s         float64 (N,)  Unix time (s) at which the recorder got message i
    /log/type               str     (N,)  message type ("start", "frame", "pattern", ...)
    /log/series_id          str     (N,)  "" when the message has none
    /log/frame_index        int64   (N,)  -1 when the message has none
    /log/header             str     (N,)  JSON object of the message's fields
    /log/arrays             str     (N,)  JSON object: array name -> [dataset path, row] (null: not recorded)
    /series/<id>/<type>/<array>        (rows, *shape) the arrays of that series' messages of that type,
                                       one row per message; a change of shape or dtype starts <array>.1, ...

Raw detector images (``frame`` messages' ``image``, or ``image_compressed``: the detector's
bslz4 / lz4 payload forwarded compressed) are kept only with ``raw_frames=True``. A compressed
payload is stored as it came, without decompressing it: written as the HDF5 chunk of its row
(``write_direct_chunk``) of the ``image`` dataset, whose filter (bitshuffle+LZ4 or LZ4, attribute
``filter``) is the payload's own framing, so readers get the image as for any other row. A
corrupt payload stays corrupt: :func:`read_messages` then gives that frame its stored bytes as
``image_compressed`` again (with the header's ``compression``), for a worker to flag it as live;
everything else (patterns, fractions, posteriors, alerts, start masks, 1D profiles) is always
kept. Arrays of 1024 elements or more are compressed with bitshuffle+LZ4 (hdf5plugin.Bitshuffle),
one chunk per message. After each
message the file is flushed, so a recorder killed with SIGKILL leaves a file that opens and
holds every message up to the last flushed one (readers take the shortest /log dataset's length).

The same ``start``/``end`` of a series may arrive twice (from the streamer's and the inference's
PUB sockets); identical repeats are recorded once. The inference's ``end`` adds the series'
``provenance`` (docs/protocol.md), so it is recorded beside the streamer's; a replay sends one.

Series ids are stored as HDF5 can hold them: NUL and lone surrogates (which HDF5 strings cannot
hold) are percent-encoded in ``/log/series_id`` and in group names, and the group
``/series/<id>`` keeps the original id exactly in its attribute ``series_id_json`` (JSON text);
the original is also in the message's ``/log/header``. A message that still cannot be written is
logged with its series and frame, counted (``write_errors``) and skipped; the recorder goes on.

Segments: a recorder restarted by the supervisor (``BEAMKIN_RESTART`` in its environment, see
beamkin/supervise.py) never opens an existing file for writing: it resumes in a new segment next
to the path, ``run.h5`` -> ``run.part2.h5``, ``run.part3.h5``, ... (the first free number), and
logs so. Every segment carries ``recording_id`` (the same in all segments of one recording),
``segment`` (1, 2, ...) and ``first_segment`` (the file name of segment 1) as root attributes;
:func:`recording_segments` lists a recording's segments in order. Messages published while no
recorder was subscribed (between the kill and the restarted recorder's subscription), and those
queued for the killed process, are in no segment.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import uuid
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import h5py
import hdf5plugin
import numpy as np
import zmq

from beamkin import metrics
from beamkin import security
from beamkin.protocol import Message, ProtocolError, json_default, recv
from beamkin.recording import (COMPRESS_MIN_ELEMENTS, FORMAT_NAME, FORMAT_VERSION, LOG_FIELDS, _STR, group_name, hdf5_text,
                               recording_attrs, segment_path)

log = logging.getLogger(__name__)


class Recorder:
    """Writes beamkin messages to an HDF5 recording (see module doc). Not thread-safe."""

    def __init__(self, path: str | Path, raw_frames: bool = False, *, recording_id: str | None = None,
                 segment: int = 1, first_segment: str | None = None) -> None:
        self.path = Path(path)
        self.raw_frames = bool(raw_frames)
        self.counters: Counter = Counter()
        # a later segment never overwrites a file ("x"); the first one replaces what is there ("w")
        self._file = h5py.File(self.path, "w" if segment == 1 else "x")
        self._file.attrs["format"] = FORMAT_NAME
        self._file.attrs["format_version"] = FORMAT_VERSION
        self._file.attrs["raw_frames"] = self.raw_frames
        self._file.attrs["created_unix_s"] = time.time()
        self._file.attrs["recording_id"] = recording_id or uuid.uuid4().hex
        self._file.attrs["segment"] = int(segment)
        self._file.attrs["first_segment"] = first_segment or self.path.name
        group = self._file.create_group("log")
        self._log = {}
        for name, dtype in zip(LOG_FIELDS, (np.float64, _STR, _STR, np.int64, _STR, _STR)):
            self._log[name] = group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
        self._n = 0
        self._lifecycle_seen: dict[tuple[str, str], str] = {}
        self._series_groups: set[str] = set()
        self._file.flush()

    def _series_group(self, series_id: str) -> None:
        """Create /series/<id> once, with the exact original id as JSON text in ``series_id_json``."""
        if series_id in self._series_groups:
            return
        group = self._file.require_group(f"series/{group_name(series_id)}")
        group.attrs["series_id_json"] = json.dumps(series_id)
        self._series_groups.add(series_id)

    def write(self, message: Message, received_s: float | None = None) -> None:
        """Append one message (arrays first, then its log row) and flush the file."""
        received_s = time.time() if received_s is None else received_s
        try:
            header = json.dumps(message.fields, separators=(",", ":"), default=json_default)
        except (TypeError, ValueError) as exc:
            self.counters["unserialisable"] += 1
            log.warning("not recording %s message: %s", message.type, exc, extra={"series_id": message.series_id})
            return
        if message.type in ("start", "end") and message.series_id is not None:
            key = (message.type, message.series_id)
            if self._lifecycle_seen.get(key) == header:
                self.counters["repeated"] += 1
                return
            self._lifecycle_seen[key] = header
        if message.series_id:
            self._series_group(message.series_id)
        refs: dict[str, Any] = {}
        for name, array in message.arrays.items():
            if message.type == "frame" and name in ("image", "image_compressed") and not self.raw_frames:
                refs["image"] = None
                continue
            if message.type == "frame" and name == "image_compressed":
                refs["image"] = self._append_compressed_image(message, array)
                continue
            refs[name] = self._append_array(message, name, np.asarray(array))
        row = self._n
        values = (received_s, message.type, hdf5_text(message.series_id or ""),
                  -1 if message.frame_index is None else int(message.frame_index), header,
                  json.dumps(refs, separators=(",", ":")))
        # "type" goes last: a row whose type is still empty (a reader looking while this runs,
        # or a writer killed right here) is incomplete and readers skip it
        ordered = sorted(zip(LOG_FIELDS, values), key=lambda item: item[0] == "type")
        for name, value in ordered:
            dataset = self._log[name]
            dataset.resize((row + 1,))
            dataset[row] = value
        self._n = row + 1
        self.counters[message.type] += 1
        self._file.flush()

    def _dataset_for(self, message: Message, name: str, shape: tuple, dtype: np.dtype, codec: str | None) -> h5py.Dataset:
        """The dataset of the series' ``name`` arrays of this shape and dtype (and filter
        ``codec`` when given: a compressed payload is written only where that filter decodes it)."""
        base = f"series/{group_name(message.series_id)}/{message.type}"
        group = self._file.require_group(base)
        stored = hdf5_text(name.replace("%", "%25").replace("/", "%2F")) or "_"
        suffix = 0
        while True:
            key = stored if suffix == 0 else f"{stored}.{suffix}"
            dataset = group.get(key)
            if dataset is None:
                return self._create_array_dataset(group, key, shape, dtype, codec)
            if (dataset.shape[1:] == shape and dataset.dtype == dtype
                    and (codec is None or dataset.attrs.get("filter") == codec)):
                return dataset
            suffix += 1

    def _append_array(self, message: Message, name: str, array: np.ndarray) -> list:
        dataset = self._dataset_for(message, name, array.shape, array.dtype, None)
        row = dataset.shape[0]
        dataset.resize((row + 1, *array.shape))
        dataset[row] = array
        return [dataset.name, row]

    def _append_compressed_image(self, message: Message, payload: np.ndarray) -> list | None:
        """Store a forwarded compressed image (``image_compressed`` + ``compression``) as a row of
        the ``image`` dataset without decompressing it: its bytes are that row's HDF5 chunk. A
        payload the HDF5 filter could not read as it is (bslz4 element size other than the dtype's,
        big-endian dtype) is decompressed first; a corrupt one of those is not recorded (None)."""
        from beamkin.frames import FrameDecodeError, compression_descriptor, frame_image

        try:
            algorithm, elem_size, dtype, shape = compression_descriptor(message)
        except FrameDecodeError as exc:
            self.counters["frames_not_decodable"] += 1
            log.warning("not recording the image: %s", exc,
                        extra={"series_id": message.series_id, "frame_index": message.frame_index})
            return None
        if dtype.byteorder == ">" or (algorithm == "bslz4" and elem_size != dtype.itemsize):
            try:
                return self._append_array(message, "image", np.asarray(frame_image(message)))
            except FrameDecodeError as exc:
                self.counters["frames_not_decodable"] += 1
                log.warning("not recording the image: %s", exc,
                            extra={"series_id": message.series_id, "frame_index": message.frame_index})
                return None
        dataset = self._dataset_for(message, "image", shape, dtype, algorithm)
        row = dataset.shape[0]
        dataset.resize((row + 1, *shape))
        dataset.id.write_direct_chunk((row, 0, 0), np.ascontiguousarray(payload).tobytes())
        self.counters["compressed_images_stored"] += 1
        return [dataset.name, row]

    def _create_array_dataset(self, group: h5py.Group, key: str, shape: tuple, dtype: np.dtype,
                              codec: str | None = None) -> h5py.Dataset:
        """A dataset of rows of ``shape`` x ``dtype``, one chunk per row; filter bitshuffle+LZ4
        ("bslz4") for 1024 elements or more, or the ``codec`` ("bslz4", "lz4") asked for."""
        size = int(np.prod(shape))
        if codec is None:
            codec = "bslz4" if size >= COMPRESS_MIN_ELEMENTS and dtype.kind in "biuf" else "none"
        options: dict[str, Any] = {"bslz4": dict(hdf5plugin.Bitshuffle(nelems=0, cname="lz4")),
                                   "lz4": dict(hdf5plugin.LZ4(nbytes=0)), "none": {}}[codec]
        dataset = group.create_dataset(
            key, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
            chunks=(1, *shape) if size else None, **options,
        )
        dataset.attrs["filter"] = codec
        return dataset

    def close(self) -> None:
        """Flush and close the file."""
        if self._file.id.valid:
            self._file.attrs["complete"] = True
            self._file.close()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_segment(path: str | Path, raw_frames: bool, restarted: bool) -> Recorder:
    """The Recorder for a recorder stage: at the path on a first start; after a restart, the next
    free segment of the recording at the path (which is left as it is), said in the log."""
    path = Path(path)
    if not restarted or not path.exists():
        return Recorder(path, raw_frames)
    first = recording_attrs(path)
    if first is None:
        log.warning("recording %s cannot be read after the restart (its recorder was killed while writing?); "
                    "it is kept as it is", path)
    recording_id = str(first.get("recording_id")) if first and first.get("recording_id") is not None else None
    segment = 2
    while segment_path(path, segment).exists():
        segment += 1
    target = segment_path(path, segment)
    recorder = Recorder(target, raw_frames, recording_id=recording_id, segment=segment, first_segment=path.name)
    log.warning("recorder restarted: resuming the recording in a new segment %s (segment %d); %s and the "
                "segments before are kept as they are; messages published while no recorder was subscribed "
                "are in no segment", target, segment, path.name)
    return recorder


def run_recorder(endpoints: Iterable[str], path: str | Path, raw_frames: bool, stop_event: threading.Event,
                 *, poll_ms: int = 100, drain_ms: int = 200, restarted: bool = False,
                 opened: list | None = None) -> Counter:
    """SUBscribe to every message on the PUB ``endpoints`` and record them until ``stop_event`` is set
    (then until no message has arrived for ``drain_ms``). ``restarted``: write a new segment
    (:func:`open_segment`); ``opened``, if given, gets the path of the file written appended.

    Returns the recorder's counters (messages per type, malformed, repeated).
    """
    recorder = open_segment(path, raw_frames, restarted)  # the file exists before anything is subscribed
    path = recorder.path
    if opened is not None:
        opened.append(path)
    context = zmq.Context.instance()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, 0)  # the recorder must see every message: no high-water-mark drops
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    for endpoint in endpoints:
        security.secure_client(socket, endpoint)  # CURVE when [security.record] / [security.results] require it
        socket.connect(endpoint)
        log.info("recorder SUB %s", endpoint)
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    try:
        while not stop_event.is_set():
            if not poller.poll(poll_ms):
                continue
            try:
                _, message = recv(socket)
            except ProtocolError as exc:
                recorder.counters["malformed"] += 1
                log.warning("recorder dropping malformed message: %s", exc)
                continue
            _write_surviving(recorder, message)
        # record what is still arriving: stop only after drain_ms without a message
        while poller.poll(drain_ms):
            try:
                _, message = recv(socket)
            except ProtocolError:
                recorder.counters["malformed"] += 1
                continue
            _write_surviving(recorder, message)
    finally:
        recorder.close()
        socket.close(linger=0)
    log.info("recording %s closed: %s", path, dict(recorder.counters))
    return recorder.counters


def _write_surviving(recorder: Recorder, message: Message) -> None:
    """Write one message; an error is logged (series, frame), counted as ``write_errors`` and survived.
    Frame messages are counted and their write timed (the recorder's metrics, beamkin.metrics)."""
    frame = message.type == "frame"
    if frame:
        _metrics().frame_in()
    began = time.perf_counter()
    try:
        recorder.write(message)
    except Exception:
        recorder.counters["write_errors"] += 1
        log.exception("recorder could not write a %s message", message.type,
                      extra={"series_id": message.series_id, "frame_index": message.frame_index})
        if frame:
            _metrics().dropped("write_error")
        return
    if frame:
        _metrics().frame_out()
        _metrics().latency(time.perf_counter() - began)


@functools.cache
def _metrics() -> metrics.StageMetrics:
    """The recorder's frame counters (made in the process that records, at its first message)."""
    return metrics.StageMetrics("recorder")
