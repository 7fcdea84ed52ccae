"""Live inference: immediate estimates on the caller's thread, the exact sampler behind it."""

import time

import numpy as np
import pytest

from inference.live import LiveInference
from inference.models import alpha_numpy
from inference.priors import Priors
from inference.smc import OnlineInference

MODELS = ("F1", "A2", "R3", "D3")
FRAME_S = 1.0 / 3.0


def series(n_frames=30, t0=4.0, k=0.6, noise=0.02, seed=1):
    t = np.arange(n_frames) * FRAME_S + 0.5 * 0.3
    y = alpha_numpy("F1", k * (t - t0)) + np.random.default_rng(seed).normal(0, noise, n_frames)
    return t, y


def engine(n_particles=512, seed=3):
    return OnlineInference(models=MODELS, priors=Priors.for_series(30 * FRAME_S), n_particles=n_particles,
                           seed=seed)


def before_each_update(sampler, hook):
    """Make the exact sampler call ``hook(frame_index)`` for each frame of a batch before it
    assimilates the batch: a slow or a failing sampler, whatever the machine."""
    original = sampler.update_batch

    def update_batch(frames):
        for frame in frames:
            hook(frame[0])
        return original(frames)

    sampler.update_batch = update_batch


def batches(payloads):
    """The frame indices of the exact payloads' batches, concatenated."""
    return [index for payload in payloads for index in payload["batch"]]


def fail_at(failing_frame):
    def hook(frame_index):
        if frame_index == failing_frame:
            raise FloatingPointError("all particles have zero likelihood")
    return hook


def wait_caught_up(live, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while not live.caught_up:
        assert time.monotonic() < deadline, "exact sampler did not catch up"
        time.sleep(0.002)


def test_estimate_is_the_exact_reweighting_when_the_sampler_keeps_up():
    """With the exact posterior of frame j-1 at hand, the estimate of frame j is IBIS's
    reweighting step: its log evidence equals the exact sampler's whenever that frame entered
    in one tempering step (a move after the reweighting does not change the evidence), and
    its summaries equal the exact ones when the exact sampler did not resample either."""
    live = LiveInference(engine())
    t, y = series()
    evidence_checked = summaries_checked = 0
    rejuvenations = {m: 0 for m in MODELS}
    try:
        for j in range(t.size):
            estimate = live.submit(j, float(t[j]), 0.3, float(y[j]), 0.02)
            # this frame only, or none when the exact sampler was done before the estimate began
            assert estimate["diagnostics"]["frames_behind"] in (0, 1)
            wait_caught_up(live)
            (exact,) = live.exact_payloads()
            assert exact["frame_index"] == estimate["frame_index"] == j and exact["batch"] == [j]
            for name in MODELS:
                diagnostics = exact["models"][name]["diagnostics"]
                if diagnostics["tempering_steps"] == 1:
                    assert estimate["models"][name]["log_evidence"] == pytest.approx(
                        exact["models"][name]["log_evidence"], abs=1e-9, rel=1e-12)
                    evidence_checked += 1
                    if diagnostics["rejuvenations"] == rejuvenations[name]:
                        for param, summary in exact["models"][name]["params"].items():
                            assert estimate["models"][name]["params"][param] == pytest.approx(summary, abs=1e-9)
                        summaries_checked += 1
                rejuvenations[name] = diagnostics["rejuvenations"]
    finally:
        live.close()
    assert evidence_checked > 30 and summaries_checked > 20


def test_a_lagging_sampler_takes_frames_in_batches_and_its_schedule_reproduces_the_run():
    """Frames submitted as fast as possible: the exact sampler falls behind and takes the frames
    that arrived meanwhile in one tempered step.  The batch schedule is recorded; the same
    sampler run offline with that schedule gives exactly the live result (same seed, same
    numbers)."""
    t, y = series()
    sampler = engine()
    before_each_update(sampler, lambda frame_index: time.sleep(0.02))
    live = LiveInference(sampler)
    behind = []
    exact = []
    for j in range(t.size):
        estimate = live.submit(j, float(t[j]), 0.3, float(y[j]), 0.02)
        behind.append(estimate["diagnostics"]["frames_behind"])
        probabilities = [m["probability"] for m in estimate["models"].values()]
        assert sum(probabilities) == pytest.approx(estimate["reaction_probability"])
        assert 0.0 <= estimate["onset_probability"] <= estimate["reaction_probability"] + 1e-12
        exact += live.exact_payloads()
    wait_caught_up(live)
    exact += live.exact_payloads()
    result = live.result()
    assert max(behind) > 1, "the test needs the exact sampler to fall behind"
    assert batches(exact) == list(range(t.size))
    assert result["schedule"] == [len(p["batch"]) for p in exact] and max(result["schedule"]) > 1
    assert result["estimates"]["published"] == t.size

    offline = engine()
    first = 0
    for size in result["schedule"]:
        offline.assimilate_batch([(j, float(t[j]), 0.3, float(y[j]), 0.02) for j in range(first, first + size)])
        first += size
    reference = offline.result()
    assert reference["reaction_probability"] == result["reaction_probability"]
    for name in MODELS:
        assert result["models"][name]["log_evidence"] == reference["models"][name]["log_evidence"]
        assert result["models"][name]["params"] == reference["models"][name]["params"]
    # the live alert was raised once, on an estimate, after the true onset (4.0 s)
    assert result["alert"]["frame_index"] is not None and result["alert"]["time"] > 4.0


def test_bad_frame_is_rejected_before_it_reaches_the_sampler():
    live = LiveInference(engine(n_particles=128))
    try:
        live.submit(0, 0.5, 0.3, 0.0, 0.02)
        live.submit(1, 0.8, 0.3, 0.01, 0.02)
        with pytest.raises(ValueError, match="frame 2: exposure window .* before that of frame 1"):
            live.submit(2, 0.2, 0.3, 0.0, 0.02)
        with pytest.raises(ValueError, match="alpha must be a finite number"):
            live.submit(3, 1.2, 0.3, float("nan"), 0.02)
        live.submit(4, 1.2, 0.3, 0.0, 0.02)
        wait_caught_up(live)
        assert batches(live.exact_payloads()) == [0, 1, 4]
    finally:
        live.close()


def test_a_failure_of_the_exact_sampler_is_raised_with_the_series():
    sampler = engine(n_particles=128)
    sampler.series_id = "series-7"
    before_each_update(sampler, fail_at(2))
    live = LiveInference(sampler)
    for j in range(2):
        live.submit(j, 0.5 + j * FRAME_S, 0.3, 0.0, 0.02)
    wait_caught_up(live)
    live.submit(2, 0.5 + 2 * FRAME_S, 0.3, 0.0, 0.02)
    wait_caught_up(live)
    assert batches(live.exact_payloads()) == [0, 1]  # delivered before the error
    with pytest.raises(RuntimeError, match="series series-7 failed: all particles have zero likelihood"):
        live.exact_payloads()
    with pytest.raises(RuntimeError, match="series-7"):
        live.submit(3, 0.5 + 3 * FRAME_S, 0.3, 0.0, 0.02)
