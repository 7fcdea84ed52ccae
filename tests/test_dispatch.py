"""Frame dispatch to reducer workers (streamer.service.FrameDispatcher) on real loopback sockets."""

import numpy as np
import zmq

from beamkin import protocol
from streamer.service import FrameDispatcher


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
        start = protocol.make("start", source="test", series_id="s", kind="profile", detector={}, geometry={},
                              frame_time_s=0.1, exposure_s=0.1, n_frames=6, gas_time_s=None)
        dispatcher.starts["s"] = start
        served = []
        for index in range(6):
            profile = {"two_theta_deg": np.linspace(2, 20, 8), "counts": np.ones(8)}
            dispatcher.pending.append(protocol.make("frame", profile, series_id="s", frame_index=index,
                                                    time_s=0.1 * index, exposure_s=0.1))
            dispatcher.dispatch()
            (worker,) = [w for w in dispatcher.workers.values() if w.in_flight]
            served.append(worker.name)
            dealer = dealers[worker.name]
            while True:  # the start (first time) and the frame
                assert dealer.poll(5000)
                _, message = protocol.recv(dealer)
                if message.type == "frame":
                    break
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
