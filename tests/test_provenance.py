"""Provenance of results (beamkin.provenance, docs/protocol.md "Provenance"): real stage processes
on loopback; the result and end name the reducer workers, their host and the configuration hash;
a duplicate fraction pushed into the inference is a reported conflict that leaves the result as
it was."""

from __future__ import annotations

import math
import re
import socket
import threading
import time

import numpy as np
import zmq

from beamkin import protocol
from beamkin.loopback import LoopbackPorts
from beamkin.provenance import config_sha256
from tests.stage_pipeline import (N_FRAMES, StagePipeline, canonical, free_ports, pipeline_config, scrape_until,
                                  value)


def test_result_and_end_name_the_workers_their_host_and_the_configuration():
    ports = LoopbackPorts.free()
    config = pipeline_config(ports)
    config["reducer"]["workers"] = 2
    with StagePipeline(config, ports) as pipeline:
        end = pipeline.wait_for_end()
    results = [m for m in pipeline.messages if m.type == "result"]
    assert len(results) == 1
    provenance = results[0]["result"]["provenance"]
    assert end["provenance"] == provenance

    assert provenance["config_sha256"] == config_sha256(canonical(config))  # what the stages were given
    assert re.fullmatch(r"[0-9a-f]{64}", provenance["config_sha256"])
    host = socket.gethostname()
    assert provenance["hosts"] == [host]
    assert provenance["inference"]["host"] == host
    # the workers named are those whose fractions the inference published, each frame counted once
    fractions = [m for m in pipeline.messages if m.type == "fraction"]
    assert sorted(m["frame_index"] for m in fractions) == list(range(N_FRAMES))
    senders = {(m["worker"], m["host"]) for m in fractions}
    assert {(w["worker"], w["host"]) for w in provenance["workers"]} == senders
    assert sum(w["frames"] for w in provenance["workers"]) == N_FRAMES
    for worker in provenance["workers"]:  # the DEALER identity the streamer knows: NAME/PID
        name, pid = worker["worker"].rsplit("/", 1)
        assert name.startswith(host) and pid.isdigit()
    assert provenance["conflicts"] == [] and provenance["counts"]["conflicts"] == 0
    assert provenance["flagged"] == [] and provenance["missing"] == []


def _series(series_id: str, n_frames: int) -> list[protocol.Message]:
    """A simulated F1 series (t0 = 5 s, k = 0.8 1/s, sigma 0.02) as start + fractions, one exact
    step per frame (``exact_schedule``: the sampler's batches do not depend on timing)."""
    rng = np.random.default_rng(1)
    start = protocol.make("start", series_id=series_id, kind="profile", source="test", detector={}, geometry={},
                          frame_time_s=1 / 3, exposure_s=0.3, n_frames=n_frames, gas_time_s=None)
    start.fields["exact_schedule"] = [1] * n_frames
    messages = [start]
    for index in range(n_frames):
        time_s = index / 3 + 0.15
        alpha = (1 - math.exp(-0.8 * (time_s - 5.0)) if time_s > 5.0 else 0.0) + rng.normal(0, 0.02)
        fraction = protocol.make("fraction", series_id=series_id, frame_index=index, time_s=time_s, exposure_s=0.3,
                                 alpha=float(alpha), sigma_alpha=0.02, status="ok", reason=None)
        fraction.fields.update(worker="w-0/1", host="reducer-host")
        messages.append(fraction)
    return messages


def test_a_duplicate_fraction_is_a_reported_conflict_and_does_not_change_the_result():
    ports = LoopbackPorts.free()
    config = pipeline_config(ports, particles=512)
    config["logging"]["level"] = "WARNING"
    n_frames = 24
    with StagePipeline(config, ports, stages=("infer",)) as pipeline:
        for message in _series("clean", n_frames) + [
                protocol.make("end", series_id="clean", n_frames=n_frames, reason="completed")]:
            pipeline.push(message)
        clean_end = pipeline.wait_for_end()
        for message in _series("dup", n_frames):
            pipeline.push(message)
            if message.type == "fraction" and message["frame_index"] == 14:  # frame 14 again, another value
                duplicate = protocol.make("fraction", **{**message.fields, "alpha": 0.9})
                duplicate.fields.update(worker="intruder/99", host="elsewhere")
                pipeline.push(duplicate)
        pipeline.push(protocol.make("end", series_id="dup", n_frames=n_frames, reason="completed"))
        dup_end = pipeline.wait_for_end()
        log_tail = "\n".join(pipeline.supervisor.stages["infer"].tail)

    results = {m["series_id"]: m["result"] for m in pipeline.messages if m.type == "result"}
    assert clean_end["series_id"] == "clean" and dup_end["series_id"] == "dup"
    conflicts = results["dup"]["provenance"]["conflicts"]
    assert conflicts == [{"frame_index": 14, "kept": {"worker": "w-0/1", "host": "reducer-host"},
                          "reported": {"worker": "intruder/99", "host": "elsewhere"}, "reason": "duplicate frame"}]
    assert dup_end["provenance"]["counts"]["conflicts"] == 1
    assert results["clean"]["provenance"]["conflicts"] == []
    # the first fraction of frame 14 stayed: the published fraction and the posterior are the clean run's
    published = [m for m in pipeline.messages if m.type == "fraction" and m["series_id"] == "dup"
                 and m["frame_index"] == 14]
    assert [m["worker"] for m in published] == ["w-0/1"]
    for name, model in results["clean"]["models"].items():
        other = results["dup"]["models"][name]
        assert other["log_evidence"] == model["log_evidence"], name
        assert other["params"] == model["params"], name
    # the conflict is logged, naming the series, the frame and both workers
    assert re.search(r"conflict: frame 14 of series dup received twice, from worker w-0/1 on reducer-host "
                     r"\(kept\) and from worker intruder/99 on elsewhere", log_tail), log_tail


class StallingWorker(threading.Thread):
    """A reducer worker that takes its frames, sends a flagged fraction for each at once, then
    falls silent (no ``done``, no more heartbeats once it holds ``capacity`` frames): the streamer
    declares it lost and hands its frames to the real worker, whose fractions of them then reach
    the inference second."""

    IDENTITY = "stall/1"

    def __init__(self, config: dict):
        super().__init__(daemon=True)
        self.config = config
        self.frames: list[int] = []
        self.ready = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        context = zmq.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, self.IDENTITY.encode())
        dealer.connect(self.config["endpoints"]["frames"])
        push = context.socket(zmq.PUSH)
        push.connect(self.config["endpoints"]["reduced"])
        protocol.send(dealer, protocol.make("ready", worker="stall", capacity=2))
        self.ready.set()
        last_heartbeat = time.monotonic()
        while not self.stop.is_set():
            if len(self.frames) < 2 and time.monotonic() - last_heartbeat > 0.5:  # alive until it holds two
                protocol.send(dealer, protocol.make("ready", worker="stall", capacity=2))
                last_heartbeat = time.monotonic()
            if not dealer.poll(100):
                continue
            _, message = protocol.recv(dealer)
            if message.type != "frame":
                continue
            fraction = protocol.make("fraction", series_id=message["series_id"], frame_index=message["frame_index"],
                                     time_s=message["time_s"], exposure_s=message["exposure_s"], alpha=None,
                                     sigma_alpha=None, status="flagged", reason="test: stalled worker")
            fraction.fields.update(worker=self.IDENTITY, host="stallhost")
            protocol.send(push, fraction)
            self.frames.append(message["frame_index"])
        dealer.close(0)
        push.close(1000)
        context.term()


def test_frames_of_a_lost_worker_are_listed_as_replaced_and_their_second_copies_as_conflicts():
    ports = LoopbackPorts.free()
    (streamer_port,) = free_ports(1)
    config = pipeline_config(ports, {"streamer": streamer_port})
    # the stalling worker must be declared lost, and the real worker's copies of its frames reach the
    # inference, before the series is complete there (the stalling worker's flagged fractions
    # complete it otherwise); the real worker is silent for a while on its first frame (pyFAI builds
    # its engine there: 0.85 s on a quiet machine, 3.9 s measured under heavy load): the default
    # timeout, 5 s, lies between
    config["streamer"]["worker_timeout_s"] = 5.0
    # and the series must still be open when those copies arrive: at full speed a quiet machine
    # reduces and assimilates all 36 frames within the timeout, and the result is out before the
    # stalling worker is declared lost (seen in CI). Paced in real time the series lasts 12 s, so
    # its frames 0 and 1 are dealt again (about 5.6 s) long before its last frame is read out
    config["simulator"]["speed"] = 1.0
    stalling = StallingWorker(config)

    def connect_the_stalling_worker() -> None:
        stalling.start()
        assert stalling.ready.wait(10)
        time.sleep(0.5)  # its ready reaches the streamer before the first frame

    try:
        with StagePipeline(config, ports, before_source=connect_the_stalling_worker) as pipeline:
            pipeline.wait_for_end()
            streamer = scrape_until(streamer_port, "beamkin_frames_reassigned_total",
                                    {"stage": "streamer", "reason": "silent"}, 2)
    finally:
        stalling.stop.set()
        stalling.join(5)

    taken = sorted(stalling.frames)
    assert len(taken) == 2  # its capacity: never acknowledged, never more
    assert value(streamer, "beamkin_frames_reassigned_total", stage="streamer", reason="silent") == 2
    assert value(streamer, "beamkin_frames_in_total", stage="streamer") == N_FRAMES
    assert value(streamer, "beamkin_frames_out_total", stage="streamer") == N_FRAMES + 2  # handed out again

    provenance = next(m for m in pipeline.messages if m.type == "result")["result"]["provenance"]
    real = {m["worker"] for m in pipeline.messages if m.type == "fraction"} - {StallingWorker.IDENTITY}
    assert len(real) == 1
    (real_worker,) = real
    assert sorted(r["frame_index"] for r in provenance["replaced"]) == taken
    for replaced in provenance["replaced"]:
        assert replaced["reduced_by"] == real_worker
        assert [t["worker"] for t in replaced["taken_from"]] == [StallingWorker.IDENTITY]
        assert replaced["taken_from"][0]["reason"].startswith("worker silent for")
    # the stalling worker's fractions came first and stay (flagged); the real worker's are conflicts
    assert sorted(c["frame_index"] for c in provenance["conflicts"]) == taken
    assert all(c["kept"] == {"worker": StallingWorker.IDENTITY, "host": "stallhost"}
               and c["reported"]["worker"] == real_worker for c in provenance["conflicts"])
    assert [(f["frame_index"], f["reason"]) for f in provenance["flagged"]] == [(i, "test: stalled worker")
                                                                                 for i in taken]
    frames = {w["worker"]: w["frames"] for w in provenance["workers"]}
    assert frames == {StallingWorker.IDENTITY: 2, real_worker: N_FRAMES - 2}


def test_the_configuration_hash_is_canonical_and_the_lists_are_bounded():
    from beamkin.provenance import MAX_LISTED, SeriesProvenance

    assert config_sha256({"a": 1, "b": {"c": [1, 2], "d": "é"}}) == config_sha256({"b": {"d": "é", "c": [1, 2]}, "a": 1})
    assert config_sha256({"a": 1}) != config_sha256({"a": 2})
    provenance = SeriesProvenance("h")
    for index in range(MAX_LISTED + 5):
        fraction = protocol.make("fraction", series_id="s", frame_index=index, time_s=float(index), exposure_s=0.3,
                                 alpha=None, sigma_alpha=None, status="flagged", reason="x" * 500)
        fraction.fields.update(worker={"not": "a name"}, host="h" * 1000)  # a hostile header stays small
        assert provenance.received(fraction) is None
        assert provenance.received(fraction)["frame_index"] == index  # the same frame again: a conflict
    summary = provenance.as_dict()
    assert summary["counts"] == {"flagged": MAX_LISTED + 5, "replaced": 0, "conflicts": MAX_LISTED + 5, "missing": 0}
    assert len(summary["flagged"]) == len(summary["conflicts"]) == MAX_LISTED
    assert summary["workers"] == [{"worker": "?", "host": "h" * 128, "frames": MAX_LISTED + 5}]
    assert len(summary["flagged"][0]["reason"]) == 200
