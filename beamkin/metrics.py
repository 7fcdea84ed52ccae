"""Prometheus metrics of the pipeline stages: what each stage counts, times and serves.

Each stage process (streamer, every reducer worker, inference, dashboard, recorder) serves the
metrics below on its own HTTP port (``[metrics]`` of beamkin/defaults.toml; ``GET /metrics``,
the Prometheus text format) once :func:`serve` has started the server. The metric objects live
in one registry per process (:data:`REGISTRY`), with the process collector on (RSS, CPU, open
files: ``process_resident_memory_bytes``, ``process_cpu_seconds_total``), so any stage's memory
can be watched. Stages call the small helpers of a :class:`StageMetrics` (``frame_in``,
``frame_out``, ``flagged``, ``dropped``, ``reassigned``, ``latency``, ``queue_depth``) and the
inference's gauges (:func:`exact_sampler_lag`, :func:`ess_min`, :func:`end_to_end`).

Metrics (names as exported; ``_total``, ``_bucket``/``_sum``/``_count`` added by the client):

* ``beamkin_frames_in_total{stage}``, ``beamkin_frames_out_total{stage}``: frames the stage
  received and passed on (streamer: detector frames in, frames sent to a worker out; reducer:
  frames in, fractions out; inference: fractions in, fractions assimilated or reported out;
  dashboard: fractions in and shown; recorder: frame messages in and written);
* ``beamkin_frames_flagged_total{stage,reason}``, ``beamkin_frames_dropped_total{stage,reason}``,
  ``beamkin_frames_reassigned_total{stage,reason}``: frames flagged (reduced to no usable phase
  fraction), dropped (not used: duplicates, out of range, malformed, missing) and handed to another
  worker; ``reason`` is the short form of the reason (:func:`reason_label`), at most
  :data:`MAX_REASONS` distinct values per metric (then ``other``);
* ``beamkin_stage_latency_seconds{stage}``: time a frame spends in the stage (histogram);
* ``beamkin_end_to_end_latency_seconds{output}``: from the frame's receipt at the streamer
  (``received_unix_s`` of its frame and fraction headers) to the inference's ``estimate`` or
  exact ``posterior`` for it (histogram; wall clocks of the hosts involved);
* ``beamkin_exact_sampler_lag_frames``: frames the exact sampler has still to assimilate (largest
  over open series, docs/design.md section 6);
* ``beamkin_ess_min{output}``: smallest effective sample size (particles) over the models of the
  newest estimate / exact posterior;
* ``beamkin_queue_depth{stage,queue}``: frames waiting (streamer ``pending`` and ``in_flight``,
  inference ``inbox`` and ``reorder``);
* ``beamkin_reducer_workers_live``: reducer workers the streamer holds as alive;
* ``beamkin_duplicate_frame_conflicts_total``: the same frame of a series received twice at
  the inference (docs/protocol.md, "Provenance").
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector,
                               ProcessCollector, start_http_server)

log = logging.getLogger(__name__)

#: The stages that serve metrics, each on its own port ``[metrics] <stage>_port``.
STAGES = ("streamer", "reducer", "inference", "dashboard", "recorder")
#: `beamkin` subcommand -> the stage whose metrics it serves (reducer workers serve their own:
#: worker i of ``beamkin reduce --workers N`` on ``reducer_port + i``, see reducer.service).
STAGE_OF_COMMAND = {"stream": "streamer", "infer": "inference", "dashboard": "dashboard", "record": "recorder"}
#: Latency histogram buckets, seconds: 1 ms to 2 min (a frame waits seconds in the reorder buffer
#: or behind the exact sampler; the streamer and reducer take milliseconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, float("inf"))
#: Distinct reason labels kept per metric; further reasons are counted as "other".
MAX_REASONS = 24

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes etc. (Linux /proc)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

FRAMES_IN = Counter("beamkin_frames_in", "Frames received by the stage", ["stage"], registry=REGISTRY)
FRAMES_OUT = Counter("beamkin_frames_out", "Frames the stage passed on", ["stage"], registry=REGISTRY)
FRAMES_FLAGGED = Counter("beamkin_frames_flagged", "Frames flagged (no usable phase fraction), by reason",
                         ["stage", "reason"], registry=REGISTRY)
FRAMES_DROPPED = Counter("beamkin_frames_dropped", "Frames not used (duplicate, out of range, malformed, missing), "
                         "by reason", ["stage", "reason"], registry=REGISTRY)
FRAMES_REASSIGNED = Counter("beamkin_frames_reassigned", "Frames handed to another reducer worker, by reason",
                            ["stage", "reason"], registry=REGISTRY)
STAGE_LATENCY = Histogram("beamkin_stage_latency_seconds", "Time a frame spends in the stage, s", ["stage"],
                          buckets=LATENCY_BUCKETS, registry=REGISTRY)
END_TO_END_LATENCY = Histogram("beamkin_end_to_end_latency_seconds", "From the frame's receipt at the streamer to "
                               "the inference's estimate or posterior for it, s", ["output"],
                               buckets=LATENCY_BUCKETS, registry=REGISTRY)
EXACT_SAMPLER_LAG = Gauge("beamkin_exact_sampler_lag_frames", "Frames the exact sampler has still to assimilate "
                          "(largest over open series)", registry=REGISTRY)
ESS_MIN = Gauge("beamkin_ess_min", "Smallest effective sample size over the models (particles)", ["output"],
                registry=REGISTRY)
QUEUE_DEPTH = Gauge("beamkin_queue_depth", "Frames waiting in a queue of the stage", ["stage", "queue"],
                    registry=REGISTRY)
REDUCER_WORKERS = Gauge("beamkin_reducer_workers_live", "Reducer workers the streamer holds as alive",
                        registry=REGISTRY)
DUPLICATE_CONFLICTS = Counter("beamkin_duplicate_frame_conflicts", "The same frame of a series received twice at "
                              "the inference (the first kept)", registry=REGISTRY)

#: Every metric family name a stage exports (without the client's suffixes), for dashboards' tests.
METRIC_NAMES = frozenset(metric._name for metric in (
    FRAMES_IN, FRAMES_OUT, FRAMES_FLAGGED, FRAMES_DROPPED, FRAMES_REASSIGNED, STAGE_LATENCY, END_TO_END_LATENCY,
    EXACT_SAMPLER_LAG, ESS_MIN, QUEUE_DEPTH, REDUCER_WORKERS, DUPLICATE_CONFLICTS))

_reasons: dict[str, set[str]] = {}
_reasons_lock = threading.Lock()


def reason_label(metric: str, reason: Any) -> str:
    """The ``reason`` label of a free-text reason: its part before the first ':' in lower case,
    runs of other characters than [a-z0-9] as '_', at most 40 characters ("ValueError: bad" ->
    "valueerror"); ``unknown`` when empty; ``other`` beyond MAX_REASONS distinct ones per metric
    (a label value is a time series: free text must not make them unbounded)."""
    text = str(reason or "").split(":", 1)[0].strip().lower()
    label = re.sub(r"[^a-z0-9]+", "_", text).strip("_")[:40] or "unknown"
    with _reasons_lock:
        seen = _reasons.setdefault(metric, set())
        if label not in seen:
            if len(seen) >= MAX_REASONS:
                return "other"
            seen.add(label)
    return label


class StageMetrics:
    """The frame counters, latency histogram and queue gauges of one stage (``stage``: one of
    :data:`STAGES`)."""

    def __init__(self, stage: str):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} for metrics; expected one of {', '.join(STAGES)}")
        self.stage = stage
        self._in = FRAMES_IN.labels(stage=stage)
        self._out = FRAMES_OUT.labels(stage=stage)
        self._latency = STAGE_LATENCY.labels(stage=stage)
        self._in.inc(0)  # exported at 0 from the start (a scrape before the first frame sees them)
        self._out.inc(0)

    def frame_in(self, n: int = 1) -> None:
        self._in.inc(n)

    def frame_out(self, n: int = 1) -> None:
        self._out.inc(n)

    def flagged(self, reason: Any, n: int = 1) -> None:
        FRAMES_FLAGGED.labels(stage=self.stage, reason=reason_label("flagged", reason)).inc(n)

    def dropped(self, reason: Any, n: int = 1) -> None:
        FRAMES_DROPPED.labels(stage=self.stage, reason=reason_label("dropped", reason)).inc(n)

    def reassigned(self, reason: Any, n: int = 1) -> None:
        FRAMES_REASSIGNED.labels(stage=self.stage, reason=reason_label("reassigned", reason)).inc(n)

    def latency(self, seconds: float) -> None:
        """A frame spent ``seconds`` in the stage (negative values, from a clock step, as 0)."""
        self._latency.observe(max(0.0, float(seconds)))

    def queue_depth(self, queue: str, frames: int) -> None:
        QUEUE_DEPTH.labels(stage=self.stage, queue=queue).set(frames)


def end_to_end(output: str, seconds: float) -> None:
    """Receipt at the streamer -> the inference's ``output`` ("estimate" or "posterior"), s."""
    END_TO_END_LATENCY.labels(output=output).observe(max(0.0, float(seconds)))


def exact_sampler_lag(frames: int) -> None:
    EXACT_SAMPLER_LAG.set(frames)


def ess_min(output: str, payload_models: dict) -> None:
    """The smallest ``diagnostics.ess`` over the models of an estimate / posterior payload."""
    values = [model.get("diagnostics", {}).get("ess") for model in payload_models.values()
              if isinstance(model, dict)]
    values = [float(v) for v in values if isinstance(v, (int, float))]
    if values:
        ESS_MIN.labels(output=output).set(min(values))


def reducer_workers(n: int) -> None:
    REDUCER_WORKERS.set(n)


def port_of(config: dict[str, Any], stage: str, offset: int = 0) -> int:
    """The metrics port of ``stage`` (+ ``offset``) from the ``[metrics]`` table; 0 = not served
    (metrics off, or this stage's port 0). ValueError naming the key for a port outside 0..65535."""
    table = config.get("metrics") or {}
    key = f"{stage}_port"
    port = table.get(key, 0)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"[metrics] {key} = {port!r}: expected a TCP port 0..65535 (0 = off)")
    if not table.get("enabled", False) or port == 0:
        return 0
    if port + offset > 65535:
        raise ValueError(f"[metrics] {key} = {port} + worker {offset} is beyond port 65535")
    return port + offset


def serve(config: dict[str, Any], stage: str, offset: int = 0) -> int:
    """Serve this process's metrics at http://ADDRESS:PORT/metrics (``[metrics] address`` and
    ``<stage>_port`` + ``offset``) in a daemon thread; returns the port, 0 when not served.

    A port that cannot be bound (in use) is logged as an ERROR naming it and the stage runs on
    without metrics: measuring must never stop the measured."""
    port = port_of(config, stage, offset)
    if not port:
        return 0
    address = (config.get("metrics") or {}).get("address", "127.0.0.1")
    try:
        start_http_server(port, addr=address, registry=REGISTRY)
    except OSError as exc:
        log.error("%s metrics not served: cannot listen on %s:%d: %s", stage, address, port, exc)
        return 0
    log.info("%s metrics at http://%s:%d/metrics", stage, address, port)
    return port


def serve_for_command(command: str, config: dict[str, Any]) -> int:
    """:func:`serve` for the stage a ``beamkin`` subcommand runs (STAGE_OF_COMMAND; 0 for others)."""
    stage = STAGE_OF_COMMAND.get(command)
    return serve(config, stage) if stage else 0
