"""Answer checks in the judgement (docs/measurement.md, "Answer checks"), end to end: a lab
resolver and a control inside the sealed namespace of tests/netlab.py answer with the addresses
of its real TLS servers, and the engine checks them after the DNS round."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.message
import pytest
from click.testing import CliRunner

from probe.answers import AddressCheck, AnswerChecker, CheckMode, CheckStatus
from probe.catalogue import resolve_spec
from probe.cli import cli
from probe.engine import Engine, Plan
from probe.judge import asking_again_cannot_change, control_checks_matter
from probe.lab import Behaviour, LabCA, LabServer, LabThread, Zone
from probe.model import Expectation, Measurement, Outcome
from probe.transports import Failure, FailureKind, Options
from probe.transports import Phase as TransportPhase

from . import netlab
from .conftest import measure, start_lab
from .netlab import BLOCKPAGE_UNKNOWN, CDN, DROPS, REFUSES, SITE, NetLab
from .real import start_unbound


@pytest.fixture(scope="module")
def lab() -> Iterator[NetLab]:
    reason = netlab.unavailable()
    if reason:
        pytest.skip(reason)
    with NetLab() as lab:
        yield lab


ISP = {
    "unknown-page.leaky.example": BLOCKPAGE_UNKNOWN,  # a block page no fingerprint knows
    "leaky.example": SITE,  # the real site: a leak, proven by its certificate
    "blocked-at-cdn.example": CDN,  # resolves, but the CDN answers 451 in this country
    "down.leaky.example": REFUSES,  # an address that refuses: never a block
}
TRUTH = {
    "unknown-page.leaky.example": SITE,
    "leaky.example": SITE,
    "blocked-at-cdn.example": CDN,
    "down.leaky.example": SITE,
}


def _zone(answers: dict[str, str]) -> Zone:
    zone = Zone()
    for name, address in answers.items():
        zone.set(name, Behaviour(records={"A": (address,)}))
    return zone


def _measure(lab: NetLab, mode: str) -> dict[str, Measurement]:
    async def go() -> list[Measurement]:
        ca = LabCA()
        isp = await LabServer(_zone(ISP), "127.0.0.2", ca, transports=("udp",)).start()
        truth = await LabServer(_zone(TRUTH), "127.0.0.3", ca, transports=("udp",)).start()
        try:
            checker = AnswerChecker(mode, ca_file=lab.ca_file, timeout=3.0, rate=None)
            plan = Plan(
                list(ISP),
                ["A"],
                [resolve_spec(isp.specs()["udp"])],
                [resolve_spec(truth.specs()["udp"])],
                expect=lambda _d, _r: (Expectation.BLOCKED, {"order": "test"}),
                check_identity=False,
            )
            options = Options(timeout=2.0, udp_linger=0, confirm_after=0)
            async with Engine(options, qps=None, checker=checker) as engine:
                return await engine.collect(plan)
        finally:
            await isp.stop()
            await truth.stop()

    return {m.domain: m for m in lab.run(go)}


def test_an_unknown_block_page_is_a_block_by_its_certificate(lab: NetLab) -> None:
    m = _measure(lab, "tls")["unknown-page.leaky.example"]
    assert (m.outcome, m.blocked, m.finding, m.reach) == (Outcome.SINKHOLE, True, "enforced", "blockpage")
    assert m.sinkhole is not None
    assert m.sinkhole["source"] == "tls"
    assert m.evidence["manipulation"] == "manipulated"
    assert m.evidence["control_checks"][0]["cert_valid"] is True


def test_a_leak_whose_certificate_validates_is_proven(lab: NetLab) -> None:
    m = _measure(lab, "tls")["leaky.example"]
    assert (m.outcome, m.blocked, m.finding, m.reach) == (Outcome.RESOLVED, False, "leak", "reachable")
    assert m.evidence["verified"] is True


def test_a_dns_leak_behind_a_451_says_so_in_reach(lab: NetLab) -> None:
    m = _measure(lab, "http")["blocked-at-cdn.example"]
    assert (m.finding, m.reach) == ("leak", "http_451")


def test_an_address_that_refuses_changes_no_dns_finding(lab: NetLab) -> None:
    m = _measure(lab, "tls")["down.leaky.example"]
    assert (m.outcome, m.blocked, m.finding, m.reach) == (Outcome.RESOLVED, False, "leak", "unreachable")
    assert m.evidence["manipulation"] == "stands"


def test_a_sinkhole_a_fingerprint_names_is_reach_blockpage(lab_thread: LabThread, lab_ca: LabCA) -> None:
    """ "blockpage (manipulated as above, or a known block page)": a DNS answer that a fingerprint
    names leads a user to that page, known without connecting; a null route, loopback or private
    address leads to no page, and the probe does not connect there to find out what it is."""
    zone = Zone()
    d = "fingerprinted.net"
    zone.set(f"opendns.{d}", Behaviour(records={"A": ("146.112.61.104",)}))  # opendns.blockpage_104
    zone.set(f"mapped.{d}", Behaviour(records={"AAAA": ("::ffff:146.112.61.105",)}))
    zone.set(f"mixed.{d}", Behaviour(records={"A": ("0.0.0.0", "146.112.61.107")}))
    # The CNAME target is the fingerprint (ooni.id_44); its address alone would be a private sinkhole.
    zone.set(f"cname.{d}", Behaviour(cname=("internet-positif.org",), records={"A": ("10.10.10.10",)}))
    # 0.0.0.0, 127.0.0.1 and 1.2.3.4 are in OONI's list (scope vbw): they name a filter, not a page.
    zone.set(f"null.{d}", Behaviour(records={"A": ("0.0.0.0",), "AAAA": ("::",)}))
    zone.set(f"bogus.{d}", Behaviour(records={"A": ("1.2.3.4",)}))
    zone.set(f"loopback.{d}", Behaviour(records={"A": ("127.0.0.1",)}))
    zone.set(f"private.{d}", Behaviour(records={"A": ("10.1.2.3",)}))
    server = start_lab(lab_thread, zone, "127.53.1.6", lab_ca, transports=("udp",))
    names = ["opendns", "mapped", "mixed", "cname", "null", "bogus", "loopback", "private"]
    got = measure(
        [f"{n}.{d}" for n in names],
        [resolve_spec(server.specs()["udp"])],
        ca=lab_ca,
        qtypes=("A", "AAAA"),
        expect=lambda _d, _r: (Expectation.BLOCKED, {"order": "test"}),
        linger=0,
    )
    reach = {
        (m.domain.split(".")[0], m.qtype): (
            m.outcome,
            m.reach,
            (m.evidence.get("blockpage") or {}).get("match"),
        )
        for m in got
        if m.outcome is Outcome.SINKHOLE
    }
    assert reach == {
        ("opendns", "A"): (Outcome.SINKHOLE, "blockpage", "146.112.61.104"),
        ("mapped", "AAAA"): (Outcome.SINKHOLE, "blockpage", "146.112.61.105"),
        ("mixed", "A"): (Outcome.SINKHOLE, "blockpage", "146.112.61.107"),
        ("cname", "A"): (Outcome.SINKHOLE, "blockpage", "internet-positif.org"),
        ("cname", "AAAA"): (Outcome.SINKHOLE, "blockpage", "internet-positif.org"),  # NODATA by the chain
        ("null", "A"): (Outcome.SINKHOLE, "unchecked", None),
        ("null", "AAAA"): (Outcome.SINKHOLE, "unchecked", None),
        ("bogus", "A"): (Outcome.SINKHOLE, "unchecked", None),
        ("loopback", "A"): (Outcome.SINKHOLE, "unchecked", None),
        ("private", "A"): (Outcome.SINKHOLE, "unchecked", None),
    }


def _cut_by_deadline(
    lab: NetLab, deadline: float, names: dict[str, str], cut: float | None = None
) -> tuple[list[Measurement], float]:
    """A run consumed as the daemon consumes a round: cut by asyncio.timeout at its deadline
    (or at `cut`, when the consumer should outlast the engine's deadline)."""

    async def go() -> tuple[list[Measurement], float]:
        isp = await LabServer(_zone(names), "127.0.0.2", LabCA(), transports=("udp",)).start()
        got: list[Measurement] = []
        try:
            # Checks longer than the whole round, all at once: only the deadline can end them.
            checker = AnswerChecker("tls", ca_file=lab.ca_file, timeout=30.0, rate=None, concurrency=16)
            plan = Plan(
                list(names),
                ["A"],
                [resolve_spec(isp.specs()["udp"])],
                expect=lambda _d, _r: (Expectation.BLOCKED, {"order": "test"}),
                check_identity=False,
            )
            options = Options(timeout=2.0, udp_linger=0, confirm_after=0)
            t0 = time.monotonic()
            async with (
                asyncio.timeout(cut or deadline),
                Engine(options, qps=None, checker=checker, deadline=deadline) as engine,
            ):
                async for m in engine.run(plan):
                    got.append(m)
            return got, time.monotonic() - t0
        finally:
            await isp.stop()

    return lab.run(go)


def test_checks_cut_by_the_run_deadline_lose_no_dns_measurement(lab: NetLab) -> None:
    """Issue 16: checks run after the DNS round and never delay it; a round cut at its deadline
    while checks hang on a dropping address must still emit every DNS measurement."""
    names = {"leaky.example": SITE, **{f"d{i}.drops.example": DROPS for i in range(5)}}
    got, took = _cut_by_deadline(lab, 5.0, names)
    by = {m.domain: m for m in got}
    assert sorted(by) == sorted(names)  # every DNS measurement, none lost to the cut
    assert took < 5.0
    site = by["leaky.example"]  # checked before the cut: its checks stand
    assert (site.finding, site.reach, site.evidence["verified"]) == ("leak", "reachable", True)
    for name in names:
        if name.endswith("drops.example"):
            m = by[name]
            assert (m.outcome, m.finding, m.reach) == (Outcome.RESOLVED, "leak", "unchecked")
            assert "answer_checks" not in m.evidence
            assert "deadline" in m.evidence["answer_checks_skipped"]


def test_no_check_starts_once_the_time_for_checks_is_over(lab: NetLab) -> None:
    names = {"leaky.example": SITE, "www.leaky.example": SITE}
    served = lab.served(SITE)
    got, _ = _cut_by_deadline(lab, 0.001, names, cut=20.0)  # over before the first answer comes back
    assert sorted(m.domain for m in got) == sorted(names)
    assert {m.reach for m in got} == {"unchecked"}
    assert all("answer_checks_skipped" in m.evidence for m in got)
    assert lab.served(SITE) == served  # not one connection


@pytest.mark.parametrize("mode", ["tls", "http"])
def test_once_refuses_to_verify_names_no_lists_file_names(mode: str) -> None:
    """Issue 16: "only names that a lists file names are checked"; `--expect` names none."""
    result = CliRunner().invoke(
        cli,
        [
            "once",
            "a.example",
            "--expect",
            "blocked",
            "--verify",
            mode,
            "-r",
            "udp://127.0.0.1:9",
            "--no-control",
        ],
    )
    assert result.exit_code == 2
    assert result.stderr == f"probe: --verify {mode} checks only names a lists file names: give --list FILE\n"
    assert result.stdout == ""


def _check(status: CheckStatus, cert_valid: bool | None) -> AddressCheck:
    return AddressCheck("a.example", "198.51.100.1", CheckMode.TLS, status, cert_valid=cert_valid)


@pytest.mark.parametrize(
    ("checks", "matter"),
    [
        ((), False),  # nothing checked: nothing to compare with
        ((_check(CheckStatus.INVALID_CERT, False),), True),
        ((_check(CheckStatus.INVALID_CERT, False), _check(CheckStatus.BLOCKPAGE, False)), True),
        ((_check(CheckStatus.INVALID_CERT, False), _check(CheckStatus.VALID, True)), False),
        ((_check(CheckStatus.INVALID_CERT, False), _check(CheckStatus.TIMEOUT, None)), False),
    ],
)
def test_the_controls_addresses_are_checked_only_when_every_one_of_ours_showed_a_bad_certificate(
    checks: tuple[AddressCheck, ...], matter: bool
) -> None:
    assert control_checks_matter(checks) is matter


def test_only_a_certificate_the_resolver_cannot_change_is_not_asked_again() -> None:
    refused = Failure(
        FailureKind.ERROR, TransportPhase.TLS_HANDSHAKE, "tls: certificate verify failed: hostname mismatch"
    )
    stalled = Failure(FailureKind.ERROR, TransportPhase.TLS_HANDSHAKE, "tls: handshake timed out")
    assert asking_again_cannot_change(refused) is True
    assert asking_again_cannot_change(stalled) is False
    assert asking_again_cannot_change(None) is False


def test_real_unbound_rpz_rewrites_judged_by_their_certificates(lab: NetLab, tmp_path: Path) -> None:
    """Interop: real unbound, run inside the namespace, rewrites a listed name by RPZ to a block
    page no fingerprint knows (a block, by its certificate, not a leak), and resolves a name whose
    CDN answers 451 here (a DNS leak that leads to nothing: reach http_451)."""
    if shutil.which("unbound") is None:
        pytest.skip("unbound is not installed")
    (tmp_path / "ca").mkdir()
    ca = LabCA(hosts=("127.0.0.1",), directory=tmp_path / "ca")
    zone = f"@ A {SITE}\nunknown-page A {SITE}\n"
    cdn = f'local-zone: "blocked-at-cdn.example." static\nlocal-data: "blocked-at-cdn.example. A {CDN}"\n'
    unbound = start_unbound(
        tmp_path / "unbound",
        "127.0.0.1",  # the namespace's own loopback
        ca.cert_file,
        ca.key_file,
        zone_name="leaky.example",
        zone_text=zone,
        rpz_text=f"unknown-page.leaky.example A {BLOCKPAGE_UNKNOWN}\n",
        local_zones=cdn,
        wrap=("ip", "netns", "exec", lab.name),
    )
    names = ["unknown-page.leaky.example", "leaky.example", "blocked-at-cdn.example"]
    try:

        async def go() -> list[Measurement]:
            deadline = time.monotonic() + 30
            query = dns.message.make_query("leaky.example", "A")
            while True:  # unbound answers once it has loaded its zones
                try:
                    await dns.asyncquery.udp(query, "127.0.0.1", port=unbound.ports["dns"], timeout=0.5)
                    break
                except (OSError, dns.exception.Timeout):
                    if time.monotonic() > deadline or unbound.proc.poll() is not None:
                        raise RuntimeError(unbound.log.read_text()[-2000:]) from None
                    await asyncio.sleep(0.1)
            truth = await LabServer(_zone(TRUTH), "127.0.0.3", LabCA(), transports=("udp",)).start()
            try:
                plan = Plan(
                    names,
                    ["A"],
                    [resolve_spec(f"udp://127.0.0.1:{unbound.ports['dns']}")],
                    [resolve_spec(truth.specs()["udp"])],
                    expect=lambda _d, _r: (Expectation.BLOCKED, {"order": "test"}),
                    check_identity=False,
                )
                checker = AnswerChecker("http", ca_file=lab.ca_file, timeout=3.0, rate=None)
                options = Options(timeout=2.0, udp_linger=0, confirm_after=0)
                async with Engine(options, qps=None, checker=checker) as engine:
                    return await engine.collect(plan)
            finally:
                await truth.stop()

        by = {m.domain: m for m in lab.run(go)}
    finally:
        unbound.stop()
    page = by["unknown-page.leaky.example"]
    assert (page.outcome, page.blocked, page.finding, page.reach) == (
        Outcome.SINKHOLE,
        True,
        "enforced",
        "blockpage",
    )
    assert page.sinkhole is not None
    assert page.sinkhole["source"] == "tls"
    assert (by["leaky.example"].finding, by["leaky.example"].reach) == ("leak", "reachable")
    assert (by["blocked-at-cdn.example"].finding, by["blocked-at-cdn.example"].reach) == ("leak", "http_451")
