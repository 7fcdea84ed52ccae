"""A small real network for multi-host tests: Linux network namespaces joined by veth links.

One namespace acts as the switch: it holds a bridge, and every host namespace is linked to it by
a veth pair (``eth0`` in the host, ``p-<host>`` on the switch).  Hosts get addresses of one /24;
namespaces are named ``bk-<pid>-<host>`` so that parallel runs never collide, and nothing is
created in the caller's own namespace (the veth pairs are made inside the switch namespace).

A qdisc (``tc``) is put on both ends of a host's link, shaping what it sends and receives;
``ip link set ... down`` on the switch side of the link cuts the host off (its own ``eth0``
loses carrier, its address and routes stay).

Needs root and iproute2's ``ip`` and ``tc``; :func:`unavailable` says why a network cannot be made.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import Sequence

SUBNET_PREFIX = 24


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip ARGS``; a failure raises RuntimeError with iproute2's message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (not root, no ``ip``, no namespace support),
    or None when they can (checked by making and deleting one)."""
    if os.geteuid() != 0:
        return "network namespaces need root (the test runs `ip netns add`)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed: `make test` installs it with apt-get"
    probe = f"bk-{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as exc:
        return f"cannot make a network namespace: {exc}"
    _ip("netns", "del", probe, check=False)
    return None


class Network:
    """Host namespaces on one bridge.  ``hosts`` maps a host name (at most 11 characters, the
    switch port is ``p-<host>``) to its IPv4 address in the /24 (e.g. ``10.77.0.1``)."""

    def __init__(self, hosts: dict[str, str], prefix: str | None = None):
        self.prefix = prefix or f"bk-{os.getpid()}"
        self.hosts = dict(hosts)
        self.switch = f"{self.prefix}-switch"
        self.processes: list[subprocess.Popen] = []
        self.made: list[str] = []

    def namespace(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def switch_port(self, host: str) -> str:
        """The switch-side end of ``host``'s link (the interface faults are applied to)."""
        return f"p-{host}"

    def create(self) -> "Network":
        """Make the switch, the hosts and their links; on any failure, remove what was made."""
        try:
            self._add_namespace(self.switch)
            self.in_switch("link", "add", "br0", "type", "bridge")
            self.in_switch("link", "set", "br0", "up")
            for host, address in self.hosts.items():
                ns, port = self.namespace(host), self.switch_port(host)
                self._add_namespace(ns)
                self.in_switch("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
                self.in_switch("link", "set", port, "master", "br0")
                self.in_switch("link", "set", port, "up")
                _ip("-n", ns, "addr", "add", f"{address}/{SUBNET_PREFIX}", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def in_switch(self, *args: str) -> None:
        """``ip ARGS`` inside the switch namespace."""
        _ip("-n", self.switch, *args)

    # -- processes ------------------------------------------------------------------------
    def popen(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace (``ip netns exec`` execs it: the process id
        is the program's own).  Kept for :meth:`destroy`."""
        process = subprocess.Popen(["ip", "netns", "exec", self.namespace(host), *argv], **kwargs)
        self.processes.append(process)
        return process

    def pids(self, host: str) -> list[int]:
        """Every process running in ``host``'s namespace (children of the started ones included)."""
        return self._namespace_pids(self.namespace(host))

    def kill_host(self, host: str, signum: int = signal.SIGKILL) -> list[int]:
        """Send ``signum`` to every process of ``host``; returns their ids."""
        pids = self.pids(host)
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        return pids

    # -- faults ---------------------------------------------------------------------------
    def add_qdisc(self, host: str, *spec: str) -> subprocess.CompletedProcess:
        """Put the root qdisc ``spec`` (e.g. ``tbf rate 100mbit burst 32kbit latency 400ms``) on
        both ends of ``host``'s link, so it shapes what the host receives and what it sends.
        Returns the first failed ``tc`` run (a kernel without that qdisc fails here), else the last."""
        done = None
        for ns, dev in ((self.switch, self.switch_port(host)), (self.namespace(host), "eth0")):
            done = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *spec],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                return done
        return done

    def qdisc_stats(self, host: str) -> str:
        """``tc -s qdisc show`` of both ends of ``host``'s link (bytes sent, drops, overlimits)."""
        return "\n".join(subprocess.run(["tc", "-n", ns, "-s", "qdisc", "show", "dev", dev], capture_output=True,
                                        text=True).stdout
                         for ns, dev in ((self.switch, self.switch_port(host)), (self.namespace(host), "eth0")))

    def set_link(self, host: str, up: bool) -> None:
        self.in_switch("link", "set", self.switch_port(host), "up" if up else "down")

    # -- clean-up -------------------------------------------------------------------------
    def destroy(self) -> None:
        """Kill every process in the namespaces (SIGTERM, then SIGKILL after 3 s), wait for the
        started ones, delete the namespaces (their links go with them)."""
        hosts = [ns for ns in self.made if ns != self.switch]
        for signum, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            alive = False
            for ns in hosts:
                for pid in self._namespace_pids(ns):
                    alive = True
                    try:
                        os.kill(pid, signum)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + grace
            while alive and time.monotonic() < deadline:
                for process in self.processes:
                    process.poll()
                if not any(self._namespace_pids(ns) for ns in hosts):
                    break
                time.sleep(0.05)
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self.made):
            _ip("netns", "del", ns, check=False)
        self.made.clear()

    @staticmethod
    def _namespace_pids(ns: str) -> list[int]:
        done = _ip("netns", "pids", ns, check=False)
        return [int(token) for token in done.stdout.split() if token.isdigit()]
