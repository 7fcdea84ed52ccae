"""Largest sustained 2D frame rate of the live pipeline with 2 reducer workers, and what happens past it.

Starts ``beamkin run --source dectris2:...`` (streamer, ``--reducer.workers 2``, inference,
dashboard: every stage its own process, free loopback ports for every endpoint, the dashboard and
the metrics), sends one warm-up series (12 frames at 3 Hz: the reducers' integrator and the
sampler kernels are built), then for each rate of ``--rates`` (default 3, 5, 10, 15, 20, 30 Hz)
sends one series of ``--frames`` (default 60) frames from the simulator's fake EIGER (Stream V2,
bslz4, the synthetic Pilatus 1M-size frames and start message of ``beamkin simulate``) with every
message rendered and encoded before the series starts (``beamkin simulate`` renders each frame on
time and, on this loaded 2-core machine, could not send faster than 5-14 Hz itself), and measures
per rate:

* frames sent, the achieved send rate, and the time the sender waited for a writable socket (it
  waits when the streamer stopped reading: that is the back-pressure);
* frames received by the streamer and assimilated by the inference (an ``estimate`` on its PUB
  socket, or flagged);
* the lag of each frame: from the frame leaving the sender's socket to its estimate published
  (every queue on the way: sockets, the streamer's inbox and pending queue, the reducers, the
  inference's inbox), and the streamer-receipt-to-estimate latency (``diagnostics.latency_s``);
* the streamer's ``pending`` queue (frames held for busy workers, at most
  ``[streamer] max_pending_frames``) and the inference's inbox / exact-sampler lag, from the
  stages' metrics sampled every 0.5 s.

A rate is *kept up* when every frame was sent and assimilated, the lag of the second half of the
series does not grow (slope of lag against send time < 0.1 s/s) and the last frame's lag is < 2 s.
Exposure is min(0.3 s, 0.9 / rate) and ``counts_scale`` is raised by 0.3 s / exposure so every
rate has the noise of the defaults' 0.3 s frame (the reducer would otherwise flag short frames).

Prints a table, the largest rate kept up and its ratio to the demo's 3 Hz.
Usage: python bench/bench_max_rate.py [--rates 3,5,10,15,20,30] [--frames 60] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_soak import PipelineRun, machine_line, percentile_ms  # noqa: E402

DEMO_RATE_HZ = 3.0
COUNTS_SCALE_0_3_S = 0.0005     # defaults.toml [simulator] counts_scale, for a 0.3 s exposure
KEPT_UP_SLOPE = 0.1             # s of extra lag per s of schedule, over the series' second half
KEPT_UP_FINAL_LAG_S = 2.0      # s, the last frame's send -> estimate


class PrerenderedDetector:
    """The fake EIGER of ``beamkin simulate`` (Stream V2, bslz4, the same synthetic frames and
    start message), with every message of the series rendered and encoded before the series is
    sent, so the sender is not the bottleneck: it then sends them at ``rate_hz`` from a thread,
    noting when each frame went out and how long it waited for a writable socket (back-pressure:
    the streamer stopped reading). One sender, bound once, serves every rate."""

    def __init__(self, endpoint: str):
        from simulator.fake_eiger import StreamV2Sender

        self.sender = StreamV2Sender(endpoint, compression="bslz4")

    def render(self, rate_hz: float, frames: int, series_id: str) -> None:
        from beamkin import config as configuration
        from simulator.experiment import exposure_averaged_alpha, make_detector, stream_v2_start_fields
        from simulator.synthetic import default_metadata

        self.rate_hz, self.frames, self.series_id = rate_hz, frames, series_id
        self.frame_time = 1.0 / rate_hz
        self.exposure = min(0.3, 0.9 * self.frame_time)
        options = configuration.defaults()["simulator"]
        options.update(frame_time_s=self.frame_time, exposure_s=self.exposure, n_frames=frames, series_id=series_id,
                       gas_time_s=-1.0, counts_scale=COUNTS_SCALE_0_3_S * 0.3 / self.exposure)
        metadata = default_metadata(frame_time_s=self.frame_time, exposure_s=self.exposure, n_frames=frames,
                                    gas_time_s=None)
        detector = make_detector(options, metadata)
        mid_times = np.arange(frames) * self.frame_time + self.exposure / 2
        alphas = exposure_averaged_alpha(options["model"], options["t0_s"], options["k_per_s"], options["extent"],
                                         options["n_exponent"], mid_times, self.exposure)
        captured: list[bytes] = []
        send_raw, self.sender.send_raw = self.sender.send_raw, captured.append
        try:
            self.sender.send_start(stream_v2_start_fields(metadata, options),
                                   pixel_mask=detector.gap_mask.astype(np.uint32))
            for index in range(frames):
                start_s = index * self.frame_time
                self.sender.send_image(index, detector.image(float(alphas[index]), self.exposure), start_s,
                                       start_s + self.exposure)
            self.sender.send_end()
        finally:
            self.sender.send_raw = send_raw
        self.messages = captured
        self.sent_s: list[float] = []       # run time (s since the pipeline's launch) each frame went out
        self.blocked_s = 0.0                # time spent waiting for a writable socket
        self.began_s = float("nan")

    def send(self, run: PipelineRun, stop: threading.Event) -> None:
        """Start, then the frames on their schedule (frame i due at i / rate + exposure), then end."""
        start, *frames, end = self.messages
        self.sender.send_raw(start)
        began = time.monotonic()
        self.began_s = run.elapsed()
        for index, message in enumerate(frames):
            delay = began + index * self.frame_time + self.exposure - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            waited = time.monotonic()
            while not self.sender.writable(0.2):
                if stop.is_set():
                    return
            self.blocked_s += time.monotonic() - waited
            self.sender.send_raw(message)
            self.sent_s.append(run.elapsed())
        self.sender.send_raw(end)

    def close(self) -> None:
        self.sender.close(linger_s=1.0)


def run_rate(run: PipelineRun, detector: PrerenderedDetector, rate_hz: float, frames: int, timeout_s: float) -> dict:
    series_id = f"rate{rate_hz:g}-{uuid.uuid4().hex[:6]}"
    detector.render(rate_hz, frames, series_id)
    rows_before = len(run.metric_rows)
    stop = threading.Event()
    sending = threading.Thread(target=detector.send, args=(run, stop), daemon=True)
    sending.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and series_id not in run.observed.ends:
        time.sleep(0.5)
    stop.set()
    sending.join(30)
    time.sleep(1.0)
    seen = run.observed
    estimates = {index: latency for (series, index), latency in list(seen.estimates.items()) if series == series_id}
    seen_at = {index: at for (series, index), at in list(seen.estimate_seen_s.items()) if series == series_id}
    rows = run.metric_rows[rows_before:]
    sent_s = detector.sent_s
    # lag: the frame leaving the detector's socket to its estimate published (every queue on the way)
    lag = {i: seen_at[i] - sent_s[i] for i in sorted(seen_at) if i < len(sent_s)}
    second_half = [i for i in lag if i >= frames // 2]
    slope = float("nan")
    if len(second_half) >= 3:
        times = np.array([sent_s[i] for i in second_half])
        slope = float(np.polyfit(times - times[0], np.array([lag[i] for i in second_half]), 1)[0])
    final_lag = lag[max(lag)] if lag else float("nan")
    flagged_lines = [line for line in list(run.log_lines) if "flagged frame" in line and series_id in line]
    assimilated = len(estimates) + len(flagged_lines)
    finite = lambda key: [r[key] for r in rows if r[key] == r[key]]  # noqa: E731
    pending_max = max(finite("streamer_pending"), default=float("nan"))
    kept_up = (len(sent_s) == frames and assimilated == frames and slope == slope and slope < KEPT_UP_SLOPE
               and final_lag < KEPT_UP_FINAL_LAG_S)
    return {
        "rate": rate_hz, "series": series_id, "sent": len(sent_s),
        "achieved_hz": (len(sent_s) - 1) / (sent_s[-1] - sent_s[0]) if len(sent_s) > 1 else float("nan"),
        "blocked_s": detector.blocked_s,
        "estimates": len(estimates), "flagged": len(flagged_lines), "assimilated": assimilated,
        "ended": seen.ends.get(series_id, {}).get("reason"),
        "lag_p50_s": float(np.median(list(lag.values()))) if lag else float("nan"),
        "lag_max_s": max(lag.values(), default=float("nan")), "final_lag_s": final_lag, "slope": slope,
        "latency_p50_ms": percentile_ms(list(estimates.values()), 50),
        "latency_p99_ms": percentile_ms(list(estimates.values()), 99),
        "pending_max": pending_max, "inbox_max": max(finite("inference_inbox"), default=float("nan")),
        "exact_lag_max": max(finite("exact_lag_frames"), default=float("nan")), "kept_up": kept_up,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="3,5,10,15,20,30", help="frame rates to step through, Hz (comma-separated)")
    parser.add_argument("--frames", type=int, default=60, help="frames per rate")
    parser.add_argument("--workers", type=int, default=2, help="reducer workers")
    parser.add_argument("--particles", type=int, help="inference particles per model (default: defaults.toml)")
    parser.add_argument("--log", help="write the pipeline's log here (default: the run's temporary folder)")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    out_dir = Path(__import__("tempfile").mkdtemp(prefix="beamkin-maxrate-"))
    run = PipelineRun({}, workers=args.workers, out_dir=out_dir, sample_s=0.5, particles=args.particles,
                      command="run")
    run.options += ["--source", f"dectris2:tcp://127.0.0.1:{run.ports.detector}"]
    print(f"machine: {machine_line()}")
    print(f"max rate: beamkin run, {args.workers} reducer workers, one series of {args.frames} 2D frames per rate "
          f"({', '.join(f'{r:g}' for r in rates)} Hz)", flush=True)
    run.start()
    detector = PrerenderedDetector(f"tcp://127.0.0.1:{run.ports.detector}")
    results = []
    try:
        while run.ready_s != run.ready_s:
            if run.process.poll() is not None or run.elapsed() > 300:
                raise SystemExit(f"the pipeline did not start: {list(run.log_lines)[-20:]}")
            time.sleep(0.2)
        time.sleep(1.0)
        warm = run_rate(run, detector, DEMO_RATE_HZ, 12, timeout_s=120)
        print(f"warm-up series: {warm['assimilated']}/12 frames assimilated, ended {warm['ended']}", flush=True)
        for rate in rates:
            result = run_rate(run, detector, rate, args.frames, timeout_s=args.frames / rate + 150)
            results.append(result)
            print(f"  {rate:4g} Hz: sent {result['sent']} at {result['achieved_hz']:.1f} Hz (blocked "
                  f"{result['blocked_s']:.2f} s), assimilated {result['assimilated']}, lag last {result['final_lag_s']:.2f} s "
                  f"(slope {result['slope']:.2f}), pending max {result['pending_max']:.0f}, kept up {result['kept_up']}",
                  flush=True)
            time.sleep(2.0)
    finally:
        code = run.stop()
        detector.close()
    log_path = Path(args.log) if args.log else out_dir / "pipeline.log"
    log_path.write_text("\n".join(run.log_lines) + "\n")
    print(f"\npipeline exit code {code}; log {log_path}; metrics sampled every 0.5 s")
    print("| rate (Hz) | sent (at Hz) | sender blocked (s) | assimilated (estimates + flagged) | end | lag send -> estimate "
          "p50 / max / last (s) | lag slope, 2nd half (s/s) | streamer receipt -> estimate p50 / p99 (ms) | streamer "
          "pending max | inference inbox max | exact-sampler lag max (frames) | kept up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['rate']:g} | {r['sent']} ({r['achieved_hz']:.1f}) | {r['blocked_s']:.2f} | {r['assimilated']} "
              f"({r['estimates']} + {r['flagged']}) | {r['ended']} | {r['lag_p50_s']:.2f} / {r['lag_max_s']:.2f} / "
              f"{r['final_lag_s']:.2f} | {r['slope']:.2f} | {r['latency_p50_ms']:.0f} / {r['latency_p99_ms']:.0f} | "
              f"{r['pending_max']:.0f} | {r['inbox_max']:.0f} | {r['exact_lag_max']:.0f} | {'yes' if r['kept_up'] else 'NO'} |")
    kept = [r["rate"] for r in results if r["kept_up"]]
    best = max(kept, default=float("nan"))
    first_failure = next((r for r in results if not r["kept_up"]), None)
    print(f"largest rate kept up: {best:g} Hz (ratio to the demo's {DEMO_RATE_HZ:g} Hz: {best / DEMO_RATE_HZ:.1f})"
          + (f"; first rate not kept up: {first_failure['rate']:g} Hz" if first_failure else "; every rate kept up"))
    if first_failure:
        print(f"past the limit ({first_failure['rate']:g} Hz): {first_failure['sent']} sent at "
              f"{first_failure['achieved_hz']:.1f} Hz, the sender blocked {first_failure['blocked_s']:.2f} s on a full "
              f"socket (back-pressure), {first_failure['assimilated']} assimilated, lag of the last frame "
              f"{first_failure['final_lag_s']:.2f} s, streamer pending up to {first_failure['pending_max']:.0f}")
    notable = [line for line in list(run.log_lines)
               if ("WARNING" in line or "ERROR" in line) and "flagged frame" not in line and "ONSET" not in line]
    print(f"{len(notable)} WARNING/ERROR log lines (not counting flagged frames and onset alerts)"
          + (":" if notable else ""))
    for line in notable[:10]:
        print("  " + line[:240])
    return 0


if __name__ == "__main__":
    sys.exit(main())
