"""The engine: fan out domains × qtypes × resolvers × transports, gather evidence, judge, never raise.

A run reads as its phases:
1. identity checks on plain endpoints that claim a catalogue operator (started at once);
2. canaries, whose failure makes an endpoint's findings inconclusive (no confirmation pass:
   the run waits for them, and an unconfirmed silence can only make findings inconclusive);
3. the first pass over the plan; each (name, type) gets its control baseline on first use;
4. the confirmation pass: every query still without a response is asked once more, per
   endpoint on one fresh connection (docs/measurement.md);
5. the judgement of what had to wait for the whole run (silences, EDE 18), by `probe.judge`;
6. answer checks, when a checker is given: the addresses of resolved answers with an
   expectation are checked on port 443 after the DNS round, so they never delay it. With a
   `deadline`, checks stop a fifth of it before its end (or are never started once that
   point has passed) and what they held is judged without them (`reach: unchecked`, the
   reason in `evidence.answer_checks_skipped`), so a run cut at its deadline loses no DNS
   measurement to its checks.

A fixed pool of workers pulls jobs from a lazy plan; a global limit (the pool size) and
a per-endpoint rate limit keep a probe from hammering anyone; measurements leave through
a bounded queue, and at most `queue_size` of them wait for a racing UDP answer (linger) at
once, so a slow consumer slows the run instead of growing memory. What is held for the
end of the run is the exception, and grows with the plan: silences and EDE 18 answers
(phases 4 and 5), and, with answer checks, every resolved answer of a listed name until its
checks (phase 6). Every endpoint gets one exchanger for the run, which owns its
connection reuse.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from probe.answers import AddressCheck, AnswerChecker, addresses_of, same_addresses
from probe.classify import ControlResult, Verdict, verdict_of
from probe.fingerprints import Fingerprints, load_fingerprints
from probe.identity import IDENTITY_PROBES, Canary, Identity, identity_of
from probe.identity import PLAIN as PLAIN_TRANSPORTS
from probe.judge import (
    Attempt,
    Observation,
    asking_again_cannot_change,
    control_checks_matter,
    judge,
    waits_for_the_run,
)
from probe.model import Expectation, Measurement, Outcome, Transport
from probe.specs import Endpoint, Resolver
from probe.transports import Exchange, Exchanger, Failure, FailureKind, Loss, Options, Phase, make_exchanger
from probe.wire import build_query

__all__ = ["Engine", "ExpectFn", "Plan", "RateLimiter", "control_endpoint"]

log = logging.getLogger(__name__)

# (domain, resolver) -> (expectation, why): None when nothing is expected.
ExpectFn = Callable[[str, Resolver], tuple[Expectation | None, dict[str, Any] | None]]

_ENCRYPTED = frozenset({Transport.DOT, Transport.DOH, Transport.DOH3, Transport.DOQ})
_CONTROL_PREFERENCE = (
    Transport.DOH,
    Transport.DOT,
    Transport.DOQ,
    Transport.TCP,
    Transport.UDP,
    Transport.DOH3,
)
# With a deadline, the share of it left after answer checks for judging and emitting what
# they held (and for the consumer to take it): checks are the part of a run that can wait.
_EMIT_SHARE = 0.2


# An ExpectFn: the engine passes (domain, resolver); with no expectation neither matters.
def _no_expectation(_domain: str, _resolver: Resolver) -> tuple[Expectation | None, dict[str, Any] | None]:
    return None, None


@dataclass(frozen=True, slots=True)
class Plan:
    """What one run measures."""

    domains: Sequence[str]
    qtypes: Sequence[str]
    resolvers: Sequence[Resolver]
    controls: Sequence[Resolver] = ()
    expect: ExpectFn = _no_expectation
    canaries: Sequence[Canary] = ()
    check_identity: bool = True
    # When set, only these (domain, resolver, endpoint) are measured (× qtypes), instead of
    # every domain on every endpoint: what a scheduler that works per name and endpoint hands in.
    targets: Sequence[tuple[str, Resolver, Endpoint]] | None = None

    @property
    def size(self) -> int:
        if self.targets is not None:
            return len(self.targets) * len(self.qtypes) + len(self.canaries) * sum(
                len(r.endpoints) for r in self.resolvers
            )
        per_name = len(self.qtypes) * sum(len(r.endpoints) for r in self.resolvers)
        return len(self.domains) * per_name + len(self.canaries) * sum(
            len(r.endpoints) for r in self.resolvers
        )


def control_endpoint(resolver: Resolver) -> Endpoint:
    """The endpoint a control is asked over: encrypted first, so the local network cannot bend it."""
    for transport in _CONTROL_PREFERENCE:
        for ep in resolver.endpoints:
            if ep.transport is transport:
                return ep
    return resolver.endpoints[0]


class RateLimiter:
    """Queries per second for one endpoint, spaced evenly (a virtual-time token bucket)."""

    def __init__(self, qps: float) -> None:
        self.interval = 1.0 / qps
        self._next = 0.0

    async def acquire(self) -> None:
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


class _Site:
    """One endpoint's state in a run, looked up once per job instead of hashing the endpoint
    for every dict a measurement touches."""

    __slots__ = ("encrypted", "endpoint", "exchanger", "limiter", "name", "paced", "plain_answers")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.name = str(endpoint)
        self.encrypted = endpoint.transport in _ENCRYPTED
        self.plain_answers = 0  # responses without EDE 18: the rule for a name-specific 18
        self.exchanger: Exchanger | None = None  # the engine's, once the first query asked for it
        self.limiter: RateLimiter | None = None
        self.paced = False  # `limiter` has been looked up


@dataclass(slots=True)
class _Job:
    domain: str
    qtype: str
    resolver: Resolver
    endpoint: Endpoint
    site: _Site
    canary: Expectation | None = None
    sent_at: str = ""
    first_sent: float = 0.0  # loop time of the first send, for the confirmation's delay
    expected: Expectation | None = None
    expected_by: dict[str, Any] | None = None
    attempts: list[Attempt] = field(default_factory=list)
    exchange: Exchange | None = None
    lates: list[tuple[int, asyncio.Future[bytes]]] = field(default_factory=list)
    unchecked: str | None = None  # why a check it would have had was not made
    result: Measurement | None = None  # phase 6: judged with its checks, not yet emitted
    emitted: bool = False  # phase 6: on its way to the consumer


@dataclass(slots=True)
class _Run:
    """What the judgement of a measurement may depend on, gathered during the run."""

    plan: Plan
    controls: dict[tuple[str, str], asyncio.Future[ControlResult | None]] = field(default_factory=dict)
    identities: asyncio.Future[dict[Endpoint, Identity]] | None = None
    canary_failures: dict[Endpoint, str] = field(default_factory=dict)
    loss: dict[Endpoint, Loss] = field(default_factory=dict)
    sites: dict[Endpoint, _Site] = field(default_factory=dict)
    held: list[_Job] = field(default_factory=list)
    to_check: list[_Job] = field(default_factory=list)
    check_stop: float | None = None  # loop time after which no answer check starts or goes on

    def site(self, endpoint: Endpoint) -> _Site:
        site = self.sites.get(endpoint)
        if site is None:
            site = self.sites[endpoint] = _Site(endpoint)
        return site


@dataclass(slots=True)
class Stats:
    planned: int = 0
    done: int = 0
    internal_errors: int = 0
    confirmations: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)


_last_stamp: tuple[int, str] = (0, "")


def _now() -> str:
    """RFC 3339 UTC to the millisecond; formatted once per millisecond, not once per query."""
    global _last_stamp
    ms = time.time_ns() // 1_000_000
    if ms != _last_stamp[0]:
        text = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
        _last_stamp = (ms, text.replace("+00:00", "Z"))
    return _last_stamp[1]


class Engine:
    """Owns the exchangers, limits and workers of a run; use as `async with Engine(...)`."""

    def __init__(
        self,
        options: Options | None = None,
        *,
        concurrency: int = 64,
        qps: float | None = 20.0,
        fingerprints: Fingerprints | None = None,
        queue_size: int = 1024,
        checker: AnswerChecker | None = None,
        deadline: float | None = None,
    ) -> None:
        """`deadline`: seconds each run may take (the daemon's round deadline); it bounds the
        answer checks, never the DNS queries, which have their own per-attempt deadlines."""
        if deadline is not None and deadline <= 0:
            raise ValueError(f"deadline: {deadline!r} is not a positive number of seconds")
        self.options = options or Options()
        self.concurrency = max(1, concurrency)
        self.default_qps = qps
        self.fingerprints = fingerprints or load_fingerprints()
        self.queue_size = max(1, queue_size)
        self.deadline = deadline
        self.checker = checker if checker is not None and checker.enabled else None
        self._exchangers: dict[Endpoint, Exchanger] = {}
        self._limiters: dict[Endpoint, RateLimiter | None] = {}
        self.stats = Stats()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        exchangers, self._exchangers = list(self._exchangers.values()), {}
        await asyncio.gather(*(e.aclose() for e in exchangers), return_exceptions=True)

    def exchanger(self, endpoint: Endpoint) -> Exchanger:
        ex = self._exchangers.get(endpoint)
        if ex is None:
            ex = self._exchangers[endpoint] = make_exchanger(endpoint, self.options)
        return ex

    def _limiter(self, endpoint: Endpoint) -> RateLimiter | None:
        if endpoint in self._limiters:
            return self._limiters[endpoint]
        qps = endpoint.qps or self.default_qps
        limiter = self._limiters[endpoint] = RateLimiter(qps) if qps else None
        return limiter

    async def query(
        self, endpoint: Endpoint, domain: str, qtype: str, exchanger: Exchanger | None = None
    ) -> Exchange:
        """One query through the endpoint's exchanger (or the one given), after its rate limit."""
        limiter = self._limiter(endpoint)
        if limiter is not None:
            await limiter.acquire()
        query = build_query(domain, qtype, endpoint.transport in _ENCRYPTED)
        ex = exchanger or self.exchanger(endpoint)
        result = await ex.exchange(query)
        if result.response is not None:
            ex.witness = query  # a question this endpoint answers: the witness for later silences
        return result

    async def _pool(self, jobs: Iterator[Any], work: Callable[[Any], Awaitable[None]]) -> None:
        async def worker() -> None:
            for job in jobs:  # a shared iterator: each job is taken by exactly one worker
                await work(job)

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    async def run(self, plan: Plan) -> AsyncIterator[Measurement]:
        """Measure the plan; measurements come out as they are judged, silences last."""
        queue: asyncio.Queue[Measurement | None] = asyncio.Queue(self.queue_size)
        producer = asyncio.ensure_future(self._produce(plan, _Outlet(queue)))
        closers: list[asyncio.Future[None]] = []
        # The end-of-run mark is queued once the producer is done, however it ended; it waits
        # for room like any measurement, so a full queue cannot lose it or block the producer.
        producer.add_done_callback(lambda _f: closers.append(asyncio.ensure_future(queue.put(None))))
        try:
            # What is queued already is taken without a coroutine per measurement.
            while (item := queue.get_nowait() if queue.qsize() else await queue.get()) is not None:
                yield item
            await producer  # its exception, if it had one
        finally:
            if not producer.done():
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)
            await asyncio.sleep(0)  # let the done callback run
            for closer in closers:
                closer.cancel()

    async def collect(self, plan: Plan) -> list[Measurement]:
        return [m async for m in self.run(plan)]

    async def _produce(self, plan: Plan, emit: _Outlet) -> None:
        self.stats.planned += plan.size
        run = _Run(plan)
        if self.deadline is not None and self.checker is not None:
            run.check_stop = asyncio.get_running_loop().time() + self.deadline * (1 - _EMIT_SHARE)
        try:
            if plan.check_identity:
                run.identities = asyncio.ensure_future(self.identities(plan))
            if plan.canaries:
                canaries: list[Measurement] = []
                keep = _Outlet(emit.queue, canaries)
                await self._first_pass(self._canary_jobs(plan, run), run, keep, hold=False)
                by_name = {str(ep): ep for r in plan.resolvers for ep in r.endpoints}
                run.canary_failures = {by_name[e]: why for e, why in _canary_failures(canaries).items()}
            await self._first_pass(self._jobs(plan, run), run, emit, hold=True)
            await self._confirm(run)
            for job in run.held:
                if self._wants_check(job, run):
                    self._hold_for_check(job, run)
                else:
                    await emit(await self._measure(job, run))
            await self._check_answers(run, emit)
        finally:
            if run.identities is not None and not run.identities.done():
                run.identities.cancel()
            for fut in run.controls.values():
                fut.cancel()

    async def _first_pass(
        self,
        jobs: Iterator[_Job],
        run: _Run,
        emit: _Outlet,
        hold: bool,
    ) -> None:
        """Phase 3 (or 2): every job once; what needs the whole run is held, the rest emitted."""
        finishing: set[asyncio.Future[None]] = set()
        loop = asyncio.get_running_loop()

        async def finish(job: _Job) -> None:
            await emit(await self._measure(job, run))

        async def work(job: _Job) -> None:
            job.sent_at = _now()
            job.first_sent = loop.time()
            # What is expected is fixed when the query leaves (docs/lists.md: "at time T"),
            # not when a held measurement is judged at the end of the run.
            if job.canary is not None:
                job.expected, job.expected_by = job.canary, {"canary": str(job.canary)}
            else:
                job.expected, job.expected_by = run.plan.expect(job.domain, job.resolver)
            ex = await self._ask(job, 1, None)
            if hold and (ex.response is None or self._needs_run(job, ex)):
                run.held.append(job)
            elif hold and self._wants_check(job, run):
                self._hold_for_check(job, run)
            elif ex.settled is not None and not ex.settled.done():
                # Waiting out a UDP linger need not hold a worker, but it holds a measurement:
                # at most `queue_size` wait at once, or a stalled consumer would leave every
                # answer of the run judged and waiting here.
                while len(finishing) >= self.queue_size:
                    await asyncio.wait(finishing, return_when=asyncio.FIRST_COMPLETED)
                task = asyncio.ensure_future(finish(job))
                finishing.add(task)
                task.add_done_callback(finishing.discard)
            else:
                # Judged at once when nothing it depends on is still on its way (the common case).
                m = self._measure_now(job, run)
                if m is None:
                    m = await self._measure(job, run)
                if not emit.now(m):
                    await emit(m)

        try:
            await self._pool(jobs, work)
            while finishing:
                await asyncio.gather(*list(finishing))
        finally:
            for task in finishing:
                task.cancel()  # only when the run itself was cancelled: nobody reads any more

    async def _ask(self, job: _Job, number: int, exchanger: Exchanger | None) -> Exchange:
        # `query`'s steps, with the endpoint's limiter and exchanger kept on its site.
        site = job.site
        try:
            if not site.paced:
                site.limiter, site.paced = self._limiter(site.endpoint), True
            if site.limiter is not None:
                await site.limiter.acquire()
            query = build_query(job.domain, job.qtype, site.encrypted)
            if exchanger is None:
                exchanger = site.exchanger
                if exchanger is None:
                    exchanger = site.exchanger = self.exchanger(site.endpoint)
            ex = await exchanger.exchange(query)
            if ex.response is not None:
                exchanger.witness = query  # a question this endpoint answers: the witness for later silences
        except Exception as exc:
            log.exception("query failed inside the probe")
            self.stats.internal_errors += 1
            ex = Exchange(None, _internal(exc))
        channel = ex.channel
        if number == 2 and channel is not None and "#" in channel:
            # The confirmation pass's fresh connection counts from 1 again: `#c1` tells it from
            # the first pass's `#1` (over UDP the channel is the endpoint, the same in both).
            head, _, count = channel.rpartition("#")
            channel = f"{head}#c{count}"
        job.attempts.append(
            Attempt(number, ex.sends, channel, ex.response is not None, ex.failure, ex.overtaken)
        )
        if ex.late is not None:
            job.lates.append((number, ex.late))
        if ex.response is not None or job.exchange is None or job.exchange.response is None:
            job.exchange = ex
        return ex

    def _wants_check(self, job: _Job, run: _Run) -> bool:
        """Whether the answer gets address checks: a resolved answer for a name with an
        expectation, while the run's time for checks lasts (else `job.unchecked` says why)."""
        ex = job.exchange
        if self.checker is None or job.expected is None or ex is None or ex.response is None:
            return False
        verdict = verdict_of(ex.response, None, job.domain, job.qtype, self.fingerprints)
        if verdict.outcome is not Outcome.RESOLVED:
            return False
        if run.check_stop is not None and asyncio.get_running_loop().time() >= run.check_stop:
            job.unchecked = self._out_of_time()
            return False
        return True

    def _hold_for_check(self, job: _Job, run: _Run) -> None:
        run.to_check.append(job)
        if run.plan.controls:
            # Asked now, not when its checks start: an answer whose checks run out of time is
            # judged at once, and must not then spend the time left waiting for its control.
            self._control(run, job.domain, job.qtype)

    def _out_of_time(self) -> str:
        return (
            f"the run's deadline ({self.deadline:g} s): answer checks stop {_EMIT_SHARE:.0%} of it "
            "before its end, so that every DNS measurement is still emitted"
        )

    async def _check_answers(self, run: _Run, emit: _Outlet) -> None:
        """Phase 6: check each held answer's addresses (the checker paces and caches), judge, emit.

        Bounded by the run's `check_stop`: when it comes, the checks still going are cancelled
        and every answer not yet emitted goes out at once, with its checks if it had them all,
        else judged without them. Cancelled checks clean up (a polite TLS close) only after.
        """
        checker = self.checker
        if checker is None or not run.to_check:
            return
        jobs, run.to_check = run.to_check, []

        async def work(job: _Job) -> None:
            ex = job.exchange
            assert ex is not None
            assert ex.response is not None
            verdict = verdict_of(ex.response, None, job.domain, job.qtype, self.fingerprints)
            mine = addresses_of(job.qtype, verdict.answers)
            checks = tuple(await checker.check_all(job.domain, mine))
            control_checks: tuple[AddressCheck, ...] = ()
            same = False
            control = await self._control(run, job.domain, job.qtype) if run.plan.controls else None
            if control is not None:
                same = same_addresses(verdict.answers, control.verdict.answers, job.qtype)
                if control_checks_matter(checks):
                    theirs = addresses_of(job.qtype, control.verdict.answers)
                    control_checks = tuple(await checker.check_all(job.domain, theirs))
            job.result = await self._measure(job, run, (checks, control_checks, same))
            # A put cancelled while it waited did not put: `emitted` is exact.
            await emit(job.result)
            job.emitted = True

        pool = asyncio.ensure_future(self._pool(iter(jobs), work))
        try:
            left = None if run.check_stop is None else run.check_stop - asyncio.get_running_loop().time()
            if left is None or left > 0:
                await asyncio.wait({pool}, timeout=left)
            if pool.done():
                pool.result()  # a bug in a worker, raised as before
                return
            pool.cancel()
            why = self._out_of_time()
            for job in jobs:
                if job.emitted:
                    continue
                m = job.result
                if m is None:
                    job.unchecked = why
                    m = await self._measure(job, run)
                await emit(m)
                job.emitted = True
        finally:
            if not pool.done():
                pool.cancel()
            await asyncio.gather(pool, return_exceptions=True)

    def _needs_run(self, job: _Job, ex: Exchange) -> bool:
        """Whether the response's judgement depends on the rest of the run (an EDE 18); if not,
        it counts as one of the endpoint's answers without EDE 18, which that rule asks for."""
        assert ex.response is not None
        if waits_for_the_run(ex.response, job.domain, job.qtype):
            return True
        job.site.plain_answers += 1
        return False

    async def _confirm(self, run: _Run) -> None:
        """Phase 4: ask every silent query once more, per endpoint on one fresh connection.

        Jobs go in the reverse of their first-pass order, so that a name that stalled an
        in-order server the first time is not in front of the same names again.
        """
        silent = [
            job
            for job in run.held
            if job.exchange is not None
            and job.exchange.response is None
            and not asking_again_cannot_change(job.exchange.failure)
        ]
        if not silent:
            return
        fresh: dict[Endpoint, Exchanger] = {}
        for job in silent:
            if job.endpoint not in fresh:
                old = self.exchanger(job.endpoint)
                new = fresh[job.endpoint] = make_exchanger(job.endpoint, self.options)
                new.witness = old.witness
                # Few queries follow a silent one in this pass: its witness goes at once.
                new.witness_after = 0.0
                loss = getattr(old, "loss", None)
                if loss is not None:
                    new.loss = loss  # type: ignore[attr-defined]  # UDP: one loss record per endpoint
        self.stats.confirmations += len(silent)

        loop = asyncio.get_running_loop()

        async def work(job: _Job) -> None:
            failure = job.exchange.failure if job.exchange is not None else None
            if failure is not None and failure.silence:
                # Only a silence waits: its second ask must come after a recursor's own upstream
                # timeout. A failed connection or handshake is simply tried again.
                wait = job.first_sent + self.options.confirm_after - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            ex = await self._ask(job, 2, fresh[job.endpoint])
            if ex.response is not None:
                self._needs_run(job, ex)

        try:
            await self._pool(iter(reversed(silent)), work)
        finally:
            await asyncio.gather(*(e.aclose() for e in fresh.values()), return_exceptions=True)

    def _control(self, run: _Run, domain: str, qtype: str) -> asyncio.Future[ControlResult | None]:
        """The control baseline of (domain, qtype), asked once, on first use."""
        key = (domain, qtype)
        fut = run.controls.get(key)
        if fut is None:
            fut = run.controls[key] = asyncio.ensure_future(self._ask_controls(run.plan, domain, qtype))
        return fut

    async def _ask_controls(self, plan: Plan, domain: str, qtype: str) -> ControlResult | None:
        """The first control that does not fail speaks for the name."""
        result = None
        for resolver in plan.controls:
            try:
                ex = await self.query(control_endpoint(resolver), domain, qtype)
                verdict = verdict_of(ex.response, ex.failure, domain, qtype, self.fingerprints)
            except Exception as exc:
                log.exception("control query failed inside the probe")
                verdict = Verdict(Outcome.ERROR, error=f"internal: {type(exc).__name__}: {exc}")
            result = ControlResult(resolver.name, verdict)
            if not result.failed:
                break
        return result

    async def identities(self, plan: Plan) -> dict[Endpoint, Identity]:
        """Identity checks on the plain endpoints of resolvers that claim a catalogue operator."""
        targets = [
            (r.operator, ep)
            for r in plan.resolvers
            for ep in r.endpoints
            if r.operator in IDENTITY_PROBES and ep.transport in PLAIN_TRANSPORTS
        ]
        out: dict[Endpoint, Identity] = {}

        async def work(target: tuple[str, Endpoint]) -> None:
            operator, ep = target
            probe = IDENTITY_PROBES[operator]
            try:
                ex = await self.exchanger(ep).exchange(probe.query())
                if ex.response is not None:
                    out[ep] = identity_of(operator, probe, ex.response, None)
                    return
                out[ep] = identity_of(operator, probe, None, ex.failure.text if ex.failure else None)
            except Exception as exc:
                log.exception("identity check failed inside the probe")
                out[ep] = identity_of(operator, probe, None, f"internal: {type(exc).__name__}")

        await self._pool(iter(targets), work)
        return out

    @staticmethod
    def _canary_jobs(plan: Plan, run: _Run) -> Iterator[_Job]:
        for canary in plan.canaries:
            for resolver in plan.resolvers:
                for endpoint in resolver.endpoints:
                    yield _Job(canary.name, "A", resolver, endpoint, run.site(endpoint), canary.expect)

    @staticmethod
    def _jobs(plan: Plan, run: _Run) -> Iterator[_Job]:
        if plan.targets is not None:
            for domain, resolver, endpoint in plan.targets:
                site = run.site(endpoint)
                for qtype in plan.qtypes:
                    yield _Job(domain, qtype, resolver, endpoint, site)
            return
        # Endpoints vary fastest, so consecutive jobs spread across rate limiters.
        pairs = [(r, ep, run.site(ep)) for r in plan.resolvers for ep in r.endpoints]
        for domain in plan.domains:
            for qtype in plan.qtypes:
                for resolver, endpoint, site in pairs:
                    yield _Job(domain, qtype, resolver, endpoint, site)

    async def _measure(
        self,
        job: _Job,
        run: _Run,
        checked: tuple[tuple[AddressCheck, ...], tuple[AddressCheck, ...], bool] | None = None,
    ) -> Measurement:
        """Gather what the judgement needs (phase 5), judge, and build the measurement."""
        ex = job.exchange
        assert ex is not None
        if ex.settled is not None:
            await ex.settled  # racing answers are still being collected (UDP linger)
        _take_late(job)
        control = None
        if job.canary is None and run.plan.controls:
            control = await self._control(run, job.domain, job.qtype)
        identity = None
        if run.identities is not None:
            identities = await run.identities
            identity = identities.get(job.endpoint) if identities else None
        return self._judged(job, run, control, identity, checked)

    def _measure_now(self, job: _Job, run: _Run) -> Measurement | None:
        """`_measure` without waiting: None when something it needs is still on its way."""
        ex = job.exchange
        assert ex is not None
        if ex.settled is not None:
            if not ex.settled.done():
                return None
            ex.settled.result()
        _take_late(job)
        control = None
        if job.canary is None and run.plan.controls:
            fut = self._control(run, job.domain, job.qtype)
            if not fut.done():
                return None
            control = fut.result()
        identity = None
        if run.identities is not None:
            if not run.identities.done():
                return None
            identities = run.identities.result()
            identity = identities.get(job.endpoint) if identities else None
        return self._judged(job, run, control, identity, None)

    def _judged(
        self,
        job: _Job,
        run: _Run,
        control: ControlResult | None,
        identity: Identity | None,
        checked: tuple[tuple[AddressCheck, ...], tuple[AddressCheck, ...], bool] | None,
    ) -> Measurement:
        ex = job.exchange
        assert ex is not None
        expected, why = job.expected, job.expected_by
        obs = Observation(
            domain=job.domain,
            qtype=job.qtype,
            transport=job.endpoint.transport,
            response=ex.response,
            failure=ex.failure,
            attempts=tuple(job.attempts),
            loss=getattr(job.site.exchanger or self._exchangers.get(job.endpoint), "loss", None),
            ede18_name_specific=job.site.plain_answers > 0,
            control=control,
            expected=expected,
            expected_by=why,
            canary=job.canary is not None,
            identity=identity,
            operator=job.resolver.operator,
            canary_failure=run.canary_failures.get(job.endpoint) if run.canary_failures else None,
            late=tuple(ex.evidence.get("late", ())),
            checks=None if checked is None else checked[0],
            control_checks=() if checked is None else checked[1],
            same_addresses=False if checked is None else checked[2],
        )
        try:
            j = judge(obs, self.fingerprints)
        except Exception as exc:  # a hostile answer is classified, never a crash
            log.exception("classification failed inside the probe")
            self.stats.internal_errors += 1
            failed = Exchange(None, _internal(exc))
            ex = failed
            j = judge(
                Observation(job.domain, job.qtype, job.endpoint.transport, None, failed.failure),
                self.fingerprints,
            )
        evidence = dict(ex.evidence)
        evidence.pop("late", None)  # judged into `late_answers`
        evidence.update(j.evidence)
        if job.unchecked is not None:
            evidence["answer_checks_skipped"] = job.unchecked
        verdict = j.verdict
        self.stats.done += 1
        self.stats.by_outcome[verdict.outcome] = self.stats.by_outcome.get(verdict.outcome, 0) + 1
        return Measurement(
            domain=job.domain,
            qtype=job.qtype,
            resolver=job.resolver.name,
            transport=job.endpoint.transport,
            outcome=verdict.outcome,
            blocked=j.blocked,
            expected=expected,
            finding=j.finding,
            rcode=verdict.rcode,
            ede=verdict.ede,
            answers=verdict.answers,
            cname=verdict.cname,
            sinkhole=verdict.sinkhole,
            control=None if control is None else control.to_json(),
            latency_ms=None if ex.latency_ms is None else round(ex.latency_ms, 3),
            time=job.sent_at,
            error=verdict.error,
            wire=ex.response,
            endpoint=job.site.name,
            kind=job.resolver.kind,
            operator=job.resolver.operator,
            evidence=evidence,
            intercepted=j.intercepted,
            reach=str(j.reach),
        )


class _Outlet:
    """Where measurements leave: the run's bounded queue, taken at once while it has room."""

    __slots__ = ("kept", "queue")

    def __init__(
        self, queue: asyncio.Queue[Measurement | None], kept: list[Measurement] | None = None
    ) -> None:
        self.queue = queue
        self.kept = kept  # the canaries' measurements, which the run reads again

    def now(self, m: Measurement) -> bool:
        """Queue `m` without waiting, if there is room; False (and nothing done) otherwise."""
        if self.queue.full():
            return False
        if self.kept is not None:
            self.kept.append(m)
        self.queue.put_nowait(m)
        return True

    async def __call__(self, m: Measurement) -> None:
        if self.kept is not None:
            self.kept.append(m)
        await self.queue.put(m)


def _canary_failures(measurements: Sequence[Measurement]) -> dict[str, str]:
    """Endpoints (by name) whose canaries failed in this run, with the reason."""
    by_endpoint: dict[str, list[Measurement]] = {}
    for m in measurements:
        by_endpoint.setdefault(m.endpoint, []).append(m)
    failures: dict[str, str] = {}
    for endpoint, ms in by_endpoint.items():
        if all(m.outcome in (Outcome.TIMEOUT, Outcome.ERROR) for m in ms):
            failures[endpoint] = "no canary got an answer from this resolver in this run"
            continue
        for m in ms:
            if m.expected is Expectation.RESOLVES and m.blocked is not False:
                failures[endpoint] = f"canary {m.domain} should resolve but got {m.outcome}"
                break
    return failures


def _take_late(job: _Job) -> None:
    """A silence answered after its deadline (a recursor's SERVFAIL once its upstream gave up):
    the resolver did answer, so this was no silence; the answer is judged instead."""
    ex = job.exchange
    assert ex is not None
    if ex.response is None:
        for number, late in job.lates:
            if late.done() and not late.cancelled():
                job.exchange = Exchange(
                    late.result(), None, None, {**ex.evidence, "late_response": {"pass": number}}
                )
                break


def _internal(exc: BaseException) -> Failure:
    return Failure(FailureKind.ERROR, Phase.INTERNAL, f"internal: {type(exc).__name__}: {exc}")
