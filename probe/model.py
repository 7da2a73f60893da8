"""The wire schema: enums and the measurement (docs/measurement.md).

The collector imports this module; the probe never imports the collector.
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "POLICY_EDE",
    "Ede",
    "Expectation",
    "Finding",
    "Measurement",
    "Outcome",
    "Transport",
]


class Transport(StrEnum):
    UDP = "udp"
    TCP = "tcp"
    DOT = "dot"
    DOH = "doh"
    DOH3 = "doh3"
    DOQ = "doq"


class Outcome(StrEnum):
    TIMEOUT = "timeout"
    ERROR = "error"
    EDE_BLOCKED = "ede_blocked"
    SINKHOLE = "sinkhole"
    NXDOMAIN = "nxdomain"
    REFUSED = "refused"
    SERVFAIL = "servfail"
    NODATA = "nodata"
    RESOLVED = "resolved"


class Expectation(StrEnum):
    BLOCKED = "blocked"
    RESOLVES = "resolves"


class Finding(StrEnum):
    ENFORCED = "enforced"
    LEAK = "leak"
    OVERBLOCK = "overblock"
    OK = "ok"
    INCONCLUSIVE = "inconclusive"


# RFC 8914 codes that state a policy decision about the name. 18 (Prohibited) is
# deliberately absent: it says the client may not use the resolver at all.
POLICY_EDE = frozenset({4, 15, 16, 17})


@dataclass(frozen=True, slots=True)
class Ede:
    """One Extended DNS Error option; `json` holds structured EXTRA-TEXT when it parses."""

    code: int
    text: str = ""
    json: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "text": self.text}
        if self.json is not None:
            out["json"] = self.json
        return out


@dataclass(frozen=True, slots=True)
class Measurement:
    """One domain × qtype × resolver × transport, as sent to the collector."""

    domain: str
    qtype: str
    resolver: str
    transport: Transport
    outcome: Outcome
    blocked: bool | None
    expected: Expectation | None
    finding: Finding | None
    rcode: str | None
    ede: tuple[Ede, ...]
    answers: tuple[str, ...]
    cname: tuple[str, ...]
    sinkhole: dict[str, str] | None
    control: dict[str, Any] | None
    latency_ms: float | None
    time: str
    error: str | None
    wire: bytes | None
    # Extensions beyond the contract's required keys.
    endpoint: str = ""
    kind: str = ""
    operator: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    intercepted: bool = False
    reach: str = "unchecked"  # what a user would meet at the answered addresses (answer checks)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of docs/measurement.md, plus extension keys."""
        return {
            "domain": self.domain,
            "qtype": self.qtype,
            "resolver": self.resolver,
            "transport": str(self.transport),
            "outcome": str(self.outcome),
            "blocked": self.blocked,
            "expected": None if self.expected is None else str(self.expected),
            "finding": None if self.finding is None else str(self.finding),
            "rcode": self.rcode,
            "ede": [e.to_json() for e in self.ede],
            "answers": list(self.answers),
            "cname": list(self.cname),
            "sinkhole": self.sinkhole,
            "control": self.control,
            "latency_ms": self.latency_ms,
            "time": self.time,
            "error": self.error,
            "wire": None if self.wire is None else base64.b64encode(self.wire).decode("ascii"),
            "endpoint": self.endpoint,
            "kind": self.kind,
            "operator": self.operator,
            "expected_by": self.evidence.get("expected_by"),
            "intercepted": self.intercepted,
            "reach": self.reach,
            "evidence": self.evidence,
        }

    def replace(self, **changes: Any) -> Measurement:
        return dataclasses.replace(self, **changes)
