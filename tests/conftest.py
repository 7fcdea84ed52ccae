"""Shared fixtures: one real pipeline run whose published messages several tests reuse."""

from __future__ import annotations

import os
import signal

import pytest

from beamkin.loopback import LoopbackPorts, beamkin_process

#: The simulated experiment of `beamkin demo` (docs/design.md section 7, with ts = 5 s): the truth tests compare to.
TRUE_T0_S, TRUE_K_PER_S, GAS_TIME_S, N_FRAMES = 7.4461, 0.6192, 5.0, 36
DEMO_MODELS = ("F1", "A2", "A3", "R3", "D3")
#: Message types the inference stage publishes (what dashboards and reports consume).
PUBLISHED = ("start", "pattern", "fraction", "estimate", "posterior", "alert", "status", "result", "end")


@pytest.fixture(scope="session")
def pipeline_messages(tmp_path_factory):
    """Every message the inference published during one real `beamkin demo --once` run, in order.

    The demo runs every stage as its own process (simulated EIGER, streamer, reducer with pyFAI,
    SMC inference) as fast as it can, and its recorder keeps what was published.
    """
    from beamkin.recording import read_messages
    folder = tmp_path_factory.mktemp("pipeline")
    recording = folder / "series.h5"
    demo = beamkin_process("demo", "--once", "--speed", "0", "--record", str(recording),
                           *LoopbackPorts.free().options(), "--inference.particles", "2048")
    try:
        output, _ = demo.communicate(timeout=600)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    assert demo.returncode == 0, output[-4000:]
    seen, messages = set(), []
    for _, message in read_messages(recording, types=PUBLISHED):
        key = (message.type, message.series_id, message.frame_index)
        if message.type in ("start", "end", "result") and key in seen:
            continue  # start and end are recorded from both the streamer and the inference
        seen.add(key)
        messages.append(message)
    return messages


def consume_in_thread(source):
    """Start a thread that collects a source's messages until its first `end`; returns (thread, list)."""
    import threading

    stop, received = threading.Event(), []

    def consume():
        for message in source.messages(stop):
            received.append(message)
            if message.type == "end":
                stop.set()

    thread = threading.Thread(target=consume)
    thread.start()
    return thread, received
