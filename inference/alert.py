"""Onset alert rule (docs/design.md, section 6, "Live: estimates, exact posteriors, staleness, alerts").

The alert fires on the first frame at which the model-averaged onset probability
P(t0 <= now) (now = the end of the latest frame's exposure) has been >= ``threshold`` for ``consecutive`` frames in a row, and never
again in the same series.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class OnsetAlert:
    threshold: float = 0.99
    consecutive: int = 2
    run_length: int = 0
    fired_frame_index: int | None = None
    fired_time_s: float | None = None
    content: dict | None = None  # what the alert said, set by the caller when it fires

    def __post_init__(self):
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"alert threshold must be in (0, 1], got {self.threshold}")
        if int(self.consecutive) < 1:
            raise ValueError(f"alert needs at least 1 consecutive frame, got {self.consecutive}")
        self.consecutive = int(self.consecutive)

    @property
    def fired(self) -> bool:
        return self.fired_frame_index is not None

    def observe(self, frame_index: int, time_s: float, onset_probability: float) -> bool:
        """Feed one frame's onset probability; True exactly on the frame where the alert fires."""
        if onset_probability >= self.threshold:
            self.run_length += 1
        else:
            self.run_length = 0
        if not self.fired and self.run_length >= self.consecutive:
            self.fired_frame_index = int(frame_index)
            self.fired_time_s = float(time_s)
            return True
        return False

    def observe_batch(self, frame_index: int, time_s: float, onset_probability: float, frames: int,
                      onset_probability_confirmed: float) -> bool:
        """Feed the posterior after a batch of ``frames`` new frames; ``onset_probability_confirmed``
        is the same posterior's P(t0 <= end of the frame ``consecutive - 1`` frames back).  When the
        batch holds at least ``consecutive`` frames and both probabilities reach the threshold, the
        onset is confirmed by the batch's own later frames (what ``consecutive`` asks of single
        frames) and the rule fires; otherwise the batch counts as one frame (``observe``)."""
        if frames >= self.consecutive and min(onset_probability, onset_probability_confirmed) >= self.threshold:
            self.run_length = max(self.run_length, self.consecutive - 1)
        return self.observe(frame_index, time_s, onset_probability)

    def summary(self) -> dict:
        """The alert part of a result: time (s) and frame (None when it never fired) and, once
        it fired, what it said (t0, leading model, ...)."""
        out = {"time": self.fired_time_s, "frame_index": self.fired_frame_index}
        if self.content is not None:
            out.update({k: v for k, v in self.content.items() if k not in ("time_s", "frame_index")})
        return out
