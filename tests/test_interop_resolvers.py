"""PowerDNS Recursor, Knot Resolver, dnsmasq and dnsdist, as installed from Debian 12: the
probe must read each one's blocks and failures by docs/measurement.md.

Every resolver forwards to an in-process lab that holds the truth for interop-lab.net,
except `down.interop-lab.net`, which goes to a loopback port where nothing listens (an
upstream outage). The lab also scripts `bservfail` (the upstream answers SERVFAIL) and
`bdrop` (the upstream never answers). The control is a second lab that knows every name, so
a negative answer is evidence of a block unless the response explains itself otherwise.
What each server sends for each policy is written down in docs/reference/resolvers.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from probe.catalogue import resolve_spec
from probe.lab import Behaviour, LabCA, LabThread, Zone
from probe.model import Expectation, Finding, Measurement, Outcome
from probe.specs import Resolver
from probe.transports import Options

from .conftest import measure, start_lab
from .real import (
    RealResolver,
    free_port,
    have,
    start_dnsdist,
    start_dnsmasq,
    start_kresd,
    start_pdns_recursor,
)

pytestmark = pytest.mark.interop

ZONE = "interop-lab.net"
HOSTS = {
    "pdns": "127.53.4.1",
    "kresd": "127.53.4.2",
    "dnsmasq": "127.53.4.3",
    "dnsdist": "127.53.4.4",
    "kresd-acl": "127.53.4.5",
    "dead": "127.53.4.8",
    "upstream": "127.53.4.9",
    "control": "127.53.4.10",
}
REAL = Behaviour(records={"A": ("93.184.216.34",), "AAAA": ("2606:2800:220:1::248",)})

Key = tuple[str, str, str]  # label, qtype, listener
Results = dict[Key, Measurement]
Want = tuple[Outcome, bool | None]

N, T = None, True
RESOLVED = (Outcome.RESOLVED, False)
DEAD = (Outcome.NXDOMAIN, N)  # NXDOMAIN at the control too: no evidence of a block
EDE = (Outcome.EDE_BLOCKED, T)
# The upstream failed (SERVFAIL, no EDE): resolvers say so for outages, so no block either way.
UPSTREAM_FAILED = (Outcome.SERVFAIL, N)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    return LabCA(hosts=("127.0.0.1", *HOSTS.values()), directory=tmp_path_factory.mktemp("resolvers-ca"))


class Net:
    """The upstream the resolvers forward to, the control, and a dead port for outages."""

    def __init__(self, thread: LabThread, ca: LabCA) -> None:
        up = Zone()
        up.set(f"*.{ZONE}", REAL)
        up.set(f"dead.{ZONE}", Behaviour(rcode="NXDOMAIN"))
        up.set(f"bservfail.{ZONE}", Behaviour(rcode="SERVFAIL"))
        up.set(f"bdrop.{ZONE}", Behaviour(action="drop"))
        truth = Zone()
        truth.set(f"*.{ZONE}", REAL)
        truth.set(f"dead.{ZONE}", Behaviour(rcode="NXDOMAIN"))
        self.upstream = start_lab(thread, up, HOSTS["upstream"], ca, transports=("udp", "tcp"))
        self.control = start_lab(thread, truth, HOSTS["control"], ca, transports=("udp", "tcp"))
        self.up = f"{HOSTS['upstream']}:{self.upstream.ports['udp']}"
        self.dead = f"{HOSTS['dead']}:{free_port(HOSTS['dead'])}"
        self.forwards = {".": self.up, f"down.{ZONE}": self.dead}

    def control_resolver(self) -> Resolver:
        return resolve_spec(self.control.specs()["tcp"])


@pytest.fixture(scope="module")
def net(lab_thread: LabThread, ca: LabCA) -> Net:
    return Net(lab_thread, ca)


def _expect(domain: str, _resolver: Resolver) -> tuple[Expectation | None, dict[str, Any] | None]:
    """`ok` must resolve, `dead` has no expectation, every other name is ordered blocked."""
    label = domain.removesuffix(f".{ZONE}")
    if label == "dead":
        return None, None
    return (Expectation.RESOLVES if label == "ok" else Expectation.BLOCKED), {"order": "interop"}


def _run(server: RealResolver, net: Net, ca: LabCA, labels: list[str], *, timeout: float = 1.5) -> Results:
    """One engine run over every name and listener of `server`, as a probe would make it."""
    targets = [
        Resolver(f"{server.name}/{listener}", "isp", None, resolve_spec(spec).endpoints)
        for listener, spec in server.specs.items()
    ]
    domains = [label if "." in label else f"{label}.{ZONE}" for label in labels]
    out = measure(
        domains,
        targets,
        ca=ca,
        qtypes=("A", "AAAA"),
        controls=[net.control_resolver()],
        timeout=timeout,
        expect=_expect,
    )
    return {(m.domain.removesuffix(f".{ZONE}"), m.qtype, m.resolver.split("/", 1)[1]): m for m in out}


@contextmanager
def _running(start: Callable[[], RealResolver]) -> Iterator[RealResolver]:
    """A started server, ready (answering, within a deadline), stopped by pid afterwards."""
    server = start()
    try:
        server.wait_ready(f"ok.{ZONE}", deadline_s=30)
        yield server
    finally:
        server.stop()


def _show(m: Measurement) -> str:
    """The parts of a measurement that explain its verdict, for assertion messages."""
    ede = [(e.code, e.text) for e in m.ede]
    return (
        f"{m.resolver} {m.domain} {m.qtype}: outcome={m.outcome} blocked={m.blocked} rcode={m.rcode} "
        f"ede={ede} answers={list(m.answers)} error={m.error} evidence={m.evidence} control={m.control}"
    )


def _check(results: Results, key: Key, want: Want) -> Measurement:
    m = results[key]
    assert (m.outcome, m.blocked) == want, _show(m)
    # The finding follows: a name ordered blocked that answers is a leak, one that cannot be
    # told is inconclusive; `ok` is ok while it resolves; `dead` has no expectation.
    label = key[0]
    if label == "dead":
        finding = None
    elif label == "ok":
        finding = {True: Finding.OVERBLOCK, False: Finding.OK, None: Finding.INCONCLUSIVE}[m.blocked]
    else:
        finding = {True: Finding.ENFORCED, False: Finding.LEAK, None: Finding.INCONCLUSIVE}[m.blocked]
    assert m.finding is finding, _show(m)
    return m


# --- PowerDNS Recursor 4.8: two RPZs, one plain and one whose hits carry EDE 15 -------------

PDNS_RPZ = f"nx.{ZONE} CNAME .\nnodata.{ZONE} CNAME *.\ndrop.{ZONE} CNAME rpz-drop.\nnull.{ZONE} A 0.0.0.0\n"
PDNS_RPZ_EDE = f"ede-nx.{ZONE} CNAME .\nede-nodata.{ZONE} CNAME *.\nede-null.{ZONE} A 0.0.0.0\n"
PDNS: dict[tuple[str, str], Want] = {
    ("ok", "A"): RESOLVED,
    ("ok", "AAAA"): RESOLVED,
    ("dead", "A"): DEAD,
    ("nx", "A"): (Outcome.NXDOMAIN, T),  # no SOA, no EDE: the control resolves it
    ("nx", "AAAA"): (Outcome.NXDOMAIN, T),
    ("nodata", "A"): (Outcome.NODATA, T),
    ("null", "A"): (Outcome.SINKHOLE, T),
    ("null", "AAAA"): (Outcome.NODATA, T),  # RPZ local data replaces every type
    ("drop", "A"): (Outcome.TIMEOUT, T),  # silent in both passes while later queries are answered
    ("ede-nx", "A"): EDE,
    ("ede-nodata", "A"): EDE,
    ("ede-null", "A"): EDE,  # the policy EDE decides before the sinkhole address
    ("ede-null", "AAAA"): EDE,
    ("bservfail", "A"): UPSTREAM_FAILED,
    ("down", "A"): UPSTREAM_FAILED,  # nothing listens upstream: SERVFAIL at once, no EDE
    ("down", "AAAA"): UPSTREAM_FAILED,
}


@pytest.fixture(scope="module")
def pdns(tmp_path_factory: pytest.TempPathFactory, net: Net, ca: LabCA) -> Iterator[Results]:
    if not have("pdns_recursor"):
        pytest.skip("pdns_recursor is not installed (make test installs pdns-recursor)")
    tmp = tmp_path_factory.mktemp("pdns")
    with _running(
        lambda: start_pdns_recursor(
            tmp, HOSTS["pdns"], forwards=net.forwards, rpz_text=PDNS_RPZ, rpz_ede_text=PDNS_RPZ_EDE
        )
    ) as server:
        yield _run(server, net, ca, sorted({n for n, _ in PDNS}))


@pytest.mark.parametrize(
    ("label", "qtype", "listener"), [(n, q, t) for (n, q) in PDNS for t in ("udp", "tcp")]
)
def test_pdns_recursor(label: str, qtype: str, listener: str, pdns: Results) -> None:
    m = _check(pdns, (label, qtype, listener), PDNS[(label, qtype)])
    if label == "ede-nx":
        assert [(e.code, e.text) for e in m.ede] == [(15, "blocked by court order")]


# --- Knot Resolver 5.6: the policy module --------------------------------------------------

KRESD_POLICIES = f"""
policy.add(policy.suffix(policy.DENY, {{todname('deny.{ZONE}')}}))
policy.add(policy.suffix(policy.DENY_MSG('blocked by court order'), {{todname('denymsg.{ZONE}')}}))
policy.add(policy.suffix(policy.REFUSE, {{todname('refuse.{ZONE}')}}))
policy.add(policy.suffix(policy.DROP, {{todname('drop.{ZONE}')}}))
policy.add(policy.suffix(policy.ANSWER({{[kres.type.A] = {{rdata = kres.str2ip('0.0.0.0'), ttl = 300}}}}),
  {{todname('answer.{ZONE}')}}))
policy.add(policy.suffix(policy.ANSWER({{[kres.type.A] = {{rdata = kres.str2ip('0.0.0.0'), ttl = 300}}}}, true),
  {{todname('answernd.{ZONE}')}}))
"""
KRESD: dict[tuple[str, str], Want] = {
    ("ok", "A"): RESOLVED,
    ("ok", "AAAA"): RESOLVED,
    ("dead", "A"): DEAD,
    ("deny", "A"): EDE,  # NXDOMAIN + EDE 15 "CR36"
    ("denymsg", "A"): EDE,  # the same, with the message as TXT in the additional section
    # REFUSED / SERVFAIL + EDE 18 while every other answer of the run has no EDE 18:
    # a name-specific refusal.
    ("refuse", "A"): EDE,
    ("refuse", "AAAA"): EDE,
    ("drop", "A"): EDE,  # kresd's DROP is not silent: SERVFAIL + EDE 18
    ("answer", "A"): EDE,  # 0.0.0.0 + EDE 4 Forged Answer
    ("answer", "AAAA"): RESOLVED,  # ANSWER for A alone lets AAAA through: the leak shape
    ("answernd", "AAAA"): EDE,  # ANSWER(..., true): NODATA + EDE 4 for the other types
    ("bservfail", "A"): UPSTREAM_FAILED,
}
KRESD_LISTENERS = ("udp", "tcp", "dot", "doh")


@pytest.fixture(scope="module")
def kresd_server(tmp_path_factory: pytest.TempPathFactory, net: Net, ca: LabCA) -> Iterator[RealResolver]:
    if not have("kresd"):
        pytest.skip("kresd is not installed (make test installs knot-resolver)")
    tmp = tmp_path_factory.mktemp("kresd")
    with _running(
        lambda: start_kresd(
            tmp, HOSTS["kresd"], ca.cert_file, ca.key_file, forwards=net.forwards, policies=KRESD_POLICIES
        )
    ) as server:
        yield server


@pytest.fixture(scope="module")
def kresd(kresd_server: RealResolver, net: Net, ca: LabCA) -> Results:
    return _run(kresd_server, net, ca, sorted({n for n, _ in KRESD}))


@pytest.mark.parametrize(
    ("label", "qtype", "listener"), [(n, q, t) for (n, q) in KRESD for t in KRESD_LISTENERS]
)
def test_kresd(label: str, qtype: str, listener: str, kresd: Results) -> None:
    m = _check(kresd, (label, qtype, listener), KRESD[(label, qtype)])
    if label in ("refuse", "drop"):
        assert [e.code for e in m.ede] == [18]
        assert m.rcode == ("REFUSED" if label == "refuse" else "SERVFAIL")


@pytest.fixture(scope="module")
def kresd_outage(kresd_server: RealResolver, net: Net, ca: LabCA) -> dict[str, Measurement]:
    """One run over every listener with the probe's default confirmation delay (Options)."""
    targets = [
        Resolver(f"kresd/{listener}", "isp", None, resolve_spec(spec).endpoints)
        for listener, spec in kresd_server.specs.items()
    ]
    out = measure(
        [f"x.down.{ZONE}", f"ok.{ZONE}", f"dead.{ZONE}"],
        targets,
        ca=ca,
        qtypes=("A",),
        controls=[net.control_resolver()],
        timeout=1.5,
        confirm_after=Options().confirm_after,
    )
    return {m.resolver.split("/", 1)[1]: m for m in out if m.domain.startswith("x.")}


@pytest.mark.parametrize("listener", KRESD_LISTENERS)
def test_kresd_upstream_outage_is_not_a_block(listener: str, kresd_outage: dict[str, Measurement]) -> None:
    """With its upstream unreachable, kresd keeps the first query ~8 s before its SERVFAIL and
    answers other names meanwhile: a silence that is overtaken, yet no block. The probe asks a
    silent query again only after `confirm_after` (10 s), by when kresd has given up and says
    SERVFAIL, which is no evidence of a block."""
    down = kresd_outage[listener]
    assert down.outcome in (Outcome.TIMEOUT, Outcome.SERVFAIL), _show(down)
    assert down.blocked is None, _show(down)


def test_kresd_refusing_every_query_is_no_block(
    tmp_path_factory: pytest.TempPathFactory,
    net: Net,
    ca: LabCA,
) -> None:
    """EDE 18 on every answer: this client may not use the resolver at all (an ACL), so the
    outcome follows the rcode and says nothing about the name."""
    if not have("kresd"):
        pytest.skip("kresd is not installed (make test installs knot-resolver)")
    acl = "modules.load('view')\nview:addr('127.0.0.0/8', policy.all(policy.REFUSE))\n"
    tmp = tmp_path_factory.mktemp("kresd-acl")
    with _running(
        lambda: start_kresd(
            tmp, HOSTS["kresd-acl"], ca.cert_file, ca.key_file, forwards=net.forwards, policies=acl
        )
    ) as server:
        results = _run(server, net, ca, ["ok", "deny-me", "dead"])
    for key, m in results.items():
        assert (m.outcome, m.blocked) == (Outcome.REFUSED, None), (key, _show(m))
        assert [e.code for e in m.ede] == [18], _show(m)


# --- dnsmasq 2.90: address=/name/... --------------------------------------------------------

DNSMASQ_ADDRESSES = {f"null.{ZONE}": "0.0.0.0", f"hash.{ZONE}": "#", f"nx.{ZONE}": ""}
DNSMASQ: dict[tuple[str, str], Want] = {
    ("ok", "A"): RESOLVED,
    ("ok", "AAAA"): RESOLVED,
    ("dead", "A"): DEAD,
    ("null", "A"): (Outcome.SINKHOLE, T),
    ("null", "AAAA"): RESOLVED,  # address=/name/0.0.0.0 answers A only: AAAA goes upstream (a leak)
    ("hash", "A"): (Outcome.SINKHOLE, T),  # address=/name/# answers 0.0.0.0 and ::
    ("hash", "AAAA"): (Outcome.SINKHOLE, T),
    ("nx", "A"): (Outcome.NXDOMAIN, T),  # address=/name/ : NXDOMAIN without SOA
    ("nx", "AAAA"): (Outcome.NXDOMAIN, T),
    ("bservfail", "A"): UPSTREAM_FAILED,
}


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory, net: Net, ca: LabCA) -> Iterator[Results]:
    if not have("dnsmasq"):
        pytest.skip("dnsmasq is not installed (make test installs dnsmasq-base)")
    tmp = tmp_path_factory.mktemp("dnsmasq")
    with _running(
        lambda: start_dnsmasq(tmp, HOSTS["dnsmasq"], forwards=net.forwards, addresses=DNSMASQ_ADDRESSES)
    ) as server:
        yield _run(server, net, ca, sorted({n for n, _ in DNSMASQ} | {"down"}))


@pytest.mark.parametrize(
    ("label", "qtype", "listener"), [(n, q, t) for (n, q) in DNSMASQ for t in ("udp", "tcp")]
)
def test_dnsmasq(label: str, qtype: str, listener: str, dnsmasq: Results) -> None:
    _check(dnsmasq, (label, qtype, listener), DNSMASQ[(label, qtype)])


@pytest.mark.parametrize(
    "listener",
    [
        pytest.param(
            "udp",
            marks=pytest.mark.xfail(
                strict=True,
                reason="a known limit, documented in docs/reference/resolvers.md: dnsmasq never answers "
                "over UDP for a zone whose only server is unreachable, while it answers every other "
                "name; no DNS evidence tells that from a DROP policy (the control resolves the name)",
            ),
        ),
        "tcp",
    ],
)
def test_dnsmasq_upstream_outage_is_not_a_block(listener: str, dnsmasq: Results) -> None:
    """dnsmasq never answers over UDP for a zone whose server is unreachable, while it answers
    every other name (over TCP it closes the connection). An outage must not read as a DROP."""
    m = dnsmasq[("down", "A", listener)]
    assert m.blocked is None, _show(m)


# --- dnsdist 1.7: DoT (in order and out of order) and DoH in front of the lab ---------------

DNSDIST_RULES = f"""
addAction(QNameRule('drop.{ZONE}.'), DropAction())
addAction(QNameRule('nx.{ZONE}.'), RCodeAction(DNSRCode.NXDOMAIN))
addAction(QNameRule('refused.{ZONE}.'), RCodeAction(DNSRCode.REFUSED))
addAction(QNameRule('null.{ZONE}.'), SpoofAction({{'0.0.0.0', '::'}}))
"""
DNSDIST_LISTENERS = ("udp", "tcp", "dot", "dot-ooo", "doh")
CLOSED = (Outcome.ERROR, N)  # DropAction on a stream closes the connection; on DoH it is HTTP 403
DNSDIST: dict[tuple[str, str], Want] = {
    ("ok", "A"): RESOLVED,
    ("ok", "AAAA"): RESOLVED,
    ("dead", "A"): DEAD,
    ("nx", "A"): (Outcome.NXDOMAIN, T),
    ("refused", "A"): (Outcome.REFUSED, T),  # no EDE, and the control resolves it
    ("null", "A"): (Outcome.SINKHOLE, T),
    ("null", "AAAA"): (Outcome.SINKHOLE, T),
    ("bservfail", "A"): UPSTREAM_FAILED,
}
# DropAction: silent over UDP, a closed connection over TCP and DoT, HTTP 403 over DoH.
DNSDIST_DROP: dict[str, Want] = {
    "udp": (Outcome.TIMEOUT, T),
    "tcp": CLOSED,
    "dot": CLOSED,
    "dot-ooo": CLOSED,
    "doh": CLOSED,
}


@pytest.fixture(scope="module")
def dnsdist_server(tmp_path_factory: pytest.TempPathFactory, net: Net, ca: LabCA) -> Iterator[RealResolver]:
    if not have("dnsdist"):
        pytest.skip("dnsdist is not installed (make test installs dnsdist)")
    tmp = tmp_path_factory.mktemp("dnsdist")
    with _running(
        lambda: start_dnsdist(
            tmp, HOSTS["dnsdist"], ca.cert_file, ca.key_file, backend=net.up, rules=DNSDIST_RULES
        )
    ) as server:
        yield server


@pytest.fixture(scope="module")
def dnsdist(dnsdist_server: RealResolver, net: Net, ca: LabCA) -> Results:
    return _run(dnsdist_server, net, ca, sorted({n for n, _ in DNSDIST} | {"drop"}))


@pytest.fixture(scope="module")
def dnsdist_bdrop(dnsdist_server: RealResolver, net: Net, ca: LabCA) -> Results:
    """A run of its own: a backend silence stalls an in-order connection for every name behind it.
    `bdrop` is asked last, so on an in-order connection other names were answered before it
    (not after it: nothing overtakes it)."""
    return _run(dnsdist_server, net, ca, ["dead", "nx", "null", "ok", "bdrop"])


@pytest.mark.parametrize(
    ("label", "qtype", "listener"), [(n, q, t) for (n, q) in DNSDIST for t in DNSDIST_LISTENERS]
)
def test_dnsdist(label: str, qtype: str, listener: str, dnsdist: Results) -> None:
    m = _check(dnsdist, (label, qtype, listener), DNSDIST[(label, qtype)])
    if listener == "doh":
        assert m.evidence["http_status"] == 200, _show(m)


@pytest.mark.parametrize("listener", DNSDIST_LISTENERS)
def test_dnsdist_drop_action(listener: str, dnsdist: Results) -> None:
    m = _check(dnsdist, ("drop", "A", listener), DNSDIST_DROP[listener])
    if listener == "doh":
        assert m.evidence["http_status"] == 403, _show(m)


@pytest.mark.parametrize("listener", ["udp", "dot-ooo", "doh"])
def test_dnsdist_backend_silence_overtaken(listener: str, dnsdist_bdrop: Results) -> None:
    """The backend never answers `bdrop` while dnsdist answers later queries on the same socket,
    connection or HTTP/2 stream set: the silence is overtaken in both passes, as an RPZ DROP
    (dnsdist's DoH turns it into HTTP 502 only after ~3 s, past the probe's timeout)."""
    _check(dnsdist_bdrop, ("bdrop", "A", listener), (Outcome.TIMEOUT, T))


@pytest.mark.parametrize("listener", ["tcp", "dot"])
def test_dnsdist_in_order_stream_never_blocks(listener: str, dnsdist_bdrop: Results) -> None:
    """Without maxInFlight dnsdist reads a connection's next query only after answering the
    previous one: behind the silent `bdrop` nothing overtakes it, so no silence on that
    connection may be called a block, and no name that resolves may be called blocked."""
    rows = {k: m for k, m in dnsdist_bdrop.items() if k[2] == listener}
    assert rows[("bdrop", "A", listener)].blocked is None, _show(rows[("bdrop", "A", listener)])
    for (label, qtype, _), m in rows.items():
        if m.outcome is Outcome.TIMEOUT:
            assert m.blocked is None, _show(m)
        if (label, qtype) in DNSDIST and DNSDIST[(label, qtype)][1] is not True:
            assert m.blocked is not True, _show(m)
