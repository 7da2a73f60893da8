"""The collector, for real: a uvicorn server on loopback, on SQLite and on a real PostgreSQL.

Every test runs against both stores. Requests go over HTTP with httpx2; metrics are
asserted by value from scrapes.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from collector.app import Rendered, create_app
from collector.auth import hash_token, new_token
from collector.config import parse_collector_config
from collector.metrics import _capped, cap_problems
from collector.server import CollectorServer, server_config
from collector.store import Store, open_store

from .pg import TempPostgres, find_pg_bin
from .real import free_port

NOW_ISO = "2026-01-01T00:00:00.000Z"


@pytest.fixture(scope="session")
def postgres() -> Iterator[TempPostgres | None]:
    if find_pg_bin() is None:
        yield None
        return
    pg = TempPostgres()
    yield pg
    pg.stop()


class Server:
    def __init__(self, store: Store, config_text: str = "") -> None:
        self.port = free_port("127.0.0.1")
        # Render caches off: these tests read what they just wrote.
        self.config = parse_collector_config(
            f"listen: 127.0.0.1:{self.port}\nlimits: {{render_cache_seconds: 0}}\n" + config_text
        )
        self.store = store
        self.app = create_app(self.config, store)
        self.server = CollectorServer(server_config(self.app, self.config, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "collector did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx2.Client(base_url=self.url, timeout=10)

    def token(self, probe_id: str) -> str:
        t = new_token()
        self.store.set_token(probe_id, hash_token(t))
        return t

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)

    def scrape(self) -> dict[str, float]:
        out = {}
        for line in self.client.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, tmp_path: Path, postgres: TempPostgres | None) -> Iterator[Server]:
    if request.param == "sqlite":
        store = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    else:
        if postgres is None:
            pytest.skip("PostgreSQL is not installed (make test installs it)")
        store = open_store(postgres.fresh_database(f"t_{uuid.uuid4().hex[:12]}"))
    s = Server(store)
    yield s
    s.stop()
    store.close()


def _store_url(backend: str, tmp_path: Path, postgres: TempPostgres | None) -> str:
    """A fresh database of that backend (PostgreSQL: skipped where it is not installed)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'c.sqlite3'}"
    if postgres is None:
        pytest.skip("PostgreSQL is not installed (make test installs it)")
    return postgres.fresh_database(f"t_{uuid.uuid4().hex[:12]}")


def measurement(domain: str = "pirate.example", finding: str | None = "leak", **over: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "domain": domain,
        "qtype": "A",
        "resolver": "udp://192.0.2.53",
        "transport": "udp",
        "outcome": "resolved",
        "blocked": False,
        "expected": "blocked",
        "finding": finding,
        "rcode": "NOERROR",
        "ede": [],
        "answers": ["93.184.216.34"],
        "cname": [],
        "sinkhole": None,
        "control": None,
        "latency_ms": 3.2,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        "error": None,
        "wire": "AAA=",
        "expected_by": {"order": "agcom-1"},
    }
    m.update(over)
    return m


def batch(
    probe: str = "it-1", measurements: list[dict[str, Any]] | None = None, batch_id: str | None = None
) -> dict[str, Any]:
    return {
        "probe": {"id": probe, "region": "it-milan", "country": "IT"},
        "batch_id": batch_id or str(uuid.uuid4()),
        "measurements": measurements if measurements is not None else [measurement()],
    }


def post(
    s: Server, token: str | None, body: Any, gz: bool = False, raw: bytes | None = None
) -> httpx2.Response:
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    if gz:
        data = gzip.compress(data)
        headers["content-encoding"] = "gzip"
    return s.client.post("/api/v1/results", content=data, headers=headers)


def archived(s: Server) -> int:
    with s.store.tx() as cur:
        cur.execute("SELECT count(*) FROM archive")
        return int(cur.fetchone()[0])


def test_a_leak_becomes_a_series_then_goes_when_enforced(server: Server) -> None:
    token = server.token("it-1")
    r = post(server, token, batch(), gz=True)
    assert r.status_code == 200, r.text
    assert r.json()["stored"] == 1
    leak = (
        'blockprobe_leak{country="IT",domain="pirate.example",order="agcom-1",probe="it-1",qtype="A",'
        'region="it-milan",resolver="udp://192.0.2.53",transport="udp"}'
    )
    scrape = server.scrape()
    assert scrape[leak] == 1
    counts = 'blockprobe_domains{country="IT",finding="%s",list="agcom-1",probe="it-1",region="it-milan",resolver="udp://192.0.2.53",transport="udp"}'
    assert scrape[counts % "leak"] == 1
    # A second later than the leak, so the latest state cannot tie on the measurement time.
    later = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() + 1))
    enforced = measurement(finding="enforced", outcome="nxdomain", blocked=True, answers=[], time=later)
    assert post(server, token, batch(measurements=[enforced])).status_code == 200
    scrape = server.scrape()
    assert leak not in scrape
    assert scrape[counts % "enforced"] == 1
    assert (counts % "leak") not in scrape
    assert (
        scrape[
            'blockprobe_order_enforcement_ratio{country="IT",order="agcom-1",resolver="udp://192.0.2.53",transport="udp"}'
        ]
        == 1
    )
    assert (
        scrape['blockprobe_probe_last_report_timestamp_seconds{country="IT",probe="it-1",region="it-milan"}']
        > 1.7e9
    )
    assert archived(server) == 2  # the archive keeps both


def test_stale_series_vanish_but_the_last_report_stays(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    # Three seconds: long enough that a loaded machine still scrapes the fresh leak first.
    s = Server(store, "stale_after: 3\n")
    try:
        token = s.token("it-1")
        assert post(s, token, batch()).status_code == 200
        assert any(k.startswith("blockprobe_leak{") for k in s.scrape())
        deadline = time.monotonic() + 15
        while any(k.startswith("blockprobe_leak{") for k in s.scrape()):  # stale after three seconds
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert (
            'blockprobe_probe_last_report_timestamp_seconds{country="IT",probe="it-1",region="it-milan"}'
            in s.scrape()
        )
    finally:
        s.stop()
        store.close()


BAD = [
    ("no token", None, lambda: batch(), 401, "a bearer token is required"),
    ("wrong token", "bp_wrong", lambda: batch(), 401, "unknown or revoked token"),
    (
        "another probe's id",
        "TOKEN",
        lambda: batch(probe="fr-1"),
        403,
        "this token belongs to probe 'it-1', not 'fr-1'",
    ),
    (
        "wrong type",
        "TOKEN",
        lambda: batch(measurements=[measurement(latency_ms="fast")]),
        422,
        "measurements[0].latency_ms: Input should be a valid number, unable to parse string as a number",
    ),
    (
        "unknown outcome",
        "TOKEN",
        lambda: batch(measurements=[measurement(outcome="vanished")]),
        422,
        "measurements[0].outcome: Input should be 'timeout', 'error', 'ede_blocked', 'sinkhole', 'nxdomain', 'refused', 'servfail', 'nodata' or 'resolved'",
    ),
    (
        "missing key",
        "TOKEN",
        lambda: {k: v for k, v in batch().items() if k != "batch_id"},
        422,
        "batch_id: Field required",
    ),
    (
        "far too old",
        "TOKEN",
        lambda: batch(measurements=[measurement(time="2020-01-01T00:00:00.000Z")]),
        422,
        "measurements[0].time: 2020-01-01T00:00:00.000Z is more than 90 days old (check the probe's clock)",
    ),
]


@pytest.mark.parametrize(("token", "body", "status", "detail"), [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_bad_requests_get_their_status_and_reason_and_store_nothing(
    server: Server, token: str | None, body: Any, status: int, detail: str
) -> None:
    real = server.token("it-1")
    r = post(server, real if token == "TOKEN" else token, body())
    assert (r.status_code, r.json()["detail"]) == (status, detail)
    assert archived(server) == 0


def test_malformed_json_oversize_and_gzip_bomb(server: Server) -> None:
    token = server.token("it-1")
    r = post(server, token, None, raw=b'{"probe": ')
    assert r.status_code == 422
    assert "JSON" in r.json()["detail"]
    bomb = gzip.compress(b" " * (80 << 20))  # 80 KiB on the wire, 80 MiB inflated: past the 64 MiB bound
    r = server.client.post(
        "/api/v1/results",
        content=bomb,
        headers={"authorization": f"Bearer {token}", "content-encoding": "gzip"},
    )
    assert r.status_code == 413
    assert "inflated body is over the limit" in r.json()["detail"]
    huge = b"x" * (server.config.max_body + 1)
    r = server.client.post("/api/v1/results", content=huge, headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 413
    assert archived(server) == 0
    health = server.scrape()
    assert health['blockprobe_collector_rejected_total{reason="too_large"}'] == 2


def test_a_replayed_batch_is_acknowledged_and_stored_once(server: Server) -> None:
    token = server.token("it-1")
    body = batch(measurements=[measurement(), measurement(domain="other.example")])
    first, second = post(server, token, body), post(server, token, body, gz=True)
    assert first.json() == {"batch_id": body["batch_id"], "stored": 2, "duplicate": False}
    assert second.json() == {"batch_id": body["batch_id"], "stored": 0, "duplicate": True}
    assert archived(server) == 2
    assert server.scrape()['blockprobe_collector_batches_total{result="duplicate"}'] == 1


def test_future_clocks_are_clamped_and_said(server: Server) -> None:
    token = server.token("it-1")
    future = measurement(time="2099-01-01T00:00:00.000Z")
    r = post(server, token, batch(measurements=[future]))
    assert r.status_code == 200
    assert r.json()["clamped"] == 1
    assert "set to the receive time" in r.json()["warning"]
    (row,) = server.store.evidence(("it-1", "udp://192.0.2.53", "udp", "A", "pirate.example"))
    assert row["clock_clamped_from"] == "2099-01-01T00:00:00.000Z"
    assert row["time"].startswith("20")


def test_revoked_token_is_refused(server: Server) -> None:
    token = server.token("it-1")
    assert server.store.revoke_token("it-1")
    assert post(server, token, batch()).status_code == 401


def test_status_page_and_evidence(server: Server) -> None:
    token = server.token("it-1")
    post(server, token, batch())
    page = server.client.get("/").text
    assert "1 leak" in page
    assert "pirate.example" in page
    assert "agcom-1" in page
    ev = server.client.get(
        "/evidence",
        params={
            "probe": "it-1",
            "resolver": "udp://192.0.2.53",
            "transport": "udp",
            "qtype": "A",
            "domain": "pirate.example",
            "format": "json",
        },
    ).json()
    assert ev[0]["wire"] == "AAA="
    assert ev[0]["finding"] == "leak"


def test_lists_are_served_with_an_etag(tmp_path: Path) -> None:
    lists = tmp_path / "orders.yaml"
    lists.write_text("orders: []\n")
    store = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    s = Server(store, f"lists: [{lists}]\n")
    try:
        token = s.token("it-1")
        assert s.client.get("/api/v1/lists").status_code == 401
        r = s.client.get("/api/v1/lists", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert r.json()["files"][0]["content"] == "orders: []\n"
        again = s.client.get(
            "/api/v1/lists", headers={"authorization": f"Bearer {token}", "if-none-match": r.headers["etag"]}
        )
        assert again.status_code == 304
    finally:
        s.stop()
        store.close()


def test_committed_openapi_matches_the_app() -> None:
    from click.testing import CliRunner

    from collector.cli import cli

    result = CliRunner().invoke(cli, ["openapi"])
    committed = (Path(__file__).parent.parent / "collector" / "openapi.json").read_text()
    assert json.loads(result.stdout) == json.loads(committed), (
        "run: collector openapi > collector/openapi.json"
    )


def test_recount_rebuilds_the_series_counts(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from collector.cli import cli

    url = f"sqlite:///{tmp_path / 'c.sqlite3'}"
    store = open_store(url)
    probe = {"id": "it-1", "region": "r", "country": "IT"}
    store.ingest(probe, "batch-0001", [measurement(f"n{i}.example") for i in range(5)], time.time())
    with store.tx() as cur:
        cur.execute("DELETE FROM latest_counts")
    assert store.counts(0) == []
    store.close()
    (tmp_path / "c.yaml").write_text("listen: 127.0.0.1:8478\n")
    result = CliRunner().invoke(cli, ["recount", "--config", str(tmp_path / "c.yaml"), "--database", url])
    assert result.exit_code == 0, result.output
    assert result.stdout == "counted 5 series\n"
    store = open_store(url)
    try:
        assert [c[7] for c in store.counts(0)] == [5]
    finally:
        store.close()


def test_retention_trims_the_archive_but_never_the_latest_state(server: Server) -> None:
    token = server.token("it-1")
    assert post(server, token, batch()).status_code == 200
    assert server.store.trim_archive(time.time() + 1) == 1  # everything in the archive is older than that
    assert archived(server) == 0
    assert any(k.startswith("blockprobe_leak{") for k in server.scrape())  # the current state is still there


def test_canaries_and_control_failures_have_their_own_series(server: Server) -> None:
    token = server.token("it-1")
    canary = measurement(
        domain="wikipedia.org",
        finding="overblock",
        expected="resolves",
        blocked=True,
        outcome="nxdomain",
        expected_by={"canary": "resolves"},
    )
    ctl_ok = measurement(domain="a.example", control={"outcome": "resolved", "answers": ["192.0.2.1"]})
    ctl_bad = measurement(domain="b.example", control={"outcome": "timeout", "answers": []})
    assert post(server, token, batch(measurements=[canary, ctl_ok, ctl_bad])).status_code == 200
    scrape = server.scrape()
    assert (
        scrape[
            'blockprobe_canary_failing{country="IT",domain="wikipedia.org",outcome="nxdomain",probe="it-1",qtype="A",region="it-milan",resolver="udp://192.0.2.53",transport="udp"}'
        ]
        == 1
    )
    assert not any(
        k.startswith("blockprobe_overblock{") for k in scrape
    )  # a canary is not an overblock of a list
    assert scrape['blockprobe_control_failure_ratio{country="IT",probe="it-1",region="it-milan"}'] == 0.5


def test_an_older_database_moves_to_batch_ids_per_probe_keeping_its_batches(tmp_path: Path) -> None:
    import sqlite3

    from collector.store import MIGRATIONS

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    for migration in MIGRATIONS[:3]:  # the schema before batch ids were per probe
        db.executescript(migration.format(serial="INTEGER"))
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (3)")
    db.execute(
        "INSERT INTO batches (batch_id, probe_id, received, results) VALUES ('batch-0001', 'it-1', 1, 1)"
    )
    db.commit()
    db.close()
    store = open_store(f"sqlite:///{path}")
    try:
        probe = {"id": "it-1", "region": "it-milan", "country": "IT"}
        assert not store.ingest(
            probe, "batch-0001", [measurement()], time.time()
        ).new  # kept: still a duplicate
        other = {"id": "fr-1", "region": "fr-paris", "country": "FR"}
        assert store.ingest(other, "batch-0001", [measurement()], time.time()).new  # another probe's own id
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_database_caps_per_domain_series_as_the_contract_says(
    backend: str,
    tmp_path: Path,
    postgres: TempPostgres | None,
) -> None:
    """The capped read (`Store.capped_problems` through the latest_problems index) keeps exactly
    what capping every problem row in Python keeps, and leaves out as many per group."""
    url = _store_url(backend, tmp_path, postgres)
    store = open_store(url)
    try:
        ms = [
            measurement(f"n{i:02d}.pirate.example", qtype=q, transport=t)
            for i in range(7)
            for q in ("A", "AAAA")
            for t in ("udp", "doh")
        ]
        ms += [
            measurement(
                f"c{i}.example",
                "overblock",
                expected="resolves",
                expected_by={"list": "ctl"},
                outcome="nxdomain",
                blocked=True,
            )
            for i in range(4)
        ]
        ms += [
            measurement(
                f"u{i}.example",
                "overblock",
                expected="resolves",
                expected_by=None,
                outcome="nxdomain",
                blocked=True,
            )
            for i in range(3)
        ]  # no rule at all
        ms += [measurement("canary.example", expected_by={"canary": "resolves"})]
        store.ingest({"id": "it-1", "region": "r", "country": "IT"}, "b-1", ms, received=time.time())
        store.ingest({"id": "it-2", "region": "r2", "country": "IT"}, "b-2", ms[:5], received=time.time())
        since = time.time() - 3600
        expected = cap_problems(store.problems(since), 3)
        got = _capped(store, since, store.counts(since), 3)

        def key(p: dict[str, Any]) -> tuple[str, ...]:
            return (p["probe_id"], p["finding"], p["transport"], str(p["rule"]), p["domain"], p["qtype"])

        assert sorted(got[0], key=key) == sorted(expected[0], key=key)
        assert got[1] == expected[1]
        assert len(got[0]) == 12 + 5  # it-1: four groups of 3 (the canary is none); it-2: 3 + 2
        assert got[1][("it-1", "r", "IT", "udp://192.0.2.53", "udp", "agcom-1", "leak")] == 14 - 3
    finally:
        store.close()


def test_a_slow_render_is_served_stale_rather_than_waited_for() -> None:
    """Once renders take long (a mass leak on SQLite), a reader after a quiet spell gets the last
    value at once and the refresh runs behind it: a scrape must not wait out a render."""
    calls = []

    def make() -> int:
        calls.append(time.monotonic())
        time.sleep(0.4)
        return len(calls)

    async def scenario() -> tuple[int, int, bool, int]:
        cache = Rendered(0.05, make)
        first = await cache.get()  # nothing yet: waits for the render
        await asyncio.sleep(0.3)  # older than 3 × ttl, younger than 3 × the render's 0.4 s
        second = await cache.get()
        refreshing = cache.pending is not None
        assert cache.pending is not None
        third = await asyncio.shield(cache.pending)
        return first, second, refreshing, third

    first, second, refreshing, third = asyncio.run(scenario())
    assert (first, second, refreshing, third) == (1, 1, True, 2)


def test_finding_since_is_kept_for_the_longest_standing_names_of_each_group(server: Server) -> None:
    token = server.token("it-1")
    start = time.time() - 600
    # 15 names leaking, each since its own first measurement: n14 the oldest, n00 the newest.
    ms = [
        measurement(
            f"n{i:02d}.pirate.example",
            time=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(start + 30 * (14 - i))),
        )
        for i in range(15)
    ]
    assert post(server, token, batch(measurements=ms)).status_code == 200
    scrape = server.scrape()
    leaks = [k for k in scrape if k.startswith("blockprobe_leak{")]
    since = {k: v for k, v in scrape.items() if k.startswith("blockprobe_finding_since_timestamp_seconds{")}
    assert len(leaks) == 15  # under the cap: every name has its series
    assert len(since) == 10
    named = sorted(re.findall(r'domain="n(\d\d)', " ".join(since)))
    assert named == [f"{i:02d}" for i in range(5, 15)]  # the ten oldest
    assert min(since.values()) == int(start)


def _full_counts(store: Store, since: float) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]]]:
    """What `counts_and_reach` must say, counted the slow way: every current row grouped."""
    with store.tx() as cur:
        cur.execute(
            store._sql(
                "SELECT probe_id, region, country, resolver, transport, rule, finding, "
                "COALESCE(reach, 'unchecked'), count(*), "
                "sum(CASE WHEN outcome IN ('timeout', 'error') THEN 0 ELSE 1 END), "
                "sum(latency_ms), count(latency_ms) FROM latest WHERE time >= ? "
                "GROUP BY probe_id, region, country, resolver, transport, rule, finding, COALESCE(reach, 'unchecked')"
            ),
            (since,),
        )
        rows = cur.fetchall()
    counts: dict[tuple[Any, ...], list[Any]] = {}
    reach = set()
    for *key, r, n, answered, lat_sum, lat_n in rows:
        held = counts.setdefault(tuple(key), [0, 0, 0.0, 0])
        held[0] += n
        held[1] += answered
        held[2] += lat_sum or 0.0
        held[3] += lat_n
        if key[6] is not None and key[5] != "canary":
            reach.add((*key, r, n))
    return {(*k, n, a, round(s, 3) if ln else None, ln) for k, (n, a, s, ln) in counts.items()}, reach


def _kept_counts(store: Store, since: float) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]]]:
    counts, reach = store.counts_and_reach(since)
    return {(*c[:9], None if c[9] is None else round(c[9], 3), c[10]) for c in counts}, set(reach)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kept_counts_equal_a_full_count_at_every_staleness_boundary(
    backend: str, tmp_path: Path, postgres: TempPostgres | None
) -> None:
    """latest_counts, kept by the ingest, says what grouping every current row says: series moving
    between findings, reach, minutes and regions, late measurements the upsert ignores, and a
    database that had rows before the table existed (migration 8 fills it)."""
    import random

    url = _store_url(backend, tmp_path, postgres)
    rnd = random.Random(12)
    base = 1_789_999_980.0  # on a minute (divisible by 60), so some `since` below fall on one exactly
    findings = [
        ("leak", "blocked"),
        ("enforced", "blocked"),
        ("ok", "resolves"),
        ("inconclusive", "blocked"),
        (None, None),
    ]

    def one() -> dict[str, Any]:
        finding, expected = rnd.choice(findings)
        t = base + rnd.uniform(0, 600)
        outcome = rnd.choice(["resolved", "nxdomain", "timeout", "error"])
        return measurement(
            f"n{rnd.randrange(12)}.example",
            finding,
            expected=expected,
            qtype=rnd.choice(["A", "AAAA"]),
            transport=rnd.choice(["udp", "dot"]),
            outcome=outcome,
            latency_ms=None
            if outcome == "timeout"
            else round(rnd.uniform(0.1, 90), rnd.choice([0, 1, 3, 6])),
            reach=rnd.choice([None, "reachable", "http_451"]),
            expected_by=rnd.choice([{"order": "o-1"}, {"list": "ctl"}, {"canary": "resolves"}, None]),
            time=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z",
        )

    def check(store: Store) -> None:
        for since in [
            base - 1,
            base,
            base + 59.999,
            base + 60,
            base + 61.5,
            base + 299,
            base + 300.25,
            base + 601,
        ]:
            assert _kept_counts(store, since) == _full_counts(store, since), since
            probe_series = sum(c[7] for c in store.counts(since) if c[0] == "it-1")
            with store.tx() as cur:
                assert store._series_count(cur, "it-1", since) == probe_series

    store = open_store(url)
    try:
        for b in range(30):
            probe = rnd.choice([("it-1", "r1", "IT"), ("it-1", "r2", "IT"), ("fr-1", "f", "FR")])
            store.ingest(
                {"id": probe[0], "region": probe[1], "country": probe[2]},
                f"batch-{b:04d}",
                [one() for _ in range(rnd.randrange(1, 25))],
                received=base,
            )
            if b % 10 == 9:
                check(store)
        # As a database from before migration 8: the table goes, the migration builds it again.
        with store.tx() as cur:
            cur.execute("DROP TABLE latest_counts")
            cur.execute("DROP TABLE resolvers")
            cur.execute("DROP INDEX latest_names")
            cur.execute("UPDATE schema_version SET version = 7")
        store.close()
        store = open_store(url)
        check(store)
        for b in range(30, 45):
            store.ingest(
                {"id": "it-1", "region": "r1", "country": "IT"},
                f"batch-{b:04d}",
                [one() for _ in range(20)],
                base,
            )
        check(store)
        assert store.resolvers() == {"udp://192.0.2.53": (None, None)}
        # A repair rebuilds what the ingest kept.
        with store.tx() as cur:
            cur.execute("UPDATE latest_counts SET series = series + 7")
        assert _kept_counts(store, base) != _full_counts(store, base)
        assert store.recount() == len(store.current(0))
        check(store)
    finally:
        store.close()


def test_a_long_read_never_holds_up_the_ingest(tmp_path: Path) -> None:
    """SQLite: reads (renders, the compliance scan) have a connection of their own in WAL mode, so
    a batch is stored while a read is still open, and the open read keeps its snapshot."""
    store = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    probe = {"id": "it-1", "region": "r", "country": "IT"}
    try:
        store.ingest(probe, "batch-0001", [measurement("a.example")], time.time())
        with store.read() as cur:
            cur.execute("SELECT count(*) FROM latest")
            assert cur.fetchone()[0] == 1
            done = threading.Event()

            def write() -> None:
                store.ingest(probe, "batch-0002", [measurement("b.example")], time.time())
                done.set()

            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            assert done.wait(20), "the ingest waited for an open read"
            cur.execute("SELECT count(*) FROM latest")
            assert cur.fetchone()[0] == 1  # the read's snapshot, as it began
        assert len(store.current(0)) == 2
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_absurd_latency_counts_as_an_hour_and_breaks_nothing(
    backend: str, tmp_path: Path, postgres: TempPostgres | None
) -> None:
    """A probe's latency of 5e15 ms or 1e300 ms is kept in the evidence but counted as an hour, so
    the 64-bit sums behind blockprobe_resolver_latency_seconds cannot overflow for anyone."""
    from collector.metrics import render_findings
    from collector.store import MAX_COUNTED_LATENCY_MS

    url = _store_url(backend, tmp_path, postgres)
    store = open_store(url)
    probe = {"id": "it-1", "region": "r", "country": "IT"}
    now = time.time()
    try:
        for i, latency in enumerate([5e15, 5e15, 1e300, 2.0]):
            t = now - 120 * i  # each in a minute of its own
            at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".000Z"
            m = measurement(f"n{i}.example", latency_ms=latency, time=at)
            assert store.ingest(probe, f"batch-{i:04d}", [m], now).new
        (count,) = store.counts(now - 3600)
        assert count[7] == 4
        assert count[9] == pytest.approx(3 * MAX_COUNTED_LATENCY_MS + 2.0)
        mean = re.search(r"blockprobe_resolver_latency_seconds\{[^}]*\} (\S+)", render_findings(store, 3600))
        assert mean is not None
        assert float(mean.group(1)) == pytest.approx((3 * MAX_COUNTED_LATENCY_MS + 2.0) / 4 / 1000)
        assert store.recount() == 4
        assert store.counts(now - 3600) == [count]
    finally:
        store.close()


def test_one_probes_batches_stored_at_once_on_postgresql_keep_exact_counts(
    postgres: TempPostgres | None,
) -> None:
    """Two batches of one probe with the same new series, stored at the same time through two
    connections (two collectors, or one collector's pool): the series is counted once."""
    if postgres is None:
        pytest.skip("PostgreSQL is not installed (make test installs it)")
    url = postgres.fresh_database(f"t_{uuid.uuid4().hex[:12]}")
    stores = [open_store(url), open_store(url)]
    probe = {"id": "it-1", "region": "r", "country": "IT"}
    try:
        for round_ in range(5):
            ms = [measurement(f"r{round_}-n{i}.example") for i in range(50)]
            start = threading.Barrier(2)
            errors: list[BaseException] = []

            def push(
                store: Store,
                batch_id: str,
                ms: list[dict[str, Any]] = ms,
                start: threading.Barrier = start,
                errors: list[BaseException] = errors,
            ) -> None:
                start.wait(10)
                try:
                    store.ingest(probe, batch_id, ms, time.time())
                except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                    errors.append(exc)

            threads = [
                threading.Thread(target=push, args=(s, f"batch-{round_}-{k}"), daemon=True)
                for k, s in enumerate(stores)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not errors
        assert _kept_counts(stores[0], 0) == _full_counts(stores[0], 0)
        assert sum(c[7] for c in stores[0].counts(0)) == 250
    finally:
        for s in stores:
            s.close()
