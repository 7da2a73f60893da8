"""The durable outbox: every measurement is on disk before it is sent, until acknowledged.

SQLite in WAL mode with synchronous=FULL, so a committed row survives `kill -9` and
power loss. Rows are grouped into batches with a stable id the first time they are
offered; a batch keeps its id and its rows through every retry and restart, so the
collector (which stores a batch id once) never sees the same results as two batches.
A batch leaves only when acknowledged, or when the collector refuses what is in it for
good: then it is divided until the refused measurements stand alone, and those go to a
quarantine table (kept, counted, exportable, re-sendable), never blocking the rest.

The spool is bounded: when full, unbatched rows go first, oldest and least important
first (ok/enforced, then inconclusive, then leaks and overblocks last); every drop is
counted and logged. Depth and lifetime counts are kept as running numbers (no count(*)
per write), and the lifetime counts (written, pushed, quarantined) persist in `meta`, so
they only grow, across restarts.

`Spool` is synchronous and used from one thread at a time; the daemon runs it on its own
writer thread (`SpoolThread`), so fsyncs never stall the event loop that times queries.
`ReadOnlySpool` is for `probe status` and `probe spool export`: it never writes, never
runs the schema and never creates the WAL files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import math
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

__all__ = ["COUNTERS", "Batch", "Quarantined", "ReadOnlySpool", "Spool", "SpoolThread", "encode"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Lower drops first. Leaks and overblocks are the evidence users act on: they go last.
_PRIORITY = {None: 0, "ok": 0, "enforced": 0, "inconclusive": 1, "leak": 2, "overblock": 2}

# Lifetime counts kept in `meta`; they only grow.
COUNTERS = (
    "written_total",
    "pushed_total",
    "quarantined_total",
    "dropped_total",
    "unclean_starts_total",
    "rounds_total",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  created REAL NOT NULL,
  priority INTEGER NOT NULL,
  finding TEXT,
  body TEXT NOT NULL,
  batch_id TEXT
);
CREATE INDEX IF NOT EXISTS results_unbatched ON results (batch_id, priority, id);
CREATE TABLE IF NOT EXISTS batches (
  batch_id TEXT PRIMARY KEY,
  created REAL NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt REAL NOT NULL DEFAULT 0,
  last_error TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dropped (finding TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  created REAL NOT NULL,
  quarantined REAL NOT NULL,
  reason TEXT NOT NULL,
  body TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Batch:
    batch_id: str
    attempts: int
    bodies: list[str]  # each measurement's JSON, as stored: sent as is, never decoded on the way

    @property
    def measurements(self) -> list[dict[str, Any]]:
        return [json.loads(b) for b in self.bodies]


@dataclass(frozen=True)
class Quarantined:
    """A measurement the collector refused for good, set aside with the collector's reason."""

    id: int
    quarantined: float
    reason: str
    measurement: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "quarantined": self.quarantined,
            "reason": self.reason,
            "measurement": self.measurement,
        }


def encode(m: dict[str, Any]) -> tuple[str | None, str]:
    """A measurement as the spool stores it: its finding (for the bound) and its JSON."""
    finding = m.get("finding")
    # default=str: a value JSON cannot hold (bytes in some evidence) is kept as text rather
    # than failing the round it came from.
    try:
        body = json.dumps(m, separators=(",", ":"), default=str, allow_nan=False)
    except ValueError:
        # inf or nan from a path no bound foresaw: Python would write Infinity, which the
        # collector refuses (422). Written as null instead, and said in evidence.truncated.
        cut: list[str] = []
        m = _finite(m, "", cut)
        evidence = dict(m.get("evidence") or {})
        evidence["truncated"] = [*(evidence.get("truncated") or []), *cut]
        m["evidence"] = evidence
        body = json.dumps(m, separators=(",", ":"), default=str, allow_nan=False)
    return (finding if isinstance(finding, str) else None), body


def _finite(value: Any, path: str, cut: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        cut.append(f"{path.lstrip('.')}: {value} is not a JSON number, not kept")
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{path}.{k}", cut) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v, f"{path}[{i}]", cut) for i, v in enumerate(value)]
    return value


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


class _Reader:
    """Queries both the live spool and a read-only view answer."""

    db: sqlite3.Connection

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def dropped(self) -> dict[str, int]:
        return {f: n for f, n in self.db.execute("SELECT finding, count FROM dropped")}

    def pending_batches(self) -> list[tuple[str, int, float, str | None]]:
        rows = self.db.execute(
            "SELECT batch_id, attempts, next_attempt, last_error FROM batches ORDER BY created, rowid"
        )
        return [(str(b), int(a), float(n), e) for b, a, n, e in rows]

    def quarantined(self, limit: int | None = None, ids: list[int] | None = None) -> list[Quarantined]:
        """Quarantined measurements, oldest first (all, the first `limit`, or those with `ids`)."""
        sql = "SELECT id, quarantined, reason, body FROM quarantine"
        args: list[Any] = []
        if ids is not None:
            sql += f" WHERE id IN ({','.join('?' * len(ids))})"
            args += ids
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [
            Quarantined(int(i), float(q), str(r), json.loads(b)) for i, q, r, b in self.db.execute(sql, args)
        ]

    def iter_quarantined(self) -> Iterator[Quarantined]:
        """Every quarantined measurement, oldest first, without holding them all in memory."""
        last = 0
        while True:
            rows = self.db.execute(
                "SELECT id, quarantined, reason, body FROM quarantine WHERE id > ? ORDER BY id LIMIT 500",
                (last,),
            ).fetchall()
            if not rows:
                return
            for i, q, r, b in rows:
                yield Quarantined(int(i), float(q), str(r), json.loads(b))
            last = int(rows[-1][0])

    def counters(self) -> dict[str, int]:
        rows = dict(
            self.db.execute(
                f"SELECT key, value FROM meta WHERE key IN ({','.join('?' * len(COUNTERS))})", COUNTERS
            ).fetchall()
        )
        return {k: int(rows.get(k, 0)) for k in COUNTERS}


class Spool(_Reader):
    """One SQLite file in the state directory; used from one thread at a time (the spool thread)."""

    def __init__(self, path: Path, max_rows: int = 500_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_rows = max_rows
        # Built in one thread, used from the spool thread: never from two at once.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(_SCHEMA)
        # The only scans: once per start, so every later write keeps the numbers running.
        self._depth = int(self.db.execute("SELECT count(*) FROM results").fetchone()[0])
        self._quarantine = int(self.db.execute("SELECT count(*) FROM quarantine").fetchone()[0])
        self._counters = self.counters()

    def close(self) -> None:
        self.db.close()

    def _tx(self) -> _Tx:
        return _Tx(self.db)

    def _bump(self, key: str, n: int) -> None:
        """Inside a transaction: add n to a lifetime counter (SQL-side, so another process's
        increments, e.g. `probe spool resend`, are kept too)."""
        row = self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + excluded.value RETURNING value",
            (key, n),
        ).fetchone()
        self._counters[key] = int(row[0])

    # what the daemon reads, kept running -------------------------------------------------
    def depth(self) -> int:
        return self._depth

    def quarantine_depth(self) -> int:
        return self._quarantine

    def totals(self) -> dict[str, int]:
        return dict(self._counters)

    def refresh_quarantine_depth(self) -> int:
        """Recount the quarantine (small, and changed by `probe spool resend` from outside)."""
        self._quarantine = int(self.db.execute("SELECT count(*) FROM quarantine").fetchone()[0])
        return self._quarantine

    # writes ---------------------------------------------------------------------------------
    def mark_start(self) -> bool:
        """Note a start; True when the previous run did not stop cleanly (kill -9, a watchdog
        restart, power loss), which is counted."""
        with self._tx():
            unclean = self.meta("running") == "1"
            if unclean:
                self._bump("unclean_starts_total", 1)
            self.set_meta("running", "1")
        return unclean

    def next_round(self) -> int:
        """The next round's number: a sequence over the probe's life, not the process's."""
        with self._tx():
            self._bump("rounds_total", 1)
        return self._counters["rounds_total"]

    def mark_stop(self) -> None:
        self.set_meta("running", "0")

    def add(self, measurements: list[dict[str, Any]]) -> int:
        """Store measurements durably (one transaction), then enforce the bound; returns rows dropped."""
        return self.add_encoded([encode(m) for m in measurements])

    def add_encoded(self, encoded: list[tuple[str | None, str]]) -> int:
        """Store (finding, JSON) pairs made by `encode`; returns rows dropped by the bound.

        The daemon encodes each measurement on the loop as it comes (tens of microseconds
        each), so this thread runs SQLite, which releases the GIL, instead of holding it
        for a chunk's JSON while the loop waits. Raises only when the rows were not
        committed, so the caller may offer them again without ever storing them twice.
        """
        if not encoded:
            return 0
        now = time.time()
        rows = [(now, _PRIORITY.get(finding, 0), finding, body) for finding, body in encoded]
        with self._tx():
            self.db.executemany(
                "INSERT INTO results (created, priority, finding, body) VALUES (?,?,?,?)", rows
            )
            self._bump("written_total", len(rows))
        self._depth += len(rows)
        try:
            return self._enforce_bound()
        except sqlite3.Error:
            # The rows are committed: an error here must not make the caller store them again.
            log.exception("could not enforce the spool bound; will try again on the next write")
            return 0

    def _enforce_bound(self) -> int:
        excess = self._depth - self.max_rows
        if excess <= 0:
            return 0
        dropped: dict[str | None, int] = {}
        with self._tx():
            victims = self.db.execute(
                "SELECT id, finding FROM results WHERE batch_id IS NULL ORDER BY priority, id LIMIT ?",
                (excess,),
            ).fetchall()
            self.db.executemany("DELETE FROM results WHERE id = ?", [(v[0],) for v in victims])
            for _, finding in victims:
                dropped[finding] = dropped.get(finding, 0) + 1
            excess -= len(victims)
            while excess > 0:  # everything left is batched: whole batches go, oldest first
                row = self.db.execute(
                    "SELECT batch_id FROM batches ORDER BY created, rowid LIMIT 1"
                ).fetchone()
                if row is None:
                    break
                for (finding,) in self.db.execute("SELECT finding FROM results WHERE batch_id = ?", row):
                    dropped[finding] = dropped.get(finding, 0) + 1
                    excess -= 1
                self.db.execute("DELETE FROM results WHERE batch_id = ?", row)
                self.db.execute("DELETE FROM batches WHERE batch_id = ?", row)
            for finding, n in dropped.items():
                self.db.execute(
                    "INSERT INTO dropped (finding, count) VALUES (?, ?) "
                    "ON CONFLICT(finding) DO UPDATE SET count = count + excluded.count",
                    (finding or "none", n),
                )
            total = sum(dropped.values())
            self._bump("dropped_total", total)
        self._depth -= total
        if total:
            log.warning(
                "spool full (%d rows): dropped %d results %s",
                self.max_rows,
                total,
                {k or "none": v for k, v in dropped.items()},
            )
        return total

    def next_batch(self, size: int, now: float | None = None, max_age: float | None = None) -> Batch | None:
        """The batch to send now: the oldest waiting one, or a new one of up to `size` results.

        Results older than `max_age` seconds are quarantined instead of batched: the
        collector refuses them, and they must not hold up the rest.
        """
        now = time.time() if now is None else now
        row = self.db.execute(
            "SELECT batch_id, attempts FROM batches ORDER BY created, rowid LIMIT 1"
        ).fetchone()
        if row is not None:
            return self._load(row[0], row[1])
        if max_age is not None:
            self._quarantine_old(now - max_age)
        return self._new_batch(size, now)

    def batch_after(self, batch_id: str, size: int, now: float | None = None) -> Batch | None:
        """The batch in line behind `batch_id`: the next waiting one, or a new one of up to `size`
        unbatched results; None when nothing is behind it. Sent while the collector refuses the
        batch at the head, to learn whether it refuses everything or only what is there."""
        row = self.db.execute(
            "SELECT b.batch_id, b.attempts FROM batches b, batches a WHERE a.batch_id = ? "
            "AND (b.created > a.created OR (b.created = a.created AND b.rowid > a.rowid)) "
            "ORDER BY b.created, b.rowid LIMIT 1",
            (batch_id,),
        ).fetchone()
        if row is not None:
            return self._load(row[0], row[1])
        return self._new_batch(size, time.time() if now is None else now)

    def _new_batch(self, size: int, now: float) -> Batch | None:
        with self._tx():
            ids = [
                r[0]
                for r in self.db.execute(
                    # NOT INDEXED: in rowid order only the few batched rows at the front are
                    # skipped; through the index SQLite sorted every unbatched row per batch.
                    "SELECT id FROM results NOT INDEXED WHERE batch_id IS NULL ORDER BY id LIMIT ?",
                    (size,),
                )
            ]
            if not ids:
                return None
            batch_id = str(uuid.uuid4())
            self.db.execute("INSERT INTO batches (batch_id, created) VALUES (?, ?)", (batch_id, now))
            self.db.executemany("UPDATE results SET batch_id = ? WHERE id = ?", [(batch_id, i) for i in ids])
        return self._load(batch_id, 0)

    def _quarantine_old(self, cutoff: float) -> None:
        # Only the oldest unbatched row is looked at, once per batch: scanning them all for an
        # old one cost 64 ms a batch at 200,000 rows. A row out of order (written while the
        # clock was wrong) is sent, and the collector's refusal sets it aside instead.
        oldest = self.db.execute(
            "SELECT created FROM results NOT INDEXED WHERE batch_id IS NULL ORDER BY id LIMIT 1"
        ).fetchone()
        if oldest is None or oldest[0] >= cutoff:
            return
        days = (time.time() - cutoff) / 86400
        with self._tx():
            n = self.db.execute(
                "INSERT INTO quarantine (created, quarantined, reason, body) "
                "SELECT created, ?, ?, body FROM results WHERE batch_id IS NULL AND created < ? ORDER BY id",
                (time.time(), f"older than the collector accepts ({days:g} days)", cutoff),
            ).rowcount
            self.db.execute("DELETE FROM results WHERE batch_id IS NULL AND created < ?", (cutoff,))
            self._bump("quarantined_total", n)
        self._depth -= n
        self._quarantine += n
        log.warning("%d results older than %g days quarantined: the collector would refuse them", n, days)

    def _load(self, batch_id: str, attempts: int) -> Batch:
        rows = self.db.execute("SELECT body FROM results WHERE batch_id = ? ORDER BY id", (batch_id,))
        return Batch(batch_id, attempts, [str(b) for (b,) in rows])

    def ack(self, batch_id: str) -> int:
        """The collector has the batch: it leaves the spool."""
        with self._tx():
            n = int(self.db.execute("DELETE FROM results WHERE batch_id = ?", (batch_id,)).rowcount)
            self.db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
            self._bump("pushed_total", n)
            self.set_meta("last_push", str(time.time()))
        self._depth -= n
        return n

    def note_failure(self, batch_id: str, error: str, retry_at: float) -> None:
        """For `probe status`: how often this batch failed, why, and when the next try is."""
        with self._tx():
            self.db.execute(
                "UPDATE batches SET attempts = attempts + 1, next_attempt = ?, last_error = ? WHERE batch_id = ?",
                (retry_at, error[:300], batch_id),
            )

    def divide(self, batch_id: str, cuts: list[int]) -> list[str]:
        """The collector did not store the batch: its rows become consecutive smaller batches
        (cut before each index in `cuts`), under new ids, in the old batch's place in line."""
        with self._tx():
            row = self.db.execute("SELECT created FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
            if row is None:
                return []
            ids = [
                r[0]
                for r in self.db.execute("SELECT id FROM results WHERE batch_id = ? ORDER BY id", (batch_id,))
            ]
            bounds = [0, *sorted({c for c in cuts if 0 < c < len(ids)}), len(ids)]
            self.db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
            new = []
            for lo, hi in itertools.pairwise(bounds):
                part = str(uuid.uuid4())
                # same creation time, later rowid: the parts keep the old batch's place, in order
                self.db.execute(
                    "INSERT INTO batches (batch_id, created) VALUES (?, ?)", (part, float(row[0]))
                )
                self.db.executemany(
                    "UPDATE results SET batch_id = ? WHERE id = ?", [(part, i) for i in ids[lo:hi]]
                )
                new.append(part)
        return new

    def quarantine(self, batch_id: str, reason: str) -> int:
        """The collector refused these measurements for good: set them aside, counted, kept."""
        now = time.time()
        with self._tx():
            n = self.db.execute(
                "INSERT INTO quarantine (created, quarantined, reason, body) "
                "SELECT created, ?, ?, body FROM results WHERE batch_id = ? ORDER BY id",
                (now, reason[:1000], batch_id),
            ).rowcount
            self.db.execute("DELETE FROM results WHERE batch_id = ?", (batch_id,))
            self.db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
            self._bump("quarantined_total", n)
        self._depth -= n
        self._quarantine += n
        return int(n)

    def release(self, ids: list[int]) -> int:
        """Quarantined measurements the collector has now acknowledged (`probe spool resend`)."""
        if not ids:
            return 0
        with self._tx():
            n = self.db.execute(
                f"DELETE FROM quarantine WHERE id IN ({','.join('?' * len(ids))})", ids
            ).rowcount
            self._bump("pushed_total", n)
            self.set_meta("last_push", str(time.time()))
        self._quarantine -= n
        return int(n)

    def requarantine(self, ids: list[int], reason: str) -> None:
        with self._tx():
            self.db.executemany(
                "UPDATE quarantine SET reason = ?, quarantined = ? WHERE id = ?",
                [(reason[:1000], time.time(), i) for i in ids],
            )

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = ?",
            (key, value, value),
        )


class ReadOnlySpool(_Reader):
    """The spool as `probe status` sees it: read-only, no schema, no locks taken, no files made.

    While the daemon runs, the WAL files exist and a read-only connection shares them. When
    it is stopped they may not, and a read-only WAL reader would create them (owned by
    whoever runs `probe status`, perhaps root, and then unusable by the service): so then
    the file is opened immutable, since nobody is writing it.
    """

    def __init__(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(path)
        wal = path.with_name(path.name + "-wal")
        shm = path.with_name(path.name + "-shm")
        mode = "mode=ro" if wal.exists() and shm.exists() else "mode=ro&immutable=1"
        self.path = path
        self.db = sqlite3.connect(f"file:{quote(str(path.resolve()))}?{mode}", uri=True, isolation_level=None)
        self.db.execute("PRAGMA query_only=1")

    def close(self) -> None:
        self.db.close()

    def depth(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM results").fetchone()[0])

    def quarantine_depth(self) -> int:
        if not self._has("quarantine"):
            return 0
        return int(self.db.execute("SELECT count(*) FROM quarantine").fetchone()[0])

    def quarantined(self, limit: int | None = None, ids: list[int] | None = None) -> list[Quarantined]:
        return super().quarantined(limit, ids) if self._has("quarantine") else []

    def iter_quarantined(self) -> Iterator[Quarantined]:
        return super().iter_quarantined() if self._has("quarantine") else iter(())

    def _has(self, table: str) -> bool:
        # A spool written by an older probe has no quarantine yet; a reader must not add it.
        q = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return self.db.execute(q, (table,)).fetchone() is not None


class SpoolThread:
    """The spool's own thread: every spool call runs there, one at a time, in order, off the
    event loop (fsync and JSON encoding of a round's chunk take milliseconds the loop needs
    for timing queries)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue a call; it runs to the end even if the caller is cancelled meanwhile."""
        return self._pool.submit(fn, *args)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args))

    def shutdown(self) -> None:
        """Wait for every queued call to finish, then stop the thread."""
        self._pool.shutdown(wait=True)
