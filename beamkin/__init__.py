"""beamkin: streaming analysis of time-resolved powder diffraction during gas dosing.

For notebooks: ``beamkin.analyze(time_s, alpha, ...)`` (``inference.analyze.analyze``) and
``beamkin.recording_arrays(path)`` (``sinks.export.recording_arrays``); see docs/notebooks.md.
They are imported on first use, so ``import beamkin`` stays light.
"""


def __getattr__(name: str):
    if name == "analyze":
        from inference.analyze import analyze
        return analyze
    if name == "recording_arrays":
        from sinks.export import recording_arrays
        return recording_arrays
    raise AttributeError(f"module 'beamkin' has no attribute {name!r}")
