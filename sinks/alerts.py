"""Alert sinks: where an onset alert goes besides the dashboard banner.

Configured from a dict (the ``[alerts]`` table of the beamkin TOML configuration)::

    [alerts]
    log = true                                   # log the alert at WARNING level (default true)

    [alerts.zmq]                                 # publish a beamkin `alert` message (topic b"alert")
    endpoint = "tcp://127.0.0.1:5590"            # bound by the sink
    bind = true                                  # false: connect instead

    [alerts.webhook]                             # or [[alerts.webhook]] for several
    url = "https://example.org/hook"
    timeout_s = 5.0                              # per attempt
    retries = 3                                  # attempts after the first one
    backoff_s = 0.5                              # wait before retry i is backoff_s * 2**(i-1)
    headers = { Authorization = "Bearer ..." }

    [alerts.command]                             # or [[alerts.command]]
    argv = ["/usr/local/bin/notify-shift", "--beamline", "BL02B2"]
    timeout_s = 30.0

Shorthands: ``webhook = "https://example.org/hook"``, ``zmq = "tcp://127.0.0.1:5590"``,
``command = "notify-send beamkin"`` (split like a shell, but run without one) or
``command = ["notify-send", "beamkin"]``.

Every alert carries: series id, time of the alert (s), t0 with its 90 % interval
(``t0.mean``, ``t0.q05``, ``t0.q95``, s), ``t0_minus_ts`` (s or null), leading model and its
probability, onset probability (the fields of the protocol ``alert`` message).

* webhook: JSON POST of those fields (``Content-Type: application/json``); a non-2xx answer or
  a network error is retried with exponential backoff;
* command: run without a shell, the alert as JSON on stdin and as environment variables
  ``BEAMKIN_ALERT_SERIES_ID``, ``BEAMKIN_ALERT_TIME_S``, ``BEAMKIN_ALERT_FRAME_INDEX``,
  ``BEAMKIN_ALERT_T0_MEAN_S``, ``BEAMKIN_ALERT_T0_Q05_S``, ``BEAMKIN_ALERT_T0_Q95_S``,
  ``BEAMKIN_ALERT_T0_MINUS_TS_S`` (empty when unknown), ``BEAMKIN_ALERT_LEADING_MODEL``,
  ``BEAMKIN_ALERT_LEADING_PROBABILITY``, ``BEAMKIN_ALERT_ONSET_PROBABILITY`` and
  ``BEAMKIN_ALERT_JSON``.

:meth:`AlertDispatcher.dispatch` never blocks: each sink has its own worker thread and queue
(so a slow webhook never delays the ZeroMQ publication), and each series id is alerted once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shlex
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from beamkin import protocol, security

log = logging.getLogger(__name__)

#: Alerts waiting per sink beyond which new ones are dropped (and logged).
SINK_QUEUE_SIZE = 64
_STOP = object()


class AlertConfigError(ValueError):
    """The [alerts] configuration is malformed (the text names the key)."""


def _number(config: dict, key: str, default: float, minimum: float = 0.0) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise AlertConfigError(f"alerts setting {key!r} must be a number >= {minimum}, got {value!r}")
    return float(value)


def _tables(config: dict, key: str) -> list[dict]:
    """The sink tables under ``key``; shorthands: ``webhook = "URL"``, ``zmq = "ENDPOINT"``,
    ``command = "program args"`` (split like a shell, never run by one) or ``command = [argv...]``."""
    value = config.get(key)
    if value is None or value is False or value == "":
        return []
    if key == "command" and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = {"argv": value}
    tables = value if isinstance(value, list) else [value]
    shorthand = {"webhook": "url", "zmq": "endpoint"}
    for i, table in enumerate(tables):
        if isinstance(table, str):
            tables[i] = table = ({"argv": shlex.split(table)} if key == "command" else {shorthand[key]: table})
        if not isinstance(table, dict):
            raise AlertConfigError(f"alerts.{key} must be a table or a list of tables, got {table!r:.60}")
    return tables


class _Sink(threading.Thread):
    """A worker thread delivering alerts from its own bounded queue."""

    kind = "sink"

    def __init__(self, name: str) -> None:
        super().__init__(name=f"alert-{name}", daemon=True)
        self.queue: queue.Queue = queue.Queue(SINK_QUEUE_SIZE)
        self.delivered = 0
        self.failed = 0

    def submit(self, alert: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(alert)
        except queue.Full:
            self.failed += 1
            log.error("%s alert queue full, alert dropped", self.name, extra={"series_id": alert.get("series_id")})

    def run(self) -> None:
        setup_error = None
        try:
            self.setup()
        except Exception as exc:  # e.g. address in use: every alert of this sink then fails, loudly
            setup_error = exc
            log.error("%s could not start: %s", self.name, exc)
        try:
            while True:
                alert = self.queue.get()
                if alert is _STOP:
                    return
                try:
                    if setup_error is not None:
                        raise RuntimeError(f"sink not started: {setup_error}")
                    self.deliver(alert)
                    self.delivered += 1
                except Exception as exc:  # a failing sink must not stop the others
                    self.failed += 1
                    log.error("%s could not deliver alert: %s", self.name, exc,
                              extra={"series_id": alert.get("series_id")})
        finally:
            self.teardown()

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def deliver(self, alert: dict[str, Any]) -> None:
        raise NotImplementedError


class LogSink(_Sink):
    def deliver(self, alert: dict[str, Any]) -> None:
        t0 = alert["t0"]
        log.warning(
            "ONSET ALERT series %s at t = %.3f s: t0 = %.4f s (90 %% interval %.4f - %.4f s), "
            "leading model %s (P = %.3f), onset probability %.4f",
            alert["series_id"], alert["time_s"], t0["mean"], t0["q05"], t0["q95"], alert["leading_model"],
            alert["leading_probability"], alert["onset_probability"],
            extra={"series_id": alert["series_id"], "frame_index": alert["frame_index"]})


class ZmqSink(_Sink):
    """Publishes each alert as a beamkin protocol ``alert`` message on a PUB socket."""

    def __init__(self, config: dict) -> None:
        super().__init__("zmq")
        endpoint = config.get("endpoint")
        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise AlertConfigError(f"alerts.zmq.endpoint must look like tcp://host:port, got {endpoint!r}")
        self.endpoint = endpoint
        self.bind = bool(config.get("bind", True))
        self.bound_endpoint: str | None = None
        self.ready = threading.Event()
        self.socket = None

    def setup(self) -> None:
        import zmq

        self.socket = zmq.Context.instance().socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 1000)
        if self.bind:
            self.socket.bind(self.endpoint)  # "tcp://127.0.0.1:*" binds a free port
            self.bound_endpoint = self.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        else:
            self.socket.connect(self.endpoint)
        self.ready.set()

    def deliver(self, alert: dict[str, Any]) -> None:
        protocol.send(self.socket, protocol.make("alert", **alert))

    def teardown(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.ready.set()


class WebhookSink(_Sink):
    """JSON POST with per-attempt timeout and exponential-backoff retries."""

    def __init__(self, config: dict) -> None:
        url = config.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise AlertConfigError(f"alerts.webhook.url must be an http(s) URL, got {url!r}")
        super().__init__(f"webhook {url}")
        self.url = url
        self.timeout_s = _number(config, "timeout_s", 5.0, minimum=0.001)
        retries = config.get("retries", 3)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise AlertConfigError(f"alerts.webhook.retries must be an integer >= 0, got {retries!r}")
        self.retries = retries
        self.backoff_s = _number(config, "backoff_s", 0.5)
        headers = config.get("headers", {})
        if not isinstance(headers, dict):
            raise AlertConfigError(f"alerts.webhook.headers must be a table, got {headers!r:.60}")
        self.headers = {"Content-Type": "application/json", **{str(k): str(v) for k, v in headers.items()}}
        self.attempts = 0

    def deliver(self, alert: dict[str, Any]) -> None:
        body = json.dumps(alert).encode()
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            self.attempts += 1
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    if 200 <= response.status < 300:
                        return
                    problem = f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                problem = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                problem = str(getattr(exc, "reason", exc))
            log.warning("webhook %s attempt %d/%d failed: %s", self.url, attempt + 1, self.retries + 1, problem,
                        extra={"series_id": alert.get("series_id")})
        raise RuntimeError(f"webhook {self.url} failed after {self.retries + 1} attempts")


class CommandSink(_Sink):
    """Runs a command (no shell) with the alert as JSON on stdin and in environment variables."""

    def __init__(self, config: dict) -> None:
        argv = config.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise AlertConfigError(f"alerts.command.argv must be a non-empty list of strings, got {argv!r}")
        super().__init__(f"command {argv[0]}")
        self.argv = argv
        self.timeout_s = _number(config, "timeout_s", 30.0, minimum=0.001)

    def deliver(self, alert: dict[str, Any]) -> None:
        text = json.dumps(alert)
        completed = subprocess.run(self.argv, input=text.encode(), env={**os.environ, **alert_environment(alert)},
                                   timeout=self.timeout_s, capture_output=True, check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"command {self.argv[0]} exited with {completed.returncode}: "
                               f"{completed.stderr.decode(errors='replace')[-300:]}")


def alert_environment(alert: dict[str, Any]) -> dict[str, str]:
    """Environment variables describing an alert (units: seconds; see module docstring)."""
    t0 = alert["t0"]

    def text(value: Any) -> str:
        return "" if value is None else str(value)

    return {
        "BEAMKIN_ALERT_SERIES_ID": text(alert["series_id"]),
        "BEAMKIN_ALERT_FRAME_INDEX": text(alert["frame_index"]),
        "BEAMKIN_ALERT_TIME_S": text(alert["time_s"]),
        "BEAMKIN_ALERT_T0_MEAN_S": text(t0.get("mean")),
        "BEAMKIN_ALERT_T0_Q05_S": text(t0.get("q05")),
        "BEAMKIN_ALERT_T0_Q95_S": text(t0.get("q95")),
        "BEAMKIN_ALERT_T0_MINUS_TS_S": text(alert.get("t0_minus_ts")),
        "BEAMKIN_ALERT_LEADING_MODEL": text(alert["leading_model"]),
        "BEAMKIN_ALERT_LEADING_PROBABILITY": text(alert["leading_probability"]),
        "BEAMKIN_ALERT_ONSET_PROBABILITY": text(alert["onset_probability"]),
        "BEAMKIN_ALERT_JSON": json.dumps(alert),
    }


class AlertDispatcher:
    """Sends each series' first alert to every configured sink, without blocking the caller."""

    KNOWN_KEYS = {"log", "zmq", "webhook", "command"}

    def __init__(self, config: dict | None = None) -> None:
        config = dict(config or {})
        unknown = set(config) - self.KNOWN_KEYS
        if unknown:
            raise AlertConfigError(f"unknown alerts setting(s) {sorted(unknown)}; known: {sorted(self.KNOWN_KEYS)}")
        self.sinks: list[_Sink] = []
        if config.get("log", True):
            self.sinks.append(LogSink("log"))
        self.sinks += [ZmqSink(table) for table in _tables(config, "zmq")]
        self.sinks += [WebhookSink(table) for table in _tables(config, "webhook")]
        self.sinks += [CommandSink(table) for table in _tables(config, "command")]
        self._alerted: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        for sink in self.sinks:
            sink.start()

    def dispatch(self, alert_fields: dict[str, Any]) -> bool:
        """Queue an alert for every sink; returns False if this series was already alerted.

        ``alert_fields`` are the fields of a protocol ``alert`` message; invalid ones raise
        :class:`beamkin.protocol.ProtocolError` naming the problem.
        """
        alert = protocol.make("alert", **alert_fields).fields
        for key in ("mean", "q05", "q95"):
            if not isinstance(alert["t0"].get(key), (int, float)):
                raise protocol.ProtocolError(f"alert t0 lacks numeric {key!r}: {alert['t0']!r:.80}")
        with self._lock:
            if self._closed:
                raise RuntimeError("AlertDispatcher is closed")
            if alert["series_id"] in self._alerted:
                return False
            self._alerted.add(alert["series_id"])
        for sink in self.sinks:
            sink.submit(dict(alert))
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (within ``timeout`` seconds in total) and stop the workers."""
        with self._lock:
            self._closed = True
        deadline = time.monotonic() + timeout
        for sink in self.sinks:
            try:
                sink.queue.put(_STOP, timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Full:
                log.error("%s did not drain before close", sink.name)
        for sink in self.sinks:
            sink.join(max(deadline - time.monotonic(), 0.0))
            if sink.is_alive():
                log.error("%s still busy after close timeout", sink.name)


def run_alert_sinks(endpoint: str, config: dict | None, stop: threading.Event, ready: Any = None) -> int:
    """The alert-sink stage: SUBscribe to the inference PUB ``endpoint`` (topic ``alert`` only) and
    hand every alert to an :class:`AlertDispatcher` built from ``config`` (the ``[alerts]`` table),
    until ``stop`` is set. A malformed message or an alert with bad fields is logged and counted,
    never fatal. ``ready`` (optional) is called once subscribed. Returns 0."""
    import zmq

    dispatcher = AlertDispatcher(config)
    context = zmq.Context.instance()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"alert")
    security.secure_client(sub, endpoint, "results")  # CURVE when [security.results] requires it
    sub.connect(endpoint)
    log.info("alert sinks subscribed to %s: %s", endpoint, ", ".join(sink.name for sink in dispatcher.sinks) or "none")
    if ready is not None:
        ready()
    rejected = 0
    try:
        while not stop.is_set():
            if not sub.poll(200):
                continue
            try:
                _, message = protocol.recv(sub, flags=zmq.NOBLOCK)
                if message.type != "alert":
                    continue  # another type whose name starts with "alert"
                dispatcher.dispatch(dict(message.fields))
            except zmq.Again:
                continue
            except (protocol.ProtocolError, KeyError, TypeError, AttributeError) as exc:
                rejected += 1
                log.error("alert sinks rejected a message (%d so far): %s", rejected, exc)
    finally:
        sub.close(0)
        dispatcher.close(5.0)
    return 0
