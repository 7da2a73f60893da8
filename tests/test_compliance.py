"""Compliance over time (issue 12): time to enforce and deadline verdicts, by exact value, through a
real collector on SQLite and on a real PostgreSQL; the verdict rules as a table; concurrent passes."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from collector.cli import cli
from collector.compliance import (
    deadline_missed,
    enforcement_watched,
    observe,
    run_pass,
    time_to_enforce,
    verdict_words,
)
from collector.config import CollectorConfigError, parse_collector_config
from collector.store import MIGRATIONS, Store, compliance_of, open_store

from .pg import TempPostgres
from .test_collector import Server, batch, measurement, post, postgres  # noqa: F401 - fixtures

# An hour and a half ago, on a whole minute: every instant of these tests is in the past, so the
# collector neither clamps nor refuses it, and the series stay current (stale_after one day).
E = float(int(time.time() - 5400) // 60 * 60)
D = E + 1800  # a 30-minute deadline, as Piracy Shield's
R = "udp://192.0.2.53"
KEY = '{{country="IT",order="{order}",resolver="udp://192.0.2.53",transport="udp"}}'


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def why(order: str, due: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "order": order,
        "authority": "Piracy Shield",
        "pattern": "*.calcio.example",
        "orders": [order],
        "effective": iso(E),
    }
    if due:
        out["due"] = iso(D)
    return out


def seen(order: str, domain: str, finding: str, at: float, **over: Any) -> dict[str, Any]:
    """One measurement of `domain` under `order` at instant `at`."""
    m = measurement(domain, finding, time=iso(at), expected_by=why(order, over.pop("due", True)), **over)
    if finding == "enforced":
        m.update(outcome="nxdomain", rcode="NXDOMAIN", blocked=True, answers=[])
    elif finding == "inconclusive":
        m.update(outcome="timeout", rcode=None, blocked=None, answers=[])
    return m


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path, postgres: TempPostgres | None) -> Iterator[str]:  # noqa: F811
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'c.sqlite3'}"
    else:
        if postgres is None:
            pytest.skip("PostgreSQL is not installed (make test installs it)")
        yield postgres.fresh_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def server(db: str) -> Iterator[Server]:
    store = open_store(db)
    # One day of staleness: the instants above are an hour and a half old. Passes are run by the
    # test with a fixed clock; the app's own pass runs once at start, on an empty store.
    s = Server(store, "stale_after: 86400\ncompliance_interval: 3600\n")
    yield s
    s.stop()
    store.close()


def send(s: Server, token: str, *ms: dict[str, Any]) -> None:
    r = post(s, token, batch(measurements=list(ms)))
    assert r.status_code == 200, r.text


def compliance(s: Server, order: str) -> dict[str, float]:
    """This order's compliance series from a scrape, by family name."""
    key = KEY.format(order=order)
    return {name[: -len(key)]: v for name, v in s.scrape().items() if name.endswith(key)}


def test_a_deadline_missed_with_proof_then_enforced_late(server: Server) -> None:
    token = server.token("it-1")
    send(
        server,
        token,
        seen("ps-1", "a.calcio.example", "leak", E + 60),
        seen("ps-1", "b.calcio.example", "leak", E + 60),
    )
    assert run_pass(server.store, 86400, now=E + 61) == 1
    got = compliance(server, "ps-1")
    assert got == {
        "blockprobe_order_effective_timestamp_seconds": E,
        "blockprobe_order_due_timestamp_seconds": D,
        "blockprobe_order_names_leaking": 2,
        "blockprobe_order_enforcement_ratio": 0,
    }  # leaking before the deadline: no verdict yet, and no enforcement
    send(
        server,
        token,
        seen("ps-1", "a.calcio.example", "enforced", D + 60),
        seen("ps-1", "b.calcio.example", "leak", D + 60),
    )
    run_pass(server.store, 86400, now=D + 61)
    got = compliance(server, "ps-1")
    assert got["blockprobe_order_deadline_missed"] == 1  # b leaked a minute after the deadline
    assert got["blockprobe_order_names_leaking"] == 1
    assert "blockprobe_order_enforced_timestamp_seconds" not in got
    send(server, token, seen("ps-1", "b.calcio.example", "enforced", D + 120))
    run_pass(server.store, 86400, now=D + 121)
    got = compliance(server, "ps-1")
    # Enforcement first seen when the last name turned enforced, not when the pass ran.
    assert got["blockprobe_order_enforced_timestamp_seconds"] == D + 120
    assert got["blockprobe_order_time_to_enforce_seconds"] == 1920
    assert got["blockprobe_order_deadline_missed"] == 1  # still missed: enforcement came late
    assert got["blockprobe_order_names_leaking"] == 0
    history = server.store.compliance_history(["ps-1"])
    assert [(h["time"], h["enforced"], h["leaking"], h["names_leaking"]) for h in history] == [
        (E + 61, 0, 2, 2),
        (D + 61, 1, 1, 1),
        (D + 121, 2, 0, 0),
    ]
    run_pass(server.store, 86400, now=D + 181)
    assert len(server.store.compliance_history(["ps-1"])) == 3  # unchanged counts: nothing recorded


def test_a_deadline_met_and_its_time_to_enforce(server: Server) -> None:
    token = server.token("it-1")
    send(server, token, seen("ps-2", "a.calcio.example", "leak", E + 60))
    run_pass(server.store, 86400, now=E + 61)
    send(server, token, seen("ps-2", "a.calcio.example", "enforced", E + 600))
    run_pass(server.store, 86400, now=E + 601)
    got = compliance(server, "ps-2")
    assert got["blockprobe_order_enforced_timestamp_seconds"] == E + 600
    assert got["blockprobe_order_time_to_enforce_seconds"] == 600
    assert "blockprobe_order_deadline_missed" not in got  # enforced so far; "met" once it is due
    # Measured again after the deadline, still enforced: met.
    send(server, token, seen("ps-2", "a.calcio.example", "enforced", D + 600))
    run_pass(server.store, 86400, now=D + 601)
    assert compliance(server, "ps-2")["blockprobe_order_deadline_missed"] == 0
    # A second probe, and another qtype, on the same name: nothing new was judged, still met.
    body = batch("it-2", [seen("ps-2", "a.calcio.example", "enforced", D + 700, qtype="AAAA")])
    assert post(server, server.token("it-2"), body).status_code == 200
    run_pass(server.store, 86400, now=D + 701)
    assert compliance(server, "ps-2")["blockprobe_order_deadline_missed"] == 0
    # A name first measured after the deadline could have leaked at it: no verdict any more.
    send(server, token, seen("ps-2", "b.calcio.example", "enforced", D + 800))
    run_pass(server.store, 86400, now=D + 801)
    got = compliance(server, "ps-2")
    assert "blockprobe_order_deadline_missed" not in got
    assert got["blockprobe_order_enforced_timestamp_seconds"] == E + 600  # first seen stays first seen


def test_no_verdict_without_proof(server: Server) -> None:
    """First seen enforced after the deadline, never seen leaking: the probe may just have measured
    late. Only inconclusive series: nothing can be said either. No deadline: no verdict at all."""
    token = server.token("it-1")
    send(
        server,
        token,
        seen("ps-late", "a.calcio.example", "enforced", D + 300),
        seen("ps-dark", "b.calcio.example", "inconclusive", D + 300),
        seen("agcom-9", "c.calcio.example", "leak", D + 300, due=False),
    )
    run_pass(server.store, 86400, now=D + 301)
    late = compliance(server, "ps-late")
    assert late["blockprobe_order_time_to_enforce_seconds"] == 2100
    assert "blockprobe_order_deadline_missed" not in late
    dark = compliance(server, "ps-dark")
    assert "blockprobe_order_deadline_missed" not in dark
    assert "blockprobe_order_enforced_timestamp_seconds" not in dark
    assert dark["blockprobe_order_names_leaking"] == 0
    agcom = compliance(server, "agcom-9")
    assert "blockprobe_order_deadline_missed" not in agcom
    assert "blockprobe_order_due_timestamp_seconds" not in agcom
    assert agcom["blockprobe_order_names_leaking"] == 1


def test_a_leak_proves_a_miss_only_beyond_the_clock_margin(server: Server) -> None:
    """A probe clock up to limits.max_future_skew fast is accepted as is; one further ahead is
    replaced by the receive time, and that measurement's instant proves nothing."""
    token = server.token("it-1")
    send(server, token, seen("ps-10", "a.calcio.example", "leak", D + 60))
    run_pass(server.store, 86400, now=D + 61, margin=300)
    assert "blockprobe_order_deadline_missed" not in compliance(server, "ps-10")
    send(server, token, seen("ps-10", "a.calcio.example", "leak", D + 301))
    run_pass(server.store, 86400, now=D + 302, margin=300)
    assert compliance(server, "ps-10")["blockprobe_order_deadline_missed"] == 1
    ahead = seen("ps-11", "a.calcio.example", "leak", time.time() + 3600)
    r = post(server, token, batch(measurements=[ahead]))
    assert r.json()["clamped"] == 1
    run_pass(server.store, 86400, margin=300)
    got = compliance(server, "ps-11")
    assert got["blockprobe_order_names_leaking"] == 1
    assert "blockprobe_order_deadline_missed" not in got
    assert "blockprobe_order_due_timestamp_seconds" not in got


def test_leaks_no_pass_saw_still_count(server: Server) -> None:
    """A leak fixed before the next pass (or sent late from a spool) is recorded as it is stored:
    it proves a miss after the deadline, and withdraws a "met" before it."""
    token = server.token("it-1")
    send(server, token, seen("ps-12", "a.calcio.example", "leak", D + 60))
    send(server, token, seen("ps-12", "a.calcio.example", "enforced", D + 120))
    run_pass(server.store, 86400, now=D + 121)
    got = compliance(server, "ps-12")
    assert got["blockprobe_order_deadline_missed"] == 1
    assert got["blockprobe_order_names_leaking"] == 0
    send(server, token, seen("ps-13", "b.calcio.example", "enforced", E + 300))
    run_pass(server.store, 86400, now=E + 301)
    send(server, token, seen("ps-13", "b.calcio.example", "leak", E + 900))
    send(server, token, seen("ps-13", "b.calcio.example", "enforced", E + 960))
    run_pass(server.store, 86400, now=D + 1)
    got = compliance(server, "ps-13")
    assert got["blockprobe_order_enforced_timestamp_seconds"] == E + 300
    assert "blockprobe_order_deadline_missed" not in got  # it leaked after enforcement: maybe at due too


def test_inconclusive_series_neither_hold_back_nor_count(server: Server) -> None:
    token = server.token("it-1")
    send(
        server,
        token,
        seen("ps-3", "a.calcio.example", "enforced", E + 300),
        seen("ps-3", "b.calcio.example", "inconclusive", E + 400),
    )
    run_pass(server.store, 86400, now=D + 1)
    got = compliance(server, "ps-3")
    assert got["blockprobe_order_enforced_timestamp_seconds"] == E + 300
    assert got["blockprobe_order_deadline_missed"] == 0
    [row] = server.store.compliance(order="ps-3")
    assert (row["enforced"], row["leaking"], row["inconclusive"]) == (1, 0, 1)


def test_names_leaking_counts_names_not_series(server: Server) -> None:
    """Two probes, two qtypes, one name: one name leaking, four series."""
    for probe in ("it-1", "it-2"):
        token = server.token(probe)
        body = batch(
            probe,
            [seen("ps-4", "a.calcio.example", "leak", E + 60, qtype=q) for q in ("A", "AAAA")],
        )
        assert post(server, token, body).status_code == 200
    run_pass(server.store, 86400, now=E + 61)
    assert compliance(server, "ps-4")["blockprobe_order_names_leaking"] == 1
    [row] = server.store.compliance(order="ps-4")
    assert row["leaking"] == 4


@pytest.mark.parametrize(
    ("row", "missed", "words"),
    [
        pytest.param({"due": None}, None, "no deadline", id="no deadline"),
        pytest.param({"due": 100.0}, None, "pending", id="nothing seen, not yet due"),
        pytest.param({"due": 0.0}, None, "unknown", id="nothing seen, past due: never missed from absence"),
        pytest.param({"due": 0.0, "last_leak": -5.0}, None, "unknown", id="a leak before due only"),
        pytest.param({"due": 0.0, "last_leak": 5.0, "late_leak": 5.0}, 1, "missed", id="a late leak"),
        pytest.param(
            {"due": 0.0, "last_leak": 5.0}, None, "unknown", id="a leak after due, within the clock margin"
        ),
        pytest.param(
            {"due": 0.0, "last_leak": 5.0, "late_leak": 5.0, "first_enforced": 9.0},
            1,
            "missed",
            id="leak after due, enforced later",
        ),
        pytest.param(
            {"due": 0.0, "first_enforced": 9.0}, None, "unknown", id="first enforcement late, no leak seen"
        ),
        pytest.param(
            {"due": 0.0, "first_enforced": -9.0, "first_names": 2, "max_names": 2, "updated": 1.0},
            0,
            "met",
            id="enforced in time",
        ),
        pytest.param(
            {"due": 0.0, "first_enforced": 0.0, "first_names": 2, "max_names": 2, "updated": 1.0},
            0,
            "met",
            id="enforced at due",
        ),
        pytest.param(
            {"due": 100.0, "first_enforced": 10.0, "first_names": 2, "max_names": 2, "updated": 20.0},
            None,
            "pending",
            id="enforced so far, not yet due: pending, not met",
        ),
        pytest.param(
            {
                "due": 0.0,
                "first_enforced": -9.0,
                "first_names": 2,
                "max_names": 2,
                "last_leak": 5.0,
                "late_leak": 5.0,
                "updated": 6.0,
            },
            None,
            "unknown",
            id="enforced in time, a leak after due: a regression or a name not measured before",
        ),
        pytest.param(
            {
                "due": 0.0,
                "first_enforced": -9.0,
                "first_names": 2,
                "max_names": 2,
                "last_leak": -5.0,
                "updated": 1.0,
            },
            None,
            "unknown",
            id="a leak after enforcement, before due: it may have leaked at due",
        ),
        pytest.param(
            {"due": 0.0, "first_enforced": -9.0, "first_names": 2, "max_names": 3, "updated": 1.0},
            None,
            "unknown",
            id="a name was first judged after enforcement was seen",
        ),
    ],
)
def test_the_verdict_needs_proof(row: dict[str, Any], missed: int | None, words: str) -> None:
    assert deadline_missed(row) == missed
    assert verdict_words(row, now=50.0) == words


@pytest.mark.parametrize(
    ("why", "stored"),
    [
        (
            {"order": "o", "effective": "2026-12-01T14:05:00+01:00", "due": "2026-12-01"},
            (1796130300.0, 1796083200.0),
        ),
        (
            {"order": "o", "effective": "2026-12-01T13:05:00", "due": 1796083200},
            (None, None),
        ),  # no offset; a number
        ({"order": "o", "effective": "yesterday", "due": "2026-12-01T13:05:00Z" * 3}, (None, None)),
        ("not a mapping", (None, None)),
    ],
)
def test_odd_instants_cost_a_figure_never_the_batch(
    why: Any, stored: tuple[float | None, float | None]
) -> None:
    m = measurement(expected_by=why)
    assert compliance_of(m) == ("blocked", *stored)
    assert compliance_of({**m, "clock_clamped_from": m["time"]}) == ("blocked", None, None)


def test_time_to_enforce_is_never_negative() -> None:
    assert time_to_enforce({"effective": 100.0, "first_enforced": 160.0}) == 60
    assert (
        time_to_enforce({"effective": 100.0, "first_enforced": 40.0}) == 0
    )  # enforced before it took effect
    assert time_to_enforce({"effective": None, "first_enforced": 40.0}) is None
    assert time_to_enforce({"effective": 100.0, "first_enforced": None}) is None


def test_a_late_pass_cannot_undo_a_newer_one(db: str) -> None:
    """A pass that read an older snapshot and commits last keeps the earliest enforcement and the
    latest leak, and leaves the newer counts alone."""
    store = open_store(db)
    try:
        store.ingest(
            {"id": "it-1", "region": "r", "country": "IT"},
            "b-00000001",
            [seen("ps-5", "a.calcio.example", "enforced", E + 300)],
            received=E + 301,
        )
        run_pass(store, 86400, now=D + 1)

        def older(g: dict[str, Any]) -> dict[str, Any]:  # what a pass at E + 200 had seen: a leak
            return {
                **observe(g),
                "first_enforced": None,
                "first_names": None,
                "enforced_since": None,
                "last_leak": E + 100,
                "enforced": 0,
                "leaking": 1,
                "names_leaking": 1,
            }

        store.refresh_compliance(E + 200 - 86400, E + 200, older)
        [row] = store.compliance(order="ps-5")
        assert (row["first_enforced"], row["enforced_since"], row["last_leak"]) == (E + 300, E + 300, E + 100)
        assert (row["enforced"], row["leaking"], row["names_leaking"], row["updated"]) == (1, 0, 0, D + 1)
        assert deadline_missed(row) == 0
    finally:
        store.close()


def test_two_collectors_passing_at_once_agree(db: str) -> None:
    """Two stores on one database (two collector processes), passing concurrently: no error, one
    row per key, and each change of counts recorded once."""
    first, second = open_store(db), open_store(db)
    try:
        first.ingest(
            {"id": "it-1", "region": "r", "country": "IT"},
            "b-00000002",
            [seen("ps-6", f"n{i}.calcio.example", "leak", E + 60) for i in range(20)],
            received=E + 61,
        )
        errors: list[BaseException] = []

        def passes(store: Store) -> None:
            try:
                for i in range(15):
                    run_pass(store, 86400, now=E + 100 + i)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=passes, args=(s,)) for s in (first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(first.compliance(order="ps-6")) == 1
        assert [
            (h["enforced"], h["leaking"], h["names_leaking"]) for h in first.compliance_history(["ps-6"])
        ] == [(0, 20, 20)]
    finally:
        first.close()
        second.close()


def test_retention_trims_the_changes_but_keeps_each_keys_compliance(db: str) -> None:
    store = open_store(db)
    try:
        store.ingest(
            {"id": "it-1", "region": "r", "country": "IT"},
            "b-00000006",
            [seen("ps-9", "a.calcio.example", "leak", D + 60)],
            received=D + 61,
        )
        run_pass(store, 86400, now=D + 61)
        store.trim_archive(D + 62)
        assert store.compliance_history(["ps-9"]) == []
        [row] = store.compliance(order="ps-9")
        assert deadline_missed(row) == 1
    finally:
        store.close()


def test_ingest_and_passes_at_once_never_wait_on_each_other_in_a_cycle(db: str) -> None:
    """Two probes' batches (each leak written into its compliance key) and two collectors' passes,
    all at once on one database: every write lands, and the counts add up."""
    first, second = open_store(db), open_store(db)
    transports = ["udp", "tcp", "dot", "doh"]
    errors: list[BaseException] = []

    def ingest(store: Store, probe: str) -> None:
        try:
            for b in range(10):
                order = (
                    transports[b % 4 :] + transports[: b % 4]
                )  # each batch takes the keys in another order
                ms = [
                    seen(
                        "ps-14",
                        f"n{b}.calcio.example",
                        "leak",
                        E + 60 + b,
                        transport=t,
                        resolver=f"{t}-resolver",
                    )
                    for t in (order if probe == "it-1" else order[::-1])
                ]
                store.ingest(
                    {"id": probe, "region": "r", "country": "IT"}, f"b-{probe}-{b:04}", ms, E + 70 + b
                )
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    def passes(store: Store) -> None:
        try:
            for i in range(10):
                run_pass(store, 86400, now=E + 100 + i)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    try:
        threads = [
            threading.Thread(target=ingest, args=(first, "it-1")),
            threading.Thread(target=ingest, args=(second, "it-2")),
            threading.Thread(target=passes, args=(first,)),
            threading.Thread(target=passes, args=(second,)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        run_pass(first, 86400, now=E + 200)
        rows = first.compliance(order="ps-14")
        assert [(r["transport"], r["leaking"], r["names_leaking"]) for r in rows] == [
            (t, 20, 10) for t in sorted(transports)
        ]
        assert {r["last_leak"] for r in rows} == {E + 69}
    finally:
        first.close()
        second.close()


def test_the_app_runs_passes_on_its_own(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    s = Server(store, "stale_after: 86400\ncompliance_interval: 1\n")
    try:
        # More than limits.max_future_skew (300 s) after due: late even by a fast probe clock.
        send(s, s.token("it-1"), seen("ps-7", "a.calcio.example", "leak", D + 600))
        deadline = time.monotonic() + 20
        while compliance(s, "ps-7").get("blockprobe_order_deadline_missed") != 1:
            assert time.monotonic() < deadline, "no compliance pass ran"
            time.sleep(0.2)
    finally:
        s.stop()
        store.close()


def test_the_compliance_interval_is_checked() -> None:
    assert parse_collector_config("").compliance_interval == 30
    assert parse_collector_config("compliance_interval: 5\n").compliance_interval == 5
    for value, shown in (("0", "0"), ("'soon'", "'soon'"), ("true", "True")):
        with pytest.raises(CollectorConfigError) as exc:
            parse_collector_config(f"compliance_interval: {value}\n")
        assert exc.value.errors == [f"<config>: compliance_interval: {shown} must be a number of at least 1"]


def test_an_older_database_gains_the_compliance_tables(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for migration in MIGRATIONS[:4]:
        for statement in filter(str.strip, migration.format(serial="INTEGER").split(";")):
            db.execute(statement)
    db.execute("INSERT INTO schema_version VALUES (4)")
    db.execute(
        "INSERT INTO latest (probe_id, resolver, transport, qtype, domain, region, country, time, outcome, "
        "finding, rule, latency_ms, answers, since, rule_kind) VALUES "
        "('it-1', ?, 'udp', 'A', 'a.example', 'r', 'IT', ?, 'resolved', 'leak', 'old-1', 1, '[]', ?, 'order')",
        (R, E, E),
    )
    db.commit()
    db.close()
    store = open_store(f"sqlite:///{path}")
    try:
        with store.tx() as cur:
            cur.execute("SELECT version FROM schema_version")
            assert cur.fetchone()[0] >= 5
        run_pass(store, 86400, now=E + 1)  # a row from before: a leak, no instants, no verdict
        [row] = store.compliance(order="old-1")
        assert (row["leaking"], row["names_leaking"], row["due"], deadline_missed(row)) == (1, 1, None, None)
    finally:
        store.close()


def test_report_timeline_in_every_format(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite3"
    config = tmp_path / "collector.yaml"
    config.write_text(f"database: sqlite:///{db}\n")
    store = open_store(f"sqlite:///{db}")
    probe = {"id": "it-1", "region": "r", "country": "IT"}
    hostile = '=HYPERLINK("http://x.example")'  # a resolver label a spreadsheet would run
    try:
        store.ingest(probe, "b-00000003", [seen("ps-8", "a.calcio.example", "leak", D + 60)], received=D + 61)
        store.ingest(
            probe,
            "b-00000004",
            [seen("ps-8", "a.calcio.example", "leak", D + 60, resolver=hostile)],
            received=D + 61,
        )
        run_pass(store, 86400, now=D + 61)
        store.ingest(
            probe, "b-00000005", [seen("ps-8", "a.calcio.example", "enforced", D + 120)], received=D + 121
        )
        run_pass(store, 86400, now=D + 121)
    finally:
        store.close()
    runner = CliRunner()
    args = ["report", "--config", str(config), "--order", "ps-8", "--timeline", "--since", "7d"]
    out = runner.invoke(cli, [*args, "--format", "json"])
    assert out.exit_code == 0, out.output
    keys = {k["resolver"]: k for k in json.loads(out.output)}
    plain = keys[R]
    assert {
        k: plain[k] for k in ("effective", "due", "first_enforced", "time_to_enforce_seconds", "deadline")
    } == {
        "effective": iso(E),
        "due": iso(D),
        "first_enforced": iso(D + 120),
        "time_to_enforce_seconds": 1920,
        "deadline": "missed",
    }
    assert (plain["deadline_missed"], plain["names_leaking"]) == (1, 0)
    assert plain["time_to_enforce_is_bound"] is False  # seen leaking, then enforced: watched
    assert [(h["time"], h["enforced"], h["leaking"]) for h in plain["history"]] == [
        (iso(D + 61), 0, 1),
        (iso(D + 121), 1, 0),
    ]
    assert keys[hostile]["names_leaking"] == 1
    out = runner.invoke(cli, [*args, "--format", "csv"])
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.output)))
    assert len(rows) == 3  # two changes on one resolver, one on the other
    assert {r["resolver"] for r in rows} == {R, "'" + hostile}
    assert [r["deadline"] for r in rows if r["resolver"] == R] == ["missed", "missed"]
    out = runner.invoke(cli, [*args, "--format", "html"])
    assert out.exit_code == 0, out.output
    assert "deadline missed on 2" in out.output
    assert "=HYPERLINK(&quot;http://x.example&quot;)" in out.output  # escaped, shown as text
    out = runner.invoke(cli, ["report", "--config", str(config), "--timeline"])
    assert out.exit_code == 2
    assert "--timeline needs --order ID" in out.output


def test_time_to_enforce_of_names_already_blocked_when_first_measured_is_a_bound(server: Server) -> None:
    """A probe that starts measuring long after the order took effect finds the names blocked: the
    figure (first measurement minus effective) is an upper bound, and the page says so."""
    send(server, server.token("it-1"), seen("ps-9", "a.calcio.example", "enforced", D + 3000))
    run_pass(server.store, 86400, now=D + 3001)
    row = next(r for r in server.store.compliance(order="ps-9"))
    assert time_to_enforce(row) == 4800
    assert not enforcement_watched(row)
    html = server.client.get("/").text
    cell = html[html.index('id="order-ps-9"') :]
    assert "≤ 1 h 20 min" in cell
    assert "· in 1 h 20 min" not in cell
