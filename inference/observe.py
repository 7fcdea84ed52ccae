"""What the inference stage measures and reports about the frames it receives: its Prometheus
metrics (beamkin.metrics) and each series' provenance (beamkin.provenance).

:class:`InferenceObserver` is told by inference.stage when a fraction arrives, when the reorder
buffer releases or gives up on a frame, when an estimate or an exact posterior is published, and
gives the ``provenance`` object of the series' ``result`` and ``end`` messages. A fraction of a
frame the series already received from a peer is a *conflict*: logged as a WARNING naming the
series, the frame and both workers, counted (``beamkin_duplicate_frame_conflicts_total``, the
stage's ``duplicate_frame_conflicts`` counter) and listed in the provenance; the first fraction
stays and the second is not used (docs/protocol.md, "Provenance").

Latencies (docs/metrics.md): the stage's is from a fraction's arrival here to the exact posterior
that took its frame in (to its release, for a flagged frame the sampler does not take); the end to
end one from the frame's receipt at the streamer (``received_unix_s``) to the estimate and to the
exact posterior of its frame.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

from beamkin import metrics
from beamkin.provenance import SeriesProvenance, config_sha256

log = logging.getLogger(__name__)

#: Series whose provenance is kept (open and recently finished ones; the oldest are forgotten).
SERIES_TRACKED = 64
#: Conflicts logged one by one per series; more are counted and listed, logged once.
CONFLICTS_LOGGED = 100


class _Tracked:
    """Provenance and arrival times (monotonic s, by frame index) of one series."""

    def __init__(self, config_hash: str):
        self.provenance = SeriesProvenance(config_hash)
        self.arrived_s: dict[int, float] = {}
        self.received_unix_s: dict[int, float] = {}


class InferenceObserver:
    """Metrics and provenance of the inference stage (one per InferenceStage)."""

    def __init__(self, config: dict[str, Any]):
        self.metrics = metrics.StageMetrics("inference")
        self.config_hash = config_sha256(config)
        self.tracked: collections.OrderedDict[str, _Tracked] = collections.OrderedDict()
        log.info("configuration sha256 %s", self.config_hash)

    def _series(self, series_id: str) -> _Tracked:
        tracked = self.tracked.get(series_id)
        if tracked is None:
            tracked = self.tracked[series_id] = _Tracked(self.config_hash)
            while len(self.tracked) > SERIES_TRACKED:
                self.tracked.popitem(last=False)
        return tracked

    # -- frames ---------------------------------------------------------------------------
    def fraction_in(self, fraction) -> None:
        """Every fraction received on the input (counted as a frame in)."""
        self.metrics.frame_in()

    def dropped(self, reason: str) -> None:
        self.metrics.dropped(reason)

    def admit(self, fraction, counters: collections.Counter) -> bool:
        """A fraction of an open series about to enter the reorder buffer: True to use it, False
        for a conflict (its frame was already received: logged, counted, listed, not used)."""
        series_id, index = fraction["series_id"], fraction["frame_index"]
        tracked = self._series(series_id)
        conflict = tracked.provenance.received(fraction)
        if conflict is None:
            tracked.arrived_s[index] = time.monotonic()
            if fraction.get("received_unix_s") is not None:
                tracked.received_unix_s[index] = float(fraction["received_unix_s"])
            return True
        counters["duplicate_frame_conflicts"] += 1
        metrics.DUPLICATE_CONFLICTS.inc()
        self.metrics.dropped("duplicate")
        n = tracked.provenance.counts["conflicts"]
        if n <= CONFLICTS_LOGGED:
            log.warning("conflict: frame %d of series %s received twice, from worker %s on %s (kept) and from worker "
                        "%s on %s (reported, not used)%s", index, series_id, conflict["kept"]["worker"],
                        conflict["kept"]["host"], conflict["reported"]["worker"], conflict["reported"]["host"],
                        "; further conflicts of this series are only counted" if n == CONFLICTS_LOGGED else "",
                        extra={"series_id": series_id, "frame_index": index})
        return False

    def missing(self, series_id: str, index: int) -> None:
        self._series(series_id).provenance.frame_missing(index)
        self.metrics.dropped("missing")

    def released(self, series_id: str, fraction, outcome: str) -> None:
        """A fraction left the reorder buffer and was handled: ``outcome`` "used" (the sampler
        took it), "flagged" (no usable phase fraction) or another reason it was not used (its
        time in the stage ends here)."""
        self.metrics.frame_out()
        if outcome == "used":
            return
        index = fraction["frame_index"]
        tracked = self._series(series_id)
        arrived = tracked.arrived_s.pop(index, None)
        tracked.received_unix_s.pop(index, None)
        if arrived is not None:
            self.metrics.latency(time.monotonic() - arrived)
        if outcome == "flagged":
            self.metrics.flagged(fraction.get("reason") or "flagged")
        else:
            self.metrics.dropped(outcome)

    # -- outputs --------------------------------------------------------------------------
    def estimate(self, series_id: str, payload: dict) -> None:
        received = self._series(series_id).received_unix_s.get(payload.get("frame_index"))
        if received is not None:
            metrics.end_to_end("estimate", time.time() - received)
        metrics.ess_min("estimate", payload.get("models") or {})

    def posterior(self, series_id: str, payload: dict) -> None:
        """An exact posterior was published: every frame of its batch has left the stage."""
        tracked = self._series(series_id)
        now_monotonic, now_unix = time.monotonic(), time.time()
        for index in payload.get("batch") or [payload.get("frame_index")]:
            arrived = tracked.arrived_s.pop(index, None)
            if arrived is not None:
                self.metrics.latency(now_monotonic - arrived)
            received = tracked.received_unix_s.pop(index, None)
            if received is not None:
                metrics.end_to_end("posterior", now_unix - received)
        metrics.ess_min("posterior", payload.get("models") or {})

    def gauges(self, stage) -> None:
        """Exact-sampler lag (largest over open series), inbox and reorder-buffer depths."""
        open_series = [s for s in stage.series.values() if not s.finished]
        metrics.exact_sampler_lag(max((s.live.frames_behind for s in open_series), default=0))
        self.metrics.queue_depth("inbox", len(stage.work))
        self.metrics.queue_depth("reorder", sum(len(s.buffer.held) for s in open_series))

    def provenance(self, series_id: str, fractions=()) -> dict[str, Any]:
        """The ``provenance`` object of the series' result and end (``fractions``: of a series
        this process never had the start of, its parked fractions)."""
        tracked = self._series(series_id)
        for fraction in fractions:
            tracked.provenance.received(fraction)
        return tracked.provenance.as_dict()
