"""Detector descriptions as detectors send them -> pyFAI's detector definitions.

Start messages, EIGER master files and CBF headers name the detector in free text:
``"Dectris EIGER2 Si 16M"`` (Stream V2 ``detector_description``), ``"Dectris Eiger 16M S/N
E-32-0108"`` (EIGER master files), ``"PILATUS3 2M, S/N 24-0126, MAXIV BIOMAX"`` (CBF
``# Detector:``), ``"Dectris Pilatus4 2M"``, ``"DECTRIS EIGER X 9M"``, ``"Pilatus 1M"``. pyFAI's
detector registry (``pyFAI.detectors.ALL_DETECTORS``) knows these detectors by keys such as
``eiger2_16m``, ``eiger2_cdte_9m``, ``eiger_4m``, ``pilatus_1m``, ``pilatus4_cdte_1m``,
``mythen``, with their exact pixel sizes and module gaps. :func:`match_detector` parses a
description into family, sensor and size and looks the key up in that registry (nothing is
copied here: gaps and pixel sizes always come from pyFAI):

* family: EIGER2, EIGER (EIGER1), PILATUS4, PILATUS3 / PILATUS2 / PILATUS (the same 172 um
  module, so pyFAI's PILATUS definitions), MYTHEN2 / MYTHEN (PSI/DECTRIS strip modules of
  1280 channels, pyFAI's ``mythen``); variant letters (X, XE, S, R, F) are ignored;
* sensor: ``CdTe`` selects pyFAI's CdTe definitions, anything else Si;
* size: ``500K`` ... ``16M``, with a ``-W`` / ``W`` suffix for the wide modules (``1M-W``,
  ``300KW``).

The image shape decides when the size is missing from the text or disagrees with it (an EIGER
read out in a region-of-interest mode): then the family's definition with that shape is taken,
if there is exactly one.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["DetectorMatch", "match_detector", "MYTHEN_CHANNELS_PER_MODULE"]

MYTHEN_CHANNELS_PER_MODULE = 1280
"""Channels (50 um strips) of one MYTHEN / MYTHEN2 module (pyFAI ``mythen``)."""

_FAMILY = re.compile(r"\b(EIGER2|EIGER|PILATUS4|PILATUS3|PILATUS2|PILATUS|MYTHEN2|MYTHEN)\b")
_SIZE = re.compile(r"\b(\d+(?:\.\d+)?)\s*([KM])(?:\s*-?\s*(W))?(?![A-Z0-9])")
_PREFIX = {  # (family, CdTe?) -> pyFAI registry key prefix
    ("EIGER2", False): "eiger2_", ("EIGER2", True): "eiger2_cdte_",
    ("EIGER", False): "eiger_",
    ("PILATUS4", False): "pilatus4_", ("PILATUS4", True): "pilatus4_cdte_",
    ("PILATUS", False): "pilatus_", ("PILATUS", True): "pilatus_cdte_",
}


@dataclasses.dataclass(frozen=True)
class DetectorMatch:
    """A description resolved to a pyFAI detector.

    pyfai_name: registry key (e.g. "eiger2_16m"); detector: the pyFAI detector object (pixel1 =
    slow-axis pixel size, pixel2 = fast-axis pixel size, metres; max_shape = (ny, nx));
    how: what decided it ("description" or "description family + image shape"); modules: number
    of MYTHEN modules side by side (1 for area detectors)."""

    pyfai_name: str
    detector: object
    how: str
    modules: int = 1

    @property
    def pixel_size_m(self) -> tuple[float, float]:
        """(slow, fast) pixel size in metres, as the start message's pixel_size_m [py, px]."""
        return float(self.detector.pixel1), float(self.detector.pixel2)

    def gap_mask(self, shape: tuple[int, int]) -> np.ndarray | None:
        """pyFAI's module-gap mask (True = gap) for an image of this shape, None when pyFAI has
        none or the shape is not the detector's."""
        if self.detector.max_shape is None or tuple(self.detector.max_shape) != tuple(shape):
            return None
        mask = self.detector.calc_mask()
        return None if mask is None else np.asarray(mask).astype(bool)


@functools.lru_cache(maxsize=None)
def _registry_detector(key: str):
    import pyFAI.detectors

    return pyFAI.detectors.detector_factory(key)


def _registry_keys() -> frozenset[str]:
    import pyFAI.detectors

    return frozenset(pyFAI.detectors.ALL_DETECTORS)


def _parse(description: str) -> tuple[str | None, bool, str | None]:
    """(family, CdTe sensor?, size key such as "16m" or "1m-w") of a description."""
    text = description.upper().split(",")[0]
    text = re.sub(r"S/N.*$", "", text)
    text = text.replace("_", " ")
    text = re.sub(r"(EIGER2|EIGER|PILATUS4|PILATUS3|PILATUS2|PILATUS|MYTHEN2|MYTHEN)(\d+(?:\.\d+)?[KM])", r"\1 \2", text)
    family_match = _FAMILY.search(text)
    family = family_match.group(1) if family_match else None
    if family in ("PILATUS3", "PILATUS2"):
        family = "PILATUS"
    if family == "MYTHEN2":
        family = "MYTHEN"
    cdte = "CDTE" in text
    size = None
    rest = text[family_match.end():] if family_match else text
    size_match = _SIZE.search(rest)
    if size_match:
        number, unit, wide = size_match.groups()
        size = f"{number.rstrip('0').rstrip('.') if '.' in number else number}{unit.lower()}" + ("w" if wide else "")
    return family, cdte, size


def _size_candidates(prefix: str, size: str) -> list[str]:
    keys = [prefix + size]
    if size.endswith("w"):
        keys.append(prefix + size[:-1] + "-w")
    if prefix.endswith("_cdte_"):  # pyFAI also spells some CdTe models family_size_cdte
        base = prefix[: -len("cdte_")]
        keys.append(base + size + "_cdte")
    return keys


def _family_keys(prefix: str, cdte: bool) -> list[str]:
    keys = [k for k in _registry_keys() if k.startswith(prefix)]
    if not cdte:
        keys = [k for k in keys if "cdte" not in k]
    return sorted(keys)


def match_detector(description: str | None, shape: tuple[int, int] | None = None) -> DetectorMatch | None:
    """pyFAI detector for a DECTRIS / PSI detector description (see module docstring), None when
    the description names no detector pyFAI knows. ``shape`` (ny, nx) of the images, when given,
    must be the detector's: otherwise the family's definition with that shape is looked for."""
    if not description or not isinstance(description, str):
        return None
    family, cdte, size = _parse(description)
    keys = _registry_keys()
    if family == "MYTHEN":
        detector = _registry_detector("mythen")
        channels = int(detector.max_shape[1])
        modules = 1
        if shape is not None and int(shape[-1]) % channels == 0 and int(shape[-1]) >= channels:
            modules = int(shape[-1]) // channels
        return DetectorMatch("mythen", detector, "description", modules)
    prefix = _PREFIX.get((family, cdte)) if family else None
    if prefix is None:
        # not a DECTRIS family name: pyFAI's own spelling ("Pilatus 1M", "Perkin", "Rayonix MX225")
        key = description.replace(" ", "").lower()
        if key in keys:
            detector = _registry_detector(key)
            if shape is None or detector.max_shape is None or tuple(detector.max_shape) == tuple(shape):
                return DetectorMatch(key, detector, "description")
        return None
    if size is not None:
        for key in _size_candidates(prefix, size):
            if key in keys:
                detector = _registry_detector(key)
                if shape is None or tuple(detector.max_shape) == tuple(shape):
                    return DetectorMatch(key, detector, "description")
                break
    if shape is None:
        return None
    same_shape = [k for k in _family_keys(prefix, cdte) if tuple(_registry_detector(k).max_shape) == tuple(shape)]
    # aliases of one model (eiger2_1m-w, eiger2_1mw) give the same definition: compare classes
    kinds = {type(_registry_detector(k)).__name__ for k in same_shape}
    if len(kinds) == 1:
        key = same_shape[0]
        logger.info("detector %r: pyFAI definition %s chosen by family and image shape %s", description, key,
                    tuple(shape))
        return DetectorMatch(key, _registry_detector(key), "description family + image shape")
    return None
