"""Soak benchmark: the whole live pipeline running for minutes, its memory and its frame count.

Starts ``beamkin demo`` (every stage its own process: streamer, reducer, inference, dashboard,
then the simulator; free loopback ports for every endpoint, the dashboard and the metrics) with
the simulator looping series back to back (``[simulator] repeat``, distinct series ids), and

* samples the resident memory (VmRSS of /proc/PID/status, kB) of every stage process every
  ``--sample-s`` seconds to a CSV (stages found by an environment marker the run's processes
  inherit);
* counts frames: sent by the simulator (2D: the frames of its series; profile mode: the .xye
  files it wrote), received by the streamer, and assimilated by the inference (distinct
  (series, frame) of the ``estimate`` messages on its PUB socket, cross-checked with the
  stages' Prometheus counters ``beamkin_frames_in_total`` / ``beamkin_frames_out_total``);
* reads the end-to-end latency of each frame from its ``estimate`` (``diagnostics.latency_s``:
  the streamer's receipt of the frame, ``received_unix_s``, to the estimate being published)
  and of the exact ``posterior`` that took it in.

Modes: ``--mode profile``: 1D profiles (simulator ``mode = "profile"``, MYTHEN-like .xye files
read by the streamer's files: source) at 100 Hz for ``--minutes`` (default 10), series of
``--series-s`` seconds (default 30), ``profile_counts_scale`` raised by 0.3 s / exposure so a 10 ms
profile has the noise of the defaults' 0.3 s one (at the default scale nearly every 10 ms profile
is flagged "no diffraction signal"); ``--mode demo2d``: the 2D demo (Pilatus 1M-size frames,
Stream V2) looping its 36-frame 3 Hz series for ``--minutes`` (default 30).

The run: ``--minutes`` of sending from the first frame (a simulator behind its schedule, e.g.
profile files written slower than 100 Hz, is stopped then with SIGINT: it finishes the frame in
hand), then the pipeline drains (until the inference released every frame sent, nothing moved for
30 s, or ``--grace-s``), then ``beamkin demo`` is stopped with SIGINT.

Prints RSS per stage at warm-up (mean over the samples of the 30 s after ``--warmup-s``, default
the larger of 2 minutes and 10 % of the run) and at the end (mean of the last 30 s of sending),
the growth in %, CPU per stage, frames sent / received / assimilated (lost = sent - estimates -
flagged frames), latency p50 / p99 and the
verdicts against the targets (docs/benchmarks.md, "Soak and load"): memory growth < 5 % after
warm-up for every stage, zero frames lost. Ratios: growth / 5 %, latency / its target.

Usage: python bench/bench_soak.py --mode profile [--minutes 10] [--csv rss.csv]
       python bench/bench_soak.py --mode demo2d [--minutes 30]
"""

from __future__ import annotations

import argparse
import collections
import csv
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beamkin import protocol  # noqa: E402
from beamkin.loopback import LoopbackPorts, results_listener  # noqa: E402

MARKER = "BEAMKIN_BENCH_SOAK"          # environment variable every process of a run inherits
MEMORY_GROWTH_TARGET_PCT = 5.0
LATENCY_TARGETS_MS = {50: 50.0, 99: 150.0}   # docs/benchmarks.md: estimate latency at 3 Hz
PROFILE_COUNTS_SCALE_0_3_S = 0.03             # defaults.toml [simulator] profile_counts_scale
WINDOW_S = 30.0                               # RSS averaged over this long at warm-up and at the end


def free_port_pair() -> tuple[int, int]:
    """Two consecutive free loopback ports (reducer worker i serves metrics on reducer_port + i)."""
    for _ in range(200):
        first = socket.socket()
        first.bind(("127.0.0.1", 0))
        port = first.getsockname()[1]
        second = socket.socket()
        try:
            second.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        finally:
            first.close()
            second.close()
        return port, port + 1
    raise RuntimeError("no two consecutive free loopback ports")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kb(pid: int) -> int | None:
    """VmRSS of a process, kB (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float | None:
    """User + system CPU time of a process so far, s (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_processes(marker_value: str) -> dict[int, str]:
    """PID -> stage name of the live processes of the run (environment MARKER=marker_value).

    Names: the ``beamkin`` subcommand (demo = the supervisor, stream, infer, dashboard, simulate,
    reduce); a reducer worker of ``--workers N`` is ``reduce[NAME]`` (its ``--worker-name``)."""
    wanted = f"{MARKER}={marker_value}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if wanted not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = [part.decode(errors="replace") for part in handle.read().split(b"\0")]
        except OSError:
            continue
        if "beamkin" not in argv or argv.index("beamkin") + 1 >= len(argv):
            continue
        command = argv[argv.index("beamkin") + 1]
        if command == "reduce" and "--worker-name" in argv:
            command = "reduce[worker-" + argv[argv.index("--worker-name") + 1].rsplit("-", 1)[-1] + "]"
        found[int(entry)] = command
    return found


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """GET http://127.0.0.1:PORT/metrics, parsed: (sample name, sorted labels) -> value ({} if down)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), float("nan"))


def sum_of(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (every ``reason``)."""
    wanted = set(labels.items())
    return float(sum(v for (n, lab), v in samples.items() if n == name and wanted <= set(lab)))


@dataclass
class Observed:
    """What the results listener saw (times: seconds since the run's launch, monotonic)."""
    estimates: dict[tuple[str, int], float] = field(default_factory=dict)   # (series, frame) -> latency_s
    estimate_seen_s: dict[tuple[str, int], float] = field(default_factory=dict)
    posterior_latencies: list[float] = field(default_factory=list)
    ends: dict[str, dict] = field(default_factory=dict)                     # series -> {n_frames, reason, at_s}
    results: dict[str, dict] = field(default_factory=dict)                  # series -> diagnostics
    starts: dict[str, float] = field(default_factory=dict)
    messages: collections.Counter = field(default_factory=collections.Counter)


class PipelineRun:
    """``beamkin demo`` (or ``run``) on free ports with the simulator options given, watched from outside."""

    def __init__(self, simulator: dict[str, object], workers: int, out_dir: Path, sample_s: float = 5.0,
                 particles: int | None = None, extra: list[str] | None = None, command: str = "demo"):
        self.command = command   # "demo" (the simulator started by the supervisor) or "run" (no simulator)
        self.simulator = dict(simulator)
        self.workers = workers
        self.out_dir = out_dir
        self.sample_s = sample_s
        self.marker = uuid.uuid4().hex
        self.ports = LoopbackPorts.free()
        reducer_port, _ = free_port_pair()
        self.metric_ports = {"streamer": free_port(), "inference": free_port(), "dashboard": free_port(),
                             "reducer": reducer_port}
        options = [*self.ports.options(), "--metrics.enabled", "true", "--metrics.recorder_port", "0",
                   "--reducer.workers", str(workers)]
        for stage, port in self.metric_ports.items():
            options += [f"--metrics.{stage}_port", str(port)]
        for key, value in self.simulator.items():
            options += [f"--simulator.{key}", str(value)]
        if particles:
            options += ["--inference.particles", str(particles)]
        self.options = options + list(extra or [])
        self.observed = Observed()
        self.rss_rows: list[tuple[float, str, int, int]] = []   # (t_s, stage, pid, rss_kb)
        self.cpu_last: dict[tuple[str, int], tuple[float, float]] = {}   # (stage, pid) -> (t_s, CPU s) at the last sample
        self.metric_rows: list[dict[str, float]] = []
        self.log_lines: collections.deque[str] = collections.deque(maxlen=200000)
        self.stop_event = threading.Event()
        self.ready_s = float("nan")
        self.simulator_done_s = float("nan")   # the simulator's process finished its series
        self.simulator_stopped = False          # ... because the bench stopped it at the end of the run
        self.process: subprocess.Popen | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.context = zmq.Context()
        self.listener = results_listener(self.context, self.ports)
        self.launched = time.monotonic()
        env = {**os.environ, MARKER: self.marker}
        self.process = subprocess.Popen([sys.executable, "-m", "beamkin", self.command, *self.options],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True, env=env)
        self.threads = [threading.Thread(target=target, daemon=True)
                        for target in (self._read_output, self._listen, self._sample)]
        for thread in self.threads:
            thread.start()

    def elapsed(self) -> float:
        return time.monotonic() - self.launched

    def stop(self) -> int:
        """SIGINT to the demo (its supervisor stops the stages in order); SIGKILL after 60 s."""
        self.stop_event.set()
        code = self.process.poll()
        if code is None:
            os.kill(self.process.pid, signal.SIGINT)
            try:
                code = self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                code = self.process.wait()
        for thread in self.threads:
            thread.join(10)
        self.listener.close(0)
        self.context.term()
        return code

    # -- watchers ---------------------------------------------------------------------------------
    def _read_output(self) -> None:
        for line in self.process.stdout:
            self.log_lines.append(f"{self.elapsed():9.2f} {line.rstrip()}")
            if "beamkin dashboard: http://" in line and self.ready_s != self.ready_s:
                self.ready_s = self.elapsed()
            if "stage simulator finished" in line:
                self.simulator_done_s = self.elapsed()

    def _listen(self) -> None:
        seen = self.observed
        while not self.stop_event.is_set():
            if not self.listener.poll(200):
                continue
            try:
                message = protocol.decode(self.listener.recv_multipart())
            except protocol.ProtocolError:
                seen.messages["malformed"] += 1
                continue
            now = self.elapsed()
            seen.messages[message.type] += 1
            fields = message.fields
            if message.type == "estimate":
                key = (fields.get("series_id"), fields.get("frame_index"))
                seen.estimates[key] = (fields.get("diagnostics") or {}).get("latency_s", float("nan"))
                seen.estimate_seen_s[key] = now
            elif message.type == "posterior":
                latency = (fields.get("diagnostics") or {}).get("latency_s")
                if latency is not None:
                    seen.posterior_latencies.append(latency)
            elif message.type == "start":
                seen.starts[fields.get("series_id")] = now
            elif message.type == "result":
                seen.results[fields.get("series_id")] = (fields.get("result") or {}).get("diagnostics") or {}
            elif message.type == "end":
                seen.ends[fields.get("series_id")] = {"n_frames": fields.get("n_frames"),
                                                      "reason": fields.get("reason"), "at_s": now}

    def _sample(self) -> None:
        while not self.stop_event.wait(0 if not self.rss_rows else self.sample_s):
            now = self.elapsed()
            for pid, stage in sorted(run_processes(self.marker).items()):
                kb, cpu = rss_kb(pid), cpu_s(pid)
                if kb is not None:
                    self.rss_rows.append((now, stage, pid, kb))
                if cpu is not None:
                    self.cpu_last[(stage, pid)] = (now, cpu)
            self.metric_rows.append({"t_s": now, **self.scrape_counts()})

    def scrape_counts(self) -> dict[str, float]:
        """The frame counters and queue gauges of the stages' metrics endpoints."""
        streamer, inference = scrape(self.metric_ports["streamer"]), scrape(self.metric_ports["inference"])
        row = {
            "streamer_in": metric(streamer, "beamkin_frames_in_total", stage="streamer"),
            "streamer_out": metric(streamer, "beamkin_frames_out_total", stage="streamer"),
            "streamer_pending": metric(streamer, "beamkin_queue_depth", stage="streamer", queue="pending"),
            "streamer_in_flight": metric(streamer, "beamkin_queue_depth", stage="streamer", queue="in_flight"),
            "inference_in": metric(inference, "beamkin_frames_in_total", stage="inference"),
            "inference_out": metric(inference, "beamkin_frames_out_total", stage="inference"),
            "inference_inbox": metric(inference, "beamkin_queue_depth", stage="inference", queue="inbox"),
            "inference_reorder": metric(inference, "beamkin_queue_depth", stage="inference", queue="reorder"),
            "exact_lag_frames": metric(inference, "beamkin_exact_sampler_lag_frames"),
            "inference_flagged": sum_of(inference, "beamkin_frames_flagged_total", stage="inference"),
            "inference_dropped": sum_of(inference, "beamkin_frames_dropped_total", stage="inference"),
            "streamer_dropped": sum_of(streamer, "beamkin_frames_dropped_total", stage="streamer"),
        }
        reduced = 0.0
        for i in range(self.workers):
            worker = scrape(self.metric_ports["reducer"] + i)
            reduced += metric(worker, "beamkin_frames_out_total", stage="reducer")
        row["reducer_out"] = reduced
        return row

    # -- outputs ------------------------------------------------------------------------------
    def write_csv(self, path: Path) -> None:
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["t_s", "stage", "pid", "rss_kb"])
            writer.writerows((f"{t:.1f}", stage, pid, kb) for t, stage, pid, kb in self.rss_rows)
        if self.metric_rows:
            with path.with_name(path.stem + "_metrics.csv").open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(self.metric_rows[0]))
                writer.writeheader()
                writer.writerows(self.metric_rows)

    def log_matching(self, *needles: str) -> list[str]:
        return [line for line in list(self.log_lines) if any(needle in line for needle in needles)]

    def stop_simulator(self) -> bool:
        """SIGINT to the simulator stage (it stops after the frame in hand and exits 0)."""
        for pid, stage in run_processes(self.marker).items():
            if stage == "simulate":
                os.kill(pid, signal.SIGINT)
                self.simulator_stopped = True
                return True
        return False

    def simulator_running(self) -> bool:
        return "simulate" in run_processes(self.marker).values()


def rss_by_stage(rows: list[tuple[float, str, int, int]], begin_s: float, end_s: float) -> dict[str, float]:
    """Mean RSS (MB) per stage over samples with begin_s <= t < end_s (a stage's processes summed
    per sample time)."""
    per_time: dict[tuple[str, float], int] = collections.defaultdict(int)
    for t, stage, _, kb in rows:
        if begin_s <= t < end_s:
            per_time[(stage, t)] += kb
    by_stage: dict[str, list[int]] = collections.defaultdict(list)
    for (stage, _), kb in per_time.items():
        by_stage[stage].append(kb)
    return {stage: float(np.mean(values)) / 1024 for stage, values in by_stage.items()}


def percentile_ms(values, q: float) -> float:
    values = [v for v in values if v == v]
    return 1e3 * float(np.percentile(values, q)) if values else float("nan")


def machine_line() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores {platform.machine()} {model}; load average {load}"


def soak(args: argparse.Namespace) -> int:
    out_dir = Path(tempfile.mkdtemp(prefix="beamkin-soak-"))
    duration_s = 60.0 * args.minutes
    if args.mode == "profile":
        frame_time = 1.0 / args.rate_hz
        frames_per_series = max(1, round(args.series_s / frame_time))
        # counts per profile scaled up so the noise on alpha is that of the defaults' 0.3 s profile
        # (at 10 ms and the default scale nearly every profile is flagged "no diffraction signal")
        simulator = {"mode": "profile", "frame_time_s": frame_time, "exposure_s": frame_time,
                     "n_frames": frames_per_series, "profile_folder": str(out_dir / "profiles"),
                     "profile_counts_scale": PROFILE_COUNTS_SCALE_0_3_S * 0.3 / frame_time}
    else:
        frame_time = 1.0 / args.rate_hz
        frames_per_series = args.series_frames
        simulator = {"frame_time_s": frame_time, "exposure_s": min(0.3, 0.9 * frame_time),
                     "n_frames": frames_per_series}
    series = max(1, math.ceil(duration_s / (frames_per_series * frame_time)))
    simulator.update(repeat=series, series_id=f"soak{args.mode}-{uuid.uuid4().hex[:6]}", speed=1.0)
    warmup_s = args.warmup_s if args.warmup_s is not None else max(120.0, 0.1 * duration_s)
    run = PipelineRun(simulator, workers=args.workers, out_dir=out_dir, sample_s=args.sample_s,
                      particles=args.particles)
    print(f"machine: {machine_line()}")
    print(f"soak {args.mode}: {series} series of {frames_per_series} frames at {args.rate_hz:g} Hz "
          f"({duration_s / 60:.1f} min planned), {args.workers} reducer worker(s), RSS every {args.sample_s:g} s",
          flush=True)
    run.start()
    deadline = time.monotonic() + duration_s + 300  # + start-up and a simulator slower than planned
    last_report = 0.0
    stopped_simulator = False
    first_sent = float("nan")
    last_progress, progress_s = None, 0.0   # (streamer in, inference out) and when they last changed
    try:
        while time.monotonic() < deadline:
            time.sleep(2)
            if run.process.poll() is not None:
                print(f"beamkin demo exited early with code {run.process.returncode}")
                break
            ends = run.observed.ends
            if len(ends) >= series:
                time.sleep(2)
                break
            if first_sent != first_sent:
                first_sent = first_log_time(run, "sent frame 1/")
            if (not stopped_simulator and first_sent == first_sent and run.elapsed() > first_sent + duration_s
                    and run.simulator_done_s != run.simulator_done_s):
                stopped_simulator = run.stop_simulator()
                print(f"  {duration_s / 60:.1f} min of sending are over and the simulator is behind its schedule: "
                      f"stopped it (SIGINT, it finishes the frame it is writing)", flush=True)
            done = run.simulator_done_s
            if done == done and run.elapsed() > done + 5:
                counts = run.metric_rows[-1] if run.metric_rows else {}
                sent_so_far = (sum(1 for _ in Path(simulator["profile_folder"]).glob("*.xye"))
                               if args.mode == "profile" else counts.get("streamer_in", -1))
                if counts.get("inference_out", -2) >= sent_so_far and counts.get("t_s", 0) > done + 5:
                    print(f"  the simulator finished and the inference released every frame sent "
                          f"({sent_so_far}); {len(ends)}/{series} series ended: stopping")
                    break
                progress = (counts.get("streamer_in"), counts.get("inference_out"))
                if progress != last_progress:
                    last_progress, progress_s = progress, run.elapsed()
                if run.elapsed() > progress_s + 30 or run.elapsed() > done + args.grace_s:
                    print(f"  the simulator finished {run.elapsed() - done:.0f} s ago and the counters moved last "
                          f"{run.elapsed() - progress_s:.0f} s ago; {len(ends)}/{series} series ended: stopping")
                    break
            if run.elapsed() - last_report >= 60:
                last_report = run.elapsed()
                counts = run.metric_rows[-1] if run.metric_rows else {}
                print(f"  {run.elapsed() / 60:5.1f} min: {len(ends)}/{series} series ended, "
                      f"{len(run.observed.estimates)} estimates, streamer in {counts.get('streamer_in')}, "
                      f"pending {counts.get('streamer_pending')}, exact lag {counts.get('exact_lag_frames')}",
                      flush=True)
        if run.simulator_running():
            print("the simulator was still sending when the run was stopped (deadline)")
        final_counts = run.scrape_counts()
    finally:
        code = run.stop()
    finished_s = run.elapsed()
    csv_path = Path(args.csv) if args.csv else out_dir / f"soak_{args.mode}_rss.csv"
    run.write_csv(csv_path)
    (out_dir / "demo.log").write_text("\n".join(run.log_lines) + "\n")
    report(run, args, simulator, series, frames_per_series, warmup_s, final_counts, finished_s, code, csv_path)
    if args.mode == "profile" and not args.keep_profiles:
        shutil.rmtree(out_dir / "profiles", ignore_errors=True)
    return 0


def first_log_time(run: PipelineRun, needle: str) -> float:
    """Seconds since launch of the first log line containing ``needle`` (nan if none)."""
    for line in list(run.log_lines):  # a copy: the output reader appends while we look
        if needle in line:
            return float(line.split(None, 1)[0])
    return float("nan")


def report(run: PipelineRun, args, simulator, series, frames_per_series, warmup_s, final_counts, finished_s,
           code, csv_path) -> None:
    seen = run.observed
    if args.mode == "profile":
        sent = sum(1 for _ in Path(simulator["profile_folder"]).glob("*.xye"))
        sent_how = "profile files written by the simulator"
    else:
        sent = int(final_counts.get("streamer_in") or 0)
        sent_how = (f"frames sent (simulator finished its {series} x {frames_per_series}; counted by the streamer)"
                    if not run.simulator_stopped else "frames received by the streamer; the simulator was stopped at "
                    "the end of the run, behind its schedule")
    first_sent = first_log_time(run, "sent frame 1/")
    load_end = run.simulator_done_s if run.simulator_done_s == run.simulator_done_s else finished_s
    send_rate = sent / max(1e-9, load_end - first_sent)
    ready = run.ready_s if run.ready_s == run.ready_s else 0.0
    warm = rss_by_stage(run.rss_rows, ready + warmup_s, ready + warmup_s + WINDOW_S)
    under_load = rss_by_stage(run.rss_rows, load_end - WINDOW_S, load_end)
    last_t = max((t for t, *_ in run.rss_rows), default=0.0)
    drained = rss_by_stage(run.rss_rows, last_t - 10.0, last_t + 1)
    print(f"\nran {finished_s / 60:.1f} min: all stages ready {run.ready_s:.1f} s after launch, first frame sent at "
          f"{first_sent:.0f} s, simulator finished at {load_end:.0f} s ({(load_end - first_sent) / 60:.1f} min of load), "
          f"stopped at {finished_s:.0f} s; demo exit code {code}")
    print(f"RSS samples: {csv_path} (every {args.sample_s:g} s); counters over time: "
          f"{csv_path.with_name(csv_path.stem + '_metrics.csv')}")
    print(f"RSS per stage, MB: warm-up = mean over {ready + warmup_s:.0f}..{ready + warmup_s + WINDOW_S:.0f} s, "
          f"end = mean over the last {WINDOW_S:.0f} s of load; after = the last sample, after the drain")
    worst, worst_stage = -math.inf, ""
    for stage in sorted(under_load):
        if stage == "simulate":
            continue
        before, after = warm.get(stage, float("nan")), under_load[stage]
        growth = 100.0 * (after - before) / before if before == before else float("nan")
        if growth == growth and growth > worst:
            worst, worst_stage = growth, stage
        peak = max(kb for _, s, _, kb in run.rss_rows if s == stage) / 1024
        print(f"  {stage:20s} warm-up {before:7.1f}  end {after:7.1f}  growth {growth:+6.1f} %   peak {peak:7.1f}  "
              f"after {drained.get(stage, float('nan')):7.1f}")
    stages = [s for s in under_load if s not in ("simulate", "demo")]
    total_before = sum(warm.get(s, 0.0) for s in stages)
    total_after = sum(under_load[s] for s in stages)
    print(f"  {'stages (not demo)':20s} warm-up {total_before:7.1f}  end {total_after:7.1f}  "
          f"growth {100 * (total_after - total_before) / total_before:+6.1f} %")
    cpu_by_stage: dict[str, float] = collections.defaultdict(float)
    for (stage, _), (_, used) in run.cpu_last.items():
        cpu_by_stage[stage] += used
    print("CPU used per stage over the run, s (ms per frame sent): " + ", ".join(
        f"{stage} {used:.0f} ({1e3 * used / max(sent, 1):.1f})" for stage, used in sorted(cpu_by_stage.items())))
    assimilated = len(seen.estimates)
    flagged = int(final_counts.get("inference_flagged") or 0)
    dropped = int(final_counts.get("inference_dropped") or 0)
    print(f"frames: sent {sent} ({sent_how}) at {send_rate:.1f} Hz achieved ({args.rate_hz:g} Hz planned, ratio "
          f"{send_rate / args.rate_hz:.2f}); streamer received {final_counts['streamer_in']:.0f}; reducer(s) reduced "
          f"{final_counts['reducer_out']:.0f}; inference received {final_counts['inference_in']:.0f}, released "
          f"{final_counts['inference_out']:.0f}, flagged {flagged} (no usable phase fraction), dropped {dropped}")
    print(f"  assimilated: {assimilated} distinct (series, frame) with an estimate on the inference's PUB socket "
          f"(+ {flagged} flagged = {assimilated + flagged})")
    reasons = collections.Counter(str(e["reason"]) for e in seen.ends.values())
    print(f"series: {len(seen.ends)}/{series} ended {dict(reasons)}, {len(seen.results)} results; "
          f"{len(seen.posterior_latencies)} exact posteriors; exact-sampler lag at the end "
          f"{final_counts.get('exact_lag_frames')} frames")
    lost = sent - assimilated - flagged
    latencies = list(seen.estimates.values())
    p50, p99 = percentile_ms(latencies, 50), percentile_ms(latencies, 99)
    print(f"end-to-end latency (streamer receipt -> estimate published), {len(latencies)} frames: p50 {p50:.1f} ms, "
          f"p99 {p99:.1f} ms  [targets 50 / 150 ms at 3 Hz: ratio {p50 / LATENCY_TARGETS_MS[50]:.2f} / "
          f"{p99 / LATENCY_TARGETS_MS[99]:.2f}]")
    print(f"exact posterior latency (streamer receipt -> exact posterior), {len(seen.posterior_latencies)} posteriors: "
          f"p50 {percentile_ms(seen.posterior_latencies, 50):.0f} ms, p99 {percentile_ms(seen.posterior_latencies, 99):.0f} ms")
    print(f"VERDICT memory: largest stage growth after warm-up {worst:+.1f} % ({worst_stage}; target < "
          f"{MEMORY_GROWTH_TARGET_PCT:.0f} %, ratio {worst / MEMORY_GROWTH_TARGET_PCT:.2f}) -> "
          f"{'PASS' if worst < MEMORY_GROWTH_TARGET_PCT else 'FAIL'}")
    print(f"VERDICT frames: {lost} lost of {sent} sent (neither an estimate nor flagged; target 0) -> "
          f"{'PASS' if lost == 0 else 'FAIL'}")
    warnings = [line for line in run.log_matching("WARNING", "ERROR") if "flagged frame" not in line]
    if warnings:
        print(f"{len(warnings)} WARNING/ERROR log lines (flagged frames not counted); first ones:")
        for line in warnings[:8]:
            print("  " + line[:240])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("profile", "demo2d"), required=True)
    parser.add_argument("--minutes", type=float, help="run length (default 10 for profile, 30 for demo2d)")
    parser.add_argument("--rate-hz", type=float, help="frame rate (default 100 for profile, 3 for demo2d)")
    parser.add_argument("--series-s", type=float, default=30.0, help="profile mode: length of each series, s")
    parser.add_argument("--series-frames", type=int, default=36, help="demo2d: frames per series")
    parser.add_argument("--workers", type=int, default=1, help="reducer workers")
    parser.add_argument("--particles", type=int, help="inference particles per model (default: defaults.toml)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period, s")
    parser.add_argument("--warmup-s", type=float, help="warm-up, s after all stages are ready (default max(120, 10 %%))")
    parser.add_argument("--grace-s", type=float, default=300.0,
                        help="after the simulator finished, wait at most this long for the pipeline to drain, s "
                             "(it stops earlier once every frame is through or nothing moved for 30 s)")
    parser.add_argument("--csv", help="RSS samples CSV (default: in the run's temporary folder)")
    parser.add_argument("--keep-profiles", action="store_true", help="keep the profile files of profile mode")
    args = parser.parse_args()
    if args.minutes is None:
        args.minutes = 10.0 if args.mode == "profile" else 30.0
    if args.rate_hz is None:
        args.rate_hz = 100.0 if args.mode == "profile" else 3.0
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
