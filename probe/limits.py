"""The bounds of a measurement, in one place: the probe clamps to them, the collector enforces them.

A resolver may send anything (thousands of answers, a megabyte of EDE text, JSON nested
hundreds deep). If the probe forwarded that as is, the collector would refuse the batch
and every later batch would wait behind it. Both sides import these numbers, so the probe
can never produce a measurement the collector refuses.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MAX_AGE_DAYS",
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
    "clamp",
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
MAX_DOH_BODY = 65535  # a DNS message never exceeds this (docs/measurement.md)
MAX_WIRE_B64 = 90000  # base64 of a 65,535-byte message, with room
MAX_BATCH_MEASUREMENTS = 20000  # measurements per POST
MAX_AGE_DAYS = 90  # the collector's default `limits.max_age_days`: older results are refused

# A measurement sits inside the batch body ({"measurements": [ ... ]}: two levels), so the
# probe keeps each measurement two levels under MAX_JSON_DEPTH: whether the collector counts
# depth from the body, the measurement or its evidence, it never sees more than it allows.
_MEASUREMENT_DEPTH = MAX_JSON_DEPTH - 2
_DEPTH_MARK = "[truncated: nested too deep]"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def _bounded(value: Any, depth: int, cut: list[str], path: str) -> Any:
    """Free-form JSON (evidence, structured EDE text, the control's answer) within the depth,
    list-length and string-length bounds; what was cut is named in `cut`. `depth` is the
    level `value` sits at, the measurement object being level 1."""
    if isinstance(value, dict | list) and depth > _MEASUREMENT_DEPTH:
        cut.append(f"{path}: deeper than {MAX_JSON_DEPTH} levels")
        return _DEPTH_MARK
    if isinstance(value, dict):
        return {
            str(k)[:MAX_LABEL_CHARS]: _bounded(v, depth + 1, cut, f"{path}.{k}") for k, v in value.items()
        }
    if isinstance(value, list):
        if len(value) > MAX_ANSWERS:
            cut.append(f"{path}: {len(value)} items, kept {MAX_ANSWERS}")
            value = value[:MAX_ANSWERS]
        return [_bounded(v, depth + 1, cut, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and len(value) > MAX_WIRE_B64:
        cut.append(f"{path}: {len(value)} characters, kept {MAX_WIRE_B64}")
        return _cut(value, MAX_WIRE_B64)
    return value


def _small(value: Any, depth: int) -> bool:
    """True when `_bounded` would cut nothing: the common case, checked without copying."""
    if isinstance(value, str):
        return len(value) <= MAX_WIRE_B64
    if isinstance(value, dict):
        if depth > _MEASUREMENT_DEPTH:
            return False
        for k, v in value.items():
            if (v.__class__ not in _SCALARS and not _small(v, depth + 1)) or len(str(k)) > MAX_WIRE_B64:
                return False
        return True
    if isinstance(value, list):
        if depth > _MEASUREMENT_DEPTH or len(value) > MAX_ANSWERS:
            return False
        for v in value:
            if v.__class__ not in _SCALARS and not _small(v, depth + 1):
                return False
    return True


# Values that can never be cut (strings can, when long).
_SCALARS = frozenset({int, float, bool, type(None)})


def _fits(m: dict[str, Any]) -> bool:  # noqa: C901 - the hot path, kept flat: one check per bound
    """True when `clamp` would change nothing."""
    answers = m.get("answers") or ()
    if len(answers) > MAX_ANSWERS:
        return False
    for a in answers:
        if len(a) > MAX_ANSWER_CHARS:
            return False
    cname = m.get("cname") or ()
    if len(cname) > MAX_CNAME:
        return False
    for c in cname:
        if len(c) > MAX_NAME_CHARS:
            return False
    ede = m.get("ede") or ()
    if len(ede) > MAX_EDE:
        return False
    for e in ede:
        if len(str(e.get("text") or "")) > MAX_EDE_TEXT or ("json" in e and not _small(e["json"], 4)):
            return False
    for key, limit in (
        ("error", MAX_ERROR_CHARS),
        ("resolver", MAX_LABEL_CHARS),
        ("rcode", 16),
        ("wire", MAX_WIRE_B64),
    ):
        value = m.get(key)
        if isinstance(value, str) and len(value) > limit:
            return False
    for key in ("control", "sinkhole", "evidence"):
        value = m.get(key)
        if isinstance(value, dict) and not _small(value, 2):
            return False
    return True


def _strings(values: Any, limit_items: int, limit_chars: int, cut: list[str], key: str) -> list[str]:
    items = list(values or [])
    if len(items) > limit_items:
        cut.append(f"{key}: {len(items)} items, kept {limit_items}")
        items = items[:limit_items]
    out = []
    for i, item in enumerate(items):
        text = str(item)
        if len(text) > limit_chars:
            cut.append(f"{key}[{i}]: {len(text)} characters, kept {limit_chars}")
            text = _cut(text, limit_chars)
        out.append(text)
    return out


def _edes(options: Any, cut: list[str]) -> list[dict[str, Any]]:
    edes = list(options)
    if len(edes) > MAX_EDE:
        cut.append(f"ede: {len(edes)} options, kept {MAX_EDE}")
        edes = edes[:MAX_EDE]
    kept: list[dict[str, Any]] = []
    for i, ede in enumerate(edes):
        ede = dict(ede)
        text = str(ede.get("text") or "")
        if len(text) > MAX_EDE_TEXT:
            cut.append(f"ede[{i}].text: {len(text)} characters, kept {MAX_EDE_TEXT}")
            ede["text"] = _cut(text, MAX_EDE_TEXT)
        if "json" in ede:
            # measurement (1), the ede list (2), the option (3), its json (4)
            ede["json"] = _bounded(ede["json"], 4, cut, f"ede[{i}].json")
        kept.append(ede)
    return kept


def clamp(m: dict[str, Any]) -> dict[str, Any]:
    """The measurement within every bound above, so the collector can never refuse it.

    What a resolver sent beyond a bound is cut, and the cut is said in
    `evidence.truncated` (a list of what was cut and how much), so nobody mistakes a
    clamped answer for the whole answer. A measurement already within bounds comes back
    unchanged (the same object), so clamping twice changes nothing.
    """
    if _fits(m):
        return m
    cut: list[str] = []
    out = dict(m)
    if "answers" in m:
        out["answers"] = _strings(m["answers"], MAX_ANSWERS, MAX_ANSWER_CHARS, cut, "answers")
    if "cname" in m:
        out["cname"] = _strings(m["cname"], MAX_CNAME, MAX_NAME_CHARS, cut, "cname")
    if m.get("ede"):
        out["ede"] = _edes(m["ede"], cut)
    for key, limit in (("error", MAX_ERROR_CHARS), ("resolver", MAX_LABEL_CHARS), ("rcode", 16)):
        value = m.get(key)
        if isinstance(value, str) and len(value) > limit:
            cut.append(f"{key}: {len(value)} characters, kept {limit}")
            out[key] = _cut(value, limit)
    wire = m.get("wire")
    if isinstance(wire, str) and len(wire) > MAX_WIRE_B64:
        cut.append(f"wire: {len(wire)} base64 characters, over {MAX_WIRE_B64}: not kept")
        out["wire"] = None
    for key in ("control", "sinkhole"):
        if isinstance(m.get(key), dict):
            out[key] = _bounded(m[key], 2, cut, key)
    evidence = dict(m.get("evidence") or {})
    evidence.pop("truncated", None)  # what an earlier clamp said stays below, re-added
    bounded = _bounded(evidence, 2, cut, "evidence")
    if not cut:
        return m
    previous = (m.get("evidence") or {}).get("truncated") or []
    bounded["truncated"] = [str(x)[:MAX_LABEL_CHARS] for x in list(previous)[:MAX_ANSWERS]] + [
        c[:MAX_LABEL_CHARS] for c in cut
    ][:MAX_ANSWERS]
    out["evidence"] = bounded
    return out
