"""Interpreter settings for a process whose critical path is the live estimates (the inference
stage, benches): the garbage collector and the GIL switch interval (docs/design.md, section 6)."""

from __future__ import annotations

import gc
import sys


def tune_interpreter_for_latency() -> None:
    """Keep the interpreter off the estimates' critical path (process-wide; the inference stage
    calls it after warm-up):

    * the cyclic garbage collector: objects alive after start-up (modules, compiled kernels)
      are frozen out of collections, and a collection starts after 50 000 net allocations
      instead of 700 (payloads are plain dicts and lists, freed by reference counting);
      measured at 9 Hz with 16 x 4096: estimate p99 36 -> 28 ms;
    * the GIL: the exact sampler's thread runs Python between its kernels, and a thread
      waiting for the GIL gets it after the switch interval, 5 ms by default, each time it
      has released it in a kernel; 0.5 ms instead: worst estimate of a 30-frame series
      23.9 -> 18.7 ms (p50 unchanged, 14 ms).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    sys.setswitchinterval(5e-4)
