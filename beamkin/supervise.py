"""Process supervision for `beamkin run` and `beamkin demo`: one OS process per stage.

Each stage runs as ``python -m beamkin STAGE --resolved-config FILE`` in its own session (so a
Ctrl-C reaches the supervisor first, which then stops the stages in order) and with
PR_SET_PDEATHSIG, so no stage outlives a supervisor that was killed. A stage signals readiness
by printing ``BEAMKIN-READY`` on its stdout; its stderr (the log) is passed through and the last
lines are kept to say why a stage died.

Restarts (issue 11, docs/design.md): a stage started with ``restart=True`` that exits unasked
(killed, a non-zero exit other than EXIT_SERIES_REJECTED, or an exit 0 of a stage that should run
until the run ends) is started
again after ``restart_backoff_s * 2**(n-1)`` seconds (at most ``restart_backoff_max_s``) for its
n-th consecutive failure, each restart logged (WARNING) with the stage, its exit status or signal
and the attempt; the restarted process gets ``BEAMKIN_RESTART=n`` in its environment (the
recorder then writes a new file segment, the inference knows series it has no start of were
lost). A stage that ran ``restart_stable_s`` since its last start has its failure count reset.
A stage failing more than ``max_restarts`` times in a row raises :class:`StageFailed`, which
stops the run naming it. A stage started with ``may_finish=True`` (the simulator, the streamer
of a ``--once`` run or of a replay) may exit 0: that is its work done, not a failure.
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
#: Exit code of the inference with ``once`` whose series ended incomplete (frames lost, e.g. the
#: inference was restarted during it and never got the series' start); its log says how many.
EXIT_SERIES_INCOMPLETE = 4
#: Environment variable a restarted stage finds its attempt number in (absent on the first start).
RESTART_ENV = "BEAMKIN_RESTART"
SHOULD_RUN = " (it should run until the run ends)"


class StageFailed(RuntimeError):
    """A stage exited on its own while the others were still needed."""

    def __init__(self, name: str, returncode: int, tail: list[str], restarts: int = 0):
        self.name, self.returncode, self.tail, self.restarts = name, returncode, tail, restarts
        how = exit_status(returncode)
        if returncode == EXIT_SERIES_REJECTED:
            how = f"rejected the series (exit code {returncode})"
            reasons = [line for line in tail if "ERROR" in line]
            if reasons:
                how += f": {reasons[0].strip()}"
        if returncode == 0:
            how += SHOULD_RUN
        if restarts:
            how += f" after {restarts} restart(s), failing each time"
        detail = "\n    ".join(tail[-12:]) if tail else "(no output)"
        super().__init__(f"stage '{name}' {how}; its last output:\n    {detail}")


def exit_status(returncode: int) -> str:
    """'was killed by signal 9 (SIGKILL)' or 'exited with code 1'."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "?"
        return f"was killed by signal {-returncode} ({name})"
    return f"exited with code {returncode}"


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
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    restart: bool = False        # start it again when it fails (see the module doc)
    may_finish: bool = False     # an exit 0 is its work done, not a failure
    failures: int = 0            # consecutive failures (reset after restart_stable_s of running)
    restarts: int = 0            # restarts over the run
    started_s: float = field(default_factory=time.monotonic)
    restart_at: float | None = None  # monotonic time of a scheduled restart
    final_codes: tuple[int, ...] = ()  # exit codes that end the stage's work (wait_for_exit)


@dataclass(frozen=True)
class RestartPolicy:
    """[supervisor] keys of beamkin/defaults.toml."""
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 30.0
    max_restarts: int = 5
    restart_stable_s: float = 60.0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RestartPolicy":
        section = config.get("supervisor") or {}
        return cls(**{key: type(getattr(cls, key))(section[key]) for key in cls.__dataclass_fields__ if key in section})

    def delay_s(self, failures: int) -> float:
        """Wait before the restart after the ``failures``-th consecutive failure (1, 2, ...)."""
        return min(self.restart_backoff_max_s, max(0.0, self.restart_backoff_s) * 2 ** max(0, failures - 1))


class Supervisor:
    """Start stages, wait for them to be ready, notice the first one that dies, stop them all."""

    def __init__(self, config: dict[str, Any]):
        self.policy = RestartPolicy.from_config(config)
        self._config_file = tempfile.NamedTemporaryFile("w", prefix="beamkin-", suffix=".json", delete=False)
        json.dump(config, self._config_file)
        self._config_file.close()
        self.stages: dict[str, Stage] = {}

    def start(self, name: str, command: str, *extra: str, env: dict[str, str] | None = None,
              restart: bool = False, may_finish: bool = False) -> Stage:
        """Start stage ``name`` as ``python -m beamkin COMMAND``; ``restart``: start it again when it
        fails (:meth:`supervise`); ``may_finish``: an exit 0 is not a failure."""
        argv = [sys.executable, "-m", "beamkin", command, "--resolved-config", self._config_file.name, *extra]
        return self.launch(name, argv, env=env, restart=restart, may_finish=may_finish)

    def launch(self, name: str, argv: list[str], env: dict[str, str] | None = None, restart: bool = False,
               may_finish: bool = False) -> Stage:
        """Start any program ``argv`` as stage ``name`` (what :meth:`start` does with a beamkin stage)."""
        process = self._spawn(argv, env)
        stage = Stage(name, process, argv=argv, env=env, restart=restart, may_finish=may_finish)
        self.stages[name] = stage
        self._pump(stage)
        log.info("started stage %s (pid %d)", name, process.pid)
        return stage

    @staticmethod
    def _spawn(argv: list[str], env: dict[str, str] | None) -> subprocess.Popen:
        # a Ctrl-C between fork and bookkeeping would leave a stage nobody stops: hold it back
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            return subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                text=True, bufsize=1, start_new_session=True, preexec_fn=_die_with_parent,
                env=None if env is None else {**os.environ, **env},
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _pump(self, stage: Stage) -> None:
        threading.Thread(target=self._pump_stdout, args=(stage, stage.process), daemon=True).start()
        threading.Thread(target=self._pump_stderr, args=(stage, stage.process), daemon=True).start()

    @staticmethod
    def _pump_stdout(stage: Stage, process: subprocess.Popen) -> None:
        for line in process.stdout:
            if line.strip() == READY_LINE:
                stage.ready.set()
            else:
                sys.stdout.write(line)
                sys.stdout.flush()

    @staticmethod
    def _pump_stderr(stage: Stage, process: subprocess.Popen) -> None:
        for line in process.stderr:
            stage.tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
            sys.stderr.flush()

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until every started stage printed its ready line, restarting those that fail
        (:meth:`supervise`); raise StageFailed if one fails beyond its restarts."""
        deadline = time.monotonic() + timeout_s
        for stage in self.stages.values():
            while not stage.ready.wait(0.1):
                self.supervise()
                if stage.expected_exit:  # finished (may_finish) before saying ready
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stage '{stage.name}' not ready after {timeout_s:.0f} s")

    def check(self) -> None:
        """Raise StageFailed for the first stage that failed (exited non-zero unasked); no restarts.

        A stage that exits with code 0 has finished its work and is not a failure. (The
        reducer's own worker supervisor uses this; ``run``/``demo`` use :meth:`supervise`.)
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

    def supervise(self) -> None:
        """One round of supervision: restart the stages that failed (with backoff, see the module
        doc), start those whose backoff is over; raise StageFailed for a stage that failed
        beyond ``max_restarts`` (or may not be restarted)."""
        for stage in list(self.stages.values()):
            if stage.expected_exit:
                continue
            now = time.monotonic()
            if stage.restart_at is not None:
                if now >= stage.restart_at:
                    self._restart(stage)
                continue
            code = stage.process.poll()
            if code is None:
                if stage.failures and now - stage.started_s >= self.policy.restart_stable_s:
                    stage.failures = 0
                continue
            if code in stage.final_codes or (code == 0 and stage.may_finish):
                stage.expected_exit = True
                log.info("stage %s finished (exit code %d)", stage.name, code)
                continue
            time.sleep(0.2)  # let the stderr pump catch the last lines
            # a stage that rejected its input (EXIT_SERIES_REJECTED) would reject it again: not restarted
            if not stage.restart or code == EXIT_SERIES_REJECTED or stage.failures >= self.policy.max_restarts:
                raise StageFailed(stage.name, code, list(stage.tail), stage.failures)
            stage.failures += 1
            delay = self.policy.delay_s(stage.failures)
            stage.restart_at = now + delay
            log.warning("stage %s (pid %d) %s%s; restarting it in %.1f s (attempt %d of %d)", stage.name,
                        stage.process.pid, exit_status(code), SHOULD_RUN if code == 0 else "", delay,
                        stage.failures, self.policy.max_restarts)

    def _restart(self, stage: Stage) -> None:
        stage.restarts += 1
        env = {**(stage.env or {}), RESTART_ENV: str(stage.restarts)}
        stage.ready.clear()
        stage.process = self._spawn(stage.argv, env)
        stage.started_s = time.monotonic()
        stage.restart_at = None
        self._pump(stage)
        log.warning("restarted stage %s (pid %d, attempt %d of %d, restart %d of the run)", stage.name,
                    stage.process.pid, stage.failures, self.policy.max_restarts, stage.restarts)

    def wait_for_exit(self, name: str, final_codes: tuple[int, ...] = (0,)) -> int:
        """Wait until stage `name` exits by itself with one of ``final_codes`` (e.g. inference
        after --once) and return that code, supervising every stage meanwhile (a restarted
        `name` is waited for in turn)."""
        stage = self.stages[name]
        stage.final_codes = tuple(final_codes)
        while not stage.expected_exit:
            self.supervise()
            time.sleep(0.1)
        return stage.process.returncode

    def watch_forever(self) -> None:
        while True:
            self.supervise()
            time.sleep(0.2)

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGINT every stage (newest first), then SIGTERM, then SIGKILL what is left."""
        for stage in self.stages.values():
            stage.expected_exit = True  # cancels scheduled restarts too
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
