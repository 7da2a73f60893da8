"""Every block shape of block-signals.md, scripted as data, checked on every transport.

One lab resolver answers each scenario name as scripted; a control resolver tells
the truth. The whole table runs in one engine run (as a real probe would), then each
scenario × transport is asserted on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from probe.catalogue import resolve_spec
from probe.impair import Impairment, ImpairProxy, PathImpairment, StreamImpairment
from probe.lab import Behaviour, LabCA, LabThread, Zone
from probe.model import Measurement, Outcome
from probe.specs import Resolver

from .conftest import measure, resolvers_of, start_lab, truth_zone

TRANSPORTS = ("udp", "tcp", "dot", "doh", "doh3", "doq")
D = "blockprobe-lab.net"
REAL_A = ("93.184.216.34",)


@dataclass(frozen=True)
class Scenario:
    """A name the lab answers as `behaviour`, and what the probe must conclude, per transport."""

    id: str
    behaviour: Behaviour
    outcome: Outcome
    blocked: bool | None
    qtype: str = "A"
    name: str = ""
    only_qtype: bool = False  # the behaviour applies to `qtype` only; other types get the truth
    per_transport: dict[str, tuple[Outcome, bool | None]] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)
    transports: tuple[str, ...] = TRANSPORTS  # where the scenario means what its id says

    @property
    def domain(self) -> str:
        return self.name or f"{self.id}.{D}"


SCENARIOS = [
    Scenario("resolves", Behaviour(records={"A": REAL_A}), Outcome.RESOLVED, False),
    Scenario("nxdomain", Behaviour(rcode="NXDOMAIN"), Outcome.NXDOMAIN, True),
    Scenario("dead-name", Behaviour(rcode="NXDOMAIN"), Outcome.NXDOMAIN, None, name=f"dead.{D}"),
    Scenario(
        "quad9-nx",
        Behaviour(rcode="NXDOMAIN", soa=False, ra=False),
        Outcome.NXDOMAIN,
        True,
        check={"evidence.nxdomain_without_soa": True, "evidence.ra_cleared": True},
    ),
    Scenario(
        "zero",
        Behaviour(records={"A": ("0.0.0.0",)}),
        Outcome.SINKHOLE,
        True,
        check={"sinkhole.source": "unspecified address"},
    ),
    Scenario(
        "loopback",
        Behaviour(records={"A": ("127.0.0.1",)}),
        Outcome.SINKHOLE,
        True,
        check={"sinkhole.source": "loopback address"},
    ),
    Scenario(
        "blockpage",
        Behaviour(records={"A": ("146.112.61.104",)}),
        Outcome.SINKHOLE,
        True,
        check={"sinkhole.source": "opendns.blockpage_104 (Cisco Umbrella doc 224799)"},
    ),
    Scenario(
        "mapped-v6",
        Behaviour(records={"AAAA": ("::ffff:146.112.61.106",)}),
        Outcome.SINKHOLE,
        True,
        qtype="AAAA",
    ),
    Scenario(
        "private",
        Behaviour(records={"A": ("10.99.88.77",)}),
        Outcome.SINKHOLE,
        True,
        check={"sinkhole.source": "private address (RFC 6890) for a public name"},
    ),
    Scenario(
        "private-special-use",
        Behaviour(records={"A": ("10.1.2.3",)}),
        Outcome.RESOLVED,
        False,
        name="intranet.lab.test",
    ),
    Scenario("mixed", Behaviour(records={"A": ("0.0.0.0", "93.184.216.34")}), Outcome.RESOLVED, False),
    Scenario(
        "refused-ede16",
        Behaviour(rcode="REFUSED", ede=((16, "court order"),)),
        Outcome.EDE_BLOCKED,
        True,
        check={"rcode": "REFUSED", "ede.0.code": 16, "ede.0.text": "court order"},
    ),
    Scenario(
        "noerror-ede17-json",
        Behaviour(
            records={"A": ("94.140.14.35",)},
            ede=((17, '{"j":"Filtered by AdGuard DNS","o":"AdGuard DNS","c":["mailto:x@example.org"]}'),),
        ),
        Outcome.EDE_BLOCKED,
        True,
        check={"ede.0.code": 17, "ede.0.json.o": "AdGuard DNS"},
    ),
    Scenario("forged-ede4", Behaviour(records={"A": REAL_A}, ede=((4, ""),)), Outcome.EDE_BLOCKED, True),
    # EDE 18 on one name while the resolver answers others: Knot Resolver's policy REFUSE.
    Scenario(
        "refused-ede18",
        Behaviour(rcode="REFUSED", ede=((18, "not allowed"),)),
        Outcome.EDE_BLOCKED,
        True,
        check={"evidence.ede18_name_specific": True},
    ),
    # What a recursor answers when its upstream fails for the name: no evidence of a block.
    Scenario("servfail", Behaviour(rcode="SERVFAIL"), Outcome.SERVFAIL, None),
    Scenario(
        "servfail-ede22",
        Behaviour(rcode="SERVFAIL", ede=((22, "no reachable authority"),)),
        Outcome.SERVFAIL,
        None,
    ),
    Scenario("refused", Behaviour(rcode="REFUSED"), Outcome.REFUSED, True),
    Scenario(
        "cname-blockpage",
        Behaviour(cname=("trustpositif.kominfo.go.id",), records={"A": ("27.54.116.70",)}),
        Outcome.SINKHOLE,
        True,
        check={"cname": ["trustpositif.kominfo.go.id"]},
    ),
    Scenario(
        "cname-blockhost-only",
        Behaviour(cname=("restricted.tri.co.id",), records={"A": ("93.184.216.99",)}),
        Outcome.SINKHOLE,
        True,
        check={"sinkhole.match": "restricted.tri.co.id"},
    ),
    Scenario(
        "drop",
        Behaviour(action="drop"),
        Outcome.TIMEOUT,
        True,
        check={
            "error": "dns_round_trip: timed out",
            "evidence.silence.proven": True,
            "evidence.overtaken": True,
            "evidence.attempts.1.pass": 2,
        },
    ),
    Scenario(
        "truncated",
        Behaviour(action="truncate", records={"A": REAL_A}),
        Outcome.RESOLVED,
        False,
        check={"answers": list(REAL_A)},
    ),
    Scenario("malformed", Behaviour(action="malformed", records={"A": REAL_A}), Outcome.ERROR, None),
    Scenario(
        "mismatch",
        Behaviour(action="mismatch", records={"A": REAL_A}),
        Outcome.ERROR,
        None,
        per_transport={"udp": (Outcome.TIMEOUT, True)},
    ),
    # A reply that is not a response (docs/measurement.md): over UDP ignored and kept as
    # evidence while the wait goes on (the name then is a silence like "drop"), over a stream
    # a transport error, never a NODATA read off the echoed question.
    Scenario(
        "echo",
        Behaviour(action="echo", records={"A": REAL_A}),
        Outcome.ERROR,
        None,
        per_transport={"udp": (Outcome.TIMEOUT, True)},
        check={"error": "not the response: not a response (QR=0)"},
    ),
    # RFC 9250: the message ID is 0 on DoQ; DoH queries carry 0 too (RFC 8484). A pipelined TCP
    # or DoT connection cannot tell whose reply a stray ID is, so only these three transports.
    Scenario(
        "wrong-id",
        Behaviour(action="wrong_id", records={"A": REAL_A}),
        Outcome.ERROR,
        None,
        check={"error": "not the response: wrong message ID"},
        transports=("doh", "doh3", "doq"),
    ),
    Scenario(
        "injected",
        Behaviour(action="inject", records={"A": REAL_A}),
        Outcome.RESOLVED,
        False,
        per_transport={"udp": (Outcome.SINKHOLE, True)},
    ),
    Scenario("a-blocked", Behaviour(records={"A": ("0.0.0.0",)}), Outcome.SINKHOLE, True, only_qtype=True),
    Scenario(
        "aaaa-passes",
        Behaviour(records={"AAAA": ("2606:2800:220:1::248",)}),
        Outcome.RESOLVED,
        False,
        qtype="AAAA",
        name=f"a-blocked.{D}",
    ),
    Scenario(
        "https-hints-pass",
        Behaviour(records={"HTTPS": ('1 . alpn="h2" ipv4hint=93.184.216.34',)}),
        Outcome.RESOLVED,
        False,
        qtype="HTTPS",
        name=f"a-blocked.{D}",
        check={"answers": ['1 . alpn="h2" ipv4hint="93.184.216.34"']},
    ),
    Scenario(
        "https-hints-zero",
        Behaviour(records={"HTTPS": ("1 . ipv4hint=0.0.0.0 ipv6hint=::",)}),
        Outcome.SINKHOLE,
        True,
        qtype="HTTPS",
    ),
    Scenario("https-nodata", Behaviour(), Outcome.NODATA, True, qtype="HTTPS"),
]


def _lab_zone() -> Zone:
    zone = Zone(nsid="scripted-1")
    for s in SCENARIOS:
        if s.only_qtype or s.name.startswith("a-blocked."):
            zone.set(s.domain, s.behaviour, s.qtype)
        else:
            zone.set(s.domain, s.behaviour)
    return zone


@pytest.fixture(scope="module")
def results(lab_thread: LabThread, lab_ca: LabCA) -> dict[tuple[str, str, str], Measurement]:
    lab = start_lab(lab_thread, _lab_zone(), "127.53.1.1", lab_ca)
    control = start_lab(lab_thread, truth_zone(), "127.53.1.9", lab_ca)
    targets = [
        Resolver(f"lab-{r.endpoints[0].transport}", "isp", None, r.endpoints)
        for r in resolvers_of(lab, TRANSPORTS)
    ]
    controls = resolvers_of(control, ["udp"])
    domains = list(dict.fromkeys(s.domain for s in SCENARIOS))
    qtypes = sorted({s.qtype for s in SCENARIOS})
    # The injected answer's real one follows 20 ms behind; on a loaded machine the default 100 ms
    # window to catch it can pass first (the run's length is set by its timeouts, not this).
    out = measure(domains, targets, ca=lab_ca, qtypes=qtypes, controls=controls, timeout=2.0, linger=0.4)
    assert len(out) == len(domains) * len(qtypes) * len(TRANSPORTS)
    return {(m.domain, m.qtype, str(m.transport)): m for m in out}


def _dig(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


@pytest.mark.parametrize(
    ("scenario", "transport"),
    [pytest.param(s, t, id=f"{t}-{s.id}") for s in SCENARIOS for t in s.transports],
)
def test_scenario(
    scenario: Scenario, transport: str, results: dict[tuple[str, str, str], Measurement]
) -> None:
    m = results[(scenario.domain, scenario.qtype, transport)]
    outcome, blocked = scenario.per_transport.get(transport, (scenario.outcome, scenario.blocked))
    got = m.to_json()
    assert (m.outcome, m.blocked) == (outcome, blocked), got
    for path, want in scenario.check.items():
        if path == "error" and m.outcome is not scenario.outcome:
            continue  # the check describes the scenario's own outcome, not a per-transport one
        assert _dig(got, path) == want, (path, got)
    # The control's own answer is kept in every measurement.
    assert got["control"]["resolver"].startswith("udp://127.53.1.9")
    if m.outcome not in (Outcome.TIMEOUT, Outcome.ERROR):
        assert m.wire is not None
        assert m.rcode is not None
        assert m.latency_ms is not None
    if scenario.id == "malformed":
        assert m.wire is not None
        assert m.error is not None
        assert m.error.startswith("malformed response")


def test_truncation_is_retried_over_tcp_and_says_so(results: dict[tuple[str, str, str], Measurement]) -> None:
    m = results[(f"truncated.{D}", "A", "udp")]
    assert m.evidence["tc_fallback"] is True
    assert not results[(f"truncated.{D}", "A", "tcp")].evidence.get("tc_fallback")


def test_racing_answers_are_kept_as_evidence(results: dict[tuple[str, str, str], Measurement]) -> None:
    m = results[(f"injected.{D}", "A", "udp")]
    assert m.answers == ("203.98.7.65",)  # the forged answer arrived first, as on the GFW
    assert m.evidence["injected"] is True
    assert [la["answers"] for la in m.evidence["late_answers"]] == [list(REAL_A)]
    assert "late_answers" not in results[(f"resolves.{D}", "A", "udp")].evidence


def test_mismatched_udp_answer_is_ignored_and_noted(results: dict[tuple[str, str, str], Measurement]) -> None:
    m = results[(f"mismatch.{D}", "A", "udp")]
    assert [i["reason"] for i in m.evidence["ignored"]][:1] == ["question does not match"]
    assert m.evidence["ignored"][0]["wire"]  # the datagram itself is kept as evidence
    assert results[(f"mismatch.{D}", "A", "tcp")].error == "not the response: question does not match"


def test_an_echoed_query_is_not_read_as_an_answer(results: dict[tuple[str, str, str], Measurement]) -> None:
    """QR=0 with the question and no records would read as NODATA, a block when the control
    has records; the probe must not take it as a response at all."""
    m = results[(f"echo.{D}", "A", "udp")]
    assert [i["reason"] for i in m.evidence["ignored"]][:1] == ["not a response (QR=0)"]
    for t in ("tcp", "dot", "doh", "doh3", "doq"):
        m = results[(f"echo.{D}", "A", t)]
        assert (m.rcode, m.answers, m.wire) == (None, (), None), (t, m.to_json())


def test_nsid_is_recorded(results: dict[tuple[str, str, str], Measurement]) -> None:
    for t in TRANSPORTS:
        assert results[(f"resolves.{D}", "A", t)].evidence["nsid"] == "scripted-1"


def test_doh_evidence_has_http_version_and_status(results: dict[tuple[str, str, str], Measurement]) -> None:
    m = results[(f"resolves.{D}", "A", "doh")]
    assert (m.evidence["http_version"], m.evidence["http_status"]) == ("HTTP/2", 200)


def test_doh3_evidence_has_http_version_and_status(results: dict[tuple[str, str, str], Measurement]) -> None:
    m = results[(f"resolves.{D}", "A", "doh3")]
    assert (m.evidence["http_version"], m.evidence["http_status"]) == ("HTTP/3", 200)


@pytest.fixture(scope="module")
def lossy_results(lab_thread: LabThread, lab_ca: LabCA) -> dict[tuple[str, str, str], Measurement]:
    """The same table over UDP and TCP behind 5 % datagram loss each way and 50-150 ms of jitter."""

    lab = start_lab(lab_thread, _lab_zone(), "127.53.1.2", lab_ca, transports=("udp", "tcp"))
    control = start_lab(lab_thread, truth_zone(), "127.53.1.9", lab_ca, transports=("udp",))
    impairment = Impairment.both_ways(PathImpairment(loss=0.05, delay=0.05, jitter=0.1), seed=14)
    proxy = lab_thread.start(ImpairProxy.of(lab, impairment, "127.54.9.1"))
    try:
        specs = proxy.specs()
        targets = [
            Resolver(f"lab-{t}", "isp", None, resolve_spec(specs[t]).endpoints) for t in ("udp", "tcp")
        ]
        domains = list(dict.fromkeys(s.domain for s in SCENARIOS))
        qtypes = sorted({s.qtype for s in SCENARIOS})
        out = measure(
            domains, targets, ca=lab_ca, qtypes=qtypes, controls=resolvers_of(control, ["udp"]), timeout=2.0
        )
    finally:
        lab_thread.stop_server(proxy)
    assert proxy.counters.lost_c2s + proxy.counters.lost_s2c > 0  # the network really was lossy
    return {(m.domain, m.qtype, str(m.transport)): m for m in out}


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_the_table_holds_on_a_lossy_network(
    transport: str, lossy_results: dict[tuple[str, str, str], Measurement]
) -> None:
    """Loss and jitter may make a judgement inconclusive, never turn it around."""
    wrong, same = [], 0
    # An injected answer is told from the real one only by arriving first, 20 ms ahead: jitter
    # of 100 ms may deliver the real one first, which is then what this path answered.
    table = [s for s in SCENARIOS if transport in s.transports and s.id != "injected"]
    for s in table:
        m = lossy_results[(s.domain, s.qtype, transport)]
        outcome, blocked = s.per_transport.get(transport, (s.outcome, s.blocked))
        if (m.outcome, m.blocked) == (outcome, blocked):
            same += 1
        elif m.blocked is not None and m.blocked != blocked:
            wrong.append((s.id, m.outcome, m.blocked, m.evidence.get("silence")))
    assert not wrong, wrong
    assert same >= len(table) - 2, f"only {same} of {len(table)} scenarios judged as on a clean network"


# A few scenarios of every kind of judgement (a record, a negative answer, a sinkhole, an EDE,
# a silence, upstream trouble, a non-response) are enough to show an impairment never turns one around.
IMPAIRED = ("resolves", "nxdomain", "zero", "refused-ede16", "drop", "servfail", "echo")
# Each case a proxy of its own in front of one transport. The stream generators are seeded so that
# the first connection (the first pass) is the one stalled or reset: a stalled TLS handshake past
# the timeout is no silence; a reset mid-answer is retried on a connection of its own.
_STALL = Impairment(stream=StreamImpairment(stall_one_in=2, stall_for=3.0), seed=2)
_RESET = Impairment(stream=StreamImpairment(reset_one_in=2, reset_after=2000), seed=1)  # past the handshake
IMPAIRED_CASES = {
    "stall-dot": ("dot", _STALL, "127.54.9.2"),
    "stall-doh": ("doh", _STALL, "127.54.9.3"),
    "reset-dot": ("dot", _RESET, "127.54.9.4"),
    "reset-doh": ("doh", _RESET, "127.54.9.5"),
    # QUIC datagrams lost both ways: DoQ's own retransmission must carry it, or it is inconclusive.
    "loss-doq": ("doq", Impairment.both_ways(PathImpairment(loss=0.1), seed=14), "127.54.9.6"),
}
ImpairedResults = dict[str, tuple[dict[str, Measurement], ImpairProxy]]


@pytest.fixture(scope="module")
def impaired_results(lab_thread: LabThread, tmp_path_factory: pytest.TempPathFactory) -> ImpairedResults:
    """A few scenarios over DoT and DoH behind stalling and resetting streams, and DoQ behind loss."""
    # The proxies relay TLS and QUIC untouched: the certificate must name their addresses too.
    hosts = ("127.53.1.3", *(host for _, _, host in IMPAIRED_CASES.values()))
    lab_ca = LabCA(hosts=hosts, directory=tmp_path_factory.mktemp("impaired-ca"))
    table = [s for s in SCENARIOS if s.id in IMPAIRED]
    zone = Zone(nsid="scripted-1")
    for s in table:
        zone.set(s.domain, s.behaviour)
    lab = start_lab(lab_thread, zone, "127.53.1.3", lab_ca, transports=("dot", "doh", "doq"))
    control = start_lab(lab_thread, truth_zone(), "127.53.1.9", lab_ca, transports=())
    proxies = {
        case: lab_thread.start(ImpairProxy.of(lab, imp, host))
        for case, (_, imp, host) in IMPAIRED_CASES.items()
    }
    try:
        targets = [
            Resolver(case, "isp", None, resolve_spec(proxies[case].specs()[t]).endpoints)
            for case, (t, _, _) in IMPAIRED_CASES.items()
        ]
        out = measure(
            [s.domain for s in table],
            targets,
            ca=lab_ca,
            controls=resolvers_of(control, ["udp"]),
            timeout=1.5,
        )
    finally:
        for proxy in proxies.values():
            lab_thread.stop_server(proxy)
    by_case: dict[str, dict[str, Measurement]] = {case: {} for case in IMPAIRED_CASES}
    for m in out:
        by_case[m.resolver][m.domain] = m
    return {case: (by_case[case], proxies[case]) for case in IMPAIRED_CASES}


@pytest.mark.parametrize("case", IMPAIRED_CASES)
def test_the_table_holds_on_impaired_streams_and_quic(case: str, impaired_results: ImpairedResults) -> None:
    """Stalls, resets and lost QUIC datagrams may make a judgement inconclusive, never turn it around."""
    results, proxy = impaired_results[case]
    transport = IMPAIRED_CASES[case][0]
    c = proxy.counters
    done = {"stall": c.stalled, "reset": c.resets, "loss": c.lost_c2s + c.lost_s2c}[case.split("-")[0]]
    assert done > 0, c.to_json()  # the network really was impaired
    wrong, same = [], 0
    table = [s for s in SCENARIOS if s.id in IMPAIRED]
    for s in table:
        m = results[s.domain]
        assert str(m.transport) == transport
        outcome, blocked = s.per_transport.get(transport, (s.outcome, s.blocked))
        if (m.outcome, m.blocked) == (outcome, blocked):
            same += 1
        elif m.blocked is not None and m.blocked != blocked:
            wrong.append((s.id, m.outcome, m.blocked, m.error, m.evidence.get("silence")))
    assert not wrong, wrong
    assert same >= len(table) - 2, f"only {same} of {len(table)} scenarios judged as on a clean network"
