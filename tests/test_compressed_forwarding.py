"""Issue 12.4: DECTRIS compressed frames forwarded to the reducer workers as the detector sent them.

The streamer (``[streamer] decompress = "workers"``, the default) passes the tag-56500 payload on
unchanged (``image_compressed`` + ``compression``) and the worker decompresses it
(beamkin.frames.frame_image). These tests check that this gives bit-identical patterns and
fractions to decompressing in the streamer, for bslz4 and lz4, uint16 and uint32, through the
wire encoding; that a corrupt payload flags its frame (naming series and frame) and the worker
goes on; and that a recording of forwarded frames replays the same images.
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beamkin import config as configuration
from beamkin import protocol
from beamkin.frames import FrameDecodeError, frame_image
from reducer.service import SeriesReduction
from tests.worker_on_loopback import WorkerOnLoopback
from simulator.fake_eiger import encode_message, encode_multi_dim, rational
from streamer.stream_v2 import StreamV2Decoder
from simulator.synthetic import SyntheticPowderDetector, default_metadata

SHAPE = (200, 240)  # small detector: the integrator builds in well under a second
N_FRAMES = 4


def small_metadata() -> dict:
    """The synthetic CPL-1 experiment on a 200 x 240 detector: 0.15 m distance, beam centre near
    the lower edge, so the CPL-1 lines (4.5 - 6.5 degrees) fall on the detector."""
    metadata = default_metadata("compressed-forwarding", n_frames=N_FRAMES, gas_time_s=0.0)
    metadata["detector"] = {**metadata["detector"], "name": "small", "shape": list(SHAPE)}
    metadata["geometry"] = {**metadata["geometry"], "distance_m": 0.15, "beam_center_px": [120.0, 190.0]}
    return metadata


def stream_v2_series(algorithm: str, dtype) -> tuple[list[bytes], list[np.ndarray]]:
    """Start, N_FRAMES images (``algorithm``-compressed ``dtype``) and end, as a detector sends them."""
    metadata = small_metadata()
    detector = SyntheticPowderDetector(metadata, seed=5)
    images = [detector.image(alpha, 1 / 3).astype(dtype) for alpha in np.linspace(0.1, 0.9, N_FRAMES)]
    geometry = metadata["geometry"]
    ids = {"series_id": 1, "series_unique_id": "compressed-forwarding"}
    messages = [encode_message({
        "type": "start", **ids, "channels": ["threshold_1"], "image_size_x": SHAPE[1], "image_size_y": SHAPE[0],
        "pixel_size_x": 172e-6, "pixel_size_y": 172e-6, "beam_center_x": geometry["beam_center_px"][0],
        "beam_center_y": geometry["beam_center_px"][1], "detector_distance": geometry["distance_m"],
        "incident_wavelength": geometry["wavelength_A"], "count_time": 1 / 3, "frame_time": 1 / 3,
        "number_of_images": N_FRAMES, "bit_depth_image": 8 * np.dtype(dtype).itemsize})]
    for i, image in enumerate(images):
        messages.append(encode_message({"type": "image", **ids, "image_id": i, "start_time": rational(i / 3),
                                        "stop_time": rational((i + 1) / 3),
                                        "data": {"threshold_1": encode_multi_dim(image, algorithm)}}))
    messages.append(encode_message({"type": "end", **ids}))
    return messages, images


def through_the_streamer(raw_messages: list[bytes], decompress: str) -> list[protocol.Message]:
    """What the streamer sends the workers, after the wire (encode -> bytes -> decode)."""
    decoder = StreamV2Decoder("dectris2:test", decompress=decompress)
    out = [m for raw in raw_messages for m in decoder.feed(raw)]
    return [protocol.decode([bytes(part) for part in protocol.encode(m)]) for m in out]


def reduce_all(messages: list[protocol.Message]) -> list[tuple[protocol.Message, protocol.Message]]:
    reduction = SeriesReduction(messages[0], configuration.defaults()["reducer"])
    return [reduction.reduce(frame) for frame in messages if frame.type == "frame"]


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("algorithm", ["bslz4", "lz4"])
def test_forwarded_compressed_frames_give_bit_identical_patterns_and_fractions(algorithm, dtype):
    raw_messages, images = stream_v2_series(algorithm, dtype)
    in_streamer = through_the_streamer(raw_messages, "streamer")
    in_workers = through_the_streamer(raw_messages, "workers")
    assert [m.type for m in in_workers] == ["start"] + ["frame"] * N_FRAMES + ["end"]
    frames = [m for m in in_workers if m.type == "frame"]
    for frame, image in zip(frames, images):  # the payload travelled compressed, and is the image
        assert "image" not in frame.arrays and frame["compression"]["algorithm"] == algorithm
        assert frame.arrays["image_compressed"].nbytes < image.nbytes
        assert frame["compression"]["dtype"] == np.dtype(dtype).str and frame["compression"]["shape"] == list(SHAPE)
        decoded = frame_image(frame)
        assert decoded.dtype == dtype and np.array_equal(decoded, image)
    assert all("image" in m.arrays for m in in_streamer if m.type == "frame")

    reference, forwarded = reduce_all(in_streamer), reduce_all(in_workers)
    statuses = [fraction["status"] for _, fraction in forwarded]
    assert statuses.count("ok") >= N_FRAMES - 1, [f["reason"] for _, f in forwarded]  # real fractions, not all flagged
    for (pattern_a, fraction_a), (pattern_b, fraction_b) in zip(reference, forwarded):
        for name in ("radial", "intensity", "sigma"):
            assert pattern_a.arrays[name].tobytes() == pattern_b.arrays[name].tobytes(), name
        assert fraction_a.fields == fraction_b.fields


def corrupt(frame: protocol.Message) -> protocol.Message:
    """The frame with its compressed payload's LZ4 blocks overwritten (the 12-byte header kept)."""
    payload = bytearray(frame.arrays["image_compressed"].tobytes())
    payload[16:] = b"\xff" * (len(payload) - 16)
    return protocol.Message("frame", dict(frame.fields), {"image_compressed": np.frombuffer(bytes(payload), np.uint8)})


def test_frame_image_names_series_and_frame_of_a_corrupt_payload():
    raw_messages, _ = stream_v2_series("bslz4", np.uint32)
    frame = through_the_streamer(raw_messages, "workers")[2]
    with pytest.raises(FrameDecodeError, match=r"series 'compressed-forwarding' frame 1: bslz4 payload of \d+ bytes"):
        frame_image(corrupt(frame))
    broken = protocol.Message("frame", {**frame.fields, "compression": {**frame["compression"], "shape": [200, 241]}},
                              frame.arrays)
    with pytest.raises(FrameDecodeError, match="frame 1"):
        frame_image(broken)  # a descriptor that does not match the payload's declared size


def test_a_corrupt_payload_is_flagged_and_the_worker_goes_on():
    """A real Worker (DEALER + PUSH over loopback TCP): the corrupt frame's fraction is flagged
    with the reason naming series and frame; the next frame is reduced as usual."""
    raw_messages, _ = stream_v2_series("lz4", np.uint16)
    start, first, second, *_ = through_the_streamer(raw_messages, "workers")
    with WorkerOnLoopback() as running:
        for message in (start, corrupt(first), second):
            running.send(message)
        received, done = [], []
        while len(received) < 3 and running.results.poll(20000):
            received.append(protocol.recv(running.results)[1])
        while len(done) < 2 and (message := running.from_worker(20)) is not None:
            if message.type == "done":
                done.append(message["frame_index"])
    assert done == [0, 1]  # each frame acknowledged to the streamer after its fraction went out
    assert [m.type for m in received] == ["fraction", "pattern", "fraction"]
    flagged, _, reduced = received
    assert flagged["frame_index"] == 0 and flagged["status"] == "flagged"
    assert "FrameDecodeError" in flagged["reason"] and "series 'compressed-forwarding' frame 0" in flagged["reason"]
    assert reduced["frame_index"] == 1 and reduced["status"] == "ok"
    assert running.worker.frames_reduced == 2


def test_a_payload_whose_header_contradicts_the_image_size_is_dropped_at_the_streamer():
    """What can be checked without decompressing still is: a payload declaring fewer bytes than
    the tag-40 dimensions hold is dropped (shape_mismatch), as when the streamer decompressed."""
    raw_messages, _ = stream_v2_series("bslz4", np.uint32)
    decoder = StreamV2Decoder("dectris2:test", decompress="workers")
    decoder.feed(raw_messages[0])
    small = np.zeros((SHAPE[0] - 1, SHAPE[1]), np.uint32)
    tag = encode_multi_dim(small, "bslz4")
    tag.value[0] = list(SHAPE)  # dimensions of the full image around the payload of a smaller one
    bad = encode_message({"type": "image", "series_id": 1, "series_unique_id": "compressed-forwarding",
                          "image_id": 0, "data": {"threshold_1": tag}})
    assert decoder.feed(bad) == []
    assert decoder.counters["shape_mismatch"] == 1


def test_recorded_compressed_frames_replay_as_the_same_images(tmp_path):
    """The recorder stores forwarded payloads as they came (HDF5 direct chunk writes) and
    read_messages gives the images back; a corrupt payload comes back compressed, to be flagged."""
    from beamkin.recording import read_messages
    from sinks.recorder import Recorder
    messages, images = [], []
    for algorithm, dtype in (("bslz4", np.uint16), ("lz4", np.uint32)):
        raw_messages, series_images = stream_v2_series(algorithm, dtype)
        messages += through_the_streamer(raw_messages, "workers")
        images += series_images
    frames = [m for m in messages if m.type == "frame"]
    messages[messages.index(frames[-1])] = corrupt(frames[-1])
    path = tmp_path / "forwarded.h5"
    with Recorder(path, raw_frames=True) as recorder:
        for message in messages:
            recorder.write(message)
        assert recorder.counters["compressed_images_stored"] == len(frames)
    replayed = [m for _, m in read_messages(path, types=("frame",))]
    assert len(replayed) == len(images)
    for message, image in zip(replayed[:-1], images[:-1]):
        assert message.arrays["image"].dtype == image.dtype and np.array_equal(message.arrays["image"], image)
    assert "image" not in replayed[-1].arrays
    with pytest.raises(FrameDecodeError, match=f"frame {N_FRAMES - 1}"):
        frame_image(replayed[-1])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), algorithm=st.sampled_from(["bslz4", "lz4"]))
def test_any_damaged_payload_gives_the_image_or_a_frame_decode_error(data, algorithm):
    """Total: whatever bytes of a forwarded payload are changed (header included), frame_image
    gives an image of the announced shape and dtype or raises FrameDecodeError, nothing else."""
    frame = FORWARDED[algorithm]
    payload = bytearray(frame.arrays["image_compressed"].tobytes())
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        payload = payload[: data.draw(st.integers(0, len(payload)))]
    damaged = protocol.Message("frame", dict(frame.fields), {"image_compressed": np.frombuffer(bytes(payload), np.uint8)})
    try:
        image = frame_image(damaged)
    except FrameDecodeError as exc:
        assert "series 'compressed-forwarding' frame 0" in str(exc)
    else:
        assert image.shape == SHAPE and image.dtype == np.uint16


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_forwarding_decoder_survives_any_damaged_image_message(data):
    """Damaged CBOR image messages in "workers" mode: the decoder drops or forwards them, never
    fails on one (handler_errors stays 0), and what it forwards is decodable or flagged."""
    raw_messages, _ = SERIES_BSLZ4
    decoder = StreamV2Decoder("dectris2:test", decompress="workers")
    decoder.feed(raw_messages[0])
    message = bytearray(raw_messages[1])
    for _ in range(data.draw(st.integers(1, 6))):
        message[data.draw(st.integers(0, len(message) - 1))] = data.draw(st.integers(0, 255))
    for out in decoder.feed(bytes(message)):
        wire = protocol.decode([bytes(part) for part in protocol.encode(out)])
        try:
            assert frame_image(wire).shape == SHAPE
        except FrameDecodeError:
            pass
    assert decoder.counters["handler_errors"] == 0


SERIES_BSLZ4 = stream_v2_series("bslz4", np.uint16)
FORWARDED = {algorithm: through_the_streamer(stream_v2_series(algorithm, np.uint16)[0][:2], "workers")[1]
             for algorithm in ("bslz4", "lz4")}
