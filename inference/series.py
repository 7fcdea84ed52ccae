"""One series of the inference stage: its t0 prior window and recorded exact schedule (from its
start message), its sampler, and the bookkeeping the stage keeps for it (reorder buffer, counters,
missing frames, alert).  See docs/design.md, section 5 (The sampler) and
section 6 (Live: estimates, exact posteriors, staleness, alerts).
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from beamkin import protocol
from inference.reorder import ReorderBuffer
from inference.settings import InferenceSettings

log = logging.getLogger(__name__)


def series_window(settings: InferenceSettings | Mapping[str, Any], start) -> tuple[float, float | None, list[str]]:
    """The t0 prior window of a series from its start message: (end of the window in s, ts in s
    or None, problems found).  Start fields that would make the priors impossible are not
    raised: a frame time or count that is not positive and finite gives the window of a series
    of unknown length (``max_series_s``); a gas time ts that is negative, not finite or not
    before the window's end is ignored (t0 from the series start)."""
    problems = []
    max_series_s = InferenceSettings.from_table(settings).max_series_s
    series_end_s = max_series_s
    if start is not None and start.get("n_frames"):
        n_frames, frame_time_s = start.get("n_frames"), start.get("frame_time_s")
        try:
            end = float(n_frames) * float(frame_time_s)
        except (TypeError, ValueError, OverflowError):
            end = math.nan
        if math.isfinite(end) and end > 0.0:
            series_end_s = end
        else:
            problems.append(f"n_frames = {n_frames!r} x frame_time_s = {frame_time_s!r} is not a series length: "
                            f"t0 window up to max_series_s = {max_series_s} s")
    gas_time_s = start.get("gas_time_s") if start is not None else None
    if gas_time_s is not None:
        try:
            gas = float(gas_time_s)
        except (TypeError, ValueError):
            gas = math.nan
        if not (math.isfinite(gas) and 0.0 <= gas < series_end_s):
            problems.append(f"gas_time_s = {gas_time_s!r} is not within the series window [0, {series_end_s}) s: "
                            "ignored, t0 window from the series start")
            gas_time_s = None
        else:
            gas_time_s = gas
    return series_end_s, gas_time_s, problems


#: the longest recorded schedule a start message may carry (steps)
MAX_SCHEDULE_STEPS = 1_000_000


def exact_schedule(start) -> list[int] | None:
    """The recorded run's frames per exact step that a replayed start message carries
    (``exact_schedule``, see streamer.replay), or None.  Raises ValueError when it is not a list
    of positive integers."""
    schedule = start.get("exact_schedule") if start is not None else None
    if schedule is None:
        return None
    if (not isinstance(schedule, list) or len(schedule) > MAX_SCHEDULE_STEPS
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in schedule)):
        raise ValueError("start field exact_schedule must be a list of positive frame counts")
    return schedule


def make_engine(settings: InferenceSettings | Mapping[str, Any], start):
    """The sampler for one series from the settings (an ``InferenceSettings``, or the
    ``[inference]`` table it is built from), with the t0 prior window taken from its start
    message (``series_window``; its problems are logged as warnings).  The live stage and
    ``beamkin analyze`` both build their sampler here."""
    from inference.priors import Priors
    from inference.smc import OnlineInference

    settings = InferenceSettings.from_table(settings)
    series_end_s, gas_time_s, problems = series_window(settings, start)
    series_id = start["series_id"] if start is not None else None
    for problem in problems:
        log.warning("start message: %s", problem, extra={"series_id": series_id})
    priors = Priors.from_mapping(settings.priors, base=Priors.for_series(series_end_s, gas_time_s))
    return OnlineInference(priors=priors, gas_time_s=gas_time_s, series_id=series_id, **settings.engine_options())


class SeriesInference:
    """One series: its start message, sampler, reorder buffer and counters."""

    def __init__(self, start: protocol.Message, settings: InferenceSettings):
        from inference.live import LiveInference

        self.series_id = start["series_id"]
        self.live = LiveInference(make_engine(settings, start), ess_floor=settings.ess_floor,
                                  schedule=exact_schedule(start))
        n_frames = start.get("n_frames")
        #: frames the start announced (None: unknown); indices beyond are rejected at the door
        self.n_frames_announced = n_frames if isinstance(n_frames, int) and n_frames > 0 else None
        self.end_reason = "completed"  # the source's reason, from its end message
        self.last_active = time.monotonic()
        self.received_unix_s: dict[int, float] = {}  # frame -> streamer receipt, until its posterior
        self.buffer = ReorderBuffer(settings.reorder_window, settings.missing_timeout_s)
        self.counters = collections.Counter()
        self.missing: list[int] = []
        self.alert: dict[str, Any] | None = None
        self.finish_queued = False
        self.finish_requested = False  # every frame released; finish once the exact sampler is done
        self.finished = False
        #: begun from a start the streamer re-sent (the series was running before this process):
        #: the frames before are lost, the result is incomplete
        self.resumed = bool(start.get("resent"))

    def diagnostics(self) -> dict[str, Any]:
        return {
            "frames_assimilated": self.counters["frames_assimilated"],
            "frames_flagged": self.counters["frames_flagged"],
            "frames_rejected": self.counters["frames_rejected"],
            "frames_missing": len(self.missing),
            "missing_indices": self.missing[-50:],
        }


def warm_up(settings: InferenceSettings | Mapping[str, Any]) -> None:
    """Compile (or load from cache) every kernel before the first frame arrives."""
    began = time.perf_counter()
    make_engine(settings, None).warm_up()
    log.info("sampler kernels ready in %.2f s", time.perf_counter() - began)
