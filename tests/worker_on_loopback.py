"""A real reducer Worker in a thread of the test process, with the streamer's ROUTER and the
inference's PULL played by the test on loopback TCP."""

from __future__ import annotations

import threading
from typing import Any

import zmq

from beamkin import config as configuration
from beamkin import protocol
from reducer.service import Worker


class WorkerOnLoopback:
    """``with WorkerOnLoopback({"frame_timeout_s": 1.0}) as w:`` starts a Worker (its [reducer]
    options updated), waits for its first ``ready`` (``w.identity``), and stops it on exit.
    ``w.send(message)`` deals a message to it; ``w.router`` and ``w.results`` are the sockets."""

    def __init__(self, reducer_options: dict[str, Any] | None = None, name: str = "test-worker"):
        self.context = zmq.Context()
        self.router, self.results = self.context.socket(zmq.ROUTER), self.context.socket(zmq.PULL)
        frames_port = self.router.bind_to_random_port("tcp://127.0.0.1")
        reduced_port = self.results.bind_to_random_port("tcp://127.0.0.1")
        config = configuration.defaults()
        config["endpoints"] = {**config["endpoints"], "frames": f"tcp://127.0.0.1:{frames_port}",
                               "reduced": f"tcp://127.0.0.1:{reduced_port}"}
        config["reducer"].update(reducer_options or {})
        self.worker = Worker(config, name)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.worker.run, args=(self.stop,))
        self.identity = b""

    def __enter__(self) -> "WorkerOnLoopback":
        self.thread.start()
        assert self.router.poll(20000), "the worker sent no ready"
        (self.identity,), ready = protocol.recv(self.router, prefix_parts=1)  # its heartbeat: connected
        assert ready.type == "ready"
        return self

    def send(self, message: protocol.Message) -> None:
        protocol.send(self.router, message, prefix=[self.identity])

    def from_worker(self, timeout_s: float) -> protocol.Message | None:
        """The next message the worker sends the streamer (ready, done), or None after timeout_s."""
        if not self.router.poll(timeout_s * 1000):
            return None
        return protocol.recv(self.router, prefix_parts=1)[1]

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(20)
        self.router.close(linger=0)
        self.results.close(linger=0)
        self.context.term()
