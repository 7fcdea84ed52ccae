"""The streamer stage: read a source, publish every raw message, and deal frames to reducers.

Layers (after OnDA/OM): the *source* (streamer.sources) retrieves and normalises detector
messages in its own thread; this module handles *parallelisation*: a ROUTER socket hands frames
to the reducer workers that announced themselves (each holds at most its `capacity` frames;
the least loaded gets the next one), remembers which worker holds which frame until the worker
says ``done``, and hands the frames of a worker that goes silent to another one, so no frame is
lost. A worker declared lost that speaks again simply joins anew.

Messages: ``start``/``end`` go to the inference (PUSH) and to every worker before its first
frame of that series; every message is published on the raw PUB for the recorder.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from beamkin import protocol, sockets
from beamkin.supervise import signal_ready

log = logging.getLogger(__name__)

STATUS_PERIOD_S = 1.0


@dataclass
class WorkerState:
    identity: bytes
    name: str
    capacity: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    quiet_s: float = 0.0  # announced silence (building an integrator) on top of the timeout
    in_flight: dict[tuple[str, int], protocol.Message] = field(default_factory=dict)
    last_dispatch: int = 0  # dispatch sequence number of the last frame it was given
    series_started: set[str] = field(default_factory=set)


class FrameDispatcher:
    """Credit-based frame dispatch over a ROUTER socket with acknowledgement and fail-over."""

    def __init__(self, router: zmq.Socket, worker_timeout_s: float):
        self.router = router
        self.worker_timeout_s = worker_timeout_s
        self.workers: dict[bytes, WorkerState] = {}
        self.pending: collections.deque[protocol.Message] = collections.deque()
        self.starts: dict[str, protocol.Message] = {}
        self.counters = collections.Counter()

    # -- worker side -------------------------------------------------------------------
    def handle_worker_message(self) -> None:
        try:
            (identity,), message = protocol.recv(self.router, prefix_parts=1)
        except protocol.ProtocolError as exc:
            self.counters["malformed_worker_messages"] += 1
            log.warning("malformed message from a reducer worker: %s", exc)
            return
        worker = self.workers.get(identity)
        if worker is None:
            worker = self.workers[identity] = WorkerState(identity, message.get("worker", "?"))
            log.info("reducer worker %s joined", worker.name)
        worker.last_seen = time.monotonic()
        if message.type == "ready":
            worker.capacity = message["capacity"]
            worker.quiet_s = float(message.get("quiet_s", 0.0))
        elif message.type == "done":
            key = (message["series_id"], message["frame_index"])
            if worker.in_flight.pop(key, None) is not None:
                self.counters["frames_done"] += 1
        else:
            self.counters["unexpected_worker_messages"] += 1
            log.warning("unexpected %s message from worker %s", message.type, worker.name)

    def expire_silent_workers(self) -> None:
        now = time.monotonic()
        for identity, worker in list(self.workers.items()):
            if now - worker.last_seen > self.worker_timeout_s + worker.quiet_s:
                self._lose_worker(identity, f"silent for {now - worker.last_seen:.1f} s")

    def _lose_worker(self, identity: bytes, why: str) -> None:
        """Forget a worker and put its unacknowledged frames back at the head of the queue."""
        worker = self.workers.pop(identity)
        self.counters["workers_lost"] += 1
        frames = sorted(worker.in_flight.values(), key=lambda m: m["frame_index"], reverse=True)
        for message in frames:
            self.pending.appendleft(message)
        log.error("reducer worker %s %s: declared lost, %d frame(s) handed to other workers",
                  worker.name, why, len(frames))

    # -- dispatch ----------------------------------------------------------------------
    def dispatch(self) -> None:
        """Send pending frames to workers below capacity, the least loaded first and, among
        equally loaded ones, the one served least recently (so every worker takes part and has
        the series' integrator built early, not only when the others are busy)."""
        while self.pending:
            ready = [w for w in self.workers.values() if len(w.in_flight) < w.capacity]
            if not ready:
                return
            worker = min(ready, key=lambda w: (len(w.in_flight) / w.capacity, w.last_dispatch))
            frame = self.pending.popleft()
            series_id = frame["series_id"]
            try:
                if series_id not in worker.series_started and series_id in self.starts:
                    protocol.send(self.router, self.starts[series_id], prefix=[worker.identity])
                    worker.series_started.add(series_id)
                protocol.send(self.router, frame, prefix=[worker.identity])
            except zmq.ZMQError as exc:  # EHOSTUNREACH: the worker's connection is gone
                self.pending.appendleft(frame)
                self._lose_worker(worker.identity, f"unreachable ({exc})")
                continue
            worker.in_flight[(series_id, frame["frame_index"])] = frame
            self.counters["frames_dispatched"] += 1
            worker.last_dispatch = self.counters["frames_dispatched"]

    @property
    def in_flight(self) -> int:
        return sum(len(w.in_flight) for w in self.workers.values())


def _read_source(source, stop: threading.Event, inbox: queue.Queue) -> None:
    """Source thread: put normalised messages on the bounded inbox (blocks = backpressure)."""
    try:
        for message in source.messages(stop):
            while not stop.is_set():
                try:
                    inbox.put(message, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                break
    except Exception:  # a source bug must not hang the stage: report it and stop
        log.exception("source %s failed", getattr(source, "spec", source))
    finally:
        inbox.put(None)


#: [streamer] keys whose "unknown" value in TOML (which has no null) is 0, [] or negative
_UNKNOWN_WHEN_EMPTY = ("n_frames", "frame_time_s", "exposure_s", "wavelength_A", "distance_m",
                       "beam_center_px", "pixel_size_m", "gas_time_s")


def source_options(streamer_config: dict[str, Any]) -> dict[str, Any]:
    """The [streamer] table as source options: unknown values (0, [], negative) become None."""
    options = dict(streamer_config)
    for key in _UNKNOWN_WHEN_EMPTY:
        value = options.get(key)
        if value is not None and (value == [] or (isinstance(value, (int, float)) and value <= 0)):
            options[key] = None
    return options


def run_streamer(config: dict[str, Any], stop: threading.Event) -> int:
    from streamer.sources import open_source

    options = config["streamer"]
    endpoints = config["endpoints"]
    source = open_source(options["source"], source_options(options))
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.LINGER, 1000)
    sockets.bind(router, endpoints["frames"])
    raw = sockets.publisher(context, endpoints["raw"])
    to_inference = sockets.pusher(context, endpoints["reduced"])
    dispatcher = FrameDispatcher(router, options["worker_timeout_s"])
    inbox: queue.Queue = queue.Queue(maxsize=max(1, int(options["max_pending_frames"])))
    reader = threading.Thread(target=_read_source, args=(source, stop, inbox), name="source", daemon=True)
    reader.start()
    log.info("streamer reading %s; workers connect to %s", options["source"], endpoints["frames"])
    signal_ready()

    def send_status() -> None:
        counters = {**dispatcher.counters, **getattr(source, "counters", {}),
                    "workers": len(dispatcher.workers), "frames_pending": len(dispatcher.pending),
                    "frames_in_flight": dispatcher.in_flight}
        protocol.send(to_inference, protocol.make("status", stage="streamer", series_id=None, counters=counters))

    source_done = False
    series_ended = 0
    last_status = time.monotonic()
    while not stop.is_set():
        if router.poll(20):
            while router.poll(0):
                dispatcher.handle_worker_message()
        while not source_done and len(dispatcher.pending) < options["max_pending_frames"]:
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                break
            if message is None:
                source_done = True
                break
            if message.type == "frame":
                message.fields["received_unix_s"] = time.time()
            sockets.publish(raw, message, stop)
            if message.type == "frame":
                dispatcher.pending.append(message)
                dispatcher.counters["frames_received"] += 1
            elif message.type in ("start", "end"):
                if message.type == "start":
                    dispatcher.starts[message["series_id"]] = message
                else:
                    series_ended += 1
                protocol.send(to_inference, message)
        dispatcher.dispatch()
        dispatcher.expire_silent_workers()
        now = time.monotonic()
        if now - last_status >= STATUS_PERIOD_S:
            last_status = now
            send_status()
        idle = not dispatcher.pending and dispatcher.in_flight == 0
        if idle and ((options["once"] and series_ended >= 1) or source_done):
            break
    send_status()  # the final counts, for the dashboard's health panel
    log.info("streamer stopping: %s", dict(dispatcher.counters))
    stop.set()
    reader.join(timeout=2)
    for socket in (router, raw, to_inference):
        socket.close(linger=1000)
    context.term()
    return 0
