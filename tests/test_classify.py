"""Pure classification, as tables; and fuzzing: a hostile answer is classified, never a crash."""

from __future__ import annotations

import json

import dns.edns
import dns.exception
import dns.message
import dns.rcode
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.classify import ControlResult, Verdict, is_special_use, sinkhole_of, verdict_of
from probe.fingerprints import load_fingerprints
from probe.judge import blocked_of, finding_of
from probe.model import Ede, Expectation, Finding, Outcome
from probe.transports import Failure, FailureKind, Phase
from probe.wire import build_query, normalize_name, parse_ede, parse_response_slow

FP = load_fingerprints()


def _response(
    name: str, qtype: str, rcode: int = 0, answers: tuple[str, ...] = (), ede: int | None = None
) -> bytes:
    query = dns.message.from_wire(build_query(name, qtype))
    resp = dns.message.make_response(query)
    resp.set_rcode(dns.rcode.Rcode(rcode))
    if answers:
        resp.answer.append(dns.rrset.from_text(name + ".", 60, "IN", qtype, *answers))
    if ede is not None:
        resp.use_edns(0, options=[dns.edns.EDEOption(dns.edns.EDECode(ede))])
    return resp.to_wire()


def test_sinkhole_rules() -> None:
    assert sinkhole_of("0.0.0.0", True, FP) == {"match": "0.0.0.0", "source": "unspecified address"}
    assert sinkhole_of("::", True, FP) == {"match": "::", "source": "unspecified address"}
    assert sinkhole_of("127.0.0.1", False, FP) == {"match": "127.0.0.1", "source": "loopback address"}
    assert sinkhole_of("10.1.2.3", False, FP) is None  # a private address for a special-use name is normal
    assert sinkhole_of("100.64.1.1", True, FP) == {
        "match": "100.64.1.1",
        "source": "special-purpose address (RFC 6890) for a public name",
    }
    assert sinkhole_of("::ffff:146.112.61.104", True, FP) == {
        "match": "::ffff:146.112.61.104",
        "source": "opendns.blockpage_104 (Cisco Umbrella doc 224799)",
    }
    assert sinkhole_of("93.184.216.34", True, FP) is None
    assert sinkhole_of("not-an-address", True, FP) is None


def test_special_use_names() -> None:
    assert is_special_use("a.test")
    assert is_special_use("localhost")
    assert is_special_use("x.example.com")
    assert not is_special_use("example.community")
    assert not is_special_use("pirate.it")


CONTROL_HAS = ControlResult("ctl", Verdict(Outcome.RESOLVED, answers=("1.2.3.4",)))
CONTROL_DEAD = ControlResult("ctl", Verdict(Outcome.NXDOMAIN))


def test_blocked_table() -> None:
    cases = [
        (Verdict(Outcome.EDE_BLOCKED), None, False, True),
        (Verdict(Outcome.SINKHOLE), None, False, True),
        (Verdict(Outcome.RESOLVED), CONTROL_DEAD, False, False),
        (Verdict(Outcome.NXDOMAIN), CONTROL_HAS, False, True),
        (Verdict(Outcome.NXDOMAIN), CONTROL_DEAD, False, None),
        (Verdict(Outcome.NXDOMAIN), None, False, None),
        (Verdict(Outcome.NODATA), CONTROL_HAS, False, True),
        (Verdict(Outcome.REFUSED, ede=(Ede(18),)), CONTROL_HAS, False, None),
        (Verdict(Outcome.SERVFAIL, ede=(Ede(22),)), CONTROL_HAS, False, None),
        # An upstream failure, not a block: no policy EDE, whatever the control says.
        (Verdict(Outcome.SERVFAIL), CONTROL_HAS, False, None),
        (Verdict(Outcome.REFUSED), CONTROL_HAS, False, True),
        (Verdict(Outcome.TIMEOUT), CONTROL_HAS, True, True),
        (Verdict(Outcome.TIMEOUT), CONTROL_HAS, False, None),
        (Verdict(Outcome.ERROR), CONTROL_HAS, True, None),
    ]
    for verdict, control, answered, want in cases:
        assert blocked_of(verdict, control, answered) is want, (verdict.outcome, control, answered)


def test_findings_table() -> None:
    assert finding_of(Expectation.BLOCKED, True) is Finding.ENFORCED
    assert finding_of(Expectation.BLOCKED, False) is Finding.LEAK
    assert finding_of(Expectation.RESOLVES, True) is Finding.OVERBLOCK
    assert finding_of(Expectation.RESOLVES, False) is Finding.OK
    assert finding_of(Expectation.BLOCKED, None) is Finding.INCONCLUSIVE
    assert finding_of(None, True) is None


def test_ede_wins_over_every_rcode() -> None:
    for rcode in (0, 2, 3, 5):
        v = verdict_of(_response("x.example.org", "A", rcode=rcode, ede=15), None, "x.example.org", "A", FP)
        assert v.outcome is Outcome.EDE_BLOCKED


def test_failures_map_to_timeout_and_error() -> None:
    v = verdict_of(
        None,
        Failure(FailureKind.TIMEOUT, Phase.DNS_ROUND_TRIP, "dns_round_trip: timed out"),
        "a.org",
        "A",
        FP,
    )
    assert (v.outcome, v.error) == (Outcome.TIMEOUT, "dns_round_trip: timed out")
    v = verdict_of(
        None,
        Failure(FailureKind.ERROR, Phase.TLS_HANDSHAKE, "tls: certificate verify failed"),
        "a.org",
        "A",
        FP,
    )
    assert (v.outcome, v.evidence["phase"]) == (Outcome.ERROR, "tls_handshake")


def test_unknown_rcode_is_an_error() -> None:
    v = verdict_of(_response("a.example.org", "A", rcode=1), None, "a.example.org", "A", FP)
    assert (v.outcome, v.error) == (Outcome.ERROR, "unexpected rcode FORMERR")


def test_structured_ede_text_is_parsed() -> None:
    e = parse_ede(dns.edns.EDEOption(dns.edns.EDECode(17), '{"j":"Filtered","o":"AdGuard DNS"}'))
    assert (e.code, e.json) == (17, {"j": "Filtered", "o": "AdGuard DNS"})
    assert parse_ede(dns.edns.EDEOption(dns.edns.EDECode(16), "{not json")).json is None


def test_names_are_normalised() -> None:
    assert normalize_name("Bücher.Example.") == "xn--bcher-kva.example"
    assert normalize_name("WWW.Example.ORG") == "www.example.org"


def _assert_verdict_matches_dnspython(wire: bytes, v: Verdict) -> None:
    """A hostile message is an error exactly when dnspython rejects it, and otherwise says what
    dnspython read; either way the verdict serialises (a resolver's bytes never crash the output)."""
    try:
        p = parse_response_slow(wire, "a.example.org", "A")
    except (dns.exception.DNSException, ValueError, IndexError, UnicodeError):
        assert v.outcome is Outcome.ERROR
        assert v.error is not None
        assert v.error.startswith("malformed response: ")
        assert (v.rcode, v.answers) == (None, ())
    else:
        assert v.error is None or v.error == f"unexpected rcode {p.rcode}"
        assert (v.rcode, v.ede, v.answers, v.cname, v.nsid) == (p.rcode, p.ede, p.answers, p.cname, p.nsid)
        assert (v.outcome is Outcome.RESOLVED) == (
            p.rcode == "NOERROR" and bool(p.answers) and not v.sinkhole
        )
    shown = {
        "ede": [e.to_json() for e in v.ede],
        "nsid": v.nsid,
        "evidence": v.evidence,
        "sinkhole": v.sinkhole,
    }
    json.dumps(shown, ensure_ascii=False).encode()  # strict UTF-8: a lone surrogate would raise here


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_crash(data: bytes) -> None:
    _assert_verdict_matches_dnspython(data, verdict_of(data, None, "a.example.org", "A", FP))


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_responses_never_crash(data: st.DataObject) -> None:
    wire = bytearray(_response("a.example.org", "A", answers=("93.184.216.34", "0.0.0.0"), ede=16))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(12, len(wire)))
    msg = bytes(wire[:cut])
    _assert_verdict_matches_dnspython(msg, verdict_of(msg, None, "a.example.org", "A", FP))
