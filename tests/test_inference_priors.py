"""Priors: parsing, validation, statement in results; resampling and alert rule."""

import math

import numpy as np
import pytest

from inference.alert import OnsetAlert
from inference.particles import effective_sample_size
from inference.priors import Priors, parse_fix_option, parse_prior_option
from inference.resample import systematic_indices, systematic_resample


def test_defaults_and_statement():
    p = Priors.for_series(12.0, gas_time_s=2.5)
    d = p.to_dict()
    assert d["t0"] == {"distribution": "uniform", "low": 2.5, "high": 12.0, "unit": "s"}
    assert d["k"] == {"distribution": "log-uniform", "low": 0.01, "high": 100.0, "unit": "1/s"}
    assert d["s"]["low"] == 1e-3 and d["s"]["high"] == 0.5
    assert (d["A"]["low"], d["A"]["high"]) == (0.5, 1.2) and (d["n"]["low"], d["n"]["high"]) == (0.5, 4.0)
    assert p.bounds("k") == pytest.approx((math.log(0.01), math.log(100.0)))
    assert Priors.for_series(12.0).t0 == (0.0, 12.0)


def test_from_mapping_like_toml():
    base = Priors.for_series(30.0)
    p = Priors.from_mapping({"k": [0.1, 10], "A": [0.9, 1.1], "fixed": {"n": 2.0}, "s": 0.02}, base=base)
    assert p.k == (0.1, 10.0) and p.A == (0.9, 1.1) and p.t0 == (0.0, 30.0)
    assert p.fixed == {"n": 2.0, "s": 0.02}
    with pytest.raises(ValueError, match="unknown key 'q'"):
        Priors.from_mapping({"q": [1, 2]})
    with pytest.raises(ValueError, match=r"\[low, high\]"):
        Priors.from_mapping({"k": [1, 2, 3]})
    with pytest.raises(ValueError, match="must be positive"):
        Priors.from_mapping({"k": [0, 2]})
    with pytest.raises(ValueError, match="below upper"):
        Priors.from_mapping({"A": [1.2, 0.5]})


def test_command_line_options():
    assert parse_prior_option("k=0.01:100") == ("k", (0.01, 100.0))
    assert parse_prior_option("t0=-1:5") == ("t0", (-1.0, 5.0))
    assert parse_fix_option("A=1") == ("A", 1.0)
    for bad in ("k=0.01", "z=1:2", "k=a:b", "s=-1:1"):
        with pytest.raises(ValueError, match="--prior"):
            parse_prior_option(bad)
    for bad in ("A", "k=-1", "A=x"):
        with pytest.raises(ValueError, match="--fix"):
            parse_fix_option(bad)
    with pytest.raises(ValueError, match="t0 prior window is not set"):
        Priors().bounds("t0")


def test_systematic_resampling_counts_and_reproducibility():
    w = np.array([0.1, 0.0, 0.6, 0.3])
    idx = systematic_indices(w, 1000, 0.37)
    counts = np.bincount(idx, minlength=4)
    assert np.all(np.abs(counts - 1000 * w) <= 1)  # systematic: within one of N W_i
    a = systematic_resample(w, np.random.default_rng(1), 50)
    b = systematic_resample(w, np.random.default_rng(1), 50)
    assert np.array_equal(a, b)
    assert effective_sample_size(np.log(np.full(8, 0.125))) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        systematic_indices(np.zeros(3), 3, 0.5)


def test_alert_fires_once_after_consecutive_frames():
    alert = OnsetAlert(threshold=0.99, consecutive=2)
    seq = [0.5, 0.995, 0.2, 0.995, 0.999, 0.9999, 0.1, 0.999, 0.999]
    fired = [alert.observe(i, i / 3, p) for i, p in enumerate(seq)]
    assert fired == [False, False, False, False, True, False, False, False, False]
    assert alert.fired_frame_index == 4 and alert.fired_time_s == pytest.approx(4 / 3)
    with pytest.raises(ValueError):
        OnsetAlert(threshold=0.0)
