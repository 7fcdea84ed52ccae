"""``beamkin phases REF_A REF_B``: the command that reads two reference patterns and hands them to
reducer.phase_finder, which finds their lines and writes the [reducer.fractions] table.

It puts stages together, as the command line does: profiles are read with beamkin.profiles,
2D frames with the streamer's file readers (the same header handling as ``files:`` sources) and
EIGER master files with streamer.eiger_h5, recordings with beamkin.recording, and frames are
integrated with the reducer's own Integrator (geometry: stream < TOML < PONI, beamkin.geometry).
What the analysis does is in reducer.phase_finder's docstring.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from reducer import phase_finder
from reducer.phase_finder import PhaseFinderError, ReferencePattern, build_phase_table, reference_pattern, write_outputs


def _text_unit(text: str) -> tuple[str, float | None]:
    """Radial unit ("2th_deg", "q_nm^-1", "q_A^-1") and wavelength (angstrom) named by a pyFAI
    text header ('#' lines), ("2th_deg", None) when none is named."""
    unit, wavelength = "2th_deg", None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "!", ";", "'")) and re.match(r"^[-+0-9.]", stripped):
            break
        lower = stripped.lower()
        if "q_nm^-1" in lower:
            unit = "q_nm^-1"
        elif "q_a^-1" in lower:
            unit = "q_A^-1"
        match = re.search(r"wavelength[^:=]*[:=]\s*([-+0-9.eE]+)\s*(m|angstrom|a)?\b", stripped, re.IGNORECASE)
        if match:
            value = float(match.group(1))
            wavelength = value * 1e10 if (match.group(2) or ("m" if value < 1e-6 else "a")).lower() == "m" else value
    return unit, wavelength


def _profile_reference(path: Path, wavelength_A: float | None) -> ReferencePattern:
    from beamkin.errors import StreamDecodeError
    from beamkin.profiles import parse_profile

    try:
        text = path.read_text(errors="strict")
        x, y, s = parse_profile(text, path.name)
    except (OSError, UnicodeDecodeError, StreamDecodeError) as exc:
        raise PhaseFinderError(f"cannot read reference {path}: {exc}") from exc
    unit, header_wavelength = _text_unit(text)
    if unit != "2th_deg":
        wl = wavelength_A or header_wavelength
        if not wl:
            raise PhaseFinderError(f"reference {path} is in {unit}: give --wavelength-A (no wavelength in its header)")
        q_nm = x if unit == "q_nm^-1" else 10.0 * x
        from reducer.fractions import q_to_two_theta_deg

        x = q_to_two_theta_deg(q_nm, wl)
    return reference_pattern(path.name, x, y, s)


def _recording_reference(path: Path, series: str | None, first: int | None, last: int | None) -> ReferencePattern:
    from beamkin.recording import read_messages
    patterns = []
    try:
        for _, message in read_messages(path, types=("pattern",)):
            if series and message["series_id"] != series:
                continue
            index = message["frame_index"]
            if (first is not None and index < first) or (last is not None and index > last):
                continue
            patterns.append(message)
    except (OSError, ValueError, KeyError) as exc:
        raise PhaseFinderError(f"cannot read recording {path}: {exc}") from exc
    label = f"{path.name}:{series or '*'}" + ("" if first is None else f":{first}-{last}")
    if not patterns:
        raise PhaseFinderError(f"recording {label} holds no pattern of those frames")
    radial = np.asarray(patterns[0].arrays["radial"], float)
    if patterns[0]["unit"] != "2th_deg":
        raise PhaseFinderError(f"recording {label}: patterns in {patterns[0]['unit']}, need 2th_deg")
    stack, var = [], []
    for message in patterns:
        if np.asarray(message.arrays["radial"]).shape != radial.shape:
            raise PhaseFinderError(f"recording {label}: patterns of different lengths")
        stack.append(np.asarray(message.arrays["intensity"], float))
        var.append(np.asarray(message.arrays["sigma"], float) ** 2)
    n = len(stack)
    return reference_pattern(f"{label} ({n} frames)", radial, np.mean(stack, axis=0), np.sqrt(np.sum(var, axis=0)) / n)


def _image_reference(path: Path, reducer_config: Mapping[str, Any]) -> ReferencePattern:
    import fabio

    from reducer.integrate import Integrator, ReductionError
    from streamer.files import mini_cbf_header
    from streamer.series import make_detector, make_geometry

    try:
        image = fabio.open(str(path))
        data = np.ascontiguousarray(image.data)
        header = mini_cbf_header(dict(image.header))
    except Exception as exc:  # fabio raises many types for bad files
        raise PhaseFinderError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if data.ndim != 2:
        raise PhaseFinderError(f"image {path} holds a {data.ndim}D array, expected 2D")
    pixel = header.get("Pixel_size")
    metadata = {
        "series_id": path.stem, "kind": "image",
        "detector": make_detector(header.get("Detector", path.suffix), data.shape,
                                  None if pixel is None else (pixel[1], pixel[0])),
        "geometry": make_geometry(header.get("Detector_distance"), header.get("Beam_xy"), header.get("Wavelength")),
    }
    try:
        integrator = Integrator.from_metadata(metadata, config=dict(reducer_config))
        pattern = integrator.integrate(data)
    except ReductionError as exc:
        raise PhaseFinderError(f"cannot integrate {path}: {exc}") from exc
    ok = pattern.valid
    if integrator.unit != "2th_deg":
        raise PhaseFinderError("integrate the references in 2th_deg (--reducer.unit 2th_deg)")
    return reference_pattern(path.name, pattern.radial[ok], pattern.intensity[ok], pattern.sigma[ok])


def _master_reference(path: Path, first: int | None, last: int | None,
                      reducer_config: Mapping[str, Any]) -> ReferencePattern:
    from reducer.integrate import Integrator, ReductionError
    from streamer.eiger_h5 import iter_master_frames, read_master_start
    from beamkin.errors import StreamDecodeError

    try:
        fields, arrays = read_master_start(path, path.name[: -len("_master.h5")], "phases")
        integrator = Integrator.from_metadata({**fields, **arrays}, config=dict(reducer_config))
        patterns = []
        for index, image in iter_master_frames(path, first or 0, missing_ok=False):
            if last is not None and index > last:
                break
            patterns.append(integrator.integrate(image))
    except (StreamDecodeError, ReductionError, OSError, KeyError) as exc:
        raise PhaseFinderError(f"cannot use EIGER master file {path}: {exc}") from exc
    if not patterns:
        raise PhaseFinderError(f"EIGER master file {path} holds no frame in that range")
    if integrator.unit != "2th_deg":
        raise PhaseFinderError("integrate the references in 2th_deg (--reducer.unit 2th_deg)")
    ok = np.logical_and.reduce([p.valid for p in patterns])
    n = len(patterns)
    mean = np.mean([p.intensity for p in patterns], axis=0)
    sigma = np.sqrt(np.sum([p.sigma**2 for p in patterns], axis=0)) / n
    return reference_pattern(f"{path.name} ({n} frames)", patterns[0].radial[ok], mean[ok], sigma[ok])


def load_reference(spec: str, reducer_config: Mapping[str, Any] | None = None,
                   wavelength_A: float | None = None) -> ReferencePattern:
    """A reference pattern from a profile file, an image file or frames of a recording (module doc)."""
    from beamkin.profiles import PROFILE_SUFFIXES

    master = re.match(r"^(?P<file>.+?_master\.h5)(?::(?P<first>\d+)(?:-(?P<last>\d+))?)?$", spec)
    if master:
        path = Path(master.group("file"))
        if not path.is_file():
            raise PhaseFinderError(f"reference {path} does not exist")
        first = None if master.group("first") is None else int(master.group("first"))
        last = first if first is not None and master.group("last") is None else (
            None if master.group("last") is None else int(master.group("last")))
        return _master_reference(path, first, last, reducer_config or {})
    match = re.match(r"^(?P<file>.+?\.h5)(?::(?P<series>[^:]*))?(?::(?P<first>\d+)(?:-(?P<last>\d+))?)?$", spec)
    if match:
        first = None if match.group("first") is None else int(match.group("first"))
        last = first if first is not None and match.group("last") is None else (
            None if match.group("last") is None else int(match.group("last")))
        path = Path(match.group("file"))
        if not path.is_file():
            raise PhaseFinderError(f"reference {path} does not exist")
        return _recording_reference(path, match.group("series") or None, first, last)
    path = Path(spec)
    if not path.is_file():
        raise PhaseFinderError(f"reference {path} does not exist")
    if path.suffix.lower() in PROFILE_SUFFIXES:
        return _profile_reference(path, wavelength_A)
    return _image_reference(path, reducer_config or {})


def add_phases_command(commands) -> None:
    """Register ``beamkin phases`` on the CLI's subparsers."""
    from beamkin import config as configuration

    sub = commands.add_parser(
        "phases", allow_abbrev=False,
        help="a [reducer.fractions] TOML (peak windows, reference ratio, whole-pattern references) from two "
             "reference patterns",
        description=phase_finder.__doc__.split("\n\n")[0] + "\n\nREF: a .xy/.xye/.dat profile, a CBF/EDF/TIFF frame, "
                    "NAME_master.h5[:FIRST-LAST] (EIGER), or RUN.h5:SERIES[:FIRST-LAST] (frames of a recording).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("ref_a", metavar="REF_A", help="reference pattern of the pure empty phase A")
    sub.add_argument("ref_b", metavar="REF_B", help="reference pattern of the pure loaded phase B")
    sub.add_argument("--out", default="phases.toml", metavar="FILE.toml",
                     help="the TOML to write; FILE.png and FILE_phase_a/_b.xy go next to it (default: phases.toml)")
    sub.add_argument("--range", nargs=2, type=float, metavar=("LO", "HI"), dest="search_range",
                     help="2theta range (degrees) the windows may use (default: what both references cover)")
    sub.add_argument("--windows-per-phase", type=int, default=3, help="windows per phase (default 3)")
    sub.add_argument("--min-snr", type=float, default=5.0,
                     help="a line must stand this many sigma above its surroundings (default 5)")
    sub.add_argument("--background-width", type=float, default=0.2, metavar="DEG",
                     help="SNIP background clipping half-width, degrees 2theta (default 0.2)")
    sub.add_argument("--wavelength-A", type=float, default=None,
                     help="wavelength (angstrom) for references in q without one in their header")
    configuration.add_arguments(sub, ("reducer", "logging"))
    sub.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """`beamkin phases`: exit 0 with the files written, 2 with one line saying why not."""
    from beamkin import config as configuration
    from beamkin import logs

    try:
        config = configuration.from_arguments(args)
    except (configuration.ConfigError, OSError, ValueError) as exc:
        print(f"beamkin phases: {exc}", file=sys.stderr)
        return 2
    logs.configure("phases", config["logging"]["level"], config["logging"]["format"])
    out = Path(args.out)
    stem = out.with_suffix("")
    files = (f"{stem}_phase_a.xy", f"{stem}_phase_b.xy")
    try:
        ref_a = load_reference(args.ref_a, config["reducer"], args.wavelength_A)
        ref_b = load_reference(args.ref_b, config["reducer"], args.wavelength_A)
        table = build_phase_table(ref_a, ref_b, tuple(args.search_range) if args.search_range else None,
                                  args.windows_per_phase, args.min_snr, args.background_width, files)
        command = f"beamkin phases {args.ref_a} {args.ref_b} --out {args.out}"
        if args.search_range:
            command += f" --range {args.search_range[0]:g} {args.search_range[1]:g}"
        paths = write_outputs(table, ref_a, ref_b, out, command)
    except PhaseFinderError as exc:
        print(f"beamkin phases: {exc}", file=sys.stderr)
        return 2
    cfg = table.config
    print(f"A: {len(table.phase_a.lines)} lines, B: {len(table.phase_b.lines)} lines; "
          f"{len(cfg.windows)} windows ({', '.join(f'{w.phase} [{w.lo_deg}, {w.hi_deg}]' for w in cfg.windows)}); "
          f"R_B / R_A = {cfg.reference_ratio_b_to_a:.6g}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
