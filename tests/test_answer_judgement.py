"""Answer checks in the judgement (CONTRACTS.md section 3, "Answer checks"), end to end: a lab
resolver and a control inside the sealed namespace of tests/netlab.py answer with the addresses
of its real TLS servers, and the engine checks them after the DNS round."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from probe.answers import AnswerChecker
from probe.catalogue import resolve_spec
from probe.engine import Engine, Plan
from probe.lab import Behaviour, LabCA, LabServer, Zone
from probe.model import Expectation, Measurement, Outcome
from probe.transports import Options

from . import netlab
from .netlab import BLOCKPAGE_UNKNOWN, CDN, REFUSES, SITE, NetLab


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
