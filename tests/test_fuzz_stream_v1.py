"""Stream V1 decoding is total (issue 11): any multipart gives messages or a counted drop, never an
exception, and a good series afterwards comes out exactly as without the hostile input."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from streamer.stream_v1 import StreamV1Decoder
from tests.test_stream_v1 import CONFIG, end, header, image, img, j

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GOOD = [header(91), *[image(91, i, img(i), encoding="<") for i in range(4)], end(91)]  # raw: no codec time per example
def expected_messages():
    decoder = StreamV1Decoder("dectris1:test")
    return [m for parts in GOOD for m in decoder.feed(parts)]


EXPECTED = expected_messages()


def assert_good_series_after(hostile: list[list[bytes]]) -> None:
    decoder = StreamV1Decoder("dectris1:test")
    for parts in hostile:
        decoder.feed(parts)
    out = [m for parts in GOOD for m in decoder.feed(parts)]
    tail = out[-len(EXPECTED):]
    assert [(m.type, m.series_id, m.get("frame_index")) for m in tail] == \
        [(m.type, m.series_id, m.get("frame_index")) for m in EXPECTED]
    for got, want in zip(tail, EXPECTED):
        assert got.fields == want.fields
        for name, array in want.arrays.items():
            np.testing.assert_array_equal(got.arrays[name], array)
    assert decoder.counters["handler_errors"] == 0


DEEP = [b"[" * 100_000 + b"]" * 100_000]
HUGE_TIMES = image(7, 0, img(0))[:3] + [j({"htype": "dconfig-1.0", "start_time": 2**1100, "stop_time": 2**1100 + 1,
                                           "real_time": 1})]
NAN_TIMES = image(7, 0, img(0))[:3] + [b'{"htype": "dconfig-1.0", "start_time": NaN, "stop_time": Infinity}']
HUGE_SIZES = header(7, config={**CONFIG, "x_pixels_in_detector": 1e300, "nimages": 1e300, "ntrigger": -1})
NUL_SERIES = header("a\x00b")


@FUZZ
@given(st.lists(st.lists(st.binary(max_size=120), max_size=4), max_size=3))
@example([DEEP])
@example([header(7), HUGE_TIMES])
@example([header(7), NAN_TIMES])
@example([HUGE_SIZES, image(7, 0, img(0))])
@example([NUL_SERIES, image("a\x00b", 0, img(0))])
@example([header(7), image(7, 200_000, img(0))])
def test_fuzz_random_multiparts_then_a_good_series(hostile):
    assert_good_series_after(hostile)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats() | st.text(max_size=6),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=10)


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(CONFIG)), json_values, max_size=5),
       st.dictionaries(st.sampled_from(["htype", "series", "frame", "start_time", "stop_time", "real_time", "shape",
                                        "type", "encoding"]), json_values, max_size=3))
def test_fuzz_header_and_image_fields(config_changes, image_changes):
    import json

    bad_header = header(7, config={**CONFIG, **config_changes})
    bad_image = image(7, 1, img(1))
    part = 0 if {"htype", "series", "frame"} & set(image_changes) else 1
    try:
        bad_image[part] = j({**json.loads(bad_image[part]), **image_changes})
    except (TypeError, ValueError):
        pass
    assert_good_series_after([bad_header, bad_image, image(7, 0, img(0))])
