"""The `beamkin` command: one subcommand per stage, plus run/demo that supervise them all.

Stages (each its own process): simulate, stream, reduce, infer, dashboard, record.
Supervisors: run (stream + reduce + infer + dashboard [+ record] [+ simulate]), demo.
Offline: analyze, replay, export, report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from typing import Any, Callable

from beamkin import config as configuration
from beamkin import logs, metrics, security

log = logging.getLogger("beamkin")

#: subcommand -> (help, config sections shown as options)
STAGES = {
    "simulate": ("synthetic gas-dosing experiment acting as a DECTRIS EIGER (Stream V2)", ("simulator",)),
    "stream": ("receive detector frames and fan them out to reducer workers", ("endpoints", "streamer", "metrics")),
    "reduce": ("pyFAI integration and phase fractions (N worker processes)", ("endpoints", "reducer", "metrics")),
    "infer": ("sequential Monte Carlo inference of onset, rate and kinetic model", ("endpoints", "inference", "metrics")),
    "dashboard": ("live Bokeh dashboard", ("endpoints", "dashboard", "inference", "metrics")),
    "record": ("record every message of each series to HDF5", ("endpoints", "recorder", "metrics")),
    "alerts": ("deliver the inference's onset alerts to webhooks, commands and ZeroMQ", ("endpoints", "alerts")),
}

#: [alerts] keys that need the alert-sink stage (the inference itself logs every alert)
ALERT_SINK_KEYS = ("zmq", "webhook", "command")


def stop_event_on_signals() -> threading.Event:
    """An Event set by SIGINT or SIGTERM, so stage loops finish cleanly."""
    stop = threading.Event()

    def handler(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _resolved(args: argparse.Namespace) -> dict[str, Any]:
    base = None
    if getattr(args, "resolved_config", None):
        with open(args.resolved_config) as handle:
            base = json.load(handle)
    return configuration.from_arguments(args, base)


def _stage_main(name: str, run: Callable[[dict[str, Any], argparse.Namespace, threading.Event], int]):
    def main(args: argparse.Namespace) -> int:
        config = _resolved(args)
        logs.configure(name, config["logging"]["level"], config["logging"]["format"])
        if "endpoints" in config:
            from beamkin import protocol
            protocol.configure(config["endpoints"].get("max_message_bytes"))
        stop = stop_event_on_signals()
        try:
            security.configure(config)  # CURVE keys of [security], read now; sockets follow them
            metrics.serve_for_command(name, config)  # [metrics]: this stage's /metrics (reducer workers: their own)
            return run(config, args, stop) or 0
        except (configuration.ConfigError, OSError, ValueError) as exc:
            log.error("%s stage cannot run: %s", name, exc)
            return 1
        except Exception:
            log.exception("%s stage failed", name)
            return 1
    return main


def _run_simulate(config, args, stop):
    from simulator.experiment import run_simulator
    return run_simulator(config["simulator"], stop)


def _run_stream(config, args, stop):
    from streamer.service import run_streamer
    check_source(config["streamer"]["source"])
    return run_streamer(config, stop)


def check_source(spec: str) -> None:
    """ConfigError now, before any stage starts, for a source that names a missing file or folder
    (``files:FOLDER``, ``replay:FILE``); detector endpoints are only known once connected."""
    scheme, _, target = spec.partition(":")
    if scheme not in ("dectris2", "dectris1", "files", "replay") or not target:
        raise configuration.ConfigError(
            f"source {spec!r}: expected dectris2:tcp://HOST:PORT, dectris1:tcp://HOST:PORT, files:FOLDER, "
            "replay:FILE or simulate")
    if scheme == "files" and target and not os.path.isdir(target):
        what = "is a file, not a folder" if os.path.exists(target) else "does not exist"
        raise configuration.ConfigError(f"source folder {target} {what} (--source files:FOLDER)")
    if scheme == "replay" and target and not os.path.isfile(target):
        what = "is a folder, not a file" if os.path.exists(target) else "does not exist"
        raise configuration.ConfigError(f"replay file {target} {what}")


def check_outputs(config: dict[str, Any]) -> None:
    """OutputPathError now, before the pipeline starts, for a --json or --record path that
    could not be written at the end of the run."""
    from beamkin.outputs import check_output_file

    if config["inference"]["json"]:
        check_output_file(config["inference"]["json"], "result file (--json / inference.json)")
    if config["recorder"]["path"]:
        check_output_file(config["recorder"]["path"], "recording (--record / recorder.path)")


def _run_reduce(config, args, stop):
    from reducer.service import run_reducer
    if args.connect:
        config["endpoints"]["frames"] = args.connect
    return run_reducer(config, stop, worker_name=args.worker_name)


def _run_infer(config, args, stop):
    from inference.service import run_inference
    return run_inference(config, stop)


def _run_dashboard(config, args, stop):
    from dashboards.server import serve_dashboard
    dash = config["dashboard"]
    threading.Thread(target=_signal_ready_when_listening, args=(dash["address"], dash["port"], stop),
                     daemon=True).start()
    log.info("dashboard at http://%s:%d/", dash["address"], dash["port"])
    serve_dashboard(
        config["endpoints"]["results"], address=dash["address"], port=dash["port"],
        max_refresh_hz=dash["max_refresh_hz"], alert_threshold=config["inference"]["alert_threshold"],
        stop_event=stop, allow_websocket_origin=dash["allowed_origins"] or None, token=dash["token"],
    )
    return 0


def _signal_ready_when_listening(address: str, port: int, stop: threading.Event) -> None:
    """Print the ready line once the HTTP port accepts connections."""
    import socket
    from beamkin.supervise import signal_ready
    while not stop.is_set():
        try:
            with socket.create_connection((address, port), timeout=1):
                signal_ready()
                return
        except OSError:
            stop.wait(0.1)


def _run_alerts(config, args, stop):
    from sinks.alerts import run_alert_sinks
    from beamkin.supervise import signal_ready
    return run_alert_sinks(config["endpoints"]["results"], config["alerts"], stop, ready=signal_ready)


def _run_record(config, args, stop):
    from sinks.recorder import run_recorder
    from beamkin.supervise import signal_ready
    rec = config["recorder"]
    if not rec["path"]:
        raise configuration.ConfigError("beamkin record needs --recorder.path FILE")
    from beamkin.supervise import RESTART_ENV
    opened: list = []
    signal_ready()
    run_recorder([config["endpoints"]["record"], config["endpoints"]["results"]], rec["path"], rec["raw_frames"], stop,
                 restarted=bool(os.environ.get(RESTART_ENV)), opened=opened)
    _add_nexus_views(str(opened[0]) if opened else rec["path"])
    return 0


#: the record stage adds NeXus views itself up to this many messages (~0.8 ms each, measured: well
#: inside the supervisor's stop grace); beyond, `beamkin export --nexus` does it offline
NEXUS_VIEWS_AT_CLOSE_MAX_MESSAGES = 5000


def _add_nexus_views(path: str) -> None:
    """NeXus NXdata views in a closed recording (sinks.nexus_views); a failure is logged, the
    recording itself is complete either way. Large recordings are left to ``export --nexus``, so
    that a stop deadline never interrupts a write into the file."""
    from sinks.nexus_views import add_nxdata_views
    from beamkin.recording import count_messages
    try:
        n = count_messages(path)
        if n > NEXUS_VIEWS_AT_CLOSE_MAX_MESSAGES:
            log.info("recording %s: %d messages; add its NeXus views with: beamkin export %s --nexus", path, n, path)
            return
        entries = add_nxdata_views(path)
        log.info("recording %s: NeXus views %s (silx view %s)", path, ", ".join(entries) or "none", path)
    except Exception as exc:  # noqa: BLE001 - the views are a convenience, the recording is safe
        log.error("recording %s: NeXus views not written: %s", path, exc)


def _supervised(config: dict[str, Any], with_simulator: bool, once: bool,
                feed: Callable[[threading.Event], Any] | None = None) -> int:
    """Start the pipeline stages as processes, then the simulator; stop all on failure or Ctrl-C.

    ``feed``: instead of streamer and reducer, a function run in a thread once the inference is
    ready, pushing reduced messages to it until done or until its stop event is set."""
    from beamkin.supervise import EXIT_SERIES_INCOMPLETE, StageFailed, Supervisor

    check_outputs(config)
    security.check_binds(config)  # every endpoint is bound on this host: no plaintext beyond loopback
    security.configure(config)  # a replay's feed connects from this process
    if not with_simulator and feed is None:
        check_source(config["streamer"]["source"])
    once = once or config["inference"]["once"]  # --once, or once = true in the TOML
    if once:
        config["streamer"]["once"] = True
        config["inference"]["once"] = True
    if with_simulator:
        from simulator.experiment import source_for
        if config["simulator"]["mode"] == "profile":
            if not config["simulator"]["profile_folder"]:
                config["simulator"]["profile_folder"] = tempfile.mkdtemp(prefix="beamkin-profiles-")
            os.makedirs(config["simulator"]["profile_folder"], exist_ok=True)
        config["streamer"]["source"], source_options = source_for(config["simulator"])
        config["streamer"].update(source_options)
    supervisor = Supervisor(config)
    dash = config["dashboard"]
    feed_stop = threading.Event()
    # the streamer's work may end (a --once series, a replay); every other stage runs until the run ends
    streamer_may_finish = once or config["streamer"]["source"].startswith("replay:")
    try:
        supervisor.start("inference", "infer", restart=True)
        supervisor.start("dashboard", "dashboard", restart=True)
        if config["recorder"]["path"]:
            supervisor.start("recorder", "record", restart=True)
        if any(config["alerts"].get(key) for key in ALERT_SINK_KEYS):
            supervisor.start("alerts", "alerts", restart=True)
        if feed is None:
            supervisor.start("reducer", "reduce", restart=True)
            supervisor.start("streamer", "stream", restart=True, may_finish=streamer_may_finish)
        supervisor.wait_ready()
        print(f"beamkin dashboard: http://{dash['address']}:{dash['port']}/", flush=True)
        if with_simulator:  # the detector's stand-in: it finishes after its series, is not restarted
            supervisor.start("simulator", "simulate", may_finish=True)
        if feed is not None:
            threading.Thread(target=feed, args=(feed_stop,), name="feed", daemon=True).start()
        if once:
            code = supervisor.wait_for_exit("inference", final_codes=(0, EXIT_SERIES_INCOMPLETE))
            if code == EXIT_SERIES_INCOMPLETE:
                log.error("the series ended incomplete (frames lost; the inference log says how many); "
                          "stopping the pipeline")
                print("beamkin: the series ended incomplete: frames were lost (see the inference's log and "
                      "the end reason in the result)", file=sys.stderr)
                return EXIT_SERIES_INCOMPLETE
            log.info("series finished; stopping the pipeline")
        else:
            supervisor.watch_forever()
        return 0
    except StageFailed as failure:
        log.error("%s", failure)
        print(f"beamkin: {failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        log.info("interrupted; stopping every stage")
        return 130
    finally:
        feed_stop.set()
        supervisor.stop_all()


def _supervisor_config(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Configuration of run / demo / replay with their --json and --record shortcuts applied."""
    config = configuration.from_arguments(args)
    logs.configure(name, config["logging"]["level"], config["logging"]["format"])
    if args.json:
        config["inference"]["json"] = args.json
    if args.record:
        config["recorder"]["path"] = args.record
    return config


def _run(args: argparse.Namespace) -> int:
    config = _supervisor_config(args, "run")
    if args.source:
        config["streamer"]["source"] = args.source
    with_simulator = config["streamer"]["source"] == "simulate"
    return _supervised(config, with_simulator, args.once)


def _demo(args: argparse.Namespace) -> int:
    config = _supervisor_config(args, "demo")
    if args.speed is not None:
        config["simulator"]["speed"] = args.speed
    sim = config["simulator"]
    print(
        f"beamkin demo: simulated {sim['model']} reaction, t0 = {sim['t0_s']} s, k = {sim['k_per_s']} 1/s, "
        f"{sim['n_frames']} frames every {sim['frame_time_s']:.3f} s, speed x{sim['speed']}",
        flush=True,
    )
    return _supervised(config, with_simulator=True, once=args.once)


def build_parser(analyze_arguments: bool = True) -> argparse.ArgumentParser:
    """The command-line parser; ``analyze_arguments=False`` leaves out the options of
    ``analyze`` (and their imports) when another command is run."""
    parser = argparse.ArgumentParser(prog="beamkin", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    runners = {"simulate": _run_simulate, "stream": _run_stream, "reduce": _run_reduce,
               "infer": _run_infer, "dashboard": _run_dashboard, "record": _run_record,
               "alerts": _run_alerts}
    for name, (help_text, sections) in STAGES.items():
        sub = commands.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        configuration.add_arguments(sub, sections + ("security", "logging") if "endpoints" in sections else sections + ("logging",))
        sub.add_argument("--resolved-config", help=argparse.SUPPRESS)
        if name == "reduce":
            sub.add_argument("--workers", dest="cfg:reducer.workers", metavar="N",
                             help="number of worker processes on this host")
            sub.add_argument("--connect", metavar="tcp://HOST:PORT",
                             help="join the streamer at this frames endpoint (workers on another host)")
            sub.add_argument("--worker-name", help=argparse.SUPPRESS)
        sub.set_defaults(func=_stage_main(name, runners[name]))

    run = commands.add_parser("run", help="run the whole pipeline on a source", allow_abbrev=False)
    configuration.add_arguments(run)
    run.add_argument("--source", help="dectris2:tcp://HOST:PORT, dectris1:tcp://HOST:PORT, files:FOLDER, replay:FILE or simulate")
    run.add_argument("--once", action="store_true", help="stop at the end of the first series")
    run.add_argument("--record", metavar="FILE", help="record every message to this HDF5 file")
    run.add_argument("--json", metavar="FILE", help="write the final result of the series as JSON")
    run.set_defaults(func=_run)

    demo = commands.add_parser("demo", help="the whole pipeline on the built-in simulated experiment, with the dashboard",
                               allow_abbrev=False)
    configuration.add_arguments(demo)
    demo.add_argument("--speed", type=float, help="run X times faster than real time (0 = as fast as possible)")
    demo.add_argument("--once", action="store_true", help="exit when the series ends")
    demo.add_argument("--json", metavar="FILE", help="write the final result as JSON")
    demo.add_argument("--record", metavar="FILE", help="record every message to this HDF5 file")
    demo.set_defaults(func=_demo)

    _add_offline_commands(commands, analyze_arguments)
    from beamkin.phases_command import add_phases_command  # `beamkin phases REF_A REF_B`
    add_phases_command(commands)
    from beamkin.keys_command import add_keys_command  # `beamkin keys --dir KEYS NAME`
    add_keys_command(commands)
    return parser


def _replay(args: argparse.Namespace) -> int:
    """Run the pipeline on a recording, an EIGER master file or a folder, re-emitted with its timing / speed.

    A recording is replayed from what it holds (streamer.replay.replay_plan): its raw frames
    through the reducers, or, recorded without them, its phase fractions and patterns straight
    into the inference. A replay that cannot be done is one line saying why, exit status 2."""
    from streamer.eiger_h5 import is_eiger_master
    from beamkin.recording import RecordingInputError
    from streamer.replay import FROM_FRACTIONS, feed_reduced, replay_plan

    config = _supervisor_config(args, "replay")
    if os.path.isdir(args.file):  # a file series: its frames in acquisition order (not paced)
        config["streamer"]["source"] = f"files:{args.file}"
        return _supervised(config, with_simulator=False, once=True)
    check_source(f"replay:{args.file}")
    config["streamer"]["source"] = f"replay:{args.file}"
    config["streamer"]["speed"] = args.speed
    if is_eiger_master(args.file):
        if args.replay_from == FROM_FRACTIONS:
            print(f"beamkin replay: {args.file} is an EIGER master file: it holds frames, not phase fractions",
                  file=sys.stderr)
            return 2
        return _supervised(config, with_simulator=False, once=True)
    try:
        mode, contents = replay_plan(args.file, args.replay_from)
    except RecordingInputError as exc:
        print(f"beamkin replay: {exc}", file=sys.stderr)
        return 2
    if mode != FROM_FRACTIONS:
        return _supervised(config, with_simulator=False, once=True)
    print(f"beamkin replay: {args.file} holds no raw frames; replaying its {contents['fractions']} phase fractions "
          f"and {contents['patterns']} patterns into the inference (no reducer)", flush=True)

    def feed(stop: threading.Event) -> None:
        feed_reduced(args.file, config["endpoints"]["reduced"], stop, {"speed": args.speed})

    return _supervised(config, with_simulator=False, once=True, feed=feed)


def _offline_config(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Configuration of an offline command (defaults < --config < options), logging set up."""
    config = configuration.from_arguments(args)
    logs.configure(name, config["logging"]["level"], config["logging"]["format"])
    return config


def _show_config(args: argparse.Namespace) -> int:
    """Print the resolved configuration as JSON (unknown keys and wrong types fail before)."""
    print(json.dumps(configuration.from_arguments(args), indent=1))
    return 0


def _export(args: argparse.Namespace) -> int:
    from sinks.export import export_csv
    from beamkin.outputs import OutputPathError
    from beamkin.recording import RecordingInputError
    from sinks.nexus_views import add_nxdata_views

    _offline_config(args, "export")
    if not args.csv and not args.nexus:
        print("beamkin export: give --csv DIR and/or --nexus", file=sys.stderr)
        return 2
    try:
        paths = export_csv(args.recording, args.csv) if args.csv else []
        if args.nexus:
            entries = add_nxdata_views(args.recording)
            paths.append(f"{args.recording}: NeXus views {', '.join(entries)}")
    except (RecordingInputError, OutputPathError, OSError) as exc:
        print(f"beamkin export: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
    from beamkin.outputs import OutputPathError, check_output_folder
    from dashboards.report import ReportInputError, build_report, load_report_input

    _offline_config(args, "report")
    try:
        check_output_folder(args.out, "--out folder")
        print(build_report(load_report_input(args.input, args.data), args.out))
    except (ReportInputError, OutputPathError, OSError) as exc:
        print(f"beamkin report: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_offline_commands(commands, analyze_arguments: bool = True) -> None:
    offline = commands.add_parser("analyze", help="offline Bayesian analysis of phase fractions (CSV or recording)",
                                  allow_abbrev=False)
    if analyze_arguments:  # imports numba and scipy (~0.5 s): only when the command may be analyze
        from inference import analyze

        analyze.add_arguments(offline)
        offline.set_defaults(func=analyze.main)

    report = commands.add_parser("report", help="self-contained HTML report of a recording or an analyze --json result",
                                 allow_abbrev=False)
    configuration.add_arguments(report, ("logging",))
    report.add_argument("input", help="beamkin recording (.h5) or the JSON written by --json")
    report.add_argument("--out", metavar="DIR", required=True, help="folder for report.html")
    report.add_argument("--data", metavar="CSV", help="with a JSON result: the data it was fitted to")
    report.set_defaults(func=_report)

    replay = commands.add_parser("replay", help="run the pipeline on a recording, an EIGER master file or a folder of frames",
                                 allow_abbrev=False)
    configuration.add_arguments(replay)
    replay.add_argument("file", help="beamkin recording (.h5), EIGER HDF5 master file, or a folder of frames / profiles")
    replay.add_argument("--speed", type=float, default=1.0,
                        help="X times the original pace (0 = as fast as possible; default 1)")
    replay.add_argument("--from", dest="replay_from", choices=("auto", "frames", "fractions"), default="auto",
                        help="replay a recording from its raw frames (through the reducers) or from its phase "
                             "fractions and patterns (into the inference); default auto: frames when every frame "
                             "was recorded with its image, else fractions")
    replay.add_argument("--json", metavar="FILE", help="write the final result as JSON")
    replay.add_argument("--record", metavar="FILE", help="record the re-analysis to this HDF5 file")
    replay.set_defaults(func=_replay)

    show = commands.add_parser("config", help="check a configuration and print it resolved (defaults < --config < options)",
                               allow_abbrev=False)
    configuration.add_arguments(show)
    show.set_defaults(func=_show_config)

    export = commands.add_parser("export", help="a recording's patterns, fractions and posteriors as CSV, or NeXus views",
                                 allow_abbrev=False)
    configuration.add_arguments(export, ("logging",))
    export.add_argument("recording")
    export.add_argument("--csv", metavar="DIR", help="write CSV files into this folder")
    export.add_argument("--nexus", action="store_true",
                        help="add NeXus NXdata views (alpha(t), patterns, onset, t0) to the recording itself, "
                             "for silx view and other facility tools (beamkin record adds them when it closes)")
    export.set_defaults(func=_export)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(analyze_arguments="analyze" in argv or not argv or argv[0].startswith("-"))
    args, unknown = parser.parse_known_args(argv)
    for token in unknown:
        error = configuration.suggest_option(token)
        if error is not None:
            print(f"beamkin: configuration error: {error}", file=sys.stderr)
            return 2
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    from beamkin.outputs import OutputPathError

    try:
        return args.func(args)
    except configuration.ConfigError as exc:
        print(f"beamkin: configuration error: {exc}", file=sys.stderr)
        return 2
    except OutputPathError as exc:
        print(f"beamkin {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
