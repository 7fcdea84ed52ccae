"""A restarted recorder resumes in a new file segment and never touches what was written."""

from __future__ import annotations

import h5py

from beamkin import protocol
from beamkin.recording import read_messages, recording_segments, segment_path
from sinks.recorder import Recorder, open_segment
def fraction(index: int) -> protocol.Message:
    return protocol.Message("fraction", {"series_id": "s1", "frame_index": index, "alpha": 0.1 * index}, {})


def test_segment_names():
    assert str(segment_path("/data/run.h5", 1)) == "/data/run.h5"
    assert str(segment_path("/data/run.h5", 2)) == "/data/run.part2.h5"


def test_restarted_recorder_writes_the_next_segment_and_leaves_the_first_as_it_was(tmp_path, caplog):
    path = tmp_path / "run.h5"
    first = open_segment(path, raw_frames=False, restarted=False)
    for i in range(3):
        first.write(fraction(i))
    first._file.close()  # closed without "complete", as a killed recorder leaves it
    before = path.read_bytes()

    second = open_segment(path, raw_frames=False, restarted=True)
    for i in range(3, 5):
        second.write(fraction(i))
    second.close()
    third = open_segment(path, raw_frames=False, restarted=True)
    third.write(fraction(5))
    third.close()

    assert path.read_bytes() == before  # the first segment is untouched
    assert second.path == tmp_path / "run.part2.h5" and third.path == tmp_path / "run.part3.h5"
    assert "resuming the recording in a new segment" in caplog.text and "run.part2.h5" in caplog.text
    # an unrelated file with a segment's name (another recording) is not one of its segments
    Recorder(tmp_path / "run.part4.h5").close()
    segments = recording_segments(path)
    assert segments == [path, tmp_path / "run.part2.h5", tmp_path / "run.part3.h5"]
    with h5py.File(segments[1], "r") as f:
        assert f.attrs["segment"] == 2 and f.attrs["first_segment"] == "run.h5"
    indices = [m.frame_index for segment in segments for _, m in read_messages(segment)]
    assert indices == list(range(6))


def test_a_restart_before_the_first_file_exists_writes_the_first_segment(tmp_path):
    recorder = open_segment(tmp_path / "run.h5", raw_frames=False, restarted=True)
    recorder.close()
    assert recorder.path == tmp_path / "run.h5" and recording_segments(tmp_path / "run.h5") == [recorder.path]
