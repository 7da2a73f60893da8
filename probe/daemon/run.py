"""`probe run`: measurement rounds and pushes on an APScheduler 3 schedule, durable in between.

A round is one engine run over every listed name, every resolver and transport; its
measurements go to the spool as they come. Rounds never overlap (max_instances=1,
coalesced); pushes run on their own interval. Lists files are re-read when they
change; a bad new file is rejected, logged and counted, and the old one stays in
force. SIGTERM stops the schedule, gives a running round a bounded grace, pushes what
it can in a bounded time, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from probe import __version__
from probe.daemon.config import Config
from probe.daemon.push import Pusher
from probe.daemon.spool import Spool
from probe.engine import Engine, Plan
from probe.expect import Expectations
from probe.lists import Lists, ListsError, load_lists, parse_lists
from probe.model import Expectation, Outcome, Transport
from probe.specs import Resolver
from probe.transports import Options

__all__ = ["Daemon", "setup_logging"]

log = logging.getLogger("probe.daemon")


class _JsonFormatter(logging.Formatter):
    def __init__(self, probe_id: str) -> None:
        super().__init__()
        self.probe_id = probe_id

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "probe": self.probe_id, "logger": record.name,
               "message": record.getMessage()}  # fmt: skip
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
        self.rounds = Counter("blockprobe_probe_rounds", "Measurement rounds run, by result.", ["result"],
                              registry=registry)  # fmt: skip
        self.queries = Counter("blockprobe_probe_queries", "Measurements made, by transport and outcome.",
                               ["transport", "outcome"], registry=registry)  # fmt: skip
        for t in Transport:
            for o in Outcome:
                self.queries.labels(str(t), str(o))
        self.spool = Gauge("blockprobe_probe_spool_results", "Results in the spool, not yet acknowledged.",
                           registry=registry)  # fmt: skip
        self.dropped = Counter("blockprobe_probe_spool_dropped", "Results dropped because the spool was full.",
                               ["finding"], registry=registry)  # fmt: skip
        self.push_failures = Counter("blockprobe_probe_push_failures", "Failed pushes, by reason.", ["reason"],
                                     registry=registry)  # fmt: skip
        self.pushed = Counter("blockprobe_probe_pushed_results", "Results acknowledged by the collector.",
                              registry=registry)  # fmt: skip
        self.last_push = Gauge("blockprobe_probe_last_push_timestamp_seconds",
                               "When the collector last acknowledged a batch.", registry=registry)  # fmt: skip
        self.last_round = Gauge("blockprobe_probe_last_round_timestamp_seconds", "When the last round ended.",
                                registry=registry)  # fmt: skip
        self.round_seconds = Gauge("blockprobe_probe_last_round_duration_seconds", "How long the last round took.",
                                   registry=registry)  # fmt: skip
        self.list_rejects = Counter("blockprobe_probe_lists_rejected", "Changed lists files rejected as invalid.",
                                    registry=registry)  # fmt: skip


def _release_memory() -> None:
    """Give a round's garbage back to the OS: a probe idles between rounds for minutes, on small
    machines, and glibc keeps freed heap otherwise."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Daemon:
    """One probe: scheduler, engine options, spool and pusher. Use `await run()`."""

    def __init__(
        self, config: Config, *, push_base_delay: float = 2.0, push_max_delay: float = 300.0
    ) -> None:
        self.config = config
        self.spool = Spool(config.state_dir / "spool.sqlite3", config.spool_max_rows)
        self.registry = CollectorRegistry()
        self.metrics = _Metrics(self.registry)
        self.pusher = (
            Pusher(
                config,
                self.spool,
                base_delay=push_base_delay,
                max_delay=push_max_delay,
                on_failure=lambda r: self.metrics.push_failures.labels(r).inc(),
            )
            if config.collector
            else None
        )
        self.options = Options(timeout=config.timeout, ca_file=config.ca_file, udp_linger=config.udp_linger)
        self.lists: Lists | None = None
        self._list_mtimes: dict[Path, float] = {}
        self.stop_event = asyncio.Event()
        self.fetched_lists: tuple[Path, ...] = ()
        self._lists_etag: str | None = None
        self.rounds_done = 0
        self._dropped_seen: dict[str, int] = self.spool.dropped()
        self._round_task: asyncio.Task[Any] | None = None

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
        self.lists = lists
        log.info("lists loaded: %d orders, %d control lists", len(lists.orders), len(lists.controls))

    # work ------------------------------------------------------------------------------
    def plan(self, now: datetime) -> Plan:
        lists = self.lists
        names = lists.query_names() if lists else []
        country = self.config.country
        engine = Expectations(lists) if lists else None

        def expect(domain: str, resolver: Resolver) -> tuple[Expectation | None, dict[str, Any] | None]:
            if engine is None:
                return None, None
            return engine.expect(country, resolver.kind, resolver.operator, domain, now)

        return Plan(names, self.config.qtypes, self.config.resolvers, self.config.controls, expect,
                    self.config.canaries)  # fmt: skip

    async def round(self) -> None:
        """One measurement round; every measurement reaches the spool before the round ends."""
        started = time.time()
        plan = self.plan(datetime.now(UTC))
        extra = {"probe": self.config.probe_id, "region": self.config.region, "country": self.config.country}
        batch: list[dict[str, Any]] = []
        stored = 0
        try:
            async with Engine(
                self.options, concurrency=self.config.concurrency, qps=self.config.qps
            ) as engine:
                async for m in engine.run(plan):
                    self.metrics.queries.labels(str(m.transport), str(m.outcome)).inc()
                    batch.append({**m.to_json(), **extra})
                    if len(batch) >= 500:
                        stored += self._store(batch)
                        batch = []
            stored += self._store(batch)
        except Exception:
            self._store(batch)
            self.metrics.rounds.labels("failed").inc()
            log.exception("round failed")
            return
        self.rounds_done += 1
        self.metrics.rounds.labels("ok").inc()
        self.metrics.last_round.set(time.time())
        self.metrics.round_seconds.set(time.time() - started)
        self.spool.set_meta("last_round", str(time.time()))
        log.info("round %d: %d measurements in %.1fs", self.rounds_done, stored, time.time() - started)
        _release_memory()

    def _store(self, batch: list[dict[str, Any]]) -> int:
        if not batch:
            return 0
        dropped = self.spool.add(batch)
        if dropped:
            for finding, n in self.spool.dropped().items():  # lifetime totals, kept in the spool
                seen = self._dropped_seen.get(finding, 0)
                if n > seen:
                    self.metrics.dropped.labels(finding).inc(n - seen)
                    self._dropped_seen[finding] = n
        self.metrics.spool.set(self.spool.depth())
        return len(batch)

    async def push(self) -> None:
        if self.pusher is None:
            return
        out = await self.pusher.push()
        if out.sent_batches:
            self.metrics.pushed.inc(out.sent_results)
            self.metrics.last_push.set(time.time())
        self.metrics.spool.set(self.spool.depth())

    async def fetch_lists(self) -> None:
        """Lists published by the collector: written to the state directory when they validate."""
        if self.pusher is None:
            return
        try:
            etag, files = await self.pusher.fetch_lists(self._lists_etag)
        except Exception as exc:  # the collector may be down: keep what we have
            log.warning("could not fetch lists from the collector: %s", exc)
            return
        if files is None:
            return
        folder = self.config.state_dir / "collector-lists"
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
        self.fetched_lists = tuple(paths)
        self._lists_etag = etag
        log.info("lists fetched from the collector: %s", ", ".join(p.name for p in paths))
        self.reload_lists()

    async def _reload_job(self) -> None:
        # A coroutine, so APScheduler runs it on the loop with everything else, not in a thread.
        self.reload_lists()

    async def _round_job(self) -> None:
        self._round_task = asyncio.current_task()
        try:
            await self.round()
        finally:
            self._round_task = None

    # lifecycle -------------------------------------------------------------------------
    async def run(self, *, grace: float = 10.0) -> None:
        """Run until SIGTERM/SIGINT (or stop_event); exit cleanly within about grace + push timeout."""
        self.reload_lists(initial=True)
        self.metrics.spool.set(self.spool.depth())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread (in tests) only stop_event stops the daemon.
            with contextlib.suppress(RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stop_event.set)
        if self.config.metrics_listen:
            host, port = self.config.metrics_listen
            self._metrics_server = start_http_server(port, host, registry=self.registry)
        scheduler = AsyncIOScheduler(timezone=UTC)
        now = datetime.now(UTC)
        scheduler.add_job(self._round_job, IntervalTrigger(seconds=self.config.interval, jitter=self.config.jitter),
                          id="round", max_instances=1, coalesce=True, next_run_time=now,
                          misfire_grace_time=max(1, int(self.config.interval)))  # fmt: skip
        if self.pusher is not None:
            scheduler.add_job(self.push, IntervalTrigger(seconds=self.config.push_interval), id="push",
                              max_instances=1, coalesce=True, next_run_time=now)  # fmt: skip
        if self.config.collector is not None and self.config.collector.fetch_lists:
            await self.fetch_lists()  # before the first round
            scheduler.add_job(self.fetch_lists, IntervalTrigger(seconds=60), id="fetch-lists", max_instances=1,
                              coalesce=True)  # fmt: skip
        scheduler.add_job(
            self._reload_job, IntervalTrigger(seconds=5), id="lists", max_instances=1, coalesce=True
        )
        scheduler.start()
        log.info("probe %s %s started: region %s, country %s, pid %d", self.config.probe_id, __version__,
                 self.config.region, self.config.country, os.getpid())  # fmt: skip
        try:
            await self.stop_event.wait()
        finally:
            log.info("stopping")
            scheduler.shutdown(wait=False)
            task = self._round_task
            if task is not None and not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), grace)
                except TimeoutError:
                    task.cancel()  # what the round stored so far stays in the spool
                    await asyncio.gather(task, return_exceptions=True)
                    log.warning("round abandoned after %.0fs grace", grace)
            if self.pusher is not None:
                try:
                    await asyncio.wait_for(self.pusher.push(), grace)
                except TimeoutError:
                    log.warning("final push abandoned; the spool keeps the results for next start")
                await self.pusher.aclose()
            self.spool.close()
            if self.config.metrics_listen:
                self._metrics_server[0].shutdown()
                self._metrics_server[0].server_close()
            log.info("stopped")
