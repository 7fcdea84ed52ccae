"""Azimuthal integration of detector frames: the one place beamkin calls pyFAI.

An :class:`Integrator` is built once per series from the ``start`` message (or a PONI file)
and reused for every frame: pyFAI builds its sparse (CSR) integration matrix on the first
call, which is the slow part; later calls are a sparse matrix-vector product. From the second
frame on, CSR methods call pyFAI's engine directly (``Integrator._sums``: identical numbers,
checked on the first frame, without integrate1d's per-call Python work), and integer frames
reach it already in its float32 working type, converted in the same pass as the per-frame checks.

Geometry: beamkin.geometry merges the start message's geometry, the ``[reducer]`` TOML keys and
a PONI file, in that order of precedence, before validating (conventions there); the
integrator logs once per series which layer and convention each parameter came from.

Masks (all combined into one static mask, nonzero = excluded):

* detector module gaps from pyFAI's definition, when beamkin.detectors recognises the detector
  description (DECTRIS EIGER / EIGER2 / PILATUS / PILATUS3 / PILATUS4 ...) and the shape fits;
* ``pixel_mask`` from the start message (DECTRIS convention: nonzero = bad);
* a user mask file (any format fabio reads) or array;
* per frame, dynamically: pixels equal to the all-ones value of the integer pixel type
  (EIGER/PILATUS mark gaps and dead pixels that way), pixels above the saturation value of the
  metadata, and for floating-point frames NaN, infinite or negative values
  (reducer.frame_pixels.prepare_frame).

Output intensity is pyFAI's mean corrected intensity per bin (counts per pixel after dark,
flat, solid-angle and polarisation correction) with the Poisson error model
(variance = raw counts, propagated through the same normalisation), as a
reducer.pattern.Pattern (re-exported here with ReductionError).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from beamkin.errors import ReductionError
from reducer.frame_pixels import prepare_frame
from reducer.pattern import Pattern

logger = logging.getLogger(__name__)

__all__ = [
    "ReductionError",
    "Pattern",
    "Integrator",
    "DEFAULT_METHOD",
]

DEFAULT_METHOD = ("no", "csr", "cython")
"""Fastest accurate CPU method measured in bench/bench_reducer.py (see docs/benchmarks.md)."""

_UNITS = {"2th_deg": "2th_deg", "q_nm^-1": "q_nm^-1"}


@dataclasses.dataclass
class _BinSums:
    """One pyFAI pass, per bin: radial position (the series' unit), mean corrected intensity,
    its sigma (None unless a pixel variance was given), summed signal (counts), summed
    normalisation (solid angle x polarisation x flat) and number of contributing pixels."""

    radial: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray | None
    signal: np.ndarray
    normalization: np.ndarray
    count: np.ndarray | None


def load_mask_file(path: str) -> np.ndarray:
    """User mask from any image format fabio reads; nonzero = masked."""
    import fabio

    try:
        return np.asarray(fabio.open(str(path)).data) != 0
    except Exception as exc:
        raise ReductionError(f"cannot read mask file {path!r}: {exc}") from exc


def parse_method(method) -> tuple[str, str, str]:
    """pyFAI method from a (split, algorithm, implementation) sequence or a "split,algo,impl" string."""
    if isinstance(method, str):
        method = [m.strip() for m in method.split(",") if m.strip()]
    method = tuple(str(m) for m in method)
    if len(method) != 3:
        raise ReductionError(f"pyFAI method must be (split, algorithm, implementation), got {method!r}")
    return method


class Integrator:
    """pyFAI azimuthal integration of one series' frames to :class:`Pattern` objects."""

    def __init__(self, ai, shape: tuple[int, int], mask: np.ndarray | None, npt: int, unit: str,
                 method=DEFAULT_METHOD, saturation: float | None = None, dark: np.ndarray | None = None,
                 flat: np.ndarray | None = None, polarization_factor: float | None = 0.99,
                 radial_range: tuple[float, float] | None = None, series_id: str | None = None):
        if unit not in _UNITS:
            raise ReductionError(f"unit must be one of {sorted(_UNITS)}, got {unit!r}")
        if int(npt) < 2:
            raise ReductionError(f"npt must be >= 2, got {npt}")
        self.ai = ai
        self.shape = tuple(int(v) for v in shape)
        self.npt = int(npt)
        self.unit = unit
        self.method = parse_method(method)
        self.saturation = None if saturation is None else float(saturation)
        self.polarization_factor = polarization_factor
        self.radial_range = None if radial_range is None else (float(radial_range[0]), float(radial_range[1]))
        self.series_id = series_id
        self.geometry = None  # beamkin.geometry.SeriesGeometry when built by from_metadata
        for label, arr in (("mask", mask), ("dark", dark), ("flat", flat)):
            if arr is not None and tuple(arr.shape) != self.shape:
                raise ReductionError(f"{label} shape {tuple(arr.shape)} differs from detector shape {self.shape}")
        self.mask = None if mask is None else np.ascontiguousarray(mask, dtype=np.int8)
        if self.mask is not None and not self.mask.any():
            self.mask = None
        self.dark = None if dark is None else np.ascontiguousarray(dark, dtype=np.float32)
        if flat is not None:
            flat = np.ascontiguousarray(flat, dtype=np.float32)
            if not np.all(np.isfinite(flat)):
                raise ReductionError("flatfield contains non-finite values")
        self.flat = flat
        self.n_unmasked = int(np.prod(self.shape) - (0 if self.mask is None else np.count_nonzero(self.mask)))
        self._engine_checked = False  # first frame decides whether pyFAI's engine is called directly
        self._engine_call = None
        self._float32_frames = False  # integer frames handed to the engine as float32 (checked too)
        self._radial = None
        if self.n_unmasked == 0:
            raise ReductionError("the static mask excludes every pixel")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], mask=None, npt: int | None = None,
                      unit: str | None = None, method=None, *, config: Mapping[str, Any] | None = None,
                      mask_file: str | None = None, dark=None, flat=None,
                      polarization_factor: float | None | str = "config",
                      radial_range: tuple[float, float] | None = None) -> "Integrator":
        """Integrator for the series described by a start-message dict.

        ``mask``: optional user mask array (nonzero = masked); ``mask_file``: optional user mask
        in any fabio format. The start message's optional ``pixel_mask`` and ``flatfield`` arrays
        are used when present (``flat`` given here overrides ``flatfield``). ``dark``: optional
        dark image (counts). ``npt``: number of radial bins (default 2000); ``unit``: "2th_deg"
        (default) or "q_nm^-1"; ``method``: pyFAI method triple or "split,algo,impl" string
        (default DEFAULT_METHOD); ``polarization_factor``: pyFAI convention, 0.99 (default) for a
        horizontally polarised synchrotron beam, None for no correction.
        ``config``: the ``[reducer]`` table; its keys npt, unit, method, mask_file,
        polarization_factor apply where the explicit argument is not given ("" = default), and
        its geometry keys (distance_m, beam_center_px, wavelength_A, pixel_size_m, poni_file)
        override the start message's (beamkin.geometry).
        """
        config = dict(config or {})

        def pick(explicit, key, default):
            if explicit is not None:
                return explicit
            value = config.get(key)
            return default if value in (None, "") else value

        npt = int(pick(npt, "npt", 2000))
        unit = str(pick(unit, "unit", "2th_deg"))
        method = parse_method(pick(method, "method", DEFAULT_METHOD))
        mask_file = pick(mask_file, "mask_file", None)
        if polarization_factor == "config":
            polarization_factor = config.get("polarization_factor", 0.99)
        if metadata.get("kind", "image") != "image":
            raise ReductionError(f"series kind {metadata.get('kind')!r} carries profiles: no integration needed")
        from beamkin.geometry import resolve_geometry

        geometry = resolve_geometry(metadata, config)
        ai = geometry.azimuthal_integrator()
        det_md = metadata["detector"]
        shape = geometry.shape
        logger.info("geometry: %s", geometry.describe(), extra={"series_id": metadata.get("series_id")})
        combined = np.zeros(shape, dtype=bool)
        gaps = None if geometry.detector is None else geometry.detector.gap_mask(shape)
        if gaps is not None:
            combined |= gaps
        elif det_md.get("name"):
            logger.info("detector %r has no pyFAI definition of shape %s: module gaps come from the all-ones "
                        "pixel value only", det_md.get("name"), shape, extra={"series_id": metadata.get("series_id")})
        for label, extra in (("pixel_mask", metadata.get("pixel_mask")), ("mask", mask),
                             ("mask_file", None if mask_file is None else load_mask_file(mask_file))):
            if extra is None:
                continue
            extra = np.asarray(extra)
            if extra.shape != shape:
                raise ReductionError(f"{label} shape {extra.shape} differs from detector shape {shape}")
            combined |= extra != 0
        if flat is None and metadata.get("flatfield") is not None:
            flat = np.asarray(metadata["flatfield"])
        if flat is not None:
            flat = np.asarray(flat, dtype=np.float32)
            if flat.shape != shape:
                raise ReductionError(f"flatfield shape {flat.shape} differs from detector shape {shape}")
            bad_flat = ~np.isfinite(flat) | (flat <= 0)
            if bad_flat.any():
                combined |= bad_flat
                flat = np.where(bad_flat, 1.0, flat).astype(np.float32)
        integrator = cls(ai, shape, combined, npt=npt, unit=unit, method=method,
                         saturation=det_md.get("saturation"), dark=dark, flat=flat,
                         polarization_factor=polarization_factor, radial_range=radial_range,
                         series_id=metadata.get("series_id"))
        integrator.geometry = geometry
        return integrator

    # ------------------------------------------------------------------ per frame
    def _float32_buffer(self) -> np.ndarray:
        """The frame-sized float32 buffer prepare_frame converts integer frames into. Shallow copies
        (reducer.service reuses an integrator for later series) share it, which is safe because a
        worker integrates one frame at a time and pyFAI keeps no reference to it."""
        if getattr(self, "_float32", None) is None:
            self._float32 = np.empty(int(np.prod(self.shape)), dtype=np.float32)
        return self._float32

    def integrate1d_kwargs(self) -> dict:
        """Keyword arguments passed to pyFAI ``integrate1d`` (except data and dummy)."""
        return dict(npt=self.npt, unit=self.unit, method=self.method, error_model="poisson",
                    mask=self.mask, dark=self.dark, flat=self.flat, correctSolidAngle=True,
                    polarization_factor=self.polarization_factor, radial_range=self.radial_range)

    def integrate(self, image: np.ndarray, frame_index: int | None = None) -> Pattern:
        """Integrate one frame to a Pattern (Poisson sigma). Raises ReductionError for a frame of
        the wrong shape or type; returns a flagged Pattern when no pixel of the frame is valid.

        sigma: pyFAI's "poisson" model floors each pixel's variance at 1 count, which overstates
        the noise of sparse frames (mean counts ~1 per pixel). Here the variance of a bin is the
        sum of its raw counts: with no pixel splitting sigma = sqrt(sum_signal + sum_dark) /
        sum_normalization from the same pass; with splitting the frame itself is passed as the
        pixel variance."""
        to_float32 = self._float32_frames and self._engine_call is not None
        data, dummy = prepare_frame(image, self.shape, self.saturation, self._float32_buffer if to_float32 else None)
        no_split = self.method[0] == "no"
        variance = None
        if not no_split:
            variance = data.astype(np.float32)
            if self.dark is not None:
                variance = variance + self.dark
        sums = self._sums(data, dummy, variance)
        radial = np.asarray(sums.radial, dtype=np.float64)
        intensity = np.asarray(sums.intensity, dtype=np.float64)
        count = None if sums.count is None else np.asarray(sums.count, dtype=np.float64)
        if no_split:
            signal = np.asarray(sums.signal, dtype=np.float64).reshape(-1)
            if self.dark is not None:
                signal = signal + self._dark_sum()
            norm = np.asarray(sums.normalization, dtype=np.float64).reshape(-1)
            with np.errstate(divide="ignore", invalid="ignore"):
                sigma = np.sqrt(np.maximum(signal, 0.0)) / norm
        else:
            sigma = np.asarray(sums.sigma, dtype=np.float64)
        empty = ~np.isfinite(intensity) | ~np.isfinite(sigma)
        if count is not None:
            empty |= count <= 0
        if empty.any():
            intensity = np.where(empty, 0.0, intensity)
            sigma = np.where(empty, 0.0, sigma)
            if count is not None:
                count = np.where(empty, 0.0, count)
        if empty.all():
            logger.warning("frame has no valid pixel", extra={"series_id": self.series_id, "frame_index": frame_index})
            return Pattern(radial, intensity, sigma, self.unit, count, "flagged", "all pixels masked or invalid")
        return Pattern(radial, intensity, sigma, self.unit, count, model_response=self.model_pattern)

    def _sums(self, data: np.ndarray, dummy: float, variance: np.ndarray | None) -> "_BinSums":
        """One pyFAI pass over a prepared frame (error model none, or the given pixel variance).

        The series' first frame goes through ``integrate1d``, which builds the CSR engine. When
        calling that engine's ``integrate_ng`` directly reproduces the first frame's result bit
        for bit, later frames call it directly: same engine, same inputs, same numbers, without
        integrate1d's per-call Python work (mask checksum of 1M pixels, method and geometry
        normalisation, result metadata): about 0.6 ms per Pilatus 1M frame. Otherwise (histogram
        methods, other pyFAI internals) every frame goes through integrate1d."""
        if self._engine_call is not None:
            out = self._engine_call(data, variance=variance, dummy=np.float32(dummy),
                                    delta_dummy=np.float32(0.5), error_model=self._error_model(variance))
            return _BinSums(self._radial, out.intensity, out.sigma if variance is not None else None,
                            out.signal, out.normalization, out.count)
        kwargs = self.integrate1d_kwargs()
        kwargs["error_model"] = None
        if variance is not None:
            kwargs["variance"] = variance
        res = self.ai.integrate1d(data, dummy=dummy, delta_dummy=0.5, **kwargs)
        sums = _BinSums(res.radial, res.intensity, res.sigma if variance is not None else None,
                        res.sum_signal, res.sum_normalization, getattr(res, "count", None))
        if not self._engine_checked:
            self._engine_checked = True
            self._engine_call = self._direct_engine(res, sums, data, dummy, variance)
            self._radial = res.radial
        return sums

    @staticmethod
    def _error_model(variance):
        from pyFAI.containers import ErrorModel

        return ErrorModel.NO if variance is None else ErrorModel.VARIANCE

    def _direct_engine(self, res, sums: "_BinSums", data, dummy, variance):
        """``integrate_ng`` of the pyFAI engine that computed res, with this series' fixed inputs
        bound, if it reproduces sums exactly; None otherwise."""
        import functools

        wanted = getattr(res, "compute_engine", None)
        for holder in list(getattr(self.ai, "engines", {}).values()):
            engine = getattr(holder, "engine", None)
            if (engine is None or not hasattr(engine, "integrate_ng")
                    or f"{type(engine).__module__}.{type(engine).__name__}" != wanted):
                continue
            try:
                polarization = None
                if self.polarization_factor is not None:
                    polarization = self.ai.polarization(self.shape, self.polarization_factor, with_checksum=True)[0]
                call = functools.partial(engine.integrate_ng, dark=self.dark, flat=self.flat,
                                         solidangle=self.ai.solidAngleArray(self.shape, True),
                                         polarization=polarization, absorption=None, normalization_factor=1.0,
                                         weighted_average=bool(res.weighted_average))

                def same_bins(frame) -> bool:
                    out = call(frame, variance=variance, dummy=np.float32(dummy), delta_dummy=np.float32(0.5),
                               error_model=self._error_model(variance))
                    pairs = [(out.intensity, sums.intensity), (out.signal, sums.signal),
                             (out.normalization, sums.normalization), (out.count, sums.count)]
                    if variance is not None:
                        pairs.append((out.sigma, sums.sigma))
                    return all(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
                               for a, b in pairs if b is not None)

                same = same_bins(data)
                # the engine works in float32: a frame converted here must give the same bins
                self._float32_frames = (same and data.dtype.kind in "ui" and data.dtype.itemsize <= 4
                                        and same_bins(np.asarray(data, dtype=np.float32)))
            except Exception as exc:  # engine internals differ between pyFAI versions
                logger.info("pyFAI engine %s not callable directly (%s): integrate1d for every frame", wanted, exc)
                return None
            if same:
                return call
            logger.info("pyFAI engine %s differs from integrate1d: integrate1d for every frame", wanted)
            return None
        return None

    def _dark_sum(self) -> np.ndarray:
        """Dark counts summed per bin (their variance adds to the bin variance), computed once."""
        if getattr(self, "_dark_sum_cache", None) is None:
            kwargs = self.integrate1d_kwargs()
            kwargs.update(dark=None, flat=None, error_model=None)
            res = self.ai.integrate1d(self.dark, **kwargs)
            self._dark_sum_cache = np.asarray(res.sum_signal, dtype=np.float64).reshape(-1)
        return self._dark_sum_cache

    def _pixel_geometry(self) -> None:
        if getattr(self, "_pixel_tth", None) is None:
            tth = self.ai.center_array(self.shape, unit="2th_deg")
            norm = self.ai.solidAngleArray(self.shape)
            if self.polarization_factor is not None:
                norm = norm * self.ai.polarization(self.shape, factor=self.polarization_factor)
            if self.flat is not None:
                norm = norm * self.flat
            self._pixel_tth = np.ascontiguousarray(tth, dtype=np.float64)
            self._pixel_norm = np.ascontiguousarray(norm, dtype=np.float64)
            self._row_cache = {}

    def _csr_engine(self):
        """pyFAI's sparse integration matrix (bins x pixels) for this series, None if unavailable."""
        for engine in getattr(self.ai, "engines", {}).values():
            eng = getattr(engine, "engine", None)
            if eng is None or not hasattr(eng, "indptr") or not hasattr(eng, "data"):
                continue
            try:
                indptr = np.asarray(eng.indptr)
                if indptr.shape[0] == self.npt + 1 and int(getattr(eng, "input_size", -1)) == int(np.prod(self.shape)):
                    return np.asarray(eng.data, dtype=np.float64), np.asarray(eng.indices), indptr
            except Exception:  # engine internals differ between pyFAI versions
                return None
        return None

    def _rows_operator(self, rows: np.ndarray):
        """(pixel 2theta, weight matrix, weight sums) restricted to the given bins, cached."""
        key = rows.tobytes()
        if key in self._row_cache:
            return self._row_cache[key]
        op = None
        csr = self._csr_engine()
        if csr is not None:
            import scipy.sparse as sp

            data, indices, indptr = csr
            full = sp.csr_matrix((data, indices, indptr), shape=(self.npt, int(np.prod(self.shape))))
            sub = full[rows]
            cols = np.unique(sub.indices)
            sub = sub[:, cols].tocsr()
            weight = self._pixel_norm.ravel()[cols].copy()
            if self.mask is not None:
                weight[self.mask.ravel()[cols] != 0] = 0.0
            sub = sub.multiply(weight[None, :]).tocsr()
            sums = np.asarray(sub.sum(axis=1)).ravel()
            op = (self._pixel_tth.ravel()[cols].copy(), sub, sums)
        self._row_cache[key] = op
        return op

    def model_pattern(self, law, rows: np.ndarray | None = None) -> np.ndarray:
        """Noiseless pattern for a scattering law: law(two_theta_deg of each unmasked pixel centre)
        gives the corrected intensity per pixel (what the frame holds after dark, flat, solid-angle
        and polarisation correction). The image law * corrections is integrated with the series'
        own method, mask and bins, so the result carries exactly the binning and pixel sampling of
        real frames (pixel-centre aliasing of fine bins included). Cost: one integration, or with
        ``rows`` (bin indices) and a CSR method a sparse product over the pixels of those bins
        only, evaluating law on those pixels (sum_p C_ip n_p law(tth_p) / sum_p C_ip n_p)."""
        self._pixel_geometry()
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            op = self._rows_operator(rows)
            if op is not None:
                tth, matrix, sums = op
                values = np.asarray(law(tth), dtype=np.float64)
                with np.errstate(divide="ignore", invalid="ignore"):
                    out = (matrix @ values) / sums
                return np.where(np.isfinite(out), out, 0.0)
            return self.model_pattern(law)[rows]
        values = np.asarray(law(self._pixel_tth.ravel()), dtype=np.float64).reshape(self.shape)
        image = (values * self._pixel_norm).astype(np.float32)
        kwargs = self.integrate1d_kwargs()
        kwargs.update(dark=None, error_model=None)
        res = self.ai.integrate1d(image, **kwargs)
        out = np.asarray(res.intensity, dtype=np.float64)
        return np.where(np.isfinite(out), out, 0.0)
