"""A series' diffraction geometry from three layers: the stream, the TOML, the PONI file.

Precedence (docs/design.md; issue 12.1): the start message's geometry first, then the
``[reducer]`` keys ``distance_m``, ``beam_center_px``, ``wavelength_A``, ``pixel_size_m`` (0 or
[] = keep the stream's), then a PONI file (``[reducer] poni_file``, else the start message's
``geometry.poni_file``). Each later layer overrides the parameters it gives BEFORE anything is
validated, so a PONI file or a TOML key repairs a stream value that is missing or unusable (a
negative distance, no beam centre). Only the merged geometry is checked; an error names the
parameter, its value and the layer it came from.

Stream conventions (Fit2D-like, no tilt unless rot1..3 are given): ``beam_center_px = [x, y]``
with x the fast (column) and y the slow (row) pixel coordinate, pixel i spanning [i, i + 1);
pyFAI's PONI is then poni1 = y * pixel_size_y, poni2 = x * pixel_size_x (metres);
dist = distance_m, wavelength = wavelength_A * 1e-10 m. The streamer gives the distance from
``detector_distance`` when the detector sent it, else as |z| of ``detector_translation`` (real
EIGER2 messages carry z < 0, with x, y = beam centre px * pixel size) and records which in
``user_data.stream_v2.distance_from``; :meth:`SeriesGeometry.describe` says which convention
and layer each parameter came from (logged once per series by the integrator).

Pixel sizes: when beamkin.detectors recognises the detector description (and the image shape
fits), pyFAI's definition gives the pixel sizes (and the module gaps); a stream value that
differs by more than 0.1 % is reported. TOML and PONI layers still override them.

Units: metres, angstrom, radians.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

from beamkin.detectors import DetectorMatch, match_detector
from beamkin.errors import ReductionError

logger = logging.getLogger(__name__)

__all__ = ["SeriesGeometry", "resolve_geometry", "azimuthal_integrator_from_metadata", "GEOMETRY_OPTIONS"]

#: largest image side accepted, pixels (an EIGER2 16M is 4362 x 4148)
MAX_IMAGE_SIDE = 1 << 16

#: [reducer] keys that override the stream's geometry (0 / [] / "" = keep the stream's)
GEOMETRY_OPTIONS = ("distance_m", "beam_center_px", "wavelength_A", "pixel_size_m", "poni_file")


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool):
        raise ReductionError(f"{what} from {where} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ReductionError(f"{what} from {where} must be a number, got {str(value)[:60]!r}") from None
    return number


def _pair(value: Any, what: str, where: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ReductionError(f"{what} from {where} must be two numbers, got {str(value)[:60]!r}")
    return _number(value[0], what, where), _number(value[1], what, where)


@dataclasses.dataclass
class SeriesGeometry:
    """The merged geometry of one image series.

    shape (ny, nx) pixels; pixel_size_m (slow py, fast px) metres; distance_m metres;
    beam_center_px [x, y] pixels or poni_m (poni1, poni2) metres (a PONI file gives the latter,
    which wins); rot1..3 radians; wavelength_A angstrom; detector: pyFAI's definition when the
    description is recognised; sources: parameter -> the layer (and convention) it came from."""

    shape: tuple[int, int]
    pixel_size_m: tuple[float, float] | None = None
    distance_m: float | None = None
    beam_center_px: tuple[float, float] | None = None
    poni_m: tuple[float, float] | None = None
    rot_rad: tuple[float, float, float] = (0.0, 0.0, 0.0)
    wavelength_A: float | None = None
    detector: DetectorMatch | None = None
    sources: dict[str, str] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        """ReductionError naming the first parameter that cannot be used, with its source."""
        def where(key: str) -> str:
            return self.sources.get(key, "nowhere")

        hint = "; set it with --reducer.{key} or --reducer.poni_file"
        if self.pixel_size_m is None:
            raise ReductionError("detector.pixel_size_m is missing" + hint.format(key="pixel_size_m"))
        py, px = self.pixel_size_m
        if not (py > 0 and px > 0 and math.isfinite(py) and math.isfinite(px)):
            raise ReductionError(f"detector.pixel_size_m must be positive, got {[py, px]} (from {where('pixel_size_m')})"
                                 + hint.format(key="pixel_size_m"))
        if self.distance_m is None:
            raise ReductionError("geometry.distance_m is missing (no detector_distance nor detector_translation)"
                                 + hint.format(key="distance_m"))
        if not (self.distance_m > 0 and math.isfinite(self.distance_m)):
            raise ReductionError(f"geometry.distance_m must be positive, got {self.distance_m} "
                                 f"(from {where('distance_m')})" + hint.format(key="distance_m"))
        if self.poni_m is None and self.beam_center_px is None:
            raise ReductionError("geometry.beam_center_px is missing" + hint.format(key="beam_center_px"))
        for value in (self.poni_m or ()) + (self.beam_center_px or ()) + tuple(self.rot_rad):
            if not math.isfinite(value):
                raise ReductionError(f"beam centre / rotations must be finite, got {value} "
                                     f"(from {where('beam_center')})")
        if self.wavelength_A is None:
            raise ReductionError("geometry.wavelength_A is missing" + hint.format(key="wavelength_A"))
        if not (self.wavelength_A > 0 and math.isfinite(self.wavelength_A)):
            raise ReductionError(f"geometry.wavelength_A must be positive, got {self.wavelength_A} "
                                 f"(from {where('wavelength_A')})" + hint.format(key="wavelength_A"))

    @property
    def poni(self) -> tuple[float, float]:
        """(poni1, poni2) in metres: the PONI file's, else beam centre (x, y) px -> (y py, x px)."""
        if self.poni_m is not None:
            return self.poni_m
        bx, by = self.beam_center_px
        py, px = self.pixel_size_m
        return by * py, bx * px

    def azimuthal_integrator(self):
        """pyFAI AzimuthalIntegrator of the validated geometry (a plain pixel grid of the
        merged pixel sizes; module gaps are masked separately)."""
        from pyFAI.detectors import Detector
        from pyFAI.integrator.azimuthal import AzimuthalIntegrator

        self.validate()
        py, px = self.pixel_size_m
        poni1, poni2 = self.poni
        detector = Detector(pixel1=py, pixel2=px, max_shape=self.shape)
        return AzimuthalIntegrator(dist=self.distance_m, poni1=poni1, poni2=poni2, rot1=self.rot_rad[0],
                                   rot2=self.rot_rad[1], rot3=self.rot_rad[2], detector=detector,
                                   wavelength=self.wavelength_A * 1e-10)

    def describe(self) -> str:
        """One line: each parameter's value and where it came from."""
        parts = [f"distance {self.distance_m} m from {self.sources.get('distance_m', '?')}"]
        parts.append(f"beam centre from {self.sources.get('beam_center', '?')}")
        parts.append(f"wavelength {self.wavelength_A} A from {self.sources.get('wavelength_A', '?')}")
        parts.append(f"pixel size {self.pixel_size_m} m from {self.sources.get('pixel_size_m', '?')}")
        if self.detector is not None:
            parts.append(f"pyFAI detector {self.detector.pyfai_name} ({self.detector.how})")
        return "; ".join(parts)


def _stream_layer(metadata: Mapping[str, Any]) -> SeriesGeometry:
    det = metadata.get("detector")
    if not isinstance(det, Mapping):
        raise ReductionError("start message lacks 'detector'")
    raw_shape = det.get("shape")
    if not isinstance(raw_shape, (list, tuple)) or len(raw_shape) != 2:
        raise ReductionError(f"detector.shape must be [ny, nx], got {str(raw_shape)[:60]}")
    sizes = [_number(v, "detector.shape", "the stream") for v in raw_shape]
    if not all(math.isfinite(v) and v == int(v) and 0 < v <= MAX_IMAGE_SIDE for v in sizes):
        raise ReductionError(f"detector.shape must be [ny, nx] with positive sizes up to {MAX_IMAGE_SIDE}, "
                             f"got {str(raw_shape)[:60]}")
    shape = (int(sizes[0]), int(sizes[1]))
    geo = metadata.get("geometry")
    geo = geo if isinstance(geo, Mapping) else {}
    result = SeriesGeometry(shape=shape)
    result.detector = match_detector(det.get("name"), shape)
    stream_pixel = det.get("pixel_size_m")
    if stream_pixel is not None:
        result.pixel_size_m = _pair(stream_pixel, "detector.pixel_size_m", "the stream")
        result.sources["pixel_size_m"] = "the stream"
    if result.detector is not None:
        known = result.detector.pixel_size_m
        if result.pixel_size_m is not None and any(
                abs(a - b) > 1e-3 * b for a, b in zip(result.pixel_size_m, known)):
            logger.warning("start message pixel size %s m differs from pyFAI's %s (%s m): pyFAI's is used",
                           list(result.pixel_size_m), result.detector.pyfai_name, list(known),
                           extra={"series_id": metadata.get("series_id")})
        result.pixel_size_m = known
        result.sources["pixel_size_m"] = f"pyFAI detector {result.detector.pyfai_name}"
    user_data = metadata.get("user_data")
    stream_v2 = user_data.get("stream_v2") if isinstance(user_data, Mapping) else None
    distance_from = stream_v2.get("distance_from") if isinstance(stream_v2, Mapping) else None
    if geo.get("distance_m") is not None:
        result.distance_m = _number(geo["distance_m"], "geometry.distance_m", "the stream")
        result.sources["distance_m"] = f"the stream ({distance_from})" if distance_from else "the stream"
    if geo.get("beam_center_px") is not None:
        result.beam_center_px = _pair(geo["beam_center_px"], "geometry.beam_center_px", "the stream")
        result.sources["beam_center"] = "the stream (beam_center_px)"
    if geo.get("wavelength_A") is not None:
        result.wavelength_A = _number(geo["wavelength_A"], "geometry.wavelength_A", "the stream")
        result.sources["wavelength_A"] = "the stream"
    result.rot_rad = tuple(_number(geo.get(f"rot{i}_rad") or 0.0, f"geometry.rot{i}_rad", "the stream")
                           for i in (1, 2, 3))
    return result


def _toml_layer(result: SeriesGeometry, config: Mapping[str, Any]) -> None:
    where = "the TOML [reducer] {}"
    distance = config.get("distance_m")
    if distance not in (None, "", 0, 0.0):
        result.distance_m = _number(distance, "reducer.distance_m", "the TOML")
        result.sources["distance_m"] = where.format("distance_m")
    centre = config.get("beam_center_px")
    if centre not in (None, "", []):
        result.beam_center_px = _pair(centre, "reducer.beam_center_px", "the TOML")
        result.sources["beam_center"] = where.format("beam_center_px")
    wavelength = config.get("wavelength_A")
    if wavelength not in (None, "", 0, 0.0):
        result.wavelength_A = _number(wavelength, "reducer.wavelength_A", "the TOML")
        result.sources["wavelength_A"] = where.format("wavelength_A")
    pixel = config.get("pixel_size_m")
    if pixel not in (None, "", []):
        result.pixel_size_m = _pair(pixel, "reducer.pixel_size_m", "the TOML")
        result.sources["pixel_size_m"] = where.format("pixel_size_m")


def _poni_layer(result: SeriesGeometry, poni_file: str) -> None:
    import pyFAI

    try:
        ai = pyFAI.load(str(poni_file))
    except Exception as exc:  # pyFAI raises several types for unreadable files
        raise ReductionError(f"cannot read PONI file {poni_file!r}: {exc}") from exc
    where = f"the PONI file {poni_file}"
    max_shape = getattr(ai.detector, "max_shape", None)
    if max_shape is not None and tuple(max_shape) != result.shape:
        raise ReductionError(f"PONI detector shape {tuple(max_shape)} differs from the image shape {result.shape}")
    result.distance_m = float(ai.dist)
    result.poni_m = (float(ai.poni1), float(ai.poni2))
    result.rot_rad = (float(ai.rot1), float(ai.rot2), float(ai.rot3))
    for key in ("distance_m", "beam_center"):
        result.sources[key] = where
    if ai.wavelength:
        result.wavelength_A = float(ai.wavelength) * 1e10
        result.sources["wavelength_A"] = where
    if ai.detector.pixel1 and ai.detector.pixel2:
        result.pixel_size_m = (float(ai.detector.pixel1), float(ai.detector.pixel2))
        result.sources["pixel_size_m"] = where


def resolve_geometry(metadata: Mapping[str, Any], reducer_config: Mapping[str, Any] | None = None) -> SeriesGeometry:
    """The validated geometry of an image series: stream, then TOML, then PONI (module docstring)."""
    config = reducer_config or {}
    result = _stream_layer(metadata)
    _toml_layer(result, config)
    geo = metadata.get("geometry") if isinstance(metadata.get("geometry"), Mapping) else {}
    poni_file = config.get("poni_file") or geo.get("poni_file")
    if poni_file:
        _poni_layer(result, poni_file)
    result.validate()
    return result


def azimuthal_integrator_from_metadata(metadata: Mapping[str, Any], reducer_config: Mapping[str, Any] | None = None):
    """pyFAI AzimuthalIntegrator of a start-message dict, with the ``[reducer]`` geometry keys and
    PONI file (``reducer_config``, or the message's ``geometry.poni_file``) layered over the
    stream's values before validation (:func:`resolve_geometry`)."""
    return resolve_geometry(metadata, reducer_config).azimuthal_integrator()
