"""Who is answering? Identity checks for public resolvers, and canaries for every resolver.

ISPs often intercept port 53 transparently: a query to 8.8.8.8 is answered by the
ISP's resolver. Findings measured that way belong to the ISP, not to Google, so a
resolver that fails its operator's identity check has its measurements marked
`intercepted` and its findings made inconclusive. Encrypted transports prove the
operator by certificate; the checks run on plain UDP and TCP only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import dns.edns
import dns.exception
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from probe.model import Expectation, Transport

__all__ = ["IDENTITY_PROBES", "Canary", "Identity", "IdentityProbe", "identity_of"]


@dataclass(frozen=True, slots=True)
class IdentityProbe:
    """A query only the operator answers in a recognisable way; `pattern` must match a TXT string."""

    qname: str
    qclass: str
    pattern: str | None  # None: any TXT answer proves it
    source: str

    def query(self) -> bytes:
        msg = dns.message.make_query(
            self.qname, "TXT", self.qclass, use_edns=0, id=0, options=[dns.edns.NSIDOption(b"")]
        )
        return msg.to_wire()


# Operators' own debugging names (sources: each operator's documentation, checked 2026-11).
IDENTITY_PROBES: dict[str, IdentityProbe] = {
    # Answers the client's address, but only Cloudflare's resolver knows the name in class CH.
    "cloudflare": IdentityProbe(
        "whoami.cloudflare", "CH", None, "developers.cloudflare.com 1.1.1.1 troubleshooting"
    ),
    # Google's authoritative servers answer with the resolver's egress address: Google's ranges.
    "google": IdentityProbe(
        "o-o.myaddr.l.google.com",
        "IN",
        r"^(172\.217\.|172\.253\.|74\.125\.|173\.194\.|35\.19[0-9]\.|2404:6800:|2607:f8b0:|2800:3f0:|2a00:1450:|2c0f:fb50:)",
        "developers.google.com/speed/public-dns/faq (egress ranges published at dns.google/ipranges)",
    ),
    # Quad9 runs on PCH's anycast: its id.server names end in pch.net.
    "quad9": IdentityProbe("id.server", "CH", r"(\.pch\.net|quad9)", "Quad9 FAQ; RFC 4892"),
    "opendns": IdentityProbe(
        "debug.opendns.com", "IN", r"^server ", "Cisco Umbrella debugging documentation"
    ),
}

PLAIN = frozenset({Transport.UDP, Transport.TCP})


@dataclass(frozen=True, slots=True)
class Identity:
    """The outcome of an identity check on one endpoint: `ok` None when it could not tell."""

    operator: str
    method: str
    ok: bool | None
    answers: tuple[str, ...] = ()
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "operator": self.operator,
            "method": self.method,
            "ok": self.ok,
            "answers": list(self.answers),
            "detail": self.detail,
        }


def identity_of(operator: str, probe: IdentityProbe, response: bytes | None, failure: str | None) -> Identity:
    """Judge an identity answer. No answer at all says nothing (the resolver may be down)."""
    method = f"{probe.qname} {probe.qclass} TXT"
    if response is None:
        return Identity(operator, method, None, detail=failure or "no answer")
    try:
        msg = dns.message.from_wire(response)
    except (dns.exception.DNSException, ValueError):
        return Identity(operator, method, False, detail="malformed answer to the identity query")
    texts: list[str] = []
    for rrset in msg.answer:
        if rrset.rdtype == dns.rdatatype.TXT:
            for rd in rrset:
                texts.append(b"".join(rd.strings).decode("utf-8", "replace"))
    if not texts:
        rcode = dns.rcode.to_text(msg.rcode())
        return Identity(operator, method, False, detail=f"{rcode} with no TXT: not {operator}'s resolver")
    if probe.pattern is not None and not any(re.search(probe.pattern, t) for t in texts):
        return Identity(operator, method, False, tuple(texts), f"the answer does not look like {operator}'s")
    return Identity(operator, method, True, tuple(texts))


@dataclass(frozen=True, slots=True)
class Canary:
    """A name whose fate on a resolver is known: if a `resolves` canary does not resolve, or no
    canary gets any answer, that resolver's findings in the run cannot be trusted."""

    name: str
    expect: Expectation
