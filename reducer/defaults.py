"""Built-in reducer defaults for CPL-1 / Ar, matching simulator.synthetic's default experiment.

The same values are written out in docs/examples/cpl1_ar.toml (``[reducer]`` section);
``python -m reducer.defaults`` prints that TOML, and tests check file and code agree.

Peak windows: beamkin.phases.choose_peak_windows over 3 - 13 degrees 2theta (the part of the
default Pilatus 1M geometry where the low-angle CPL-1 lines sit) at 0.8 angstrom: three windows
per phase, strongest isolated lines first. rho = R_B / R_A = 1: the synthetic phases are each
normalised to a strongest line of 100 and the simulator renders both with the same scale.
"""
from __future__ import annotations

import functools

from beamkin.phases import DEFAULT_WAVELENGTH_A, choose_peak_windows, cpl1_phases
from reducer.fraction_config import FractionConfig, windows_from_phases

__all__ = ["cpl1_ar_fraction_config", "cpl1_ar_reducer_table", "to_toml"]

WINDOW_SEARCH_RANGE_DEG = (3.0, 13.0)
DEFAULT_NPT = 3000
DEFAULT_METHOD_STRING = "no,csr,cython"


@functools.lru_cache(maxsize=4)
def _cpl1_windows(wavelength_A: float):
    a, b = cpl1_phases(wavelength_A)
    windows = choose_peak_windows(a, b, *WINDOW_SEARCH_RANGE_DEG)
    return (a, b), tuple(windows_from_phases(a, b, windows))


def cpl1_ar_fraction_config(wavelength_A: float = DEFAULT_WAVELENGTH_A) -> FractionConfig:
    """FractionConfig for CPL-1 / Ar (peaks method, rho = 1)."""
    phases, windows = _cpl1_windows(float(wavelength_A))
    return FractionConfig(windows=list(windows), method="peaks", reference_ratio_b_to_a=1.0,
                          wavelength_A=None, whole_pattern_range_deg=(4.3, 12.5), background_terms=6,
                          phases=phases)


def cpl1_ar_reducer_table() -> dict:
    """The ``[reducer]`` table (reduction keys only) as a dict, as in docs/examples/cpl1_ar.toml."""
    fc = cpl1_ar_fraction_config()
    fractions = fc.to_dict()
    fractions["whole_pattern_range_deg"] = list(fc.whole_pattern_range_deg)
    return {"npt": DEFAULT_NPT, "unit": "2th_deg", "method": DEFAULT_METHOD_STRING,
            "polarization_factor": 0.99, "fractions": fractions}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(table: dict | None = None) -> str:
    """TOML text of the ``[reducer]`` table (defaults to :func:`cpl1_ar_reducer_table`)."""
    table = cpl1_ar_reducer_table() if table is None else table
    out = ["[reducer]"]
    for k, v in table.items():
        if not isinstance(v, dict):
            out.append(f"{k} = {_toml_value(v)}")
    fr = table["fractions"]
    out += ["", "[reducer.fractions]"]
    for k, v in fr.items():
        if k != "windows":
            out.append(f"{k} = {_toml_value(v)}")
    for w in fr["windows"]:
        out += ["", "[[reducer.fractions.windows]]",
                f"phase = {_toml_value(w['phase'])}", f"lo_deg = {_toml_value(w['lo_deg'])}",
                f"hi_deg = {_toml_value(w['hi_deg'])}", "lines = ["]
        out += [f"  {_toml_value(l)}," for l in w["lines"]]
        out.append("]")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(to_toml(), end="")
