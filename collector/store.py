"""Storage: the evidence archive and the latest state per series, on SQLite or PostgreSQL.

One schema and one set of migrations for both; the SQL is written once with `?`
placeholders and portable upserts. The archive keeps every measurement with its raw
wire response; `latest` keeps, per series (probe × resolver × transport × qtype ×
name), the newest measurement and since when its finding has held. Retention trims the
archive only; `latest` is never lost to it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from collector.reach import PROBLEM_REACH, address_checks_of, reach_of

__all__ = ["COLLECTOR_FIELDS", "SeriesQuotaExceeded", "Store", "StoredBatch", "open_store"]

MIGRATIONS: list[str] = [
    """
    CREATE TABLE tokens (probe_id TEXT PRIMARY KEY, token_hash TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,
                         revoked DOUBLE PRECISION);
    CREATE TABLE probes (probe_id TEXT PRIMARY KEY, region TEXT NOT NULL, country TEXT NOT NULL,
                         last_report DOUBLE PRECISION NOT NULL, version TEXT);
    CREATE TABLE batches (batch_id TEXT PRIMARY KEY, probe_id TEXT NOT NULL, received DOUBLE PRECISION NOT NULL,
                          results INTEGER NOT NULL);
    CREATE TABLE archive (id {serial} PRIMARY KEY, batch_id TEXT NOT NULL, probe_id TEXT NOT NULL,
                          region TEXT NOT NULL, country TEXT NOT NULL, resolver TEXT NOT NULL, transport TEXT NOT NULL,
                          qtype TEXT NOT NULL, domain TEXT NOT NULL, time DOUBLE PRECISION NOT NULL,
                          outcome TEXT NOT NULL, finding TEXT, rule TEXT, body TEXT NOT NULL);
    CREATE INDEX archive_series ON archive (probe_id, resolver, transport, qtype, domain, time);
    CREATE INDEX archive_time ON archive (time);
    CREATE INDEX archive_finding ON archive (finding, time);
    CREATE TABLE latest (probe_id TEXT NOT NULL, resolver TEXT NOT NULL, transport TEXT NOT NULL,
                         qtype TEXT NOT NULL, domain TEXT NOT NULL, region TEXT NOT NULL, country TEXT NOT NULL,
                         time DOUBLE PRECISION NOT NULL, outcome TEXT NOT NULL, finding TEXT, rule TEXT,
                         latency_ms DOUBLE PRECISION, answers TEXT NOT NULL, since DOUBLE PRECISION NOT NULL,
                         PRIMARY KEY (probe_id, resolver, transport, qtype, domain));
    CREATE INDEX latest_time ON latest (time);
    CREATE INDEX latest_finding ON latest (finding, time);
    """,
    # 2: how often the probe's control resolver failed in its last batch (an alert input).
    "ALTER TABLE probes ADD COLUMN control_failure_ratio DOUBLE PRECISION",
    # 3: whether the rule behind a finding is an order, a control list or a canary.
    "ALTER TABLE latest ADD COLUMN rule_kind TEXT",
    # 4: batch ids are unique per probe, not globally: another probe reusing an id (by chance or
    # on purpose) must not get its batch acknowledged as a duplicate and dropped.
    """
    CREATE TABLE batches_by_probe (probe_id TEXT NOT NULL, batch_id TEXT NOT NULL,
                                   received DOUBLE PRECISION NOT NULL, results INTEGER NOT NULL,
                                   PRIMARY KEY (probe_id, batch_id));
    INSERT INTO batches_by_probe (probe_id, batch_id, received, results)
        SELECT probe_id, batch_id, received, results FROM batches;
    DROP TABLE batches;
    ALTER TABLE batches_by_probe RENAME TO batches;
    CREATE INDEX batches_received ON batches (received)
    """,
    # Answer checks (issue 16): what a user would meet at each series' answer, and each probe's
    # checks of the addresses of ordered names, for the IP-level block inference (collector/reach.py).
    # Self-contained, so that it can take any number after the migrations before it.
    """
    ALTER TABLE latest ADD COLUMN reach TEXT;
    CREATE INDEX latest_reach ON latest (reach, time);
    CREATE TABLE address_checks (probe_id TEXT NOT NULL, country TEXT NOT NULL, side TEXT NOT NULL,
                                 rule TEXT NOT NULL, name TEXT NOT NULL, address TEXT NOT NULL,
                                 time DOUBLE PRECISION NOT NULL, status TEXT NOT NULL, result TEXT NOT NULL,
                                 PRIMARY KEY (rule, name, address, probe_id, time));
    CREATE INDEX address_checks_time ON address_checks (time);
    CREATE INDEX address_checks_failures ON address_checks (result, side, time)
    """,
]

# Keys of an evidence row that the collector sets: a measurement's own keys never override them.
COLLECTOR_FIELDS = ("id", "batch_id", "probe", "region", "country", "received")

_SERIES = ("probe_id", "resolver", "transport", "qtype", "domain")


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def rule_kind_of(m: dict[str, Any]) -> str | None:
    """`order` when an order is behind the expectation (binding here or elsewhere), `control`, or `canary`."""
    why = m.get("expected_by") or (m.get("evidence") or {}).get("expected_by")
    if not isinstance(why, dict):
        return None
    if "canary" in why:
        return "canary"
    return "order" if "order" in why else ("control" if "list" in why else None)


def rule_of(m: dict[str, Any]) -> str | None:
    """The order or list a measurement was judged against (metric label `order` / `list`)."""
    why = m.get("expected_by") or (m.get("evidence") or {}).get("expected_by")
    if not isinstance(why, dict):
        return None
    if "canary" in why:
        return "canary"  # a canary's fate says whether the resolver can be judged, not whether an order holds
    rule = why.get("order") if m.get("expected") == "blocked" else (why.get("list") or why.get("order"))
    return str(rule)[:128] if rule else None


@dataclass(frozen=True)
class StoredBatch:
    new: bool
    stored: int


class SeriesQuotaExceeded(Exception):
    """Storing the batch would leave the probe with more current series than its quota."""

    def __init__(self, series: int, limit: int) -> None:
        super().__init__(
            f"this batch would give the probe {series} current series, over its quota of {limit}"
        )
        self.series = series
        self.limit = limit


class Store:
    """Shared by both databases; subclasses provide connections and the dialect."""

    placeholder = "?"
    serial = "INTEGER"
    # Bumped on every token change made through this object, so this process's token cache
    # sees a revocation at once (another process's change is seen at the cache's next refresh).
    token_generation = 0

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    @contextmanager
    def tx(self) -> Iterator[Any]:  # pragma: no cover - overridden
        raise NotImplementedError
        yield

    def migrate(self) -> None:
        with self.tx() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cur.execute("SELECT version FROM schema_version")
            row = cur.fetchone()
            version = row[0] if row else 0
            for i, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, migration.format(serial=self.serial_pk).split(";")):
                    cur.execute(statement)
                cur.execute(self._sql("DELETE FROM schema_version"))
                cur.execute(self._sql("INSERT INTO schema_version (version) VALUES (?)"), (i,))

    @property
    def serial_pk(self) -> str:
        return self.serial

    # tokens ----------------------------------------------------------------------------
    def set_token(self, probe_id: str, token_hash: str) -> None:
        with self.tx() as cur:
            cur.execute(
                self._sql(
                    "INSERT INTO tokens (probe_id, token_hash, created, revoked) VALUES (?, ?, ?, NULL) "
                    "ON CONFLICT (probe_id) DO UPDATE SET token_hash = excluded.token_hash, created = excluded.created, "
                    "revoked = NULL"
                ),
                (probe_id, token_hash, time.time()),
            )
        self.token_generation += 1

    def revoke_token(self, probe_id: str) -> bool:
        with self.tx() as cur:
            cur.execute(
                self._sql("UPDATE tokens SET revoked = ? WHERE probe_id = ? AND revoked IS NULL"),
                (time.time(), probe_id),
            )
            done = bool(cur.rowcount)
        self.token_generation += 1
        return done

    def tokens(self) -> list[tuple[str, str, float, float | None]]:
        with self.tx() as cur:
            cur.execute("SELECT probe_id, token_hash, created, revoked FROM tokens ORDER BY probe_id")
            return [tuple(r) for r in cur.fetchall()]

    def token_hash(self, probe_id: str) -> str | None:
        with self.tx() as cur:
            cur.execute(
                self._sql("SELECT token_hash FROM tokens WHERE probe_id = ? AND revoked IS NULL"), (probe_id,)
            )
            row = cur.fetchone()
            return None if row is None else str(row[0])

    # ingest ----------------------------------------------------------------------------
    def ingest(
        self,
        probe: dict[str, Any],
        batch_id: str,
        measurements: Sequence[dict[str, Any]],
        received: float,
        max_series: tuple[int, float] | None = None,
    ) -> StoredBatch:
        """Store a batch in one transaction: all of it, or (a batch id this probe sent before) nothing.

        `max_series` = (limit, since): refuse the whole batch (SeriesQuotaExceeded, nothing stored)
        when the probe would then have more than `limit` series reported at or after `since`.
        """
        pid, region, country = probe["id"], probe["region"], probe["country"]
        archive = []
        checks: list[tuple[Any, ...]] = []
        latest: dict[tuple[str, ...], tuple[Any, ...]] = {}
        newest = 0.0
        controls = [m["control"].get("outcome") for m in measurements if isinstance(m.get("control"), dict)]
        failed = sum(o in ("timeout", "error", "servfail", "refused") for o in controls)
        control_ratio = failed / len(controls) if controls else None
        for m in measurements:
            t = parse_time(m["time"])
            newest = max(newest, t)
            rule = rule_of(m)
            key = (pid, m["resolver"], m["transport"], m["qtype"], m["domain"])
            archive.append(
                (
                    batch_id,
                    pid,
                    region,
                    country,
                    m["resolver"],
                    m["transport"],
                    m["qtype"],
                    m["domain"],
                    t,
                    m["outcome"],
                    m.get("finding"),
                    rule,
                    json.dumps(m, separators=(",", ":")),
                )
            )
            row = (
                *key,
                region,
                country,
                t,
                m["outcome"],
                m.get("finding"),
                rule,
                m.get("latency_ms"),
                json.dumps(m.get("answers", [])),
                t,
                rule_kind_of(m),
                reach_of(m),
            )
            if key not in latest or latest[key][7] <= t:
                latest[key] = row
            checks.extend((pid, country, *c) for c in address_checks_of(m, country, t))
        with self.tx() as cur:
            cur.execute(
                self._sql(
                    "INSERT INTO batches (probe_id, batch_id, received, results) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (probe_id, batch_id) DO NOTHING"
                ),
                (pid, batch_id, received, len(archive)),
            )
            if cur.rowcount == 0:
                return StoredBatch(False, 0)
            if max_series is not None:
                # Counted before the upsert, so the batch's keys already there are not counted twice.
                limit, since = max_series
                cur.execute(
                    self._sql("SELECT count(*) FROM latest WHERE probe_id = ? AND time >= ?"), (pid, since)
                )
                current = int(cur.fetchone()[0])
                if current + len(latest) > limit:
                    new = self._new_keys(cur, pid, since, list(latest))
                    if current + new > limit:
                        raise SeriesQuotaExceeded(current + new, limit)
            cur.executemany(
                self._sql(
                    "INSERT INTO archive (batch_id, probe_id, region, country, resolver, transport, qtype, domain, time, "
                    "outcome, finding, rule, body) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
                ),
                archive,
            )
            cur.executemany(
                self._sql(
                    "INSERT INTO latest (probe_id, resolver, transport, qtype, domain, region, country, time, outcome, "
                    "finding, rule, latency_ms, answers, since, rule_kind, reach) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT (probe_id, resolver, transport, qtype, domain) DO UPDATE SET "
                    "region = excluded.region, country = excluded.country, time = excluded.time, "
                    "outcome = excluded.outcome, finding = excluded.finding, rule = excluded.rule, "
                    "latency_ms = excluded.latency_ms, answers = excluded.answers, rule_kind = excluded.rule_kind, "
                    "reach = excluded.reach, "
                    "since = CASE WHEN COALESCE(latest.finding, '') = COALESCE(excluded.finding, '') "
                    "THEN latest.since ELSE excluded.since END "
                    "WHERE excluded.time >= latest.time"
                ),
                list(latest.values()),
            )
            self._store_checks(cur, checks)
            if newest:
                cur.execute(
                    self._sql(
                        "INSERT INTO probes (probe_id, region, country, last_report, version, control_failure_ratio) "
                        "VALUES (?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT (probe_id) DO UPDATE SET region = excluded.region, country = excluded.country, "
                        "last_report = CASE WHEN excluded.last_report > probes.last_report THEN excluded.last_report "
                        "ELSE probes.last_report END, version = excluded.version, "
                        "control_failure_ratio = COALESCE(excluded.control_failure_ratio, probes.control_failure_ratio)"
                    ),
                    (pid, region, country, received, probe.get("version"), control_ratio),
                )
        return StoredBatch(True, len(archive))

    def _store_checks(self, cur: Any, checks: list[tuple[Any, ...]]) -> None:
        """Answer checks of ordered names, once each: a probe's cached check comes back with every
        measurement of its name (each qtype, each resolver), at the time it was made."""
        checks = list(dict.fromkeys(checks))
        if checks:
            cur.executemany(
                self._sql(
                    "INSERT INTO address_checks (probe_id, country, rule, side, name, address, time, status, result) "
                    "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (rule, name, address, probe_id, time) DO NOTHING"
                ),
                checks,
            )

    def _new_keys(self, cur: Any, pid: str, since: float, keys: list[tuple[str, ...]]) -> int:
        """How many of a batch's series keys are not yet current for this probe (exact, slower path)."""
        existing: set[tuple[str, ...]] = set()
        cur.execute(
            self._sql(
                "SELECT probe_id, resolver, transport, qtype, domain FROM latest WHERE probe_id = ? AND time >= ?"
            ),
            (pid, since),
        )
        for row in cur.fetchall():
            existing.add(tuple(row))
        return sum(k not in existing for k in keys)

    def groups(self, probe_id: str, since: float) -> list[tuple[str, str, str]]:
        """The probe's current (resolver, transport, rule) groups: seeds the ingest's group quota."""
        with self.tx() as cur:
            cur.execute(
                self._sql(
                    "SELECT DISTINCT resolver, transport, COALESCE(rule, '') FROM latest "
                    "WHERE probe_id = ? AND time >= ?"
                ),
                (probe_id, since),
            )
            return [(str(a), str(b), str(c)) for a, b, c in cur.fetchall()]

    # reading ---------------------------------------------------------------------------
    def current(self, since: float) -> list[dict[str, Any]]:
        """Latest rows reported at or after `since` (the staleness window), with their probe's region."""
        with self.tx() as cur:
            cur.execute(
                self._sql(
                    "SELECT probe_id, resolver, transport, qtype, domain, region, country, time, outcome, finding, rule, "
                    "latency_ms, answers, since FROM latest WHERE time >= ?"
                ),
                (since,),
            )
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def problems(self, since: float) -> list[dict[str, Any]]:
        """Current leaks and overblocks only: what per-domain series and the status page show."""
        with self.tx() as cur:
            cur.execute(
                self._sql(
                    "SELECT probe_id, resolver, transport, qtype, domain, region, country, time, outcome, finding, rule, "
                    "answers, since, rule_kind, reach FROM latest WHERE time >= ? AND finding IN ('leak', 'overblock') "
                    "AND COALESCE(rule, '') <> 'canary' "
                    "ORDER BY finding, country, resolver, transport, domain, qtype"
                ),
                (since,),
            )
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    # reach (issue 16) ------------------------------------------------------------------
    def reach_problems(self, since: float) -> list[dict[str, Any]]:
        """Current series of names with an expectation whose answer a user could not use as the
        site (reach http_451, blockpage, tls_error, unreachable): blockprobe_reach. Enforced series
        are left out: a blocked name whose answer leads to a block page is the order working, and
        an ISP with a block page no fingerprint knows would otherwise fill the cap on every group."""
        marks = ", ".join("?" for _ in PROBLEM_REACH)
        with self.tx() as cur:
            cur.execute(
                self._sql(
                    "SELECT probe_id, region, country, resolver, transport, qtype, domain, finding, rule, reach "
                    f"FROM latest WHERE reach IN ({marks}) AND time >= ? AND finding IS NOT NULL "
                    "AND finding <> 'enforced' AND COALESCE(rule, '') <> 'canary'"
                ),
                (*PROBLEM_REACH, since),
            )
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def reach_counts(self, since: float) -> list[tuple[Any, ...]]:
        """(probe, region, country, resolver, transport, rule, finding, reach, series) over the current
        series of names with an expectation; a series from before reach was kept counts as unchecked."""
        with self.tx() as cur:
            cur.execute(
                self._sql(
                    "SELECT probe_id, region, country, resolver, transport, rule, finding, "
                    "COALESCE(reach, 'unchecked') AS r, count(*) FROM latest "
                    "WHERE time >= ? AND finding IS NOT NULL AND COALESCE(rule, '') <> 'canary' "
                    "GROUP BY probe_id, region, country, resolver, transport, rule, finding, r"
                ),
                (since,),
            )
            return [tuple(r) for r in cur.fetchall()]

    def address_check_rows(self, since: float) -> list[tuple[Any, ...]]:
        """Every check since `since` of an (order, name, address) that some probe in an ordering
        country failed to connect to since then: (probe, country, side, order, name, address, time,
        status, result). Only what could make an inference is read, so the cost follows what fails."""
        with self.tx() as cur:
            cur.execute(
                self._sql(
                    "SELECT c.probe_id, c.country, c.side, c.rule, c.name, c.address, c.time, c.status, c.result "
                    "FROM (SELECT DISTINCT rule, name, address FROM address_checks "
                    "WHERE result = 'connect_fail' AND side = 'inside' AND time >= ?) f "
                    "JOIN address_checks c ON c.rule = f.rule AND c.name = f.name AND c.address = f.address "
                    "AND c.time >= ?"
                ),
                (since, since),
            )
            return [tuple(r) for r in cur.fetchall()]

    def canaries(self, since: float) -> list[dict[str, Any]]:
        """Current canary series whose fate was not the expected one (or could not be told)."""
        with self.tx() as cur:
            cur.execute(
                self._sql(
                    "SELECT probe_id, region, country, resolver, transport, qtype, domain, outcome, finding FROM latest "
                    "WHERE time >= ? AND rule = 'canary' AND finding NOT IN ('ok', 'enforced')"
                ),
                (since,),
            )
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def counts(self, since: float) -> list[tuple[Any, ...]]:
        """One pass over the current series: (probe, region, country, resolver, transport, rule, finding,
        series, answered, latency sum ms, latency count)."""
        with self.tx() as cur:
            cur.execute(
                self._sql(
                    "SELECT probe_id, region, country, resolver, transport, rule, finding, count(*), "
                    "sum(CASE WHEN outcome IN ('timeout', 'error') THEN 0 ELSE 1 END), "
                    "sum(latency_ms), count(latency_ms) FROM latest WHERE time >= ? "
                    "GROUP BY probe_id, region, country, resolver, transport, rule, finding"
                ),
                (since,),
            )
            return [tuple(r) for r in cur.fetchall()]

    def probes(self) -> list[dict[str, Any]]:
        with self.tx() as cur:
            cur.execute(
                "SELECT probe_id, region, country, last_report, version, control_failure_ratio FROM probes "
                "ORDER BY probe_id"
            )
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def evidence(self, key: Sequence[str], limit: int = 20) -> list[dict[str, Any]]:
        """The archived measurements of one series, newest first (each with its raw response).

        The collector's own fields (COLLECTOR_FIELDS) are set last: a measurement that carries
        keys of those names cannot make its evidence claim another probe, batch or time.
        """
        with self.tx() as cur:
            cur.execute(
                self._sql(
                    "SELECT a.id, a.batch_id, a.probe_id, a.region, a.country, b.received, a.body FROM archive a "
                    "LEFT JOIN batches b ON b.probe_id = a.probe_id AND b.batch_id = a.batch_id "
                    "WHERE a.probe_id = ? AND a.resolver = ? AND a.transport = ? AND a.qtype = ? AND a.domain = ? "
                    "ORDER BY a.time DESC LIMIT ?"
                ),
                (*key, limit),
            )
            rows = []
            for r in cur.fetchall():
                row = json.loads(r[6])
                row.update(zip(COLLECTOR_FIELDS, r[:6], strict=True))
                rows.append(row)
            return rows

    def archive_problems(self, since: float, order: str | None, country: str | None) -> list[tuple[Any, ...]]:
        """Every archived leak and overblock since a time: (probe, region, country, time, finding, rule, body)."""
        sql = (
            "SELECT probe_id, region, country, time, finding, rule, body FROM archive "
            "WHERE finding IN ('leak', 'overblock') AND time >= ?"
        )
        params: list[Any] = [since]
        if order:
            sql += " AND rule = ?"
            params.append(order)
        if country:
            sql += " AND country = ?"
            params.append(country)
        with self.tx() as cur:
            cur.execute(self._sql(sql + " ORDER BY time"), params)
            return [tuple(r) for r in cur.fetchall()]

    def trim_archive(self, older_than: float) -> int:
        """Retention: drop archived measurements older than a time (latest state stays)."""
        with self.tx() as cur:
            cur.execute(self._sql("DELETE FROM archive WHERE time < ?"), (older_than,))
            n = cur.rowcount
            cur.execute(self._sql("DELETE FROM batches WHERE received < ?"), (older_than,))
            cur.execute(self._sql("DELETE FROM address_checks WHERE time < ?"), (older_than,))
            return int(n)

    def close(self) -> None:
        pass


class SqliteStore(Store):
    """The embedded default: one file, WAL, created on first start."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, crash-consistent
        self._lock = threading.Lock()  # one connection, used from the server's worker threads in turn
        self.migrate()

    @contextmanager
    def tx(self) -> Iterator[Any]:
        with self._lock:
            cur = self.db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


class PostgresStore(Store):
    """PostgreSQL through psycopg 3, with a small connection pool: for several collector processes."""

    placeholder = "%s"
    serial = "BIGSERIAL"

    def __init__(self, url: str) -> None:
        from psycopg_pool import ConnectionPool

        self.pool = ConnectionPool(url, min_size=1, max_size=8, open=True, kwargs={"autocommit": False})
        with self.pool.connection() as conn:
            # One migrator at a time, however many collectors start together.
            conn.execute("SELECT pg_advisory_lock(4242)")
            try:
                conn.commit()
                self.migrate()
            finally:
                conn.execute("SELECT pg_advisory_unlock(4242)")
                conn.commit()

    @contextmanager
    def tx(self) -> Iterator[Any]:
        with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            yield cur

    def close(self) -> None:
        self.pool.close()


def open_store(url: str) -> Store:
    """`sqlite:///path/to/file` (or a bare path) or `postgresql://…`."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    path = url.removeprefix("sqlite:///").removeprefix("sqlite://")
    return SqliteStore(Path(path))
