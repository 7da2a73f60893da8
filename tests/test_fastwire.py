"""The fast parser must say exactly what dnspython says, or step aside (differential fuzzing)."""

from __future__ import annotations

import ipaddress
import random

import dns.edns
import dns.exception
import dns.message
import dns.rcode
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.fastwire import parse_fast
from probe.wire import (
    Parsed,
    build_query,
    build_query_dnspython,
    parse_response_slow,
    question_of,
    reply_problem,
)

NAMES = ["a.example.org", "b.example.org", "cdn.example.net", "x.y.example.org"]


@st.composite
def responses(draw: st.DrawFn) -> tuple[dns.message.Message, str, str]:
    qname = draw(st.sampled_from(NAMES))
    qtype = draw(st.sampled_from(["A", "AAAA"]))
    resp = dns.message.make_response(dns.message.from_wire(build_query(qname, qtype)))
    resp.set_rcode(draw(st.sampled_from([dns.rcode.Rcode(c) for c in (0, 2, 3, 5)])))
    owner = qname
    for target in draw(st.lists(st.sampled_from(NAMES), max_size=2)):
        resp.answer.append(dns.rrset.from_text(owner + ".", 60, "IN", "CNAME", target + "."))
        owner = target
    v4 = st.ip_addresses(v=4).map(str)
    v6 = st.ip_addresses(v=6).map(str)
    for rtype, gen in (("A", v4), ("AAAA", v6)):
        addrs = draw(st.lists(gen, max_size=3))
        if addrs:
            name = draw(st.sampled_from([owner, *NAMES]))
            resp.answer.append(dns.rrset.from_text(name + ".", 60, "IN", rtype, *addrs))
    if draw(st.booleans()):
        resp.authority.append(
            dns.rrset.from_text("example.org.", 60, "IN", "SOA", "ns.example.org. h.example.org. 1 2 3 4 5")
        )
    options: list[dns.edns.Option] = []
    if draw(st.booleans()):
        options.append(dns.edns.NSIDOption(draw(st.binary(max_size=12))))
    if draw(st.booleans()):
        options.append(dns.edns.EDEOption(dns.edns.EDECode(draw(st.sampled_from([15, 16, 18])))))
    resp.use_edns(0, options=options)
    return resp, qname, qtype


@settings(max_examples=600, deadline=None)
@given(responses(), st.data())
def test_fast_parser_agrees_with_dnspython(
    case: tuple[dns.message.Message, str, str], data: st.DataObject
) -> None:
    msg, qname, qtype = case
    wire = msg.to_wire()
    if data.draw(st.booleans()):  # and on damaged messages too
        buf = bytearray(wire)
        for _ in range(data.draw(st.integers(1, 4))):
            buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
        wire = bytes(buf[: data.draw(st.integers(12, len(buf)))])
    fast = parse_fast(wire, qname, qtype)
    try:
        slow: Parsed | None = parse_response_slow(wire, qname, qtype)
    except (dns.exception.DNSException, ValueError, IndexError, UnicodeError):
        slow = None
    if fast is None:
        return  # stepping aside is always allowed
    assert slow is not None, "the fast parser accepted what dnspython rejects"
    assert Parsed(*fast) == slow


def _corpus(n: int, seed: int) -> list[tuple[bytes, str, str]]:
    """Undamaged responses of the same shapes as `responses()`, drawn from a fixed seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        qname, qtype = rng.choice(NAMES), rng.choice(["A", "AAAA"])
        resp = dns.message.make_response(dns.message.from_wire(build_query(qname, qtype)))
        resp.set_rcode(dns.rcode.Rcode(rng.choice((0, 2, 3, 5))))
        owner = qname
        for target in rng.sample([x for x in NAMES if x != qname], rng.randint(0, 2)):  # no self-CNAME
            resp.answer.append(dns.rrset.from_text(owner + ".", 60, "IN", "CNAME", target + "."))
            owner = target
        for rtype, bits in (("A", 32), ("AAAA", 128)):
            make = ipaddress.IPv4Address if bits == 32 else ipaddress.IPv6Address
            addrs = [str(make(rng.getrandbits(bits))) for _ in range(rng.randint(0, 3))]
            if addrs:
                name = rng.choice([owner, *NAMES])
                resp.answer.append(dns.rrset.from_text(name + ".", 60, "IN", rtype, *addrs))
        if rng.random() < 0.5:
            resp.authority.append(
                dns.rrset.from_text(
                    "example.org.", 60, "IN", "SOA", "ns.example.org. h.example.org. 1 2 3 4 5"
                )
            )
        options: list[dns.edns.Option] = []
        if rng.random() < 0.5:
            options.append(dns.edns.NSIDOption(rng.randbytes(rng.randint(0, 12))))
        resp.use_edns(0, options=options)  # no EDE: the fast parser declines those by design
        out.append((resp.to_wire(), qname, qtype))
    return out


def test_fast_parser_accepts_most_healthy_messages() -> None:
    """The fast path must carry the common case: a parser that always declined would pass the
    differential test above and be useless. Of 500 undamaged EDE-free responses (CNAME chains,
    stray records, SOA, NSID), at least 95 % must be taken, each exactly as dnspython reads it."""
    corpus = _corpus(500, seed=1415)
    taken = 0
    for wire, qname, qtype in corpus:
        fast = parse_fast(wire, qname, qtype)
        if fast is not None:
            taken += 1
            assert Parsed(*fast) == parse_response_slow(wire, qname, qtype)
    assert taken >= 0.95 * len(corpus), f"{taken} of {len(corpus)}"


def test_fast_parser_takes_the_common_case() -> None:
    resp = dns.message.make_response(dns.message.from_wire(build_query("a.example.org", "A")))
    resp.answer.append(dns.rrset.from_text("a.example.org.", 60, "IN", "A", "192.0.2.1", "192.0.2.2"))
    resp.use_edns(0, options=[dns.edns.NSIDOption(b"pop-1")])
    wire = resp.to_wire()  # once: dnspython shuffles rdata order on every to_wire()
    fast = parse_fast(wire, "a.example.org", "A")
    assert fast is not None
    assert Parsed(*fast) == parse_response_slow(wire, "a.example.org", "A")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True), min_size=1, max_size=6),
    st.sampled_from(["A", "AAAA", "HTTPS"]),
    st.booleans(),
)
def test_hand_built_query_is_byte_for_byte_dnspython(labels: list[str], qtype: str, pad: bool) -> None:
    name = ".".join(labels)
    assert build_query(name, qtype, pad) == build_query_dnspython(name, qtype, pad)


def _reply_problem_reference(msg: bytes, qid: int, question: bytes) -> str | None:
    """reply_problem as it was before its fast path: every check in the contract's order."""
    if len(msg) < 12 + len(question):
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
    end = 12 + len(question)
    if msg[end - 4 : end] != question[-4:] or msg[12 : end - 4].lower() != question[:-4].lower():
        return "question does not match"
    return None


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(NAMES),
    st.sampled_from(["A", "AAAA", "HTTPS"]),
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 255)), max_size=3),
    st.integers(0, 60),
    st.booleans(),
)
def test_reply_checks_fast_path_says_what_the_full_checks_say(
    qname: str, qtype: str, edits: list[tuple[int, int]], cut: int, upper: bool
) -> None:
    query = build_query(qname, qtype)
    question = question_of(query)
    wire = bytearray(dns.message.make_response(dns.message.from_wire(query)).to_wire())
    wire[0:2] = b"\x12\x34"
    if upper:
        wire[13:15] = bytes(wire[13:15]).upper()  # 0x20 mixed case: still the same question
    for pos, value in edits:
        if pos < len(wire):
            wire[pos] = value
    msg = bytes(wire[: len(wire) - cut] if cut else wire)
    for qid in (0x1234, 0x4321):
        assert reply_problem(msg, qid, question) == _reply_problem_reference(msg, qid, question)
