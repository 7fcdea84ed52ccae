"""Frame dispatch to reducer workers (streamer.service.FrameDispatcher) on real loopback sockets."""

import numpy as np
import zmq

from beamkin import protocol
from streamer.service import FrameDispatcher


def profile_start(series_id: str, n_frames: int, source: str = "test", frame_time_s: float = 0.1) -> protocol.Message:
    """The start of a 1D profile series of 8-point profiles (exposure = frame time, seconds)."""
    return protocol.make("start", source=source, series_id=series_id, kind="profile", detector={"shape": [1, 8]},
                         geometry={}, frame_time_s=frame_time_s, exposure_s=frame_time_s, n_frames=n_frames,
                         gas_time_s=None)


def streamer_config_on_free_ports() -> dict:
    """The default configuration with the streamer's four endpoints on free loopback ports."""
    import socket

    from beamkin import config as configuration

    config = configuration.defaults()
    held = [socket.socket() for _ in range(4)]
    for s in held:
        s.bind(("127.0.0.1", 0))
    for name, s in zip(("frames", "raw", "reduced", "record"), held):
        config["endpoints"][name] = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    for s in held:
        s.close()
    return config


def keep_dispatcher(monkeypatch) -> dict:
    """A dict that will hold (key "dispatcher") the FrameDispatcher the streamer makes."""
    from streamer import service

    kept = {}
    original = service.FrameDispatcher.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        kept["dispatcher"] = self

    monkeypatch.setattr(service.FrameDispatcher, "__init__", keep)
    return kept


def test_idle_workers_take_frames_in_turn():
    """Frames handed out one at a time, each acknowledged before the next: the equally idle
    workers alternate, so both have the series started (integrator built) from the start."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dispatcher = FrameDispatcher(router, worker_timeout_s=5.0)
    dealers = {}
    try:
        for name in ("w1", "w2"):
            dealer = context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.IDENTITY, name.encode())
            dealer.connect(f"tcp://127.0.0.1:{port}")
            protocol.send(dealer, protocol.make("ready", worker=name, capacity=2))
            dealers[name] = dealer
        for _ in range(2):
            assert router.poll(5000)
            dispatcher.handle_worker_message()
        start = profile_start("s", n_frames=6)
        dispatcher.starts["s"] = start
        served = []
        for index in range(6):
            profile = {"two_theta_deg": np.linspace(2, 20, 8), "counts": np.ones(8)}
            dispatcher.pending.append(protocol.make("frame", profile, series_id="s", frame_index=index,
                                                    time_s=0.1 * index, exposure_s=0.1))
            dispatcher.dispatch()
            if index == 0:  # each worker is sent the start alone; its next ready says it can take frames
                for name, dealer in dealers.items():
                    assert dealer.poll(5000) and protocol.recv(dealer)[1].type == "start"
                    assert not dealer.poll(200), "a frame came with the start"
                    protocol.send(dealer, protocol.make("ready", worker=name, capacity=2))
                    assert router.poll(5000)
                    dispatcher.handle_worker_message()
                dispatcher.dispatch()
            (worker,) = [w for w in dispatcher.workers.values() if w.in_flight]
            served.append(worker.name)
            dealer = dealers[worker.name]
            assert dealer.poll(5000)
            assert protocol.recv(dealer)[1].type == "frame"
            protocol.send(dealer, protocol.make("done", worker=worker.name, series_id="s", frame_index=index))
            assert router.poll(5000)
            dispatcher.handle_worker_message()
        # whichever worker's ready message came first, the two alternate
        assert set(served[:2]) == {"w1", "w2"} and served == served[:2] * 3
        assert dispatcher.counters["frames_done"] == 6
    finally:
        for dealer in dealers.values():
            dealer.close(0)
        router.close(0)
        context.term()


def test_a_worker_building_the_series_integrator_is_sent_none_of_its_frames():
    """A frame sent with the start would wait behind the worker's integrator build, which on a
    loaded host outlasted the inference's missing_timeout_s and lost the frame
    (tests/test_multihost.py).  The start goes alone; until a worker's ready lists the series as
    set up, its frames go to a worker that has its integrator, or wait.  A heartbeat the worker
    sent before it read the start (a CPU-starved worker read it 3 s late) releases nothing."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dispatcher = FrameDispatcher(router, worker_timeout_s=5.0)
    dealers = {}

    def say(name, **fields):
        protocol.send(dealers[name], protocol.make("ready", worker=name, capacity=2, **fields))
        assert router.poll(5000)
        dispatcher.handle_worker_message()

    def frames_received(name):
        types = []
        while dealers[name].poll(300):
            types.append(protocol.recv(dealers[name])[1])
        return [m["frame_index"] for m in types if m.type == "frame"], [m.type for m in types]

    try:
        for name in ("slow", "fast"):
            dealers[name] = context.socket(zmq.DEALER)
            dealers[name].setsockopt(zmq.IDENTITY, name.encode())
            dealers[name].connect(f"tcp://127.0.0.1:{port}")
            say(name)
        dispatcher.series_started(profile_start("s", n_frames=4))
        for index in range(4):
            dispatcher.pending.append(protocol.make("frame", {"two_theta_deg": np.linspace(2, 20, 8),
                                                              "counts": np.ones(8)},
                                                    series_id="s", frame_index=index, time_s=0.1 * index,
                                                    exposure_s=0.1))
        dispatcher.dispatch()
        assert frames_received("slow") == ([], ["start"]) and frames_received("fast") == ([], ["start"])
        say("slow", quiet_s=0.0, series=[])    # a heartbeat from before it read the start
        say("slow", quiet_s=300.0, series=[])  # building its integrator
        say("fast", quiet_s=300.0, series=[])
        say("fast", quiet_s=0.0, series=["s"])  # built
        dispatcher.dispatch()
        assert frames_received("fast")[0] == [0, 1]
        say("slow", quiet_s=0.0, series=[])    # still no integrator
        dispatcher.dispatch()
        assert frames_received("slow")[0] == [] and len(dispatcher.pending) == 2  # wait, though it has credit
        say("slow", quiet_s=0.0, series=["s"])  # built too
        dispatcher.dispatch()
        assert frames_received("slow")[0] == [2, 3] and not dispatcher.pending
    finally:
        for dealer in dealers.values():
            dealer.close(0)
        router.close(0)
        context.term()


def _router_and_dealer(context, name=b"w1"):
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, name)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    return router, dealer


def test_malformed_ready_messages_from_a_dealer_are_counted_and_survived():
    """Issue 11: one `ready` declaring an array of shape [2^32, 2^32] with an empty buffer killed
    the streamer. Now it and its relatives are counted, and a good worker is still served."""
    import json

    context = zmq.Context()
    router, dealer = _router_and_dealer(context)
    dispatcher = FrameDispatcher(router, worker_timeout_s=5.0)
    header = {"protocol": "beamkin", "version": 1, "type": "ready", "worker": "w1", "capacity": 2}
    hostile = [
        [b"ready", json.dumps({**header, "arrays": [{"name": "x", "dtype": "<u1", "shape": [2**32, 2**32]}]}).encode(), b""],
        [b"ready", b"[" * 100_000 + b"]" * 100_000],
        [b"ready", json.dumps({**header, "capacity": 2**60}).encode()],
        [b"ready", json.dumps({**header, "capacity": 10**6, "quiet_s": 1e308}).encode()],
        [b"ready", json.dumps({**header, "quiet_s": float("nan")}).encode()],
        [b"done", json.dumps({"protocol": "beamkin", "version": 1, "type": "done", "worker": "w1",
                              "series_id": "nope", "frame_index": 3}).encode()],
        [b"\xff"],
    ]
    try:
        for parts in hostile:
            dealer.send_multipart(parts)
            assert router.poll(5000)
            dispatcher.handle_worker_message()
        c = dispatcher.counters
        assert c["malformed_worker_messages"] == 5  # shape, nesting, capacity beyond 2^53, NaN quiet_s, one part
        assert c["worker_capacity_clamped"] == 1 and c["handler_errors"] == 0
        worker = dispatcher.workers[b"w1"]
        assert worker.capacity == 256 and worker.quiet_s == 3600.0
        protocol.send(dealer, protocol.make("ready", worker="w1", capacity=1))
        assert router.poll(5000)
        dispatcher.handle_worker_message()
        dispatcher.starts["s"] = profile_start("s", n_frames=1)
        dispatcher.pending.append(protocol.make("frame", {"two_theta_deg": np.linspace(2, 20, 8), "counts": np.ones(8)},
                                                series_id="s", frame_index=0, time_s=0.05, exposure_s=0.1))
        dispatcher.dispatch()
        received = []
        while dealer.poll(2000):
            received.append(protocol.recv(dealer)[1].type)
            if received[-1] == "start":  # the worker's next ready: ready for the series' frames
                protocol.send(dealer, protocol.make("ready", worker="w1", capacity=1))
                assert router.poll(5000)
                dispatcher.handle_worker_message()
                dispatcher.dispatch()
            if received[-1] == "frame":
                break
        assert received == ["start", "frame"]
    finally:
        dealer.close(0)
        router.close(0)
        context.term()


def test_per_series_state_is_released_when_a_series_ended_and_its_frames_are_done():
    """Issue 11: 100 forged starts must not leave 100 series behind in the streamer."""
    context = zmq.Context()
    router, dealer = _router_and_dealer(context)
    dispatcher = FrameDispatcher(router, worker_timeout_s=5.0)
    try:
        protocol.send(dealer, protocol.make("ready", worker="w1", capacity=4))
        assert router.poll(5000)
        dispatcher.handle_worker_message()
        for n in range(100):
            series = f"forged-{n}"
            dispatcher.series_started(profile_start(series, n_frames=1))
            dispatcher.pending.append(protocol.make("frame", {"two_theta_deg": np.linspace(2, 20, 8), "counts": np.ones(8)},
                                                    series_id=series, frame_index=0, time_s=0.05, exposure_s=0.1))
            dispatcher.dispatch()  # the start alone
            protocol.send(dealer, protocol.make("ready", worker="w1", capacity=4))
            assert router.poll(5000)
            dispatcher.handle_worker_message()
            dispatcher.dispatch()  # the frame
            dispatcher.series_ended(series)
            assert series in dispatcher.starts  # its frame is still in flight
            protocol.send(dealer, protocol.make("done", worker="w1", series_id=series, frame_index=0))
            assert router.poll(5000)
            dispatcher.handle_worker_message()
            dispatcher.release_finished()
        assert dispatcher.starts == {} and dispatcher.ended == set()
        assert dispatcher.workers[b"w1"].series_started == set() and dispatcher.workers[b"w1"].building == set()
        assert dispatcher.counters["frames_done"] == 100
    finally:
        dealer.close(0)
        router.close(0)
        context.term()


def test_a_failing_message_is_survived_and_a_failing_source_makes_the_streamer_exit_non_zero(monkeypatch):
    """Issue 11: an exception escaping the source made the streamer exit 0 ("stage streamer
    finished") while nobody read the detector. Now one message that cannot be handled is logged
    and counted, and a source that dies makes run_streamer return 1."""
    import threading
    from collections import Counter

    from streamer import service

    class FailingSource:
        spec = "failing:"
        counters = Counter()

        def messages(self, stop):
            yield profile_start("s", n_frames=2, source="failing:")
            yield protocol.make("end", series_id="s", n_frames=0, reason="aborted", note={1, 2})  # not JSON: cannot be sent
            raise RuntimeError("detector link lost")

    monkeypatch.setattr("streamer.sources.open_source", lambda spec, options: FailingSource())
    config = streamer_config_on_free_ports()
    counters = keep_dispatcher(monkeypatch)
    assert service.run_streamer(config, threading.Event()) == 1
    assert counters["dispatcher"].counters["handler_errors"] == 1


def test_frames_that_no_worker_takes_are_held_with_a_back_pressure_warning(monkeypatch, caplog):
    """A source faster than the workers (here: no worker at all) fills the pending queue to
    max_pending_frames; the streamer then says so once, holds the source back, and drops nothing."""
    import threading
    from collections import Counter

    from streamer import service

    sent = []

    class FastSource:
        spec = "fast:"
        counters = Counter()

        def messages(self, stop):
            yield profile_start("s", n_frames=100, source="fast:", frame_time_s=0.01)
            for i in range(100):
                if stop.is_set():
                    return
                sent.append(i)
                yield protocol.make("frame", arrays={"two_theta_deg": np.linspace(2, 10, 8), "counts": np.ones(8)},
                                    series_id="s", frame_index=i, time_s=0.01 * i, exposure_s=0.01)

    monkeypatch.setattr("streamer.sources.open_source", lambda spec, options: FastSource())
    config = streamer_config_on_free_ports()
    config["streamer"]["max_pending_frames"] = 8
    counters = keep_dispatcher(monkeypatch)
    stop = threading.Event()
    with caplog.at_level("WARNING", logger="streamer.service"):
        runner = threading.Thread(target=service.run_streamer, args=(config, stop), daemon=True)
        runner.start()
        for _ in range(600):
            if any("back-pressure" in r.getMessage() for r in caplog.records):
                break
            threading.Event().wait(0.05)
        stop.set()
        runner.join(30)
    warnings = [r.getMessage() for r in caplog.records if "back-pressure" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("back-pressure: 8 frames wait"), warnings
    dispatcher = counters["dispatcher"]
    assert dispatcher.counters["backpressure_episodes"] == 1
    # held back, not dropped: the source was read no further than the queues hold
    assert [m["frame_index"] for m in dispatcher.pending] == list(range(8))
    assert len(sent) < 100
