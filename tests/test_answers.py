"""Answer checks (probe/answers.py) against real TLS servers in a sealed network namespace.

See tests/netlab.py for why the servers need public-looking addresses and why nothing these
tests send can leave the namespace.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from probe import answers
from probe.answers import (
    AddressCheck,
    AnswerChecker,
    CertInfo,
    CheckMode,
    CheckStatus,
    Manipulation,
    Phase,
    Reach,
    addresses_of,
    manipulated,
    reach_of,
    same_addresses,
)
from probe.fingerprints import load_fingerprints
from tests import netlab
from tests.netlab import (
    BLOCKPAGE_KNOWN,
    BLOCKPAGE_UNKNOWN,
    CDN,
    DROPS,
    KNOWN_BLOCKPAGE_HOST,
    NO_ROUTE,
    REFUSES,
    RESETS,
    SITE,
    SITE_V6,
    STALLS,
    UNKNOWN_BLOCKPAGE_HOST,
    NetLab,
)

NAME = "leaky.example"


@pytest.fixture(scope="module")
def lab() -> Iterator[NetLab]:
    reason = netlab.unavailable()
    if reason:
        pytest.skip(reason)
    with NetLab() as lab:
        yield lab


def check(lab: NetLab, name: str, address: str, mode: str = "tls", timeout: float = 3.0) -> AddressCheck:
    async def go() -> AddressCheck:
        return await AnswerChecker(mode, ca_file=lab.ca_file, timeout=timeout, rate=None).check(name, address)

    return lab.run(go)


# --- the lab itself ---------------------------------------------------------------------------


def test_the_namespace_has_no_way_out(lab: NetLab) -> None:
    def attempt() -> int:
        lab.enter()
        with socket.socket() as s:
            try:
                s.connect(("192.0.2.99", 443))
            except OSError as exc:
                return exc.errno or 0
        return 0

    async def go() -> int:
        return attempt()

    assert lab.run(go) == errno.ENETUNREACH
    assert "bp-answers-" in lab.name


def test_the_namespace_is_removed_on_exit() -> None:
    if netlab.unavailable():
        pytest.skip(netlab.unavailable() or "")
    probe_lab = NetLab(name=f"{netlab.PREFIX}{9_999_999}")  # a PID that cannot exist: swept if left
    inside: list[bool] = []

    def fail_inside() -> None:
        with probe_lab:
            inside.append(probe_lab.name in _namespaces())
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    assert inside == [True]
    assert probe_lab.name not in _namespaces()


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


# --- one address, every status ----------------------------------------------------------------


def test_a_genuine_site_validates_with_its_certificate_as_evidence(lab: NetLab) -> None:
    result = check(lab, NAME, SITE)
    assert (result.status, result.cert_valid, result.phase, result.connections) == (
        CheckStatus.VALID,
        True,
        None,
        1,
    )
    assert result.cert is not None
    assert NAME in result.cert.names
    assert "O=trustme" in result.cert.issuer
    assert len(result.cert.sha256) == 64
    assert result.to_json()["status"] == "valid"
    assert result.to_json()["port"] == 443


def test_ipv6_addresses_are_checked_too(lab: NetLab) -> None:
    assert check(lab, NAME, SITE_V6).status is CheckStatus.VALID


def test_the_name_is_the_sni_and_the_host(lab: NetLab) -> None:
    before = len(lab.requests_to(CDN))
    result = check(lab, "cdn-site.example", CDN, mode="http")
    assert (result.status, result.http_code) == (CheckStatus.VALID, 200)
    request = lab.requests_to(CDN)[before]
    assert request.sni == "cdn-site.example"
    lines = request.head.split("\r\n")
    assert lines[0] == "HEAD / HTTP/1.1"
    assert "Host: cdn-site.example" in lines
    assert not any(line.lower().startswith(("cookie", "content-length")) for line in lines)
    assert request.done.wait(5)
    assert request.extra == b""  # no body: the server read to the end and found nothing


def test_a_certificate_for_another_name_is_invalid_and_kept_as_evidence(lab: NetLab) -> None:
    result = check(lab, NAME, BLOCKPAGE_UNKNOWN)
    assert (result.status, result.cert_valid, result.phase) == (CheckStatus.INVALID_CERT, False, Phase.TLS)
    assert result.verify_error is not None
    assert "hostname mismatch" in result.verify_error.lower()
    assert result.cert is not None
    assert result.cert.names == (UNKNOWN_BLOCKPAGE_HOST,)
    assert result.connections == 2  # the refused certificate was fetched again, unverified
    assert result.blockpage is None


def test_a_known_block_page_is_recognised_by_its_certificate(lab: NetLab) -> None:
    result = check(lab, NAME, BLOCKPAGE_KNOWN)
    assert (result.status, result.cert_valid) == (CheckStatus.BLOCKPAGE, False)
    assert result.verify_error is not None
    assert "unable to get local issuer" in result.verify_error
    fp = load_fingerprints().name(KNOWN_BLOCKPAGE_HOST)
    assert fp is not None
    assert result.blockpage == {"match": KNOWN_BLOCKPAGE_HOST, "source": fp.describe()}


def test_a_cdn_answering_451_for_one_name(lab: NetLab) -> None:
    blocked = check(lab, "blocked-at-cdn.example", CDN, mode="http")
    assert (blocked.status, blocked.http_code, blocked.cert_valid) == (CheckStatus.HTTP_451, 451, True)
    assert check(lab, "cdn-site.example", CDN, mode="http").status is CheckStatus.VALID
    # Without HTTP the 451 cannot be seen: the certificate is all a TLS check knows.
    assert check(lab, "blocked-at-cdn.example", CDN, mode="tls").status is CheckStatus.VALID


def test_a_redirect_to_a_known_block_page_is_recorded_and_not_followed(lab: NetLab) -> None:
    result = check(lab, "redirected.example", CDN, mode="http")
    assert (result.status, result.http_code, result.cert_valid) == (CheckStatus.BLOCKPAGE, 302, True)
    assert result.location == f"https://{KNOWN_BLOCKPAGE_HOST}/?site=redirected.example"
    assert result.blockpage is not None
    assert result.blockpage["match"] == KNOWN_BLOCKPAGE_HOST


def test_another_status_is_kept_with_its_code(lab: NetLab) -> None:
    result = check(lab, "forbidden.example", CDN, mode="http")
    assert (result.status, result.http_code) == (CheckStatus.HTTP_STATUS, 403)


def test_a_handshake_ended_without_a_certificate_is_a_tls_failure(lab: NetLab) -> None:
    # The CDN refuses names it does not serve (an unrecognized_name alert; asyncio's server closes
    # before the alert is flushed, so the client sees the connection end mid-handshake).
    result = check(lab, "not-served-here.example", CDN)
    assert (result.status, result.phase, result.cert_valid) == (CheckStatus.TLS_FAILED, Phase.TLS, None)
    assert result.error == "tls_handshake: connection closed by peer"
    assert reach_of([result]) is Reach.UNREACHABLE


def test_refused(lab: NetLab) -> None:
    result = check(lab, NAME, REFUSES)
    assert (result.status, result.phase, result.cert_valid) == (CheckStatus.REFUSED, Phase.CONNECT, None)


def test_reset_after_the_client_hello(lab: NetLab) -> None:
    result = check(lab, NAME, RESETS)
    assert (result.status, result.phase) == (CheckStatus.RESET, Phase.TLS)


def test_a_dropped_syn_times_out_in_connect(lab: NetLab) -> None:
    result = check(lab, NAME, DROPS, timeout=0.5)
    assert (result.status, result.phase) == (CheckStatus.TIMEOUT, Phase.CONNECT)
    assert result.elapsed_ms is not None
    assert result.elapsed_ms >= 450


def test_a_silent_handshake_times_out_under_the_same_deadline(lab: NetLab) -> None:
    result = check(lab, NAME, STALLS, timeout=0.5)
    assert (result.status, result.phase) == (CheckStatus.TIMEOUT, Phase.TLS)


def test_a_silent_http_answer_times_out_after_a_valid_certificate(lab: NetLab) -> None:
    result = check(lab, "slow.leaky.example", SITE, mode="http", timeout=0.5)
    assert (result.status, result.phase, result.cert_valid) == (CheckStatus.TIMEOUT, Phase.HTTP, True)
    assert reach_of([result]) is Reach.UNCHECKED


def test_no_route_from_the_probe_is_no_evidence(lab: NetLab) -> None:
    result = check(lab, NAME, NO_ROUTE)
    assert result.status is CheckStatus.ERROR
    assert result.error == "connect: no route from this probe (ENETUNREACH)"
    assert reach_of([result]) is Reach.UNCHECKED


def test_addresses_that_cannot_be_checked_are_errors_without_a_connection(lab: NetLab) -> None:
    for name, address in [
        (NAME, "0.0.0.0"),
        (NAME, "224.0.0.1"),
        (NAME, "not-an-ip"),
        ("bücher.example", SITE),
    ]:
        result = check(lab, name, address)
        assert (result.status, result.connections) == (CheckStatus.ERROR, 0), (name, address)


def test_an_ipv4_mapped_address_is_checked_as_ipv4(lab: NetLab) -> None:
    result = check(lab, NAME, f"::ffff:{SITE}")
    assert (result.address, result.status) == (SITE, CheckStatus.VALID)


# --- cache, pacing, bounds --------------------------------------------------------------------


def test_one_connection_per_name_and_address_while_the_cache_is_fresh(lab: NetLab) -> None:
    now = [1000.0]

    async def go() -> list[AddressCheck]:
        checker = AnswerChecker(ca_file=lab.ca_file, rate=None, ttl=60, clock=lambda: now[0])
        together = await asyncio.gather(*(checker.check("www.leaky.example", SITE) for _ in range(5)))
        again = await checker.check("www.leaky.example", SITE)
        now[0] += 61
        expired = await checker.check("www.leaky.example", SITE)
        return [*together, again, expired]

    before = lab.served(SITE)
    results = lab.run(go)
    assert lab.served(SITE) - before == 2  # five together and one later shared the first check
    assert [r.cached for r in results] == [False, True, True, True, True, True, False]
    assert all(r.status is CheckStatus.VALID for r in results)


def test_check_all_checks_each_distinct_address_once(lab: NetLab) -> None:
    async def go() -> list[AddressCheck]:
        checker = AnswerChecker(ca_file=lab.ca_file, rate=None)
        return await checker.check_all(NAME, [SITE, SITE_V6, SITE, f"::ffff:{SITE}", REFUSES])

    results = lab.run(go)
    assert results[0].cert is not None
    assert results[0].cert is results[1].cert  # parsed once, shared
    assert [(r.address, r.status) for r in results] == [
        (SITE, CheckStatus.VALID),
        (SITE_V6, CheckStatus.VALID),
        (REFUSES, CheckStatus.REFUSED),
    ]


def test_new_connections_are_paced(lab: NetLab) -> None:
    rate = 20.0

    async def go() -> list[float]:
        checker = AnswerChecker(ca_file=lab.ca_file, rate=rate)
        starts: list[float] = []
        real = checker._attempt

        async def stamped(name: str, address: str, ctx: ssl.SSLContext) -> AddressCheck:
            starts.append(time.monotonic())
            return await real(name, address, ctx)

        checker._attempt = stamped  # type: ignore[method-assign]  # a stand-in with the same signature
        names = [f"n{i}.example" for i in range(5)]
        await asyncio.gather(*(checker.check(n, REFUSES) for n in names))
        assert checker.connections == 5
        return starts

    starts = sorted(lab.run(go))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 4, gaps
    assert min(gaps) >= 0.9 / rate, gaps


def test_concurrency_is_bounded(lab: NetLab) -> None:
    async def go() -> float:
        checker = AnswerChecker(ca_file=lab.ca_file, rate=None, concurrency=2, timeout=0.4)
        t0 = time.monotonic()
        results = await asyncio.gather(*(checker.check(f"s{i}.example", STALLS) for i in range(4)))
        assert all(r.status is CheckStatus.TIMEOUT for r in results)
        return time.monotonic() - t0

    assert lab.run(go) >= 0.8  # two at a time, each held for its whole deadline: two waves


def test_off_checks_nothing(lab: NetLab) -> None:
    async def go() -> tuple[list[AddressCheck], AddressCheck]:
        checker = AnswerChecker("off", ca_file=lab.ca_file)
        return await checker.check_all(NAME, [SITE]), await checker.check(NAME, SITE)

    before = lab.served(SITE)
    listed, single = lab.run(go)
    assert listed == []
    assert single.status is CheckStatus.ERROR
    assert lab.served(SITE) == before
    assert reach_of(listed) is Reach.UNCHECKED


def test_bad_settings_are_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="'sometimes' is not a valid CheckMode"):
        AnswerChecker("sometimes")
    with pytest.raises(ValueError, match=r"rate: 0 is not a positive number"):
        AnswerChecker(rate=0)
    with pytest.raises(ValueError, match=r"timeout: -1 is not a positive number"):
        AnswerChecker(timeout=-1)
    lax = ssl.create_default_context()
    lax.check_hostname = False
    with pytest.raises(ValueError, match="ssl_context: must verify the chain and the host name"):
        AnswerChecker(ssl_context=lax)


def test_a_bug_inside_a_check_becomes_an_error_value(lab: NetLab) -> None:
    async def go() -> AddressCheck:
        checker = AnswerChecker(ca_file=lab.ca_file, rate=None)

        # Stands in for AnswerChecker._attempt, whose signature (names too) it must keep.
        async def broken(name: str, address: str, ctx: ssl.SSLContext) -> AddressCheck:  # noqa: ARG001
            raise KeyError("surprise")

        checker._attempt = broken  # type: ignore[method-assign]  # a stand-in with the same signature
        return await checker.check(NAME, SITE)

    result = lab.run(go)
    assert (result.status, result.error) == (CheckStatus.ERROR, "check failed: KeyError: 'surprise'")


def test_system_trust_stays_when_a_ca_file_is_added(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    default = AnswerChecker().verifying.cert_store_stats()["x509_ca"]
    with_lab = AnswerChecker(ca_file=str(ca_file)).verifying.cert_store_stats()["x509_ca"]
    assert with_lab == default + 1


# --- the judgements, end to end ---------------------------------------------------------------


def test_a_block_page_nobody_fingerprinted_is_a_block_when_the_control_validates(lab: NetLab) -> None:
    async def go() -> tuple[list[AddressCheck], list[AddressCheck]]:
        checker = AnswerChecker(ca_file=lab.ca_file, rate=None)
        return await checker.check_all(NAME, [BLOCKPAGE_UNKNOWN]), await checker.check_all(
            NAME, [SITE, SITE_V6]
        )

    resolver, control = lab.run(go)
    verdict = manipulated(resolver, control, same_addresses=False)
    assert verdict is Manipulation.MANIPULATED
    assert reach_of(resolver, verdict) is Reach.BLOCKPAGE
    assert reach_of(control) is Reach.REACHABLE


def test_a_dns_leak_behind_a_cdn_451_is_reach_http_451(lab: NetLab) -> None:
    async def go() -> list[AddressCheck]:
        return await AnswerChecker("http", ca_file=lab.ca_file, rate=None).check_all(
            "blocked-at-cdn.example", [CDN]
        )

    checks = lab.run(go)
    verdict = manipulated(checks, checks, same_addresses=True)
    assert verdict is Manipulation.NOT_MANIPULATED  # a proven leak: the address is the site's
    assert reach_of(checks, verdict) is Reach.HTTP_451


def test_a_connection_failure_never_makes_a_block(lab: NetLab) -> None:
    async def go() -> tuple[list[AddressCheck], list[AddressCheck]]:
        checker = AnswerChecker(ca_file=lab.ca_file, rate=None, timeout=0.5)
        return await checker.check_all(NAME, [BLOCKPAGE_UNKNOWN, DROPS]), await checker.check_all(
            NAME, [SITE]
        )

    resolver, control = lab.run(go)
    assert manipulated(resolver, control, same_addresses=False) is Manipulation.STANDS
    assert reach_of(resolver) is Reach.TLS_ERROR


# --- the judgements as tables (pure) ----------------------------------------------------------


def _c(status: CheckStatus, cert_valid: bool | None = None, phase: Phase | None = None) -> AddressCheck:
    return AddressCheck(NAME, "198.51.100.1", CheckMode.TLS, status, phase=phase, cert_valid=cert_valid)


VALID = _c(CheckStatus.VALID, True)
INVALID = _c(CheckStatus.INVALID_CERT, False, Phase.TLS)
BLOCKPAGE_CERT = _c(CheckStatus.BLOCKPAGE, False, Phase.TLS)
BLOCKPAGE_REDIRECT = _c(CheckStatus.BLOCKPAGE, True)
H451 = _c(CheckStatus.HTTP_451, True)
H403 = _c(CheckStatus.HTTP_STATUS, True)
TIMEOUT = _c(CheckStatus.TIMEOUT, None, Phase.CONNECT)
HTTP_TIMEOUT = _c(CheckStatus.TIMEOUT, True, Phase.HTTP)
REFUSED = _c(CheckStatus.REFUSED, None, Phase.CONNECT)
RESET = _c(CheckStatus.RESET, None, Phase.TLS)
TLS_FAILED = _c(CheckStatus.TLS_FAILED, None, Phase.TLS)
ERROR = _c(CheckStatus.ERROR)

M = Manipulation


@pytest.mark.parametrize(
    ("resolver", "control", "same", "expected"),
    [
        ([INVALID], [VALID], False, M.MANIPULATED),
        ([INVALID, BLOCKPAGE_CERT], [TIMEOUT, VALID], False, M.MANIPULATED),
        ([INVALID], [H451], False, M.MANIPULATED),  # the control's certificate is what validates
        ([INVALID, TIMEOUT], [VALID], False, M.STANDS),  # one silent address withholds the verdict
        ([INVALID, REFUSED], [VALID], False, M.STANDS),
        ([TIMEOUT], [VALID], False, M.STANDS),
        ([RESET, TLS_FAILED], [VALID], False, M.STANDS),
        ([ERROR], [VALID], False, M.STANDS),
        ([INVALID], [INVALID], False, M.CANNOT_TELL),
        ([INVALID], [TIMEOUT], False, M.CANNOT_TELL),
        ([INVALID], [], False, M.CANNOT_TELL),  # no control answer to compare with
        ([INVALID], [INVALID], True, M.STANDS),
        ([INVALID], [], True, M.STANDS),
        ([VALID], [INVALID], False, M.NOT_MANIPULATED),
        ([INVALID, VALID], [VALID], False, M.NOT_MANIPULATED),
        ([H451], [VALID], True, M.NOT_MANIPULATED),
        ([HTTP_TIMEOUT], [], False, M.NOT_MANIPULATED),
        (
            [BLOCKPAGE_REDIRECT],
            [VALID],
            False,
            M.NOT_MANIPULATED,
        ),  # the address is genuine; reach says the rest
        ([], [VALID], False, M.STANDS),
    ],
)
def test_manipulated(
    resolver: list[AddressCheck], control: list[AddressCheck], same: bool, expected: Manipulation
) -> None:
    assert manipulated(resolver, control, same) is expected


@pytest.mark.parametrize(
    ("checks", "verdict", "expected"),
    [
        ([], None, Reach.UNCHECKED),
        ([ERROR], None, Reach.UNCHECKED),
        ([VALID], None, Reach.REACHABLE),
        ([H403], None, Reach.REACHABLE),
        ([TIMEOUT, VALID], None, Reach.REACHABLE),  # a browser moves on to the next address
        ([H451], None, Reach.HTTP_451),
        ([H451, VALID], None, Reach.REACHABLE),
        ([BLOCKPAGE_REDIRECT], None, Reach.BLOCKPAGE),
        ([BLOCKPAGE_CERT, TIMEOUT], None, Reach.BLOCKPAGE),
        ([INVALID], M.MANIPULATED, Reach.BLOCKPAGE),
        ([INVALID], M.CANNOT_TELL, Reach.TLS_ERROR),
        ([INVALID, TIMEOUT], None, Reach.TLS_ERROR),
        ([TIMEOUT, REFUSED, RESET, TLS_FAILED], None, Reach.UNREACHABLE),
        ([TIMEOUT, ERROR], None, Reach.UNREACHABLE),
        ([HTTP_TIMEOUT], None, Reach.UNCHECKED),
        ([HTTP_TIMEOUT, TIMEOUT], None, Reach.UNCHECKED),
    ],
)
def test_reach_of(checks: list[AddressCheck], verdict: Manipulation | None, expected: Reach) -> None:
    assert reach_of(checks, verdict) is expected


def test_json_is_complete_and_plain() -> None:
    cert = CertInfo("CN=x", "CN=ca", ("x",), "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z", "0" * 64)
    doc = AddressCheck(NAME, SITE, CheckMode.HTTP, CheckStatus.HTTP_451, cert=cert, http_code=451).to_json()
    assert doc["status"] == "http_451"
    assert doc["mode"] == "http"
    assert doc["cert"]["names"] == ["x"]
    keys = "name address port mode status phase cert_valid verify_error cert http_code location blockpage"
    assert list(doc) == [*keys.split(), "error", "elapsed_ms", "connections", "time", "cached"]


def test_public_api() -> None:
    names = "PORT AddressCheck AnswerChecker CertInfo CheckMode CheckStatus Manipulation Phase Reach"
    functions = ["addresses_of", "manipulated", "reach_of", "same_addresses"]
    assert sorted(answers.__all__) == sorted([*names.split(), *functions])


@pytest.mark.parametrize(
    ("qtype", "answer", "expected"),
    [
        ("A", ["198.51.100.1", "198.51.100.2", "198.51.100.1"], ["198.51.100.1", "198.51.100.2"]),
        ("AAAA", ["2001:DB8::1", "::ffff:198.51.100.1"], ["2001:db8::1", "198.51.100.1"]),
        ("A", ["not-an-address"], []),
        (
            "HTTPS",
            ['1 . alpn="h2,h3" ipv4hint="198.51.100.1,198.51.100.2" ipv6hint="2001:db8::1"'],
            ["198.51.100.1", "198.51.100.2", "2001:db8::1"],
        ),
        ("HTTPS", ["1 . ipv4hint=198.51.100.3 port=8443"], ["198.51.100.3"]),
        ("HTTPS", ["1 svc.example. alpn=h2"], []),  # no hints: nothing to check at this record
        ("TXT", ["198.51.100.1"], []),
    ],
)
def test_addresses_of(qtype: str, answer: list[str], expected: list[str]) -> None:
    assert addresses_of(qtype, answer) == expected


def test_same_addresses_ignores_order_and_form() -> None:
    assert same_addresses(["198.51.100.2", "198.51.100.1"], ["198.51.100.1", "::ffff:198.51.100.2"], "A")
    assert not same_addresses(["198.51.100.1"], ["198.51.100.1", "198.51.100.2"], "A")
