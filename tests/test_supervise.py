"""The supervisor of `beamkin run` / `demo` restarts failed stages (beamkin/supervise.py).

Stages here are tiny Python programs (Supervisor.launch), so the tests exercise the restart
policy itself: which exits are failures, the backoff, the restart environment, the log naming
the stage, its exit status and the attempt, and the stop beyond max_restarts.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import pytest

from beamkin.supervise import RESTART_ENV, RestartPolicy, StageFailed, Supervisor

#: a stage that says it is ready, notes its restart attempt in a file, then runs until killed
LONG_RUNNING = (
    "import os, sys, time\n"
    "open(sys.argv[1], 'a').write(os.environ.get('BEAMKIN_RESTART', '0') + '\\n')\n"
    "print('BEAMKIN-READY', flush=True)\n"
    "time.sleep(600)\n"
)


def supervisor_with(**policy) -> Supervisor:
    return Supervisor({"supervisor": {"restart_backoff_s": 0.05, "restart_backoff_max_s": 0.2, **policy}})


def supervise_until(supervisor: Supervisor, condition, limit_s: float = 60.0) -> None:
    """Run supervision rounds until condition() (the limit only guards against a hang)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        supervisor.supervise()
        time.sleep(0.02)


def test_backoff_doubles_per_consecutive_failure_up_to_its_ceiling():
    policy = RestartPolicy(restart_backoff_s=0.5, restart_backoff_max_s=3.0)
    assert [policy.delay_s(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_policy_read_from_the_supervisor_section():
    policy = RestartPolicy.from_config({"supervisor": {"max_restarts": 2, "restart_backoff_s": 1}})
    assert policy.max_restarts == 2 and policy.restart_backoff_s == 1.0 and isinstance(policy.max_restarts, int)
    assert RestartPolicy.from_config({}) == RestartPolicy()


def test_a_killed_stage_is_restarted_with_its_attempt_logged_and_in_its_environment(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="beamkin.supervise")
    notes = tmp_path / "starts"
    supervisor = supervisor_with(max_restarts=3)
    try:
        stage = supervisor.launch("worker", [sys.executable, "-c", LONG_RUNNING, str(notes)], restart=True)
        supervisor.wait_ready(60)
        first_pid = stage.process.pid
        os.kill(first_pid, signal.SIGKILL)
        supervise_until(supervisor, lambda: stage.process.pid != first_pid and stage.ready.is_set())
        assert notes.read_text().split() == ["0", "1"]  # the restarted process got BEAMKIN_RESTART=1
        assert stage.restarts == 1 and stage.failures == 1
        text = caplog.text
        assert "stage worker (pid %d) was killed by signal 9 (SIGKILL); restarting it" % first_pid in text
        assert "(attempt 1 of 3)" in text
        assert "restarted stage worker (pid %d" % stage.process.pid in text
    finally:
        supervisor.stop_all(grace_s=2)
    assert RESTART_ENV == "BEAMKIN_RESTART"


def test_an_exit_0_of_a_stage_that_should_run_is_a_failure_and_of_a_finishing_one_is_not(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="beamkin.supervise")
    notes = tmp_path / "starts"
    exits_at_once = ("import os, sys\nopen(sys.argv[1], 'a').write(os.environ.get('BEAMKIN_RESTART', '0') + '\\n')\n")
    supervisor = supervisor_with(max_restarts=2)
    try:
        finishing = supervisor.launch("simulator", [sys.executable, "-c", "pass"], restart=True, may_finish=True)
        forever = supervisor.launch("dashboard", [sys.executable, "-c", exits_at_once, str(notes)], restart=True)
        with pytest.raises(StageFailed) as failure:
            supervise_until(supervisor, lambda: False)
    finally:
        supervisor.stop_all(grace_s=2)
    # the one that should run was restarted max_restarts times, then stopped the run naming it
    assert failure.value.name == "dashboard" and forever.restarts == 2
    assert notes.read_text().split() == ["0", "1", "2"]
    message = str(failure.value)
    assert "stage 'dashboard' exited with code 0 (it should run until the run ends) after 2 restart(s)" in message
    assert "exited with code 0 (it should run until the run ends); restarting it" in caplog.text
    # the one that may finish was not restarted
    assert finishing.restarts == 0 and finishing.expected_exit
    assert "stage simulator finished (exit code 0)" in caplog.text


def test_a_stage_without_restart_stops_the_run_at_its_first_failure():
    supervisor = supervisor_with(max_restarts=5)
    try:
        stage = supervisor.launch("simulator", [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(2)"])
        with pytest.raises(StageFailed) as failure:
            supervise_until(supervisor, lambda: False)
    finally:
        supervisor.stop_all(grace_s=2)
    assert stage.restarts == 0
    assert "stage 'simulator' exited with code 2; its last output:" in str(failure.value)
    assert "boom" in str(failure.value)


def test_max_restarts_0_means_never_restart(tmp_path):
    supervisor = supervisor_with(max_restarts=0)
    try:
        stage = supervisor.launch("recorder", [sys.executable, "-c", "import sys; sys.exit(1)"], restart=True)
        with pytest.raises(StageFailed, match="stage 'recorder' exited with code 1;"):
            supervise_until(supervisor, lambda: False)
    finally:
        supervisor.stop_all(grace_s=2)
    assert stage.restarts == 0


def test_wait_for_exit_returns_a_final_code_and_restarts_on_any_other(tmp_path):
    notes = tmp_path / "starts"
    # first start: killed by itself (SIGKILL); restarted: exits 4 (the incomplete-series code)
    program = ("import os, signal, sys\n"
               "attempt = os.environ.get('BEAMKIN_RESTART', '0')\n"
               "open(sys.argv[1], 'a').write(attempt + '\\n')\n"
               "os.kill(os.getpid(), signal.SIGKILL) if attempt == '0' else sys.exit(4)\n")
    supervisor = supervisor_with(max_restarts=3)
    try:
        stage = supervisor.launch("inference", [sys.executable, "-c", program, str(notes)], restart=True)
        assert supervisor.wait_for_exit("inference", final_codes=(0, 4)) == 4
    finally:
        supervisor.stop_all(grace_s=2)
    assert notes.read_text().split() == ["0", "1"] and stage.restarts == 1


def test_a_stage_that_rejected_its_input_is_not_restarted():
    supervisor = supervisor_with(max_restarts=5)
    try:
        stage = supervisor.launch("streamer", [sys.executable, "-c", "import sys; print('ERROR bad start', file=sys.stderr); sys.exit(3)"],
                                  restart=True)
        with pytest.raises(StageFailed) as failure:
            supervise_until(supervisor, lambda: False)
    finally:
        supervisor.stop_all(grace_s=2)
    assert stage.restarts == 0
    assert "stage 'streamer' rejected the series (exit code 3): ERROR bad start" in str(failure.value)
