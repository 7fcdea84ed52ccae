"""A synthetic inference-stage stream for previewing and testing the dashboard and report.

It produces the messages the inference stage publishes (``start``, ``pattern``,
``fraction``, ``posterior``, ``alert``, ``status``, ``end``, ``result``) for a paper-like
gas-dosing series (DESIGN.md section 7): F1 kinetics alpha(t) = 1 - exp(-k (t - t0)) for
t >= t0, frames every ``frame_time_s`` seconds, Gaussian noise ``noise`` on alpha.

The posteriors are exact on a grid, not sampled: for each model (F1 alpha = 1 - exp(-x),
F2 alpha = x / (1 + x), x = k (t - t0)) with A = 1 and known noise, the log likelihood
sum_j log N(y_j | alpha(t_j), noise^2) is accumulated on a grid of t0 (uniform prior over
[0, duration] s) and log k (uniform prior over [log k_min, log k_max], k in 1/s). The log
evidence is the log of the prior-weighted mean likelihood over the grid; model
probabilities are the softmax of the log evidences (equal prior model weights); the onset
probability is the model-averaged posterior mass with t0 <= now. Mid-exposure point
evaluation is used (no averaging over the exposure window).

Patterns are synthetic powder profiles (degrees 2theta) mixing phase-A and phase-B peak sets
(B shifted 2 % to lower angle) in the proportion alpha, with Poisson noise.

Run ``python -m dashboards.synthetic_feed --bind tcp://127.0.0.1:5600 --rate 3`` to publish a
series to a dashboard started with ``serve_dashboard("tcp://127.0.0.1:5600")``.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Iterator

import numpy as np

from beamkin import protocol
from beamkin.protocol import Message

log = logging.getLogger(__name__)

#: Peak centres (degrees 2theta) of the synthetic phase A; phase B is 2 % lower.
PEAKS_A_DEG = (6.2, 9.1, 10.4, 12.7, 15.3, 18.9, 21.4, 24.8)
PEAK_SHIFT_B = 0.98
PEAK_FWHM_DEG = 0.08


def _alpha_f1(x: np.ndarray) -> np.ndarray:
    """F1 first order: alpha = 1 - exp(-x) for x >= 0 else 0."""
    return np.where(x > 0, -np.expm1(-np.maximum(x, 0.0)), 0.0)


def _alpha_f2(x: np.ndarray) -> np.ndarray:
    """F2 second order: alpha = x / (1 + x) for x >= 0 else 0."""
    xp = np.maximum(x, 0.0)
    return xp / (1.0 + xp)


MODELS = {"F1": _alpha_f1, "F2": _alpha_f2}


def _stats(values: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """Weighted mean, sd and 5/50/95 % quantiles of a discrete distribution."""
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    mean = float(np.sum(v * w) / np.sum(w))
    sd = float(math.sqrt(max(np.sum(w * (v - mean) ** 2) / np.sum(w), 0.0)))
    q = [float(v[min(np.searchsorted(cdf, p), v.size - 1)]) for p in (0.05, 0.5, 0.95)]
    return {"mean": mean, "sd": sd, "q05": q[0], "q50": q[1], "q95": q[2]}


class SyntheticSeries:
    """Generator of one synthetic series of inference-stage messages (see module docstring)."""

    def __init__(self, series_id: str = "synthetic-0001", t0_s: float = 7.4461, k_per_s: float = 0.6192,
                 frame_time_s: float = 1 / 3, duration_s: float = 12.0, noise: float = 0.02,
                 gas_time_s: float | None = 7.0, seed: int = 1, n_t0: int = 800, n_k: int = 240,
                 k_range_per_s: tuple[float, float] = (0.05, 5.0), pattern_points: int = 3000) -> None:
        if not (frame_time_s > 0 and duration_s > frame_time_s and noise > 0):
            raise ValueError("synthetic series needs frame_time_s > 0, duration_s > frame_time_s and noise > 0")
        self.series_id = series_id
        self.t0_s, self.k_per_s = t0_s, k_per_s
        self.frame_time_s, self.duration_s, self.noise = frame_time_s, duration_s, noise
        self.gas_time_s = gas_time_s
        self.rng = np.random.default_rng(seed)
        self.t0_grid = np.linspace(0.0, duration_s, n_t0)
        self.k_grid = np.geomspace(*k_range_per_s, n_k)
        self.T0, self.K = np.meshgrid(self.t0_grid, self.k_grid, indexing="ij")
        self.loglik = {name: np.zeros_like(self.T0) for name in MODELS}
        self.radial = np.linspace(4.0, 28.0, pattern_points)
        # histogram bins centred on the grid nodes (arithmetic midpoints for t0, geometric for k),
        # so each bin holds exactly one node and the densities have no empty bins
        half = 0.5 * (self.t0_grid[1] - self.t0_grid[0])
        self.t0_edges = np.concatenate([[self.t0_grid[0] - half], self.t0_grid[:-1] + half, [self.t0_grid[-1] + half]])
        ratio = math.sqrt(self.k_grid[1] / self.k_grid[0])
        self.k_edges = np.concatenate([[self.k_grid[0] / ratio], self.k_grid[:-1] * ratio, [self.k_grid[-1] * ratio]])
        self.n_frames = int(duration_s / frame_time_s)

    def _profile(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """Counts and sigma of a powder profile with a fraction alpha of phase B."""
        sigma_deg = PEAK_FWHM_DEG / 2.3548
        profile = 300.0 * np.exp(-self.radial / 10.0) + 40.0
        for i, centre in enumerate(PEAKS_A_DEG):
            height = 400.0 / (1 + 0.3 * i)
            for fraction, c in ((1 - alpha, centre), (alpha, centre * PEAK_SHIFT_B)):
                profile = profile + fraction * height * np.exp(-0.5 * ((self.radial - c) / sigma_deg) ** 2)
        counts = self.rng.poisson(profile).astype(np.float64)
        return counts, np.sqrt(np.maximum(counts, 1.0))

    def _peaks(self) -> list[dict]:
        peaks = []
        for centre in PEAKS_A_DEG[:3]:
            for phase, c in (("A", centre), ("B", centre * PEAK_SHIFT_B)):
                peaks.append({"phase": phase, "center_deg": c, "lo_deg": c - 0.1, "hi_deg": c + 0.1,
                              "area": 1.0, "sigma_area": 0.05, "fwhm_deg": PEAK_FWHM_DEG})
        return peaks

    def start_message(self) -> Message:
        return protocol.make(
            "start", series_id=self.series_id, kind="profile", source="synthetic",
            detector={"name": "synthetic MYTHEN"}, geometry={"wavelength_A": 0.8},
            frame_time_s=self.frame_time_s, exposure_s=self.frame_time_s, n_frames=self.n_frames,
            gas_time_s=self.gas_time_s)

    def _posterior(self, frame_index: int, time_s: float) -> tuple[dict, float]:
        log_cell = -math.log(self.T0.size)
        evidences = {name: float(np.logaddexp.reduce(ll.ravel()) + log_cell) for name, ll in self.loglik.items()}
        top = max(evidences.values())
        norm = sum(math.exp(v - top) for v in evidences.values())
        probabilities = {name: math.exp(v - top) / norm for name, v in evidences.items()}
        leading = max(probabilities, key=probabilities.get)
        times = np.linspace(0.0, self.duration_s, 200)
        models, onset = {}, 0.0
        hist_t0 = {"edges": self.t0_edges.tolist()}
        hist_k = {"edges": self.k_edges.tolist()}
        t0_avg = np.zeros(self.t0_edges.size - 1)
        k_avg = np.zeros(self.k_edges.size - 1)
        curves_avg = []
        all_t0, all_k, all_w = [], [], []
        for name, ll in self.loglik.items():
            w = np.exp(ll - ll.max()).ravel()
            w /= w.sum()
            t0s, ks = self.T0.ravel(), self.K.ravel()
            dens_t0, _ = np.histogram(t0s, bins=self.t0_edges, weights=w, density=True)
            dens_k, _ = np.histogram(ks, bins=self.k_edges, weights=w, density=True)
            t0_avg += probabilities[name] * dens_t0
            k_avg += probabilities[name] * dens_k
            onset += probabilities[name] * float(w[t0s <= time_s].sum())
            draws = self.rng.choice(w.size, size=400, p=w)
            curves = MODELS[name](ks[draws, None] * (times[None, :] - t0s[draws, None]))
            n_avg = int(round(400 * probabilities[name]))
            if n_avg:
                curves_avg.append(curves[:n_avg])
            models[name] = {
                "log_evidence": evidences[name], "probability": probabilities[name],
                "params": {"t0": _stats(t0s, w), "k": _stats(ks, w)},
                "diagnostics": {"ess": float(1.0 / np.sum(w ** 2)), "acceptance_rate": None,
                                "rejuvenations": 0, "tempering_steps": 0},
                "_curves": curves, "_hists": (dens_t0, dens_k),
            }
            all_t0.append(t0s), all_k.append(ks), all_w.append(probabilities[name] * w)
        lead = models[leading]
        hist_t0.update(model_averaged=t0_avg.tolist(), leading=lead["_hists"][0].tolist())
        hist_k.update(model_averaged=k_avg.tolist(), leading=lead["_hists"][1].tolist())
        averaged_curves = np.vstack(curves_avg)

        def band(curves: np.ndarray) -> dict:
            q05, q50, q95 = np.percentile(curves, [5, 50, 95], axis=0)
            return {"median": q50.tolist(), "q05": q05.tolist(), "q95": q95.tolist()}

        predictive = {"time_s": times.tolist(), "leading": band(lead["_curves"]), "model_averaged": band(averaged_curves)}
        for model in models.values():
            del model["_curves"], model["_hists"]
        t0_all, k_all, w_all = np.concatenate(all_t0), np.concatenate(all_k), np.concatenate(all_w)
        fields = dict(
            series_id=self.series_id, frame_index=frame_index, time_s=time_s,
            onset_probability=min(max(onset, 0.0), 1.0), leading_model=leading, models=models,
            model_averaged={"t0": _stats(t0_all, w_all), "k": _stats(k_all, w_all)},
            histograms={"t0": hist_t0, "k": hist_k}, predictive=predictive,
            diagnostics={"frames_missing": 0, "lag_s": 0.01},
            priors={"t0": {"uniform_s": [0.0, self.duration_s]},
                    "k": {"log_uniform_per_s": [float(self.k_grid[0]), float(self.k_grid[-1])]},
                    "noise": {"fixed": self.noise}})
        return fields, probabilities[leading]

    def messages(self, alert_threshold: float = 0.99) -> Iterator[Message]:
        """All messages of the series in publication order."""
        yield self.start_message()
        alerted = False
        fields = None
        for j in range(self.n_frames):
            t = (j + 0.5) * self.frame_time_s
            true_alpha = float(_alpha_f1(np.array(self.k_per_s * (t - self.t0_s))))
            y = true_alpha + self.noise * float(self.rng.standard_normal())
            counts, sigma = self._profile(true_alpha)
            yield protocol.make("pattern", {"radial": self.radial, "intensity": counts, "sigma": sigma},
                                series_id=self.series_id, frame_index=j, time_s=t, unit="2th_deg")
            yield protocol.make("fraction", series_id=self.series_id, frame_index=j, time_s=t,
                                exposure_s=self.frame_time_s, alpha=y, sigma_alpha=self.noise, status="ok",
                                reason=None, peaks=self._peaks())
            for name, alpha_fn in MODELS.items():
                mean = alpha_fn(self.K * (t - self.T0))
                self.loglik[name] += -0.5 * ((y - mean) / self.noise) ** 2
            fields, leading_probability = self._posterior(j, t)
            yield protocol.make("posterior", **fields)
            if not alerted and fields["onset_probability"] >= alert_threshold:
                alerted = True
                t0 = fields["model_averaged"]["t0"]
                yield protocol.make(
                    "alert", series_id=self.series_id, frame_index=j, time_s=t,
                    t0={"mean": t0["mean"], "q05": t0["q05"], "q95": t0["q95"]},
                    t0_minus_ts=None if self.gas_time_s is None else t0["mean"] - self.gas_time_s,
                    leading_model=fields["leading_model"], leading_probability=leading_probability,
                    onset_probability=fields["onset_probability"])
            yield protocol.make("status", stage="inference", series_id=self.series_id, counters={
                "frames_received": j + 1, "frames_missing": 0, "frame_rate_hz": 1 / self.frame_time_s,
                "lag_s": 0.01})
        yield protocol.make("end", series_id=self.series_id, n_frames=self.n_frames, reason="completed")
        if fields is not None:
            yield protocol.make("result", series_id=self.series_id, result={
                "models": fields["models"], "model_averaged": fields["model_averaged"],
                "priors": fields["priors"], "predictive": fields["predictive"],
                "histograms": fields["histograms"]})


def publish(socket, messages: Iterator[Message], frame_rate_hz: float) -> int:
    """Send messages on a PUB socket, pausing 1/frame_rate_hz seconds after each frame's posterior."""
    sent = 0
    for message in messages:
        protocol.send(socket, message)
        sent += 1
        if message.type == "posterior" and frame_rate_hz > 0:
            time.sleep(1.0 / frame_rate_hz)
    return sent


def main(argv: list[str] | None = None) -> None:
    import zmq

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="tcp://127.0.0.1:5600", help="PUB endpoint to bind")
    parser.add_argument("--rate", type=float, default=3.0, help="frames per second")
    parser.add_argument("--series", type=int, default=1, help="number of series to publish")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    context = zmq.Context.instance()
    socket = context.socket(zmq.PUB)
    socket.bind(args.bind)
    time.sleep(0.5)  # let subscribers connect
    for i in range(args.series):
        series = SyntheticSeries(series_id=f"synthetic-{i + 1:04d}", seed=i + 1)
        log.info("publishing series %s on %s", series.series_id, args.bind)
        publish(socket, series.messages(), args.rate)
    socket.close(linger=1000)


if __name__ == "__main__":
    main()
