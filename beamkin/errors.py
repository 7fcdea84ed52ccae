"""Errors shared by the stages: :class:`StreamDecodeError` (decoders) and :class:`ReductionError` (reduction).

Decoders (Stream V2 CBOR, Stream V1 JSON multipart, file readers) raise only this type for bad
input. Its ``counter`` names the error counter a source increments for it (``"malformed"``,
``"unknown_tag"``, ``"shape_mismatch"``, ``"unsupported_compression"``, ...), so a source can
log it, count it and carry on without ever letting bad input escape ``messages()``.
"""

from __future__ import annotations


class StreamDecodeError(ValueError):
    """Input that cannot be decoded; the text says what was wrong, ``counter`` which kind.

    ``field`` and ``value`` (optional) name the message field at fault and a short rendering of
    its value, so a rejected start message can be reported as "field X = Y".
    """

    def __init__(self, text: str, counter: str = "malformed", *, field: str | None = None, value: str | None = None) -> None:
        super().__init__(text)
        self.counter = counter
        self.field = field
        self.value = value


class ReductionError(ValueError):
    """A frame, a geometry or a configuration that the reducer cannot process (the message names
    the problem: the parameter, its value and where it came from)."""
