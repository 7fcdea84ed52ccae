"""The streamer's two publishers on real loopback sockets (issue 11): the raw PUB bounds what a
stalled subscriber holds by bytes and never makes the streamer wait; the recorder's socket is
lossless (the publisher waits instead)."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import zmq

from beamkin import protocol, sockets

FRAME_BYTES = 1 << 20  # a 512 x 512 uint32 image


def frame(i: int) -> protocol.Message:
    image = np.full((512, 512), i, dtype=np.uint32)
    return protocol.make("frame", {"image": image}, series_id="s", frame_index=i, time_s=0.1 * i, exposure_s=0.1)


def kernel_slack_frames() -> int:
    """Frames the kernel can hold between a sender and a receiver that stopped reading: the
    largest TCP send buffer (tcp_wmem max) plus the receive buffer the test asks for."""
    with open("/proc/sys/net/ipv4/tcp_wmem") as handle:
        wmem_max = int(handle.read().split()[2])
    return math.ceil((wmem_max + 2 * 65536) / FRAME_BYTES) + 1


def subscriber(context, endpoint, stalled=False):
    sub = context.socket(zmq.SUB)
    if stalled:
        sub.setsockopt(zmq.RCVHWM, 1)
        sub.setsockopt(zmq.RCVBUF, 65536)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    return sub


def wait_until_subscribed(raw, subscribers, timeout_s=20.0) -> None:
    """Publish probe messages until every subscriber got one, then drop what they hold."""
    probe = protocol.make("status", stage="probe", series_id=None, counters={})
    waiting = set(subscribers)
    deadline = time.monotonic() + timeout_s
    while waiting and time.monotonic() < deadline:
        raw.publish(probe)
        time.sleep(0.05)
        waiting = {sub for sub in waiting if not sub.poll(0)}
    assert not waiting, "a subscriber never connected"
    for sub in subscribers:
        while sub.poll(200):
            sub.recv_multipart()


def drain(sub, quiet_ms=500) -> list[int]:
    indices = []
    while sub.poll(quiet_ms):
        indices.append(protocol.recv(sub)[1].frame_index)
    return indices


def test_raw_pub_bounds_a_stalled_subscriber_by_bytes_and_keeps_serving_the_others():
    context = zmq.Context()
    budget = 8 * FRAME_BYTES
    raw = sockets.BudgetedPublisher(context, "tcp://127.0.0.1:0", budget, message_bytes=4 << 20)
    endpoint = raw.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
    raw.endpoint = endpoint  # rebinding reuses the port the OS chose
    stalled, fast = subscriber(context, endpoint, stalled=True), subscriber(context, endpoint)
    try:
        raw.size_for(FRAME_BYTES + 1024)  # the series' frames: HWM = 8 MiB // (1 MiB + 1 KiB) = 7
        assert raw.hwm == 7 and raw.rebinds == 1
        wait_until_subscribed(raw, (stalled, fast))  # both reconnected to the new socket
        received_fast: list[int] = []

        def read_fast():
            while fast.poll(3000):
                received_fast.append(protocol.recv(fast)[1].frame_index)

        reader = threading.Thread(target=read_fast)
        reader.start()
        n = 100
        for i in range(n):
            deadline = time.monotonic() + 30
            # the fast one keeps up: it has read every earlier frame (libzmq tells the publisher what
            # was read only every (hwm + 1) / 2 messages, so a reader 3 frames behind can look full)
            while len(received_fast) < i and time.monotonic() < deadline:
                time.sleep(0.001)
            raw.publish(frame(i))  # never waits, whatever the stalled subscriber does
        reader.join(timeout=60)
        assert received_fast == list(range(n))  # a subscriber that keeps up loses nothing
        held = drain(stalled)
        assert 0 < len(held) <= raw.hwm + 2 + kernel_slack_frames() < n
        assert held == sorted(held)
    finally:
        for socket in (stalled, fast):
            socket.close(0)
        raw.close()
        context.term()


def test_the_recorder_socket_is_lossless_the_publisher_waits():
    context = zmq.Context()
    record = sockets.publisher(context, "tcp://127.0.0.1:0", hwm=2)
    endpoint = record.getsockopt(zmq.LAST_ENDPOINT).decode()
    slow = subscriber(context, endpoint, stalled=True)
    try:
        assert record.poll(5000)  # the subscription arrives
        received: list[int] = []

        def read_late():
            time.sleep(1.0)  # a recorder busy writing
            received.extend(drain(slow, 2000))

        reader = threading.Thread(target=read_late)
        reader.start()
        for i in range(30):
            assert sockets.publish(record, frame(i))
        reader.join(timeout=60)
        assert received == list(range(30))
    finally:
        slow.close(0)
        record.close(0)
        context.term()
