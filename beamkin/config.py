"""Configuration: one TOML file over built-in defaults, and every key also on the command line.

Resolution order (later wins): ``beamkin/defaults.toml`` < the user's ``--config FILE`` <
``--SECTION.KEY VALUE`` options < ``--set SECTION.KEY=VALUE``. Values on the command line are
read as TOML literals (``--inference.particles 2048``, ``--inference.models '["F1","A2"]'``);
anything that is not a TOML literal is taken as a string, and a comma-separated value is
split for keys whose default is a list (``--inference.models F1,A2``).

The schema is the defaults file itself: every key it sets, plus the optional keys it documents as
commented-out assignments (``# k = [0.01, 100.0]  # description`` under ``[inference.priors]``),
plus the ``[reducer.fractions]`` table whose keys (FRACTION_KEYS here) are those of
``reducer.fraction_config.FractionConfig`` (windows: ``WindowSpec``, lines: ``Line``). Any other
key, in a TOML file or on the command line, is a :class:`ConfigError` naming the key and the
nearest valid one (``difflib``). Each key's description is the comment after it in the defaults
file (shown by ``--help``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Iterator


class ConfigError(ValueError):
    """A configuration file or option that cannot be used (the text says which and why)."""


def defaults_text() -> str:
    """The text of the built-in defaults file, beamkin/defaults.toml."""
    return resources.files("beamkin").joinpath("defaults.toml").read_text()


def defaults() -> dict[str, Any]:
    """The built-in defaults (beamkin/defaults.toml) as a fresh dict."""
    return tomllib.loads(defaults_text())


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One configuration key of the defaults file: dotted name, default (None for an optional key
    the file only documents), description (the comment after it) and whether it is optional."""

    dotted: str
    default: Any
    description: str
    optional: bool = False


_SECTION_LINE = re.compile(r"^\s*\[([A-Za-z0-9_.]+)\]\s*(#.*)?$")
_KEY_LINE = re.compile(r"^([A-Za-z0-9_]+)\s*=\s*(.*)$")
_OPTIONAL_LINE = re.compile(r"^#\s*([A-Za-z0-9_]+)\s*=\s*(.*)$")


def _value_and_comment(rest: str) -> tuple[Any, str]:
    """Split ``VALUE  # comment`` at the first '#' outside the TOML value."""
    for position in [i for i, char in enumerate(rest) if char == "#"] + [len(rest)]:
        try:
            value = tomllib.loads(f"v = {rest[:position]}")["v"]
        except tomllib.TOMLDecodeError:
            continue
        return value, rest[position + 1:].strip()
    raise ConfigError(f"defaults file: cannot read the value {rest!r}")


@functools.lru_cache(maxsize=1)
def key_docs() -> dict[str, KeyDoc]:
    """Every key of beamkin/defaults.toml (set or documented as optional) with its description."""
    docs: dict[str, KeyDoc] = {}
    section = ""
    last: str | None = None  # key whose description an indented comment line continues
    for line in defaults_text().splitlines():
        header = _SECTION_LINE.match(line)
        if header:
            section, last = header.group(1), None
            continue
        stripped = line.strip()
        if stripped.startswith("#") and line[:1].isspace() and last is not None:
            previous = docs[last]
            docs[last] = dataclasses.replace(previous, description=f"{previous.description} {stripped[1:].strip()}")
            continue
        key_line, optional_line = _KEY_LINE.match(line), _OPTIONAL_LINE.match(line)
        match = key_line or optional_line
        if not match or not section:
            last = None
            continue
        dotted = f"{section}.{match.group(1)}"
        value, comment = _value_and_comment(match.group(2))
        docs[dotted] = KeyDoc(dotted, None if optional_line else value, comment, optional=bool(optional_line))
        last = dotted
    return docs


def _sections(table: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in table.items():
        if isinstance(value, dict):
            yield f"{prefix}{key}"
            yield from _sections(value, f"{prefix}{key}.")


#: optional tables the defaults file does not spell out: their keys are listed below
OPTIONAL_TABLES = ("reducer.fractions",)

#: keys of the optional [reducer.fractions] table (reducer.fraction_config.FractionConfig, less its
#: in-memory ``phases``), of each of its [[reducer.fractions.windows]] (WindowSpec) and of each
#: window's ``lines`` (Line); tests/test_config.py checks they are the dataclasses' fields
FRACTION_KEYS = ("windows", "method", "reference_ratio_b_to_a", "reference_scale_a", "reference_scale_b",
                 "min_signal_sigma", "n_reweight", "wavelength_A", "whole_pattern_range_deg", "background_terms",
                 "reference_pattern_a", "reference_pattern_b", "position_search_rel", "position_step_rel",
                 "position_min_snr")
FRACTION_WINDOW_KEYS = ("phase", "lo_deg", "hi_deg", "lines")
FRACTION_LINE_KEYS = ("phase", "center_deg", "fwhm_deg", "relative_intensity", "eta")


def _fraction_schema() -> dict[str, Any]:
    """Schema of [reducer.fractions] for :func:`_check_against`: a table of FRACTION_KEYS whose
    ``windows`` is an array of tables of FRACTION_WINDOW_KEYS, each with ``lines`` an array of
    tables of FRACTION_LINE_KEYS."""
    lines = dict.fromkeys(FRACTION_LINE_KEYS)
    windows = dict.fromkeys(FRACTION_WINDOW_KEYS)
    windows["lines"] = [lines]
    table = dict.fromkeys(FRACTION_KEYS)
    table["windows"] = [windows]
    return table


def _nearest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown(dotted: str, section: str, names: list[str]) -> ConfigError:
    """The error for an unknown key, with the nearest valid key of the same table (or anywhere)."""
    where = f"in [{section}]" if section else "at the top level"
    hint = _nearest(dotted, [f"{section}.{n}" if section else n for n in names])
    if not hint:
        hint = _nearest(dotted, sorted(set(key_docs()) | set(_sections(defaults())) | set(OPTIONAL_TABLES)))
    return ConfigError(f"unknown configuration key {dotted!r} {where}{hint}")


def _check_against(value: Any, schema: Any, dotted: str) -> None:
    """Check a value under a schema: dict = table of known keys, [dict] = array of such tables."""
    if isinstance(schema, list) and isinstance(value, list):
        for i, item in enumerate(value):
            _check_against(item, schema[0], f"{dotted}[{i}]")
    elif isinstance(schema, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted} must be a table, got {value!r:.60}")
        for key, item in value.items():
            if key not in schema:
                raise _unknown(f"{dotted}.{key}", dotted, list(schema))
            _check_against(item, schema[key], f"{dotted}.{key}")


def check_key(dotted: str, value: Any = None) -> None:
    """ConfigError unless ``dotted`` is a key (or a key inside an optional table) of the schema."""
    docs = key_docs()
    tables = set(_sections(defaults()))
    if dotted in docs or dotted in tables:
        return
    for table in OPTIONAL_TABLES:
        if dotted == table or dotted.startswith(table + "."):
            inner = dotted[len(table) + 1:]
            wrapped: Any = value
            for key in reversed(inner.split(".") if inner else []):
                wrapped = {key: wrapped}
            if inner:
                _check_against(wrapped, _fraction_schema(), table)
            return
    section, _, _ = dotted.rpartition(".")
    names = [d.rpartition(".")[2] for d in docs if d.rpartition(".")[0] == section]
    names += [t.rpartition(".")[2] for t in tables | set(OPTIONAL_TABLES) if t.rpartition(".")[0] == section]
    raise _unknown(dotted, section, names)


def check_keys(user: dict[str, Any], where: str = "") -> None:
    """ConfigError for the first key of a user's table that the schema does not know."""
    tables = set(_sections(defaults()))
    for key, value in user.items():
        dotted = f"{where}{key}"
        if dotted in OPTIONAL_TABLES:
            _check_against(value, _fraction_schema(), dotted)
        elif dotted in tables and isinstance(value, dict):
            check_keys(value, dotted + ".")
        else:
            check_key(dotted)


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
    check_key(dotted, value)
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
        except IsADirectoryError as exc:
            raise ConfigError(f"configuration file {path} is a folder, not a file") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not text (TOML is UTF-8)") from exc
        except OSError as exc:
            raise ConfigError(f"configuration file {path} cannot be read: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
        try:
            check_keys(user)
            config = merge(config, user)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    return config


def add_arguments(parser: argparse.ArgumentParser, sections: tuple[str, ...] | None = None) -> None:
    """Add --config, --set and one --SECTION.KEY option per default key (of the given sections)."""
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument(
        "--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
        help="set any configuration key (repeatable), e.g. --set inference.priors.k=[0.1,10]",
    )
    group = parser.add_argument_group("configuration keys (beamkin/defaults.toml; docs/configuration.md)")
    for dotted, doc in key_docs().items():
        if sections is not None and dotted.split(".")[0] not in sections:
            continue
        default = "optional, unset by default" if doc.optional else f"default: {_toml(doc.default)}"
        text = f"{doc.description} ({default})" if doc.description else f"({default})"
        group.add_argument(
            f"--{dotted}", dest=f"cfg:{dotted}", metavar="VALUE", default=None,
            help=text.replace("%", "%%"),
        )


def _toml(value: Any) -> str:
    """A value as it is written in TOML (for --help)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def suggest_option(option: str) -> ConfigError | None:
    """For an unrecognised ``--SECTION.KEY`` command-line option: the error naming the key and
    the nearest valid one; None if the option does not look like a configuration key."""
    name = option[2:].split("=", 1)[0] if option.startswith("--") else ""
    if "." not in name:
        return None
    try:
        check_key(name)
    except ConfigError as exc:
        return ConfigError(f"--{name}: {exc}")
    return None


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


def markdown_table() -> str:
    """Every key of the defaults file as a Markdown table (docs/configuration.md holds it; a test
    keeps the two in step): key, default (``optional`` for documented optional keys), description."""
    rows = ["| key | default | description |", "| --- | --- | --- |"]
    for dotted, doc in key_docs().items():
        default = "optional" if doc.optional else f"`{_toml(doc.default)}`"
        rows.append(f"| `{dotted}` | {default} | {doc.description.replace('|', '&#124;')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
