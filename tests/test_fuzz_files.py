"""File readers are total (issue 11): any file content gives frames or a counted drop, never an
exception out of the folder source, and never a stuck source."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from streamer.eiger_h5 import read_master_start
from beamkin.errors import StreamDecodeError
from streamer.files import FolderSource, _Seen
from beamkin.profiles import parse_profile

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SUFFIXES = (".cbf", ".edf", ".tif", ".xy", ".xye", ".dat", "_master.h5")


def read_once(folder: Path, name: str, data: bytes):
    """What FolderSource makes of one complete file with this content (no retries)."""
    path = folder / name
    path.write_bytes(data)
    source = FolderSource(folder, {"max_retries": 0, "n_frames": 1})
    source._seen[path.name] = _Seen(len(data), path.stat().st_mtime_ns)
    out = source._read(path)
    assert source.counters["handler_errors"] == 0, "an unexpected exception escaped a reader"
    return out, source.counters


@FUZZ
@given(st.binary(max_size=600), st.sampled_from(SUFFIXES))
@example(b"###CBF: VERSION 1.5\r\nX-Binary-Size: 99999999999999999999\r\n\x0c\x1a\x04\xd5", ".cbf")
@example(b"{\nSize = 18446744073709551616 ;\nDim_1 = 4294967296 ;\nDim_2 = 4294967296 ;\nDataType = UnsignedInteger ;\n}\n",
         ".edf")
@example(b"{\nSize = 16 ;\nDim_1 = 2147483648 ;\nDim_2 = 2147483648 ;\nDataType = UnsignedInteger ;\n}\n" + b"\x01" * 16,
         ".edf")
@example(b"II*\x00\x08\x00\x00\x00\xff\xff", ".tif")
@example(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64, "_master.h5")
@example(b"1 2\n2 nan\n", ".xy")
@example(b"1e999 1\n2 3\n", ".xye")
def test_fuzz_any_file_content(data, suffix):
    with tempfile.TemporaryDirectory() as folder:
        out, counters = read_once(Path(folder), f"run_00001{suffix}", data)
        if out is None:  # not readable: counted once the retries are used up
            assert sum(counters.values()) >= 1
        else:
            assert all(m.type in ("start", "frame", "end") for m in out)


@FUZZ
@given(st.text(max_size=400))
@example("2theta counts\n1 2\n2 3\n")
@example("1 2 3\n2 3\n")
@example("1 2\n1 3\n")
@example("1 2 -1\n2 3 1\n")
def test_fuzz_profile_text(text):
    try:
        two_theta, counts, sigma = parse_profile(text)
    except StreamDecodeError:
        return
    assert two_theta.size >= 2 and np.all(np.diff(two_theta) > 0) and np.all(np.isfinite(counts))


def test_a_master_file_of_garbage_is_a_decode_error(tmp_path):
    path = tmp_path / "x_master.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\xff" * 512)
    try:
        read_master_start(path, "x", "files:")
    except StreamDecodeError as exc:
        assert "x_master.h5" in str(exc)
    else:
        raise AssertionError("garbage accepted as an EIGER master file")


MASTER_FIELDS = ["detectorSpecific/x_pixels_in_detector", "detectorSpecific/y_pixels_in_detector",
                 "detectorSpecific/nimages", "detectorSpecific/ntrigger", "count_time", "frame_time", "beam_center_x",
                 "detector_distance", "x_pixel_size", "description", "bit_depth_image", "saturation_value"]
h5_values = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(),
                      st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=5),
                      st.lists(st.integers(-5, 5), min_size=0, max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(MASTER_FIELDS), h5_values, min_size=1, max_size=4))
@example({"detectorSpecific/nimages": float("inf")})
@example({"detectorSpecific/nimages": -3, "detectorSpecific/x_pixels_in_detector": 2**62})
@example({"frame_time": "fast", "count_time": [1, 2]})
def test_fuzz_eiger_master_fields(tmp_path, fields):
    """Any value in an EIGER master file's fields: a start (passed on as found) or a StreamDecodeError."""
    import h5py

    from streamer.eiger_h5 import write_eiger_master

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    master = write_eiger_master(folder / "m_master.h5", np.ones((2, 4, 3), np.uint16), frames_per_file=2)
    with h5py.File(master, "a") as f:
        detector = f["entry/instrument/detector"]
        for name, value in fields.items():
            if name in detector:
                del detector[name]
            detector[name] = value
    try:
        start, arrays = read_master_start(master, "m", "files:")
    except StreamDecodeError:
        return
    assert start["n_frames"] is None or start["n_frames"] >= 1
