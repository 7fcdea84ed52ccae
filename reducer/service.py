"""The reducer stage: worker processes that turn frames into 1D patterns and phase fractions.

Each worker connects a DEALER socket to the streamer's ROUTER, announces how many frames it can
hold (``ready`` with its capacity, repeated every second as a heartbeat), and for every frame
received sends a ``pattern`` and a ``fraction`` message to the inference stage, then ``done`` to
the streamer (which forgets the frame). The integrator is built once per series per worker
(reducer.integrate) from the series' start message and reused for every frame.

``beamkin reduce --workers N`` runs N such workers as child processes and restarts one that dies.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import json
import logging
import os
import queue
import socket
import threading
import time
from typing import Any

import numpy as np
import zmq

from beamkin import metrics, protocol, security, sockets
from beamkin.frames import frame_image
from beamkin.supervise import StageFailed, Supervisor, signal_ready

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
SERIES_KEPT = 4  # series (and integrators) kept per worker (a new one evicts the oldest)
#: [reducer] options an integrator depends on
INTEGRATOR_OPTIONS = ("npt", "unit", "method", "polarization_factor", "poni_file", "mask_file",
                      "distance_m", "beam_center_px", "wavelength_A", "pixel_size_m")


def integrator_key(start: protocol.Message, reducer_config: dict[str, Any]) -> str:
    """What an integrator depends on: detector, geometry, mask and flat-field arrays, the
    [reducer] options of the integration and the PONI / mask files (path, size, mtime)."""
    digest = hashlib.sha1()
    options = {key: reducer_config.get(key) for key in INTEGRATOR_OPTIONS}
    files = {}
    for key in ("poni_file", "mask_file"):
        path = reducer_config.get(key) or (start["geometry"] or {}).get(key)
        if path:
            try:
                stat = os.stat(path)
                files[key] = (str(path), stat.st_size, stat.st_mtime_ns)
            except OSError:
                files[key] = (str(path), None, None)
    digest.update(json.dumps({"detector": start["detector"], "geometry": start["geometry"], "options": options,
                              "files": files}, sort_keys=True, default=str).encode())
    for name in sorted(start.arrays):
        array = np.ascontiguousarray(start.arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


class SeriesReduction:
    """Everything a worker needs to reduce one series: the integrator and the fraction estimator.

    ``integrators`` (optional): integrators of earlier series by ``integrator_key``; a series
    with the same detector, geometry, masks and options reuses one (a copy sharing pyFAI's CSR
    matrix) instead of spending seconds building it again.
    """

    def __init__(self, start: protocol.Message, reducer_config: dict[str, Any],
                 integrators: collections.OrderedDict | None = None):
        from reducer.fractions import PhaseFractionEstimator
        from reducer.integrate import Integrator

        self.series_id = start["series_id"]
        self.kind = start["kind"]
        metadata = {**start.fields, **start.arrays}  # pixel_mask / flatfield when the detector sent them
        self.integrator = None
        self.reused_integrator = False
        if self.kind == "image":  # npt, unit, method, geometry keys, poni_file, mask_file from [reducer]
            key = integrator_key(start, reducer_config) if integrators is not None else None
            if key is not None and key in integrators:
                integrators.move_to_end(key)
                self.integrator = copy.copy(integrators[key])
                self.integrator.series_id = self.series_id
                self.reused_integrator = True
                if self.integrator.geometry is not None:  # once per series, as a new integrator does
                    log.info("geometry: %s", self.integrator.geometry.describe(), extra={"series_id": self.series_id})
            else:
                self.integrator = Integrator.from_metadata(metadata, config=reducer_config)
                if key is not None:
                    integrators[key] = self.integrator
                    while len(integrators) > SERIES_KEPT:
                        integrators.popitem(last=False)
        self.estimator = PhaseFractionEstimator.from_config(reducer_config, metadata)

    def reduce(self, frame: protocol.Message) -> tuple[protocol.Message, protocol.Message]:
        """pattern and fraction messages for one frame (the fraction is flagged on failure)."""
        from reducer.integrate import Pattern, ReductionError

        ids = dict(series_id=frame["series_id"], frame_index=frame["frame_index"], time_s=frame["time_s"])
        if self.kind == "image":
            if "image" not in frame.arrays and "image_compressed" not in frame.arrays:
                raise ReductionError("an image series received a frame without an image")
            pattern = self.integrator.integrate(frame_image(frame))  # decompressed here when forwarded compressed
        else:
            pattern = Pattern.from_profile(
                frame.arrays["two_theta_deg"], frame.arrays["counts"], frame.arrays.get("sigma"),
            )
        result = self.estimator.estimate(pattern, frame["time_s"])
        pattern_message = protocol.make(
            "pattern",
            {"radial": pattern.radial, "intensity": pattern.intensity, "sigma": pattern.sigma},
            unit=pattern.unit, **ids,
        )
        return pattern_message, fraction_message(frame, result.alpha, result.sigma_alpha,
                                                 result.status, result.reason, result.peaks)


def fraction_message(frame: protocol.Message, alpha, sigma_alpha, status: str, reason, peaks=()) -> protocol.Message:
    def finite_or_none(value):
        return float(value) if value is not None and np.isfinite(value) else None

    alpha, sigma_alpha = finite_or_none(alpha), finite_or_none(sigma_alpha)
    if status == "ok" and (alpha is None or sigma_alpha is None):
        status, reason = "flagged", reason or "non-finite phase fraction"
    extra = {}
    if frame.get("received_unix_s") is not None:
        extra["received_unix_s"] = frame["received_unix_s"]
    return protocol.make(
        "fraction", series_id=frame["series_id"], frame_index=frame["frame_index"],
        time_s=frame["time_s"], exposure_s=frame["exposure_s"], alpha=alpha, sigma_alpha=sigma_alpha,
        status=status, reason=reason, peaks=list(peaks), **extra,
    )


#: the reduction thread's name as the OS shows it (``top -H``, /proc/PID/task/TID/comm)
REDUCTION_THREAD_NAME = "bk-reduce"


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` (at most 15 bytes) in the OS (Linux prctl PR_SET_NAME),
    so that per-thread CPU can be told apart; elsewhere nothing happens."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # 15 = PR_SET_NAME
    except (OSError, AttributeError):
        pass


@dataclasses.dataclass(frozen=True, eq=False)
class Busy:
    """The reduction thread's job at hand: what, of which series, since when (monotonic seconds)
    and for how long at most (seconds) before the worker counts as stuck."""

    what: str
    series_id: str
    since: float
    limit_s: float
    building: bool = False


class Worker:
    """One reducer worker: frames in from the streamer (DEALER), patterns and fractions out (PUSH).

    Two threads, so that a long piece of work never silences the worker. The reduction thread
    builds the series' integrators and reduces the frames, and owns the PUSH socket to the
    inference. The socket thread (the caller of :meth:`run`) owns the DEALER: it hands what the
    streamer sends to the reduction thread, sends ``done`` as each frame is finished, and sends
    ``ready`` every second as a heartbeat while the reduction thread works (pyFAI releases the
    interpreter often enough: measured, the longest pause of another thread during a Pilatus 1M
    integrator build of 2.4 s was 64 ms and during its first frame of 0.9 s 87 ms). A first frame
    that builds pyFAI's engine, or a loaded host, no longer gets a live worker declared lost.

    A worker stuck on one frame for longer than ``[reducer] frame_timeout_s`` (on an integrator
    build, ``build_quiet_s``) stops its heartbeat, with an ERROR in its log, so that the streamer
    declares it lost and deals its frames to the others. While it builds an integrator its
    heartbeats also carry ``quiet_s``, the part of ``build_quiet_s`` left, in case the build does
    hold the interpreter.
    """

    def __init__(self, config: dict[str, Any], name: str):
        self.name = name
        self.reducer_config = config["reducer"]
        self.capacity = max(1, int(self.reducer_config["credit"]))
        self.frame_timeout_s = float(self.reducer_config["frame_timeout_s"])
        self.build_quiet_s = float(self.reducer_config["build_quiet_s"])
        self.context = zmq.Context()
        self.dealer = self.context.socket(zmq.DEALER)
        # a restarted worker must not inherit the frames its predecessor held: identity per process
        self.identity = f"{name}/{os.getpid()}"
        self.host = socket.gethostname()
        self.dealer.setsockopt(zmq.IDENTITY, self.identity.encode())
        self.dealer.setsockopt(zmq.LINGER, 1000)
        security.secure_client(self.dealer, config["endpoints"]["frames"], "frames")  # CURVE per [security.frames]
        self.dealer.connect(config["endpoints"]["frames"])
        self.reduced_endpoint = config["endpoints"]["reduced"]
        # the reduction thread tells the socket thread what it finished (inproc: no network, no copy)
        self.pipe_endpoint = f"inproc://reducer-worker-{id(self)}"
        self.pipe = self.context.socket(zmq.PAIR)
        self.pipe.bind(self.pipe_endpoint)
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()  # start and frame messages, None to stop
        self.series: collections.OrderedDict[str, SeriesReduction | Exception] = collections.OrderedDict()
        self.series_ready: tuple[str, ...] = ()  # the series set up, as the last ``ready`` lists them
        self.integrators: collections.OrderedDict = collections.OrderedDict()  # by integrator_key
        self.busy: Busy | None = None  # the job at hand (set and cleared by the reduction thread)
        self._reported_stuck: Busy | None = None
        self.frames_reduced = 0
        self.last_heartbeat = 0.0
        self.metrics = metrics.StageMetrics("reducer")
        self.config = config

    # ------------------------------------------------------------------ socket thread
    def heartbeat(self) -> None:
        """``ready``: capacity, the silence still to expect (``quiet_s``, during an integrator
        build) and the series set up (the streamer sends a series' frames only to a worker that
        lists it)."""
        busy = self.busy
        quiet_s = 0.0
        if busy is not None and busy.building:
            quiet_s = max(0.0, busy.limit_s - (time.monotonic() - busy.since))
        protocol.send(self.dealer, protocol.make("ready", worker=self.name, capacity=self.capacity, quiet_s=quiet_s,
                                                 series=list(self.series_ready)))
        self.last_heartbeat = time.monotonic()

    def stuck(self) -> bool:
        """True (and an ERROR once) when the job at hand has outlasted its limit: no more heartbeats."""
        busy = self.busy
        if busy is None or time.monotonic() - busy.since <= busy.limit_s:
            return False
        if busy is not self._reported_stuck:
            self._reported_stuck = busy
            log.error("busy with %s for more than %.0f s: heartbeat stopped, so that the streamer declares this "
                      "worker lost and deals its frames to others", busy.what, busy.limit_s,
                      extra={"series_id": busy.series_id})
        return True

    def run(self, stop: threading.Event) -> int:
        log.info("reducer worker %s connected to %s", self.name, self.dealer.getsockopt_string(zmq.LAST_ENDPOINT))
        metrics.serve(self.config, "reducer")
        reduction = threading.Thread(target=self.reduction_thread, name=f"reduce-{self.name}", daemon=True)
        reduction.start()
        poller = zmq.Poller()
        poller.register(self.dealer, zmq.POLLIN)
        poller.register(self.pipe, zmq.POLLIN)
        signal_ready()
        status = 0
        while not stop.is_set():
            if not reduction.is_alive():
                log.error("reducer worker %s: its reduction thread ended; stopping (the supervisor restarts it)",
                          self.name)
                status = 1
                break
            if time.monotonic() - self.last_heartbeat >= HEARTBEAT_S and not self.stuck():
                self.heartbeat()
            events = dict(poller.poll(100))
            while self.pipe in events and self.pipe.poll(0):  # every frame finished since the last look
                self.finished(self.pipe.recv_multipart())
            if self.dealer in events:
                try:
                    _, message = protocol.recv(self.dealer)
                except protocol.ProtocolError as exc:
                    log.warning("malformed message from the streamer: %s", exc)
                    continue
                if message.type in ("start", "frame"):
                    self.jobs.put(message)
                else:
                    log.warning("unexpected %s message from the streamer", message.type)
        log.info("reducer worker %s stopping after %d frames", self.name, self.frames_reduced)
        self.jobs.put(None)
        reduction.join(5.0)  # a build in progress is not waited for: the thread is a daemon
        self.dealer.close(linger=0)
        self.pipe.close(linger=0)
        if not reduction.is_alive():
            self.context.term()
        return status

    def finished(self, parts: list[bytes]) -> None:
        """What the reduction thread finished: a frame (``done`` to the streamer) or a series'
        set-up (a ``ready`` listing it, at once)."""
        if parts[0] == b"done":
            ids = json.loads(parts[1])
            protocol.send(self.dealer, protocol.make("done", worker=self.name, **ids))
        else:
            self.heartbeat()

    # ------------------------------------------------------------------ reduction thread
    def reduction_thread(self) -> None:
        name_os_thread(REDUCTION_THREAD_NAME)
        pipe = self.context.socket(zmq.PAIR)
        pipe.connect(self.pipe_endpoint)
        to_inference = sockets.pusher(self.context, self.reduced_endpoint)
        try:
            while True:
                message = self.jobs.get()
                if message is None:
                    break
                if message.type == "start":
                    self.busy = Busy("building the series' integrator", message["series_id"], time.monotonic(),
                                     self.build_quiet_s, building=True)
                    self.start_series(message)
                    self.busy = None
                    pipe.send_multipart([b"series"])
                else:
                    self.busy = Busy(f"frame {message['frame_index']}", message["series_id"], time.monotonic(),
                                     self.frame_timeout_s)
                    self.reduce(message, to_inference)
                    self.busy = None
                    pipe.send_multipart([b"done", json.dumps({"series_id": message["series_id"],
                                                              "frame_index": message["frame_index"]}).encode()])
        finally:
            pipe.close(linger=0)
            to_inference.close(linger=2000)

    def start_series(self, start: protocol.Message) -> None:
        series_id = start["series_id"]
        began = time.perf_counter()
        try:
            reduction = self.series[series_id] = SeriesReduction(start, self.reducer_config, self.integrators)
            log.info("integrator %s in %.2f s", "of an earlier series with the same geometry reused"
                     if reduction.reused_integrator else "ready", time.perf_counter() - began,
                     extra={"series_id": series_id})
        except Exception as exc:  # bad geometry etc.: every frame of the series gets flagged
            self.series[series_id] = exc
            log.error("cannot reduce series: %s", exc, extra={"series_id": series_id})
        while len(self.series) > SERIES_KEPT:
            self.series.popitem(last=False)
        self.series_ready = tuple(self.series)

    def reduce(self, frame: protocol.Message, to_inference: zmq.Socket) -> None:
        ids = {"series_id": frame["series_id"], "frame_index": frame["frame_index"]}
        began = time.perf_counter()
        self.metrics.frame_in()
        reduction = self.series.get(frame["series_id"])
        try:
            if reduction is None:
                raise LookupError("no start message was received for this series")
            if isinstance(reduction, Exception):
                raise reduction
            pattern_message, fraction = reduction.reduce(frame)
            protocol.send(to_inference, pattern_message)
        except Exception as exc:  # the frame is flagged, never lost and never a crash
            log.warning("frame not reduced: %s", exc, extra=ids)
            fraction = fraction_message(frame, None, None, "flagged", f"{type(exc).__name__}: {exc}")
        # provenance (docs/protocol.md): who reduced it, and the workers the streamer took it from
        fraction.fields.update(worker=self.identity, host=self.host)
        if frame.get("reassigned"):
            fraction.fields["reassigned"] = frame["reassigned"]
        if fraction["status"] != "ok":
            self.metrics.flagged(fraction["reason"])
        protocol.send(to_inference, fraction)
        self.frames_reduced += 1
        self.metrics.frame_out()
        self.metrics.latency(time.perf_counter() - began)


def run_reducer(config: dict[str, Any], stop: threading.Event, worker_name: str | None = None) -> int:
    """One worker in this process, or (workers > 1) N worker processes restarted when they die."""
    workers = int(config["reducer"]["workers"])
    base = worker_name or f"{socket.gethostname()}-{os.getpid()}"
    if workers <= 1:
        return Worker(config, base if worker_name else f"{base}-0").run(stop)
    supervisor = Supervisor(config)
    # pyFAI's CSR engine runs OpenMP threads: N workers each using every core slow each other down
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    names = [f"{base}-{i}" for i in range(workers)]
    # worker i serves its metrics on [metrics] reducer_port + i (docs/metrics.md)
    ports = {name: ["--set", f"metrics.reducer_port={metrics.port_of(config, 'reducer', i)}"]
             for i, name in enumerate(names)}
    for name in names:
        supervisor.start(name, "reduce", "--workers", "1", "--worker-name", name, *ports[name],
                         env={"OMP_NUM_THREADS": threads})
    try:
        supervisor.wait_ready()
        signal_ready()
        while not stop.is_set():
            try:
                supervisor.check()
            except StageFailed as failure:
                log.error("reducer %s; restarting it", failure)
                supervisor.start(failure.name, "reduce", "--workers", "1", "--worker-name", failure.name,
                                 *ports[failure.name], env={"OMP_NUM_THREADS": threads})
            stop.wait(0.5)
    finally:
        supervisor.stop_all()
    return 0
