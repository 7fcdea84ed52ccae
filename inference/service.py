"""The inference stage: one process that puts reduced frames in time order and runs the sampler.

Receives (PULL) ``start``/``end``/``status`` from the streamer and ``pattern``/``fraction`` from
the reducer workers; republishes everything on its PUB socket for dashboards, alert sinks and the
recorder, and adds per frame a ``posterior`` message, once per series an ``alert``, and at the
end a ``result`` (the schema of ``beamkin demo --json``). Fractions are released to the sampler
through the bounded reorder buffer (inference.reorder); a frame still missing after the timeout
is reported (log, counter, posterior diagnostics) and skipped.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from beamkin import protocol, sockets
from beamkin.supervise import signal_ready
from inference.reorder import ReorderBuffer

log = logging.getLogger(__name__)

STATUS_PERIOD_S = 1.0
EARLY_FRAMES_KEPT = 1000  # fractions held for a series whose start has not arrived yet
PATTERNS_REMEMBERED = 100_000  # (series, frame) keys kept to publish each pattern once


def make_engine(inference_config: dict[str, Any], start: protocol.Message | None):
    """The sampler for one series, with the t0 prior window taken from its start message."""
    from inference.priors import Priors
    from inference.smc import OnlineInference

    gas_time_s = start.get("gas_time_s") if start is not None else None
    if start is not None and start.get("n_frames"):
        series_end_s = start["n_frames"] * float(start["frame_time_s"])
    else:
        series_end_s = float(inference_config["max_series_s"])
    priors = Priors.from_mapping(inference_config.get("priors", {}),
                                 base=Priors.for_series(series_end_s, gas_time_s))
    return OnlineInference(
        models=tuple(inference_config["models"]), priors=priors,
        n_particles=int(inference_config["particles"]), seed=int(inference_config["seed"]),
        noise=inference_config["noise"], student_nu=float(inference_config["student_nu"]),
        ess_threshold=float(inference_config["ess_threshold"]),
        defer_rejuvenation=bool(inference_config["defer_rejuvenation"]),
        temper_threshold=float(inference_config["temper_threshold"]) or None,
        light_probability=float(inference_config["light_probability"]),
        histogram_bins=int(inference_config["histogram_bins"]),
        alert_threshold=float(inference_config["alert_threshold"]),
        alert_consecutive=int(inference_config["alert_consecutive"]),
        gas_time_s=gas_time_s, series_id=start["series_id"] if start is not None else None,
    )


class SeriesInference:
    """One series: its start message, sampler, reorder buffer and counters."""

    def __init__(self, start: protocol.Message, config: dict[str, Any]):
        self.series_id = start["series_id"]
        self.engine = make_engine(config, start)
        self.buffer = ReorderBuffer(int(config["reorder_window"]), float(config["missing_timeout_s"]))
        self.counters = collections.Counter()
        self.missing: list[int] = []
        self.alert: dict[str, Any] | None = None
        self.finish_queued = False
        self.finished = False

    def diagnostics(self) -> dict[str, Any]:
        return {
            "frames_assimilated": self.counters["frames_assimilated"],
            "frames_flagged": self.counters["frames_flagged"],
            "frames_missing": len(self.missing),
            "missing_indices": self.missing[-50:],
        }


class InferenceStage:
    def __init__(self, config: dict[str, Any], publisher: zmq.Socket, stop: threading.Event):
        self.config = config
        self.inference_config = config["inference"]
        self.pub = publisher
        self.stop = stop
        self.series: dict[str, SeriesInference] = {}
        self.early: dict[str, list[protocol.Message]] = collections.defaultdict(list)
        # frames released by the reorder buffers, waiting for the sampler (received promptly,
        # processed one at a time, so the socket is drained between two sampler updates)
        self.work: collections.deque = collections.deque()
        self.patterns_seen: dict[tuple[str, int], None] = {}  # insertion-ordered, bounded
        self.counters = collections.Counter()
        self.finished_series = 0
        self.alert_dispatcher = None
        if config.get("alerts"):
            from dashboards.alerts import AlertDispatcher
            self.alert_dispatcher = AlertDispatcher(config["alerts"])

    def publish(self, message: protocol.Message) -> None:
        sockets.publish(self.pub, message, self.stop)

    # -- message handling --------------------------------------------------------------
    def handle(self, message: protocol.Message) -> None:
        kind = message.type
        if kind == "start":
            self._start(message)
        elif kind == "pattern":
            self._pattern(message)
        elif kind == "fraction":
            self._fraction(message)
        elif kind == "end":
            series = self.series.get(message["series_id"])
            if series is None:
                log.warning("end of a series that never started", extra={"series_id": message["series_id"]})
                return
            log.info("series ended by the source after %d frames (%s)", message["n_frames"], message["reason"],
                     extra={"series_id": series.series_id})
            self._released(series, series.buffer.end(message["n_frames"]))
        elif kind == "status":
            self.publish(message)
        else:
            self.counters["unexpected_messages"] += 1
            log.warning("unexpected %s message on the inference input", kind)

    def _start(self, start: protocol.Message) -> None:
        series_id = start["series_id"]
        if series_id in self.series:
            log.warning("duplicate start message ignored", extra={"series_id": series_id})
            return
        began = time.perf_counter()
        series = self.series[series_id] = SeriesInference(start, self.inference_config)
        log.info("series started: models %s, %d particles, t0 prior window from %s (%.2f s to set up)",
                 ",".join(self.inference_config["models"]), self.inference_config["particles"],
                 "ts" if start.get("gas_time_s") is not None else "series start",
                 time.perf_counter() - began, extra={"series_id": series_id})
        self.publish(start)
        for fraction in self.early.pop(series_id, []):
            self._released(series, series.buffer.add(fraction["frame_index"], fraction))

    def _pattern(self, pattern: protocol.Message) -> None:
        """Publish a pattern as it arrives (the dashboard needs no order), each frame's once:
        a frame handed to a second worker after its first was declared lost comes back twice."""
        key = (pattern["series_id"], pattern["frame_index"])
        if key in self.patterns_seen:
            self.counters["duplicate_patterns"] += 1
            return
        self.patterns_seen[key] = None
        while len(self.patterns_seen) > PATTERNS_REMEMBERED:
            self.patterns_seen.pop(next(iter(self.patterns_seen)))
        self.publish(pattern)

    def _fraction(self, fraction: protocol.Message) -> None:
        series = self.series.get(fraction["series_id"])
        if series is None:
            early = self.early[fraction["series_id"]]
            if len(early) < EARLY_FRAMES_KEPT:
                early.append(fraction)
            else:
                self.counters["frames_without_start_dropped"] += 1
                log.error("fraction for a series without start message dropped (buffer full)",
                          extra={"series_id": fraction["series_id"], "frame_index": fraction["frame_index"]})
            return
        self._released(series, series.buffer.add(fraction["frame_index"], fraction))

    def idle(self) -> None:
        """Nothing to assimilate: run deferred resample-moves, let timeouts release gaps."""
        for series in list(self.series.values()):
            if not series.finished:
                series.engine.rejuvenate()
                self._released(series, series.buffer.poll())

    def _released(self, series: SeriesInference, events) -> None:
        self.work.extend((series, event) for event in events)
        if series.buffer.complete and not series.finish_queued:
            series.finish_queued = True
            self.work.append((series, None))

    def process_one(self) -> None:
        """Process the oldest released event: a frame for the sampler, a missing frame, or the end."""
        series, event = self.work.popleft()
        if event is None:
            self._finish(series)
            return
        extra = {"series_id": series.series_id, "frame_index": event.index}
        if event.kind == "frame":
            self._assimilate(series, event.item)
        elif event.kind == "missing":
            series.missing.append(event.index)
            log.error("frame missing: skipped after waiting %.1f s", series.buffer.timeout_s, extra=extra)
        else:  # duplicate or late: already assimilated or declared missing
            series.counters[f"frames_{event.kind}"] += 1
            log.warning("%s frame ignored", event.kind, extra=extra)

    def _assimilate(self, series: SeriesInference, fraction: protocol.Message) -> None:
        extra = {"series_id": series.series_id, "frame_index": fraction["frame_index"]}
        self.publish(fraction)
        if fraction["status"] != "ok" or fraction["alpha"] is None:
            series.counters["frames_flagged"] += 1
            log.warning("flagged frame not used by the sampler: %s", fraction["reason"], extra=extra)
            return
        began = time.perf_counter()
        payload = series.engine.update(
            frame_index=fraction["frame_index"], time_s=float(fraction["time_s"]),
            exposure_s=float(fraction["exposure_s"]), alpha=float(fraction["alpha"]),
            sigma=fraction["sigma_alpha"],
        )
        series.counters["frames_assimilated"] += 1
        update_s = time.perf_counter() - began
        alert = payload.pop("alert", None)
        payload.pop("n_frames", None)
        diagnostics = {**payload.pop("diagnostics", {}), **series.diagnostics(), "update_s": update_s}
        received = fraction.get("received_unix_s")
        if received is not None:
            diagnostics["latency_s"] = time.time() - float(received)
        posterior = protocol.make("posterior", series_id=series.series_id, diagnostics=diagnostics, **payload)
        self.publish(posterior)
        if alert is not None and series.alert is None:
            series.alert = alert
            self._alert(series, alert)

    def _alert(self, series: SeriesInference, alert: dict[str, Any]) -> None:
        t0 = alert["t0"]
        log.warning(
            "ONSET DETECTED at t = %.2f s: t0 = %.3f s (90%% %.3f..%.3f), model %s (p = %.2f), onset probability %.4f",
            alert["time_s"], t0["mean"], t0["q05"], t0["q95"], alert["leading_model"],
            alert["leading_probability"], alert["onset_probability"],
            extra={"series_id": series.series_id, "frame_index": alert["frame_index"]},
        )
        self.publish(protocol.make("alert", series_id=series.series_id, **alert))
        if self.alert_dispatcher is not None:
            self.alert_dispatcher.dispatch({"series_id": series.series_id, **alert})

    def _finish(self, series: SeriesInference) -> None:
        series.finished = True
        result = series.engine.result()
        result["series_id"] = series.series_id
        result["diagnostics"] = series.diagnostics()
        self.publish(protocol.make("result", series_id=series.series_id, result=result))
        n_frames = series.buffer.end_index or 0
        self.publish(protocol.make("end", series_id=series.series_id, n_frames=n_frames, reason="completed"))
        averaged = result["model_averaged"]
        log.info(
            "series finished: t0 = %.4f +- %.4f s, k = %.4f +- %.4f 1/s, alert at frame %s, %d frame(s) missing, %d flagged",
            averaged["t0"]["mean"], averaged["t0"]["sd"], averaged["k"]["mean"], averaged["k"]["sd"],
            result["alert"].get("frame_index"), len(series.missing), series.counters["frames_flagged"],
            extra={"series_id": series.series_id},
        )
        path = self.inference_config.get("json")
        if path:
            Path(path).write_text(json.dumps(result, indent=2))
            log.info("result written to %s", path, extra={"series_id": series.series_id})
        self.finished_series += 1

    def status(self) -> None:
        for series in self.series.values():
            if series.finished:
                continue
            counters = {**self.counters, **series.counters, **series.diagnostics(),
                        "frames_held": len(series.buffer.held), "next_frame": series.buffer.next_index}
            self.publish(protocol.make("status", stage="inference", series_id=series.series_id, counters=counters))


def warm_up(inference_config: dict[str, Any]) -> None:
    """Compile (or load from cache) every kernel before the first frame arrives."""
    began = time.perf_counter()
    make_engine(inference_config, None).warm_up()
    log.info("sampler kernels ready in %.2f s", time.perf_counter() - began)


def run_inference(config: dict[str, Any], stop: threading.Event) -> int:
    endpoints = config["endpoints"]
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    sockets.bind(pull, endpoints["reduced"])
    pub = sockets.publisher(context, endpoints["results"])
    warm_up(config["inference"])
    stage = InferenceStage(config, pub, stop)
    log.info("inference listening on %s, publishing on %s", endpoints["reduced"], endpoints["results"])
    signal_ready()
    last_status = time.monotonic()
    once = config["inference"]["once"]
    while not stop.is_set():
        if pull.poll(0 if stage.work else 50):
            for _ in range(10_000):  # drain what has arrived, so the reorder buffer sees it now
                try:
                    _, message = protocol.recv(pull, flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                except protocol.ProtocolError as exc:
                    stage.counters["malformed_messages"] += 1
                    log.warning("malformed message rejected: %s", exc)
                    continue
                stage.handle(message)
        if stage.work:
            stage.process_one()
        else:
            stage.idle()
        if time.monotonic() - last_status >= STATUS_PERIOD_S:
            last_status = time.monotonic()
            stage.status()
        if once and stage.finished_series >= 1:
            break
    if stage.alert_dispatcher is not None:
        stage.alert_dispatcher.close(5.0)
    pull.close(linger=0)
    pub.close(linger=2000)
    context.term()
    return 0
