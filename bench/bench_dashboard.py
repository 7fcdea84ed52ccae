"""What the scientist sees, and when: dashboard latency in headless Chromium with the pipeline running.

Runs `beamkin demo --once --speed 1` (simulated EIGER, streamer, reducer, inference and the
dashboard, every stage its own process: 36 frames at 3 Hz) on free loopback ports, subscribes to
the inference's PUB socket to note when each message was published (seconds since the epoch),
and watches the page in headless Debian Chromium (Playwright). In the page, every animation frame
notes when it first holds each exact posterior (a new row of ``onset_history``), when the "now"
panel first shows each frame, and when the alert banner becomes visible (the watcher of
tests/test_dashboard_browser.py). Printed:

* page latency, publication -> on the page: p50 / p95 / max over the exact posteriors, and over
  the frames of the "now" panel (estimate or exact posterior of that frame or a later one);
  stale estimates are counted apart: they are not shown as posteriors (the page keeps the
  newest exact posterior, labelled), so they have no latency of their own;
* alert-banner latency: alert published -> banner visible;
* CPU of the dashboard server process per frame (ms of CPU per published frame, and % of one
  core over the series), of Chromium (all its processes), and of the fake detector per frame
  against the 333 ms frame period.

Baseline, measured in the same run: a second demo run whose browser watches the smallest Bokeh
page that shows each posterior's frame number (one streamed source, one line plot, the banner),
served by the same receiver thread and refresh rate (``max_refresh_hz``) from its own process.
The ratios (dashboard / baseline) say what the full page costs over the floor of Bokeh's
server -> browser path on the same loaded machine.

Targets (docs/design.md section 6): each posterior on the page within 1 s (p95) at 3 Hz, the
alert banner within 1 s.
Usage: python bench/bench_dashboard.py [--particles 4096] [--refresh-hz 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from beamkin import protocol  # noqa: E402
from beamkin.loopback import LoopbackPorts, beamkin_process, results_listener  # noqa: E402
from tests.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, JS_WATCH  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------- processes
def _stage_pids(demo_pid: int, stage: str) -> list[int]:
    """The processes of one stage of a `beamkin demo` (started as `... beamkin STAGE ...`)."""
    return [pid for pid in _descendants(demo_pid) if f"beamkin {stage}" in _cmdline(pid)]


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                continue
    out, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        out += children
        frontier += children
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the given processes (those still alive)."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError):
            continue
    return total / CLOCK_TICKS


# ---------------------------------------------------------------------------------- baseline page
def serve_baseline(endpoint: str, port: int, refresh_hz: float) -> None:
    """The floor: the same receiver thread and refresh rate, a page showing only each
    posterior's frame number (model_probabilities), the exact posteriors' frame numbers
    (onset_history, one line plot) and the alert banner."""
    from bokeh.application import Application
    from bokeh.application.handlers.function import FunctionHandler
    from bokeh.models import ColumnDataSource, Div
    from bokeh.layouts import column
    from bokeh.plotting import figure
    from bokeh.server.server import Server
    from tornado.ioloop import IOLoop

    from dashboards.server import MessageReceiver
    from dashboards.state import DashboardState

    state = DashboardState()
    MessageReceiver(endpoint, state).start()

    def make_document(doc) -> None:
        now = ColumnDataSource({"frame_index": []}, name="model_probabilities")
        history = ColumnDataSource({"frame_index": [], "time_s": [], "onset_probability": []}, name="onset_history")
        banner = Div(text="alert", name="alert_banner", visible=False)
        fig = figure(height=250, sizing_mode="stretch_width")
        fig.line("time_s", "onset_probability", source=history)
        fig.scatter("frame_index", "frame_index", source=now, visible=False)  # keeps `now` in the document
        seen = {"history": 0, "series": None, "posterior": -1}

        def refresh() -> None:
            with state.lock:
                series = state.get(state.latest_series_id()) if state.latest_series_id() else None
                if series is None:
                    return
                rows = None
                if series.history.total != seen["history"]:
                    rows, seen["history"] = series.history.rows_since(seen["history"])
                shown, _ = series.now_posterior()
                alert = series.alert is not None
            if rows is not None:
                history.stream({k: rows[k] for k in ("frame_index", "time_s", "onset_probability")})
            if shown is not None and shown["frame_index"] != seen["posterior"]:
                seen["posterior"] = shown["frame_index"]
                now.data = {"frame_index": [shown["frame_index"]]}
            if alert and not banner.visible:
                banner.visible = True

        doc.add_root(column(banner, fig, sizing_mode="stretch_width"))
        doc.add_periodic_callback(refresh, max(int(1000 / refresh_hz), 20))

    server = Server({"/": Application(FunctionHandler(make_document))}, io_loop=IOLoop.current(),
                    address="127.0.0.1", port=port, allow_websocket_origin=[f"127.0.0.1:{port}"])
    server.start()
    IOLoop.current().start()


# ---------------------------------------------------------------------------------- one run
def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def watched_run(particles: int, refresh_hz: float, baseline: bool) -> dict:
    """One demo run at 3 Hz with a browser on the dashboard (or on the baseline page)."""
    from playwright.sync_api import sync_playwright

    ports = LoopbackPorts.free()
    context = zmq.Context()
    listener = results_listener(context, ports)
    demo = beamkin_process("demo", "--once", "--speed", "1", *ports.options(), "--inference.particles", str(particles),
                           "--dashboard.max_refresh_hz", str(refresh_hz))
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(demo.stdout), daemon=True).start()
    server = None
    url = f"http://127.0.0.1:{ports.dashboard}/"
    if baseline:
        baseline_port = LoopbackPorts.free().dashboard
        server = beamkin_baseline_process(f"tcp://127.0.0.1:{ports.results}", baseline_port, refresh_hz)
        url = f"http://127.0.0.1:{baseline_port}/"
    published: dict[str, dict[int, float]] = {"posterior": {}, "now": {}}
    alert_at = None
    stale = 0
    skipped = 0
    try:
        _wait_http(url, 120)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1500})
            page.goto(url)
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && "
                                   "Bokeh.documents[0].get_model_by_name('onset_history') !== null", timeout=60000)
            page.evaluate(JS_WATCH)
            watching_since = time.time()  # what was published before the page watched is not counted
            chromium = [pid for pid in _descendants(os.getpid()) if "chrom" in _cmdline(pid)]
            dashboard_pids = _stage_pids(demo.pid, "dashboard")
            simulator_pids = _stage_pids(demo.pid, "simulate")
            if server is not None:
                dashboard_pids = [server.pid]
            cpu_start = {"dashboard": None, "chromium": None, "simulator": None}
            first_frame = last_frame = None
            frames = 0
            while demo.poll() is None:
                if not listener.poll(50):
                    page.wait_for_timeout(1)  # let Playwright's event loop run
                    continue
                message = protocol.decode(listener.recv_multipart())
                now = time.time()
                if now < watching_since:
                    skipped += 1
                    continue
                if message.type == "fraction":
                    if cpu_start["dashboard"] is None:
                        simulator_pids = simulator_pids or _stage_pids(demo.pid, "simulate")
                        cpu_start = {"dashboard": cpu_seconds(dashboard_pids), "chromium": cpu_seconds(chromium),
                                     "simulator": cpu_seconds(simulator_pids)}
                        first_frame = time.monotonic()
                    frames += 1
                    last_frame = time.monotonic()
                    cpu_end = {"dashboard": cpu_seconds(dashboard_pids), "chromium": cpu_seconds(chromium),
                               "simulator": cpu_seconds(simulator_pids)}
                elif message.type in ("posterior", "estimate"):
                    if message.fields.get("stale"):
                        stale += 1  # not to be shown as a posterior: its frame waits for an exact one
                    else:
                        published["now"].setdefault(message.frame_index, now)
                    if message.type == "posterior":
                        published["posterior"][message.frame_index] = now
                elif message.type == "alert" and alert_at is None:
                    alert_at = now
            page.wait_for_timeout(3000)  # what is published last reaches the page
            seen = page.evaluate("() => window.beamkinSeen")
            browser.close()
    finally:
        if demo.poll() is None:
            demo.kill()
        if server is not None:
            server.kill()
            server.wait()
        listener.close(0)
        context.term()
    if demo.returncode != 0:
        raise RuntimeError("demo failed:\n" + "".join(output[-40:]))
    exact = [seen["exact"][str(f)] / 1000.0 - t for f, t in published["posterior"].items() if str(f) in seen["exact"]]
    now_latency = []
    for frame, sent in published["now"].items():
        shown = [t / 1000.0 for f, t in seen["now"].items() if int(f) >= frame and t / 1000.0 >= sent - 1e-3]
        if shown:
            now_latency.append(min(shown) - sent)
    span = max((last_frame or 0) - (first_frame or 0), 1e-9)
    return {
        "exact": np.array(exact), "now": np.array(now_latency),
        "exact_missed": len(published["posterior"]) - len(exact), "now_missed": len(published["now"]) - len(now_latency),
        "banner": None if seen["banner"] is None or alert_at is None else seen["banner"] / 1000.0 - alert_at,
        "frames": frames, "span_s": span, "stale": stale, "skipped": skipped, "alert_published": alert_at is not None,
        "cpu": {k: cpu_end[k] - cpu_start[k] for k in cpu_start} if frames else {},
    }


def beamkin_baseline_process(endpoint: str, port: int, refresh_hz: float):
    import subprocess
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / "bench_dashboard_baseline.log", "w")
    return subprocess.Popen([sys.executable, __file__, "--serve-baseline", endpoint, str(port), str(refresh_hz)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _describe(name: str, values: np.ndarray) -> str:
    if values.size == 0:
        return f"{name}: nothing shown"
    return (f"{name}: n {values.size}, p50 {np.percentile(values, 50):.3f} s, p95 {np.percentile(values, 95):.3f} s, "
            f"max {values.max():.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--particles", type=int, default=4096)
    parser.add_argument("--refresh-hz", type=float, default=5.0)
    parser.add_argument("--serve-baseline", nargs=3, metavar=("ENDPOINT", "PORT", "HZ"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.serve_baseline:
        endpoint, port, hz = args.serve_baseline
        serve_baseline(endpoint, int(port), float(hz))
        return
    if not Path(CHROMIUM).exists():
        raise SystemExit("Debian chromium missing: run `make browser`")
    print(f"bench_dashboard: {platform.node()}, {os.cpu_count()} cores, demo at 3 Hz, {args.particles} particles, "
          f"max_refresh_hz {args.refresh_hz:g}")
    runs = {"dashboard": watched_run(args.particles, args.refresh_hz, baseline=False),
            "baseline": watched_run(args.particles, args.refresh_hz, baseline=True)}
    figures = {}
    for name, run in runs.items():
        print(f"\n{name} page")
        if run["skipped"]:
            print(f"  ({run['skipped']} messages published before the page was watching are not counted)")
        print("  " + _describe("exact posterior -> page", run["exact"]) + f" ({run['exact_missed']} never shown)")
        print("  " + _describe("'now' panel per frame", run["now"])
              + f" ({run['now_missed']} never shown; {run['stale']} stale estimates not counted)")
        banner = run["banner"]
        if run["alert_published"]:
            print(f"  alert banner: {'not shown' if banner is None else f'{banner:.3f} s after the alert'}")
        else:
            print("  alert banner: no alert was published in this run")
        cpu, frames = run["cpu"], max(run["frames"], 1)
        if cpu:
            print(f"  dashboard server CPU {1e3 * cpu['dashboard'] / frames:.1f} ms per frame "
                  f"({100 * cpu['dashboard'] / run['span_s']:.0f} % of a core); Chromium "
                  f"{1e3 * cpu['chromium'] / frames:.1f} ms per frame ({100 * cpu['chromium'] / run['span_s']:.0f} %); "
                  f"fake detector {1e3 * cpu['simulator'] / frames:.1f} ms per frame of 333 ms")
        figures[name] = {
            "exact_p95_s": float(np.percentile(run["exact"], 95)) if run["exact"].size else None,
            "now_p95_s": float(np.percentile(run["now"], 95)) if run["now"].size else None,
            "banner_s": banner, "cpu_ms_per_frame": {k: 1e3 * v / frames for k, v in cpu.items()},
        }
    d, b = figures["dashboard"], figures["baseline"]
    print("\nratios dashboard / baseline (same run):")
    for key in ("exact_p95_s", "now_p95_s", "banner_s"):
        if d[key] is not None and b[key]:
            print(f"  {key}: {d[key] / b[key]:.2f}")
    if d["cpu_ms_per_frame"].get("dashboard") and b["cpu_ms_per_frame"].get("dashboard"):
        print(f"  dashboard server CPU per frame: {d['cpu_ms_per_frame']['dashboard'] / b['cpu_ms_per_frame']['dashboard']:.2f}")
    print("targets: p95 < 1 s per posterior, banner < 1 s after the alert (docs/design.md section 6)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
