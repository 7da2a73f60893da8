"""Reach and the IP-level block inference at the collector (issue 16), on real collectors.

Measurements are made the way a probe makes them (probe.model.Measurement with the checks of
probe.answers.AddressCheck in its evidence, as probe/judge.py puts them there) and posted to a
real collector on loopback over HTTP, on SQLite and on PostgreSQL; what comes back is
asserted by exact value, from scrapes, the status page and the store.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import time
import uuid
from datetime import UTC, datetime
from html import unescape
from pathlib import Path
from typing import Any

import pytest

from collector.config import CollectorConfigError, parse_collector_config
from collector.reach import (
    CHECK_STATUSES,
    MAX_CHECKS,
    PROBLEM_REACH,
    REACH,
    address_checks_of,
    infer_ip_blocks,
)
from collector.report import build_report, render_report
from collector.store import MIGRATIONS, open_store
from probe.answers import AddressCheck, CheckMode, CheckStatus, Phase, Reach
from probe.model import Expectation, Finding, Measurement, Outcome, Transport

from .test_collector import Server, post, postgres, server  # noqa: F401 - fixtures

ORDER = "ps-2026-7"
RESOLVER = "udp://192.0.2.53"
COUNTRIES = {"it-1": "IT", "it-2": "IT", "fr-1": "FR", "fr-2": "FR", "de-1": "DE"}


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check(
    name: str,
    address: str,
    status: CheckStatus,
    at: float,
    phase: Phase | None = None,
    cert_valid: bool | None = None,
) -> dict[str, Any]:
    """One address check as the probe logs it in `evidence.answer_checks`."""
    if phase is None and status is not CheckStatus.VALID:
        phase = Phase.CONNECT
    if status is CheckStatus.VALID:
        cert_valid = True
    return AddressCheck(
        name, address, CheckMode.TLS, status, phase=phase, cert_valid=cert_valid, time=iso(at)
    ).to_json()


def made(
    probe: str,
    domain: str,
    checks: list[dict[str, Any]] | None = None,
    reach: str = "unchecked",
    at: float | None = None,
    finding: Finding | None = None,
    answers: tuple[str, ...] = ("198.51.100.7",),
    qtype: str = "A",
    expected_by: dict[str, Any] | None = None,
    control_checks: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A measurement as a probe in COUNTRIES[probe] sends it: inside Italy the order binds (a leak
    when the name resolves); elsewhere it is ordered in IT, not here (the name must resolve)."""
    country = COUNTRIES[probe]
    if expected_by is None:
        if country == "IT":
            expected_by = {"order": ORDER, "authority": "Piracy Shield", "pattern": domain, "orders": [ORDER]}
        else:
            expected_by = {
                "list": ORDER,
                "order": ORDER,
                "pattern": domain,
                "reason": f"ordered in IT, not in {country}",
            }
    inside = "reason" not in expected_by and "list" not in expected_by
    evidence: dict[str, Any] = {"expected_by": expected_by}
    if checks is not None:
        evidence["answer_checks"] = checks
    if control_checks is not None:
        evidence["control_checks"] = control_checks
    m = Measurement(
        domain=domain,
        qtype=qtype,
        resolver=RESOLVER,
        transport=Transport.UDP,
        outcome=Outcome.RESOLVED,
        blocked=False,
        expected=Expectation.BLOCKED if inside else Expectation.RESOLVES,
        finding=finding or (Finding.LEAK if inside else Finding.OK),
        rcode="NOERROR",
        ede=(),
        answers=answers,
        cname=(),
        sinkhole=None,
        control=None,
        latency_ms=2.5,
        time=iso(time.time() if at is None else at),
        error=None,
        wire=b"\x00\x00",
        evidence=evidence,
        reach=reach,
    )
    return m.to_json()


def send(s: Server, probe: str, measurements: list[dict[str, Any]]) -> None:
    tokens = s.__dict__.setdefault("tokens", {})
    if probe not in tokens:
        tokens[probe] = s.token(probe)
    country = COUNTRIES[probe]
    body = {
        "probe": {"id": probe, "region": f"{country.lower()}-1", "country": country},
        "batch_id": str(uuid.uuid4()),
        "measurements": measurements,
    }
    r = post(s, tokens[probe], body, gz=True)
    assert r.status_code == 200, r.text


def family(scrape: dict[str, float], name: str) -> dict[str, float]:
    return {k: v for k, v in scrape.items() if k.startswith(name + "{")}


def labels(**kw: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(kw.items())) + "}"


# --- the vocabulary --------------------------------------------------------------------------


def test_the_collector_speaks_the_probes_words() -> None:
    assert list(REACH) == [r.value for r in Reach]
    assert list(CHECK_STATUSES) == [s.value for s in CheckStatus]
    assert set(PROBLEM_REACH) == set(REACH) - {"reachable", "unchecked"}
    assert {p.value for p in Phase} == {"connect", "tls_handshake", "http"}


# --- reach: a metric beside the finding --------------------------------------------------------


def test_reach_series_and_counts_by_exact_value(server: Server) -> None:  # noqa: F811
    canary = {"canary": "resolves"}
    send(
        server,
        "it-1",
        [
            made("it-1", "cdn.example", reach="http_451"),
            made("it-1", "proven.example", reach="reachable"),
            made("it-1", "dark.example", reach="unreachable"),
            made("it-1", "page.example", reach="blockpage", finding=Finding.ENFORCED),  # counted, no series
            made("it-1", "old.example"),  # a probe without answer checks: unchecked
            made("it-1", "odd.example", reach="=cmd|' /C calc'!A0"),  # not a word of the probe's: unchecked
            made(
                "it-1", "wikipedia.org", reach="unreachable", expected_by=canary, finding=Finding.OK
            ),  # a canary
        ],
    )
    send(
        server,
        "fr-1",
        [made("fr-1", "cdn.example", reach="http_451"), made("fr-1", "cert.example", reach="tls_error")],
    )
    scrape = server.scrape()
    it = {"probe": "it-1", "region": "it-1", "country": "IT", "resolver": RESOLVER, "transport": "udp"}
    fr = {"probe": "fr-1", "region": "fr-1", "country": "FR", "resolver": RESOLVER, "transport": "udp"}
    series = {
        labels(**it, order=ORDER, domain="cdn.example", qtype="A", finding="leak", reach="http_451"): 1,
        labels(**it, order=ORDER, domain="dark.example", qtype="A", finding="leak", reach="unreachable"): 1,
        labels(**fr, order=ORDER, domain="cdn.example", qtype="A", finding="ok", reach="http_451"): 1,
        labels(**fr, order=ORDER, domain="cert.example", qtype="A", finding="ok", reach="tls_error"): 1,
    }
    assert family(scrape, "blockprobe_reach") == {"blockprobe_reach" + k: v for k, v in series.items()}
    counts = {
        labels(**it, list=ORDER, finding="leak", reach="http_451"): 1,
        labels(**it, list=ORDER, finding="leak", reach="reachable"): 1,
        labels(**it, list=ORDER, finding="leak", reach="unreachable"): 1,
        labels(**it, list=ORDER, finding="leak", reach="unchecked"): 2,
        labels(**it, list=ORDER, finding="enforced", reach="blockpage"): 1,
        labels(**fr, list=ORDER, finding="ok", reach="http_451"): 1,
        labels(**fr, list=ORDER, finding="ok", reach="tls_error"): 1,
    }
    assert family(scrape, "blockprobe_reach_domains") == {
        "blockprobe_reach_domains" + k: v for k, v in counts.items()
    }
    assert family(scrape, "blockprobe_reach_series_capped") == {}


def test_a_newer_answer_replaces_the_reach_of_its_series(server: Server) -> None:  # noqa: F811
    send(server, "it-1", [made("it-1", "cdn.example", reach="http_451", at=time.time() - 60)])
    assert len(family(server.scrape(), "blockprobe_reach")) == 1
    send(server, "it-1", [made("it-1", "cdn.example", reach="reachable")])
    scrape = server.scrape()
    assert family(scrape, "blockprobe_reach") == {}
    it = {"probe": "it-1", "region": "it-1", "country": "IT", "resolver": RESOLVER, "transport": "udp"}
    assert family(scrape, "blockprobe_reach_domains") == {
        "blockprobe_reach_domains" + labels(**it, list=ORDER, finding="leak", reach="reachable"): 1
    }
    # An older measurement arriving late does not put the old reach back.
    send(server, "it-1", [made("it-1", "cdn.example", reach="http_451", at=time.time() - 120)])
    assert family(server.scrape(), "blockprobe_reach") == {}


def test_reach_series_are_capped_like_the_leak_series(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    s = Server(store, "limits: {max_domain_series: 2}\n")
    try:
        # Capped per group across reach values: the group's first names, whatever each one's reach.
        reaches = ["http_451", "unreachable", "http_451", "tls_error", "http_451"]
        send(
            s, "it-1", [made("it-1", f"n{i}.example", reach=r) for i, r in reversed(list(enumerate(reaches)))]
        )
        scrape = s.scrape()
        reach = family(scrape, "blockprobe_reach")
        assert sorted(re.findall(r'domain="([^"]+)"', "".join(reach))) == ["n0.example", "n1.example"]
        it = {"probe": "it-1", "region": "it-1", "country": "IT", "resolver": RESOLVER, "transport": "udp"}
        assert family(scrape, "blockprobe_reach_series_capped") == {
            "blockprobe_reach_series_capped" + labels(**it, rule=ORDER, finding="leak"): 3
        }
        assert (
            scrape["blockprobe_reach_domains" + labels(**it, list=ORDER, finding="leak", reach="http_451")]
            == 3
        )
        assert set(reach) == {
            "blockprobe_reach"
            + labels(**it, order=ORDER, domain="n0.example", qtype="A", finding="leak", reach="http_451"),
            "blockprobe_reach"
            + labels(**it, order=ORDER, domain="n1.example", qtype="A", finding="leak", reach="unreachable"),
        }
    finally:
        s.stop()
        store.close()


# --- the IP-level block inference -------------------------------------------------------------

V, REFUSED, TIMEOUT, RESET = CheckStatus.VALID, CheckStatus.REFUSED, CheckStatus.TIMEOUT, CheckStatus.RESET
HOUR = 3600.0

# (case, what each probe saw of the case's name at its address: probe → [(status, phase, seconds ago)],
#  inferred?). Each case has its own name and address, so the cases cannot see each other.
CASES: list[tuple[str, dict[str, list[tuple[CheckStatus, Phase | None, float]]], bool]] = [
    ("refused inside, valid elsewhere", {"it-1": [(REFUSED, None, 30)], "fr-1": [(V, None, 60)]}, True),
    ("a silence inside, valid elsewhere", {"it-1": [(TIMEOUT, None, 30)], "fr-1": [(V, None, 60)]}, True),
    ("inside only", {"it-1": [(REFUSED, None, 30)], "it-2": [(TIMEOUT, None, 30)]}, False),
    ("elsewhere only", {"fr-1": [(V, None, 30)], "de-1": [(V, None, 30)]}, False),
    ("both sides failing", {"it-1": [(TIMEOUT, None, 30)], "fr-1": [(TIMEOUT, None, 30)]}, False),
    (
        "a silence inside while another probe elsewhere fails too",
        {"it-1": [(TIMEOUT, None, 30)], "fr-1": [(V, None, 30)], "de-1": [(TIMEOUT, None, 30)]},
        False,
    ),
    (
        "a silence inside while a probe elsewhere failed earlier in the window",
        {"it-1": [(TIMEOUT, None, 30)], "fr-1": [(TIMEOUT, None, 1800), (V, None, 30)]},
        False,
    ),
    (
        "a refusal inside is no silence, even while another probe elsewhere fails",
        {"it-1": [(REFUSED, None, 30)], "fr-1": [(V, None, 30)], "de-1": [(TIMEOUT, None, 30)]},
        True,
    ),
    ("different windows", {"it-1": [(REFUSED, None, 2 * HOUR)], "fr-1": [(V, None, 30)]}, False),
    (
        "the inside probe reached it since",
        {"it-1": [(REFUSED, None, 1200), (V, None, 60)], "fr-1": [(V, None, 30)]},
        False,
    ),
    (
        "a reset in the handshake filters the name, not the address",
        {"it-1": [(RESET, Phase.TLS, 30)], "fr-1": [(V, None, 30)]},
        False,
    ),
    (
        "a silence inside while a handshake elsewhere is cut",
        {"it-1": [(TIMEOUT, None, 30)], "fr-1": [(V, None, 30)], "de-1": [(RESET, Phase.TLS, 30)]},
        False,
    ),
    (
        "one probe in Italy blocked, another not",
        {"it-1": [(REFUSED, None, 30)], "it-2": [(V, None, 30)], "fr-1": [(V, None, 30)]},
        True,
    ),
]


def _case_name(i: int) -> tuple[str, str]:
    return f"case{i}.example", f"203.0.113.{10 + i}"


def _feed_cases(s: Server, now: float) -> None:
    per_probe: dict[str, list[dict[str, Any]]] = {}
    for i, (_, seen, _) in enumerate(CASES):
        name, address = _case_name(i)
        for probe, checks in seen.items():
            made_checks = [check(name, address, status, now - ago, phase) for status, phase, ago in checks]
            # Each check arrives with the measurement it was made for (and a cached one again with later ones).
            for j in range(len(made_checks)):
                per_probe.setdefault(probe, []).append(
                    made(probe, name, [made_checks[j]], answers=(address,), at=now - checks[j][2] + 1)
                )
    for probe, ms in per_probe.items():
        # One series per (name, qtype): each measurement of a case goes in its own batch, oldest first.
        for m in sorted(ms, key=lambda m: m["time"]):
            send(s, probe, [m])


def test_ip_level_blocks_are_inferred_only_from_both_sides_in_one_window(server: Server) -> None:  # noqa: F811
    now = time.time()
    _feed_cases(server, now)
    scrape = server.scrape()
    expected = {
        "blockprobe_ip_block" + labels(country="IT", address=_case_name(i)[1], order=ORDER): 1.0
        for i, (_, _, inferred) in enumerate(CASES)
        if inferred
    }
    got = family(scrape, "blockprobe_ip_block")
    wrong = {
        CASES[i][0] for i in range(len(CASES)) if (f'address="{_case_name(i)[1]}"' in str(got)) != CASES[i][2]
    }
    assert not wrong, wrong
    assert got == expected
    assert family(scrape, "blockprobe_ip_block_addresses") == {
        "blockprobe_ip_block_addresses" + labels(country="IT", order=ORDER): float(len(expected))
    }
    # The status page names the probes on each side.
    html = server.client.get("/").text
    rows = [
        re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", r))).strip()
        for r in re.findall(r'<tr class="ip-block-row">(.*?)</tr>', html, re.S)
    ]
    assert len(rows) == len(expected)
    first = next(r for r in rows if _case_name(0)[1] in r)
    assert first.startswith(f"IT {_case_name(0)[1]} {ORDER} case0.example it-1 (refused) fr-1 (FR)")
    split = next(r for r in rows if _case_name(len(CASES) - 1)[1] in r)
    assert (
        "it-1 (refused) yet reachable from it-2 in IT: not every network there blocks it fr-1 (FR)" in split
    )
    # The same inferences as JSON, with the probes on each side.
    listed = server.client.get("/api/v1/ip-blocks").json()
    assert listed["window"] == 3600
    assert {b["address"] for b in listed["ip_blocks"]} == {
        _case_name(i)[1] for i, (_, _, inferred) in enumerate(CASES) if inferred
    }
    block = next(b for b in listed["ip_blocks"] if b["address"] == _case_name(0)[1])
    assert block["unreachable_from"] == {"it-1": "refused"}
    assert block["reachable_from"] == {"fr-1": "FR"}
    assert block["names"] == ["case0.example"]


def test_one_check_reported_by_every_measurement_of_its_name_is_stored_once(server: Server) -> None:  # noqa: F811
    now = time.time()
    fail = check("cached.example", "203.0.113.99", REFUSED, now - 100)
    ok = check("cached.example", "203.0.113.99", V, now - 100)
    send(server, "it-1", [made("it-1", "cached.example", [fail], qtype=q) for q in ("A", "AAAA", "HTTPS")])
    send(server, "it-1", [made("it-1", "cached.example", [{**fail, "cached": True}])])
    send(server, "fr-1", [made("fr-1", "cached.example", [ok])])
    rows = server.store.address_check_rows(now - HOUR)
    assert sorted((r[0], r[2], r[7], r[8]) for r in rows) == [
        ("fr-1", "outside", "valid", "ok"),
        ("it-1", "inside", "refused", "connect_fail"),
    ]


def test_what_a_probe_cannot_prove_is_dropped_and_the_batch_still_stored(server: Server) -> None:  # noqa: F811
    now = time.time()
    name, address = "hostile.example", "203.0.113.50"
    hostile: list[Any] = [
        check("other.example", address, REFUSED, now),  # another name's check
        {**check(name, "not-an-address", REFUSED, now)},
        check(name, "10.1.2.3", REFUSED, now),  # a private address: another host in every network
        check(name, "::ffff:127.0.0.1", REFUSED, now),
        check(name, "fe80::1", REFUSED, now),
        {**check(name, address, REFUSED, now), "status": "nuked"},
        {**check(name, address, REFUSED, now), "time": "yesterday"},
        {**check(name, address, REFUSED, now), "time": "2026-01-01T00:00:00"},  # no offset: ambiguous
        {**check(name, address, REFUSED, now), "phase": "http"},  # a refusal must be in connect
        {**check(name, address, CheckStatus.ERROR, now), "phase": "connect"},  # the probe's own failure
        "a string",
        None,
    ]
    send(
        server,
        "it-1",
        [made("it-1", name, hostile), made("it-1", "shape.example", checks=None) | {"evidence": ["x"]}],
    )
    assert server.store.address_check_rows(now - HOUR) == []
    # A future time is held to the measurement's own time: it cannot keep an inference alive.
    send(server, "it-1", [made("it-1", name, [check(name, address, REFUSED, now + 10 * 86400)], at=now)])
    ((*_, at, _status, _result),) = [r for r in _all_checks(server)]
    assert at <= now + 0.001
    # Measurements without an order behind them carry no side: nothing is stored for them.
    control_list = {"list": "controls", "pattern": name}
    send(server, "fr-1", [made("fr-1", name, [check(name, address, V, now)], expected_by=control_list)])
    assert len(_all_checks(server)) == 1


def _all_checks(s: Server) -> list[tuple[Any, ...]]:
    with s.store.tx() as cur:
        cur.execute("SELECT probe_id, side, name, address, time, status, result FROM address_checks")
        return [tuple(r) for r in cur.fetchall()]


def test_the_control_checks_count_as_the_probes_checks_of_that_address() -> None:
    now = time.time()
    m = made(
        "fr-1",
        "ctl.example",
        [check("ctl.example", "198.51.100.1", CheckStatus.INVALID_CERT, now, Phase.TLS, cert_valid=False)],
        control_checks=[
            check("ctl.example", "2001:DB8::0:1", V, now),
            check("ctl.example", "::ffff:198.51.100.9", V, now),
        ],
    )
    assert address_checks_of(m, "FR", now) == [
        (ORDER, "outside", "ctl.example", "2001:db8::1", pytest.approx(now, abs=0.001), "valid", "ok"),
        (ORDER, "outside", "ctl.example", "198.51.100.9", pytest.approx(now, abs=0.001), "valid", "ok"),
    ]
    # The probe's words about where the order binds must agree with its own country.
    assert address_checks_of(m, "IT", now) == []


def test_inference_on_rows_ties_and_moves() -> None:
    now = 1_800_000_000.0

    def row(p: str, c: str, side: str, t: float, status: str, result: str) -> tuple[Any, ...]:
        return (p, c, side, ORDER, "x.example", "192.0.2.9", t, status, result)

    # Both sides must have checked the same name at the same address.
    other_name = ("fr-1", "FR", "outside", ORDER, "y.example", "192.0.2.9", now, "valid", "ok")
    other_address = ("fr-1", "FR", "outside", ORDER, "x.example", "192.0.2.10", now, "valid", "ok")
    other_order = ("fr-1", "FR", "outside", "another", "x.example", "192.0.2.9", now, "valid", "ok")
    failed = row("it-1", "IT", "inside", now, "refused", "connect_fail")
    for elsewhere in (other_name, other_address, other_order):
        assert infer_ip_blocks([failed, elsewhere]) == []
    # A probe that sent contradicting checks at one instant counts the way that claims less.
    assert (
        infer_ip_blocks(
            [
                row("it-1", "IT", "inside", now, "refused", "connect_fail"),
                row("it-1", "IT", "inside", now, "valid", "ok"),
                row("fr-1", "FR", "outside", now, "valid", "ok"),
            ]
        )
        == []
    )
    assert (
        infer_ip_blocks(
            [
                row("it-1", "IT", "inside", now, "refused", "connect_fail"),
                row("fr-1", "FR", "outside", now, "valid", "ok"),
                row("fr-1", "FR", "outside", now, "refused", "connect_fail"),
            ]
        )
        == []
    )
    (block,) = infer_ip_blocks(
        [
            row("it-1", "IT", "inside", now - 5, "unreachable", "connect_fail"),
            row("fr-1", "FR", "outside", now, "valid", "ok"),
        ]
    )
    assert block.to_json() == {
        "country": "IT",
        "address": "192.0.2.9",
        "order": ORDER,
        "names": ["x.example"],
        "unreachable_from": {"it-1": "unreachable"},
        "reachable_from": {"fr-1": "FR"},
        "reachable_inside": [],
        "first": now - 5,
        "last": now,
    }


# --- storage, retention, config, reports ------------------------------------------------------


def test_retention_trims_the_checks_with_the_archive(server: Server) -> None:  # noqa: F811
    now = time.time()
    send(
        server,
        "it-1",
        [made("it-1", "old.example", [check("old.example", "203.0.113.7", REFUSED, now - 50)])],
    )
    assert len(_all_checks(server)) == 1
    server.store.trim_archive(now - 100)
    assert len(_all_checks(server)) == 1
    server.store.trim_archive(now)
    assert _all_checks(server) == []


def test_a_database_from_before_reach_moves_on_and_its_series_count_as_unchecked(tmp_path: Path) -> None:
    mine = next(i for i, m in enumerate(MIGRATIONS) if "address_checks" in m)
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (?)", (mine,))
    for migration in MIGRATIONS[:mine]:
        db.executescript(migration.format(serial="INTEGER"))
    now = time.time()
    db.execute(
        "INSERT INTO latest (probe_id, resolver, transport, qtype, domain, region, country, time, outcome, finding, "
        "rule, latency_ms, answers, since) VALUES ('it-1', ?, 'udp', 'A', 'was.example', 'it-1', 'IT', ?, 'resolved', "
        "'leak', ?, 1, '[]', ?)",
        (RESOLVER, now, ORDER, now),
    )
    db.commit()
    db.close()
    store = open_store(f"sqlite:///{path}")
    try:
        assert store.reach_counts(now - 10) == [
            ("it-1", "it-1", "IT", RESOLVER, "udp", ORDER, "leak", "unchecked", 1)
        ]
        assert store.reach_problems(now - 10) == []
        with store.tx() as cur:
            cur.execute("SELECT version FROM schema_version")
            assert cur.fetchone()[0] == len(MIGRATIONS)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10", "ip_block_window: 10 must be a number of seconds from 60 to 604800 (a week)"),
        ("'1h'", "ip_block_window: '1h' must be a number of seconds from 60 to 604800 (a week)"),
        ("true", "ip_block_window: True must be a number of seconds from 60 to 604800 (a week)"),
        ("1000000", "ip_block_window: 1000000 must be a number of seconds from 60 to 604800 (a week)"),
    ],
)
def test_the_window_is_checked_with_key_and_value(value: str, message: str) -> None:
    with pytest.raises(CollectorConfigError) as err:
        parse_collector_config(f"ip_block_window: {value}\n")
    assert err.value.errors == [f"<config>: {message}"]


def test_the_window_defaults_to_an_hour_and_is_used(tmp_path: Path) -> None:
    assert parse_collector_config("").ip_block_window == 3600
    store = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    s = Server(store, "ip_block_window: 60\n")
    try:
        now = time.time()
        name, address = "w.example", "203.0.113.77"
        send(s, "it-1", [made("it-1", name, [check(name, address, REFUSED, now - 120)], answers=(address,))])
        send(s, "fr-1", [made("fr-1", name, [check(name, address, V, now - 1)], answers=(address,))])
        assert family(s.scrape(), "blockprobe_ip_block") == {}  # two minutes apart: not one 60 s window
        page = s.client.get("/").text
        assert "IP-level blocks" in page
        assert "ip-block-row" not in page
    finally:
        s.stop()
        store.close()


def test_reports_carry_reach_and_stay_formula_safe(server: Server) -> None:  # noqa: F811
    send(
        server,
        "it-1",
        [
            made("it-1", "cdn.example", reach="http_451"),
            made("it-1", "bad.example", reach='=HYPERLINK("http://x")'),
        ],
    )
    rows = build_report(server.store, time.time() - HOUR)
    assert [(r["domain"], r["reach"]) for r in rows] == [
        ("bad.example", "unchecked"),
        ("cdn.example", "http_451"),
    ]
    doc = json.loads(render_report(rows, "json"))
    assert [r["reach"] for r in doc] == ["unchecked", "http_451"]
    table = list(csv.DictReader(io.StringIO(render_report(rows, "csv"))))
    assert [(r["domain"], r["reach"]) for r in table] == [
        ("bad.example", "unchecked"),
        ("cdn.example", "http_451"),
    ]
    assert "HYPERLINK" not in render_report(rows, "csv")
    html = render_report(rows, "html")
    assert "<th>reach</th>" in html
    assert "<td>http_451</td>" in html


def test_one_measurement_cannot_make_more_than_a_few_dozen_rows(server: Server) -> None:  # noqa: F811
    now = time.time()
    flood = [check("flood.example", f"203.0.113.{i % 250}", REFUSED, now - i) for i in range(5000)]
    send(server, "it-1", [made("it-1", "flood.example", flood)])
    assert len(_all_checks(server)) == MAX_CHECKS


def test_the_sides_follow_what_the_probes_expectations_say() -> None:
    """The words of probe/expect.py, from the real thing: a drift there must fail here."""
    import datetime as dt

    from probe.expect import OrderIndex
    from probe.lists import parse_lists

    index = OrderIndex(
        parse_lists(
            "orders:\n  - {id: ps-1, authority: Piracy Shield, jurisdictions: [IT, SM], applies_to: [isp],\n"
            "     domains: [live.example]}\n"
        )
    )
    when = dt.datetime(2026, 12, 1, tzinfo=UTC)
    now = when.timestamp()
    sides = {}
    for label, country, kind in [
        ("IT isp", "IT", "isp"),
        ("IT public", "IT", "public"),
        ("FR isp", "FR", "isp"),
    ]:
        expected, why = index.expect(country, kind, None, "live.example", when)
        assert expected is not None
        m = made(
            "it-1", "live.example", [check("live.example", "93.184.216.34", REFUSED, now)], expected_by=why
        )
        m["expected"] = str(expected)
        ((order, side, *_),) = address_checks_of(m, country, now)
        sides[label] = (order, side)
    assert sides == {
        "IT isp": ("ps-1", "inside"),
        "IT public": ("ps-1", "inside"),
        "FR isp": ("ps-1", "outside"),
    }
