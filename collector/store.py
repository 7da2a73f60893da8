"""Storage: the evidence archive and the latest state per series, on SQLite or PostgreSQL.

One schema and one set of migrations for both; the SQL is written once with `?`
placeholders and portable upserts. The archive keeps every measurement with its raw
wire response; `latest` keeps, per series (probe × resolver × transport × qtype ×
name), the newest measurement and since when its finding has held. Retention trims the
archive only; `latest` is never lost to it.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from collector.reach import PROBLEM_REACH, address_checks_of, reach_of

__all__ = ["COLLECTOR_FIELDS", "SeriesQuotaExceeded", "Store", "StoredBatch", "compliance_of", "open_store"]

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
    # 5: compliance over time (issue 12). On `latest`, what was expected and the order's instants,
    # so a pass can group current series per order; `compliance` keeps per order × country ×
    # resolver × transport what the passes saw (instants only ever move towards what was first
    # seen, so concurrent passes cannot undo each other); `compliance_history` records the
    # counts only when they change, for the timeline.
    """
    ALTER TABLE latest ADD COLUMN expected TEXT;
    ALTER TABLE latest ADD COLUMN effective DOUBLE PRECISION;
    ALTER TABLE latest ADD COLUMN due DOUBLE PRECISION;
    CREATE TABLE compliance (order_id TEXT NOT NULL, country TEXT NOT NULL, resolver TEXT NOT NULL,
                             transport TEXT NOT NULL, effective DOUBLE PRECISION, due DOUBLE PRECISION,
                             first_enforced DOUBLE PRECISION, first_names INTEGER,
                             enforced_since DOUBLE PRECISION, last_leak DOUBLE PRECISION,
                             late_leak DOUBLE PRECISION, lateness DOUBLE PRECISION,
                             max_names INTEGER NOT NULL, enforced INTEGER NOT NULL, leaking INTEGER NOT NULL,
                             inconclusive INTEGER NOT NULL, names_leaking INTEGER NOT NULL,
                             updated DOUBLE PRECISION NOT NULL,
                             PRIMARY KEY (order_id, country, resolver, transport));
    CREATE INDEX compliance_updated ON compliance (updated);
    CREATE TABLE compliance_history (time DOUBLE PRECISION NOT NULL, order_id TEXT NOT NULL, country TEXT NOT NULL,
                                     resolver TEXT NOT NULL, transport TEXT NOT NULL, enforced INTEGER NOT NULL,
                                     leaking INTEGER NOT NULL, names_leaking INTEGER NOT NULL);
    CREATE INDEX compliance_history_order ON compliance_history (order_id, time);
    CREATE INDEX compliance_history_time ON compliance_history (time)
    """,
    # 6: answer checks (issue 16): what a user would meet at each series' answer, and each probe's
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
    # 7: the per-domain series are capped in the database (Store.capped_problems): each group's
    # first names in order straight from this index, so a 45,000-name mass leak costs a render
    # the cap's rows per group, not every leaking row (bench/collector_scale.py).
    "CREATE INDEX latest_problems ON latest (finding, probe_id, resolver, transport, rule, domain, qtype)",
    # 8: reads that cost what they show, not what is stored (issue 12, a 45,000-name mass leak).
    # `latest_counts`: the current series per group and minute of their time, kept by the ingest
    # (each upsert moves a series from its old group and minute to its new one), so
    # blockprobe_domains, the matrix and the series quota sum a few thousand rows instead of
    # grouping every series (Store.counts_and_reach). Empty strings stand for NULL in the key.
    # `resolvers`: each resolver's operator and kind, for display, instead of an archive scan.
    # `latest_names`: the status page and /api/v1/findings page through current problems in name
    # order. `latest_reach` is rebuilt in group order, so the reach series are capped like the leaks.
    """
    CREATE TABLE latest_counts (bucket BIGINT NOT NULL, probe_id TEXT NOT NULL, region TEXT NOT NULL,
                                country TEXT NOT NULL, resolver TEXT NOT NULL, transport TEXT NOT NULL,
                                rule TEXT NOT NULL, finding TEXT NOT NULL, reach TEXT NOT NULL,
                                series BIGINT NOT NULL, answered BIGINT NOT NULL, latency_us BIGINT NOT NULL,
                                latencies BIGINT NOT NULL,
                                PRIMARY KEY (bucket, probe_id, region, country, resolver, transport, rule, finding, reach));
    INSERT INTO latest_counts (bucket, probe_id, region, country, resolver, transport, rule, finding, reach, series,
                               answered, latency_us, latencies)
        SELECT {bucket}, probe_id, region, country, resolver, transport, COALESCE(rule, ''), COALESCE(finding, ''),
               COALESCE(reach, ''), count(*), sum(CASE WHEN outcome IN ('timeout', 'error') THEN 0 ELSE 1 END),
               COALESCE(sum({micros}), 0), count(latency_ms)
        FROM latest GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9;
    CREATE INDEX latest_counts_probe ON latest_counts (probe_id, bucket);
    CREATE TABLE resolvers (resolver TEXT PRIMARY KEY, operator TEXT, kind TEXT, time DOUBLE PRECISION NOT NULL);
    CREATE INDEX latest_names ON latest (finding, country, domain, qtype, resolver, transport, probe_id, rule, time);
    DROP INDEX latest_reach;
    CREATE INDEX latest_reach ON latest (reach, probe_id, resolver, transport, rule, finding, domain, qtype)
    """,
]

# `latest_counts` buckets: a series counts in the minute of its time. Reads sum whole minutes
# after the staleness boundary and count the boundary minute's own rows exactly.
BUCKET = 60

# Keys of an evidence row that the collector sets: a measurement's own keys never override them.
COLLECTOR_FIELDS = ("id", "batch_id", "probe", "region", "country", "received")

_SERIES = ("probe_id", "resolver", "transport", "qtype", "domain")

# What a compliance pass observes per order × country × resolver × transport (collector/compliance.py).
_COMPLIANCE_OBSERVED = (
    "effective",
    "due",
    "first_enforced",
    "first_names",
    "enforced_since",
    "last_leak",
    "late_leak",
    "max_names",
    "enforced",
    "leaking",
    "inconclusive",
    "names_leaking",
)


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


def _instant(value: Any) -> float | None:
    """An `expected_by` instant (RFC 3339 with an offset, or a date: 00:00 UTC) as seconds; None when
    it is anything else, so that a probe's odd value costs a compliance figure, never the batch."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        if len(value) != 10:
            return None  # a time without an offset is ambiguous; only a bare date means 00:00 UTC
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def compliance_of(m: dict[str, Any]) -> tuple[str | None, float | None, float | None]:
    """(expected, the binding order's effective instant, its due instant) for the `latest` row."""
    expected = m.get("expected")
    why = m.get("expected_by") or (m.get("evidence") or {}).get("expected_by")
    if "clock_clamped_from" in m:
        # The probe's clock ran ahead and its time was replaced by ours: this measurement's
        # instant proves nothing about a deadline (collector/compliance.py).
        return (expected if isinstance(expected, str) else None), None, None
    if expected != "blocked" or not isinstance(why, dict):
        return (expected if isinstance(expected, str) else None), None, None
    return expected, _instant(why.get("effective")), _instant(why.get("due"))


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


def _operator_kind(m: dict[str, Any]) -> tuple[str | None, str | None]:
    operator, kind = m.get("operator"), m.get("kind")
    return (
        operator[:128] if isinstance(operator, str) and operator else None,
        kind[:32] if isinstance(kind, str) and kind else None,
    )


# The largest latency a count adds up (an hour): a probe's absurd value must not overflow the
# 64-bit sums of latest_counts (and break every render); no real query waits that long.
MAX_COUNTED_LATENCY_MS = 3_600_000.0
_CLAMPED_LATENCY = (
    f"CASE WHEN latency_ms > {MAX_COUNTED_LATENCY_MS} THEN {MAX_COUNTED_LATENCY_MS} ELSE latency_ms END"
)


def _micros(latency_ms: Any) -> int:
    """A latency in whole microseconds, rounded as the dialects' `micros_sql` rounds it, so that
    what the ingest adds to a count it can later take away exactly."""
    return math.floor(min(float(latency_ms), MAX_COUNTED_LATENCY_MS) * 1000 + 0.5)


# A `latest` row's part in latest_counts: (bucket, probe, region, country, resolver, transport, rule,
# finding, reach) → (series, answered, latency µs, latencies).
_CountKey = tuple[Any, ...]


def _count_of(
    pid: str, resolver: str, transport: str, row: Sequence[Any]
) -> tuple[_CountKey, tuple[int, ...]]:
    """`row` = (time, region, country, rule, finding, reach, outcome, latency_ms)."""
    t, region, country, rule, finding, reach, outcome, latency = row
    key = (
        int(t // BUCKET),
        pid,
        region,
        country,
        resolver,
        transport,
        rule or "",
        finding or "",
        reach or "",
    )
    answered = 0 if outcome in ("timeout", "error") else 1
    return key, (1, answered, 0 if latency is None else _micros(latency), 0 if latency is None else 1)


class Store:
    """Shared by both databases; subclasses provide connections and the dialect."""

    placeholder = "?"
    serial = "INTEGER"
    # A time's latest_counts bucket and a latency's microseconds, in SQL (migration 8), as
    # `_count_of` computes them in Python.
    bucket_sql = f"CAST(time / {BUCKET} AS INTEGER)"
    micros_sql = f"CAST(({_CLAMPED_LATENCY}) * 1000 + 0.5 AS INTEGER)"
    # Run at the start of a batch's transaction on PostgreSQL: one probe's batches are stored one at
    # a time, even by several collectors, so what a batch's count deltas are computed from (its
    # keys' old rows, all of them this probe's) cannot change before its upsert; no row locks needed.
    probe_lock: str | None = None
    # Run before a recount on PostgreSQL, so that no ingest changes the counts while they are rebuilt.
    recount_lock: str | None = None
    # Bumped on every token change made through this object, so this process's token cache
    # sees a revocation at once (another process's change is seen at the cache's next refresh).
    token_generation = 0

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    @contextmanager
    def tx(self) -> Iterator[Any]:  # pragma: no cover - overridden
        raise NotImplementedError
        yield

    @contextmanager
    def read(self) -> Iterator[Any]:
        """A transaction that only reads: where the database allows, it runs beside the writer."""
        with self.tx() as cur:
            yield cur

    def migrate(self) -> None:
        with self.tx() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cur.execute("SELECT version FROM schema_version")
            row = cur.fetchone()
            version = row[0] if row else 0
            for i, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                sql = migration.format(serial=self.serial_pk, bucket=self.bucket_sql, micros=self.micros_sql)
                for statement in filter(str.strip, sql.split(";")):
                    cur.execute(statement)
                if i == 8:
                    self._fill_resolvers(cur)
                cur.execute(self._sql("DELETE FROM schema_version"))
                cur.execute(self._sql("INSERT INTO schema_version (version) VALUES (?)"), (i,))

    @property
    def serial_pk(self) -> str:
        return self.serial

    def _fill_resolvers(self, cur: Any) -> None:
        """Migration 8: each resolver's operator and kind from its newest archived measurement,
        once; the ingest keeps the table from then on."""
        cur.execute(
            "SELECT body, time FROM archive WHERE id IN (SELECT max(id) FROM archive GROUP BY resolver)"
        )
        rows = []
        for body, t in cur.fetchall():
            m = json.loads(body)
            rows.append((m["resolver"], *_operator_kind(m), t))
        cur.executemany(
            self._sql("INSERT INTO resolvers (resolver, operator, kind, time) VALUES (?, ?, ?, ?)"), rows
        )

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
                *compliance_of(m),
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
            if self.probe_lock:
                cur.execute(self._sql(self.probe_lock), (pid,))
            old = self._old_rows(cur, list(latest))
            if max_series is not None:
                # Counted before the upsert, so the batch's keys already there are not counted twice.
                limit, since = max_series
                current = self._series_count(cur, pid, since)
                new = sum(1 for k in latest if k not in old or old[k][0] < since)
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
                    "finding, rule, latency_ms, answers, since, rule_kind, expected, effective, due, reach) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT (probe_id, resolver, transport, qtype, domain) DO UPDATE SET "
                    "region = excluded.region, country = excluded.country, time = excluded.time, "
                    "outcome = excluded.outcome, finding = excluded.finding, rule = excluded.rule, "
                    "latency_ms = excluded.latency_ms, answers = excluded.answers, rule_kind = excluded.rule_kind, "
                    "expected = excluded.expected, effective = excluded.effective, due = excluded.due, "
                    "reach = excluded.reach, "
                    "since = CASE WHEN COALESCE(latest.finding, '') = COALESCE(excluded.finding, '') "
                    "THEN latest.since ELSE excluded.since END "
                    "WHERE excluded.time >= latest.time"
                ),
                list(latest.values()),
            )
            self._move_counts(cur, pid, latest, old)
            self._note_resolvers(cur, measurements)
            self._record_leaks(cur, country, measurements)
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

    def _record_leaks(self, cur: Any, country: str, measurements: Sequence[dict[str, Any]]) -> None:
        """Every leak of a binding order, as it is stored, into its compliance key: the latest leak
        and how long after its due instant it was measured. A leak fixed before the next compliance
        pass, or sent late from a probe's spool, still counts towards the deadline verdict."""
        leaks: dict[tuple[str, str, str, str], tuple[float, float | None]] = {}
        for m in measurements:
            if m.get("finding") != "leak":
                continue
            rule = rule_of(m)
            if rule is None or rule == "canary":
                continue
            t = parse_time(m["time"])
            due = compliance_of(m)[2]
            late = None if due is None else t - due
            key = (rule, country, m["resolver"], m["transport"])
            old_t, old_late = leaks.get(key, (t, late))
            worst = late if old_late is None else (old_late if late is None else max(late, old_late))
            leaks[key] = (max(t, old_t), worst)
        if not leaks:
            return
        cur.executemany(
            self._sql(
                "INSERT INTO compliance (order_id, country, resolver, transport, last_leak, lateness, max_names, "
                "enforced, leaking, inconclusive, names_leaking, updated) VALUES (?,?,?,?,?,?,0,0,0,0,0,0) "
                "ON CONFLICT (order_id, country, resolver, transport) DO UPDATE SET "
                "last_leak = CASE WHEN compliance.last_leak IS NULL OR excluded.last_leak > compliance.last_leak "
                "THEN excluded.last_leak ELSE compliance.last_leak END, "
                "lateness = CASE WHEN compliance.lateness IS NULL OR excluded.lateness > compliance.lateness "
                "THEN COALESCE(excluded.lateness, compliance.lateness) ELSE compliance.lateness END"
            ),
            # In key order, as the compliance pass writes: concurrent writers never wait on each other in a cycle.
            [(*k, t, late) for k, (t, late) in sorted(leaks.items())],
        )

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

    def _old_rows(self, cur: Any, keys: list[tuple[str, ...]]) -> dict[tuple[str, ...], tuple[Any, ...]]:
        """The stored rows of a batch's series keys: key → (time, region, country, rule, finding,
        reach, outcome, latency_ms), one indexed read per chunk of keys."""
        out: dict[tuple[str, ...], tuple[Any, ...]] = {}
        for i in range(0, len(keys), 1000):
            chunk = keys[i : i + 1000]
            values = ", ".join("(?, ?, ?, ?, ?)" for _ in chunk)
            cur.execute(
                self._sql(
                    "SELECT l.probe_id, l.resolver, l.transport, l.qtype, l.domain, l.time, l.region, l.country, "
                    f"l.rule, l.finding, l.reach, l.outcome, l.latency_ms FROM (VALUES {values}) AS v "
                    "CROSS JOIN latest l WHERE l.probe_id = v.column1 AND l.resolver = v.column2 "
                    "AND l.transport = v.column3 AND l.qtype = v.column4 AND l.domain = v.column5"
                ),
                [part for key in chunk for part in key],
            )
            for row in cur.fetchall():
                out[tuple(row[:5])] = tuple(row[5:])
        return out

    def _move_counts(
        self,
        cur: Any,
        pid: str,
        latest: dict[tuple[str, ...], tuple[Any, ...]],
        old: dict[tuple[str, ...], tuple[Any, ...]],
    ) -> None:
        """Keep latest_counts in step with the upsert just made: each series the upsert replaced
        leaves its old group and minute, and counts in its new one."""
        deltas: dict[_CountKey, list[int]] = {}

        def add(key: _CountKey, value: tuple[int, ...], sign: int) -> None:
            held = deltas.setdefault(key, [0, 0, 0, 0])
            for i, v in enumerate(value):
                held[i] += sign * v

        for key, row in latest.items():
            before = old.get(key)
            if before is not None:
                if before[0] > row[7]:
                    continue  # the upsert kept the newer row
                add(*_count_of(pid, key[1], key[2], before), -1)
            add(
                *_count_of(
                    pid, key[1], key[2], (row[7], row[5], row[6], row[10], row[9], row[18], row[8], row[11])
                ),
                1,
            )
        # In key order, so that two writers never wait on each other in a cycle (PostgreSQL).
        changes = sorted((k, v) for k, v in deltas.items() if any(v))
        if not changes:
            return
        cur.executemany(
            self._sql(
                "INSERT INTO latest_counts (bucket, probe_id, region, country, resolver, transport, rule, finding, "
                "reach, series, answered, latency_us, latencies) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (bucket, probe_id, region, country, resolver, transport, rule, finding, reach) "
                "DO UPDATE SET series = latest_counts.series + excluded.series, "
                "answered = latest_counts.answered + excluded.answered, "
                "latency_us = latest_counts.latency_us + excluded.latency_us, "
                "latencies = latest_counts.latencies + excluded.latencies"
            ),
            [(*k, *v) for k, v in changes],
        )
        emptied = [k for k, v in changes if v[0] < 0]
        if emptied:
            cur.executemany(
                self._sql(
                    "DELETE FROM latest_counts WHERE bucket = ? AND probe_id = ? AND region = ? AND country = ? "
                    "AND resolver = ? AND transport = ? AND rule = ? AND finding = ? AND reach = ? AND series <= 0"
                ),
                emptied,
            )

    def recount(self) -> int:
        """Rebuild latest_counts from `latest` in one transaction (what migration 8 did); returns
        the number of current series counted. The ingest keeps the counts exact by itself; this
        is the repair for a database edited by hand."""
        insert = next(
            st for st in MIGRATIONS[7].split(";") if st.strip().startswith("INSERT INTO latest_counts")
        )
        with self.tx() as cur:
            if self.recount_lock:
                cur.execute(self.recount_lock)
            cur.execute("DELETE FROM latest_counts")
            cur.execute(insert.format(bucket=self.bucket_sql, micros=self.micros_sql))
            cur.execute("SELECT COALESCE(sum(series), 0) FROM latest_counts")
            return int(cur.fetchone()[0])

    def _note_resolvers(self, cur: Any, measurements: Sequence[dict[str, Any]]) -> None:
        """Each resolver's operator and kind as its newest measurement in the batch says."""
        newest: dict[str, tuple[Any, ...]] = {}
        for m in measurements:
            t = parse_time(m["time"])
            held = newest.get(m["resolver"])
            if held is None or held[3] <= t:
                newest[m["resolver"]] = (m["resolver"], *_operator_kind(m), t)
        cur.executemany(
            self._sql(
                "INSERT INTO resolvers (resolver, operator, kind, time) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (resolver) DO UPDATE SET operator = excluded.operator, kind = excluded.kind, "
                "time = excluded.time WHERE excluded.time >= resolvers.time"
            ),
            [newest[r] for r in sorted(newest)],
        )

    def resolvers(self) -> dict[str, tuple[str | None, str | None]]:
        """resolver → (operator, kind), as their newest measurements said."""
        with self.read() as cur:
            cur.execute("SELECT resolver, operator, kind FROM resolvers")
            return {str(r): (o, k) for r, o, k in cur.fetchall()}

    def _boundary(self, cur: Any, since: float, probe: str | None = None) -> list[tuple[Any, ...]]:
        """The current rows of the minute `since` falls in, grouped as latest_counts groups them:
        the one bucket that whole-bucket sums cannot split at `since`."""
        end = (math.floor(since / BUCKET) + 1) * BUCKET
        # `probe_id || ''` (no index on it): read the rows of that minute by time, not every row of the probe.
        by_probe = "" if probe is None else " AND probe_id || '' = ?"
        cur.execute(
            self._sql(
                "SELECT probe_id, region, country, resolver, transport, COALESCE(rule, ''), COALESCE(finding, ''), "
                "COALESCE(reach, ''), count(*), sum(CASE WHEN outcome IN ('timeout', 'error') THEN 0 ELSE 1 END), "
                f"COALESCE(sum({self.micros_sql}), 0), count(latency_ms) FROM latest "
                f"WHERE time >= ? AND time < ?{by_probe} GROUP BY 1, 2, 3, 4, 5, 6, 7, 8"
            ),
            (since, end) if probe is None else (since, end, probe),
        )
        return [tuple(r) for r in cur.fetchall()]

    def _series_count(self, cur: Any, pid: str, since: float) -> int:
        """The probe's current series (reported at or after `since`)."""
        cur.execute(
            self._sql("SELECT COALESCE(sum(series), 0) FROM latest_counts WHERE probe_id = ? AND bucket > ?"),
            (pid, math.floor(since / BUCKET)),
        )
        whole = int(cur.fetchone()[0])
        return whole + sum(int(r[8]) for r in self._boundary(cur, since, pid))

    def groups(self, probe_id: str, since: float) -> list[tuple[str, str, str]]:
        """The probe's current (resolver, transport, rule) groups: seeds the ingest's group quota."""
        with self.tx() as cur:
            cur.execute(
                self._sql(
                    "SELECT DISTINCT resolver, transport, rule FROM latest_counts "
                    "WHERE probe_id = ? AND bucket > ? AND series > 0"
                ),
                (probe_id, math.floor(since / BUCKET)),
            )
            found = {(str(a), str(b), str(c)) for a, b, c in cur.fetchall()}
            found.update((str(r[3]), str(r[4]), str(r[5])) for r in self._boundary(cur, since, probe_id))
            return sorted(found)

    # reading ---------------------------------------------------------------------------
    def current(self, since: float) -> list[dict[str, Any]]:
        """Latest rows reported at or after `since` (the staleness window), with their probe's region."""
        with self.read() as cur:
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
        with self.read() as cur:
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

    def capped_problems(
        self, since: float, groups: Sequence[Sequence[Any]], per_group: int
    ) -> list[dict[str, Any]]:
        """The first `per_group` current rows by (domain, qtype) of each group, a group being
        (probe, region, country, resolver, transport, rule, finding) as `counts` gives it: the
        per-domain series of docs/metrics.md, read through the latest_problems index so
        that a group's cost is its cap, however many names it holds."""
        out: list[dict[str, Any]] = []
        with self.read() as cur:
            for probe, region, country, resolver, transport, rule, finding in groups:
                # `rule = NULL` matches nothing; IS NULL keeps the index's order as well. `+time`
                # keeps SQLite's planner off latest_finding (finding, time), which would read the
                # whole group and sort it (90 ms a group at 4,500 names × 9 per probe).
                by_rule = "rule IS NULL" if rule is None else "rule = ?"
                cur.execute(
                    self._sql(
                        "SELECT probe_id, resolver, transport, qtype, domain, region, country, time, outcome, "
                        "finding, rule, answers, since, rule_kind, reach FROM latest "
                        f"WHERE finding = ? AND probe_id = ? AND resolver = ? AND transport = ? AND {by_rule} "
                        "AND region = ? AND country = ? AND +time >= ? ORDER BY domain, qtype LIMIT ?"
                    ),
                    (
                        finding,
                        probe,
                        resolver,
                        transport,
                        *(() if rule is None else (rule,)),
                        region,
                        country,
                        since,
                        per_group,
                    ),
                )
                cols = [d[0] for d in cur.description]
                out.extend(dict(zip(cols, r, strict=True)) for r in cur.fetchall())
        return out

    # paging through current problems (the status page, /api/v1/findings) ---------------
    # Every read below walks latest_names in its order from a cursor and stops at its limit, so a
    # page costs its own rows however many names leak. `+time` keeps the time condition a filter
    # on that walk (SQLite would otherwise read by latest_time and sort).
    _NOT_CANARY = "COALESCE(rule, '') <> 'canary'"

    def problem_names(
        self, since: float, finding: str, after: Sequence[str] | None = None, limit: int = 50
    ) -> list[tuple[str, str, str]]:
        """The first `limit` (country, domain, qtype) with a current `finding` on some resolver, in
        that order, after the name `after`."""
        where = "" if after is None else " AND (country, domain, qtype) > (?, ?, ?)"
        with self.read() as cur:
            cur.execute(
                self._sql(
                    "SELECT DISTINCT country, domain, qtype FROM latest "
                    f"WHERE finding = ? AND +time >= ? AND {self._NOT_CANARY}{where} "
                    "ORDER BY country, domain, qtype LIMIT ?"
                ),
                (finding, since, *(after or ()), limit),
            )
            return [(str(a), str(b), str(c)) for a, b, c in cur.fetchall()]

    def count_names(self, since: float, finding: str, bound: int) -> int:
        """How many (country, domain, qtype) have a current `finding`, counted up to `bound`."""
        with self.read() as cur:
            cur.execute(
                self._sql(
                    "SELECT count(*) FROM (SELECT DISTINCT country, domain, qtype FROM latest "
                    f"WHERE finding = ? AND +time >= ? AND {self._NOT_CANARY} "
                    "ORDER BY country, domain, qtype LIMIT ?) AS names"
                ),
                (finding, since, bound),
            )
            return int(cur.fetchone()[0])

    def problems_of(
        self, since: float, finding: str, names: Sequence[tuple[str, str, str]]
    ) -> list[dict[str, Any]]:
        """Every current series with `finding` of these (country, domain, qtype)."""
        if not names:
            return []
        values = ", ".join("(?, ?, ?)" for _ in names)
        with self.read() as cur:
            cur.execute(
                self._sql(
                    "SELECT l.probe_id, l.resolver, l.transport, l.qtype, l.domain, l.region, l.country, l.time, "
                    "l.outcome, l.finding, l.rule, l.answers, l.since, l.rule_kind, l.reach "
                    f"FROM (VALUES {values}) AS v CROSS JOIN latest l WHERE l.finding = ? AND l.country = v.column1 "
                    "AND l.domain = v.column2 AND l.qtype = v.column3 "
                    "AND +l.time >= ? AND COALESCE(l.rule, '') <> 'canary' "
                    "ORDER BY l.country, l.domain, l.qtype, l.resolver, l.transport, l.probe_id"
                ),
                (*(part for name in names for part in name), finding, since),
            )
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    # The order /api/v1/findings pages in, and what its cursor holds.
    SERIES_ORDER = ("country", "domain", "qtype", "resolver", "transport", "probe_id")

    def problem_series(
        self,
        since: float,
        finding: str,
        after: Sequence[str] | None = None,
        limit: int = 1000,
        **where: str | None,
    ) -> list[dict[str, Any]]:
        """The first `limit` current series with `finding`, in SERIES_ORDER, after the series
        `after` (its SERIES_ORDER values); `where` narrows by country, resolver, transport,
        probe_id or rule."""
        sql = (
            "SELECT probe_id, region, country, resolver, transport, qtype, domain, finding, rule, rule_kind, "
            "outcome, answers, reach, since, time FROM latest "
            f"WHERE finding = ? AND +time >= ? AND {self._NOT_CANARY}"
        )
        params: list[Any] = [finding, since]
        for column, value in where.items():
            if value is not None:
                if column not in ("country", "resolver", "transport", "probe_id", "rule"):
                    raise ValueError(f"no filter on {column}")
                sql += f" AND {column} = ?"
                params.append(value)
        order = ", ".join(self.SERIES_ORDER)
        if after is not None:
            sql += f" AND ({order}) > (?, ?, ?, ?, ?, ?)"
            params.extend(after)
        sql += f" ORDER BY {order} LIMIT ?"
        with self.read() as cur:
            cur.execute(self._sql(sql), (*params, limit))
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    # reach (issue 16) ------------------------------------------------------------------
    def reach_problems(self, since: float) -> list[dict[str, Any]]:
        """Current series of names with an expectation whose answer a user could not use as the
        site (reach http_451, blockpage, tls_error, unreachable): blockprobe_reach. Enforced series
        are left out: a blocked name whose answer leads to a block page is the order working, and
        an ISP with a block page no fingerprint knows would otherwise fill the cap on every group."""
        marks = ", ".join("?" for _ in PROBLEM_REACH)
        with self.read() as cur:
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

    def capped_reach(
        self, since: float, groups: Sequence[Sequence[Any]], per_group: int
    ) -> list[dict[str, Any]]:
        """The first `per_group` current rows by (domain, qtype) of each (probe, region, country,
        resolver, transport, rule, finding, reach) group, through the latest_reach index."""
        out: list[dict[str, Any]] = []
        with self.read() as cur:
            for probe, region, country, resolver, transport, rule, finding, reach in groups:
                by_rule = "rule IS NULL" if rule is None else "rule = ?"
                cur.execute(
                    self._sql(
                        "SELECT probe_id, region, country, resolver, transport, qtype, domain, finding, rule, reach "
                        f"FROM latest WHERE reach = ? AND probe_id = ? AND resolver = ? AND transport = ? AND {by_rule} "
                        "AND finding = ? AND region = ? AND country = ? AND +time >= ? ORDER BY domain, qtype LIMIT ?"
                    ),
                    (
                        reach,
                        probe,
                        resolver,
                        transport,
                        *(() if rule is None else (rule,)),
                        finding,
                        region,
                        country,
                        since,
                        per_group,
                    ),
                )
                cols = [d[0] for d in cur.description]
                out.extend(dict(zip(cols, r, strict=True)) for r in cur.fetchall())
        return out

    def reach_counts(self, since: float) -> list[tuple[Any, ...]]:
        """(probe, region, country, resolver, transport, rule, finding, reach, series) over the current
        series of names with an expectation; a series from before reach was kept counts as unchecked."""
        return self.counts_and_reach(since)[1]

    def address_check_rows(self, since: float) -> list[tuple[Any, ...]]:
        """Every check since `since` of an (order, name, address) that some probe in an ordering
        country failed to connect to since then: (probe, country, side, order, name, address, time,
        status, result). Only what could make an inference is read, so the cost follows what fails."""
        with self.read() as cur:
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

    def counts(self, since: float) -> list[tuple[Any, ...]]:
        """One pass over the current series: (probe, region, country, resolver, transport, rule, finding,
        series, answered, latency sum ms, latency count)."""
        return self.counts_and_reach(since)[0]

    def counts_and_reach(self, since: float) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """`counts`, and `reach_counts`, from latest_counts: whole minutes after `since` summed, the
        minute `since` falls in counted row by row, so the figures are exact and cost the number
        of groups × minutes, not the number of series."""
        with self.read() as cur:
            cur.execute(
                self._sql(
                    "SELECT probe_id, region, country, resolver, transport, rule, finding, reach, sum(series), "
                    "sum(answered), sum(latency_us), sum(latencies) FROM latest_counts WHERE bucket > ? "
                    "GROUP BY probe_id, region, country, resolver, transport, rule, finding, reach"
                ),
                (math.floor(since / BUCKET),),
            )
            rows = [tuple(r) for r in cur.fetchall()]
            rows.extend(self._boundary(cur, since))
        merged: dict[tuple[Any, ...], list[int]] = {}
        for *key, r, n, answered, micros, lat_n in rows:
            held = merged.setdefault((*key, r or "unchecked"), [0, 0, 0, 0])
            held[0] += int(n)
            held[1] += int(answered)
            held[2] += int(micros)
            held[3] += int(lat_n)
        counts: dict[tuple[Any, ...], list[Any]] = {}
        reach = []
        for (probe, region, country, resolver, transport, rule, finding, r), (
            n,
            answered,
            micros,
            lat_n,
        ) in sorted(merged.items()):
            if n <= 0:
                continue
            group = (probe, region, country, resolver, transport, rule or None, finding or None)
            held = counts.setdefault(group, [0, 0, 0, 0])
            held[0] += n
            held[1] += answered
            held[2] += micros
            held[3] += lat_n
            if finding and rule != "canary":
                reach.append((*group, r, n))
        return [
            (*k, n, answered, micros / 1000 if lat_n else None, lat_n)
            for k, (n, answered, micros, lat_n) in counts.items()
        ], reach

    def probes(self) -> list[dict[str, Any]]:
        with self.read() as cur:
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
        with self.read() as cur:
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
        with self.read() as cur:
            cur.execute(self._sql(sql + " ORDER BY time"), params)
            return [tuple(r) for r in cur.fetchall()]

    # compliance over time (issue 12) ---------------------------------------------------
    # Held for the whole pass on PostgreSQL, so two collectors' passes take turns (SQLite's
    # BEGIN IMMEDIATE already serialises them); the upsert below is safe without it too.
    compliance_lock: str | None = None

    def refresh_compliance(
        self,
        since: float,
        now: float,
        observe: Callable[[dict[str, Any]], dict[str, Any]],
        margin: float = 0.0,
    ) -> int:
        """One compliance pass in one transaction: group the current series of binding orders per
        order × country × resolver × transport, turn each group into an observation (`observe`),
        fold it into `compliance` and record changed counts in `compliance_history`. A leak is
        late (proof of a missed deadline) only when measured more than `margin` seconds after its
        due instant, by a clock the collector did not have to correct.

        Instants only move towards what was first seen (the earliest enforcement, the latest
        leak, the most names), and the current counts only from a newer pass, so a pass that
        runs late or twice cannot undo another's. Returns the number of groups.
        """
        if self.compliance_lock:
            with self.tx() as cur:
                cur.execute(self.compliance_lock)
                groups = self._compliance_groups(cur, since)
                self._fold_compliance(cur, groups, now, observe, margin)
        else:
            # The long read (every current series of every binding order) beside the writer, then a
            # short write: the ingest waits for the fold, never for the scan.
            with self.read() as cur:
                groups = self._compliance_groups(cur, since)
            with self.tx() as cur:
                self._fold_compliance(cur, groups, now, observe, margin)
        return len(groups)

    def _compliance_groups(self, cur: Any, since: float) -> list[dict[str, Any]]:
        cur.execute(
            self._sql(
                "SELECT rule, country, resolver, transport, "
                "sum(CASE WHEN finding = 'enforced' THEN 1 ELSE 0 END), "
                "sum(CASE WHEN finding = 'leak' THEN 1 ELSE 0 END), "
                "sum(CASE WHEN finding = 'inconclusive' THEN 1 ELSE 0 END), "
                "count(DISTINCT CASE WHEN finding = 'leak' THEN domain END), "
                "count(DISTINCT CASE WHEN finding IN ('enforced', 'leak') THEN domain END), "
                "max(CASE WHEN finding = 'enforced' THEN since END), "
                "max(CASE WHEN finding = 'leak' THEN time END), max(effective), max(due) "
                "FROM latest WHERE time >= ? AND rule IS NOT NULL AND rule <> 'canary' "
                "AND (finding IN ('enforced', 'leak') OR (finding = 'inconclusive' AND expected = 'blocked')) "
                "GROUP BY rule, country, resolver, transport"
            ),
            (since,),
        )
        names = (
            *("order_id", "country", "resolver", "transport", "enforced", "leaking", "inconclusive"),
            *("names_leaking", "names", "enforced_at", "last_leak", "effective", "due"),
        )
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def _fold_compliance(
        self,
        cur: Any,
        groups: list[dict[str, Any]],
        now: float,
        observe: Callable[[dict[str, Any]], dict[str, Any]],
        margin: float,
    ) -> None:
        cur.execute(
            "SELECT order_id, country, resolver, transport, enforced, leaking, names_leaking, lateness, due "
            "FROM compliance"
        )
        before = {tuple(r[:4]): (tuple(int(v) for v in r[4:7]), r[7], r[8]) for r in cur.fetchall()}
        rows, history = [], []
        for g in groups:
            for k in ("enforced", "leaking", "inconclusive", "names_leaking", "names"):
                g[k] = int(g[k] or 0)
            key = (g["order_id"], g["country"], g["resolver"], g["transport"])
            counts, lateness, due = before.get(key, (None, None, None))
            due = g["due"] if g["due"] is not None else due
            # Proof of a miss: a leak (any, as ingested) measured more than `margin` after its due.
            g["late_leak"] = None
            if lateness is not None and due is not None and lateness > margin:
                g["late_leak"] = float(due) + float(lateness)
            o = observe(g)
            rows.append((*key, *(o[c] for c in _COMPLIANCE_OBSERVED), now))
            counts_now = (g["enforced"], g["leaking"], g["names_leaking"])
            if counts != counts_now:
                history.append((now, *key, *counts_now))
        rows.sort(key=lambda r: r[:4])  # key order, as the ingest writes (no lock cycles)
        cur.executemany(
            self._sql(
                f"INSERT INTO compliance (order_id, country, resolver, transport, {', '.join(_COMPLIANCE_OBSERVED)}, "
                f"updated) VALUES ({', '.join('?' * (len(_COMPLIANCE_OBSERVED) + 5))}) "
                "ON CONFLICT (order_id, country, resolver, transport) DO UPDATE SET "
                "effective = COALESCE(excluded.effective, compliance.effective), "
                "due = COALESCE(excluded.due, compliance.due), "
                "first_enforced = CASE WHEN compliance.first_enforced IS NULL "
                "OR excluded.first_enforced < compliance.first_enforced "
                "THEN COALESCE(excluded.first_enforced, compliance.first_enforced) ELSE compliance.first_enforced END, "
                "first_names = CASE WHEN compliance.first_enforced IS NULL "
                "OR excluded.first_enforced < compliance.first_enforced "
                "THEN COALESCE(excluded.first_names, compliance.first_names) ELSE compliance.first_names END, "
                "last_leak = CASE WHEN compliance.last_leak IS NULL OR excluded.last_leak > compliance.last_leak "
                "THEN COALESCE(excluded.last_leak, compliance.last_leak) ELSE compliance.last_leak END, "
                "late_leak = CASE WHEN compliance.late_leak IS NULL OR excluded.late_leak > compliance.late_leak "
                "THEN COALESCE(excluded.late_leak, compliance.late_leak) ELSE compliance.late_leak END, "
                "max_names = CASE WHEN excluded.max_names > compliance.max_names "
                "THEN excluded.max_names ELSE compliance.max_names END, "
                + ", ".join(
                    f"{c} = CASE WHEN excluded.updated >= compliance.updated THEN excluded.{c} ELSE compliance.{c} END"
                    for c in ("enforced_since", "enforced", "leaking", "inconclusive", "names_leaking")
                )
                + ", updated = CASE WHEN excluded.updated > compliance.updated THEN excluded.updated "
                "ELSE compliance.updated END"
            ),
            rows,
        )
        cur.executemany(
            self._sql(
                "INSERT INTO compliance_history (time, order_id, country, resolver, transport, enforced, leaking, "
                "names_leaking) VALUES (?,?,?,?,?,?,?,?)"
            ),
            history,
        )

    def compliance(self, since: float | None = None, order: str | None = None) -> list[dict[str, Any]]:
        """Compliance rows: those a pass saw at or after `since` (None: every one), of one order or all."""
        sql = f"SELECT order_id, country, resolver, transport, {', '.join(_COMPLIANCE_OBSERVED)}, updated FROM compliance"
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            where.append("updated >= ?")
            params.append(since)
        if order is not None:
            where.append("order_id = ?")
            params.append(order)
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self.read() as cur:
            cur.execute(self._sql(sql + " ORDER BY order_id, country, resolver, transport"), params)
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def compliance_history(
        self, orders: Sequence[str], since: float | None = None, limit: int = 100_000
    ) -> list[dict[str, Any]]:
        """The recorded changes of these orders' counts, oldest first (the newest `limit` of them)."""
        if not orders:
            return []
        sql = (
            "SELECT time, order_id, country, resolver, transport, enforced, leaking, names_leaking "
            f"FROM compliance_history WHERE order_id IN ({', '.join('?' for _ in orders)})"
        )
        params: list[Any] = list(orders)
        if since is not None:
            sql += " AND time >= ?"
            params.append(since)
        with self.read() as cur:
            cur.execute(self._sql(sql + " ORDER BY time DESC LIMIT ?"), (*params, limit))
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in reversed(cur.fetchall())]

    def trim_archive(self, older_than: float) -> int:
        """Retention: drop archived measurements and compliance changes older than a time (the latest
        state and each key's compliance stay)."""
        with self.tx() as cur:
            cur.execute(self._sql("DELETE FROM archive WHERE time < ?"), (older_than,))
            n = cur.rowcount
            cur.execute(self._sql("DELETE FROM batches WHERE received < ?"), (older_than,))
            cur.execute(self._sql("DELETE FROM compliance_history WHERE time < ?"), (older_than,))
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
        # Reads get connections of their own, one per thread: in WAL mode a reader sees the last
        # commit and neither waits for the writer nor holds it up, nor waits for another reader,
        # so a compliance pass reading a mass leak stalls neither the ingest nor a render.
        self.path = path
        self._readers = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._opened_lock = threading.Lock()

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

    @contextmanager
    def read(self) -> Iterator[Any]:
        reader = getattr(self._readers, "db", None)
        if reader is None:
            reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._readers.db = reader
            with self._opened_lock:
                self._opened.append(reader)
        cur = reader.cursor()
        cur.execute("BEGIN")
        try:
            yield cur
        finally:
            cur.execute("ROLLBACK")  # nothing to keep; ends the snapshot

    def close(self) -> None:
        with self._opened_lock:
            for reader in self._opened:
                reader.close()
            self._opened.clear()
        self.db.close()


class PostgresStore(Store):
    """PostgreSQL through psycopg 3, with a small connection pool: for several collector processes."""

    placeholder = "%s"
    serial = "BIGSERIAL"
    bucket_sql = f"CAST(floor(time / {BUCKET}) AS BIGINT)"
    micros_sql = f"CAST(floor(({_CLAMPED_LATENCY}) * 1000 + 0.5) AS BIGINT)"
    # The two-key form: a key space of its own, apart from the one-key locks 4242 and 4243.
    probe_lock = "SELECT pg_advisory_xact_lock(4244, hashtext(?))"
    recount_lock = "LOCK TABLE latest_counts IN EXCLUSIVE MODE"
    compliance_lock = "SELECT pg_advisory_xact_lock(4243)"

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
