"""ZeroMQ socket set-up shared by the stages: lossless publishers, and the byte-budgeted raw PUB.

Publishers made by :func:`publisher` are XPUB sockets with XPUB_NODROP: with no subscriber a
message is discarded (no stage waits for a dashboard that is not there), but a subscriber that
falls behind its high-water mark makes the publisher wait instead of silently losing messages,
so the recorder sees every frame (docs/design.md section 2).

:class:`BudgetedPublisher` is the other kind: a PUB socket for live viewers of raw frames that
never makes the streamer wait. ZeroMQ bounds a subscriber's queue in messages (SNDHWM), not
bytes, and applies SNDHWM only to connections made after it is set; so the socket is bound with
``SNDHWM = max(1, budget_bytes // message_bytes)`` for the frame size of the series, and bound
anew when a series' frame size changes that number (a subscriber reconnects by itself within
ZeroMQ's reconnect interval, 0.1 s, and may miss that series' first messages). A subscriber that
stops reading thus holds at most about ``budget_bytes`` of frames (plus the kernel's socket
buffers) and then misses frames, while the others keep receiving.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from beamkin import protocol, security

log = logging.getLogger(__name__)

PUBLISH_HWM = 10_000  # messages queued per subscriber before the publisher waits


def bind(socket: zmq.Socket, endpoint: str) -> zmq.Socket:
    """Bind, turning ZeroMQ's terse error into one that names the endpoint (OSError); CURVE or
    plaintext as the process's [security] says (beamkin.security.secure_server)."""
    try:
        security.secure_server(socket, endpoint)
    except security.ConfigError:
        socket.close(0)
        raise
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        socket.close(0)
        raise OSError(f"cannot bind {endpoint}: {exc.strerror} (is another beamkin stage running there?)") from exc
    return socket


def publisher(context: zmq.Context, endpoint: str, hwm: int = PUBLISH_HWM) -> zmq.Socket:
    """Bind an XPUB socket that waits (rather than drops) when a subscriber is ``hwm`` messages behind."""
    socket = context.socket(zmq.XPUB)
    socket.setsockopt(zmq.XPUB_NODROP, 1)
    socket.setsockopt(zmq.SNDHWM, max(1, int(hwm)))
    socket.setsockopt(zmq.LINGER, 1000)
    return bind(socket, endpoint)


def publish(socket: zmq.Socket, message: protocol.Message, stop: threading.Event | None = None) -> bool:
    """Publish one message, waiting while a subscriber is at its high-water mark.

    Returns False only if ``stop`` was set while waiting. Pending subscription notices are
    drained so they never pile up on the XPUB socket.
    """
    _drain_subscriptions(socket)
    next_warning = 0.0
    while True:
        try:
            protocol.send(socket, message, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            if stop is not None and stop.is_set():
                return False
            if time.monotonic() >= next_warning:  # say so at once, then every 5 s
                log.warning("a subscriber is behind; waiting to publish %s", message.type,
                            extra={"series_id": message.series_id, "frame_index": message.frame_index})
                next_warning = time.monotonic() + 5.0
            time.sleep(0.005)
            _drain_subscriptions(socket)


def _drain_subscriptions(socket: zmq.Socket) -> None:
    while socket.poll(0, zmq.POLLIN):
        socket.recv_multipart()


class BudgetedPublisher:
    """A PUB socket whose per-subscriber queue holds about ``budget_bytes`` (see module doc).

    ``message_bytes``: the size of a typical message (a frame) the high-water mark is derived
    from until :meth:`size_for` is told otherwise.
    """

    def __init__(self, context: zmq.Context, endpoint: str, budget_bytes: int, message_bytes: int = 4 << 20) -> None:
        self.context = context
        self.endpoint = endpoint
        self.budget_bytes = max(1, int(budget_bytes))
        self.hwm = self.hwm_for(message_bytes)
        self.rebinds = 0
        self.socket = self._bind(self.hwm)

    def hwm_for(self, message_bytes: int) -> int:
        """Messages of ``message_bytes`` that fit the budget (at least 1)."""
        return max(1, self.budget_bytes // max(1, int(message_bytes)))

    def _bind(self, hwm: int) -> zmq.Socket:
        deadline = time.monotonic() + 2.0
        while True:
            socket = self.context.socket(zmq.PUB)
            socket.setsockopt(zmq.SNDHWM, hwm)
            socket.setsockopt(zmq.LINGER, 0)
            try:
                security.secure_server(socket, self.endpoint)
            except security.ConfigError:
                socket.close(0)
                raise
            try:
                socket.bind(self.endpoint)
                return socket
            except zmq.ZMQError as exc:
                socket.close(0)
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:  # the old socket may still hold the port
                    raise OSError(f"cannot bind {self.endpoint}: {exc.strerror}") from exc
                time.sleep(0.02)

    def size_for(self, message_bytes: int) -> None:
        """Messages of the coming series are about ``message_bytes``: rebind if that changes the HWM.

        The raw PUB is for live viewers, best effort: if the port cannot be bound again, it says so
        (ERROR) and publishes nothing until the next rebind, and the stage goes on."""
        hwm = self.hwm_for(message_bytes)
        if hwm == self.hwm and self.socket is not None:
            return
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None
        self.hwm = hwm
        try:
            self.socket = self._bind(hwm)
        except OSError as exc:
            log.error("raw PUB not available until the next series: %s", exc)
            return
        self.rebinds += 1
        log.info("raw PUB %s: %d-byte messages, a slow subscriber holds at most %d of them (%d bytes budget)",
                 self.endpoint, message_bytes, hwm, self.budget_bytes)

    def publish(self, message: protocol.Message) -> bool:
        """Send without ever waiting: a subscriber at its high-water mark misses this message.
        False when the socket is unavailable (see :meth:`size_for`)."""
        if self.socket is None:
            return False
        try:
            protocol.send(self.socket, message, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("raw PUB could not send a %s message: %s", message.type, exc,
                        extra={"series_id": message.series_id, "frame_index": message.frame_index})
            return False
        return True

    def close(self, linger: int = 0) -> None:
        if self.socket is not None:
            self.socket.close(linger)


def pusher(context: zmq.Context, endpoint: str) -> zmq.Socket:
    """Connect a PUSH socket (blocks when the peer's queue is full: backpressure); CURVE when
    the process's [security] requires it for ``endpoint``."""
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 2000)
    security.secure_client(socket, endpoint)
    socket.connect(endpoint)
    return socket
