"""Process supervision for `beamkin run` and `beamkin demo`: one OS process per stage.

Each stage runs as ``python -m beamkin STAGE --resolved-config FILE`` in its own session (so a
Ctrl-C reaches the supervisor first, which then stops the stages in order) and with
PR_SET_PDEATHSIG, so no stage outlives a supervisor that was killed. A stage signals readiness
by printing ``BEAMKIN-READY`` on its stdout; its stderr (the log) is passed through and the last
lines are kept to say why a stage died.
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("beamkin.supervise")

READY_LINE = "BEAMKIN-READY"
#: Exit code of a stage that stopped because its input was rejected (the streamer with ``once``
#: after a rejected start and no usable one within ``[streamer] rejected_wait_s``); its last
#: ERROR line names the field and the value.
EXIT_SERIES_REJECTED = 3


class StageFailed(RuntimeError):
    """A stage exited on its own while the others were still needed."""

    def __init__(self, name: str, returncode: int, tail: list[str]):
        self.name, self.returncode, self.tail = name, returncode, tail
        how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with code {returncode}"
        if returncode == EXIT_SERIES_REJECTED:
            how = f"rejected the series (exit code {returncode})"
            reasons = [line for line in tail if "ERROR" in line]
            if reasons:
                how += f": {reasons[0].strip()}"
        detail = "\n    ".join(tail[-12:]) if tail else "(no output)"
        super().__init__(f"stage '{name}' {how}; its last output:\n    {detail}")


def signal_ready() -> None:
    """Tell the supervisor (if any) that this stage is up and serving."""
    print(READY_LINE, flush=True)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a stage never outlives its supervisor
    except OSError:
        pass


@dataclass
class Stage:
    name: str
    process: subprocess.Popen
    ready: threading.Event = field(default_factory=threading.Event)
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))
    expected_exit: bool = False


class Supervisor:
    """Start stages, wait for them to be ready, notice the first one that dies, stop them all."""

    def __init__(self, config: dict[str, Any]):
        self._config_file = tempfile.NamedTemporaryFile("w", prefix="beamkin-", suffix=".json", delete=False)
        json.dump(config, self._config_file)
        self._config_file.close()
        self.stages: dict[str, Stage] = {}

    def start(self, name: str, command: str, *extra: str, env: dict[str, str] | None = None) -> Stage:
        argv = [sys.executable, "-m", "beamkin", command, "--resolved-config", self._config_file.name, *extra]
        # a Ctrl-C between fork and bookkeeping would leave a stage nobody stops: hold it back
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            process = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                text=True, bufsize=1, start_new_session=True, preexec_fn=_die_with_parent,
                env=None if env is None else {**os.environ, **env},
            )
            stage = Stage(name, process)
            self.stages[name] = stage
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        threading.Thread(target=self._pump_stdout, args=(stage,), daemon=True).start()
        threading.Thread(target=self._pump_stderr, args=(stage,), daemon=True).start()
        log.info("started stage %s (pid %d)", name, process.pid)
        return stage

    @staticmethod
    def _pump_stdout(stage: Stage) -> None:
        for line in stage.process.stdout:
            if line.strip() == READY_LINE:
                stage.ready.set()
            else:
                sys.stdout.write(line)
                sys.stdout.flush()

    @staticmethod
    def _pump_stderr(stage: Stage) -> None:
        for line in stage.process.stderr:
            stage.tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
            sys.stderr.flush()

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until every started stage printed its ready line; raise StageFailed if one dies."""
        deadline = time.monotonic() + timeout_s
        for stage in self.stages.values():
            while not stage.ready.wait(0.1):
                self.check()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stage '{stage.name}' not ready after {timeout_s:.0f} s")

    def check(self) -> None:
        """Raise StageFailed for the first stage that failed (exited non-zero unasked).

        A stage that exits with code 0 has finished its work (the streamer at the end of a
        replay or of a --once series, the simulator after its series) and is not a failure.
        """
        for stage in self.stages.values():
            code = stage.process.poll()
            if code is None or stage.expected_exit:
                continue
            if code == 0:
                stage.expected_exit = True
                log.info("stage %s finished", stage.name)
                continue
            time.sleep(0.2)  # let the stderr pump catch the last lines
            raise StageFailed(stage.name, code, list(stage.tail))

    def wait_for_exit(self, name: str) -> int:
        """Wait until stage `name` exits by itself (e.g. inference after --once), watching the rest."""
        stage = self.stages[name]
        stage.expected_exit = True
        while True:
            code = stage.process.poll()
            if code is not None:
                if code != 0:
                    time.sleep(0.2)
                    raise StageFailed(name, code, list(stage.tail))
                return code
            self.check()
            time.sleep(0.1)

    def watch_forever(self) -> None:
        while True:
            self.check()
            time.sleep(0.2)

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGINT every stage (newest first), then SIGTERM, then SIGKILL what is left."""
        running = [s for s in reversed(list(self.stages.values())) if s.process.poll() is None]
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            for stage in running:
                stage.expected_exit = True
                if stage.process.poll() is None:
                    try:
                        os.killpg(stage.process.pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + wait_s
            for stage in running:
                try:
                    stage.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            running = [s for s in running if s.process.poll() is None]
            if not running:
                break
            log.warning("stages still running after %s: %s", sig.name, ", ".join(s.name for s in running))
        try:
            os.unlink(self._config_file.name)
        except FileNotFoundError:
            pass
