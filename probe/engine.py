"""The engine: fan out domains × qtypes × resolvers × transports, classify, never raise.

A fixed pool of workers pulls jobs from a lazy plan, so memory stays flat whatever
the number of names; a global limit (the pool size) and a per-endpoint rate limit
keep a probe from hammering anyone. Every endpoint gets one exchanger for the run,
which owns its connection reuse. Control baselines are measured first, because
whether an NXDOMAIN is a block depends on them; timeouts are judged last, because
whether a timeout is a block depends on whether the endpoint answered anything else.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from probe.classify import ControlResult, Verdict, blocked_of, verdict_of
from probe.fingerprints import Fingerprints, load_fingerprints
from probe.identity import IDENTITY_PROBES, Canary, Identity, identity_of
from probe.identity import PLAIN as PLAIN_TRANSPORTS
from probe.model import Expectation, Finding, Measurement, Outcome, Transport, judge
from probe.specs import Endpoint, Resolver
from probe.transports import Exchange, Exchanger, Failure, Options, make_exchanger
from probe.wire import build_query, parse_response

__all__ = ["Engine", "Expect", "Plan", "RateLimiter", "control_endpoint"]

log = logging.getLogger(__name__)

# (domain, resolver) -> (expectation, why): None when nothing is expected.
Expect = Callable[[str, Resolver], tuple[Expectation | None, dict[str, Any] | None]]

_ENCRYPTED = frozenset({Transport.DOT, Transport.DOH, Transport.DOH3, Transport.DOQ})
_CONTROL_PREFERENCE = (
    Transport.DOH,
    Transport.DOT,
    Transport.DOQ,
    Transport.TCP,
    Transport.UDP,
    Transport.DOH3,
)


def _no_expectation(domain: str, resolver: Resolver) -> tuple[Expectation | None, dict[str, Any] | None]:
    return None, None


@dataclass(frozen=True, slots=True)
class Plan:
    """What one run measures."""

    domains: Sequence[str]
    qtypes: Sequence[str]
    resolvers: Sequence[Resolver]
    controls: Sequence[Resolver] = ()
    expect: Expect = _no_expectation
    canaries: Sequence[Canary] = ()
    check_identity: bool = True

    @property
    def size(self) -> int:
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


@dataclass(slots=True)
class _Job:
    domain: str
    qtype: str
    resolver: Resolver
    endpoint: Endpoint
    canary: Expectation | None = None


@dataclass(slots=True)
class _Run:
    """What the judgement of one measurement may depend on, gathered during the run."""

    expect: Expect
    controls: dict[tuple[str, str], ControlResult] = field(default_factory=dict)
    answered: set[Endpoint] = field(default_factory=set)
    identities: dict[Endpoint, Identity] = field(default_factory=dict)
    canary_failures: dict[Endpoint, str] = field(default_factory=dict)


@dataclass(slots=True)
class Stats:
    planned: int = 0
    done: int = 0
    internal_errors: int = 0
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
    ) -> None:
        self.options = options or Options()
        self.concurrency = max(1, concurrency)
        self.default_qps = qps
        self.fingerprints = fingerprints or load_fingerprints()
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

    async def query(self, endpoint: Endpoint, domain: str, qtype: str) -> Exchange:
        """One query through the endpoint's exchanger, after its rate limit."""
        if endpoint in self._limiters:
            limiter = self._limiters[endpoint]
        else:
            qps = endpoint.qps or self.default_qps
            limiter = self._limiters[endpoint] = RateLimiter(qps) if qps else None
        if limiter is not None:
            await limiter.acquire()
        query = build_query(domain, qtype, endpoint.transport in _ENCRYPTED)
        return await self.exchanger(endpoint).exchange(query)

    async def _pool(self, jobs: Iterator[Any], work: Callable[[Any], Any]) -> None:
        async def worker() -> None:
            for job in jobs:  # a shared iterator: each job is taken by exactly one worker
                await work(job)

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    async def controls(self, plan: Plan) -> dict[tuple[str, str], ControlResult]:
        """Baselines for every (domain, qtype): the first control that does not fail speaks."""
        out: dict[tuple[str, str], ControlResult] = {}
        if not plan.controls:
            return out
        pairs = iter([(d, q) for d in plan.domains for q in plan.qtypes])

        async def work(pair: tuple[str, str]) -> None:
            domain, qtype = pair
            for resolver in plan.controls:
                try:
                    ex = await self.query(control_endpoint(resolver), domain, qtype)
                    verdict = verdict_of(ex.response, ex.failure, domain, qtype, self.fingerprints)
                except Exception as exc:
                    log.exception("control query failed inside the probe")
                    verdict = Verdict(Outcome.ERROR, error=f"internal: {type(exc).__name__}: {exc}")
                out[pair] = ControlResult(resolver.name, verdict)
                if not out[pair].failed:
                    break

        await self._pool(pairs, work)
        return out

    async def run(self, plan: Plan) -> AsyncIterator[Measurement]:
        """Measure the plan; measurements come out as they are judged, timeouts last."""
        queue: asyncio.Queue[Measurement | None] = asyncio.Queue()
        producer = asyncio.ensure_future(self._produce(plan, queue.put_nowait))
        try:
            done = False
            while not done:
                batch = [await queue.get()]
                # Drain what is already there: one wake-up per burst, not per measurement.
                while not queue.empty():
                    batch.append(queue.get_nowait())
                for item in batch:
                    if item is None:
                        done = True
                        break
                    yield item
            await producer
        finally:
            if not producer.done():
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)

    async def collect(self, plan: Plan) -> list[Measurement]:
        return [m async for m in self.run(plan)]

    async def _produce(self, plan: Plan, emit: Callable[[Measurement | None], None]) -> None:
        self.stats.planned += plan.size
        try:
            run = _Run(plan.expect)
            run.controls = await self.controls(plan)
            if plan.check_identity:
                run.identities = await self.identities(plan)
            if plan.canaries:
                canaries: list[Measurement] = []

                def keep(m: Measurement) -> None:
                    canaries.append(m)
                    emit(m)

                await self._phase(self._canary_jobs(plan), run, keep)
                by_name = {str(ep): ep for r in plan.resolvers for ep in r.endpoints}
                run.canary_failures = {by_name[e]: why for e, why in _canary_failures(canaries).items()}
            await self._phase(self._jobs(plan), run, emit)
        finally:
            emit(None)

    async def _phase(self, jobs: Iterator[_Job], run: _Run, emit: Callable[[Measurement], object]) -> None:
        deferred: list[tuple[_Job, Exchange, str]] = []
        lingering: list[asyncio.Future[None]] = []

        def finish(job: _Job, ex: Exchange, sent_at: str) -> None:
            if ex.response is None and ex.failure is not None and ex.failure.kind == "timeout":
                deferred.append((job, ex, sent_at))  # judged once the whole phase has been seen
            else:
                emit(self._measure(job, ex, sent_at, run))

        async def work(job: _Job) -> None:
            sent_at = _now()
            try:
                ex = await self.query(job.endpoint, job.domain, job.qtype)
            except Exception as exc:
                log.exception("query failed inside the probe")
                self.stats.internal_errors += 1
                ex = Exchange(None, _internal(exc))
            if ex.response is not None:
                run.answered.add(job.endpoint)
            if ex.settled is not None and not ex.settled.done():
                lingering.append(ex.settled)
                ex.settled.add_done_callback(lambda _f: finish(job, ex, sent_at))
            else:
                finish(job, ex, sent_at)

        await self._pool(jobs, work)
        if lingering:
            await asyncio.gather(*lingering, return_exceptions=True)
        for job, ex, sent_at in deferred:
            emit(self._measure(job, ex, sent_at, run))

    async def identities(self, plan: Plan) -> dict[Endpoint, Identity]:
        """Identity checks on the plain endpoints of resolvers that claim a catalogue operator."""
        targets = [
            (r.operator, ep) for r in plan.resolvers for ep in r.endpoints
            if r.operator in IDENTITY_PROBES and ep.transport in PLAIN_TRANSPORTS
        ]  # fmt: skip
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
    def _canary_jobs(plan: Plan) -> Iterator[_Job]:
        for canary in plan.canaries:
            for resolver in plan.resolvers:
                for endpoint in resolver.endpoints:
                    yield _Job(canary.name, "A", resolver, endpoint, canary.expect)

    @staticmethod
    def _jobs(plan: Plan) -> Iterator[_Job]:
        # Endpoints vary fastest, so consecutive jobs spread across rate limiters.
        for domain in plan.domains:
            for qtype in plan.qtypes:
                for resolver in plan.resolvers:
                    for endpoint in resolver.endpoints:
                        yield _Job(domain, qtype, resolver, endpoint)

    def _measure(self, job: _Job, ex: Exchange, sent_at: str, run: _Run) -> Measurement:
        try:
            return self._judge(job, ex, sent_at, run)
        except Exception as exc:  # a hostile answer is classified, never a crash
            log.exception("classification failed inside the probe")
            self.stats.internal_errors += 1
            return self._judge(job, Exchange(None, _internal(exc)), sent_at, run)

    def _judge(self, job: _Job, ex: Exchange, sent_at: str, run: _Run) -> Measurement:
        verdict = verdict_of(ex.response, ex.failure, job.domain, job.qtype, self.fingerprints)
        control = run.controls.get((job.domain, job.qtype))
        # "answered another query": any response from this endpoint other than this one.
        blocked = blocked_of(verdict, control, job.endpoint in run.answered)
        expected: Expectation | None
        why: dict[str, Any] | None
        if job.canary is not None:
            expected, why = job.canary, {"canary": str(job.canary)}
        else:
            expected, why = run.expect(job.domain, job.resolver)
        evidence: dict[str, Any] = {**ex.evidence, **verdict.evidence}
        finding = judge(expected, blocked)
        identity = run.identities.get(job.endpoint)
        intercepted = identity is not None and identity.ok is False
        if identity is not None:
            evidence["identity"] = identity.to_json()
        if finding is not None and job.canary is None:
            # Someone else's answers, or a resolver that failed its canaries, prove nothing
            # about the order: say so rather than report a leak or an enforcement.
            if intercepted:
                finding = Finding.INCONCLUSIVE
                evidence["inconclusive_reason"] = f"answered by someone other than {job.resolver.operator}"
            elif job.endpoint in run.canary_failures:
                finding = Finding.INCONCLUSIVE
                evidence["inconclusive_reason"] = run.canary_failures[job.endpoint]
        late = evidence.pop("late", None)
        if late:
            evidence["late_answers"] = [self._late(job, w) for w in late]
            evidence["injected"] = any(
                la.get("answers") != list(verdict.answers) for la in evidence["late_answers"]
            )
        if verdict.nsid:
            evidence["nsid"] = verdict.nsid
        if why:
            evidence["expected_by"] = why
        self.stats.done += 1
        self.stats.by_outcome[verdict.outcome] = self.stats.by_outcome.get(verdict.outcome, 0) + 1
        return Measurement(
            domain=job.domain,
            qtype=job.qtype,
            resolver=job.resolver.name,
            transport=job.endpoint.transport,
            outcome=verdict.outcome,
            blocked=blocked,
            expected=expected,
            finding=finding,
            rcode=verdict.rcode,
            ede=verdict.ede,
            answers=verdict.answers,
            cname=verdict.cname,
            sinkhole=verdict.sinkhole,
            control=None if control is None else control.to_json(),
            latency_ms=None if ex.latency_ms is None else round(ex.latency_ms, 3),
            time=sent_at,
            error=verdict.error,
            wire=ex.response,
            endpoint=str(job.endpoint),
            kind=job.resolver.kind,
            operator=job.resolver.operator,
            evidence=evidence,
            intercepted=intercepted,
        )

    def _late(self, job: _Job, wire: bytes) -> dict[str, Any]:
        out: dict[str, Any] = {"wire": base64.b64encode(wire).decode("ascii")}
        try:
            p = parse_response(wire, job.domain, job.qtype)
        except Exception:
            out["error"] = "malformed"
            return out
        out.update(rcode=p.rcode, answers=list(p.answers))
        return out


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


def _internal(exc: BaseException) -> Failure:
    return Failure("error", "internal", f"internal: {type(exc).__name__}: {exc}")
