"""The reorder buffer releases frames in order and reports, never waits forever for, lost ones."""

import random

from inference.reorder import ReorderBuffer


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def kinds(events):
    return [(e.kind, e.index) for e in events]


def test_shuffled_frames_come_out_in_order():
    buffer = ReorderBuffer(window=64, timeout_s=5.0, clock=FakeClock())
    order = list(range(50))
    random.Random(3).shuffle(order)
    released = []
    for index in order:
        released += buffer.add(index, f"frame{index}")
    assert [(e.kind, e.index, e.item) for e in released] == [("frame", i, f"frame{i}") for i in range(50)]


def test_gap_is_reported_after_timeout_and_later_frames_follow():
    clock = FakeClock()
    buffer = ReorderBuffer(window=64, timeout_s=5.0, clock=clock)
    assert kinds(buffer.add(0, 0)) == [("frame", 0)]
    assert buffer.add(2, 2) == [] and buffer.add(3, 3) == []
    clock.now = 4.9
    assert buffer.poll() == []
    clock.now = 5.1
    assert kinds(buffer.poll()) == [("missing", 1), ("frame", 2), ("frame", 3)]
    assert kinds(buffer.add(1, 1)) == [("late", 1)]


def test_full_window_releases_gap_without_waiting():
    buffer = ReorderBuffer(window=3, timeout_s=1e9, clock=FakeClock())
    assert buffer.add(1, 1) == [] and buffer.add(2, 2) == []
    assert kinds(buffer.add(3, 3)) == [("missing", 0), ("frame", 1), ("frame", 2), ("frame", 3)]


def test_duplicates_are_reported():
    buffer = ReorderBuffer(window=8, timeout_s=1.0, clock=FakeClock())
    buffer.add(1, "a")
    assert kinds(buffer.add(1, "b")) == [("duplicate", 1)]


def test_trailing_frames_missing_at_end_are_reported_once_after_timeout():
    clock = FakeClock()
    buffer = ReorderBuffer(window=8, timeout_s=2.0, clock=clock)
    for i in range(3):
        buffer.add(i, i)
    assert buffer.end(6) == [] and not buffer.complete
    clock.now = 2.5
    assert kinds(buffer.poll()) == [("missing", 3), ("missing", 4), ("missing", 5)]
    assert buffer.complete


def test_a_backlog_arriving_after_the_end_is_waited_for_from_the_last_frame():
    """One worker left on a loaded host reduces the series' last frames after its end, each within
    the timeout of the one before, all of them in more than the timeout (tests/test_multihost.py):
    none is missing (the wait was measured from the end, and 18 of 60 frames were skipped)."""
    clock = FakeClock()
    clock.now = 100.0  # a monotonic clock is never 0
    buffer = ReorderBuffer(window=8, timeout_s=2.0, clock=clock)
    assert kinds(buffer.add(0, 0)) == [("frame", 0)]
    assert buffer.end(10) == []
    for index in range(1, 10):
        clock.now += 1.5
        assert buffer.poll() == []
        assert kinds(buffer.add(index, index)) == [("frame", index)]
    assert buffer.complete


def test_after_the_end_a_frame_that_stops_coming_is_missing_a_timeout_after_the_last_one():
    clock = FakeClock()
    clock.now = 100.0
    buffer = ReorderBuffer(window=8, timeout_s=2.0, clock=clock)
    buffer.end(3)
    clock.now = 101.5
    assert kinds(buffer.add(0, 0)) == [("frame", 0)]
    clock.now = 103.4
    assert buffer.poll() == []
    clock.now = 103.6
    assert kinds(buffer.poll()) == [("missing", 1), ("missing", 2)] and buffer.complete
