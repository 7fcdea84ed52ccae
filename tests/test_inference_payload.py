"""Shape and JSON-cleanliness of the per-frame payload and the final result."""

import json
import math

import numpy as np

from inference.models import alpha_numpy
from inference.priors import Priors
from inference.smc import OnlineInference

STAT_KEYS = {"mean", "sd", "q05", "q50", "q95"}


def plain(obj):
    """True when obj is built only from dict/list/str/bool/int/float/None (no numpy scalars)."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(plain(v) for v in obj)
    return obj is None or type(obj) in (str, bool, int, float)


def test_payload_schema_and_result():
    t = np.arange(30) / 3.0
    y = alpha_numpy("F1", 0.8 * (t - 4.0)) + np.random.default_rng(0).normal(0, 0.02, t.size)
    engine = OnlineInference(models=("F1", "An", "R3"), priors=Priors.for_series(10.0, gas_time_s=1.0),
                             n_particles=256, seed=0, histogram_bins=40, predictive_points=50, gas_time_s=1.0)
    engine.warm_up()
    for j, (tj, yj) in enumerate(zip(t, y)):
        payload = engine.update(100 + 2 * j, float(tj), 0.05, float(yj), 0.02)
        assert plain(payload), "payload must hold plain Python types only"
        json.dumps(payload, allow_nan=False)
    assert payload["frame_index"] == 100 + 2 * 29 and payload["n_frames"] == 30
    assert set(payload["models"]) == {"F1", "An", "R3"}
    # the kinetic models' probabilities sum to P(reaction); "no reaction" holds the rest
    assert math.isclose(sum(m["probability"] for m in payload["models"].values()), payload["reaction_probability"],
                        rel_tol=1e-12)
    assert math.isclose(payload["null_model"]["probability"], 1.0 - payload["reaction_probability"], abs_tol=1e-15)
    assert payload["reaction_probability"] > 0.999  # a clear F1 transition
    assert payload["stale"] is False and payload["batch"] == [100 + 2 * 29]
    for name, m in payload["models"].items():
        expected = {"t0", "k", "A", "s"} | ({"n"} if name == "An" else set())
        assert set(m["params"]) == expected
        for stats in m["params"].values():
            assert set(stats) == STAT_KEYS and stats["q05"] <= stats["q50"] <= stats["q95"]
        assert set(m["diagnostics"]) == {"ess", "acceptance_rate", "rejuvenations", "tempering_steps",
                                         "light_moves"}
        assert m["stale"] is False
        # single-sweep moves of a negligible model bias its evidence: no standard error is claimed
        assert (m["log_evidence_se"] is None) == (m["diagnostics"]["light_moves"] > 0)
        assert m["log_evidence_se"] is None or m["log_evidence_se"] > 0.0
    assert payload["leading_model"] == max(payload["models"], key=lambda k: payload["models"][k]["probability"])
    for p in ("t0", "k"):
        h = payload["histograms"][p]
        assert len(h["edges"]) == 41 and len(h["leading"]) == 40
        widths = np.diff(h["edges"])
        assert math.isclose(float(np.dot(widths, h["leading"])), 1.0, rel_tol=1e-9)  # densities
    h_t0 = payload["histograms"]["t0"]
    assert math.isclose(float(np.dot(np.diff(h_t0["edges"]), h_t0["model_averaged"])), 1.0, rel_tol=1e-9)
    assert payload["histograms"]["k"]["model_averaged"] is None  # k is not averaged across rate laws
    assert set(payload["model_averaged"]) == {"t0"}
    assert h["edges"][0] == 0.01 and h["edges"][-1] == 100.0  # k grid: the prior range
    assert payload["histograms"]["t0"]["edges"][0] == 1.0  # t0 grid: the prior window from ts
    pred = payload["predictive"]
    assert len(pred["time_s"]) == 50
    for band in (pred["leading"], pred["model_averaged"]):
        assert np.all(np.array(band["q05"]) <= np.array(band["median"]) + 1e-12)
        assert np.all(np.array(band["median"]) <= np.array(band["q95"]) + 1e-12)
    result = engine.result()
    assert plain(result)
    json.dumps(result, allow_nan=False)
    assert result["n_frames"] == 30 and result["priors"]["t0"]["low"] == 1.0
    assert result["alert"]["frame_index"] is not None and result["alert"]["t0_minus_ts"] is not None
    assert set(result["model_averaged"]) == {"t0"}
    assert result["schedule"] == [1] * 30 and result["null_model"]["prior_probability"] == 0.5


def _reference_weighted_quantiles(values, weights, qs=(0.05, 0.5, 0.95)):
    """Plain NumPy: sort everything, smallest value whose cumulative weight reaches q."""
    order = np.argsort(values, kind="stable")
    cdf = np.cumsum(weights[order])
    cdf /= cdf[-1]
    return [values[order][min(np.searchsorted(cdf, q, side="left"), values.size - 1)] for q in qs]


def _random_views(rng, n_models=4, n=300):
    from inference.payload import ParticleView

    views = {}
    for m in range(n_models):
        theta = np.column_stack([rng.normal(5 + m, 1 + m, n), rng.normal(m - 1, 0.5, n), rng.normal(-4, 1, n),
                                 rng.uniform(0.5, 1.2, n), np.full(n, 1.0)])
        if m == 1:
            theta[: n // 3, 0] = theta[0, 0]  # ties
        logw = rng.normal(0, 2, n)
        logw -= np.log(np.exp(logw).sum())
        views[f"M{m}"] = ParticleView(f"M{m}", 0, ("t0", "k", "s", "A"), theta, logw, float(rng.normal(0, 3)),
                                      0, {})
    return views


def test_mixture_quantiles_match_a_full_sort_on_random_mixtures():
    from inference.payload import PayloadBuilder

    rng = np.random.default_rng(7)
    for trial in range(20):
        views = _random_views(rng)
        probs = PayloadBuilder.probabilities(views)
        builder = PayloadBuilder(tuple(views), np.linspace(0, 20, 41), np.geomspace(0.01, 100, 41),
                                 np.linspace(0, 20, 10), 50)
        averaged = builder.model_averaged(views, probs, params=("t0", "k"))
        for view in views.values():  # per model: the Numba summary against NumPy
            for param, summary in builder.summaries(view).items():
                values, weights = view.values(param), view.weights
                mean = float(np.dot(weights, values))
                assert math.isclose(summary["mean"], mean, rel_tol=1e-9, abs_tol=1e-12)
                assert math.isclose(summary["sd"], math.sqrt(float(np.dot(weights, (values - mean) ** 2))),
                                    rel_tol=1e-7)
                assert [summary[k] for k in ("q05", "q50", "q95")] == _reference_weighted_quantiles(values, weights)
        for param in ("t0", "k"):
            values = np.concatenate([v.values(param) for v in views.values()])
            weights = np.concatenate([probs[m] * v.weights for m, v in views.items()])
            weights /= weights.sum()
            expected = _reference_weighted_quantiles(values, weights)
            got = [averaged[param][key] for key in ("q05", "q50", "q95")]
            assert got == expected, (trial, param)
            mean = float(np.dot(weights, values))
            sd = math.sqrt(float(np.dot(weights, (values - mean) ** 2)))
            assert math.isclose(averaged[param]["mean"], mean, rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(averaged[param]["sd"], sd, rel_tol=1e-7)


def test_histograms_match_numpy_histogram():
    from inference.payload import PayloadBuilder

    rng = np.random.default_rng(3)
    views = _random_views(rng)
    probs = PayloadBuilder.probabilities(views)
    t0_edges, k_edges = np.linspace(2, 12, 31), np.geomspace(0.05, 20, 31)
    builder = PayloadBuilder(tuple(views), t0_edges, k_edges, np.linspace(0, 20, 10), 50)
    payload = builder.build(views, 0, 1.0, 1.0, 1, None)
    for param, edges in (("t0", t0_edges), ("k", k_edges)):
        if param == "t0":  # k is never mixed across rate laws
            expected = np.zeros(edges.size - 1)
            for m, v in views.items():
                counts, _ = np.histogram(v.values(param), bins=edges, weights=probs[m] * v.weights)
                expected += counts
            np.testing.assert_allclose(payload["histograms"][param]["model_averaged"], expected / np.diff(edges),
                                       rtol=1e-12, atol=1e-15)
        lead = views[payload["leading_model"]]
        counts, _ = np.histogram(lead.values(param), bins=edges, weights=lead.weights)
        np.testing.assert_allclose(payload["histograms"][param]["leading"], counts / np.diff(edges),
                                   rtol=1e-12, atol=1e-15)
