"""The streamer stage: read a source, publish every raw message, and deal frames to reducers.

Layers (after OnDA/OM): the *source* (streamer.sources) retrieves and normalises detector
messages in its own thread; this module handles *parallelisation*: a ROUTER socket hands frames
to the reducer workers that announced themselves (each holds at most its `capacity` frames;
the least loaded gets the next one), remembers which worker holds which frame until the worker
says ``done``, and hands the frames of a worker that goes silent to another one, so no frame is
lost. A worker declared lost that speaks again simply joins anew.

Messages: ``start``/``end`` go to the inference (PUSH) and to every worker before its first
frame of that series. Every message goes to the recorder's own socket (``[endpoints] record``,
XPUB_NODROP: lossless, the streamer waits for a slow recorder once ``record_hwm`` messages are
queued) and to the raw PUB for live viewers (``[endpoints] raw``: never waits; a slow subscriber
holds at most ``raw_budget_bytes`` of frames and then misses frames, see
:class:`beamkin.sockets.BudgetedPublisher`).

Hostile input (issue 11): a malformed message from a DEALER is logged, counted and survived; any
exception while handling one message is logged with its series and frame, counted
(``handler_errors``) and survived. Per-series state is bounded: a series' start is kept only
while it is open or has frames pending or in flight. A source that fails makes the stage exit 1
(never 0), and with ``once`` a rejected start not followed by a usable one within
``rejected_wait_s`` makes it exit :data:`EXIT_SERIES_REJECTED` with the rejection as the reason.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from beamkin import metrics, protocol, sockets
from beamkin.supervise import EXIT_SERIES_REJECTED, signal_ready

log = logging.getLogger(__name__)

STATUS_PERIOD_S = 1.0
#: A worker announcing more capacity than this is held to it (a hostile `ready` cannot make the
#: streamer hand one peer every frame); quiet_s is held to [0, MAX_QUIET_S] seconds.
MAX_WORKER_CAPACITY = 256
MAX_QUIET_S = 3600.0
#: series ids read from one worker's ``ready`` (a worker keeps a few: reducer.service.SERIES_KEPT)
MAX_REPORTED_SERIES = 64
#: Workers send only small `ready` / `done` messages: the ROUTER disconnects a peer sending a part
#: larger than this (bytes) before it is ever assembled in memory (ZMQ_MAXMSGSIZE).
MAX_WORKER_MESSAGE_BYTES = 1 << 20


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
    #: series whose start it was sent and whose integrator it has not yet said it set up: no
    #: frame of theirs goes to it (see dispatch)
    building: set[str] = field(default_factory=set)
    reports_series: bool = False  # its ready messages list the series it has set up


class FrameDispatcher:
    """Credit-based frame dispatch over a ROUTER socket with acknowledgement and fail-over."""

    def __init__(self, router: zmq.Socket, worker_timeout_s: float):
        self.router = router
        self.worker_timeout_s = worker_timeout_s
        self.workers: dict[bytes, WorkerState] = {}
        self.pending: collections.deque[protocol.Message] = collections.deque()
        self.starts: dict[str, protocol.Message] = {}
        self.ended: set[str] = set()  # ended series whose start is kept until their frames are done
        self.counters = collections.Counter()
        self.metrics = metrics.StageMetrics("streamer")

    # -- worker side -------------------------------------------------------------------
    def handle_worker_message(self) -> None:
        """Read one message from a worker; malformed input is logged, counted and survived."""
        try:
            (identity,), message = protocol.recv(self.router, prefix_parts=1)
        except protocol.ProtocolError as exc:
            self.counters["malformed_worker_messages"] += 1
            log.warning("malformed message from a reducer worker: %s", exc)
            return
        try:
            self._worker_message(identity, message)
        except Exception:  # never let one peer's message take the streamer down
            self.counters["handler_errors"] += 1
            log.exception("error handling a %s message from a reducer worker", message.type,
                          extra={"series_id": message.series_id, "frame_index": message.frame_index})

    def _worker_message(self, identity: bytes, message: protocol.Message) -> None:
        worker = self.workers.get(identity)
        if worker is None:
            name = message.get("worker", "?")
            worker = self.workers[identity] = WorkerState(identity, name[:64] if isinstance(name, str) else "?")
            log.info("reducer worker %s joined", worker.name)
        worker.last_seen = time.monotonic()
        if message.type == "ready":
            capacity = message["capacity"]
            if not 0 <= capacity <= MAX_WORKER_CAPACITY:
                self.counters["worker_capacity_clamped"] += 1
                log.warning("reducer worker %s announced capacity %d; using %d", worker.name, capacity,
                            min(max(capacity, 0), MAX_WORKER_CAPACITY))
            worker.capacity = min(max(capacity, 0), MAX_WORKER_CAPACITY)
            quiet = message.get("quiet_s", 0.0)
            worker.quiet_s = min(max(float(quiet), 0.0), MAX_QUIET_S) if quiet == quiet else 0.0  # NaN -> 0
            series = message.get("series")
            if isinstance(series, list):  # the series it has set up take frames
                worker.reports_series = True
                worker.building.difference_update(s for s in series[:MAX_REPORTED_SERIES] if isinstance(s, str))
            elif worker.quiet_s == 0.0 and not worker.reports_series:  # a worker that does not list them
                worker.building.clear()  # is taken at its word by a ready that announces no silence
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
        for message in frames:  # the worker's copy may still arrive: the inference reports it as a conflict
            message.fields.setdefault("reassigned", []).append(
                {"worker": identity.decode("utf-8", "replace"), "reason": f"worker {why}"})
            self.pending.appendleft(message)
        self.metrics.reassigned(why.split(" ", 1)[0], len(frames))
        log.error("reducer worker %s %s: declared lost, %d frame(s) handed to other workers",
                  worker.name, why, len(frames))

    # -- dispatch ----------------------------------------------------------------------
    def dispatch(self) -> None:
        """Send pending frames to workers below capacity, the least loaded first and, among
        equally loaded ones, the one served least recently (so every worker takes part and has
        the series' integrator built early, not only when the others are busy).

        A worker new to a series is sent its ``start`` alone, and that series' frames only once
        a ``ready`` of it lists the series among those it has set up (``series``): a frame never
        waits behind an integrator build, which can outlast the inference's
        ``missing_timeout_s`` on a loaded host (measured: 28 s for a Pilatus 1M integrator,
        tests/test_multihost.py) and lose the frame there.  The frames wait here, or go to a
        worker that has the integrator.  A worker whose ``ready`` lists no series (a test's
        stand-in) gets them after its next ``ready`` without ``quiet_s``."""
        while self.pending:
            series_id = self.pending[0]["series_id"]
            ready = [w for w in self.workers.values() if len(w.in_flight) < w.capacity and series_id not in w.building]
            if not ready:
                return
            worker = min(ready, key=lambda w: (len(w.in_flight) / w.capacity, w.last_dispatch))
            try:
                if series_id not in worker.series_started and series_id in self.starts:
                    protocol.send(self.router, self.starts[series_id], prefix=[worker.identity])
                    worker.series_started.add(series_id)
                    worker.building.add(series_id)
                    continue  # its frames once it has built the integrator
                frame = self.pending[0]
                protocol.send(self.router, frame, prefix=[worker.identity])
            except zmq.ZMQError as exc:  # EHOSTUNREACH: the worker's connection is gone
                self._lose_worker(worker.identity, f"unreachable ({exc})")
                continue
            self.pending.popleft()
            worker.in_flight[(series_id, frame["frame_index"])] = frame
            self.counters["frames_dispatched"] += 1
            self.metrics.frame_out()
            if frame.get("received_unix_s") is not None:  # receipt -> handed to a worker
                self.metrics.latency(time.time() - frame["received_unix_s"])
            worker.last_dispatch = self.counters["frames_dispatched"]

    @property
    def in_flight(self) -> int:
        return sum(len(w.in_flight) for w in self.workers.values())

    # -- bounded per-series state -----------------------------------------------------
    def series_started(self, start: protocol.Message) -> None:
        self.starts[start["series_id"]] = start
        self.ended.discard(start["series_id"])

    def series_ended(self, series_id: str) -> None:
        self.ended.add(series_id)
        self.release_finished()

    def release_finished(self) -> None:
        """Forget the start of every ended series with no frame pending or in flight, and which
        workers had it: the state kept is that of open series and of frames still owed."""
        if not self.ended:
            return
        owed = {m["series_id"] for m in self.pending}
        for worker in self.workers.values():
            owed.update(series_id for series_id, _ in worker.in_flight)
        for series_id in list(self.ended):
            if series_id in owed:
                continue
            self.ended.discard(series_id)
            self.starts.pop(series_id, None)
            for worker in self.workers.values():
                worker.series_started.discard(series_id)
                worker.building.discard(series_id)


def _wake(fd: int | None) -> None:
    """Tell the main loop (polling the read end of the pipe ``fd`` writes to) that the inbox has
    something; a full pipe already says so."""
    if fd is None:
        return
    try:
        os.write(fd, b"\0")
    except (BlockingIOError, OSError):
        pass


class BackPressure:
    """Says in the log when frames wait because the reducer workers do not take them as fast as
    they come: a WARNING once the pending queue reaches ``max_pending_frames`` (the source is then
    held back: the detector socket is no longer read, ZeroMQ queues, then the detector's send
    waits; nothing is dropped here), and an INFO once it has drained to half, with how long it
    lasted. Each episode is counted (``backpressure_episodes``)."""

    def __init__(self, limit: int, counters: collections.Counter) -> None:
        self.limit = max(1, int(limit))
        self.counters = counters
        self.since: float | None = None

    def update(self, pending: int, workers: int, now: float) -> None:
        if self.since is None and pending >= self.limit:
            self.since = now
            self.counters["backpressure_episodes"] += 1
            log.warning("back-pressure: %d frames wait for a reducer worker (max_pending_frames); the source is held "
                        "back until they drain: frames are delayed, not dropped (%d worker(s) connected: add workers "
                        "or lower the frame rate)", pending, workers)
        elif self.since is not None and pending <= self.limit // 2:
            log.info("back-pressure over after %.1f s (%d frames pending)", now - self.since, pending)
            self.since = None


def _read_source(source, stop: threading.Event, inbox: queue.Queue, failure: list, wake_fd: int | None = None) -> None:
    """Source thread: put normalised messages on the bounded inbox (blocks = backpressure), and
    wake the main loop through the pipe ``wake_fd`` after each (so a frame waits for no poll
    timeout: at 20 ms per poll that capped forwarding at about 50 frames/s).

    An exception escaping the source (a bug: sources handle bad input themselves) is logged and
    recorded in ``failure``, so the stage exits non-zero instead of looking finished.
    """
    try:
        for message in source.messages(stop):
            while not stop.is_set():
                try:
                    inbox.put(message, timeout=0.2)
                    _wake(wake_fd)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                break
    except Exception as exc:  # a source bug must not hang the stage: report it and stop
        failure.append(f"source {getattr(source, 'spec', source)} failed: {type(exc).__name__}: {exc}")
        log.exception("source %s failed", getattr(source, "spec", source))
    finally:
        inbox.put(None)
        _wake(wake_fd)


def frame_bytes(start: protocol.Message) -> int:
    """Approximate size in bytes of one frame message of the series ``start`` announces:
    ny * nx * bytes per pixel (from ``bit_depth``, 4 when unknown) for images, 24 bytes per
    point (2theta, counts, sigma as float64) for profiles, plus 1 KiB of header."""
    detector = start.get("detector") or {}
    shape = detector.get("shape") if isinstance(detector, dict) else None
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)):
        return 4 << 20
    if start.get("kind") == "profile":
        return 24 * shape[0] * shape[1] + 1024
    bits = detector.get("bit_depth")
    per_pixel = 4 if not isinstance(bits, int) or bits <= 0 else 1 if bits <= 8 else 2 if bits <= 16 else 4 if bits <= 32 else 8
    return shape[0] * shape[1] * per_pixel + 1024


#: [streamer] keys whose "unknown" value in TOML (which has no null) is 0, [] or negative
_UNKNOWN_WHEN_EMPTY = ("n_frames", "frame_time_s", "exposure_s", "wavelength_A", "distance_m",
                       "beam_center_px", "pixel_size_m", "gas_time_s")


def source_options(streamer_config: dict[str, Any]) -> dict[str, Any]:
    """The [streamer] table as source options: unknown values (0, [], negative; for gas_time_s
    only negative) become None."""
    options = dict(streamer_config)
    for key in _UNKNOWN_WHEN_EMPTY:
        if _unknown(key, options.get(key)):
            options[key] = None
    return options


def _unknown(key: str, value: Any) -> bool:
    """An empty list, a non-positive number, or for gas_time_s a negative one (ts = 0 is a time:
    the valve opened as the series began)."""
    if value == []:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value < 0 if key == "gas_time_s" else value <= 0
    return False


def apply_gas_time(start: protocol.Message, gas_time_s: float | None) -> None:
    """The gas-introduction time ts given to the streamer (``[streamer] gas_time_s``, s from the
    series start; None = not given) wins over what the source said (a detector's user data, a
    file header): the operator who sets it knows when the valve opened.  Logged when it changes
    the start message."""
    if gas_time_s is None:
        return
    said = start.get("gas_time_s")
    if said != gas_time_s:
        log.info("gas time ts = %g s from [streamer] gas_time_s (the source said %s)", gas_time_s,
                 "nothing" if said is None else f"{said} s", extra={"series_id": start.get("series_id")})
    start.fields["gas_time_s"] = float(gas_time_s)


def run_streamer(config: dict[str, Any], stop: threading.Event) -> int:
    """Run the streamer stage until the source ends, ``once`` is satisfied or ``stop`` is set.

    Returns the exit code: 0 when done, 1 when the source failed, EXIT_SERIES_REJECTED when
    ``once`` is set and the only series was rejected (see the module doc).
    """
    from streamer.sources import open_source

    options = config["streamer"]
    endpoints = config["endpoints"]
    source = open_source(options["source"], source_options(options))
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.LINGER, 1000)
    router.setsockopt(zmq.MAXMSGSIZE, MAX_WORKER_MESSAGE_BYTES)
    sockets.bind(router, endpoints["frames"])
    raw = sockets.BudgetedPublisher(context, endpoints["raw"], options["raw_budget_bytes"])
    record = sockets.publisher(context, endpoints["record"], hwm=options["record_hwm"])
    to_inference = sockets.pusher(context, endpoints["reduced"])
    dispatcher = FrameDispatcher(router, options["worker_timeout_s"])
    inbox: queue.Queue = queue.Queue(maxsize=max(1, int(options["max_pending_frames"])))
    backpressure = BackPressure(options["max_pending_frames"], dispatcher.counters)
    failure: list[str] = []
    wake_read, wake_write = os.pipe()  # the source thread wakes the loop below when the inbox has a message
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(wake_read, zmq.POLLIN)
    reader = threading.Thread(target=_read_source, args=(source, stop, inbox, failure, wake_write), name="source",
                              daemon=True)
    reader.start()
    log.info("streamer reading %s; workers connect to %s", options["source"], endpoints["frames"])
    signal_ready()

    def send_status() -> None:
        counters = {**dispatcher.counters, **getattr(source, "counters", {}),
                    "workers": len(dispatcher.workers), "frames_pending": len(dispatcher.pending),
                    "frames_in_flight": dispatcher.in_flight, "raw_hwm": raw.hwm}
        protocol.send(to_inference, protocol.make("status", stage="streamer", series_id=None, counters=counters))
        # the start of every open series again (fields only, marked resent): an inference restarted
        # mid-series learns of it and analyses the frames still to come (it ignores starts it knows)
        for series_id, start in dispatcher.starts.items():
            if series_id not in dispatcher.ended:
                protocol.send(to_inference, protocol.Message("start", {**start.fields, "resent": True}, {}))

    def handle(message: protocol.Message) -> None:
        if message.type == "status":  # from the source: a rejected series (its reason and counters)
            rejected = message.get("rejected")
            if isinstance(rejected, dict):
                state["rejected"] = (time.monotonic(), rejected)
            protocol.send(to_inference, message)
            return
        if message.type == "frame":
            message.fields["received_unix_s"] = time.time()
        elif message.type == "start":
            state["rejected"] = None
            apply_gas_time(message, source_options(options)["gas_time_s"])
            raw.size_for(frame_bytes(message))
        sockets.publish(record, message, stop)
        if not raw.publish(message):
            dispatcher.counters["raw_not_sent"] += 1
        if message.type == "frame":
            dispatcher.pending.append(message)
            dispatcher.counters["frames_received"] += 1
            dispatcher.metrics.frame_in()
        elif message.type in ("start", "end"):
            if message.type == "start":
                dispatcher.series_started(message)
            else:
                state["series_ended"] += 1
                dispatcher.series_ended(message["series_id"])
            protocol.send(to_inference, message)

    state: dict[str, Any] = {"series_ended": 0, "rejected": None}
    source_done = False
    exit_code = 0
    last_status = time.monotonic()
    while not stop.is_set():
        events = dict(poller.poll(20))
        if router in events:
            while router.poll(0):
                dispatcher.handle_worker_message()
        if wake_read in events:
            try:
                while os.read(wake_read, 4096):
                    pass
            except BlockingIOError:
                pass
        while not source_done and len(dispatcher.pending) < options["max_pending_frames"]:
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                break
            if message is None:
                source_done = True
                break
            try:
                handle(message)
            except Exception:  # one message must never take the stage down
                dispatcher.counters["handler_errors"] += 1
                log.exception("error handling a %s message", message.type,
                              extra={"series_id": message.series_id, "frame_index": message.frame_index})
        dispatcher.dispatch()
        backpressure.update(len(dispatcher.pending), len(dispatcher.workers), time.monotonic())
        dispatcher.expire_silent_workers()
        dispatcher.release_finished()
        dispatcher.metrics.queue_depth("pending", len(dispatcher.pending))
        dispatcher.metrics.queue_depth("in_flight", dispatcher.in_flight)
        metrics.reducer_workers(len(dispatcher.workers))
        now = time.monotonic()
        if now - last_status >= STATUS_PERIOD_S:
            last_status = now
            send_status()
        idle = not dispatcher.pending and dispatcher.in_flight == 0
        rejected = state["rejected"]
        if options["once"] and rejected is not None and (source_done or now - rejected[0] >= options["rejected_wait_s"]):
            log.error("no usable series within %.1f s after series %s was rejected: %s", options["rejected_wait_s"],
                      rejected[1].get("series_id"), rejected[1].get("reason"),
                      extra={"series_id": rejected[1].get("series_id")})
            exit_code = EXIT_SERIES_REJECTED
            break
        if idle and ((options["once"] and state["series_ended"] >= 1) or source_done):
            break
    if failure:
        log.error("streamer stopping because the %s", failure[0])
        exit_code = 1
    try:
        send_status()  # the final counts, for the dashboard's health panel
    except zmq.ZMQError as exc:
        log.warning("final status not sent: %s", exc)
    log.info("streamer stopping: %s", dict(dispatcher.counters))
    stop.set()
    reader.join(timeout=2)
    os.close(wake_read)  # the write end stays open while a stuck source thread may still write to it
    if not reader.is_alive():
        os.close(wake_write)
    raw.close(0)
    for socket in (router, record, to_inference):
        socket.close(linger=1000)
    context.term()
    return exit_code
