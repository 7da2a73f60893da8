"""The durable outbox: every measurement is on disk before it is sent, until acknowledged.

SQLite in WAL mode with synchronous=FULL, so a committed row survives `kill -9` and
power loss. Rows are grouped into batches with a stable id the first time they are
offered; a batch keeps its id and its rows through every retry and restart, so the
collector (which stores a batch id once) never sees the same results as two batches.
A batch leaves only when acknowledged. The spool is bounded: when full, unbatched
rows go first, oldest and least important first (ok/enforced, then inconclusive, then
leaks and overblocks last); every drop is counted and logged.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Batch", "Spool"]

log = logging.getLogger(__name__)

# Lower drops first. Leaks and overblocks are the evidence users act on: they go last.
_PRIORITY = {None: 0, "ok": 0, "enforced": 0, "inconclusive": 1, "leak": 2, "overblock": 2}

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
"""


@dataclass(frozen=True)
class Batch:
    batch_id: str
    attempts: int
    measurements: list[dict[str, Any]]


class Spool:
    """One SQLite file in the state directory; used from one thread (the daemon's loop)."""

    def __init__(self, path: Path, max_rows: int = 500_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_rows = max_rows
        # The daemon may be built in one thread and run in another; it never uses the spool from two at once.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def add(self, measurements: list[dict[str, Any]]) -> int:
        """Store measurements durably (one transaction), then enforce the bound; returns rows dropped."""
        now = time.time()
        rows = [(now, _PRIORITY.get(m.get("finding"), 0), m.get("finding"), json.dumps(m, separators=(",", ":")))
                for m in measurements]  # fmt: skip
        with self._tx():
            self.db.executemany(
                "INSERT INTO results (created, priority, finding, body) VALUES (?,?,?,?)", rows
            )
        return self._enforce_bound()

    def _tx(self) -> Any:
        db = self.db

        class _Tx:
            def __enter__(self) -> None:
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type: object, *_: object) -> None:
                db.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    def depth(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM results").fetchone()[0])

    def _enforce_bound(self) -> int:
        excess = self.depth() - self.max_rows
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
                row = self.db.execute("SELECT batch_id FROM batches ORDER BY created LIMIT 1").fetchone()
                if row is None:
                    break
                for (finding,) in self.db.execute("SELECT finding FROM results WHERE batch_id = ?", row):
                    dropped[finding] = dropped.get(finding, 0) + 1
                    excess -= 1
                self.db.execute("DELETE FROM results WHERE batch_id = ?", row)
                self.db.execute("DELETE FROM batches WHERE batch_id = ?", row)
            for finding, n in dropped.items():
                key = finding or "none"
                self.db.execute(
                    "INSERT INTO dropped (finding, count) VALUES (?, ?) "
                    "ON CONFLICT(finding) DO UPDATE SET count = count + excluded.count",
                    (key, n),
                )
        total = sum(dropped.values())
        if total:
            log.warning("spool full (%d rows): dropped %d results %s", self.max_rows, total,
                        {k or "none": v for k, v in dropped.items()})  # fmt: skip
        return total

    def dropped(self) -> dict[str, int]:
        return {f: n for f, n in self.db.execute("SELECT finding, count FROM dropped")}

    def next_batch(self, size: int, now: float | None = None) -> Batch | None:
        """The batch to send now: an existing one whose retry time has come, or a new one."""
        now = time.time() if now is None else now
        row = self.db.execute(
            "SELECT batch_id, attempts, next_attempt FROM batches ORDER BY created LIMIT 1"
        ).fetchone()
        if row is not None:
            if row[2] > now:
                return None  # the oldest batch goes first, in order; wait for its retry time
            return self._load(row[0], row[1])
        with self._tx():
            ids = [r[0] for r in self.db.execute(
                "SELECT id FROM results WHERE batch_id IS NULL ORDER BY id LIMIT ?", (size,))]  # fmt: skip
            if not ids:
                return None
            batch_id = str(uuid.uuid4())
            self.db.execute("INSERT INTO batches (batch_id, created) VALUES (?, ?)", (batch_id, now))
            self.db.executemany("UPDATE results SET batch_id = ? WHERE id = ?", [(batch_id, i) for i in ids])
        return self._load(batch_id, 0)

    def _load(self, batch_id: str, attempts: int) -> Batch:
        bodies = [json.loads(b) for (b,) in self.db.execute(
            "SELECT body FROM results WHERE batch_id = ? ORDER BY id", (batch_id,))]  # fmt: skip
        return Batch(batch_id, attempts, bodies)

    def ack(self, batch_id: str) -> int:
        """The collector has the batch: it leaves the spool."""
        with self._tx():
            n = self.db.execute("DELETE FROM results WHERE batch_id = ?", (batch_id,)).rowcount
            self.db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
        self.set_meta("last_push", str(time.time()))
        return int(n)

    def retry_later(self, batch_id: str, delay: float, error: str) -> None:
        with self._tx():
            self.db.execute(
                "UPDATE batches SET attempts = attempts + 1, next_attempt = ?, last_error = ? WHERE batch_id = ?",
                (time.time() + delay, error, batch_id),
            )

    def split(self, batch_id: str) -> None:
        """The collector refused the batch as too large without storing it: its rows go back
        to be batched again, in smaller batches under new ids."""
        with self._tx():
            self.db.execute("UPDATE results SET batch_id = NULL WHERE batch_id = ?", (batch_id,))
            self.db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))

    def pending_batches(self) -> list[tuple[str, int, float, str | None]]:
        rows = self.db.execute(
            "SELECT batch_id, attempts, next_attempt, last_error FROM batches ORDER BY created"
        )
        return [(str(b), int(a), float(n), e) for b, a, n, e in rows]

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = ?",
                        (key, value, value))  # fmt: skip

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])
