"""Structured logging: every line names the stage and, where it applies, the series and frame.

Call sites pass context with ``extra={"series_id": ..., "frame_index": ...}``; any other extra
keys are printed as ``key=value`` (text) or JSON fields (``--logging.format json``).
"""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class _Formatter(logging.Formatter):
    def __init__(self, stage: str, as_json: bool):
        super().__init__()
        self.stage = stage
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        stamp += f".{int(record.msecs):03d}"
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps(
                {"time": stamp, "level": record.levelname, "stage": self.stage,
                 "logger": record.name, "message": message, **extra},
                default=str,
            )
        context = " ".join(f"{k}={v}" for k, v in extra.items())
        return f"{stamp} {record.levelname:<7} {self.stage:<9} {message}" + (f"  [{context}]" if context else "")


def configure(stage: str, level: str = "INFO", fmt: str = "text") -> None:
    """Send all log records to stderr, one line each, tagged with the stage name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(stage, fmt == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("numba", "bokeh", "tornado", "matplotlib", "h5py", "fabio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    for chatty in ("pyFAI", "silx"):  # warn about optional OpenCL and probe detectors by name
        logging.getLogger(chatty).setLevel(max(logging.ERROR, root.level))
