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

import logging
import threading
import time
from typing import Any

import zmq

from beamkin import protocol, sockets
from beamkin.supervise import EXIT_SERIES_INCOMPLETE, signal_ready
from inference.series import MAX_SCHEDULE_STEPS, SeriesInference, exact_schedule, make_engine, series_window, warm_up
from inference.settings import InferenceSettings
from inference.stage import (CLOSED_SERIES_REMEMBERED, EARLY_FRAMES_KEPT, EARLY_SERIES_KEPT, FINISHED_SERIES_KEPT,
                             PATTERNS_REMEMBERED, InferenceStage)

__all__ = ["CLOSED_SERIES_REMEMBERED", "EARLY_FRAMES_KEPT", "EARLY_SERIES_KEPT", "FINISHED_SERIES_KEPT",
           "MAX_SCHEDULE_STEPS", "PATTERNS_REMEMBERED", "STATUS_PERIOD_S", "InferenceStage", "SeriesInference",
           "exact_schedule", "make_engine", "run_inference", "series_window", "warm_up"]

log = logging.getLogger(__name__)

STATUS_PERIOD_S = 1.0


def run_inference(config: dict[str, Any], stop: threading.Event) -> int:
    endpoints = config["endpoints"]
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    sockets.bind(pull, endpoints["reduced"])
    pub = sockets.publisher(context, endpoints["results"])
    warm_up(InferenceSettings.from_config(config))
    from inference.interpreter import tune_interpreter_for_latency

    tune_interpreter_for_latency()
    stage = InferenceStage(config, pub, stop)
    log.info("inference listening on %s, publishing on %s", endpoints["reduced"], endpoints["results"])
    signal_ready()
    last_status = time.monotonic()
    once = stage.settings.once
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
                stage.handle_safely(message)
        try:
            if stage.work:
                stage.process_one()
            else:
                stage.idle()
            stage.poll_exact()
            stage.observe.gauges(stage)
            if time.monotonic() - last_status >= STATUS_PERIOD_S:
                last_status = time.monotonic()
                stage.status()
        except Exception as exc:  # noqa: BLE001 - one bad event never stops the stage
            stage.counters["handler_errors"] += 1
            log.exception("inference loop error survived: %s", exc)
        if once and stage.finished_series >= 1:
            break
    pull.close(linger=0)
    pub.close(linger=2000)
    context.term()
    if once and stage.last_series_incomplete:
        return EXIT_SERIES_INCOMPLETE  # the run's one series ended incomplete (the log says how)
    return 0
