"""A strict, narrow parser for the common response: the hot path of classification.

dnspython builds a full object graph per message (~150 µs); a probe needs the rcode,
the addresses or CNAMEs on the asked name, whether a SOA came back, NSID and EDE.
This parser reads exactly that, and only for messages it can vouch for completely:
A, AAAA, CNAME, NS and SOA records, one OPT, well-formed names. Anything else (an
HTTPS answer, an EDE option, a record type it does not check, any irregularity)
returns None and the caller uses dnspython, which stays the judge of what is
malformed. A differential test holds the two to the same answers.
"""

from __future__ import annotations

import re
import socket
import struct

import dns.ipv6
import dns.rcode

__all__ = ["FastParsed", "parse_fast"]

_A, _NS, _CNAME, _SOA, _AAAA, _OPT = 1, 2, 5, 6, 28, 41
_CHECKED = frozenset({_A, _NS, _CNAME, _SOA, _AAAA, _OPT})
_QTYPES = {"A": _A, "AAAA": _AAAA}
_EDE, _NSID = 15, 3
_RCODES = {i: dns.rcode.to_text(dns.rcode.Rcode(i)) for i in range(16)}
_unpack_rr = struct.Struct("!HHIH").unpack_from
_PLAIN = re.compile(rb"[A-Za-z0-9_-]+").fullmatch


class _Bad(Exception):
    pass


def _name(wire: bytes, pos: int) -> tuple[str, int]:
    """Read a possibly compressed name at pos; (lower-case text without final dot, end)."""
    labels: list[str] = []
    end = -1
    total = 1
    start = pos
    while True:
        if pos >= len(wire):
            raise _Bad
        n = wire[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(wire):
                raise _Bad
            target = ((n & 0x3F) << 8) | wire[pos + 1]
            if end < 0:
                end = pos + 2
            if target >= start:  # pointers must point backwards (no loops), as dnspython insists
                raise _Bad
            start = pos = target
            continue
        if n & 0xC0:
            raise _Bad
        label = wire[pos + 1 : pos + 1 + n]
        if len(label) != n:
            raise _Bad
        total += n + 1
        if total > 255:
            raise _Bad
        if not _PLAIN(label):
            raise _Bad  # escapes and odd bytes: leave presentation to dnspython
        labels.append(label.decode("ascii").lower())
        pos += n + 1
    return ".".join(labels), (end if end >= 0 else pos)


# The fields of wire.Parsed in order (rcode, ede, answers, addresses, cname, nsid, aa, ra,
# authority_soa), typed so that `Parsed(*fast)` is checked; a tuple, since wire imports this module.
# The fast path never reports EDE (it declines a message carrying one), hence `tuple[()]`.
FastParsed = tuple[
    str, tuple[()], tuple[str, ...], tuple[str, ...], tuple[str, ...], str | None, bool, bool, bool
]


def parse_fast(wire: bytes, qname: str, qtype: str) -> FastParsed | None:
    """The fields of wire.Parsed, or None when this parser cannot vouch for the message."""
    rdtype = _QTYPES.get(qtype)
    if rdtype is None or len(wire) < 12:
        return None
    try:
        return _parse(wire, qname.lower(), rdtype)
    except (_Bad, struct.error, IndexError):
        return None


# The fast path's point is one flat loop over the bytes; split into helpers it pays a call per record.
def _parse(wire: bytes, qname: str, rdtype: int) -> FastParsed | None:  # noqa: C901
    flags, qd, an, ns, ar = struct.unpack_from("!HHHHH", wire, 2)
    if qd != 1 or not flags & 0x8000:
        return None
    _, pos = _name(wire, 12)
    pos += 4
    records: list[tuple[int, str, int, int, int]] = []  # section, owner, type, rdata start, rdata end
    for section, count in ((0, an), (1, ns), (2, ar)):
        for _ in range(count):
            owner, pos = _name(wire, pos)
            rtype, rclass, _ttl, rdlen = _unpack_rr(wire, pos)
            pos += 10
            end = pos + rdlen
            if end > len(wire) or rtype not in _CHECKED or (rclass != 1 and rtype != _OPT):
                return None
            records.append((section, owner, rtype, pos, end))
            pos = end
    if pos != len(wire):
        return None  # trailing bytes: dnspython calls that malformed
    rcode = flags & 0xF
    nsid = None
    opt_seen = False
    cnames: dict[str, str] = {}
    answers: dict[str, list[str]] = {}
    soa = False
    for section, owner, rtype, start, end in records:
        if rtype == _OPT:
            if section != 2 or opt_seen or owner != "":
                return None
            opt_seen = True
            ttl = struct.unpack_from("!I", wire, start - 6)[0]
            rcode |= (ttl >> 24) << 4
            p = start
            while p < end:
                code, olen = struct.unpack_from("!HH", wire, p)
                p += 4
                if p + olen > end or code == _EDE:
                    return None  # EDE: dnspython parses it, with its own checks
                if code == _NSID:
                    data = wire[p : p + olen]
                    nsid = data.decode("utf-8", "replace") if data.isascii() else data.hex()
                p += olen
            if p != end:
                return None
        elif rtype == _A:
            if end - start != 4:
                return None
            if section == 0:
                answers.setdefault(owner, []).append(socket.inet_ntoa(wire[start:end]))
        elif rtype == _AAAA:
            if end - start != 16:
                return None
            if section == 0:
                answers.setdefault(owner + "\x00v6", []).append(dns.ipv6.inet_ntoa(wire[start:end]))
        elif rtype in (_CNAME, _NS):
            alias, after = _name(wire, start)
            if after != end:
                return None
            if rtype == _CNAME and section == 0:
                if owner in cnames and cnames[owner] != alias:
                    return None  # two CNAMEs for one owner: let dnspython say what it makes of it
                cnames[owner] = alias
        else:  # SOA
            _, p = _name(wire, start)
            _, p = _name(wire, p)
            if p + 20 != end:
                return None
            if section == 1:
                soa = True
    if rcode not in _RCODES:
        return None
    chain: list[str] = []
    owner = qname
    seen = {owner}
    for _ in range(16):
        nxt = cnames.get(owner)
        if nxt is None:
            break
        chain.append(nxt)
        if nxt in seen:
            break
        seen.add(nxt)
        owner = nxt
    key = owner if rdtype == _A else owner + "\x00v6"
    found = list(dict.fromkeys(answers.get(key, ())))  # an RRset holds each rdata once
    return (
        _RCODES[rcode],
        (),
        tuple(found),
        tuple(found),
        tuple(chain),
        nsid,
        bool(flags & 0x0400),
        bool(flags & 0x0080),
        soa,
    )
