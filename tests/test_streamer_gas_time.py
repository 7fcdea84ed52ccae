"""ts given to the streamer wins over what the source said (a detector's user data, a header)."""

import logging

from beamkin import protocol
from streamer.service import apply_gas_time, source_options


def start(gas_time_s):
    return protocol.make("start", series_id="s", kind="image", source="dectris2:tcp://det:31001", detector={},
                         geometry={}, frame_time_s=0.1, exposure_s=0.1, n_frames=10, gas_time_s=gas_time_s)


def test_the_streamers_gas_time_overrides_the_detectors_and_says_so(caplog):
    caplog.set_level(logging.INFO, logger="streamer.service")
    message = start(5.0)  # the detector's user data said 5 s
    apply_gas_time(message, source_options({"gas_time_s": 3.5})["gas_time_s"])
    assert message["gas_time_s"] == 3.5
    assert "ts = 3.5 s from [streamer] gas_time_s (the source said 5.0 s)" in caplog.text


def test_an_unset_gas_time_keeps_the_sources():
    for unset in (-1.0, None):
        message = start(5.0)
        apply_gas_time(message, source_options({"gas_time_s": unset})["gas_time_s"])
        assert message["gas_time_s"] == 5.0
    message = start(None)
    apply_gas_time(message, source_options({"gas_time_s": 2.0})["gas_time_s"])
    assert message["gas_time_s"] == 2.0


def test_a_gas_time_of_zero_is_a_time():
    message = start(5.0)
    apply_gas_time(message, source_options({"gas_time_s": 0.0})["gas_time_s"])
    assert message["gas_time_s"] == 0.0
