"""The live dashboard in a real headless browser while a simulated run's messages arrive.

Chromium from Debian (/usr/bin/chromium, `make browser`) driven by Playwright. The messages are
those the inference stage published during a real `beamkin demo` run (tests/conftest.py): the
paper-like F1 series of docs/design.md section 7 (t0 = 7.4461 s, k = 0.6192 1/s, frames every 1/3 s
for 12 s). The test publishes them in bursts so it can check the page after each burst.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import zmq

from beamkin import protocol
from dashboards.server import _free_port, serve_dashboard
from tests.conftest import GAS_TIME_S, N_FRAMES, TRUE_T0_S

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parent.parent

JS_COLUMN = """([name, column]) => {
  const doc = Bokeh.documents[0];
  if (!doc) return null;
  const model = doc.get_model_by_name(name);
  if (!model) return null;
  const data = model.data;
  const values = data instanceof Map ? data.get(column) : data[column];
  if (!values) return null;
  return Array.from(values, (v) => (v !== null && typeof v === 'object') ? (v.shape ? Array.from(v.shape) : v.length) : v);
}"""


def column(page, name: str, col: str):
    return page.evaluate(JS_COLUMN, [name, col])


def model_attr(page, name: str, attr: str):
    return page.evaluate("([n, a]) => { const d = Bokeh.documents[0]; const m = d && d.get_model_by_name(n);"
                         " return m ? m[a] : null; }", [name, attr])


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture()
def publisher():
    context = zmq.Context.instance()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:0")
    yield pub, pub.getsockopt(zmq.LAST_ENDPOINT).decode()
    pub.close(linger=0)


@pytest.fixture()
def dashboard(publisher):
    _, endpoint = publisher
    port = _free_port("127.0.0.1")
    stop = threading.Event()
    thread = threading.Thread(target=serve_dashboard, args=(endpoint,),
                              kwargs=dict(address="127.0.0.1", port=port, max_refresh_hz=5.0,
                                          alert_threshold=0.99, stop_event=stop), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/"

    def up():
        try:
            # (each request builds a whole session: on a loaded machine that takes seconds, and a
            # probe given up early would only leave the server building sessions nobody reads)
            with urllib.request.urlopen(url, timeout=20) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_for(up, 30, "the dashboard HTTP server")
        yield url
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive(), "serve_dashboard did not return after stop_event was set"


#: Installed in the page: every animation frame, note (Date.now(), milliseconds) when the page
#: first holds each exact posterior (a new row of onset_history), when the "now" panel first shows
#: each frame, and when the alert banner becomes visible.
JS_WATCH = """() => {
  const doc = Bokeh.documents[0];
  const history = doc.get_model_by_name('onset_history');
  const models = doc.get_model_by_name('model_probabilities');
  const banner = doc.get_model_by_name('alert_banner');
  const col = (src, name) => { const d = src.data; return d instanceof Map ? d.get(name) : d[name]; };
  window.beamkinSeen = {exact: {}, now: {}, banner: null, ticks: 0};
  let nHistory = 0, nowMax = -1;
  const tick = () => {
    const seen = window.beamkinSeen, t = Date.now();
    seen.ticks += 1;
    const frames = col(history, 'frame_index') || [];
    if (frames.length < nHistory) nHistory = 0;
    for (; nHistory < frames.length; nHistory++) {
      const f = frames[nHistory];
      if (!(f in seen.exact)) seen.exact[f] = t;
    }
    const shown = col(models, 'frame_index') || [];
    if (shown.length && shown[0] > nowMax) {
      for (let f = nowMax + 1; f <= shown[0]; f++) if (!(f in seen.now)) seen.now[f] = t;
      nowMax = shown[0];
    }
    if (seen.banner === null && banner.visible) seen.banner = t;
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
}"""


def watch_page(page) -> None:
    page.evaluate(JS_WATCH)


def page_latencies(page, published: dict[str, dict[int, float]], alert_published_s: float | None) -> dict:
    """Seconds from publication to the page showing it: exact posteriors (history row), the
    "now" panel per frame (estimate or exact posterior of that frame or a later one), the banner."""
    seen = page.evaluate("() => window.beamkinSeen")
    exact = {int(f): t / 1000.0 - published["posterior"][int(f)] for f, t in seen["exact"].items()
             if int(f) in published["posterior"]}
    now = {}
    for frame, sent in published["now"].items():
        shown = [t / 1000.0 for f, t in seen["now"].items() if int(f) >= frame]
        if shown:
            now[frame] = min(t for t in shown if t >= sent - 1e-3) - sent if any(t >= sent - 1e-3 for t in shown) else None
    banner = None if seen["banner"] is None or alert_published_s is None else seen["banner"] / 1000.0 - alert_published_s
    return {"exact": exact, "now": now, "banner": banner, "ticks": seen["ticks"]}


def test_dashboard_grows_and_alerts_in_browser(publisher, dashboard, pipeline_messages):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian chromium missing: `make test` installs it (make browser)"
    pub, _ = publisher
    messages = pipeline_messages
    series_id = next(m.series_id for m in messages if m.type == "start")
    alert = next(m for m in messages if m.type == "alert")
    published_alpha = [m["alpha"] for m in messages if m.type == "fraction"]
    n_frames = len(published_alpha)
    n_posteriors = sum(m.type == "posterior" for m in messages)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1500})
            errors: list[str] = []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(dashboard)
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && "
                                   "Bokeh.documents[0].get_model_by_name('alpha_points') !== null", timeout=30000)

            # the SUB socket joins asynchronously: ping with status messages until the page shows one
            ping = protocol.make("status", stage="inference", series_id=None,
                                 counters={"frames_received": 0, "frames_missing": 0, "frame_rate_hz": 0.0, "lag_s": 0.0})

            def subscribed():
                protocol.send(pub, ping)
                return "inference" in (model_attr(page, "health", "text") or "")

            wait_for(subscribed, 20, "the dashboard to receive a status message", poll_s=0.2)
            watch_page(page)

            # publish the series in four bursts (at 50 frames/s); after each burst the page must show
            # exactly the frames and exact posteriors sent so far (the exact posteriors lag the
            # frames near the onset): the plots grow as frames arrive
            bursts = _split_after_frames(messages, [9, 18, 27])
            published: dict[str, dict[int, float]] = {"posterior": {}, "now": {}}
            alert_published = []
            shown = []
            for i, burst in enumerate(bursts):
                _publish(pub, burst, 50.0, published, alert_published)
                sent = [m for b in bursts[: i + 1] for m in b]
                expected = sum(m.type == "fraction" for m in sent)
                posteriors = sum(m.type == "posterior" for m in sent)
                wait_for(lambda: [len(column(page, name, "time_s") or []) for name in ("alpha_points", "onset_history")]
                         == [expected, posteriors], 20, f"{expected} alpha points and {posteriors} posteriors")
                shown.append((expected, posteriors))
            assert shown[-1] == (n_frames, n_posteriors) and n_frames == N_FRAMES
            assert [p for _, p in shown] == sorted(p for _, p in shown)  # the history only grows
            assert column(page, "alpha_points", "alpha") == pytest.approx(published_alpha, abs=1e-12)

            # heat map: a fixed-size image (row capacity) whose first rows hold the frames; pattern thinned
            wait_for(lambda: (column(page, "heatmap", "image") or [[0]])[0][0] >= n_frames, 10, "heat map rows")
            assert 0 < len(column(page, "pattern_latest", "radial")) <= 1500

            # alert banner: visible, with the numbers of the alert as raised (after the true onset)
            wait_for(lambda: model_attr(page, "alert_banner", "visible"), 10, "the alert banner")
            banner = page.locator(".beamkin-alert")
            assert banner.is_visible()
            text = model_attr(page, "alert_banner", "text")
            t0 = alert["t0"]
            assert f"t0 = {t0['mean']:.3f} s" in text and "Alert as raised" in text and "<b>Now</b>" in text
            assert f"{t0['q05']:.3f} – {t0['q95']:.3f} s" in text
            assert TRUE_T0_S < alert["time_s"] and t0["q05"] < t0["mean"] < t0["q95"]

            # every published posterior reached the page, in order, and the banner after the alert:
            # the latencies are recorded (bench/bench_dashboard.py states the figures), not asserted
            wait_for(lambda: len(page.evaluate("() => window.beamkinSeen.exact")) >= n_posteriors, 10,
                     "every exact posterior in the page's record")
            latencies = page_latencies(page, published, alert_published[0] if alert_published else None)
            assert latencies["ticks"] > 0
            assert sorted(latencies["exact"]) == sorted(published["posterior"])
            assert all(v is not None for v in latencies["now"].values()) and len(latencies["now"]) == n_frames
            assert latencies["banner"] is not None and latencies["banner"] > 0
            assert all(v > 0 for v in latencies["exact"].values())

            # final posterior: F1 leads, the t0 histogram peaks within 0.1 s of the true onset
            wait_for(lambda: (column(page, "model_probabilities", "model") or [None])[0] == "F1", 10, "F1 leading")
            density = column(page, "t0_histogram", "top")
            left, right = column(page, "t0_histogram", "left"), column(page, "t0_histogram", "right")
            peak = max(range(len(density)), key=density.__getitem__)
            assert abs(0.5 * (left[peak] + right[peak]) - TRUE_T0_S) < 0.1
            onset = column(page, "onset_history", "onset_probability")
            before_gas = sum(m["time_s"] < GAS_TIME_S for m in messages if m.type == "posterior")
            assert len(onset) == n_posteriors and max(onset[:before_gas]) < 0.01 and onset[-1] > 0.99
            # k of the leading model only, on a log axis: its density per log10 k peaks near the truth
            k_top = column(page, "k_histogram", "top")
            k_left, k_right = column(page, "k_histogram", "left"), column(page, "k_histogram", "right")
            k_peak = max(range(len(k_top)), key=k_top.__getitem__)
            assert k_left[k_peak] * 0.8 < 0.6192 < k_right[k_peak] * 1.25

            # a second browser that joins late, 1000 px wide, sees the whole series and every panel
            late = browser.new_page(viewport={"width": 1000, "height": 800})
            late.goto(dashboard)
            late.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=30000)
            wait_for(lambda: len(column(late, "alpha_points", "time_s") or []) == n_frames, 10, "late session data")
            assert series_id in model_attr(late, "series_select", "options")
            width = late.evaluate("() => document.documentElement.scrollWidth")
            assert width <= 1000, f"the page is {width} px wide in a 1000 px window"
            late.close()

            page.wait_for_timeout(1200)  # let the final heat map and histograms render
            artifacts = ROOT / "test-artifacts"
            artifacts.mkdir(exist_ok=True)
            page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)
            (artifacts / "dashboard_latency.json").write_text(json.dumps(
                {"exact_s": latencies["exact"], "now_s": latencies["now"], "banner_s": latencies["banner"]}, indent=1))
            severe = [e for e in errors if "favicon" not in e]
            assert not severe, f"browser console errors: {severe}"
        finally:
            browser.close()


def _split_after_frames(messages, frame_counts):
    """Split the message list after the posterior of each frame count in ``frame_counts``."""
    bursts, current, done = [], [], 0
    for message in messages:
        current.append(message)
        if message.type == "posterior":
            done += 1
            if done in frame_counts:
                bursts.append(current)
                current = []
    bursts.append(current)
    return bursts


def _publish(pub, messages, frame_rate_hz: float, published: dict | None = None,
             alert_published: list | None = None) -> None:
    """Send ``messages``, pausing 1/frame_rate_hz after each frame's fraction; note when each
    posterior (exact: ``published["posterior"]``; any kind: ``published["now"]``, per frame)
    and the alert (``alert_published``) left, in seconds since the epoch (the page's clock)."""
    for message in messages:
        protocol.send(pub, message)
        now = time.time()
        if published is not None and message.type in ("posterior", "estimate"):
            published["now"].setdefault(message.frame_index, now)
            if message.type == "posterior":
                published["posterior"][message.frame_index] = now
        if alert_published is not None and message.type == "alert":
            alert_published.append(now)
        if message.type == "fraction":
            time.sleep(1.0 / frame_rate_hz)
