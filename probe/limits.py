"""The bounds of a measurement, in one place: the probe clamps to them, the collector enforces them.

A resolver may send anything (thousands of answers, a megabyte of EDE text, JSON nested
hundreds deep). If the probe forwarded that as is, the collector would refuse the batch
and every later batch would wait behind it. Both sides import these numbers, so the probe
can never produce a measurement the collector refuses.
"""

from __future__ import annotations

__all__ = [
    "MAX_ANSWERS",
    "MAX_ANSWER_CHARS",
    "MAX_BATCH_MEASUREMENTS",
    "MAX_CNAME",
    "MAX_DOH_BODY",
    "MAX_EDE",
    "MAX_EDE_TEXT",
    "MAX_ERROR_CHARS",
    "MAX_JSON_DEPTH",
    "MAX_LABEL_CHARS",
    "MAX_NAME_CHARS",
    "MAX_WIRE_B64",
]

MAX_ANSWERS = 256  # records of the asked type kept per measurement
MAX_ANSWER_CHARS = 4096  # one answer in presentation format (an HTTPS record can be long)
MAX_CNAME = 32  # links of a CNAME chain
MAX_NAME_CHARS = 255  # one name in a CNAME chain
MAX_EDE = 16  # EDE options per response
MAX_EDE_TEXT = 4096  # characters of one EDE EXTRA-TEXT
MAX_ERROR_CHARS = 1024  # a measurement's `error`
MAX_LABEL_CHARS = 128  # resolver names, regions
MAX_JSON_DEPTH = 32  # nesting of any free-form JSON (structured EDE text, evidence)
MAX_DOH_BODY = 65535  # a DNS message never exceeds this (CONTRACTS.md section 3)
MAX_WIRE_B64 = 90000  # base64 of a 65,535-byte message, with room
MAX_BATCH_MEASUREMENTS = 20000  # measurements per POST
