"""Bounded reorder buffer: reducer workers finish out of order, the sampler needs time order.

Frames are released strictly by frame index. A gap is waited for at most ``timeout_s`` (measured
from the moment a later frame is held while the next one is missing; after the series' end, with
nothing held, from the end or the last frame released, whichever is later: a backlog still
arriving frame by frame is waited for) or until ``window`` frames are held, whichever comes
first; then the missing index is released as a ``missing`` event, so a lost frame is reported and
never waited on forever (docs/design.md, section 2, "Stages and data flow").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Released:
    """One event out of the buffer: kind is 'frame', 'missing', 'duplicate' or 'late'."""

    kind: str
    index: int
    item: Any = None


class ReorderBuffer:
    def __init__(self, window: int, timeout_s: float, clock: Callable[[], float] = time.monotonic):
        if window < 1:
            raise ValueError(f"reorder window must hold at least one frame, got {window}")
        self.window = window
        self.timeout_s = timeout_s
        self.clock = clock
        self.next_index = 0
        self.held: dict[int, Any] = {}
        self._gap_since: float | None = None
        self.end_index: int | None = None  # frames [0, end_index) are expected once the series ended
        self._end_since: float | None = None
        self._released_at: float | None = None  # when the last frame was released

    def add(self, index: int, item: Any) -> list[Released]:
        if index < self.next_index:
            return [Released("late", index, item)]
        if index in self.held:
            return [Released("duplicate", index, item)]
        self.held[index] = item
        return self._drain()

    def end(self, n_frames: int) -> list[Released]:
        """The series ended with n_frames frames: frames beyond are not waited for."""
        self.end_index = n_frames
        self._end_since = self.clock()
        return self._drain()

    def poll(self) -> list[Released]:
        """Release what the timeout allows (call periodically)."""
        return self._drain()

    @property
    def complete(self) -> bool:
        """True once the series ended and every expected frame was released (or reported missing)."""
        return self.end_index is not None and self.next_index >= self.end_index and not self.held

    def _drain(self) -> list[Released]:
        out: list[Released] = []
        while True:
            if self.next_index in self.held:
                out.append(Released("frame", self.next_index, self.held.pop(self.next_index)))
                self.next_index += 1
                self._gap_since = None
                self._released_at = self.clock()
                continue
            waiting_on_gap = bool(self.held) or (self.end_index is not None and self.next_index < self.end_index)
            if not waiting_on_gap:
                self._gap_since = None
                break
            now = self.clock()
            if self._gap_since is None:
                since = [t for t in (self._end_since, self._released_at) if t is not None]
                self._gap_since = now if self.held or not since else max(since)
            if len(self.held) >= self.window or now - self._gap_since >= self.timeout_s:
                out.append(Released("missing", self.next_index))
                self.next_index += 1  # a run of missing frames is released together
                continue
            break
        return out
