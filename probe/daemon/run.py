"""`probe run`: measurement rounds and pushes on an APScheduler 3 schedule, durable in between.

In `schedule.mode: rounds` a round is one engine run over every listed name, every resolver
and transport, every `interval`. In `schedule.mode: slices` a round is a slice: what the
per-name scheduler (probe/schedule.py) says is due in the next `slice` seconds (new orders
every `fast_interval`, every name once per `full_pass`, no endpoint above its qps), cut at
the next instant an order changes; the next slice starts when this one's time is up (at
once when it ran over). Either way a round is cut at its deadline; its measurements are
clamped to what the collector accepts and go to the
spool as they come, written by the spool's own thread so the event loop that times
queries never waits on a disk. Rounds never overlap (max_instances=1, coalesced); a push
loop drains the spool beside them. Lists files are re-read when they change; a bad new
file is rejected, logged and counted, and the old one stays in force.

Under systemd (Type=notify) the daemon says READY=1 once scheduled and pings the
watchdog only while the scheduler dispatches jobs and no round overruns its deadline, so
a stuck probe is restarted. SIGTERM stops the schedule, gives a running round a bounded
grace, writes everything measured (whatever the grace), pushes what it can in a bounded
time, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import itertools
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from probe import __version__
from probe.answers import AnswerChecker
from probe.daemon.config import COLLECTOR_LISTS, Config, collector_lists, schedule_budget
from probe.daemon.notify import Notifier
from probe.daemon.push import REACHABLE_EVERY, Pusher
from probe.daemon.spool import Spool, SpoolThread, encode
from probe.engine import Engine, ExpectFn, Plan
from probe.expect import OrderIndex
from probe.limits import clamp
from probe.lists import Lists, ListsError, load_lists, parse_lists
from probe.model import Expectation, Outcome, Transport
from probe.schedule import LaneStatus, Scheduler
from probe.specs import Resolver
from probe.transports import Options

__all__ = ["Daemon", "setup_logging"]

log = logging.getLogger("probe.daemon")

_BEAT = 5.0  # seconds between the scheduler's heartbeat jobs


class _JsonFormatter(logging.Formatter):
    def __init__(self, probe_id: str) -> None:
        super().__init__()
        self.probe_id = probe_id

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "probe": self.probe_id,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(config: Config) -> None:
    """JSON lines when not on a terminal (or when asked), with the probe id on every line."""
    handler = logging.StreamHandler(sys.stderr)
    as_json = config.log_format == "json" or (config.log_format == "auto" and not sys.stderr.isatty())
    if as_json:
        handler.setFormatter(_JsonFormatter(config.probe_id))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {config.probe_id} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    for noisy in ("apscheduler", "httpx2", "httpcore2", "quic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Metrics:
    """The probe's own health (names prefixed blockprobe_probe_); label values are closed vocabularies."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rounds = Counter(
            "blockprobe_probe_rounds", "Measurement rounds run, by result.", ["result"], registry=registry
        )
        for result in ROUND_RESULTS:
            self.rounds.labels(result)
        self.queries = Counter(
            "blockprobe_probe_queries",
            "Measurements made, by transport and outcome.",
            ["transport", "outcome"],
            registry=registry,
        )
        for t in Transport:
            for o in Outcome:
                self.queries.labels(str(t), str(o))
        self.push_failures = Counter(
            "blockprobe_probe_push_failures", "Failed pushes, by reason.", ["reason"], registry=registry
        )
        self.pushed = Counter(
            "blockprobe_probe_pushed_results", "Results acknowledged by the collector.", registry=registry
        )
        self.last_push = Gauge(
            "blockprobe_probe_last_push_timestamp_seconds",
            "When the collector last acknowledged a batch.",
            registry=registry,
        )
        self.last_round = Gauge(
            "blockprobe_probe_last_round_timestamp_seconds", "When the last round ended.", registry=registry
        )
        self.round_seconds = Gauge(
            "blockprobe_probe_last_round_duration_seconds", "How long the last round took.", registry=registry
        )
        self.list_rejects = Counter(
            "blockprobe_probe_lists_rejected", "Changed lists files rejected as invalid.", registry=registry
        )
        # Mode slices: the per-name scheduler's health per lane (resolver × endpoint, fixed by
        # the config for the daemon's life), set on the loop at each slice.
        self.schedule_behind = Gauge(
            "blockprobe_probe_schedule_behind_seconds",
            "Seconds of rotation a lane owes (0 when on pace to measure every name within full_pass).",
            ["resolver", "endpoint"],
            registry=registry,
        )
        self.schedule_fast = Gauge(
            "blockprobe_probe_schedule_fast_lane_names",
            "Names of recent orders measured every fast_interval on the lane until enforced there.",
            ["resolver", "endpoint"],
            registry=registry,
        )
        self.schedule_progress = Gauge(
            "blockprobe_probe_schedule_pass_progress",
            "Share of the names measured in the lane's current pass (0 to 1).",
            ["resolver", "endpoint"],
            registry=registry,
        )
        self.schedule_passes = Counter(
            "blockprobe_probe_schedule_passes",
            "Passes over every name completed on a lane.",
            ["resolver", "endpoint"],
            registry=registry,
        )
        self._passes: dict[tuple[str, str], int] = {}
        self.over_budget = Gauge(
            "blockprobe_probe_schedule_over_budget",
            "1 while the loaded lists (those from the collector included) cannot be measured within "
            "full_pass at the configured qps, else 0.",
            registry=registry,
        )
        self.unhealthy = Counter(
            "blockprobe_probe_watchdog_withheld",
            "Watchdog pings withheld because the loop, the scheduler or a round was stuck.",
            registry=registry,
        )

    def schedule(self, lanes: list[LaneStatus]) -> None:
        for lane in lanes:
            key = (lane.resolver, lane.endpoint)
            self.schedule_behind.labels(*key).set(lane.behind)
            self.schedule_fast.labels(*key).set(lane.urgent)
            self.schedule_progress.labels(*key).set(lane.progress)
            done = lane.passes - self._passes.get(key, 0)
            if done > 0:  # counted from this start: a restart's scheduler begins a new pass
                self.schedule_passes.labels(*key).inc(done)
            self._passes[key] = lane.passes


ROUND_RESULTS = ("ok", "failed", "deadline", "cancelled")


class _SpoolFigures:
    """Figures kept by the spool, rendered at each scrape (client_python custom collector):
    the lifetime counts persist in the spool, so they only grow, across restarts."""

    def __init__(self, spool: Spool, dropped: Callable[[], dict[str, int]]) -> None:
        self.spool = spool
        self.dropped = dropped

    def collect(self) -> Iterator[Metric]:
        totals = self.spool.totals()
        for name, key, help_text in (
            (
                "measurements_written",
                "written_total",
                "Measurements written to the spool, over the probe's life.",
            ),
            (
                "measurements_pushed",
                "pushed_total",
                "Measurements acknowledged by the collector, over the probe's life.",
            ),
            (
                "measurements_quarantined",
                "quarantined_total",
                "Measurements the collector refused for good, set aside in the quarantine, over the probe's life.",
            ),
            (
                "unclean_starts",
                "unclean_starts_total",
                "Starts after a run that did not stop cleanly (kill -9, a watchdog restart, power loss).",
            ),
            ("rounds_started", "rounds_total", "Measurement rounds started, over the probe's life."),
        ):
            yield CounterMetricFamily(f"blockprobe_probe_{name}", help_text, value=totals.get(key, 0))
        yield GaugeMetricFamily(
            "blockprobe_probe_spool_results",
            "Results in the spool, not yet acknowledged.",
            value=self.spool.depth(),
        )
        yield GaugeMetricFamily(
            "blockprobe_probe_quarantine_results",
            "Results in the quarantine.",
            value=self.spool.quarantine_depth(),
        )
        dropped = CounterMetricFamily(
            "blockprobe_probe_spool_dropped",
            "Results dropped because the spool was full, over the probe's life.",
            labels=["finding"],
        )
        for finding, n in sorted(self.dropped().items()):
            dropped.add_metric([finding], n)
        yield dropped


def _release_memory() -> None:
    """Give a round's garbage back to the OS: a probe idles between rounds for minutes, on small
    machines, and glibc keeps freed heap otherwise."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# Measurements are handed to the spool thread in chunks of this many, or every second,
# whichever comes first (a timer flushes even while every query hangs): a kill -9 loses at
# most the last second's measurements.
CHUNK = 500
FLUSH_EVERY = 1.0
# At stop, how long a cancelled round may take to end; one that ignores its cancellation
# (stuck outside the loop's reach) is left behind, and what it measured is written anyway.
CANCEL_WAIT = 5.0
# A round still running this long past its deadline did not obey its cancellation: the
# watchdog stops pinging and systemd restarts the service.
DEADLINE_SLACK = 60.0


def _cached_lists(config: Config) -> tuple[Path, ...]:
    """The collector's lists as last fetched, when they load together with the local ones; a
    damaged or conflicting cache is skipped (and said), never a reason to refuse to start: the
    next fetch rewrites it."""
    cached = collector_lists(config)
    if cached:
        try:
            load_lists([*config.lists, *cached])
        except ListsError as exc:
            log.error(
                "cached lists from the collector skipped until the next fetch: %s", "; ".join(exc.errors)
            )
            return ()
    return cached


class Daemon:
    """One probe: scheduler, engine options, spool and pusher. Use `await run()`."""

    def __init__(self, config: Config, *, notifier: Notifier | None = None) -> None:
        self.config = config
        self.spool = Spool(config.state_dir / "spool.sqlite3", config.spool_max_rows)
        self.unclean_start = self.spool.mark_start()
        self.writer = SpoolThread(self.spool)
        self.registry = CollectorRegistry()
        self.metrics = _Metrics(self.registry)
        self._dropped: dict[str, int] = self.spool.dropped()
        self.registry.register(_SpoolFigures(self.spool, lambda: dict(self._dropped)))
        self.sched: Scheduler | None = None  # mode slices, once lists are loaded
        self._slice_stop: datetime | None = None  # when the running slice's time is up
        self.pusher = (
            Pusher(config, self.writer, on_failure=lambda r: self.metrics.push_failures.labels(r).inc())
            if config.collector
            else None
        )
        self.notifier = notifier or Notifier()
        self.options = Options(
            timeout=config.timeout,
            ca_file=config.ca_file,
            udp_linger=config.udp_linger,
            confirm_after=config.confirm_after,
        )
        v = config.verify
        # One checker for the daemon's life: its cache is what keeps a name answered alike by
        # every resolver, round after round, at one check per address per `ttl`.
        self.checker = (
            AnswerChecker(
                v.mode,
                ca_file=config.ca_file,
                timeout=config.timeout,
                ttl=v.ttl,
                concurrency=v.concurrency,
                rate=v.rate,
            )
            if v.mode != "off"
            else None
        )
        self.lists: Lists | None = None
        self.orders: OrderIndex | None = None  # one index per lists load, not per round
        self._list_mtimes: dict[Path, float] = {}
        self._budget_problem: str | None = None  # as last written to the spool's meta
        self.stop_event = asyncio.Event()
        # The collector's lists as last fetched: in force from the start, so a restart while
        # the collector is down keeps measuring its orders (the next fetch replaces them).
        self.fetched_lists: tuple[Path, ...] = _cached_lists(config)
        self._lists_etag: str | None = None
        self.rounds_done = 0
        self.rounds_hit_deadline = 0
        self._round_task: asyncio.Task[Any] | None = None
        self._round_started: float | None = None  # monotonic
        self._scheduler_beat = time.monotonic()
        self._push_task: asyncio.Task[Any] | None = None
        self._flush_task: asyncio.Task[Any] | None = None
        self._push_wake = asyncio.Event()
        self.scheduler: AsyncIOScheduler | None = None
        # What was measured and not yet committed to the spool: the round appends to the
        # buffer; a flush moves it to `_unstored` under a chunk number, and the spool thread
        # deletes a chunk only once committed. Whatever is left when the daemon stops is
        # written then, so a cancelled round loses nothing and no chunk is written twice.
        self._buffer: list[tuple[str | None, str]] = []
        self._unstored: dict[int, list[tuple[str | None, str]]] = {}
        self._chunks = itertools.count()
        self._last_flush = time.monotonic()
        if self.unclean_start:
            log.warning("the previous run did not stop cleanly (kill -9, watchdog, power loss); counted")

    # lists -----------------------------------------------------------------------------
    @property
    def list_files(self) -> tuple[Path, ...]:
        return self.config.lists + self.fetched_lists

    def _mtimes(self) -> dict[Path, float]:
        out = {}
        for p in self.list_files:
            try:
                out[p] = p.stat().st_mtime
            except OSError:
                out[p] = -1.0
        return out

    def reload_lists(self, initial: bool = False) -> None:
        """Re-read the lists files if they changed; keep the old ones if the new ones are bad."""
        if not self.list_files:
            return
        mtimes = self._mtimes()
        if not initial and mtimes == self._list_mtimes:
            return
        try:
            lists = load_lists(self.list_files)
        except ListsError as exc:
            self._list_mtimes = mtimes  # do not re-log the same bad file every few seconds
            if initial:
                raise
            self.metrics.list_rejects.inc()
            log.error("changed lists rejected, the previous lists stay in force: %s", "; ".join(exc.errors))
            return
        self._list_mtimes = mtimes
        if self.config.mode == "slices":
            names = len(lists.query_names())
            _, problems = schedule_budget(self.config, names)
            if problems and initial:
                # Refused like bad lists (exit 2): the same check as `probe check-config`.
                raise ListsError([f"{self.config.source}: {p}" for p in problems])
            # Lists grew past the budget while running (the collector's, typically: they are
            # not known at start): measuring them late still beats ignoring a new order. Said
            # in the log, the metric and `probe status`; the lag shows per lane in
            # blockprobe_probe_schedule_behind_seconds.
            self._over_budget(problems, names)
        self.lists = lists
        self.orders = OrderIndex(lists)
        log.info("lists loaded: %d orders, %d control lists", len(lists.orders), len(lists.controls))
        if self.config.mode == "slices":
            now = datetime.now(UTC)
            if self.sched is None:
                self.sched = Scheduler(
                    lists,
                    country=self.config.country,
                    resolvers=self.config.resolvers,
                    qtypes=self.config.qtypes,
                    now=now,
                    qps=self.config.qps,
                    settings=self.config.settings,
                    expectations=self.orders,
                )
            else:
                self.sched.update_lists(lists, now, self.orders)
            self.metrics.schedule(self.sched.status(now))
            self._wake_slice()

    def _over_budget(self, problems: list[str], names: int) -> None:
        self.metrics.over_budget.set(1 if problems else 0)
        said = "; ".join(problems)
        if said != self._budget_problem:
            self._budget_problem = said
            self.writer.submit(self.spool.set_meta, "schedule_over_budget", said)
        whose = " (with those from the collector)" if self.fetched_lists else ""
        for problem in problems:
            log.error(
                "the lists%s, %d names, cannot be measured within full_pass; measured anyway, late: %s",
                whose,
                names,
                problem,
            )

    # work ------------------------------------------------------------------------------
    def _expect_fn(self) -> ExpectFn:
        orders = self.orders
        country = self.config.country

        def expect(domain: str, resolver: Resolver) -> tuple[Expectation | None, dict[str, Any] | None]:
            if orders is None:
                return None, None
            # Asked as each query leaves: an order that starts binding mid-round must not turn
            # prompt enforcement into an overblock (`now` is only the round's start).
            return orders.expect(country, resolver.kind, resolver.operator, domain, datetime.now(UTC))

        return expect

    def plan(self) -> Plan:
        """A round: every listed name on every endpoint."""
        names = self.lists.query_names() if self.lists else []
        return Plan(
            names,
            self.config.qtypes,
            self.config.resolvers,
            self.config.controls,
            self._expect_fn(),
            self.config.canaries,
        )

    def slice_plan(self, now: datetime) -> Plan | None:
        """A slice: what the scheduler says is due until the slice's time is up or an order
        changes, whichever is first; None when nothing is due. Canaries go with every slice
        that measures: the engine makes findings inconclusive only for the run whose canary
        failed, so a slice without them could report what a failing canary would have voided."""
        sched = self.sched
        stop = now + timedelta(seconds=self.config.slice)
        self._slice_stop = stop
        if sched is None:  # no lists (yet: they may come from the collector): nothing is due
            return None
        change = sched.next_change(now)
        if change is not None and now < change < stop:
            stop = change
        batch = sched.next_batch(now, (stop - now).total_seconds())
        change = sched.next_change(now)  # next_batch may have moved on to the next change
        if change is not None and now < change < stop:
            stop = change
        self._slice_stop = stop
        self.metrics.schedule(sched.status(now))
        if not batch:
            return None
        return Plan(
            (),
            self.config.qtypes,
            self.config.resolvers,
            self.config.controls,
            self._expect_fn(),
            self.config.canaries,
            targets=batch,
        )

    async def round(self) -> None:
        """One measurement round, cut at its deadline; every measurement reaches the spool."""
        started, wall = time.monotonic(), time.time()
        self._round_started = started
        number = await self.writer.call(self.spool.next_round)
        slices = self.config.mode == "slices"
        plan = self.slice_plan(datetime.now(UTC)) if slices else self.plan()
        sched = self.sched if slices else None
        extra = {"probe": self.config.probe_id, "region": self.config.region, "country": self.config.country}
        measured = 0
        result = "ok"
        deadline = asyncio.timeout(self.config.round_deadline)
        try:
            async with deadline:
                if plan is not None:
                    async with Engine(
                        self.options,
                        concurrency=self.config.concurrency,
                        qps=self.config.qps,
                        checker=self.checker,
                        # Answer checks end in time for every held answer to reach the spool.
                        deadline=self.config.round_deadline,
                    ) as engine:
                        async for m in engine.run(plan):
                            self.metrics.queries.labels(str(m.transport), str(m.outcome)).inc()
                            if sched is not None:
                                # As they come: a slice cut at its deadline still counts what it got.
                                sched.record(datetime.now(UTC), (m,))
                            # A resolver may send anything: cut it to what the collector accepts.
                            self._buffer.append(encode(clamp({**m.to_json(), **extra})))
                            measured += 1
                            if (
                                len(self._buffer) >= CHUNK
                                or time.monotonic() - self._last_flush > FLUSH_EVERY
                            ):
                                await self._flush()
        except TimeoutError:
            if not deadline.expired():
                result = "failed"
                log.exception("round %d failed", number)
            else:
                result = "deadline"
                self.rounds_hit_deadline += 1
                log.error(
                    "round %d hit its deadline of %gs: %d measurements kept, the rest not measured",
                    number,
                    self.config.round_deadline,
                    measured,
                )
        except Exception:
            result = "failed"
            log.exception("round %d failed after %d measurements (they are kept)", number, measured)
        finally:
            self._round_started = None
        await self._flush()
        self.rounds_done += 1
        self.metrics.rounds.labels(result).inc()
        self.metrics.last_round.set(time.time())
        self.metrics.round_seconds.set(time.monotonic() - started)
        await self.writer.call(self.spool.set_meta, "last_round", str(time.time()))
        if result == "deadline":
            await self.writer.call(self.spool.set_meta, "last_round_deadline", str(wall))
        if plan is None:  # a slice with nothing due: every few seconds, not worth a line or a trim
            log.debug("slice %d: nothing due", number)
            return
        self._push_wake.set()
        log.info(
            "%s %d: %d measurements in %.1fs (%s)",
            "slice" if slices else "round",
            number,
            measured,
            time.monotonic() - started,
            result,
        )
        _release_memory()

    async def _flush(self) -> None:
        """Hand the buffer to the spool thread and wait until it is committed (backpressure)."""
        self._last_flush = time.monotonic()
        if self._buffer:
            self._unstored[next(self._chunks)] = self._buffer
            self._buffer = []
        if self._unstored:
            try:
                await self.writer.call(self._write_unstored)
            except sqlite3.Error:
                # Not committed: the chunks stay in `_unstored` and go with the next flush.
                log.exception("could not write to the spool; will try again")

    async def _flush_loop(self) -> None:
        """Every second, whatever the round is doing: a round whose queries hang yields no
        measurement that would trigger the round's own flush, and a kill -9 or a watchdog
        restart would lose what it holds."""
        while not self.stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_EVERY):
                    await self.stop_event.wait()
            if self._buffer and time.monotonic() - self._last_flush >= FLUSH_EVERY:
                try:
                    await self._flush()
                except Exception:  # a bug here must not end the flushes for the probe's life
                    log.exception("timed flush failed")

    def _write_unstored(self) -> int:
        """In the spool thread: commit every pending chunk, oldest first. A chunk leaves
        `_unstored` only after its commit, and only this thread removes chunks."""
        dropped = 0
        for cid in sorted(list(self._unstored)):
            dropped += self.spool.add_encoded(self._unstored[cid])
            del self._unstored[cid]
        if dropped:
            self._dropped = self.spool.dropped()
        return dropped

    async def push(self) -> None:
        """Push everything waiting (until the collector fails or the spool is empty)."""
        if self.pusher is None:
            return
        out = await self.pusher.push()
        if out.sent_batches:
            self.metrics.pushed.inc(out.sent_results)
            self.metrics.last_push.set(time.time())
        if out.quarantined or out.sent_batches:
            await self.writer.call(self.spool.refresh_quarantine_depth)

    async def _push_loop(self) -> None:
        """Push, then sleep: until the backoff ends while the collector fails, else until the
        push interval passes or a round ends."""
        assert self.pusher is not None
        while not self.stop_event.is_set():
            try:
                await self.push()
            except Exception:  # a bug must not end pushing for the rest of the probe's life
                log.exception("push failed unexpectedly")
            wait = self.pusher.backoff.remaining() or self.config.push_interval
            self._push_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    if self.pusher.unreachable and self.pusher.backoff.remaining() > REACHABLE_EVERY:
                        await self._until_reachable()
                    else:
                        await self._push_wake.wait()

    async def _until_reachable(self) -> None:
        """Look every second whether the collector answers again (cheap: a refused connection
        costs nothing); when it does, the backoff ends and the backlog goes at once."""
        assert self.pusher is not None
        while not self.stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REACHABLE_EVERY):
                    await self.stop_event.wait()
            if await self.pusher.answers():
                log.info("the collector answers again: pushing now")
                self.pusher.backoff.succeeded()
                return

    async def fetch_lists(self) -> None:
        """Lists published by the collector: written to the state directory when they validate."""
        if self.pusher is None:
            return
        try:
            etag, files = await self.pusher.fetch_lists(self._lists_etag)
        except Exception as exc:  # noqa: BLE001 - the collector may be down or hostile: keep what we have
            log.warning("could not fetch lists from the collector: %s", exc)
            return
        if files is None:
            return
        folder = self.config.state_dir / COLLECTOR_LISTS
        try:
            candidate = [parse_lists(text, f"collector:{name}") for name, text in files]
            del candidate
        except ListsError as exc:
            self.metrics.list_rejects.inc()
            log.error(
                "lists from the collector rejected, the previous lists stay in force: %s",
                "; ".join(exc.errors),
            )
            self._lists_etag = etag
            return
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, text in files:
            target = folder / Path(name).name
            tmp = target.with_suffix(target.suffix + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(target)  # atomic: a reader sees the old file or the new one
            paths.append(target)
        for stale in set(collector_lists(self.config)) - set(paths):
            # No longer published (an order withdrawn): it must not come back at a restart.
            with contextlib.suppress(OSError):
                stale.unlink()
        self.fetched_lists = tuple(paths)
        self._lists_etag = etag
        log.info("lists fetched from the collector: %s", ", ".join(p.name for p in paths))
        self.reload_lists()

    async def _reload_job(self) -> None:
        # A coroutine, so APScheduler runs it on the loop with everything else, not in a thread.
        self.reload_lists()

    def _wake_slice(self) -> None:
        """New lists: the next slice now rather than when the current wait ends, so a new
        order's names are not held back by a slice planned without them."""
        if self._round_task is not None:
            self._slice_stop = datetime.now(UTC)  # running: the next one starts as it ends
            return
        if self.scheduler is not None and self.scheduler.running:
            with contextlib.suppress(Exception):  # the job is gone while stopping: nothing to wake
                self.scheduler.modify_job("round", next_run_time=datetime.now(UTC))

    def _slice_done(self, event: JobExecutionEvent) -> None:
        """After a slice, the next one starts when its time is up (at an order change if that
        comes first), or at once when it ran over: the interval trigger alone would leave a
        slice that ran long idle until the next tick, and start late at an effective instant.
        A listener, not code in the job: APScheduler counts the job as running until it
        returns, and would skip a start asked for from inside it."""
        if event.job_id != "round" or self.stop_event.is_set() or self.scheduler is None:
            return
        now = datetime.now(UTC)
        when = max(now, self._slice_stop or now)
        if self.sched is not None and (change := self.sched.next_change(now)) is not None:
            when = max(now, min(when, change))
        with contextlib.suppress(Exception):  # stopping: the job may already be gone
            self.scheduler.modify_job("round", next_run_time=when)

    async def _round_job(self) -> None:
        if self.stop_event.is_set():
            return  # dispatched just before the stop, started after it
        self._round_task = asyncio.current_task()
        try:
            await self.round()
        finally:
            self._round_task = None

    async def _beat(self) -> None:
        # A job like any other: when the scheduler stops dispatching, the beat stops.
        self._scheduler_beat = time.monotonic()

    def healthy(self) -> str | None:
        """None when the loop, the scheduler and the round are healthy; else what is wrong."""
        now = time.monotonic()
        if self.scheduler is None or not self.scheduler.running:
            return "the scheduler is not running"
        if now - self._scheduler_beat > 3 * _BEAT + 5:
            return f"the scheduler has not run a job for {now - self._scheduler_beat:.0f}s"
        started = self._round_started
        if started is not None and now - started > self.config.round_deadline + DEADLINE_SLACK:
            return (
                f"a round has run {now - started:.0f}s, past its deadline of {self.config.round_deadline:g}s"
            )
        if self._push_task is not None and self._push_task.done():
            return "the push loop has ended"
        return None

    async def _watchdog(self, interval: float) -> None:
        """Ping systemd only while healthy: a stuck probe is then restarted (and the restart is
        counted at the next start). Running on the loop, a blocked loop pings nothing either."""
        said: str | None = None
        while not self.stop_event.is_set():
            problem = self.healthy()
            if problem is None:
                self.notifier.send("WATCHDOG=1")
            else:
                self.metrics.unhealthy.inc()
                if problem != said:
                    log.error("watchdog not pinged: %s", problem)
            said = problem
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.stop_event.wait()

    # lifecycle -------------------------------------------------------------------------
    async def run(self, *, grace: float = 10.0) -> None:
        """Run until SIGTERM/SIGINT (or stop_event). Everything measured is stored before it
        returns, whatever the grace; the round gets `grace` to finish, the final push too."""
        try:
            self.reload_lists(initial=True)
        except ListsError:
            # Refused to start (bad lists, exit 2): a clean stop, not one to count as a crash.
            await self.writer.call(self.spool.mark_stop)
            self.writer.shutdown()
            self.spool.close()
            raise
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread (in tests) only stop_event stops the daemon.
            with contextlib.suppress(RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stop_event.set)
        if self.config.metrics_listen:
            host, port = self.config.metrics_listen
            self._metrics_server = start_http_server(port, host, registry=self.registry)
        scheduler = self.scheduler = AsyncIOScheduler(timezone=UTC)
        now = datetime.now(UTC)
        slices = self.config.mode == "slices"
        every = self.config.slice if slices else self.config.interval
        scheduler.add_job(
            self._round_job,
            IntervalTrigger(seconds=every, jitter=None if slices else self.config.jitter),
            id="round",
            max_instances=1,
            coalesce=True,
            next_run_time=now,
            misfire_grace_time=max(1, int(every)),
        )
        if slices:
            scheduler.add_listener(self._slice_done, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
        if self.config.collector is not None and self.config.collector.fetch_lists:
            await self.fetch_lists()  # before the first round
            scheduler.add_job(
                self.fetch_lists,
                IntervalTrigger(seconds=60),
                id="fetch-lists",
                max_instances=1,
                coalesce=True,
            )
        scheduler.add_job(
            self._reload_job, IntervalTrigger(seconds=5), id="lists", max_instances=1, coalesce=True
        )
        scheduler.add_job(
            self._beat, IntervalTrigger(seconds=_BEAT), id="beat", max_instances=1, coalesce=True
        )
        scheduler.start()
        self._scheduler_beat = time.monotonic()
        if self.pusher is not None:
            self._push_task = asyncio.create_task(self._push_loop())
        self._flush_task = asyncio.create_task(self._flush_loop())
        watchdog = None
        if self.notifier.watchdog_interval:
            watchdog = asyncio.create_task(self._watchdog(self.notifier.watchdog_interval))
        self.notifier.send(
            "READY=1",
            f"STATUS=measuring in slices of {self.config.slice:g}s"
            if slices
            else f"STATUS=measuring every {self.config.interval:g}s",
        )
        log.info(
            "probe %s %s started: region %s, country %s, pid %d",
            self.config.probe_id,
            __version__,
            self.config.region,
            self.config.country,
            os.getpid(),
        )
        try:
            await self.stop_event.wait()
        finally:
            await self._stop(scheduler, watchdog, grace)

    async def _stop(
        self, scheduler: AsyncIOScheduler, watchdog: asyncio.Task[Any] | None, grace: float
    ) -> None:
        log.info("stopping")
        self.notifier.send("STOPPING=1")
        scheduler.shutdown(wait=False)
        task = self._round_task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), grace)
            except TimeoutError:
                task.cancel()
                # Bounded: a round that ignores its cancellation must not keep what it
                # measured from the disk (nor the process from ending).
                done, _ = await asyncio.wait({task}, timeout=CANCEL_WAIT)
                self.metrics.rounds.labels("cancelled").inc()
                if done:
                    log.warning("round abandoned after %.0fs grace; what it measured is kept", grace)
                else:
                    log.error(
                        "round abandoned after %.0fs grace and ignored its cancellation for %.0fs; "
                        "what it measured so far is kept",
                        grace,
                        CANCEL_WAIT,
                    )
        for side in (self._push_task, self._flush_task, watchdog):
            if side is not None:
                side.cancel()
                await asyncio.gather(side, return_exceptions=True)
        # Whatever the grace: every measurement made is written before the process ends.
        if self._buffer:
            self._unstored[next(self._chunks)] = self._buffer
            self._buffer = []
        try:
            await self.writer.call(self._write_unstored)
        except sqlite3.Error:
            lost = sum(len(c) for c in self._unstored.values())
            log.exception("could not write %d measurements to the spool at stop", lost)
        if self.pusher is not None:
            try:
                await asyncio.wait_for(self.push(), grace)
            except TimeoutError:
                log.warning("final push abandoned; the spool keeps the results for next start")
            await self.pusher.aclose()
        await self.writer.call(self.spool.mark_stop)
        self.writer.shutdown()
        self.spool.close()
        if self.config.metrics_listen:
            self._metrics_server[0].shutdown()
            self._metrics_server[0].server_close()
        log.info("stopped")
