"""The settings of the inference: one frozen object built from the ``[inference]`` table.

The live stage (inference.stage / inference.series) and ``beamkin analyze`` (inference.analyze)
both build their sampler from an ``InferenceSettings``, so the same configuration gives the same
sampler, number for number.  Every field is a key of ``[inference]`` in beamkin/defaults.toml,
documented there (units in the key's comment); the defaults come from that file only
(``default_settings``), never from code.  See docs/configuration.md and docs/design.md,
section 5 (The sampler) and section 6 (Live: estimates, exact posteriors, staleness, alerts).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
from collections.abc import Mapping
from typing import Any

from .models import model_code


def _frozen(value: Any) -> Any:
    """A read-only copy of a TOML value: tables become mappingproxies, arrays tuples."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({str(k): _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(value: Any) -> Any:
    """The plain dict / list form of a ``_frozen`` value (as TOML gives it)."""
    if isinstance(value, Mapping):
        return {k: _thawed(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """The ``[inference]`` table, typed and read-only (see beamkin/defaults.toml for each key)."""

    models: tuple[str, ...]  # kinetic model codes compared
    particles: int  # particles per model
    seed: int  # random seed of the sampler
    noise: str  # "normal" or "student"
    student_nu: float  # degrees of freedom of the Student-t noise
    ess_threshold: float  # resample-move when ESS < ess_threshold * particles
    temper_threshold: float  # 0 = ess_threshold
    light_probability: float  # models below this probability get single-sweep moves
    null_prior: float  # prior probability of "no reaction"
    ess_floor: float  # an estimate below ess_floor * particles ESS (for a model that matters) is stale
    model_threads: int  # threads of the model samplers (0 = one per core)
    histogram_bins: int  # bins of the t0 / k histograms
    alert_threshold: float  # onset probability needed for the alert
    alert_consecutive: int  # ... on this many consecutive frames
    reorder_window: int  # frames held while waiting for a missing one
    missing_timeout_s: float  # s before a missing frame is skipped
    max_series_s: float  # s, end of the t0 window when the series length is unknown
    max_open_series: int  # series held at once
    series_idle_s: float  # s without a frame before an open series is aborted (0 = never)
    frame_index_window: int  # frames past the next expected one a series of unknown length takes
    start_wait_s: float  # s before a series whose start never came is ended incomplete
    json: str  # result file of each series ("" = none)
    once: bool  # exit after the first series
    priors: Mapping[str, Any]  # the [inference.priors] table (read-only)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "InferenceSettings":
        """The settings of a whole resolved configuration (``beamkin.config.load`` /
        ``from_arguments``): its ``[inference]`` table."""
        if "inference" not in config:
            raise ValueError("the configuration has no [inference] table")
        return cls.from_table(config["inference"])

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> "InferenceSettings":
        """The settings of an ``[inference]`` table holding every key of beamkin/defaults.toml
        (as ``beamkin.config`` resolves it).  Raises ValueError naming a key that is missing,
        unknown or of the wrong type, or a model code that does not exist."""
        if isinstance(table, InferenceSettings):
            return table
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [name for name in fields if name not in table and name != "priors"]
        if missing:
            raise ValueError(f"[inference] lacks {', '.join(missing)} (every key of beamkin/defaults.toml is needed)")
        unknown = sorted(set(table) - set(fields))
        if unknown:
            raise ValueError(f"[inference] key(s) {', '.join(unknown)} not known to inference.settings."
                             "InferenceSettings (a key added to beamkin/defaults.toml needs a field there)")
        values: dict[str, Any] = {}
        for name, field in fields.items():
            value = table.get(name, {}) if name == "priors" else table[name]
            values[name] = _typed(name, field.type, value)
        for name in values["models"]:
            model_code(name)
        return cls(**values)

    def to_table(self) -> dict[str, Any]:
        """The plain ``[inference]`` table (lists and dicts, as TOML gives them)."""
        return {f.name: _thawed(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> "InferenceSettings":
        """A copy with some keys changed (checked like the table's)."""
        return InferenceSettings.from_table({**self.to_table(), **changes})

    @property
    def threads(self) -> int:
        """Threads running the model samplers: ``model_threads``, 0 meaning one per core."""
        return self.model_threads or (os.cpu_count() or 1)

    def engine_options(self) -> dict[str, Any]:
        """The keyword arguments of ``smc.OnlineInference`` these settings give (all but the
        priors, ts, series id: they come with each series)."""
        return dict(models=self.models, n_particles=self.particles, seed=self.seed, noise=self.noise,
                    student_nu=self.student_nu, ess_threshold=self.ess_threshold,
                    temper_threshold=self.temper_threshold or None, light_probability=self.light_probability,
                    histogram_bins=self.histogram_bins, alert_threshold=self.alert_threshold,
                    alert_consecutive=self.alert_consecutive, null_prior=self.null_prior, threads=self.threads)


def _typed(name: str, kind: str, value: Any) -> Any:
    """``value`` of key ``name`` as the field's type (annotations are strings here)."""
    try:
        if kind == "tuple[str, ...]":
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise TypeError
            return tuple(str(v) for v in value)
        if kind == "int":
            if isinstance(value, bool) or int(value) != value:
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind == "Mapping[str, Any]":
            if not isinstance(value, Mapping):
                raise TypeError
            return _frozen(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"[inference] {name} = {value!r} is not a{'n' if kind[0] in 'aeiou' else ''} "
                         f"{kind}") from None
    raise AssertionError(f"InferenceSettings.{name}: no conversion for {kind}")


@functools.lru_cache(maxsize=1)
def default_settings() -> InferenceSettings:
    """The settings of beamkin/defaults.toml alone."""
    from beamkin.config import defaults

    return InferenceSettings.from_config(defaults())
