"""The pipeline's stages as real processes on loopback, started one by one for tests that look at
one stage from outside (its metrics endpoint, the provenance of its results).

Stages are started with beamkin's own :class:`beamkin.supervise.Supervisor` from one resolved
configuration (so a test knows exactly the configuration every stage runs with), none of them
with ``once``: they stay up after the series, for a test to scrape them, until :meth:`stop`.
"""

from __future__ import annotations

import copy
import json
import socket
import time
import urllib.request
from typing import Any

import zmq

from beamkin import config as configuration
from beamkin import protocol
from beamkin.loopback import LoopbackPorts, results_listener
from beamkin.supervise import Supervisor

N_FRAMES = 36


def free_ports(n: int) -> list[int]:
    held = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        held.append(s)
    ports = [s.getsockname()[1] for s in held]
    for s in held:
        s.close()
    return ports


def free_port_pair() -> int:
    """A free port P with P + 1 free too (two reducer workers' metrics: reducer_port + i)."""
    for _ in range(100):
        (port,) = free_ports(1)
        try:
            with socket.create_server(("127.0.0.1", port)), socket.create_server(("127.0.0.1", port + 1)):
                return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def pipeline_config(ports: LoopbackPorts, metric_ports: dict[str, int] | None = None,
                    particles: int = 1024) -> dict[str, Any]:
    """Defaults with every endpoint on ``ports``, the simulator as the source at full speed, and
    (``metric_ports``: stage -> port) the metrics of those stages served."""
    config = configuration.defaults()
    config["endpoints"].update(frames=f"tcp://127.0.0.1:{ports.frames}", raw=f"tcp://127.0.0.1:{ports.raw}",
                               reduced=f"tcp://127.0.0.1:{ports.reduced}", results=f"tcp://127.0.0.1:{ports.results}",
                               record=f"tcp://127.0.0.1:{ports.record}")
    config["simulator"].update(endpoint=f"tcp://127.0.0.1:{ports.detector}", speed=0.0, n_frames=N_FRAMES, seed=3)
    config["streamer"]["source"] = f"dectris2:tcp://127.0.0.1:{ports.detector}"
    config["dashboard"]["port"] = ports.dashboard
    config["inference"]["particles"] = particles
    if metric_ports:
        config["metrics"]["enabled"] = True
        for stage in ("streamer", "reducer", "inference", "dashboard", "recorder"):
            config["metrics"][f"{stage}_port"] = metric_ports.get(stage, 0)
    return config


class StagePipeline:
    """Start inference, the other stages and then the simulator; collect what the inference
    publishes until its ``end`` of the series; scrape; stop every stage."""

    def __init__(self, config: dict[str, Any], ports: LoopbackPorts,
                 stages: tuple[str, ...] = ("infer", "stream", "reduce"), before_source: Any = None):
        """``before_source``: called once the stages are ready, before the simulator starts."""
        self.config = copy.deepcopy(config)
        self.before_source = before_source
        self.ports = ports
        self.stages = stages
        self.supervisor = Supervisor(self.config)
        self.context = zmq.Context()
        self.listener = results_listener(self.context, ports)
        self.messages: list[protocol.Message] = []
        self._push: zmq.Socket | None = None

    def start(self) -> None:
        for command in self.stages:
            self.supervisor.start(command, command)
        self.supervisor.wait_ready(timeout_s=300)
        time.sleep(0.3)  # the SUB socket's subscription reaches the inference's PUB
        if self.before_source is not None:
            self.before_source()
        self.supervisor.start("simulate", "simulate", may_finish=True)

    def wait_for_end(self, timeout_s: float = 300.0) -> protocol.Message:
        """Collect the inference's messages until its ``end`` (the one carrying provenance)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.supervisor.check()
            if not self.listener.poll(200):
                continue
            message = protocol.decode(self.listener.recv_multipart())
            self.messages.append(message)
            if message.type == "end" and "provenance" in message.fields:
                return message
        raise TimeoutError(f"no end of the series after {timeout_s:.0f} s; got {len(self.messages)} messages")

    def push(self, message: protocol.Message) -> None:
        """Send one message into the inference's input (PULL), as a reducer worker would; one
        socket for all, so they arrive in the order sent."""
        if self._push is None:
            self._push = self.context.socket(zmq.PUSH)
            self._push.setsockopt(zmq.LINGER, 2000)
            self._push.connect(self.config["endpoints"]["reduced"])
        protocol.send(self._push, message)

    def stop(self) -> None:
        self.listener.close(0)
        if self._push is not None:
            self._push.close(2000)
        self.supervisor.stop_all()
        self.context.term()

    def __enter__(self) -> "StagePipeline":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET http://127.0.0.1:PORT/metrics, parsed: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def scrape_until(port: int, name: str, labels: dict[str, str], expected: float, timeout_s: float = 60.0) -> dict:
    """Scrape until sample ``name{labels}`` equals ``expected`` (a stage's last frames may still be on
    their way when the inference ends the series); returns the last scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(port)
        if value(samples, name, **labels) == expected or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def canonical(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration as a stage reads it back from the supervisor's JSON file."""
    return json.loads(json.dumps(config))
