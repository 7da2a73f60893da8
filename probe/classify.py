"""Pure classification (docs/measurement.md): a response or failure → outcome and `blocked`.

No I/O and no clock here: everything a verdict depends on is an argument, so the
rules are tested as tables of data.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Any

import dns.exception

from probe.fingerprints import Fingerprints, IPAddress
from probe.model import POLICY_EDE, Ede, Outcome
from probe.transports.base import Failure, FailureKind
from probe.wire import Parsed, parse_response

__all__ = ["ControlResult", "Verdict", "is_special_use", "sinkhole_of", "verdict_of"]

PROHIBITED = 18  # RFC 8914 EDE 18: a policy block only when it is about the name (docs/measurement.md)

# RFC 6761 and the IANA special-use domain registry: names that never resolve publicly,
# so a private address for them is normal, not a sinkhole.
SPECIAL_USE = (
    "test",
    "localhost",
    "invalid",
    "example",
    "example.com",
    "example.net",
    "example.org",
    "local",
    "onion",
    "home.arpa",
    "alt",
    "internal",
    "10.in-addr.arpa",
    "168.192.in-addr.arpa",
)

_RCODE_OUTCOMES = {"NXDOMAIN": Outcome.NXDOMAIN, "REFUSED": Outcome.REFUSED, "SERVFAIL": Outcome.SERVFAIL}


@functools.lru_cache(maxsize=65536)
def is_special_use(name: str) -> bool:
    name = name.lower().rstrip(".")
    return any(name == s or name.endswith("." + s) for s in SPECIAL_USE)


def sinkhole_of(address: str, public_name: bool, fingerprints: Fingerprints) -> dict[str, str] | None:
    """Why an answered address is a sinkhole, or None when it looks like a real answer."""
    reason = _sinkhole_reason(address, public_name, fingerprints)
    return None if reason is None else {"match": address, "source": reason}


# Bulk runs see the same addresses again and again; ipaddress's range checks are slow.
@functools.lru_cache(maxsize=65536)
def _sinkhole_reason(address: str, public_name: bool, fingerprints: Fingerprints) -> str | None:
    try:
        ip: IPAddress = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # OpenDNS answers AAAA ::ffff:146.112.61.10x
    if ip.is_unspecified:
        return "unspecified address"
    if ip.is_loopback:
        return "loopback address"
    fp = fingerprints.address(ip)
    if fp is not None:
        return fp.describe()
    if public_name and not ip.is_global:
        kind = "private address" if ip.is_private else "special-purpose address"
        return f"{kind} (RFC 6890) for a public name"
    return None


# Not frozen, though never changed once built: one is built per measurement, and a frozen
# dataclass's __init__ pays object.__setattr__ per field.
@dataclass(slots=True)
class Verdict:
    """What one response says, before any expectation: outcome and its evidence."""

    outcome: Outcome
    rcode: str | None = None
    ede: tuple[Ede, ...] = ()
    answers: tuple[str, ...] = ()
    cname: tuple[str, ...] = ()
    sinkhole: dict[str, str] | None = None
    error: str | None = None
    nsid: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def has_records(self) -> bool:
        return self.outcome is Outcome.RESOLVED


@dataclass(frozen=True, slots=True)
class ControlResult:
    """The control resolver's view of a name and type, kept in each measurement."""

    resolver: str
    verdict: Verdict

    def to_json(self) -> dict[str, Any]:
        v = self.verdict
        out: dict[str, Any] = {
            "outcome": str(v.outcome),
            "answers": list(v.answers),
            "resolver": self.resolver,
        }
        if v.error:
            out["error"] = v.error
        return out

    @property
    def failed(self) -> bool:
        """The control could not speak for the name; a second control may."""
        return self.verdict.outcome in (Outcome.TIMEOUT, Outcome.ERROR, Outcome.SERVFAIL, Outcome.REFUSED)


def _verdict(
    p: Parsed,
    evidence: dict[str, Any],
    outcome: Outcome,
    sinkhole: dict[str, str] | None = None,
    error: str | None = None,
) -> Verdict:
    return Verdict(outcome, p.rcode, p.ede, p.answers, p.cname, sinkhole, error, p.nsid, evidence)


def verdict_of(  # noqa: C901 - the verdict rules of docs/measurement.md, in their order
    response: bytes | None,
    failure: Failure | None,
    qname: str,
    qtype: str,
    fingerprints: Fingerprints,
    ede18_name_specific: bool = False,
) -> Verdict:
    """Outcome rules 1–6 of docs/measurement.md, in their order.

    `ede18_name_specific`: the same endpoint answered other queries of the run without
    EDE 18, so an EDE 18 on a negative answer refuses this name, not this client.
    """
    if response is None:
        assert failure is not None
        outcome = Outcome.TIMEOUT if failure.kind is FailureKind.TIMEOUT else Outcome.ERROR
        return Verdict(outcome, error=failure.text, evidence={"phase": str(failure.phase)})
    try:
        p = parse_response(response, qname, qtype)
    except (dns.exception.DNSException, ValueError, IndexError, UnicodeError) as exc:
        return Verdict(
            Outcome.ERROR,
            error=f"malformed response: {type(exc).__name__}",
            evidence={"phase": "dns_round_trip"},
        )
    evidence: dict[str, Any] = {}
    if any(e.code in POLICY_EDE for e in p.ede):
        return _verdict(p, evidence, Outcome.EDE_BLOCKED)
    negative = p.rcode in _RCODE_OUTCOMES or (p.rcode == "NOERROR" and not p.answers)
    if ede18_name_specific and negative and any(e.code == PROHIBITED for e in p.ede):
        evidence["ede18_name_specific"] = True
        return _verdict(p, evidence, Outcome.EDE_BLOCKED)
    public = not is_special_use(qname)
    if p.addresses:
        holes = [sinkhole_of(a, public, fingerprints) for a in p.addresses]
        if all(holes):
            return _verdict(p, evidence, Outcome.SINKHOLE, sinkhole=holes[0])
    for target in p.cname:
        fp = fingerprints.name(target)
        if fp is not None:
            return _verdict(
                p, evidence, Outcome.SINKHOLE, sinkhole={"match": target, "source": fp.describe()}
            )
    if p.rcode in _RCODE_OUTCOMES:
        if p.rcode == "NXDOMAIN" and not p.authority_soa:
            # A real NXDOMAIN proves itself with the zone's SOA; Quad9's blocks carry none.
            evidence["nxdomain_without_soa"] = True
            if not p.ra:
                evidence["ra_cleared"] = True
        return _verdict(p, evidence, _RCODE_OUTCOMES[p.rcode])
    if p.rcode != "NOERROR":
        evidence["phase"] = "dns_round_trip"
        return _verdict(p, evidence, Outcome.ERROR, error=f"unexpected rcode {p.rcode}")
    if not p.answers:
        return _verdict(p, evidence, Outcome.NODATA)
    return _verdict(p, evidence, Outcome.RESOLVED)
