"""Compliance over time (issue 12): per order × country × resolver × transport, when the order
took effect, when enforcement was first seen, the time it took, whether the deadline was met,
and how many names still leak.

A periodic pass (every `compliance_interval` seconds, from the app's lifespan) groups the
current series of binding orders (`latest`, within the staleness window) per key and folds
what it sees into the store's `compliance` table; changed counts go to `compliance_history`.
Leaks are also recorded as they are stored (Store._record_leaks), so one fixed before the
next pass, or sent late from a probe's spool, still counts.

An ISP may be fined on "deadline missed", so every claim here is one the measurements prove,
and anything else is no claim at all (inconclusive beats wrong):

- **Enforced** is seen when a key's group has no leaking series and at least one enforced one.
  Inconclusive series (the answer could not be told a block or not: a failure, an unproven
  silence, a control without records) are neither: they neither hold enforcement back nor
  count towards it. The instant is when the last of those series turned enforced (the latest
  `since` among them), not when the pass ran: each of them has been enforced ever since.
  It is an upper bound: a name blocked between two measurements was blocked before we saw it.
- **Missed** (1) only with proof that the order was not enforced after its due instant: a leak
  measured after `due`, while enforcement was never seen at or before `due`. Measured by the
  probe's clock, so "after" means more than `limits.max_future_skew` after (the clock error the
  collector accepts uncorrected), and a measurement whose time the collector had to correct
  proves nothing. A late first enforcement alone proves nothing (the probe may simply have
  measured late).
- **Met** (0) once a pass after `due` finds that enforcement was first seen at or before
  `due`, no leak was measured after that, and no name has been judged since that was not
  counted then (a name first measured after `due` could have leaked at `due`; a new probe or
  qtype on the same names changes nothing).
- Otherwise no verdict: not yet due, no measurement, a leak after an enforcement seen in time
  (a regression, or a name not measured before), a first enforcement after `due` with no leak
  measured after `due`, or only inconclusive series. Absence of data is never a miss.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.concurrency import run_in_threadpool

from collector.store import Store

__all__ = [
    "deadline_missed",
    "enforcement_watched",
    "observe",
    "run_forever",
    "run_pass",
    "time_to_enforce",
    "verdict_words",
]

log = logging.getLogger("collector.compliance")


def observe(group: dict[str, Any]) -> dict[str, Any]:
    """What one pass saw of one key (the store folds it into what earlier passes saw)."""
    enforced, leaking = group["enforced"], group["leaking"]
    fully = leaking == 0 and enforced > 0
    return {
        "effective": group["effective"],
        "due": group["due"],
        "first_enforced": group["enforced_at"] if fully else None,
        "first_names": group["names"] if fully else None,
        "enforced_since": group["enforced_at"] if fully else None,
        "last_leak": group["last_leak"],
        "late_leak": group["late_leak"],
        "max_names": group["names"],
        "enforced": enforced,
        "leaking": leaking,
        "inconclusive": group["inconclusive"],
        "names_leaking": group["names_leaking"],
    }


def deadline_missed(row: dict[str, Any]) -> int | None:
    """1 when the deadline was provably missed, 0 when provably met, None when it cannot be said."""
    due = row.get("due")
    if due is None:
        return None
    first, last_leak = row.get("first_enforced"), row.get("last_leak")
    in_time = first is not None and first <= due
    if row.get("late_leak") is not None:
        return None if in_time else 1
    if not in_time or (last_leak is not None and last_leak >= first):
        return None  # a leak after enforcement was seen: it may have leaked at `due`
    if row.get("updated") is None or row["updated"] < due:
        return None  # not yet due: enforced so far, which is not yet "met"
    names, counted = row.get("max_names"), row.get("first_names")
    return 0 if names is not None and counted is not None and names <= counted else None


def time_to_enforce(row: dict[str, Any]) -> float | None:
    """Seconds from the order's effective instant to enforcement first seen; 0 when it was already
    enforced when the order took effect (a series judged against an earlier order for the name)."""
    effective, first = row.get("effective"), row.get("first_enforced")
    if effective is None or first is None:
        return None
    return max(0.0, float(first) - float(effective))


def enforcement_watched(row: dict[str, Any]) -> bool:
    """Whether a leak was measured before enforcement was first seen: then the time to enforce is
    known to within a measurement interval. Otherwise the names were already blocked when first
    measured, and it is only an upper bound (a probe that started measuring months after the
    order took effect would report months)."""
    first, last_leak = row.get("first_enforced"), row.get("last_leak")
    return first is not None and last_leak is not None and last_leak < first


def verdict_words(row: dict[str, Any], now: float) -> str:
    """The deadline verdict in a word: met, missed, pending (not yet due), unknown, or no deadline."""
    if row.get("due") is None:
        return "no deadline"
    missed = deadline_missed(row)
    if missed is not None:
        return "missed" if missed else "met"
    return "pending" if now < row["due"] else "unknown"


def run_pass(store: Store, stale_after: float, now: float | None = None, margin: float = 0.0) -> int:
    """One pass over the current series (`now` fixed by tests); returns the number of keys seen.

    `margin`: how far after `due` a leak must be measured to prove a miss; the app passes
    `limits.max_future_skew`, the probe clock error the collector accepts without correcting it.
    """
    now = time.time() if now is None else now
    return store.refresh_compliance(now - stale_after, now, observe, margin)


async def run_forever(store: Store, stale_after: float, interval: float, margin: float = 0.0) -> None:
    """Run a pass every `interval` seconds, off the event loop, until cancelled; a failing pass
    is logged and retried at the next tick (the store may be briefly unavailable).

    A pass reads every current series of every binding order: when that takes long (a mass
    leak of a 45,000-name order on SQLite), the next one waits four times as long as the
    pass took, so passes never take more than a fifth of the collector's time."""
    while True:
        started = time.monotonic()
        try:
            await run_in_threadpool(run_pass, store, stale_after, None, margin)
        except Exception:
            log.exception("compliance pass failed; retrying in %g s", interval)
        took = time.monotonic() - started
        await asyncio.sleep(max(interval - took, 4 * took))
