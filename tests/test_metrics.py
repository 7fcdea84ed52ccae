"""Stage metrics (beamkin.metrics): real stage processes on loopback, their /metrics endpoints
scraped over HTTP, counts compared with the frames sent; the Grafana dashboard queries only
metrics the stages export."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beamkin import protocol
from beamkin.loopback import LoopbackPorts
from tests.stage_pipeline import (N_FRAMES, StagePipeline, free_port_pair, free_ports, pipeline_config, scrape,
                                  scrape_until, value)

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("streamer", "reducer", "inference", "dashboard", "recorder")


def test_every_stage_counts_each_frame_of_a_series_once(tmp_path):
    ports = LoopbackPorts.free()
    metric_ports = dict(zip(STAGES, free_ports(len(STAGES))))
    metric_ports["reducer"] = free_port_pair()  # worker i of --workers N serves on reducer_port + i
    second_worker_port = metric_ports["reducer"] + 1
    config = pipeline_config(ports, metric_ports)
    config["recorder"]["path"] = str(tmp_path / "series.h5")
    config["reducer"]["workers"] = 2
    with StagePipeline(config, ports, stages=("infer", "dashboard", "record", "stream", "reduce")) as pipeline:
        pipeline.wait_for_end()
        scraped = {stage: scrape_until(port, "beamkin_frames_out_total", {"stage": stage}, N_FRAMES)
                   for stage, port in metric_ports.items() if stage != "reducer"}
        deadline = time.monotonic() + 60
        while True:  # a worker counts its frame out just after sending the fraction
            workers = [scrape(metric_ports["reducer"]), scrape(second_worker_port)]
            if sum(value(w, "beamkin_frames_out_total", stage="reducer") for w in workers) == N_FRAMES:
                break
            assert time.monotonic() < deadline, workers
            time.sleep(0.2)

    # the two workers together reduced every frame once, each served on its own port
    for name in ("beamkin_frames_in_total", "beamkin_frames_out_total", "beamkin_stage_latency_seconds_count"):
        assert sum(value(w, name, stage="reducer") for w in workers) == N_FRAMES, name
    for samples in workers:
        assert value(samples, "process_resident_memory_bytes") > 10e6
    for stage, samples in scraped.items():
        assert value(samples, "beamkin_frames_in_total", stage=stage) == N_FRAMES, stage
        assert value(samples, "beamkin_frames_out_total", stage=stage) == N_FRAMES, stage
        assert value(samples, "process_resident_memory_bytes") > 10e6, stage  # the process collector is on
        assert not [key for key in samples if key[0] == "beamkin_frames_dropped_total"], stage
    for stage in ("streamer", "inference", "dashboard", "recorder"):  # every frame timed in its stage
        assert value(scraped[stage], "beamkin_stage_latency_seconds_count", stage=stage) == N_FRAMES, stage

    streamer = scraped["streamer"]
    assert value(streamer, "beamkin_reducer_workers_live") == 2
    assert value(streamer, "beamkin_queue_depth", stage="streamer", queue="pending") == 0
    assert value(streamer, "beamkin_queue_depth", stage="streamer", queue="in_flight") == 0

    inference = scraped["inference"]
    assert value(inference, "beamkin_exact_sampler_lag_frames") == 0  # the series is over: caught up
    assert value(inference, "beamkin_ess_min", output="posterior") > 0
    assert value(inference, "beamkin_ess_min", output="estimate") > 0
    assert value(inference, "beamkin_queue_depth", stage="inference", queue="inbox") == 0
    # end to end: every frame to its exact posterior, and each frame whose estimate was published
    assert value(inference, "beamkin_end_to_end_latency_seconds_count", output="posterior") == N_FRAMES
    assert value(inference, "beamkin_end_to_end_latency_seconds_count", output="estimate") == N_FRAMES
    # the end-to-end latency includes the streamer's, reducer's and inference's own time
    e2e_mean = (value(inference, "beamkin_end_to_end_latency_seconds_sum", output="posterior") / N_FRAMES)
    in_inference = value(inference, "beamkin_stage_latency_seconds_sum", stage="inference") / N_FRAMES
    assert e2e_mean >= in_inference


def _fraction(series_id: str, index: int, alpha: float | None, status: str = "ok", reason: str | None = None,
              worker: str = "w/1") -> protocol.Message:
    message = protocol.make("fraction", series_id=series_id, frame_index=index, time_s=index / 3 + 0.15,
                            exposure_s=0.3, alpha=alpha, sigma_alpha=0.02 if alpha is not None else None,
                            status=status, reason=reason)
    message.fields.update(worker=worker, host="testhost")
    return message


def _start(series_id: str, n_frames: int) -> protocol.Message:
    return protocol.make("start", series_id=series_id, kind="profile", source="test", detector={}, geometry={},
                         frame_time_s=1 / 3, exposure_s=0.3, n_frames=n_frames, gas_time_s=None)


def test_flagged_duplicate_and_out_of_range_frames_count_their_reason():
    """A flagged fraction, the same frame from a second worker and a frame beyond the series
    are each counted under their reason; the Grafana dashboard's metrics are all exported."""
    ports = LoopbackPorts.free()
    (port,) = free_ports(1)
    config = pipeline_config(ports, {"inference": port}, particles=256)
    n_frames = 10
    with StagePipeline(config, ports, stages=("infer",)) as pipeline:
        messages = [_start("s-metrics", n_frames)]
        for index in range(n_frames):
            if index == 2:
                messages.append(_fraction("s-metrics", index, None, "flagged", "pattern flagged: no peak above noise"))
            else:
                messages.append(_fraction("s-metrics", index, 0.0))
            if index == 5:
                messages.append(_fraction("s-metrics", index, 0.5, worker="intruder/2"))
        messages.append(_fraction("s-metrics", n_frames + 3, 0.0))  # beyond the 10 frames announced
        messages.append(protocol.make("end", series_id="s-metrics", n_frames=n_frames, reason="completed"))
        for message in messages:
            pipeline.push(message)
        pipeline.wait_for_end()
        samples = scrape_until(port, "beamkin_frames_out_total", {"stage": "inference"}, n_frames)
        exported = _exported_names(port)

    assert value(samples, "beamkin_frames_in_total", stage="inference") == n_frames + 2
    assert value(samples, "beamkin_frames_out_total", stage="inference") == n_frames
    assert value(samples, "beamkin_frames_flagged_total", stage="inference", reason="pattern_flagged") == 1
    assert value(samples, "beamkin_frames_dropped_total", stage="inference", reason="duplicate") == 1
    assert value(samples, "beamkin_frames_dropped_total", stage="inference", reason="out_of_range") == 1
    assert value(samples, "beamkin_duplicate_frame_conflicts_total") == 1

    queried = _grafana_metric_names()
    assert {"beamkin_frames_in_total", "beamkin_stage_latency_seconds_bucket", "beamkin_exact_sampler_lag_frames",
            "beamkin_ess_min", "process_resident_memory_bytes"} <= queried
    assert queried <= exported, sorted(queried - exported)


def _exported_names(port: int) -> set[str]:
    """Sample names a stage's endpoint exports, from its ``# TYPE`` lines (a labelled metric with no
    sample yet is still declared): counters NAME_total, histograms NAME_bucket/_sum/_count."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE):
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def _grafana_metric_names() -> set[str]:
    """Every metric name the PromQL expressions of deploy/grafana/beamkin.json query."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "beamkin.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    expressions += [variable["query"] for variable in dashboard["templating"]["list"] if variable["type"] == "query"]
    assert expressions
    functions = {"sum", "rate", "max", "min", "by", "histogram_quantile", "label_values", "le", "job", "stage",
                 "reason", "output", "queue", "instance"}
    names = set()
    for expression in expressions:
        expression = re.sub(r'"[^"]*"', "", expression)  # label values
        expression = re.sub(r"\[[^\]]*\]", "", expression)  # range selectors
        names |= {word for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expression) if word not in functions}
    return names


@pytest.mark.parametrize("port", [-1, 70000])
def test_a_metrics_port_out_of_range_is_a_clear_error(port):
    from beamkin import metrics

    with pytest.raises(ValueError, match=r"\[metrics\] inference_port"):
        metrics.port_of({"metrics": {"enabled": True, "inference_port": port}}, "inference")


@pytest.mark.parametrize("command", ["stream", "reduce", "infer", "dashboard", "record"])
def test_every_metrics_key_is_an_option_of_every_stage_command(command):
    from beamkin import config as configuration

    keys = [dotted for dotted in configuration.key_docs() if dotted.startswith("metrics.")]
    assert len(keys) == 7
    shown = subprocess.run([sys.executable, "-m", "beamkin", command, "--help"], capture_output=True, text=True,
                           check=True).stdout
    assert all(f"--{dotted}" in shown for dotted in keys), command


def test_a_metrics_port_in_use_is_logged_and_the_stage_goes_on(caplog):
    from beamkin import metrics

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = {"metrics": {"enabled": True, "address": "127.0.0.1", "inference_port": port}}
        assert metrics.serve(config, "inference") == 0
    assert any(record.levelname == "ERROR" and f"127.0.0.1:{port}" in record.getMessage() for record in caplog.records)
    assert metrics.serve({"metrics": {"enabled": False, "inference_port": port}}, "inference") == 0  # off: nothing
