"""The socket a stage reads a detector's stream from: a ZeroMQ PULL socket CONNECTed to the
detector's PUSH endpoint (DECTRIS Stream V1 and V2 both push; the detector binds)."""

from __future__ import annotations

import logging
import threading
from typing import Iterator

import zmq

log = logging.getLogger(__name__)

#: frames the PULL socket queues before ZeroMQ stops reading from the detector
RECEIVE_HWM = 1000


def pull_parts(endpoint: str, poll_ms: int, stop_event: threading.Event, label: str) -> Iterator[list]:
    """Multipart messages (lists of zmq.Frame, not copied) from a PULL socket CONNECTed to a
    detector endpoint, until ``stop_event`` is set; the socket is closed on the way out."""
    socket = zmq.Context.instance().socket(zmq.PULL)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
    socket.connect(endpoint)
    log.info("PULL %s (%s)", endpoint, label)
    try:
        while not stop_event.is_set():
            if socket.poll(poll_ms):
                yield socket.recv_multipart(copy=False)
    finally:
        socket.close(linger=0)
