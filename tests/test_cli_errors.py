"""Clean errors: every command answers bad input with one line naming the file and the problem,
exit status 2 and no traceback, before any long work starts (issue 13, item 5)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from beamkin import cli
from beamkin.protocol import make
from sinks.recorder import Recorder
def one_line_error(capsys, command: str, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"beamkin {command}: ") or err.startswith("beamkin: configuration error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def bad_inputs(tmp_path):
    """Files that are not recordings: missing, text, binary, other HDF5, empty recording."""
    text = tmp_path / "notes.txt"
    text.write_text("these are notes\n")
    binary = tmp_path / "image.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    empty = tmp_path / "empty.h5"
    Recorder(empty).close()
    return {"missing": (tmp_path / "nothing.h5", "does not exist"),
            "text": (text, "not"), "binary": (binary, "not"),
            "other HDF5": (other, "HDF5 file but not a beamkin recording"),
            "empty recording": (empty, "without any message")}


@pytest.mark.parametrize("kind", ["missing", "text", "binary", "other HDF5", "empty recording"])
def test_export_of_what_is_not_a_recording(bad_inputs, kind, tmp_path, capsys):
    path, problem = bad_inputs[kind]
    assert cli.main(["export", str(path), "--csv", str(tmp_path / "csv")]) == 2
    one_line_error(capsys, "export", str(path), problem)
    assert not (tmp_path / "csv").exists()  # nothing written


@pytest.mark.parametrize("kind", ["missing", "binary", "other HDF5", "empty recording"])
def test_report_of_what_is_not_a_recording(bad_inputs, kind, tmp_path, capsys):
    path, problem = bad_inputs[kind]
    assert cli.main(["report", str(path), "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "report", str(path), problem)


def test_report_of_a_text_file_that_is_not_json(bad_inputs, tmp_path, capsys):
    path, _ = bad_inputs["text"]
    assert cli.main(["report", str(path), "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "report", str(path), "is not valid JSON")


def test_export_of_a_recording_with_nothing_to_export(tmp_path, capsys):
    path = tmp_path / "status-only.h5"
    with Recorder(path) as recorder:
        recorder.write(make("status", stage="streamer", series_id=None, counters={"frames": 0}))
    assert cli.main(["export", str(path), "--csv", str(tmp_path / "csv")]) == 2
    one_line_error(capsys, "export", str(path), "nothing to export")


def test_report_and_export_output_folders_are_checked(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"models": {"F1": {"log_evidence": 0.0, "probability": 1.0, "params": {}}}}))
    blocker = tmp_path / "afile"
    blocker.write_text("")
    assert cli.main(["report", str(path), "--out", str(blocker)]) == 2
    one_line_error(capsys, "report", str(blocker), "is a file, expected a folder")
    recording = tmp_path / "rec.h5"
    with Recorder(recording) as recorder:
        recorder.write(make("end", series_id="s", n_frames=0, reason="completed"))
    assert cli.main(["export", str(recording), "--csv", str(blocker / "sub")]) == 2
    one_line_error(capsys, "export", str(blocker), "is a file, not a folder")


@pytest.mark.parametrize("option", ["--json", "--record"])
def test_run_checks_output_paths_before_starting_the_pipeline(tmp_path, capsys, option):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    target = blocker / "out"
    assert cli.main(["run", "--source", f"files:{tmp_path}", option, str(target)]) == 2
    one_line_error(capsys, "run", str(target), "is a file, not a folder")


def test_missing_source_folder_is_one_error_before_any_stage_starts(tmp_path):
    folder = tmp_path / "nonexistent"
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "beamkin", "run", "--source", f"files:{folder}", "--once"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == f"beamkin: configuration error: source folder {folder} does not exist (--source files:FOLDER)\n"
    assert "dashboard" not in done.stdout  # no stage was started
    assert time.monotonic() - began < 60


def test_the_stream_stage_alone_refuses_a_missing_folder_once(tmp_path):
    folder = tmp_path / "nonexistent"
    done = subprocess.run([sys.executable, "-m", "beamkin", "stream", "--streamer.source", f"files:{folder}",
                           "--endpoints.frames", "tcp://127.0.0.1:0", "--endpoints.raw", "tcp://127.0.0.1:0",
                           "--endpoints.reduced", "tcp://127.0.0.1:0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = [line for line in (done.stdout + done.stderr).splitlines() if str(folder) in line]
    assert len(lines) == 1 and "does not exist" in lines[0] and "Traceback" not in done.stderr


def test_replay_of_a_missing_file(tmp_path, capsys):
    assert cli.main(["replay", str(tmp_path / "gone.h5")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "gone.h5") in err and "does not exist" in err and err.count("\n") == 1


@pytest.mark.parametrize("spec", ["dectris:tcp://dcu:31001", "files:", "nonsense"])
def test_a_source_that_is_no_source_is_one_error(spec, capsys):
    assert cli.main(["run", "--source", spec]) == 2
    err = capsys.readouterr().err
    assert f"source {spec!r}: expected dectris2:tcp://HOST:PORT" in err and err.count("\n") == 1
