"""Configuration: one TOML file over built-in defaults, and every key also on the command line.

Resolution order (later wins): ``beamkin/defaults.toml`` < the user's ``--config FILE`` <
``--SECTION.KEY VALUE`` options < ``--set SECTION.KEY=VALUE``. Values on the command line are
read as TOML literals (``--inference.particles 2048``, ``--inference.models '["F1","A2"]'``);
anything that is not a TOML literal is taken as a string, and a comma-separated value is
split for keys whose default is a list (``--inference.models F1,A2``).
"""

from __future__ import annotations

import argparse
import copy
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Iterator


class ConfigError(ValueError):
    """A configuration file or option that cannot be used (the text says which and why)."""


def defaults() -> dict[str, Any]:
    """The built-in defaults (beamkin/defaults.toml) as a fresh dict."""
    text = resources.files("beamkin").joinpath("defaults.toml").read_text()
    return tomllib.loads(text)


def _leaves(table: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def parse_value(text: str, like: Any = None) -> Any:
    """Read a command-line value as a TOML literal, falling back to a plain string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    if isinstance(like, list) and isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(like, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def set_path(config: dict[str, Any], dotted: str, value: Any) -> None:
    """Set config[a][b][c] = value for dotted = 'a.b.c', checking the type against the default."""
    keys = dotted.split(".")
    table = config
    for key in keys[:-1]:
        table = table.setdefault(key, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{dotted}: {key!r} is a value, not a section")
    old = table.get(keys[-1])
    if old is not None and not _compatible(old, value):
        raise ConfigError(
            f"{dotted} = {value!r} has type {type(value).__name__}, expected {type(old).__name__}"
        )
    table[keys[-1]] = value


def _compatible(old: Any, new: Any) -> bool:
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, (int, float)):
        return isinstance(new, (int, float))
    return isinstance(new, type(old))


def merge(base: dict[str, Any], override: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Deep-merge override into a copy of base, rejecting unknown sections and mistyped values."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}{key}"
        if isinstance(value, dict):
            current = result.get(key, {})
            if not isinstance(current, dict):
                raise ConfigError(f"{path} is a value in the defaults, not a section")
            result[key] = merge(current, value, path + ".")
        else:
            if key in result and not _compatible(result[key], value):
                raise ConfigError(
                    f"{path} = {value!r} has type {type(value).__name__}, "
                    f"expected {type(result[key]).__name__}"
                )
            result[key] = value
    return result


def load(path: str | Path | None) -> dict[str, Any]:
    """Defaults merged with the TOML file at path (if any)."""
    config = defaults()
    if path:
        path = Path(path)
        try:
            user = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
        config = merge(config, user)
    return config


def add_arguments(parser: argparse.ArgumentParser, sections: tuple[str, ...] | None = None) -> None:
    """Add --config, --set and one --SECTION.KEY option per default key (of the given sections)."""
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument(
        "--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
        help="set any configuration key (repeatable), e.g. --set inference.priors.k=[0.1,10]",
    )
    group = parser.add_argument_group("configuration keys (see beamkin/defaults.toml)")
    for dotted, value in _leaves(defaults()):
        if sections is not None and dotted.split(".")[0] not in sections:
            continue
        group.add_argument(
            f"--{dotted}", dest=f"cfg:{dotted}", metavar="VALUE", default=None,
            help=f"default: {value!r}",
        )


def from_arguments(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Resolve the configuration from parsed arguments (see the module docstring for the order).

    ``base`` replaces defaults + --config (a supervisor hands its stages the resolved config).
    """
    config = copy.deepcopy(base) if base is not None else load(getattr(args, "config", None))
    reference = dict(_leaves(defaults()))
    for name, text in vars(args).items():
        if name.startswith("cfg:") and text is not None:
            dotted = name[4:]
            set_path(config, dotted, parse_value(text, reference.get(dotted)))
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        dotted, text = item.split("=", 1)
        set_path(config, dotted.strip(), parse_value(text.strip(), reference.get(dotted.strip())))
    return config
