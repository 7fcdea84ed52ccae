"""Provenance of results (beamkin.provenance, docs/protocol.md "Provenance"): real stage processes
on loopback; the result and end name the reducer workers, their host and the configuration hash;
a duplicate fraction pushed into the inference is a reported conflict that leaves the result as
it was."""

from __future__ import annotations

import math
import re
import socket

import numpy as np

from beamkin import protocol
from beamkin.loopback import LoopbackPorts
from beamkin.provenance import config_sha256
from tests.stage_pipeline import N_FRAMES, StagePipeline, canonical, pipeline_config


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
