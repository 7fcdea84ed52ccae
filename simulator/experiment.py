"""`beamkin simulate`: a synthetic gas-dosing experiment acting as a DECTRIS EIGER.

Frames are Debye-ring images of the CPL-1-like material (simulator.synthetic) whose loaded-phase
fraction follows a kinetic model (inference.models). The background is scaled so that the empty
phase's strongest line stands ``peak_to_background`` times above it, as in a synchrotron pattern of
a MOF powder, so the transition is visible in every pattern; ``counts_scale`` then sets the counting
noise (the defaults give sigma(alpha) ~ 0.02 per 0.3 s frame). For frame j with exposure window
[t_j - e/2, t_j + e/2] the rendered fraction is the exposure average

    alpha_j = (1/e) * integral over the window of  A * alpha_model( k (t - t0) ) dt,   alpha = 0 for t < t0,

with t0 in seconds from the series start, k in 1/s and A the final extent. Frames go out as
DECTRIS Stream V2 (CBOR, bslz4; or Stream V1 JSON multipart with ``protocol = "v1"``) on a bound
PUSH socket (port 31001 by default), paced at the experiment's frame rate times ``speed``, so
the whole real receiving path is exercised. With ``mode = "profile"`` the simulator is a
MYTHEN-like strip detector instead: each frame is a 1D profile (2theta step 0.006 degrees)
written as a three-column ``.xye`` file into a folder, the way BL02B2 data appear on disk.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from beamkin.kinetics import alpha_numpy, has_free_exponent

log = logging.getLogger(__name__)

EXPOSURE_SAMPLES = 64  # midpoint rule over each exposure window


def exposure_averaged_alpha(model: str, t0_s: float, k_per_s: float, extent: float, n_exponent: float,
                            mid_times_s: np.ndarray, exposure_s: float) -> np.ndarray:
    """alpha averaged over each exposure window (midpoint rule, EXPOSURE_SAMPLES points)."""
    mid_times_s = np.asarray(mid_times_s, dtype=float)
    if exposure_s > 0:
        offsets = (np.arange(EXPOSURE_SAMPLES) + 0.5) / EXPOSURE_SAMPLES - 0.5
        times = mid_times_s[:, None] + exposure_s * offsets[None, :]
    else:
        times = mid_times_s[:, None]
    x = np.clip(k_per_s * (times - t0_s), 0.0, None)
    n = n_exponent if has_free_exponent(model) else None
    alpha = extent * np.where(times >= t0_s, alpha_numpy(model, x, n), 0.0)
    return alpha.mean(axis=1)


def stream_v2_start_fields(metadata: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The Stream V2 start-message fields (spec names) describing the synthetic experiment."""
    detector, geometry = metadata["detector"], metadata["geometry"]
    ny, nx = detector["shape"]
    fields = {
        "detector_description": f"beamkin simulated {detector['name']}",
        "image_size_x": int(nx), "image_size_y": int(ny),
        "pixel_size_x": float(detector["pixel_size_m"][1]), "pixel_size_y": float(detector["pixel_size_m"][0]),
        "beam_center_x": float(geometry["beam_center_px"][0]), "beam_center_y": float(geometry["beam_center_px"][1]),
        "detector_distance": float(geometry["distance_m"]),
        "incident_wavelength": float(geometry["wavelength_A"]),
        "count_time": float(options["exposure_s"]), "frame_time": float(options["frame_time_s"]),
        "number_of_images": int(options["n_frames"]),
        "saturation_value": int(detector["saturation"]) if detector.get("saturation") else None,
        "user_data": {
            "material": "CPL-1 ([Cu2(pzdc)2(pyz)]n) dosed with Ar (synthetic)",
            "simulation": {"model": options["model"], "t0_s": options["t0_s"], "k_per_s": options["k_per_s"],
                           "extent": options["extent"]},
        },
    }
    if options.get("gas_time_s", -1) is not None and options["gas_time_s"] >= 0:
        fields["user_data"]["gas_time_s"] = float(options["gas_time_s"])
    if options.get("series_id"):
        fields["series_unique_id"] = options["series_id"]
    return {k: v for k, v in fields.items() if v is not None}


def stream_v1_config(metadata: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The SIMPLON detector configuration (Stream V1 dheader "config" part) of the experiment."""
    v2 = stream_v2_start_fields(metadata, options)
    return {
        "description": v2["detector_description"],
        "x_pixels_in_detector": v2["image_size_x"], "y_pixels_in_detector": v2["image_size_y"],
        "x_pixel_size": v2["pixel_size_x"], "y_pixel_size": v2["pixel_size_y"],
        "beam_center_x": v2["beam_center_x"], "beam_center_y": v2["beam_center_y"],
        "detector_distance": v2["detector_distance"], "wavelength": v2["incident_wavelength"],
        "count_time": v2["count_time"], "frame_time": v2["frame_time"],
        "nimages": v2["number_of_images"], "ntrigger": 1,
        "countrate_correction_count_cutoff": v2.get("saturation_value"),
    }


class ProfileFolderWriter:
    """MYTHEN-like output: frame i becomes FOLDER/PREFIX_iiiii.xye (2theta deg, counts, sigma).

    Each file is written under a temporary name and renamed, so a reader never sees half a file.
    """

    def __init__(self, folder: str, prefix: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix

    def write(self, index: int, two_theta_deg: np.ndarray, counts: np.ndarray, start_s: float, exposure_s: float) -> Path:
        path = self.folder / f"{self.prefix}_{index:05d}.xye"
        partial = path.with_suffix(".partial")
        sigma = np.sqrt(np.maximum(counts, 1.0))
        header = f"beamkin simulated MYTHEN profile, frame {index}, start {start_s:.6f} s, exposure {exposure_s:.6f} s\n2theta_deg counts sigma"
        np.savetxt(partial, np.column_stack([two_theta_deg, counts, sigma]), fmt=("%.4f", "%.0f", "%.3f"), header=header)
        os.replace(partial, path)
        return path


def source_for(options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The streamer source spec (and source options) that receives what the simulator sends."""
    if options.get("mode", "image") == "profile":
        timing = {key: options[key] for key in ("frame_time_s", "exposure_s", "n_frames", "gas_time_s")}
        from simulator.synthetic import default_metadata
        timing["wavelength_A"] = default_metadata()["geometry"]["wavelength_A"]
        return f"files:{options['profile_folder']}", timing
    scheme = "dectris1" if options.get("protocol", "v2") == "v1" else "dectris2"
    return f"{scheme}:{options['endpoint']}", {}


def make_detector(options: dict[str, Any], metadata: dict[str, Any]):
    """The synthetic detector of the ``[simulator]`` options: ``counts_scale`` (or
    ``profile_counts_scale`` in profile mode) and the line-to-background contrast
    ``peak_to_background`` (absent or 0: the unscaled default background)."""
    from simulator.synthetic import SyntheticPowderDetector

    scale_key = "profile_counts_scale" if options.get("mode") == "profile" else "counts_scale"
    contrast = options.get("peak_to_background")
    return SyntheticPowderDetector(metadata, seed=int(options["seed"]), counts_scale=float(options[scale_key]),
                                   peak_to_background=float(contrast) if contrast else None)


def run_simulator(options: dict[str, Any], stop: threading.Event) -> int:
    """Send `repeat` simulated series (see defaults.toml [simulator])."""
    from simulator.fake_eiger import StreamV1Sender, StreamV2Sender
    from simulator.synthetic import default_metadata

    frame_time, exposure = float(options["frame_time_s"]), float(options["exposure_s"])
    if not 0 < exposure <= frame_time:
        raise ValueError(f"simulator exposure_s must be in (0, frame_time_s = {frame_time}], got {exposure}")
    n_frames = int(options["n_frames"])
    metadata = default_metadata(frame_time_s=frame_time, exposure_s=exposure, n_frames=n_frames,
                                gas_time_s=options.get("gas_time_s"))
    detector = make_detector(options, metadata)
    mid_times = np.arange(n_frames) * frame_time + exposure / 2
    alphas = exposure_averaged_alpha(options["model"], options["t0_s"], options["k_per_s"], options["extent"],
                                     options["n_exponent"], mid_times, exposure)
    speed = float(options["speed"])
    mode, wire = options.get("mode", "image"), options.get("protocol", "v2")
    if mode not in ("image", "profile"):
        raise ValueError(f"simulator mode must be 'image' or 'profile', not {mode!r}")
    if wire not in ("v1", "v2"):
        raise ValueError(f"simulator protocol must be 'v1' or 'v2', not {wire!r}")
    if mode == "profile":
        if not options.get("profile_folder"):
            raise ValueError("simulator mode 'profile' needs profile_folder")
        sender = None
        where = f"profiles in {options['profile_folder']}"
    else:
        sender = (StreamV2Sender if wire == "v2" else StreamV1Sender)(options["endpoint"], compression="bslz4")
        where = f"fake EIGER (Stream {wire.upper()}) bound at {sender.endpoint}"
    log.info("%s: %s kinetics, t0 = %.4f s, k = %.4f 1/s, %d frames of %.3f s, speed x%g", where,
             options["model"], options["t0_s"], options["k_per_s"], n_frames, frame_time, speed)
    pixel_mask = detector.gap_mask.astype(np.uint32)
    try:
        for repeat in range(int(options.get("repeat", 1))):
            fields = stream_v2_start_fields(metadata, options)
            series_name = fields.get("series_unique_id") or time.strftime("sim_%Y%m%d_%H%M%S")
            if repeat:
                series_name += f"-{repeat}"
                if "series_unique_id" in fields:
                    fields["series_unique_id"] = series_name
            if sender is None:
                writer = ProfileFolderWriter(options["profile_folder"], series_name)
            elif wire == "v2":
                sender.send_start(fields, pixel_mask=pixel_mask)
            else:
                sender.send_start(stream_v1_config(metadata, options), pixel_mask=pixel_mask,
                                  appendix=fields["user_data"])
            began = time.monotonic()
            for index in range(n_frames):
                start_s = index * frame_time
                if speed > 0:  # a frame is read out at the end of its exposure
                    delay = began + (start_s + exposure) / speed - time.monotonic()
                    if delay > 0 and stop.wait(delay):
                        break
                if sender is None:
                    two_theta, counts = detector.profile(float(alphas[index]), exposure)
                    writer.write(index, two_theta, counts, start_s, exposure)
                else:
                    image = detector.image(float(alphas[index]), exposure)
                    while not stop.is_set() and not sender.writable(0.2):
                        pass  # no receiver, or it is behind: wait (backpressure), but stay stoppable
                    if stop.is_set():
                        break
                    sender.send_image(index, image, start_s, start_s + exposure)
                if index % 10 == 0 or index == n_frames - 1:
                    log.info("sent frame %d/%d (t = %.2f s, true alpha = %.3f)", index + 1, n_frames,
                             mid_times[index], alphas[index], extra={"frame_index": index})
            if stop.is_set():
                break
            if sender is not None:
                sender.send_end()
    finally:
        if sender is not None:
            sender.close(linger_s=0 if stop.is_set() else 5.0)
    return 0
