"""The inference stage's message handling: puts reduced frames in time order and runs the sampler.

``InferenceStage.handle`` takes one received message (``start``/``end``/``status`` from the
streamer, ``pattern``/``fraction`` from the reducer workers) and republishes it; per frame it
adds an ``estimate`` (at once) and a ``posterior`` (when the exact sampler has assimilated the
frame; see inference.live), once per series an ``alert`` and at the end a ``result``.  The
socket loop that feeds it is inference.service.
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
from beamkin.supervise import RESTART_ENV
from inference.observe import InferenceObserver
from inference.series import SeriesInference
from inference.settings import InferenceSettings

log = logging.getLogger(__name__)

EARLY_FRAMES_KEPT = 1000  # fractions held for a series whose start has not arrived yet
EARLY_SERIES_KEPT = 8  # series whose fractions are held before their start (the rest are dropped)
FINISHED_SERIES_KEPT = 8  # finished series kept to publish their late fractions; older ones are closed
CLOSED_SERIES_REMEMBERED = 10_000  # ids of closed series (their late messages are recognised)
PATTERNS_REMEMBERED = 100_000  # (series, frame) keys kept to publish each pattern once


class InferenceStage:
    def __init__(self, config: dict[str, Any], publisher: zmq.Socket, stop: threading.Event):
        self.config = config
        #: the [inference] settings every series of this stage is analysed with
        self.settings = InferenceSettings.from_config(config)
        self.pub = publisher
        self.stop = stop
        self.series: dict[str, SeriesInference] = {}
        self.early: dict[str, list[protocol.Message]] = {}
        #: series no longer held (finished long ago, rejected or aborted): their late messages are
        #: published and counted, never assimilated (insertion-ordered, bounded)
        self.closed: dict[str, str] = {}
        self._warned: set[tuple[str, str]] = set()  # (series, kind): warned once per series
        # frames released by the reorder buffers, waiting for the sampler (received promptly,
        # processed one at a time, so the socket is drained between two sampler updates)
        self.work: collections.deque = collections.deque()
        self.patterns_seen: dict[tuple[str, int], None] = {}  # insertion-ordered, bounded
        self.counters = collections.Counter()
        self.observe = InferenceObserver(config)  # metrics and provenance
        self.finished_series = 0
        #: started again by the supervisor (BEAMKIN_RESTART): a series it has fractions but no start
        #: of was begun by its predecessor and is ended as incomplete (_incomplete)
        self.restarted = bool(os.environ.get(RESTART_ENV))
        self.last_series_incomplete = False
        self.early_seen: dict[str, set[int]] = {}  # frame indices received per series waiting for its start
        self.early_last: dict[str, float] = {}  # when its last fraction came

    def publish(self, message: protocol.Message) -> None:
        sockets.publish(self.pub, message, self.stop)

    def handle_safely(self, message: protocol.Message) -> None:
        """``handle``, with any error logged (naming the message), counted and survived: one
        message never stops the stage."""
        try:
            self.handle(message)
        except Exception as exc:  # noqa: BLE001 - the stage lives on
            self.counters["handler_errors"] += 1
            log.error("%s message could not be handled: %s: %s", message.type, type(exc).__name__, exc,
                      extra={"series_id": message.get("series_id"), "frame_index": message.get("frame_index")})

    def _warn_once(self, series_id: str, kind: str, text: str, *args, frame_index: int | None = None) -> None:
        """A WARNING the first time ``kind`` happens in a series, then only the counter."""
        self.counters[kind] += 1
        if (series_id, kind) in self._warned:
            return
        if len(self._warned) > CLOSED_SERIES_REMEMBERED:
            self._warned.clear()
        self._warned.add((series_id, kind))
        log.warning(text + " (warned once per series; counted as %s)", *args, kind,
                    extra={"series_id": series_id, "frame_index": frame_index})

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
            self._end(message)
        elif kind == "status":
            self.publish(message)
        else:
            self.counters["unexpected_messages"] += 1
            log.warning("unexpected %s message on the inference input", kind)

    def _start(self, start: protocol.Message) -> None:
        series_id = start["series_id"]
        if start.get("resent") and (series_id in self.series or series_id in self.closed):
            self.counters["starts_resent"] += 1  # the streamer's periodic reminder of an open series
            return
        if series_id in self.series or series_id in self.closed:
            self._warn_once(series_id, "duplicate_starts", "duplicate start message ignored")
            return
        if start.get("resent"):
            log.warning("series already running when this inference started%s: analysing the frames still to come; "
                        "the frames before are lost and its result will say incomplete",
                        " (restarted)" if self.restarted else "", extra={"series_id": series_id})
        open_series = [s for s in self.series.values() if not s.finished]
        cap = self.settings.max_open_series
        if len(open_series) >= cap:  # the least recently active gives way
            oldest = min(open_series, key=lambda s: s.last_active)
            self._abort(oldest, f"aborted: more than max_open_series = {cap} series open, superseded by {series_id}")
        began = time.perf_counter()
        try:
            series = SeriesInference(start, self.settings)
        except ValueError as exc:  # settings that give no sampler for this series: say so, keep the stage
            self.counters["series_rejected"] += 1
            self._close(series_id, "rejected")
            log.error("series rejected: %s", exc, extra={"series_id": series_id})
            self.publish(start)
            self.publish(protocol.make("end", series_id=series_id, n_frames=0, reason=f"rejected: {exc}",
                                       provenance=self.observe.provenance(series_id)))
            return
        self.series[series_id] = series
        log.info("series started: models %s, %d particles, t0 prior window from %s (%.2f s to set up)",
                 ",".join(self.settings.models), self.settings.particles,
                 "ts" if start.get("gas_time_s") is not None else "series start",
                 time.perf_counter() - began, extra={"series_id": series_id})
        self.publish(start)
        self.early_seen.pop(series_id, None)
        self.early_last.pop(series_id, None)
        for fraction in self.early.pop(series_id, []):
            if self.observe.admit(fraction, series.counters):
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
        series_id, index = fraction["series_id"], fraction["frame_index"]
        series = self.series.get(series_id)
        self.observe.fraction_in(fraction)
        if series is None:
            if series_id in self.closed:  # kept in the published stream (and the recording), not assimilated
                self.publish(fraction)
                self.observe.dropped("after_close")
                self._warn_once(series_id, "frames_after_close", "fraction of a %s series published, not used",
                                self.closed[series_id], frame_index=index)
                return
            early = self.early.get(series_id)
            if early is None and len(self.early) >= EARLY_SERIES_KEPT:
                self.observe.dropped("no_start")
                self._warn_once(series_id, "frames_without_start_dropped",
                                "fraction for a series without start message dropped (%d series already wait "
                                "for their start)", len(self.early), frame_index=index)
                return
            early = self.early.setdefault(series_id, [])
            seen = self.early_seen.setdefault(series_id, set())
            self.early_last[series_id] = time.monotonic()
            if len(seen) < EARLY_FRAMES_KEPT * 4 and isinstance(index, int):
                seen.add(index)
            if len(early) < EARLY_FRAMES_KEPT:
                early.append(fraction)
            else:
                self.observe.dropped("no_start")
                self._warn_once(series_id, "frames_without_start_dropped",
                                "fraction for a series without start message dropped (buffer full)", frame_index=index)
            return
        series.last_active = time.monotonic()
        limit = series.n_frames_announced
        window = self.settings.frame_index_window
        if limit is None:
            limit = series.buffer.next_index + len(series.buffer.held) + window
        if index >= limit:
            self.publish(fraction)
            series.counters["frames_out_of_range"] += 1
            self.observe.dropped("out_of_range")
            self._warn_once(series_id, "frames_out_of_range",
                            "frame index %d beyond the series (%s): published, not used", index,
                            f"{series.n_frames_announced} frames announced" if series.n_frames_announced
                            else f"more than {window} past the next frame expected", frame_index=index)
            return
        if self.observe.admit(fraction, series.counters):  # a frame received twice is a conflict, not used
            self._released(series, series.buffer.add(index, fraction))

    def _end(self, end: protocol.Message) -> None:
        series = self.series.get(end["series_id"])
        if series is None:
            if end["series_id"] not in self.closed and (end["series_id"] in self.early or self.restarted):
                self._incomplete(end["series_id"], int(end["n_frames"]))
                return
            self._warn_once(end["series_id"], "ends_without_series", "end of a series that is not open")
            return
        series.end_reason = end["reason"]
        # frames the series can have held: at most those announced, else those that arrived
        n_frames = end["n_frames"]
        ceiling = series.n_frames_announced or (series.buffer.next_index + len(series.buffer.held)
                                                + (max(series.buffer.held) + 1 - series.buffer.next_index
                                                   if series.buffer.held else 0))
        if n_frames > ceiling:
            log.warning("end says %d frames, the series can have %d: %d taken", n_frames, ceiling, ceiling,
                        extra={"series_id": series.series_id})
            n_frames = ceiling
        log.info("series ended by the source after %d frames (%s)", n_frames, end["reason"],
                 extra={"series_id": series.series_id})
        self._released(series, series.buffer.end(n_frames))

    def idle(self) -> None:
        """Nothing to assimilate: prepare the next estimate from the newest exact posterior,
        let timeouts release gaps, end series that have been idle too long."""
        idle_s = self.settings.series_idle_s
        self._give_up_orphans()
        now = time.monotonic()
        for series in list(self.series.values()):
            if series.finished:
                continue
            if not series.live.caught_up:
                series.last_active = now
            elif idle_s > 0 and now - series.last_active > idle_s:
                self._abort(series, f"aborted: no frame for {idle_s:.0f} s (series_idle_s)")
                continue
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
            # read before the payloads are collected: the sampler's thread queues a step's payload
            # before it counts the step's frames as assimilated, so once caught up is seen, the last
            # payload is among those collected below (read after, the last step could finish in
            # between and its posterior never be published: seen in CI)
            caught_up = series.live.caught_up
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
            if series.finish_requested and caught_up:
                self._finish(series)

    def _publish_posterior(self, series: SeriesInference, payload: dict) -> None:
        payload.pop("n_frames", None)
        payload.pop("alert", None)
        diagnostics = {**payload.pop("diagnostics", {}), **series.diagnostics(),
                       "frames_behind": series.live.frames_behind}
        received = series.received_unix_s.pop(payload["frame_index"], None)
        if received is not None:
            diagnostics["latency_s"] = time.time() - received
        self.observe.posterior(series.series_id, payload)
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
            series.live.flush()
            return
        extra = {"series_id": series.series_id, "frame_index": event.index}
        if event.kind == "frame":
            self._assimilate(series, event.item)
        elif event.kind == "missing":
            series.missing.append(event.index)
            self.observe.missing(series.series_id, event.index)
            log.error("frame missing: skipped after waiting %.1f s", series.buffer.timeout_s, extra=extra)
        else:  # duplicate or late: already assimilated or declared missing
            series.counters[f"frames_{event.kind}"] += 1
            self.observe.dropped(event.kind)
            log.warning("%s frame ignored", event.kind, extra=extra)

    def _assimilate(self, series: SeriesInference, fraction: protocol.Message) -> None:
        extra = {"series_id": series.series_id, "frame_index": fraction["frame_index"]}
        self.publish(fraction)
        if series.finished:  # its sampler failed: the data are still published (and recorded)
            series.counters["frames_after_failure"] += 1
            self.observe.released(series.series_id, fraction, "after_failure")
            return
        if fraction["status"] != "ok" or fraction["alpha"] is None:
            series.counters["frames_flagged"] += 1
            self.observe.released(series.series_id, fraction, "flagged")
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
            self.observe.released(series.series_id, fraction, "rejected")
            log.error("frame rejected by the sampler: %s", exc, extra=extra)
            return
        except RuntimeError as exc:  # the exact sampler's thread failed
            self._fail(series, exc)
            return
        series.counters["frames_assimilated"] += 1
        self.observe.released(series.series_id, fraction, "used")
        update_s = time.perf_counter() - began
        alert = payload.pop("alert", None)
        payload.pop("n_frames", None)
        diagnostics = {**payload.pop("diagnostics", {}), **series.diagnostics(), "update_s": update_s}
        received = fraction.get("received_unix_s")
        if received is not None:
            series.received_unix_s[fraction["frame_index"]] = float(received)
            diagnostics["latency_s"] = time.time() - float(received)
        self.observe.estimate(series.series_id, payload)
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
        self.publish(protocol.make("alert", series_id=series.series_id, **alert))  # sinks.alerts delivers it

    def _fail(self, series: SeriesInference, exc: BaseException) -> None:
        """The exact sampler of a series failed: say so, end the series, keep the stage up."""
        series.finished = True
        series.live.close()
        log.error("series aborted: %s", exc, extra={"series_id": series.series_id})
        self.counters["series_failed"] += 1
        self.publish(protocol.make("status", stage="inference", series_id=series.series_id,
                                   counters={**series.diagnostics(), "error": str(exc)}))
        self.publish(protocol.make("end", series_id=series.series_id, n_frames=series.buffer.end_index or 0,
                                   reason="aborted", provenance=self.observe.provenance(series.series_id)))
        self.finished_series += 1
        self._close_old_finished()

    def _finish(self, series: SeriesInference) -> None:
        series.finished = True
        self.last_series_incomplete = series.resumed
        if series.resumed:  # begun mid-series: a posterior of the frames after the restart only
            series.end_reason = ("incomplete: inference restarted" if self.restarted
                                 else "incomplete: started mid-series")
            log.error("series %s: %d of its frames were lost (assimilated by the process before, or never "
                      "received); the posterior holds the frames after the restart only", series.end_reason,
                      len(series.missing), extra={"series_id": series.series_id})
        result = series.live.result()
        result["series_id"] = series.series_id
        result["diagnostics"] = series.diagnostics()
        result["end_reason"] = series.end_reason
        if series.resumed:
            result["incomplete"] = True
            result["frames_lost"] = len(series.missing)
        result["provenance"] = self.observe.provenance(series.series_id)  # workers, hosts, config (docs/protocol.md)
        self.publish(protocol.make("result", series_id=series.series_id, result=result))
        n_frames = series.buffer.end_index or 0
        # the source's reason: a series it aborted is not republished as completed
        self.publish(protocol.make("end", series_id=series.series_id, n_frames=n_frames, reason=series.end_reason,
                                   provenance=result["provenance"]))
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
        path = self.settings.json
        if path:
            Path(path).write_text(json.dumps(result, indent=2))
            log.info("result written to %s", path, extra={"series_id": series.series_id})
        self.finished_series += 1
        self._close_old_finished()

    def _abort(self, series: SeriesInference, reason: str) -> None:
        """End an open series that cannot go on (``reason`` says why), keep the stage."""
        series.finished = True
        # no result is built: the exact sampler's queued frames are dropped, not waited for (a
        # sampler far behind would block this loop, and so the whole pipeline, for minutes)
        series.live.close(finish_queued=False)
        self.counters["series_aborted"] += 1
        log.error("series %s", reason, extra={"series_id": series.series_id})
        self.publish(protocol.make("status", stage="inference", series_id=series.series_id,
                                   counters={**series.diagnostics(), "error": reason}))
        self.publish(protocol.make("end", series_id=series.series_id,
                                   n_frames=series.buffer.end_index or series.buffer.next_index, reason=reason,
                                   provenance=self.observe.provenance(series.series_id)))
        self.finished_series += 1
        self._close_old_finished()

    def _incomplete(self, series_id: str, n_frames: int | None) -> None:
        """End a series whose start this process never got (it was restarted during the series,
        or the start was lost): no posterior can be built from part of a series without its
        start, so the series ends ``incomplete``, saying how many of its frames were lost.
        ``n_frames``: from the series' end; None when it did not come (the series was given up
        after ``start_wait_s`` without a fraction): then the frames lost are counted up to
        the highest frame received, a lower bound."""
        parked = self.early.pop(series_id, [])
        seen = self.early_seen.pop(series_id, set())
        self.early_last.pop(series_id, None)
        indices = seen | {m["frame_index"] for m in parked}
        known = n_frames is not None
        if not known:
            n_frames = max(indices) + 1 if indices else 0
        received = sorted(i for i in indices if 0 <= i < n_frames)
        lost = n_frames - len(received)
        reason = "incomplete: inference restarted" if self.restarted else "incomplete: start not received"
        self.counters["series_incomplete"] += 1
        self.counters["frames_lost"] += lost
        log.error("series %s: its start and %s%d of its %s frames never reached this inference; ended without a "
                  "posterior (%d frames received, from frame %s)", reason, "" if known else "at least ", lost,
                  n_frames if known else f"at least {n_frames}", len(received), received[0] if received else "-",
                  extra={"series_id": series_id})
        for fraction in parked:  # kept in the published stream (and the recording), not assimilated
            self.publish(fraction)
        counters = {"frames_lost": lost, "frames_received": len(received), "n_frames": n_frames,
                    "n_frames_known": known, "error": reason}
        self.publish(protocol.make("status", stage="inference", series_id=series_id, counters=counters))
        self.publish(protocol.make("end", series_id=series_id, n_frames=n_frames, reason=reason,
                                   provenance=self.observe.provenance(series_id, parked)))
        path = self.settings.json
        if path:
            missing = sorted(set(range(n_frames)) - set(received)) if n_frames <= 1_000_000 else None
            Path(path).write_text(json.dumps({"series_id": series_id, "end_reason": reason, "incomplete": True,
                                              "n_frames": n_frames, "n_frames_known": known,
                                              "frames_received": len(received), "frames_lost": lost,
                                              "frames_lost_indices": missing}, indent=2))
            log.info("incomplete result written to %s", path, extra={"series_id": series_id})
        self._close(series_id, reason)
        self.finished_series += 1
        self.last_series_incomplete = True

    def _give_up_orphans(self) -> None:
        """Series with fractions but no start, none for ``start_wait_s``: the start will not come
        (the inference was restarted, or it was lost): end them incomplete."""
        timeout_s = self.settings.start_wait_s
        now = time.monotonic()
        for series_id, last in list(self.early_last.items()):
            if now - last > timeout_s:
                self._incomplete(series_id, None)

    def _close(self, series_id: str, why: str) -> None:
        self.closed[series_id] = why
        while len(self.closed) > CLOSED_SERIES_REMEMBERED:
            self.closed.pop(next(iter(self.closed)))

    def _close_old_finished(self) -> None:
        """Keep the newest FINISHED_SERIES_KEPT finished series (their late fractions are still
        published as theirs); older ones are forgotten, their ids remembered as closed."""
        finished = [s for s in self.series.values() if s.finished]
        for series in finished[:max(0, len(finished) - FINISHED_SERIES_KEPT)]:
            del self.series[series.series_id]
            self._close(series.series_id, "finished")

    def status(self) -> None:
        for series in self.series.values():
            if series.finished:
                continue
            counters = {**self.counters, **series.counters, **series.diagnostics(),
                        "frames_held": len(series.buffer.held), "next_frame": series.buffer.next_index}
            self.publish(protocol.make("status", stage="inference", series_id=series.series_id, counters=counters))
