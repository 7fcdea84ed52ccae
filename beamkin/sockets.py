"""ZeroMQ socket set-up shared by the stages: publishers that apply backpressure, not drops.

Publishers are XPUB sockets with XPUB_NODROP: with no subscriber a message is discarded (no
stage waits for a dashboard that is not there), but a subscriber that falls behind its high-water
mark makes the publisher wait instead of silently losing messages, so the recorder sees every
frame (DESIGN §2).
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from beamkin import protocol

log = logging.getLogger(__name__)

PUBLISH_HWM = 10_000  # messages queued per subscriber before the publisher waits


def bind(socket: zmq.Socket, endpoint: str) -> zmq.Socket:
    """Bind, turning ZeroMQ's terse error into one that names the endpoint (OSError)."""
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        socket.close(0)
        raise OSError(f"cannot bind {endpoint}: {exc.strerror} (is another beamkin stage running there?)") from exc
    return socket


def publisher(context: zmq.Context, endpoint: str) -> zmq.Socket:
    """Bind an XPUB socket that waits (rather than drops) when a subscriber is behind."""
    socket = context.socket(zmq.XPUB)
    socket.setsockopt(zmq.XPUB_NODROP, 1)
    socket.setsockopt(zmq.SNDHWM, PUBLISH_HWM)
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


def pusher(context: zmq.Context, endpoint: str) -> zmq.Socket:
    """Connect a PUSH socket (blocks when the peer's queue is full: backpressure)."""
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 2000)
    socket.connect(endpoint)
    return socket
