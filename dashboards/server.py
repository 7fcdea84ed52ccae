"""The live dashboard: a Bokeh server fed by the inference stage's ZeroMQ PUB socket.

Architecture::

    inference PUB --(SUB, one receiver thread)--> DashboardState (bounded, shared, locked)
                                                     ^   ^
    browser session 1: periodic callback at max_refresh_hz pulls what changed
    browser session 2: ...

The receiver thread never touches Bokeh models; each session copies what changed under the
state lock and updates its own document, so the rate of updates sent to a browser is bounded
by ``max_refresh_hz`` whatever the frame rate, and any number of browsers can watch.

Entry point: :func:`serve_dashboard` (blocking). :class:`MessageReceiver` and
:func:`make_application` are exposed for embedding.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import zmq
from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.document import Document
from bokeh.server.server import Server
from tornado.ioloop import IOLoop, PeriodicCallback

from beamkin import protocol, security
from beamkin import metrics
from beamkin.protocol import ProtocolError

from .access import auth_provider
from .layout import DashboardSession
from .state import DashboardState

log = logging.getLogger(__name__)

#: How often (milliseconds) the server loop checks the stop event, and the receiver its poller.
STOP_POLL_MS = 200
#: ZeroMQ receive high-water mark: beyond it the PUB side drops messages for this subscriber
#: (the dashboard may thin; the recorder and inference are not affected).
RECEIVE_HWM = 20000


class MessageReceiver(threading.Thread):
    """Background thread: SUBscribe to ``endpoint`` and fold every message into ``state``.

    Malformed messages are logged and counted (``malformed``), never fatal. Alerts are shown
    as the banner; delivering them elsewhere is the alert sinks' work (sinks.alerts).
    """

    def __init__(self, endpoint: str, state: DashboardState, context: zmq.Context | None = None) -> None:
        super().__init__(name="dashboard-receiver", daemon=True)
        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise ValueError(f"subscribe endpoint must look like tcp://host:port, got {endpoint!r}")
        self.endpoint = endpoint
        self.state = state
        self.context = context or zmq.Context.instance()
        self.stop_requested = threading.Event()
        self.malformed = 0
        self.metrics = metrics.StageMetrics("dashboard")  # fractions (one per frame) in, shown, time to show

    def run(self) -> None:
        sub = self.context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        security.secure_client(sub, self.endpoint)  # CURVE when [security.results] requires it
        sub.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        log.info("dashboard subscribed to %s", self.endpoint)
        try:
            while not self.stop_requested.is_set():
                if not poller.poll(STOP_POLL_MS):
                    continue
                while True:  # drain everything queued before polling again
                    try:
                        _, message = protocol.recv(sub, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except ProtocolError as exc:
                        self.malformed += 1
                        self.metrics.dropped("malformed")
                        log.warning("dashboard dropped malformed message: %s", exc)
                        continue
                    fraction = message.type == "fraction"
                    if fraction:
                        self.metrics.frame_in()
                    began = time.perf_counter()
                    self.state.apply(message)
                    if fraction:
                        self.metrics.frame_out()
                        self.metrics.latency(time.perf_counter() - began)
        finally:
            sub.close(linger=0)

    def stop(self, timeout: float = 2.0) -> None:
        self.stop_requested.set()
        self.join(timeout)


def make_application(state: DashboardState, alert_threshold: float = 0.99, max_refresh_hz: float = 5.0) -> Application:
    """A Bokeh Application whose every session shows ``state`` (one DashboardSession each)."""

    def make_document(doc: Document) -> None:
        DashboardSession(doc, state, alert_threshold=alert_threshold, max_refresh_hz=max_refresh_hz)

    return Application(FunctionHandler(make_document))


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def serve_dashboard(subscribe_endpoint: str, address: str = "127.0.0.1", port: int = 5006,
                    max_refresh_hz: float = 5.0, alert_threshold: float = 0.99,
                    stop_event: threading.Event | None = None,
                    allow_websocket_origin: list[str] | None = None, token: str = "") -> None:
    """Serve the live dashboard at http://address:port/ until ``stop_event`` is set (or Ctrl-C).

    ``subscribe_endpoint``: the inference stage's PUB endpoint (connected, not bound).
    ``max_refresh_hz``: how often each browser session pulls updates (1/s).
    ``alert_threshold``: onset-probability line drawn on the onset plot.
    ``allow_websocket_origin``: host:port values browsers may connect from; defaults to the
    served address plus localhost/127.0.0.1 (and this host's names when serving on all
    interfaces) on ``port``. ``port=0`` picks a free port.
    ``token``: access token every request must carry ("file:PATH" reads it; "" = none): dashboards.access.
    Blocks; safe to call from any thread (it runs its own event loop).
    """
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"dashboard port must be in 0..65535, got {port}")
    if not max_refresh_hz > 0:
        raise ValueError(f"max_refresh_hz must be positive, got {max_refresh_hz}")
    if not 0 < alert_threshold <= 1:
        raise ValueError(f"alert_threshold must be in (0, 1], got {alert_threshold}")
    port = int(port) or _free_port(address)
    hosts = {address, "localhost", "127.0.0.1"}
    if address in ("0.0.0.0", "::", ""):  # all interfaces: browsers will use this machine's name
        hosts |= {socket.gethostname(), socket.getfqdn()}
    origins = allow_websocket_origin or sorted(f"{host}:{port}" for host in hosts if host)
    access = auth_provider(token)
    if access is None and address not in ("127.0.0.1", "localhost", "::1"):
        log.warning("dashboard on %s without an access token: anyone who reaches port %d sees it ([dashboard] token)",
                    address, port)

    state = DashboardState()
    receiver = MessageReceiver(subscribe_endpoint, state)
    receiver.start()

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    io_loop = IOLoop.current()
    server = Server({"/": make_application(state, alert_threshold, max_refresh_hz)}, io_loop=io_loop,
                    address=address, port=port, allow_websocket_origin=origins,
                    **({"auth_provider": access} if access is not None else {}))
    server.start()

    def check_stop() -> None:
        if stop_event is not None and stop_event.is_set():
            io_loop.stop()

    watcher = PeriodicCallback(check_stop, STOP_POLL_MS)
    watcher.start()
    log.info("beamkin dashboard at http://%s:%d/ (subscribed to %s)", address, port, subscribe_endpoint)
    try:
        io_loop.start()
    except KeyboardInterrupt:
        log.info("dashboard interrupted")
    finally:
        watcher.stop()
        server.stop()
        io_loop.close(all_fds=True)
        asyncio.set_event_loop(None)
        receiver.stop()
        log.info("dashboard stopped")
