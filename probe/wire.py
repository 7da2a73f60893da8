"""DNS messages on the wire: names, pre-built queries, and what a response says.

Queries are built once per (name, type, padding) and only their ID is patched per
send: building a dnspython Message per query costs more than the exchange itself.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.svcbbase

from probe.errors import InputError
from probe.fastwire import parse_fast
from probe.model import Ede

__all__ = [
    "QTYPES",
    "Parsed",
    "build_query",
    "normalize_name",
    "parse_ede",
    "parse_response",
    "question_of",
    "reply_problem",
    "set_id",
]

QTYPES = ("A", "AAAA", "HTTPS")
EDNS_PAYLOAD = 1232  # the DNS flag day 2020 figure: avoids IP fragmentation
QUERY_PAD_BLOCK = 128  # RFC 8467 section 4.1: block-length padding for queries


_PLAIN_NAME = re.compile(
    r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*"
)


def normalize_name(text: str) -> str:
    """IDNA A-label, lower case, no trailing dot; InputError naming the input otherwise."""
    raw = text.strip()
    plain = raw.rstrip(".").lower()
    if _PLAIN_NAME.fullmatch(plain) and "--" not in plain:
        return plain  # already an A-label-free LDH name: nothing for IDNA to do

    if not raw or raw == ".":
        raise InputError(f"{text!r} is not a domain name")
    try:
        name = dns.name.from_text(raw.rstrip(".") + ".", idna_codec=dns.name.IDNA_2008_Practical)
        out = name.to_text(omit_final_dot=True)
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise InputError(f"{text!r} is not a domain name: {exc}") from None
    if "\\" in out or " " in out:
        raise InputError(f"{text!r} is not a domain name: it holds characters a host name cannot")
    return out.lower()


def normalize_qtype(text: str) -> str:
    qtype = text.strip().upper()
    if qtype not in QTYPES:
        raise InputError(f"{text!r} is not a query type this probe asks (one of {', '.join(QTYPES)})")
    return qtype


_QTYPE_CODES = {"A": 1, "AAAA": 28, "HTTPS": 65}
_HEADER = bytes.fromhex("000001000001000000000001")  # ID 0, RD, one question, one additional (OPT)
_NSID_EMPTY = b"\x00\x03\x00\x00"


@functools.lru_cache(maxsize=65536)
def build_query(name: str, qtype: str, pad: bool = False, ede_signal: bool = False) -> bytes:
    """The query wire with ID 0: RD, EDNS0 (1232) with NSID, padded on encrypted transports.

    Written by hand for the names the probe asks (dnspython's builder costs ~70 µs a
    name); `build_query_dnspython` is the reference it is tested against, and takes
    over for anything unusual. `ede_signal` adds the empty EDE option with which
    draft-ietf-dnsop-structured-dns-error asks for structured text (AdGuard honours
    it); it is off by default, since strict parsers (dnspython among them) reject an
    EDE option without an INFO-CODE.
    """
    code = _QTYPE_CODES.get(qtype)
    labels = name.encode("ascii", "replace").split(b".") if name else []
    if ede_signal or code is None or not all(0 < len(lb) < 64 for lb in labels) or len(name) > 253:
        return build_query_dnspython(name, qtype, pad, ede_signal)
    qname = b"".join(bytes((len(lb),)) + lb for lb in labels) + b"\x00"
    question = _HEADER + qname + struct.pack("!HH", code, 1)
    options = _NSID_EMPTY
    if pad:
        # RFC 8467 block padding, as dnspython computes it: the whole message a multiple of 128.
        unpadded = len(question) + 11 + len(options) + 4
        options += struct.pack("!HH", 12, (-unpadded) % QUERY_PAD_BLOCK) + bytes(
            (-unpadded) % QUERY_PAD_BLOCK
        )
    return question + b"\x00\x00\x29" + struct.pack("!HIH", EDNS_PAYLOAD, 0, len(options)) + options


def build_query_dnspython(name: str, qtype: str, pad: bool = False, ede_signal: bool = False) -> bytes:
    """The same query built by dnspython: the reference, and the path for unusual names."""
    options: list[dns.edns.Option] = [dns.edns.NSIDOption(b"")]
    if ede_signal:
        options.append(dns.edns.GenericOption(dns.edns.EDE, b""))
    msg = dns.message.make_query(
        name,
        qtype,
        use_edns=0,
        payload=EDNS_PAYLOAD,
        options=options,
        id=0,
        pad=QUERY_PAD_BLOCK if pad else 0,
    )
    return msg.to_wire()


_ids: list[int] = []


def random_id() -> int:
    """An unpredictable 16-bit message ID (RFC 5452), drawn from the OS CSPRNG in batches."""
    if not _ids:
        _ids.extend(struct.unpack("!2048H", os.urandom(4096)))
    return _ids.pop()


def set_id(wire: bytes, qid: int) -> bytes:
    return struct.pack("!H", qid) + wire[2:]


@functools.lru_cache(maxsize=65536)
def question_of(query: bytes) -> bytes:
    """The question section of a query we built (one question, uncompressed)."""
    end = 12
    while query[end]:
        end += query[end] + 1
    return query[12 : end + 5]


def reply_problem(msg: bytes, qid: int, question: bytes) -> str | None:
    """Why `msg` is not the response to the query with `qid` and `question`, or None when it is.

    docs/measurement.md: QR=1, opcode QUERY, the query's ID and its question (the
    name compared case-insensitively, type and class exactly).
    """
    end = 12 + len(question)
    # The common case first, in one pass: our own question echoed byte for byte, the ID, QR=1
    # with opcode QUERY (0xF8 masks both), one question. Anything else finds its reason below.
    if (
        len(msg) >= end
        and msg[12:end] == question
        and (msg[0] << 8) | msg[1] == qid
        and msg[2] & 0xF8 == 0x80
        and msg[4:6] == b"\x00\x01"
    ):
        return None
    if len(msg) < end:
        return "short message"
    if (msg[0] << 8) | msg[1] != qid:
        return "wrong message ID"
    if not msg[2] & 0x80:
        return "not a response (QR=0)"
    opcode = (msg[2] >> 3) & 0x0F
    if opcode != 0:
        return f"opcode {opcode}, not QUERY"
    if msg[4:6] != b"\x00\x01":
        return "not exactly one question"
    if msg[end - 4 : end] != question[-4:] or msg[12 : end - 4].lower() != question[:-4].lower():
        return "question does not match"
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def safe_text(text: str) -> str:
    """Text from a resolver, made safe to write as JSON: a lone surrogate (from a JSON escape
    like \\ud800, or bytes decoded with surrogateescape) becomes U+FFFD instead of crashing
    every encoder after it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: Python's json accepts them, others do not


def _finite(literal: str) -> float:
    # 1e999 is JSON by its grammar, but Python reads it as inf and writes it back as Infinity,
    # which no other parser (the collector's included) accepts: such JSON is kept as text only.
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"{literal[:40]} is out of range for a number")
    return value


def _safe_json(value: Any) -> Any:
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, dict):
        return {safe_text(str(k)): _safe_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_safe_json(v) for v in value]
    return value


def parse_ede(option: dns.edns.Option) -> Ede:
    """An EDE option, with draft-ietf-dnsop-structured-dns-error JSON kept when present.

    JSON that only Python reads (NaN, Infinity, a number beyond a double's range) is not
    kept as structured: the text stays, as for any EXTRA-TEXT that is not JSON."""
    if isinstance(option, dns.edns.EDEOption):
        code, text = int(option.code), option.text or ""
    else:  # a malformed option dnspython kept generic: keep what the bytes say
        data = option.to_wire() or b""
        code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else -1
        text = data[2:].decode("utf-8", "replace")
    text = safe_text(text)
    structured = None
    if text.lstrip().startswith("{"):
        try:
            parsed = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, dict):
            # Kept whole here, however deep: probe.limits.clamp cuts it to what the collector
            # accepts and says so in `evidence.truncated`.
            try:
                structured = _safe_json(parsed)
            except RecursionError:
                structured = None
    return Ede(code, text, structured)


# Not frozen, though never changed once built: one is built per response, and a frozen
# dataclass's __init__ pays object.__setattr__ per field.
@dataclass(slots=True)
class Parsed:
    """What a response says, reduced to what classification needs."""

    rcode: str
    ede: tuple[Ede, ...]
    answers: tuple[str, ...]
    addresses: tuple[str, ...]
    cname: tuple[str, ...]
    nsid: str | None
    aa: bool
    ra: bool
    authority_soa: bool


def _hints(rdata: object) -> list[str]:
    out: list[str] = []
    params = getattr(rdata, "params", {}) or {}
    for key in (dns.rdtypes.svcbbase.ParamKey.IPV4HINT, dns.rdtypes.svcbbase.ParamKey.IPV6HINT):
        value = params.get(key)
        if value is not None:
            out.extend(str(a) for a in value.addresses)
    return out


def parse_response(wire: bytes, qname: str, qtype: str) -> Parsed:
    """Parse a response; raises dns.exception.DNSException on a malformed one."""
    fast = parse_fast(wire, qname, qtype)
    if fast is not None:
        return Parsed(*fast)
    return parse_response_slow(wire, qname, qtype)


def parse_response_slow(wire: bytes, qname: str, qtype: str) -> Parsed:
    """dnspython's full parse: every record type, every EDNS option, every irregularity judged."""
    msg = dns.message.from_wire(wire, ignore_trailing=False)
    rdtype = dns.rdatatype.from_text(qtype)
    ede: list[Ede] = []
    nsid = None
    for opt in msg.options:
        if opt.otype == dns.edns.EDE:
            ede.append(parse_ede(opt))
        elif opt.otype == dns.edns.NSID:
            data = opt.to_wire() or b""
            nsid = data.decode("utf-8", "replace") if data.isascii() else data.hex()
    owner = dns.name.from_text(qname + ".")
    chain: list[str] = []
    answers: list[str] = []
    addresses: list[str] = []
    # Follow the CNAME chain from the name asked, so that unrelated records a hostile
    # resolver stuffs into the answer section are not taken as the answer.
    seen = {owner}
    for _ in range(16):
        cname_rrset = msg.get_rrset(msg.answer, owner, dns.rdataclass.IN, dns.rdatatype.CNAME)
        if cname_rrset is None or rdtype == dns.rdatatype.CNAME:
            break
        target = cname_rrset[0].target
        chain.append(target.to_text(omit_final_dot=True).lower())
        if target in seen:
            break
        seen.add(target)
        owner = target
    rrset = msg.get_rrset(msg.answer, owner, dns.rdataclass.IN, rdtype)
    if rrset is not None:
        for rd in rrset:
            answers.append(rd.to_text())
            if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                addresses.append(rd.address)
            else:
                addresses.extend(_hints(rd))
    return Parsed(
        rcode=dns.rcode.to_text(msg.rcode()),
        ede=tuple(ede),
        answers=tuple(answers),
        addresses=tuple(addresses),
        cname=tuple(chain),
        nsid=nsid,
        aa=bool(msg.flags & dns.flags.AA),
        ra=bool(msg.flags & dns.flags.RA),
        authority_soa=any(r.rdtype == dns.rdatatype.SOA for r in msg.authority),
    )
