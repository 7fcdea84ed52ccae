"""A whole beamkin pipeline on free loopback ports, for tests and benchmarks.

`demo_process()` starts `beamkin demo` (every stage its own process) with every endpoint on a
port the OS reported free, and `results_listener()` subscribes to the inference's PUB socket
like any dashboard would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import zmq

from beamkin import security


@dataclass(frozen=True)
class LoopbackPorts:
    frames: int
    raw: int
    reduced: int
    results: int
    detector: int
    dashboard: int
    record: int

    @classmethod
    def free(cls) -> "LoopbackPorts":
        held = []
        for _ in range(7):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        ports = [s.getsockname()[1] for s in held]
        for s in held:
            s.close()
        return cls(*ports)

    def options(self) -> list[str]:
        """Command-line options putting every endpoint of a pipeline on these ports."""
        return [
            "--endpoints.frames", f"tcp://127.0.0.1:{self.frames}",
            "--endpoints.raw", f"tcp://127.0.0.1:{self.raw}",
            "--endpoints.reduced", f"tcp://127.0.0.1:{self.reduced}",
            "--endpoints.results", f"tcp://127.0.0.1:{self.results}",
            "--simulator.endpoint", f"tcp://127.0.0.1:{self.detector}",
            "--dashboard.port", str(self.dashboard),
            "--endpoints.record", f"tcp://127.0.0.1:{self.record}",
        ]


def beamkin_process(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m beamkin ARGS` in its own session, stdout and stderr merged into one text pipe."""
    return subprocess.Popen([sys.executable, "-m", "beamkin", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=None if env is None else {**os.environ, **env})


def processes_with_environment(name: str, value: str) -> list[int]:
    """PIDs of live processes whose environment has name=value (to find leftovers of a run)."""
    marker = f"{name}={value}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if marker in handle.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def results_listener(context: zmq.Context, ports: LoopbackPorts) -> zmq.Socket:
    listener = context.socket(zmq.SUB)
    listener.setsockopt(zmq.SUBSCRIBE, b"")
    listener.setsockopt(zmq.RCVHWM, 0)
    security.secure_client(listener, f"tcp://127.0.0.1:{ports.results}", "results")  # CURVE if the process's policy says so
    listener.connect(f"tcp://127.0.0.1:{ports.results}")
    return listener


def stage_pid(name: str, value: str, command: str) -> int | None:
    """PID of the live `python -m beamkin COMMAND` process whose environment has name=value (a
    stage of a run started with that marker), or None."""
    for pid in processes_with_environment(name, value):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if b"beamkin" in argv and command.encode() in argv and argv.index(command.encode()) == argv.index(b"beamkin") + 1:
            return pid
    return None
