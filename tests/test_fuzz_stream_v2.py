"""Stream V2 decoding is total (issue 11): any bytes give messages or a counted drop, never an
exception, and a good series after hostile input is decoded exactly as without it.

Hypothesis drives random bytes, random CBOR values and random start fields; the hostile cases of
issue 11 are explicit examples. CBOR is written by the independent encoder of test_stream_v2.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from beamkin.errors import StreamDecodeError
from streamer.cbor_decode import decode_message, rational_seconds
from streamer.stream_v2 import StreamV2Decoder
from tests.test_stream_v2 import END, NX, NY, Tag, cbor, image_msg, mdarray, self_described, start_msg

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def good_series() -> list[bytes]:
    images = [mdarray(np.full((NY, NX), 10 + i, np.uint16), "bslz4") for i in range(3)]
    return [self_described(start_msg(series_unique_id="good")),
            *[self_described(image_msg(i, {"threshold_1": im}, series="good")) for i, im in enumerate(images)],
            self_described(dict(END, series_unique_id="good"))]


GOOD = good_series()
REFERENCE = StreamV2Decoder("dectris2:test")
EXPECTED = [m for data in GOOD for m in REFERENCE.feed(data)]


def assert_good_series_after(hostile: list[bytes]) -> None:
    """Feed the hostile messages, then the good series: no exception; the good series comes out
    exactly (an open series left by the hostile input is ended as aborted first)."""
    decoder = StreamV2Decoder("dectris2:test")
    for data in hostile:
        decoder.feed(data)
    out = [m for data in GOOD for m in decoder.feed(data)]
    tail = out[-len(EXPECTED):]
    assert [(m.type, m.series_id, m.get("frame_index")) for m in tail] == \
        [(m.type, m.series_id, m.get("frame_index")) for m in EXPECTED]
    for got, want in zip(tail, EXPECTED):
        for name, array in want.arrays.items():
            np.testing.assert_array_equal(got.arrays[name], array)
        assert got.fields == want.fields
    assert all(m.type == "end" and m["reason"] == "aborted" for m in out[:-len(EXPECTED)] if m.type != "status")
    assert decoder.counters["handler_errors"] == 0


#: issue 11 and 12 hostile Stream V2 input, each an explicit example below
HUGE_RATIONAL = self_described(image_msg(0, {"threshold_1": mdarray(np.zeros((NY, NX), np.uint16))},
                                         start=[2**1100, 1], stop=[2**1100 + 1, 1]))
NUL_SERIES = self_described(start_msg(series_unique_id="a\x00b/../c"))
DEEP_CBOR = b"\x81" * 100_000 + b"\x00"
HUGE_DIMS = self_described(image_msg(0, {"threshold_1": Tag(40, [[2**62, 2**62], Tag(69, b"")])}))
HUGE_NUMBERS = self_described(start_msg(number_of_images=2**70, image_size_x=2**64 - 1, count_time=2**1100,
                                        detector_translation=[0, 0, 2**1100], series_id=2**200))
NO_TIMES = self_described({k: v for k, v in start_msg().items() if k not in ("frame_time", "count_time")})
STRAY_IMAGE = self_described(image_msg(200_000, {"threshold_1": mdarray(np.zeros((NY, NX), np.uint16))}))


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=4))
@example([HUGE_RATIONAL])
@example([self_described(start_msg()), HUGE_RATIONAL])
@example([NUL_SERIES])
@example([DEEP_CBOR])
@example([self_described(start_msg()), HUGE_DIMS])
@example([HUGE_NUMBERS])
@example([NO_TIMES])
@example([self_described(start_msg()), STRAY_IMAGE])
def test_fuzz_random_bytes_then_a_good_series(hostile):
    for data in hostile:
        try:
            decode_message(data)
        except StreamDecodeError:
            pass
    assert_good_series_after(hostile)


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    | st.builds(Tag, st.sampled_from([0, 2, 40, 41, 64, 69, 70, 83, 86, 1040, 56500, 55799, 99999]), children),
    max_leaves=12,
)
START_KEYS = sorted(start_msg()) + ["pixel_mask", "flatfield", "detector_distance", "incident_energy", "image_size_y"]


@FUZZ
@given(st.dictionaries(st.sampled_from(START_KEYS), cbor_values, max_size=6),
       st.sampled_from(["start", "image", "end", "other"]))
def test_fuzz_messages_with_random_field_values(fields, message_type):
    base = start_msg() if message_type == "start" else image_msg(1, {"threshold_1": mdarray(np.zeros((NY, NX), np.uint16))})
    message = {**base, **fields, "type": message_type}
    hostile = [self_described(start_msg()), self_described(message)]
    assert_good_series_after(hostile)


def test_rational_time_beyond_float_range_is_a_decode_error():
    for value in ([2**1100, 1], [1, 0], [-(2**1100), 3], [10**10 * 2**40, 1]):
        try:
            rational_seconds(value, "start_time")
        except StreamDecodeError as exc:
            assert exc.field == "start_time"
        else:
            raise AssertionError(f"{value} accepted")
    assert rational_seconds([3, 2], "start_time") == 1.5


def test_an_image_id_beyond_the_announced_length_is_dropped_with_one_warning(caplog):
    """Issue 11: image_id 200 000 in a 36-frame series gave 199 964 log lines and a wrong k."""
    decoder = StreamV2Decoder("dectris2:test")
    image = {"threshold_1": mdarray(np.zeros((NY, NX), np.uint16))}
    caplog.set_level("WARNING")
    out = decoder.feed(self_described(start_msg(number_of_images=36)))
    for image_id in (200_000, 36, 10**6, 37, 2**40):
        out += decoder.feed(self_described(image_msg(image_id, image, start=[0, 10], stop=[3, 10])))
    out += decoder.feed(self_described(image_msg(35, image)))
    assert [(m.type, m.get("frame_index")) for m in out] == [("start", None), ("frame", 35)]
    assert decoder.counters["frame_index_out_of_range"] == 5
    assert sum("announced 36 frames" in r.getMessage() for r in caplog.records) == 1


def test_unknown_length_accepts_a_bounded_window():
    decoder = StreamV2Decoder("dectris2:test", frame_index_window=10)
    image = {"threshold_1": mdarray(np.zeros((NY, NX), np.uint16))}
    start = start_msg()
    del start["number_of_images"]
    out = decoder.feed(self_described(start))
    for image_id in (0, 10, 21, 20, 30):  # 21 > 10 + 10: dropped; 20 and 30 within the window of 10 and 20
        out += decoder.feed(self_described(image_msg(image_id, image)))
    assert [m["frame_index"] for m in out[1:]] == [0, 10, 20, 30]
    assert decoder.counters["frame_index_out_of_range"] == 1


def test_the_duplicate_check_holds_only_out_of_order_indices():
    from streamer.series import _SeenIndices

    seen = _SeenIndices()
    for index in [0, 1, 2, 5, 3, 7, 4]:
        assert index not in seen
        seen.add(index)
    assert all(i in seen for i in (0, 1, 2, 3, 4, 5, 7)) and 6 not in seen and 8 not in seen
    assert seen.low == 6 and seen.above == {7}
