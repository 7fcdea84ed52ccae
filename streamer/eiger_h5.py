"""EIGER HDF5 master files (NeXus, as written by the DECTRIS file writer): read and write.

Layout read (and written by :func:`write_eiger_master`)::

    /entry/data/data_000001 ...            external links to (n, ny, nx) image stacks (bslz4-compressed)
    /entry/instrument/beam/incident_wavelength                  angstrom
    /entry/instrument/detector/{beam_center_x, beam_center_y}   pixels
    /entry/instrument/detector/{x_pixel_size, y_pixel_size, detector_distance}   metres
    /entry/instrument/detector/{count_time, frame_time}         seconds
    /entry/instrument/detector/{bit_depth_image, saturation_value, description}
    /entry/instrument/detector/detectorSpecific/{x_pixels_in_detector, y_pixels_in_detector,
        nimages, ntrigger, pixel_mask, flatfield, photon_energy (eV)}

Frames are numbered from 0 across the data files in their name order; frame i's time is
``i * frame_time + count_time / 2`` seconds since series start.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import h5py
import hdf5plugin
import numpy as np

from beamkin.errors import StreamDecodeError
from streamer.series import make_detector, make_geometry, wavelength_from_energy

log = logging.getLogger(__name__)


def _scalar(group: h5py.Group, name: str) -> Any:
    if name not in group:
        return None
    value = group[name][()]
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def is_eiger_master(path: str | Path) -> bool:
    """True if ``path`` is an HDF5 file with /entry/data and /entry/instrument/detector."""
    try:
        with h5py.File(path, "r") as f:
            return "entry/data" in f and "entry/instrument/detector" in f
    except (OSError, ValueError):
        return False


def data_names(f: h5py.File) -> list[str]:
    """The /entry/data members holding images, in acquisition (name) order."""
    return sorted(name for name in f["entry/data"] if name.startswith("data_"))


def read_master_start(path: str | Path, series_id: str, source: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Start fields (without ``source``) and arrays of an EIGER master file; raises StreamDecodeError."""
    try:
        with h5py.File(path, "r") as f:
            if "entry/instrument/detector" not in f:
                raise StreamDecodeError(f"{path} has no /entry/instrument/detector")
            det = f["entry/instrument/detector"]
            spec = det["detectorSpecific"] if "detectorSpecific" in det else det
            names = data_names(f)
            shape = None
            n_frames = 0
            for name in names:
                try:
                    dataset = f["entry/data"][name]
                except KeyError:  # dangling external link: data file not written yet
                    continue
                shape = dataset.shape[1:]
                n_frames += dataset.shape[0]
            nx, ny = _scalar(spec, "x_pixels_in_detector"), _scalar(spec, "y_pixels_in_detector")
            if nx is not None and ny is not None:
                shape = (int(ny), int(nx))
            if shape is None or len(shape) != 2:
                raise StreamDecodeError(f"{path}: image size unknown (no x/y_pixels_in_detector and no data)")
            nimages, ntrigger = _scalar(spec, "nimages"), _scalar(spec, "ntrigger")
            announced = int(nimages) * int(ntrigger or 1) if nimages is not None else n_frames
            if not 1 <= announced <= 1 << 40:
                log.warning("%s: nimages x ntrigger = %s is not a frame count; the series length is unknown", path, announced)
                announced = None
            wavelength = _scalar(f["entry/instrument/beam"], "incident_wavelength") if "entry/instrument/beam" in f else None
            if wavelength is None:
                wavelength = wavelength_from_energy(_scalar(spec, "photon_energy"))
            px, py = _scalar(det, "x_pixel_size"), _scalar(det, "y_pixel_size")
            bx, by = _scalar(det, "beam_center_x"), _scalar(det, "beam_center_y")
            count_time = _scalar(det, "count_time")
            frame_time = _scalar(det, "frame_time")
            frame_time = float(frame_time if frame_time is not None else (count_time or 0.0))
            count_time = float(count_time if count_time is not None else frame_time)
            saturation = _scalar(det, "saturation_value")
            if saturation is None:
                saturation = _scalar(spec, "countrate_correction_count_cutoff")
            fields = {
                "series_id": series_id,
                "kind": "image",
                "detector": make_detector(str(_scalar(det, "description") or "EIGER (HDF5)"), shape,
                                          None if px is None or py is None else (py, px), saturation,
                                          _scalar(det, "bit_depth_image")),
                "geometry": make_geometry(_scalar(det, "detector_distance"),
                                          None if bx is None or by is None else (bx, by), wavelength),
                "frame_time_s": frame_time,
                "exposure_s": count_time,
                "n_frames": announced,
                "gas_time_s": None,
                "user_data": {"master_file": str(path)},
            }
            arrays = {}
            for name, dtype in (("pixel_mask", np.uint32), ("flatfield", np.float32)):
                if name in spec and spec[name].shape == tuple(shape):
                    arrays[name] = np.ascontiguousarray(spec[name][()], dtype=dtype)
            return fields, arrays
    except (OSError, KeyError, ValueError, TypeError, OverflowError, AttributeError) as exc:
        raise StreamDecodeError(f"cannot read EIGER master file {path}: {type(exc).__name__}: {exc}") from exc


def iter_master_frames(path: str | Path, start_index: int = 0, *, missing_ok: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    """(frame_index, image) of an EIGER master file's data, from ``start_index`` on, in order.

    A data file that cannot be opened ends the iteration (``missing_ok``: a file series still being
    written) or raises KeyError.
    """
    index = 0
    with h5py.File(path, "r") as f:
        for name in data_names(f):
            try:
                dataset = f["entry/data"][name]
            except KeyError:
                if missing_ok:
                    return
                raise
            for i in range(dataset.shape[0]):
                if index >= start_index:
                    yield index, dataset[i]
                index += 1


def write_eiger_master(path: str | Path, images: np.ndarray, *, frames_per_file: int = 100,
                       frame_time: float = 1.0, count_time: float | None = None, wavelength: float = 0.8,
                       beam_center: tuple[float, float] = (0.0, 0.0), distance: float = 0.2,
                       pixel_size: float = 75e-6, pixel_mask: np.ndarray | None = None,
                       description: str = "Dectris EIGER2 (simulated)") -> Path:
    """Write ``images`` (n, ny, nx) as an EIGER-style master file plus data files (bslz4); returns the master path."""
    path = Path(path)
    stem = path.name[: -len("_master.h5")] if path.name.endswith("_master.h5") else path.stem
    n, ny, nx = images.shape
    links = []
    for number, first in enumerate(range(0, n, frames_per_file), start=1):
        data_path = path.with_name(f"{stem}_data_{number:06d}.h5")
        with h5py.File(data_path, "w") as df:
            chunk = images[first : first + frames_per_file]
            df.create_dataset("entry/data/data", data=chunk, chunks=(1, ny, nx), **hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
        links.append((f"data_{number:06d}", data_path.name))
    with h5py.File(path, "w") as f:
        for name, target in links:
            f[f"entry/data/{name}"] = h5py.ExternalLink(target, "/entry/data/data")
        det = f.create_group("entry/instrument/detector")
        f["entry/instrument/beam/incident_wavelength"] = wavelength
        for key, value in (("beam_center_x", beam_center[0]), ("beam_center_y", beam_center[1]),
                           ("x_pixel_size", pixel_size), ("y_pixel_size", pixel_size), ("detector_distance", distance),
                           ("count_time", frame_time if count_time is None else count_time), ("frame_time", frame_time),
                           ("bit_depth_image", images.dtype.itemsize * 8), ("description", description)):
            det[key] = value
        det["saturation_value"] = np.iinfo(images.dtype).max - 1 if images.dtype.kind == "u" else 0
        spec = det.create_group("detectorSpecific")
        spec["x_pixels_in_detector"] = nx
        spec["y_pixels_in_detector"] = ny
        spec["nimages"] = n
        spec["ntrigger"] = 1
        if pixel_mask is not None:
            spec.create_dataset("pixel_mask", data=np.asarray(pixel_mask, dtype=np.uint32))
    return path
