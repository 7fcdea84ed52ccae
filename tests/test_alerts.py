"""Alert sinks: webhook (once per series, retried with backoff), command, ZeroMQ PUB, log."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import zmq

from beamkin import protocol
from sinks.alerts import AlertConfigError, AlertDispatcher


def make_alert(series_id: str = "s1", t0_mean: float = 7.4461) -> dict:
    return {
        "series_id": series_id, "frame_index": 23, "time_s": 7.8333,
        "t0": {"mean": t0_mean, "q05": t0_mean - 0.05, "q95": t0_mean + 0.05},
        "t0_minus_ts": t0_mean - 7.0, "leading_model": "F1", "leading_probability": 0.93,
        "onset_probability": 0.995,
    }


class Receiver:
    """A local HTTP endpoint recording JSON POST bodies; answers 500 to the first ``fail_first``."""

    def __init__(self, fail_first: int = 0, fail_always: bool = False) -> None:
        self.bodies: list[dict] = []
        self.statuses: list[int] = []
        self.release_first = threading.Event()
        self.release_first.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not receiver.statuses:
                    receiver.release_first.wait(10)
                failing = fail_always or len(receiver.statuses) < fail_first
                status = 500 if failing else 200
                receiver.bodies.append(body)
                receiver.statuses.append(status)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver_factory():
    made = []

    def make(**kwargs):
        receiver = Receiver(**kwargs)
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.close()


def test_webhook_once_per_series_with_retry_after_500(receiver_factory):
    receiver = receiver_factory(fail_first=1)
    receiver.release_first.clear()  # hold the first request: dispatch must not wait for it
    dispatcher = AlertDispatcher({"log": False, "webhook": {"url": receiver.url, "timeout_s": 5, "retries": 3,
                                                             "backoff_s": 0.05}})
    try:
        assert dispatcher.dispatch(make_alert("s1")) is True
        assert dispatcher.dispatch(make_alert("s1", t0_mean=9.0)) is False  # same series: no second alert
        assert dispatcher.dispatch(make_alert("s2", t0_mean=5.5)) is True
        assert receiver.statuses == []  # both dispatches returned while the webhook was still blocked
        receiver.release_first.set()
    finally:
        dispatcher.close(timeout=10)
    assert receiver.statuses == [500, 200, 200]
    assert [b["series_id"] for b in receiver.bodies] == ["s1", "s1", "s2"]
    assert receiver.bodies[1] == make_alert("s1")
    assert receiver.bodies[2]["t0"] == {"mean": 5.5, "q05": 5.45, "q95": 5.55}
    webhook = dispatcher.sinks[0]
    assert (webhook.attempts, webhook.delivered, webhook.failed) == (3, 2, 0)


def test_webhook_gives_up_after_retries(receiver_factory):
    receiver = receiver_factory(fail_always=True)
    dispatcher = AlertDispatcher({"log": False, "webhook": [{"url": receiver.url, "retries": 2, "backoff_s": 0.01}]})
    dispatcher.dispatch(make_alert("s1"))
    dispatcher.close(timeout=10)
    assert receiver.statuses == [500, 500, 500]
    assert (dispatcher.sinks[0].delivered, dispatcher.sinks[0].failed) == (0, 1)


def test_command_gets_alert_as_json_and_environment(tmp_path):
    out = tmp_path / "alert.json"
    script = ("import json, os, sys; alert = json.load(sys.stdin); "
              f"json.dump({{'stdin': alert, 'series': os.environ['BEAMKIN_ALERT_SERIES_ID'], "
              f"'t0': float(os.environ['BEAMKIN_ALERT_T0_MEAN_S']), 'q95': float(os.environ['BEAMKIN_ALERT_T0_Q95_S']), "
              f"'model': os.environ['BEAMKIN_ALERT_LEADING_MODEL']}}, open({str(out)!r}, 'w'))")
    dispatcher = AlertDispatcher({"command": {"argv": [sys.executable, "-c", script], "timeout_s": 30}})
    dispatcher.dispatch(make_alert("run-7"))
    dispatcher.close(timeout=30)
    written = json.loads(out.read_text())
    assert written == {"stdin": make_alert("run-7"), "series": "run-7", "t0": 7.4461, "q95": 7.4461 + 0.05,
                       "model": "F1"}


def test_zmq_sink_publishes_protocol_alert():
    context = zmq.Context.instance()
    dispatcher = AlertDispatcher({"log": False, "zmq": {"endpoint": "tcp://127.0.0.1:*"}})
    sink = dispatcher.sinks[0]
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"alert")
    try:
        assert sink.ready.wait(10) and sink.bound_endpoint.startswith("tcp://127.0.0.1:")
        sub.connect(sink.bound_endpoint)
        received = None
        for attempt in range(50):  # PUB drops until the subscription arrives: new series each try
            dispatcher.dispatch(make_alert(f"s{attempt}"))
            if sub.poll(200):
                _, received = protocol.recv(sub)
                break
        assert received is not None and received.type == "alert"
        assert received["t0"] == make_alert()["t0"] and received["leading_model"] == "F1"
    finally:
        sub.close(linger=0)
        dispatcher.close(timeout=5)


def test_sink_that_cannot_start_counts_failures_and_others_still_deliver(receiver_factory):
    receiver = receiver_factory()
    blocker = zmq.Context.instance().socket(zmq.PUB)
    blocker.bind("tcp://127.0.0.1:*")
    taken = blocker.getsockopt(zmq.LAST_ENDPOINT).decode()
    try:
        dispatcher = AlertDispatcher({"log": False, "zmq": {"endpoint": taken}, "webhook": receiver.url})
        dispatcher.dispatch(make_alert("busy"))
        dispatcher.close(timeout=10)
    finally:
        blocker.close(linger=0)
    zmq_sink, webhook = dispatcher.sinks
    assert (zmq_sink.delivered, zmq_sink.failed) == (0, 1)
    assert (webhook.delivered, [b["series_id"] for b in receiver.bodies]) == (1, ["busy"])


def test_shorthand_configuration(receiver_factory):
    receiver = receiver_factory()
    dispatcher = AlertDispatcher({"log": False, "webhook": receiver.url,
                                  "command": f"{sys.executable} -c 'import sys; sys.stdin.read()'"})
    assert [type(s).__name__ for s in dispatcher.sinks] == ["WebhookSink", "CommandSink"]
    assert dispatcher.sinks[1].argv == [sys.executable, "-c", "import sys; sys.stdin.read()"]
    dispatcher.dispatch(make_alert("short"))
    dispatcher.close(timeout=30)
    assert [b["series_id"] for b in receiver.bodies] == ["short"]
    assert (dispatcher.sinks[1].delivered, dispatcher.sinks[1].failed) == (1, 0)


def test_bad_configuration_and_bad_alerts_are_named():
    with pytest.raises(AlertConfigError, match="webhook.url"):
        AlertDispatcher({"webhook": {"url": "ftp://x"}})
    with pytest.raises(AlertConfigError, match="unknown alerts setting"):
        AlertDispatcher({"email": {}})
    with pytest.raises(AlertConfigError, match="argv"):
        AlertDispatcher({"command": {"argv": "notify-send"}})
    dispatcher = AlertDispatcher({"log": True})
    try:
        bad = make_alert()
        del bad["onset_probability"]
        with pytest.raises(protocol.ProtocolError, match="onset_probability"):
            dispatcher.dispatch(bad)
        bad = make_alert()
        bad["t0"] = {"mean": 7.4}
        with pytest.raises(protocol.ProtocolError, match="q05"):
            dispatcher.dispatch(bad)
    finally:
        dispatcher.close(timeout=5)


def test_log_sink_writes_a_warning(caplog):
    dispatcher = AlertDispatcher({})
    with caplog.at_level("WARNING", logger="sinks.alerts"):
        dispatcher.dispatch(make_alert("logged"))
        dispatcher.close(timeout=5)
    assert any("ONSET ALERT series logged" in r.getMessage() and "t0 = 7.4461 s" in r.getMessage()
               for r in caplog.records)


def test_alert_sink_stage_delivers_what_the_inference_publishes_and_survives_bad_messages(tmp_path):
    """`beamkin alerts` as a real process, subscribed to a real PUB socket (the inference's role):
    raw garbage and an alert without t0 are rejected and logged, the next alert is delivered to
    the command sink once, although it is published many times."""
    import os
    import subprocess
    import time

    from beamkin import sockets

    context = zmq.Context()
    pub = sockets.publisher(context, "tcp://127.0.0.1:*")
    endpoint = pub.getsockopt(zmq.LAST_ENDPOINT).decode()
    out = tmp_path / "alerts.jsonl"
    script = f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read() + chr(10))"
    config = tmp_path / "alerts.toml"
    config.write_text(f"[endpoints]\nresults = {endpoint!r}\n\n[alerts]\nlog = false\n"
                      f"command = {{ argv = [{sys.executable!r}, '-c', {script!r}], timeout_s = 30 }}\n")
    stage = subprocess.Popen([sys.executable, "-m", "beamkin", "alerts", "--config", str(config)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and time.monotonic() < deadline and stage.poll() is None:
            pub.send_multipart([b"alert", b"\xff\x00 not json"])
            bad = make_alert("run-9")
            del bad["t0"]
            pub.send_multipart([b"alert", json.dumps({"type": "alert", **bad}).encode()])
            protocol.send(pub, protocol.make("alert", **make_alert("run-9")))
            time.sleep(0.2)
        time.sleep(1.0)  # further copies of the same alert would arrive now
    finally:
        stage.terminate()
        _, stderr = stage.communicate(timeout=30)
        pub.close(0)
        context.term()
    assert stage.returncode == 0, stderr
    delivered = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert delivered == [make_alert("run-9")]
    assert "alert sinks rejected a message" in stderr
