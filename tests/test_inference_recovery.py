"""Model recovery, no-reaction behaviour and reproducibility of the online engine."""

import math

import numpy as np

from inference.models import alpha_numpy
from inference.priors import Priors
from inference.smc import OnlineInference

TIMES = np.arange(36) / 3.0  # frames every 1/3 s for 12 s (docs/design.md section 7)
NOISE = 0.02
# rate constants (1/s) that complete each mechanism within about 5 s of the onset
K_TYPICAL = {"F1": 0.6, "A3": 0.29, "R3": 0.2, "D3": 0.2}


def simulate(model, rng):
    t0 = rng.uniform(3.0, 5.0)
    k = K_TYPICAL[model] * math.exp(rng.uniform(-0.2, 0.2))
    y = alpha_numpy(model, k * (TIMES - t0)) + rng.normal(0.0, NOISE, TIMES.size)
    return t0, k, y


def test_true_model_is_most_probable_in_at_least_80_percent_of_series():
    """The four generating mechanisms (reaction order, nucleation, contracting volume,
    diffusion) compete; 512 particles per model (the evidence gaps between these families
    are several nats, far above the Monte Carlo error).  With all 16 models competing the
    Avrami exponents 2/3/4 and D3/F2 are not separable at this noise and 36 frames (checked
    with 2048 particles: same probabilities), so the family, not the exact model, is what the
    data identify there."""
    rng = np.random.default_rng(11)
    candidates = tuple(K_TYPICAL)
    outcomes = []
    for model in K_TYPICAL:
        for rep in range(5):
            _, _, y = simulate(model, rng)
            engine = OnlineInference(models=candidates, priors=Priors.for_series(12.0), n_particles=512,
                                     seed=rep)
            for j, (tj, yj) in enumerate(zip(TIMES, y)):
                engine.assimilate(j, float(tj), 0.0, float(yj), None)
            probs = engine.model_probabilities()
            outcomes.append((model, max(probs, key=probs.get), probs[model]))
    hits = sum(true == best for true, best, _ in outcomes)
    assert hits >= 0.8 * len(outcomes), outcomes


def test_no_reaction_gives_no_alert_and_no_confident_onset():
    """alpha == 0 plus noise.  P(t0 <= now) cannot fall below ~0.01 here: with t0 uniform over
    the series window, a reaction that started in the last frames with a small k is as
    consistent with flat data as no reaction yet (see docs/benchmarks.md, inference notes),
    so the probability grows towards the end of the window.  The science predicts that it
    stays far from certainty: no alert, and below 0.5 over the first two thirds."""
    rng = np.random.default_rng(5)
    y = rng.normal(0.0, NOISE, TIMES.size)
    engine = OnlineInference(models=("F1", "A2", "A3", "R3", "D3"), priors=Priors.for_series(12.0),
                             n_particles=1024, seed=3)
    onset = []
    for j, (tj, yj) in enumerate(zip(TIMES, y)):
        payload = engine.update(j, float(tj), 0.0, float(yj), None)
        assert payload["alert"] is None
        onset.append(payload["onset_probability"])
    onset = np.array(onset)
    assert onset.max() < 0.99
    assert onset[:24].max() < 0.5
    assert onset[0] < 0.05
    result = engine.result()
    assert result["alert"]["time"] is None and result["alert"]["frame_index"] is None


def test_reaction_raises_alert_within_two_frames_of_onset():
    rng = np.random.default_rng(9)
    t0, k = 7.4461, 0.6192
    y = alpha_numpy("F1", k * (TIMES - t0)) + rng.normal(0.0, NOISE, TIMES.size)
    engine = OnlineInference(models=("F1", "A2", "A3", "R3", "D3"), priors=Priors.for_series(12.0),
                             n_particles=1024, seed=0, gas_time_s=2.0)
    alerts = []
    for j, (tj, yj) in enumerate(zip(TIMES, y)):
        payload = engine.update(j, float(tj), 0.0, float(yj), None)
        if payload["alert"] is not None:
            alerts.append(payload["alert"])
    assert len(alerts) == 1
    first_after_onset = int(np.ceil(t0 * 3))
    assert first_after_onset <= alerts[0]["frame_index"] <= first_after_onset + 2
    assert abs(alerts[0]["t0_minus_ts"] - (t0 - 2.0)) < 0.3
    assert engine.result()["alert"]["frame_index"] == alerts[0]["frame_index"]


def run_series(seed, frame_indices):
    rng = np.random.default_rng(0)
    y = alpha_numpy("F1", 0.6 * (TIMES - 5.0)) + rng.normal(0.0, NOISE, TIMES.size)
    engine = OnlineInference(models=("F1", "An", "D2"), priors=Priors.for_series(12.0), n_particles=256,
                             seed=seed, noise="student")
    payloads = [engine.update(int(fi), float(tj), 0.1, float(yj), 0.01)
                for fi, tj, yj in zip(frame_indices, TIMES, y)]
    return payloads, engine.result()


def test_same_seed_same_result_and_non_contiguous_frame_indices():
    idx = np.arange(36) * 3 + 7  # gaps in the frame numbering
    p1, r1 = run_series(4, idx)
    p2, r2 = run_series(4, idx)
    assert p1 == p2 and r1 == r2
    _, r3 = run_series(5, idx)
    assert r3["models"]["F1"]["log_evidence"] != r1["models"]["F1"]["log_evidence"]
    assert p1[-1]["frame_index"] == int(idx[-1]) and p1[-1]["n_frames"] == 36

