"""Folder watcher: CBF / EDF / TIFF / profiles / EIGER master files written slowly by another thread."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fabio.cbfimage import CbfImage
from fabio.edfimage import EdfImage
from fabio.tifimage import TifImage

from streamer.eiger_h5 import write_eiger_master
from beamkin.errors import StreamDecodeError
from streamer.files import binary_section_complete, split_name
from beamkin.profiles import parse_profile
from streamer.sources import open_source

CBF_HEADER = ("# Detector: PILATUS3 1M, S/N 10-0000\r\n# Pixel_size 172e-6 m x 172e-6 m\r\n"
              "# Exposure_time 0.3000000 s\r\n# Exposure_period 0.3333333 s\r\n# Wavelength 0.8000 A\r\n"
              "# Detector_distance 0.25000 m\r\n# Beam_xy (10.50, 5.25) pixels\r\n")


def frame(i, dtype=np.int32):
    return ((np.arange(24 * 30).reshape(24, 30) * 3 + 11 * i) % 1000).astype(dtype)


def slow_write(path, data: bytes, pieces=4, pause=0.06):
    """Write a file in pieces with pauses, as a detector writing over a network share would."""
    with open(path, "wb") as handle:
        for k in range(pieces):
            handle.write(data[k * len(data) // pieces : (k + 1) * len(data) // pieces])
            handle.flush()
            time.sleep(pause)


def encoded(writer, tmp_path, name):
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    writer.write(str(scratch / name))
    return (scratch / name).read_bytes()


def run_source(folder, options, writer, until_ends=1, timeout=60):
    source = open_source(f"files:{folder}", {"poll_s": 0.03, "settle_polls": 5, **options})
    stop = threading.Event()
    out = []
    thread = threading.Thread(target=writer)
    thread.start()
    deadline = time.monotonic() + timeout
    ends = 0

    def watchdog():
        while not stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()

    threading.Thread(target=watchdog, daemon=True).start()
    for message in source.messages(stop):
        out.append(message)
        if message.type == "end":
            ends += 1
            if ends >= until_ends:
                stop.set()
    thread.join()
    return source, out


def test_cbf_series_written_slowly_is_read_once_complete_in_order(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    blobs = {i: encoded(CbfImage(data=frame(i), header={"_array_data.header_contents": CBF_HEADER}), tmp_path, f"x{i}.cbf")
             for i in range(6)}
    # a truncated CBF sits in the folder for a while, as a half-written file would
    def writer():
        for i in range(6):
            slow_write(folder / f"run1_{i + 1:05d}.cbf", blobs[i])

    source, out = run_source(folder, {"n_frames": 6}, writer)
    assert [m.type for m in out] == ["start"] + ["frame"] * 6 + ["end"]
    start = out[0]
    assert start["series_id"] == "run1" and start["detector"]["shape"] == [24, 30]
    assert start["detector"]["pixel_size_m"] == [172e-6, 172e-6] and start["detector"]["name"].startswith("PILATUS3 1M")
    assert start["geometry"]["beam_center_px"] == [10.5, 5.25] and start["geometry"]["distance_m"] == 0.25
    assert start["geometry"]["wavelength_A"] == 0.8
    assert start["frame_time_s"] == pytest.approx(0.3333333) and start["exposure_s"] == pytest.approx(0.3)
    for i, message in enumerate(out[1:7]):
        assert message["frame_index"] == i
        np.testing.assert_array_equal(message.arrays["image"], frame(i))
        assert message["time_s"] == pytest.approx(i * 0.3333333 + 0.15)
    assert out[-1]["reason"] == "completed"


def test_edf_tiff_and_new_prefix_starts_new_series(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    edf = [encoded(EdfImage(data=frame(i, np.float32)), tmp_path, f"e{i}.edf") for i in range(3)]
    tif = [encoded(TifImage(data=frame(i, np.uint16)), tmp_path, f"t{i}.tif") for i in range(2)]

    def writer():
        for i in range(3):
            slow_write(folder / f"a_{i:04d}.edf", edf[i], pieces=3)
        time.sleep(0.1)
        for i in range(2):
            slow_write(folder / f"b_{i:04d}.tif", tif[i], pieces=2)

    source, out = run_source(folder, {"frame_time_s": 0.5, "exposure_s": 0.5, "series_timeout_s": 0.6}, writer,
                             until_ends=2)
    assert [(m.type, m.series_id) for m in out] == [
        ("start", "a"), ("frame", "a"), ("frame", "a"), ("frame", "a"), ("end", "a"),
        ("start", "b"), ("frame", "b"), ("frame", "b"), ("end", "b")]
    np.testing.assert_array_equal(out[3].arrays["image"], frame(2, np.float32))
    np.testing.assert_array_equal(out[7].arrays["image"], frame(1, np.uint16))
    assert out[3]["time_s"] == pytest.approx(2 * 0.5 + 0.25)


def test_profiles_and_eiger_master_in_folder(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    two_theta = np.round(np.arange(2.0, 2.0 + 0.006 * 50, 0.006), 6)
    texts = []
    for i in range(3):
        counts = 1000 + 10 * i + np.arange(50)
        texts.append("# MYTHEN profile\n" + "".join(f"{t:.6f} {c:.1f} {np.sqrt(c):.4f}\n" for t, c in zip(two_theta, counts)))
    images = np.stack([frame(i, np.uint16) for i in range(4)])

    def writer():
        for i in range(3):
            slow_write(folder / f"mythen_{i:03d}.xye", texts[i].encode(), pieces=3)
        time.sleep(0.2)
        write_eiger_master(folder / "scan_master.h5", images, frames_per_file=2, frame_time=0.1)

    source, out = run_source(folder, {"frame_time_s": 0.333, "series_timeout_s": 0.5}, writer, until_ends=2)
    types = [(m.type, m.series_id) for m in out]
    assert types[:5] == [("start", "mythen"), ("frame", "mythen"), ("frame", "mythen"), ("frame", "mythen"), ("end", "mythen")]
    assert out[0]["kind"] == "profile"
    np.testing.assert_allclose(out[2].arrays["two_theta_deg"], two_theta)
    np.testing.assert_allclose(out[2].arrays["counts"], 1010 + np.arange(50))
    np.testing.assert_allclose(out[2].arrays["sigma"], np.sqrt(1010 + np.arange(50)), atol=1e-4)
    assert types[5:] == [("start", "scan")] + [("frame", "scan")] * 4 + [("end", "scan")]
    for i in range(4):
        np.testing.assert_array_equal(out[6 + i].arrays["image"], images[i])


def test_truncated_cbf_and_edf_are_not_complete(tmp_path):
    cbf = encoded(CbfImage(data=frame(0), header={"_array_data.header_contents": CBF_HEADER}), tmp_path, "c.cbf")
    edf = encoded(EdfImage(data=frame(0, np.float32)), tmp_path, "e.edf")
    marker = cbf.find(b"\x0c\x1a\x04\xd5")
    binary_end = marker + 4 + int(cbf.split(b"X-Binary-Size:")[1].split()[0])
    for name, blob, cuts in (("c.cbf", cbf, (marker // 2, marker + 10, binary_end - 1)), ("e.edf", edf, (100, len(edf) - 1))):
        path = tmp_path / name
        for cut in cuts:
            path.write_bytes(blob[:cut])
            assert not binary_section_complete(path, cut)
        path.write_bytes(blob)
        assert binary_section_complete(path, len(blob))


def test_names_and_profile_parsing():
    assert split_name(__import__("pathlib").Path("run1_00017.cbf")) == ("run1_", 17)
    assert split_name(__import__("pathlib").Path("scan_master.h5")) == ("scan", -1)
    t, c, s = parse_profile("2theta counts\n1.0, 5\n1.5, 7\n")
    assert list(t) == [1.0, 1.5] and list(c) == [5.0, 7.0] and s is None
    for bad in ("1 2\n2 3 4\n", "1 2\n", "1 2\n1 3\n", "1 nan\n2 3\n", "1 2 3 4\n2 3 4 5\n", "1 2\nfoo\n"):
        with pytest.raises(StreamDecodeError):
            parse_profile(bad)


def test_what_the_source_remembers_is_bounded_by_the_folder(tmp_path):
    """A file read is remembered by its name only (not its size and mtime), and a file that left
    the folder is forgotten: the source's memory follows the folder, not the whole experiment."""
    folder = tmp_path / "frames"
    folder.mkdir()
    two_theta = np.round(np.arange(2.0, 2.0 + 0.006 * 50, 0.006), 6)
    n_files = 120
    text = "".join(f"{t:.6f} {1000 + i:.1f}\n" for i, t in enumerate(two_theta)).encode()

    def writer():
        for i in range(n_files):
            (folder / f"mythen_{i:05d}.xy").write_bytes(text)

    source, out = run_source(folder, {"frame_time_s": 0.01, "n_frames": n_files}, writer)
    assert [m.type for m in out].count("frame") == n_files
    assert source.remembered_files == (n_files, 0)  # every name once, no settling state left

    for path in folder.iterdir():  # the files are moved away (archived): the names go too
        path.unlink()
    (folder / "other_00000.xy").write_bytes(text)  # one new file, still being looked at
    stop = threading.Event()
    later: list = []
    reader = threading.Thread(target=lambda: later.extend(source.messages(stop)))
    reader.start()
    began = time.monotonic()
    while source.remembered_files[0] > 1 and time.monotonic() - began < 30:  # FORGET_EVERY_POLLS polls
        time.sleep(0.01)
    stop.set()
    reader.join(10)
    assert source.remembered_files[0] <= 1, source.remembered_files  # at most the new file's name
    assert [(m.type, m.series_id) for m in later][:2] == [("start", "other"), ("frame", "other")]
