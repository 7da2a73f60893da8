"""The scheduler (issue 12): what to measure next, per name and endpoint, within each endpoint's qps.

Pure: no I/O and no clock; the daemon passes `now` in and hands each batch to the engine as
`Plan(targets=...)` (each target is measured for every qtype). Every (resolver, endpoint) pair
is a lane with two ways in:

- the fast lane, in two tiers. First, names of orders that bind here and took effect (or
  were first published to this scheduler) within `chase` (default 24 h), measured every
  `fast_interval` on each endpoint of a resolver in the order's scope until every qtype comes
  back enforced there; an order's names enter it at the order's effective instant
  (`next_change()` says when to call), and a name never measured since then goes before
  every other. Then, whatever the order's age, every name whose last result leaks on some
  qtype (the rotation found it, or it was chased past `chase`), measured every
  `fast_interval` until no qtype leaks: chased until enforced, with what the first tier left.
- the rotation: a cursor over the sorted names, paced to finish a pass in `pace` × `full_pass`,
  so every name is measured at least once per `full_pass` even when slices run late. The
  cursor follows the wall clock (a pass starts at each multiple of `pace` × `full_pass` since
  the epoch), so a restarted probe picks the rotation up where it was, a little before it
  (`Settings.resume`), instead of from the first name.

Capacity per endpoint and call is qps × budget ÷ qtypes names. The rotation's steady share
is reserved first, so a fast lane full of leaks (a public resolver that ignores every order)
can never starve the full pass; the fast lane takes what it needs of the rest; a rotation
that fell behind (a suspended host) catches up only with what is left, never at the fast
lane's expense (bar the `resume` seconds a start owes). The lane state is flat arrays (last
planned time, enforced and leaking qtypes, two queued flags) plus a heap per tier of the names
the fast lane chases: 45,000 names × 6 endpoints cost a few MB.

What bounds the chase is the qps, not time: on a resolver that enforces nothing (the issue's
mass leak) every name leaks, so no budget could measure them all every `fast_interval`. The
rotation's share comes first, so `full_pass` holds; new orders' names (the first tier) come
next, so their cadence holds while they fit; the leaks of older orders share what is left,
each measured every (leaking names × qtypes ÷ spare qps) when they do not fit: the endpoint
then runs at its full qps while the leak lasts. `chase` only says how long an order counts
as new.
"""

from __future__ import annotations

import datetime as dt
import heapq
import math
import re
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any, Protocol

from probe.expect import OrderIndex
from probe.lists import Lists, Order
from probe.model import Expectation, Finding
from probe.specs import Endpoint, Resolver

__all__ = [
    "LaneStatus",
    "Result",
    "Scheduler",
    "Settings",
    "Target",
    "budget",
    "check",
    "format_span",
    "parse_settings",
]

Target = tuple[str, Resolver, Endpoint]
_NEVER = -math.inf
_UNLIMITED = 1 << 62


@dataclass(frozen=True, slots=True)
class Settings:
    """Seconds. `pace` is the share of `full_pass` a rotation pass is planned in: the rest is
    margin for slices that run late, retries and the measuring time within a slice."""

    fast_interval: float = 120.0
    full_pass: float = 6 * 3600.0
    chase: float = 24 * 3600.0
    pace: float = 0.9

    @property
    def resume(self) -> float:
        """How far before the wall clock's place in the rotation a (re)started lane begins: the
        slice in flight when the probe stopped, and a short downtime, are measured again rather
        than skipped for a whole pass. Within the pass's margin, so catching up cannot break it."""
        return min(self.fast_interval, (1 - self.pace) * self.full_pass)


class Result(Protocol):
    """What `record()` reads of a measurement (`probe.model.Measurement` has all of it)."""

    @property
    def domain(self) -> str: ...
    @property
    def qtype(self) -> str: ...
    @property
    def resolver(self) -> str: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def finding(self) -> Finding | None: ...


@dataclass(frozen=True, slots=True)
class LaneStatus:
    """One (resolver, endpoint) lane, for metrics and logs: `behind` is how many seconds of
    rotation the lane owes (0 when on pace), `urgent` how many names the fast lane chases."""

    resolver: str
    endpoint: str
    passes: int
    progress: float
    behind: float
    urgent: int


# --- config ---------------------------------------------------------------------------------

_SPAN_RE = re.compile(r"([0-9]{1,9})([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SPAN_HINT = "is not a duration (seconds, or a whole number with s, m, h or d: 90, 30m, 6h)"


def format_span(seconds: float) -> str:
    """`1h52m30s`, `6h`, `2m`, `0.5s`: a duration as people read it in a message."""
    if not math.isfinite(seconds):
        return "forever"
    if seconds < 60 and seconds != int(seconds):
        return f"{seconds:.3g}s"
    total = round(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{v}{u}" for v, u in ((days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")) if v]
    return "".join(parts) or "0s"


def _span(value: Any, key: str, errors: list[str]) -> float | None:
    if isinstance(value, bool):
        errors.append(f"{key}: {value!r} {_SPAN_HINT}")
        return None
    seconds = math.nan
    if isinstance(value, int | float):
        seconds = float(value) if abs(value) < 1e12 else math.nan  # YAML's 1e400 and .inf
    elif isinstance(value, str) and (m := _SPAN_RE.fullmatch(value.strip())):
        seconds = float(int(m[1]) * _UNIT[m[2]])
    if math.isnan(seconds):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:55] + "…"
        errors.append(f"{key}: {shown} {_SPAN_HINT}")
        return None
    if seconds <= 0:
        errors.append(f"{key}: {value!r} must be longer than zero")
        return None
    return seconds


def parse_settings(section: Mapping[str, Any] | None, prefix: str = "schedule") -> tuple[Settings, list[str]]:
    """`fast_interval`, `full_pass` and `chase` from the config's `schedule` mapping (seconds, or `90s`,
    `30m`, `6h`, `1d`), with every error naming key and value. Other keys are the caller's:
    `config.py` owns the list of known keys. Defaults stand in for missing or wrong values."""
    section = section or {}
    errors: list[str] = []
    default = Settings()
    fast = full = chase = None
    if section.get("chase") is not None:
        chase = _span(section["chase"], f"{prefix}.chase", errors)
    if section.get("fast_interval") is not None:
        fast = _span(section["fast_interval"], f"{prefix}.fast_interval", errors)
        if fast is not None and fast < 1:
            errors.append(f"{prefix}.fast_interval: {section['fast_interval']!r} must be at least 1s")
            fast = None
    if section.get("full_pass") is not None:
        full = _span(section["full_pass"], f"{prefix}.full_pass", errors)
    fast_s = fast if fast is not None else default.fast_interval
    full_s = full if full is not None else default.full_pass
    if (fast is not None or full is not None) and full_s <= fast_s:
        if full is not None:
            errors.append(
                f"{prefix}.full_pass: {section['full_pass']!r} must be longer than "
                f"{prefix}.fast_interval ({format_span(fast_s)})"
            )
        else:
            errors.append(
                f"{prefix}.fast_interval: {section['fast_interval']!r} must be shorter than "
                f"{prefix}.full_pass ({format_span(full_s)})"
            )
        return default, errors
    chase_s = chase if chase is not None else default.chase
    if chase is not None and chase_s < fast_s:
        errors.append(
            f"{prefix}.chase: {section['chase']!r} must be at least "
            f"{prefix}.fast_interval ({format_span(fast_s)}): the fast lane would never measure a new order"
        )
        return default, errors
    return Settings(fast_interval=fast_s, full_pass=full_s, chase=chase_s), errors


# --- the budget -----------------------------------------------------------------------------


def _endpoint_loads(
    resolvers: Sequence[Resolver], qps: float | None
) -> list[tuple[str, Endpoint, int, float]]:
    """(who, endpoint, lanes on it, qps): an endpoint named by two resolvers carries both lanes
    on one rate limit, as in the engine, which keys its limiters by endpoint."""
    seen: dict[Endpoint, list[Any]] = {}
    for r in resolvers:
        for ep in r.endpoints:
            if ep in seen:
                seen[ep][2] += 1
            else:
                seen[ep] = [r.name, ep, 1, ep.qps or qps or math.inf]
    return [(w, ep, n, q) for w, ep, n, q in seen.values()]


def budget(
    names: int, qtypes: Sequence[str], resolvers: Sequence[Resolver], qps: float | None, settings: Settings
) -> str:
    """What `probe check-config` prints: names × qtypes ÷ qps = time per pass, per endpoint
    (endpoints have their own rate limits and run side by side), and what the fast lane keeps."""
    nq = len(qtypes)
    period = settings.pace * settings.full_pass
    lines = [
        f"schedule: {names} names × {nq} qtypes; fast lane every {format_span(settings.fast_interval)}, "
        f"every name at least once per {format_span(settings.full_pass)} "
        f"(a pass planned in {format_span(period)})"
    ]
    total = 0
    for who, ep, lanes, rate in _endpoint_loads(resolvers, qps):
        queries = names * nq * lanes
        total += queries
        per_pass = queries / rate
        if math.isinf(rate):
            lines.append(f"  {who} {ep}: unlimited qps, {queries} queries per pass")
            continue
        spare = rate - queries / period
        fast = max(0, math.floor(spare * settings.fast_interval / nq))
        lines.append(
            f"  {who} {ep} at {rate:g} qps: {names} × {nq}{f' × {lanes} resolvers' if lanes > 1 else ''} "
            f"÷ {rate:g} = {format_span(per_pass)} per pass ({per_pass / period:.0%} of the pass); "
            f"fast lane: up to {fast} names every {format_span(settings.fast_interval)}"
        )
    lines.append(f"  total: {total} queries per pass")
    return "\n".join(lines)


def check(
    names: int, qtypes: Sequence[str], resolvers: Sequence[Resolver], qps: float | None, settings: Settings
) -> list[str]:
    """Errors for a config that cannot meet `full_pass` (or give the fast lane one name per
    `fast_interval`), each with the numbers and what would fix it."""
    errors: list[str] = []
    nq = len(qtypes)
    period = settings.pace * settings.full_pass
    for who, ep, lanes, rate in _endpoint_loads(resolvers, qps):
        if math.isinf(rate):
            continue
        queries = names * nq * lanes
        per_pass = queries / rate
        if per_pass > period:
            need = queries / period
            lanes_text = f" × {lanes} resolvers" if lanes > 1 else ""
            errors.append(
                f"schedule.full_pass: {format_span(settings.full_pass)} cannot be met on {who} {ep}: "
                f"{names} names × {nq} qtypes{lanes_text} ÷ {rate:g} qps = {format_span(per_pass)} per pass, "
                f"more than the {format_span(period)} a pass is planned in ({settings.pace:.0%} of full_pass); "
                f"raise its qps to at least {math.ceil(need * 100) / 100:g}, measure fewer names or qtypes, "
                f"or set schedule.full_pass to at least {format_span(math.ceil(per_pass / settings.pace))}"
            )
        elif nq / rate > settings.fast_interval:
            errors.append(
                f"schedule.fast_interval: {format_span(settings.fast_interval)} is too short for {who} {ep} "
                f"at {rate:g} qps: one name × {nq} qtypes takes {format_span(nq / rate)}"
            )
    return errors


# --- the scheduler --------------------------------------------------------------------------


def _ts(when: dt.datetime) -> float:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("the scheduler needs an aware datetime, not a naive one")
    return when.timestamp()


def _order_key(order: Order) -> tuple[str, dt.datetime | None]:
    return order.id, order.effective


class _Lane:
    """One (resolver, endpoint): its rotation cursor and per-name state as flat arrays."""

    __slots__ = (
        "cursor",
        "endpoint",
        "heap",
        "last",
        "leaking",
        "leaks",
        "lqueued",
        "mask",
        "owed",
        "pass_start",
        "passes",
        "queued",
        "resolver",
        "rindex",
    )

    def __init__(self, resolver: Resolver, rindex: int, endpoint: Endpoint, n: int, t: float) -> None:
        self.resolver = resolver
        self.rindex = rindex
        self.endpoint = endpoint
        self.last = array("d", [_NEVER]) * n  # when each name was last planned here
        self.mask = array("I", [0]) * n  # qtypes enforced since the last result that was not
        self.queued = bytearray(n)  # 1 while the heap holds a live entry for the name
        self.heap: list[tuple[float, int]] = []  # (due, name): the fast lane's first tier
        self.leaking = array("I", [0]) * n  # qtypes whose last result was a leak
        self.lqueued = bytearray(n)  # 1 while `leaks` holds a live entry for the name
        self.leaks: list[tuple[float, int]] = []  # (due, name): leaks of older orders
        self.cursor = 0
        self.pass_start = t
        self.passes = 0
        self.owed = 0  # names of rotation to catch up ahead of the fast lane (after a start)


class Scheduler:
    """Per name and endpoint: `next_batch()` says what to measure, `record()` takes results.

    The daemon's loop: `batch = next_batch(now, slice)`, measure it, `record(now, results)`,
    and call again at `min(now + slice, next_change(now))` (or as soon as the batch is done):
    an order's names are then measured from its effective instant.
    """

    def __init__(
        self,
        lists: Lists,
        *,
        country: str,
        resolvers: Sequence[Resolver],
        qtypes: Sequence[str],
        now: dt.datetime,
        qps: float | None = 20.0,
        settings: Settings | None = None,
        expectations: OrderIndex | None = None,
    ) -> None:
        if not qtypes or len(qtypes) > 32:
            raise ValueError("between 1 and 32 qtypes")
        self.country = country.upper()
        self.resolvers = tuple(resolvers)
        self.qtypes = tuple(qtypes)
        self.settings = settings or Settings()
        self._bit = {q: 1 << k for k, q in enumerate(self.qtypes)}
        self._full = (1 << len(self.qtypes)) - 1
        t = _ts(now)
        self._t = t
        self._rates: dict[Endpoint, float] = {}
        self._horizon: dict[Endpoint, float] = {}
        self._groups: dict[Endpoint, list[_Lane]] = {}
        self._lanes: list[_Lane] = []
        self._lane_of: dict[tuple[str, str], _Lane] = {}
        self._load(lists, expectations)
        for ri, r in enumerate(self.resolvers):
            for ep in r.endpoints:
                lane = _Lane(r, ri, ep, len(self._names), t)
                self._lanes.append(lane)
                self._lane_of[(r.name, str(ep))] = lane
                self._groups.setdefault(ep, []).append(lane)
                self._rates[ep] = ep.qps or qps or math.inf
                self._horizon[ep] = t
                self._align(lane, t)
        # Orders first seen after start-up (a new ticket from the collector): chased from then,
        # even when their effective instant is older than `chase`.
        self._published: dict[tuple[str, dt.datetime | None], float] = {}
        self._started: set[tuple[str, dt.datetime | None]] = set()
        self._refresh_at = _NEVER
        self._refresh(now, t, starting=True)

    def _align(self, lane: _Lane, t: float) -> None:
        """Put a new lane's cursor where the wall clock says the rotation is, `resume` seconds
        back. Passes start at multiples of the pass's period since the epoch, so a probe that
        restarts (every 30 minutes, say) resumes its rotation instead of beginning the list
        again and never reaching its end; what was lost with the stop (the slice in flight, a
        short downtime) falls within the `resume` seconds measured again, owed ahead of the
        fast lane so that a busy fast lane cannot leave them a whole pass behind."""
        n = len(self._names)
        period = self.settings.pace * self.settings.full_pass
        back = self.settings.resume
        # The pass `back` seconds ago: the previous one when a new pass has just begun.
        lane.pass_start = math.floor((t - back) / period) * period
        lane.cursor = max(0, min(n, math.floor(n * (t - back - lane.pass_start) / period)))
        lane.owed = math.ceil(n * back / period)

    # -- lists -------------------------------------------------------------------------------

    def _load(self, lists: Lists, expectations: OrderIndex | None) -> None:
        self.lists = lists
        # The daemon's own index when it hands it in: the largest part of the scheduler's memory.
        self._expect = (
            expectations if expectations is not None and expectations.lists is lists else OrderIndex(lists)
        )
        self._names = sorted(set(lists.query_names()))
        self._index = {name: i for i, name in enumerate(self._names)}
        # Lists.names_of() scans every name per order (quadratic over thousands of tickets);
        # one pass over the names with the expectation index gives the same sets.
        where = {id(o): k for k, o in enumerate(lists.orders)}
        self._order_names = [array("I") for _ in lists.orders]
        for i, name in enumerate(self._names):
            seen: set[int] = set()
            for rule in self._expect.rules_for(name):
                if rule.order is not None and (k := where[id(rule.order)]) not in seen:
                    seen.add(k)
                    self._order_names[k].append(i)
        self._cand = [bytearray(len(self._names)) for _ in self.resolvers]

    def names_of(self, order: Order) -> list[str]:
        """The names the scheduler measures for `order` (equal to `Lists.names_of`, as a set)."""
        k = next(k for k, o in enumerate(self.lists.orders) if o is order)
        return [self._names[i] for i in self._order_names[k]]

    def update_lists(self, lists: Lists, now: dt.datetime, expectations: OrderIndex | None = None) -> None:
        """New lists (from the collector): state carries over by name, the rotation resumes at
        the same place in the alphabet, and orders not seen before are chased from `now`."""
        t = _ts(now)
        known = {_order_key(o) for o in self.lists.orders}
        old_names, old_index = self._names, self._index
        self._load(lists, expectations)
        for o in lists.orders:
            key = _order_key(o)
            if key not in known and key not in self._published:
                self._published[key] = t
        n = len(self._names)
        moved = [old_index.get(name, -1) for name in self._names]
        for lane in self._lanes:
            last, mask, queued = array("d", [_NEVER]) * n, array("I", [0]) * n, bytearray(n)
            leaking, lqueued = array("I", [0]) * n, bytearray(n)
            for j, i in enumerate(moved):
                if i >= 0:
                    last[j], mask[j], queued[j] = lane.last[i], lane.mask[i], lane.queued[i]
                    leaking[j], lqueued[j] = lane.leaking[i], lane.lqueued[i]
            lane.last, lane.mask, lane.queued = last, mask, queued
            lane.leaking, lane.lqueued = leaking, lqueued
            lane.heap = [(self._due(lane, j), j) for j in range(n) if queued[j]]
            heapq.heapify(lane.heap)
            lane.leaks = [(self._due(lane, j), j) for j in range(n) if lqueued[j]]
            heapq.heapify(lane.leaks)
            lane.cursor = (
                bisect_left(self._names, old_names[lane.cursor]) if lane.cursor < len(old_names) else n
            )
        self._refresh(now, t)

    def next_change(self, _now: dt.datetime) -> dt.datetime | None:
        """The next instant the fast lane changes (an order takes effect, expires, falls due or
        stops being recent): call `next_batch()` then, whatever the slice."""
        # The instant was fixed by the last refresh; the daemon's loop still passes its `now`
        # (the documented call is `next_change(now)`), so the parameter stays, positional.
        if math.isinf(self._refresh_at):
            return None
        return dt.datetime.fromtimestamp(self._refresh_at, dt.UTC)

    def _recent(self, now: dt.datetime, t: float) -> tuple[list[int], float]:
        """Orders binding here now whose chase window holds `t`, and when the next window ends."""
        chase = self.settings.chase
        out, ends = [], math.inf
        for k, o in enumerate(self.lists.orders):
            key = _order_key(o)
            start = max(o.effective.timestamp() if o.effective else _NEVER, self._published.get(key, _NEVER))
            if start == _NEVER:
                continue
            if start <= t < start + chase and self.country in o.jurisdictions and o.binds_at(now):
                out.append(k)
                ends = min(ends, start + chase)
        for key, seen in list(self._published.items()):
            if seen + chase <= t:
                del self._published[key]
        return out, ends

    def _refresh(self, now: dt.datetime, t: float, starting: bool = False) -> None:
        recent, ends = self._recent(now, t)
        started: set[tuple[str, dt.datetime | None]] = set()
        # At a (re)start the orders already in force are due now, not "never measured": a
        # restart would otherwise queue all of them ahead of an order taking effect a minute
        # later, whose first measurements are the ones its deadline needs.
        first = t - self.settings.fast_interval if starting else _NEVER
        for ri, r in enumerate(self.resolvers):
            cand = self._cand[ri] = bytearray(len(self._names))
            lanes = [lane for lane in self._lanes if lane.rindex == ri]
            for k in recent:
                order = self.lists.orders[k]
                if not order.addresses(r.kind, r.operator):
                    continue
                key = _order_key(order)
                started.add(key)
                fresh = key not in self._started
                for i in self._order_names[k]:
                    verdict, _ = self._expect.expect(self.country, r.kind, r.operator, self._names[i], now)
                    if verdict is not Expectation.BLOCKED:
                        continue
                    cand[i] = 1
                    if fresh:  # measured after the instant the order binds, whatever was seen before
                        for lane in lanes:
                            lane.mask[i] = 0
                            lane.last[i] = first
                            lane.queued[i] = 1
                            heapq.heappush(lane.heap, (self._due(lane, i), i))
        self._started = started
        change = self.lists.next_change(now)
        self._refresh_at = min(ends, change.timestamp() if change else math.inf)

    # -- planning ----------------------------------------------------------------------------

    def _due(self, lane: _Lane, i: int) -> float:
        return lane.last[i] + self.settings.fast_interval

    def _urgent(self, lane: _Lane, i: int) -> bool:
        return bool(self._cand[lane.rindex][i]) and lane.mask[i] != self._full

    def _leaks(self, lane: _Lane, i: int) -> bool:
        """In the second tier: a leak on some qtype, and no first-tier chase of the name."""
        return bool(lane.leaking[i]) and not self._cand[lane.rindex][i]

    def _plan(self, lane: _Lane, i: int, t: float) -> None:
        lane.last[i] = t
        # The old heap entries go stale: their due no longer matches.
        if lane.queued[i]:
            heapq.heappush(lane.heap, (self._due(lane, i), i))
        if lane.lqueued[i]:
            heapq.heappush(lane.leaks, (self._due(lane, i), i))

    def _queue_leak(self, lane: _Lane, i: int) -> None:
        if not lane.lqueued[i]:
            lane.lqueued[i] = 1
            heapq.heappush(lane.leaks, (self._due(lane, i), i))

    def _fast(self, lane: _Lane, t: float, until: float, allowance: int) -> list[int]:
        """The first tier (new orders), then the leaks of older ones with what it left."""
        out: list[int] = []
        heap = lane.heap
        while heap and len(out) < allowance:
            due, i = heap[0]
            if due != self._due(lane, i):
                heapq.heappop(heap)  # stale: the name was planned or reset since
            elif not self._urgent(lane, i):
                heapq.heappop(heap)
                lane.queued[i] = 0
                if self._leaks(lane, i):  # its order is no longer new: chased on, second tier
                    self._queue_leak(lane, i)
            elif due > until or lane.last[i] >= t:  # not due, or already in this batch
                break
            else:
                heapq.heappop(heap)
                self._plan(lane, i, t)
                out.append(i)
        leaks = lane.leaks
        while leaks and len(out) < allowance:
            due, i = leaks[0]
            if due != self._due(lane, i):
                heapq.heappop(leaks)
            elif not self._leaks(lane, i):
                heapq.heappop(leaks)
                lane.lqueued[i] = 0
            elif due > until or lane.last[i] >= t:
                break
            else:
                heapq.heappop(leaks)
                self._plan(lane, i, t)
                out.append(i)
        return out

    def _target(self, lane: _Lane, t: float, until: float) -> int:
        """Where the cursor should be by `until`; starts the next pass when this one is done."""
        n = len(self._names)
        period = self.settings.pace * self.settings.full_pass
        if lane.cursor >= n and n:
            # Back to back while on pace (or behind by no more than a restart's `resume`, so the
            # passes stay on the wall clock's grid); a pass that ended later starts afresh
            # instead of bursting to make up for lost time.
            after = lane.pass_start + period
            lane.pass_start = after if t - after <= self.settings.resume else t
            lane.cursor = 0
            lane.passes += 1
        return max(0, min(n, math.floor(n * (until - lane.pass_start) / period)))

    def _rotate(self, lane: _Lane, t: float, until: float, allowance: int) -> list[int]:
        out: list[int] = []
        fast = self.settings.fast_interval
        while len(out) < allowance:
            target = self._target(lane, t, until)
            if lane.cursor >= target:
                break
            i = lane.cursor
            lane.cursor += 1
            if t - lane.last[i] < fast:
                continue  # the fast lane measured it moments ago; the next pass comes within full_pass
            self._plan(lane, i, t)
            out.append(i)
        return out

    def _clock(self, t: float) -> None:
        if t < self._t:  # the wall clock stepped back: keep the pace instead of stalling
            step = self._t - t
            for lane in self._lanes:
                lane.pass_start -= step
            for ep in self._horizon:
                self._horizon[ep] = min(self._horizon[ep] - step, t)
        self._t = t

    def _reserve(self, lanes: list[_Lane], t: float, until: float, steady: int, cap: int) -> list[int]:
        """Each lane's rotation share, taken before the fast lane: its steady pace, plus what a
        start still owes (`resume`), within the endpoint's capacity."""
        reserve: list[int] = []
        for lane in lanes:
            need = max(0, self._target(lane, t, until) - lane.cursor)
            if not need:
                lane.owed = 0
            reserve.append(min(need, steady + lane.owed, cap - sum(reserve)))
        return reserve

    def next_batch(self, now: dt.datetime, budget_seconds: float) -> list[Target]:
        """What to measure from `now` for `budget_seconds`: per endpoint at most qps × budget
        queries (names × qtypes), fast-lane names first, endpoints interleaved so the engine's
        workers spread over its rate limiters."""
        if not budget_seconds > 0:
            raise ValueError("budget_seconds must be positive")
        t = _ts(now)
        self._clock(t)
        if t >= self._refresh_at:
            self._refresh(now, t)
        until = t + budget_seconds
        nq = len(self.qtypes)
        n = len(self._names)
        period = self.settings.pace * self.settings.full_pass
        steady = math.ceil(n * budget_seconds / period)
        plans: list[list[int]] = []
        for ep, lanes in self._groups.items():
            rate = self._rates[ep]
            start = max(t, self._horizon[ep])
            cap = _UNLIMITED if math.isinf(rate) else max(0, math.floor((until - start) * rate / nq + 1e-9))
            reserve = self._reserve(lanes, t, until, steady, cap)
            spare = cap - sum(reserve)
            # An endpoint named by several resolvers: each lane gets an equal share first, then
            # what the others left.
            fast: list[list[int]] = [[] for _ in lanes]
            share = spare // len(lanes)
            for k in (0, 1):
                for chosen, lane in zip(fast, lanes, strict=True):
                    got = self._fast(lane, t, until, min(spare, share) if k == 0 else spare)
                    chosen += got
                    spare -= len(got)
            for lane, chosen, own in zip(lanes, fast, reserve, strict=True):
                rot = self._rotate(lane, t, until, own + spare)
                spare -= max(0, len(rot) - own)
                lane.owed = max(0, lane.owed - max(0, len(rot) - steady))
                plans.append(chosen + rot)
            if not math.isinf(rate):
                used = sum(len(plan) for plan in plans[-len(lanes) :])
                self._horizon[ep] = start + used * nq / rate
        lanes_in_order = [lane for lanes in self._groups.values() for lane in lanes]
        out: list[Target] = []
        for row in zip_longest(*plans):
            for lane, i in zip(lanes_in_order, row, strict=True):
                if i is not None:
                    out.append((self._names[i], lane.resolver, lane.endpoint))
        return out

    # -- feedback ----------------------------------------------------------------------------

    def record(self, now: dt.datetime, results: Iterable[Result]) -> int:
        """Take results (one per name × qtype × endpoint, in any grouping): a name of a new
        order leaves the fast lane on an endpoint once every qtype came back enforced there with
        nothing else in between, and comes back on anything else while its order is new; any
        other name joins it (second tier) on a leak and leaves once no qtype leaks. Returns how many
        results were about names and lanes this scheduler knows. `now` is when they arrived;
        it never moves the scheduler's clock (results of a slice arrive out of order), which
        only `next_batch()` reads."""
        _ts(now)
        known = 0
        for m in results:
            lane = self._lane_of.get((m.resolver, m.endpoint))
            i = self._index.get(m.domain)
            bit = self._bit.get(m.qtype)
            if lane is None or i is None or bit is None:
                continue
            known += 1
            if m.finding is Finding.LEAK:
                lane.leaking[i] |= bit
            else:
                lane.leaking[i] &= ~bit
            if m.finding is Finding.ENFORCED:
                lane.mask[i] |= bit
            else:
                lane.mask[i] = 0
                if self._cand[lane.rindex][i] and not lane.queued[i]:
                    lane.queued[i] = 1
                    heapq.heappush(lane.heap, (self._due(lane, i), i))
                elif self._leaks(lane, i):
                    self._queue_leak(lane, i)
        return known

    def status(self, now: dt.datetime) -> list[LaneStatus]:
        """Per lane: passes done, progress through this one, seconds behind pace, names chased."""
        t = _ts(now)
        n = len(self._names)
        period = self.settings.pace * self.settings.full_pass
        out = []
        for lane in self._lanes:
            target = max(0, min(n, math.floor(n * (t - lane.pass_start) / period)))
            behind = max(0, target - lane.cursor) * period / n if n else 0.0
            urgent = sum(
                1
                for i in range(n)
                if (lane.queued[i] and self._urgent(lane, i)) or (lane.lqueued[i] and self._leaks(lane, i))
            )
            progress = lane.cursor / n if n else 1.0
            out.append(
                LaneStatus(lane.resolver.name, str(lane.endpoint), lane.passes, progress, behind, urgent)
            )
        return out
