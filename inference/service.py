"""The inference stage: one process that puts reduced frames in time order and runs the sampler.

Receives (PULL) ``start``/``end``/``status`` from the streamer and ``pattern``/``fraction`` from
the reducer workers; republishes everything on its PUB socket for dashboards, alert sinks and the
recorder, and adds per frame an ``estimate`` (at once) and a ``posterior`` (when the exact
sampler has assimilated the frame; see inference.live), once per series an ``alert`` (decided on
the estimates), and at the end a ``result`` (the schema of ``beamkin demo --json``). Fractions are
released to the sampler through the bounded reorder buffer (inference.reorder); a frame still
missing after the timeout is reported (log, counter, posterior diagnostics) and skipped.
"""

from __future__ import annotations

import collections
import json
import logging
import os
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
        temper_threshold=float(inference_config["temper_threshold"]) or None,
        light_probability=float(inference_config["light_probability"]),
        histogram_bins=int(inference_config["histogram_bins"]),
        alert_threshold=float(inference_config["alert_threshold"]),
        alert_consecutive=int(inference_config["alert_consecutive"]),
        gas_time_s=gas_time_s, series_id=start["series_id"] if start is not None else None,
        null_prior=float(inference_config.get("null_prior", 0.5)),
        threads=int(inference_config.get("model_threads", 0)) or (os.cpu_count() or 1),
    )


class SeriesInference:
    """One series: its start message, sampler, reorder buffer and counters."""

    def __init__(self, start: protocol.Message, config: dict[str, Any]):
        from inference.live import LiveInference

        self.series_id = start["series_id"]
        self.live = LiveInference(make_engine(config, start), ess_floor=float(config.get("ess_floor", 0.05)))
        self.received_unix_s: dict[int, float] = {}  # frame -> streamer receipt, until its posterior
        self.buffer = ReorderBuffer(int(config["reorder_window"]), float(config["missing_timeout_s"]))
        self.counters = collections.Counter()
        self.missing: list[int] = []
        self.alert: dict[str, Any] | None = None
        self.finish_queued = False
        self.finish_requested = False  # every frame released; finish once the exact sampler is done
        self.finished = False

    def diagnostics(self) -> dict[str, Any]:
        return {
            "frames_assimilated": self.counters["frames_assimilated"],
            "frames_flagged": self.counters["frames_flagged"],
            "frames_rejected": self.counters["frames_rejected"],
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
        """Nothing to assimilate: prepare the next estimate from the newest exact posterior,
        let timeouts release gaps."""
        for series in list(self.series.values()):
            if not series.finished:
                series.live.prepare()
                self._released(series, series.buffer.poll())

    def sampling(self) -> bool:
        """True while an exact sampler has frames to assimilate."""
        return any(not s.finished and not s.live.caught_up for s in self.series.values())

    def poll_exact(self) -> None:
        """Publish the exact posteriors finished by the samplers' threads; finish the series
        whose last frame has been assimilated."""
        for series in list(self.series.values()):
            if series.finished:
                continue
            try:
                payloads = series.live.exact_payloads()
            except RuntimeError as exc:
                self._fail(series, exc)
                continue
            for payload in payloads:
                alert = payload.pop("alert", None)
                self._publish_posterior(series, payload)
                if alert is not None and series.alert is None:  # its frame's estimate was stale
                    series.alert = alert
                    self._alert(series, alert)
            if series.finish_requested and series.live.caught_up:
                self._finish(series)

    def _publish_posterior(self, series: SeriesInference, payload: dict) -> None:
        payload.pop("n_frames", None)
        payload.pop("alert", None)
        diagnostics = {**payload.pop("diagnostics", {}), **series.diagnostics(),
                       "frames_behind": series.live.frames_behind}
        received = series.received_unix_s.pop(payload["frame_index"], None)
        if received is not None:
            diagnostics["latency_s"] = time.time() - received
        self.publish(protocol.make("posterior", series_id=series.series_id, diagnostics=diagnostics, **payload))

    def _released(self, series: SeriesInference, events) -> None:
        self.work.extend((series, event) for event in events)
        if series.buffer.complete and not series.finish_queued:
            series.finish_queued = True
            self.work.append((series, None))

    def process_one(self) -> None:
        """Process the oldest released event: a frame for the sampler, a missing frame, or the end."""
        series, event = self.work.popleft()
        if event is None:
            series.finish_requested = True  # finished by poll_exact once the sampler has caught up
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
        if series.finished:  # its sampler failed: the data are still published (and recorded)
            series.counters["frames_after_failure"] += 1
            return
        if fraction["status"] != "ok" or fraction["alpha"] is None:
            series.counters["frames_flagged"] += 1
            log.warning("flagged frame not used by the sampler: %s", fraction["reason"], extra=extra)
            return
        began = time.perf_counter()
        try:
            payload = series.live.submit(
                frame_index=fraction["frame_index"], time_s=float(fraction["time_s"]),
                exposure_s=float(fraction["exposure_s"]), alpha=float(fraction["alpha"]),
                sigma=fraction["sigma_alpha"],
            )
        except ValueError as exc:  # e.g. a window before the previous frame's: nothing was queued
            series.counters["frames_rejected"] += 1
            log.error("frame rejected by the sampler: %s", exc, extra=extra)
            return
        except RuntimeError as exc:  # the exact sampler's thread failed
            self._fail(series, exc)
            return
        series.counters["frames_assimilated"] += 1
        update_s = time.perf_counter() - began
        alert = payload.pop("alert", None)
        payload.pop("n_frames", None)
        diagnostics = {**payload.pop("diagnostics", {}), **series.diagnostics(), "update_s": update_s}
        received = fraction.get("received_unix_s")
        if received is not None:
            series.received_unix_s[fraction["frame_index"]] = float(received)
            diagnostics["latency_s"] = time.time() - float(received)
        self.publish(protocol.make("estimate", series_id=series.series_id, diagnostics=diagnostics, **payload))
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

    def _fail(self, series: SeriesInference, exc: BaseException) -> None:
        """The exact sampler of a series failed: say so, end the series, keep the stage up."""
        series.finished = True
        series.live.close()
        log.error("series aborted: %s", exc, extra={"series_id": series.series_id})
        self.counters["series_failed"] += 1
        self.publish(protocol.make("status", stage="inference", series_id=series.series_id,
                                   counters={**series.diagnostics(), "error": str(exc)}))
        self.publish(protocol.make("end", series_id=series.series_id, n_frames=series.buffer.end_index or 0,
                                   reason="aborted"))
        self.finished_series += 1

    def _finish(self, series: SeriesInference) -> None:
        series.finished = True
        result = series.live.result()
        result["series_id"] = series.series_id
        result["diagnostics"] = series.diagnostics()
        self.publish(protocol.make("result", series_id=series.series_id, result=result))
        n_frames = series.buffer.end_index or 0
        self.publish(protocol.make("end", series_id=series.series_id, n_frames=n_frames, reason="completed"))
        averaged = result["model_averaged"]
        leading = result["leading_model"]
        k = result["models"][leading]["params"]["k"]
        log.info(
            "series finished: P(reaction) = %.3f, t0 = %.4f +- %.4f s, leading model %s (p = %.3f) with "
            "k = %.4f +- %.4f 1/s, alert at frame %s, %d frame(s) missing, %d flagged",
            result["reaction_probability"], averaged["t0"]["mean"], averaged["t0"]["sd"], leading,
            result["models"][leading]["probability"], k["mean"], k["sd"], result["alert"].get("frame_index"),
            len(series.missing), series.counters["frames_flagged"], extra={"series_id": series.series_id},
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
    from inference.live import tune_interpreter_for_latency

    tune_interpreter_for_latency()
    stage = InferenceStage(config, pub, stop)
    log.info("inference listening on %s, publishing on %s", endpoints["reduced"], endpoints["results"])
    signal_ready()
    last_status = time.monotonic()
    once = config["inference"]["once"]
    while not stop.is_set():
        # while an exact sampler is behind, look for its posteriors every 5 ms
        if pull.poll(0 if stage.work else 5 if stage.sampling() else 50):
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
        stage.poll_exact()
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
