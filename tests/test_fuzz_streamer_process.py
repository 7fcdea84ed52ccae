"""The hostile Stream V2 input of issue 11 against real `beamkin stream` and `beamkin record`
processes on loopback: the streamer lives on, counts what it dropped, the recorder keeps every
message of the good series, and the odd series id reaches it sanitised with the original kept."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import numpy as np
import zmq

from beamkin import protocol
from beamkin.loopback import beamkin_process
from simulator.fake_eiger import StreamV2Sender
from beamkin.recording import read_messages
from tests.test_stream_v2 import END, NX, NY, Tag, image_msg, mdarray, self_described, start_msg


def free_ports(n: int) -> list[int]:
    held = [socket.socket() for _ in range(n)]
    for s in held:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in held]
    for s in held:
        s.close()
    return ports


def acknowledging_worker(endpoint: str, stop: threading.Event, frames: list) -> None:
    """A reducer worker that acknowledges every frame at once (DEALER, heartbeat every second)."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"ack-worker")
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    ready = protocol.make("ready", worker="ack-worker", capacity=4)
    last = 0.0
    while not stop.is_set():
        if time.monotonic() - last > 1.0:
            protocol.send(dealer, ready)
            last = time.monotonic()
        if dealer.poll(100):
            _, message = protocol.recv(dealer)
            if message.type == "frame":
                frames.append((message.series_id, message.frame_index))
                protocol.send(dealer, protocol.make("done", worker="ack-worker", series_id=message.series_id,
                                                    frame_index=message.frame_index))
    dealer.close(0)
    context.term()


def test_hostile_stream_v2_input_against_real_processes(tmp_path):
    frames_port, raw_port, reduced_port, record_port, results_port = free_ports(5)
    endpoints = ["--endpoints.frames", f"tcp://127.0.0.1:{frames_port}", "--endpoints.raw", f"tcp://127.0.0.1:{raw_port}",
                 "--endpoints.reduced", f"tcp://127.0.0.1:{reduced_port}",
                 "--endpoints.record", f"tcp://127.0.0.1:{record_port}",
                 "--endpoints.results", f"tcp://127.0.0.1:{results_port}"]
    sender = StreamV2Sender("tcp://127.0.0.1:0")
    recording = tmp_path / "hostile.h5"
    recorder = beamkin_process("record", "--recorder.path", str(recording), "--recorder.raw_frames", "true", *endpoints)
    streamer = beamkin_process("stream", "--streamer.source", f"dectris2:{sender.endpoint}", *endpoints)
    stop, frames = threading.Event(), []
    worker = threading.Thread(target=acknowledging_worker, args=(f"tcp://127.0.0.1:{frames_port}", stop, frames))
    worker.start()
    logs = {process.pid: [] for process in (streamer, recorder)}
    readers = [threading.Thread(target=lambda p=process: logs[p.pid].extend(p.stdout), daemon=True)
               for process in (streamer, recorder)]
    for reader in readers:
        reader.start()
    try:
        assert sender.writable(60.0), "the streamer did not connect"
        deadline = time.monotonic() + 60
        while not any(f"recorder SUB tcp://127.0.0.1:{record_port}" in line for line in logs[recorder.pid]):
            assert time.monotonic() < deadline, "the recorder did not connect"
            time.sleep(0.05)
        time.sleep(0.5)  # its subscription reaches the streamer
        image = {"threshold_1": mdarray(np.arange(NY * NX, dtype=np.uint16).reshape(NY, NX), "bslz4")}
        odd = "nul\x00series"
        hostile = [
            b"\x00garbage",
            self_described(start_msg(series_unique_id=odd, number_of_images=3)),
            self_described(image_msg(0, image, series=odd, start=[2**1100, 1], stop=[2**1100 + 1, 1])),
            self_described(image_msg(200_000, image, series=odd)),
            self_described(image_msg(0, {"threshold_1": Tag(40, [[2**62, 2**62], Tag(69, b"")])}, series=odd)),
            b"\x81" * 100_000 + b"\x00",
            *[self_described(image_msg(i, image, series=odd)) for i in range(3)],
            self_described(dict(END, series_unique_id=odd)),
            self_described(start_msg(series_unique_id="good", number_of_images=3)),
            *[self_described(image_msg(i, image, series="good")) for i in range(3)],
            self_described(dict(END, series_unique_id="good")),
        ]
        for data in hostile:
            sender.send_raw(data)
        deadline = time.monotonic() + 60
        while len(frames) < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        assert streamer.poll() is None and recorder.poll() is None, "a stage died on hostile input"
    finally:
        for process in (streamer, recorder):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
        for process in (streamer, recorder):
            process.wait(timeout=30)
        for reader in readers:
            reader.join(timeout=10)
        outputs = ["".join(logs[process.pid]) for process in (streamer, recorder)]
        stop.set()
        worker.join(timeout=10)
        sender.close(0)
    assert streamer.returncode == 0 and recorder.returncode == 0, outputs[0][-3000:] + outputs[1][-3000:]
    safe = "nul%00series"
    assert sorted(frames) == sorted([(safe, 0), (safe, 1), (safe, 2), ("good", 0), ("good", 1), ("good", 2)])
    recorded = [(m.type, m.series_id, m.frame_index) for _, m in read_messages(recording, types=["start", "frame", "end"])]
    assert recorded == [("start", safe, None), ("frame", safe, 0), ("frame", safe, 1), ("frame", safe, 2), ("end", safe, None),
                        ("start", "good", None), ("frame", "good", 0), ("frame", "good", 1), ("frame", "good", 2),
                        ("end", "good", None)]
    start = next(m for _, m in read_messages(recording, types=["start"]))
    assert start["user_data"]["source_series_id"] == odd
    log = outputs[0]
    assert "Traceback" not in log and "is not a time within" in log  # the 2^1100 time: dropped, no exception
    assert log.count("announced 3 frames") == 1  # one warning for the stray image id, not one per frame
