"""Pushing spooled batches to the collector (docs/ingest.md), never losing one, never stuck.

Each batch is POSTed to /api/v1/results, gzip-compressed (off the event loop), with the
probe's bearer token and the batch id (also as Idempotency-Key). What the collector says
decides what happens to the batch:

- 2xx: acknowledged; only now does it leave the spool (logged, with the collector's
  `duplicate` flag).
- 413: too large; divided in two (and later batches made smaller), until one measurement
  alone is too large: that one is quarantined.
- another 4xx that depends on what is in the batch (422 and the like): the collector
  refuses some of these measurements for good. The batch is bisected (cut first where
  the collector's reason names a measurement) until each refused measurement stands
  alone; those are quarantined, the rest is sent. A refusal that cannot depend on the
  measurements (401, 403, 404, 405, 407, 411, 415, 421: the token, the URL, the proxy,
  the encoding) is a collector failure instead: bisecting would quarantine everything.
  So is a collector that refuses the batch behind a run of refusals too (SUSPECT_AFTER).
- 408, 429, 5xx, a refused connection, a hang: the collector is failing. One backoff
  state for the whole collector (not per batch): exponential with jitter between
  `retry.base` and `retry.max`, at least what `Retry-After` says on 429 and 503. The
  first success resets it, and the backlog then drains at full speed, bounded by
  `collector.rate` requests per second. While nobody listens at the collector's address
  (a refused connection), a GET of /healthz every second ends the backoff as soon as
  anything answers, so a recovery is noticed within a second, whatever `retry.max`.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import json
import logging
import random
import re
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx2

from probe import __version__
from probe.daemon.config import Config
from probe.daemon.spool import Batch, Quarantined, SpoolThread, encode
from probe.limits import clamp

__all__ = ["Backoff", "PushOutcome", "Pusher", "Reply", "backoff"]

log = logging.getLogger(__name__)

# Refusals about the request, not about the measurements in it: a bisection could only
# quarantine every measurement, so these are treated as the collector failing.
_NOT_ABOUT_CONTENT = frozenset({401, 403, 404, 405, 407, 408, 411, 415, 421, 429})
_RETRY_AFTER_CAP = 3600.0  # a Retry-After beyond an hour is a misconfiguration, not a plan
_RESEND = uuid.UUID("6f1d2c3e-9a54-4bde-8a43-51c0f3a0b7d1")  # namespace of resent batches' ids
_INDEX = re.compile(r"^(?:body\.)?measurements\[(\d+)\]")
_AGE = re.compile(r"more than ([0-9.]+) days old")
# After this many measurements quarantined in a row with no batch accepted in between, the
# collector may be refusing everything (a bad deploy, a schema mismatch), not these
# measurements. Before it sets more aside, the pusher sends the batch behind: accepted, the
# collector refuses only what is at the head, and the run up to that batch may be
# quarantined before asking again; refused too, the collector is treated as failing and
# the spool waits for it, trying one batch further behind at each attempt, so a run of
# refused measurements never blocks what comes after it.
SUSPECT_AFTER = 5
# While the collector is unreachable: how often to look whether it is back, and how long one
# look may take.
REACHABLE_EVERY = 1.0
REACHABLE_TIMEOUT = 2.0


def backoff(attempts: int, base: float, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff: uniform in [delay/2, delay], delay = min(cap, base·2^attempts)."""
    delay = min(cap, base * (2.0 ** min(attempts, 30)))
    return float(delay / 2 + rng() * delay / 2)


class Backoff:
    """The collector's one failure state: consecutive failures and when to try again."""

    def __init__(self, base: float, cap: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.base = base
        self.cap = cap
        self.clock = clock
        self.failures = 0
        self.not_before = 0.0

    def failed(self, retry_after: float | None = None) -> float:
        delay = backoff(self.failures, self.base, self.cap)
        if retry_after is not None:
            delay = max(delay, min(retry_after, _RETRY_AFTER_CAP))
        self.failures += 1
        self.not_before = self.clock() + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.not_before = 0.0

    def remaining(self) -> float:
        return max(0.0, self.not_before - self.clock())


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class Reply:
    """What one POST came to: status 0 when there was no HTTP answer at all."""

    status: int
    reason: str
    detail: str = ""
    retry_after: float | None = None
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def refuses_content(self) -> bool:
        return 400 <= self.status < 500 and self.status != 413 and self.status not in _NOT_ABOUT_CONTENT


@dataclass
class PushOutcome:
    sent_batches: int = 0
    sent_results: int = 0
    quarantined: int = 0
    failure: str | None = None


class Pusher:
    """Owns the HTTP client to the collector; call `push()` from the daemon's loop."""

    def __init__(
        self,
        config: Config,
        spool: SpoolThread,
        *,
        on_failure: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert config.collector is not None
        self.config = config
        self.collector = config.collector
        self.spool = spool
        self.backoff = Backoff(self.collector.retry_base, self.collector.retry_max, clock)
        self.batch_size = self.collector.batch_size
        self.rate = self.collector.rate
        self.max_age_days = self.collector.max_age_days
        self.refused_in_a_row = 0
        self.allowance = SUSPECT_AFTER  # quarantined in a row before asking whether all is refused
        self._probe_from: str | None = None  # the last batch sent from behind and refused
        self._walked = 0  # measurements from the head to just before the next batch to try
        # The last push found nobody listening (refused connection, no route): a cheap look
        # between attempts then ends the backoff as soon as the collector is back.
        self.unreachable = False
        self.clock = clock
        self._next_send = 0.0
        self.on_failure = on_failure or (lambda _reason: None)
        verify: Any = True
        if self.collector.ca_file:
            verify = ssl.create_default_context(cafile=self.collector.ca_file)
        self.client = httpx2.AsyncClient(
            verify=verify,
            timeout=httpx2.Timeout(self.collector.timeout),
            headers={
                "Authorization": f"Bearer {self.collector.token}",
                "User-Agent": f"blockprobe/{__version__}",
            },
        )
        self.url = f"{self.collector.url}/api/v1/results"

    async def aclose(self) -> None:
        await self.client.aclose()

    def _body(self, batch_id: str, bodies: list[str]) -> bytes:
        """The request body, built around the measurements' stored JSON without decoding it."""
        probe = {
            "id": self.config.probe_id,
            "region": self.config.region,
            "country": self.config.country,
            "version": __version__,
        }
        head = json.dumps(
            {"probe": probe, "batch_id": batch_id, "sent_at": time.time()}, separators=(",", ":")
        )
        text = head[:-1] + ',"measurements":[' + ",".join(bodies) + "]}"
        return gzip.compress(text.encode(), compresslevel=5)

    async def _paced(self) -> None:
        """At most `rate` requests per second, so a drained backlog cannot flood the collector."""
        if not self.rate:
            return
        wait = self._next_send - self.clock()
        if wait > 0:
            await asyncio.sleep(wait)
        self._next_send = max(self._next_send, self.clock()) + 1.0 / self.rate

    async def push(self, max_batches: int | None = None) -> PushOutcome:
        """Send what is waiting, oldest first, until the spool is empty, the collector fails,
        or max_batches requests; returns at once while the collector is backing off."""
        out = PushOutcome()
        sent = 0
        while (max_batches is None or sent < max_batches) and self.backoff.remaining() == 0:
            max_age = self.max_age_days * 86400
            batch = await self.spool.call(self.spool.spool.next_batch, self.batch_size, None, max_age)
            if batch is None:
                break
            await self._paced()
            sent += 1
            reply = await self.send(batch.batch_id, batch.bodies)
            if not await self._settle(batch, reply, out):
                break
        return out

    async def _settle(self, batch: Batch, reply: Reply, out: PushOutcome) -> bool:
        """Act on one reply; False when the collector is failing and pushing must pause."""
        spool, n = self.spool.spool, len(batch.bodies)
        if reply.ok:
            await self._acknowledged(batch, reply, out)
            self.refused_in_a_row = 0
            self.allowance = SUSPECT_AFTER
            self._probe_from = None
            return True
        self.on_failure(reply.reason)
        age = _AGE.search(reply.detail)
        if age and float(age.group(1)) < self.max_age_days:
            # The collector keeps less than we thought: learn its bound, so what is older
            # goes to the quarantine before it is sent.
            self.max_age_days = float(age.group(1))
            log.warning(
                "the collector refuses results older than %g days; older ones are quarantined",
                self.max_age_days,
            )
        suspect = reply.refuses_content and not age and self.refused_in_a_row >= self.allowance
        if suspect and not await self._accepts_the_rest(batch, out):
            log.error(
                "the collector has refused %d measurements in a row and the batch behind them too: "
                "treating it as failing, not quarantining more",
                self.refused_in_a_row,
            )
        else:
            suspect = False
        # The collector answered: it is up, whatever it thought of this batch.
        if reply.status == 413 or (reply.refuses_content and not suspect):
            self.backoff.succeeded()
            if n == 1:
                self.refused_in_a_row += 1
                why = f"{reply.reason}: {reply.detail}".strip(": ")
                await self.spool.call(spool.quarantine, batch.batch_id, why)
                out.quarantined += 1
                log.error(
                    "measurement quarantined, the collector refuses it (%s): %s %s %s via %s",
                    why,
                    *(
                        json.loads(batch.bodies[0]).get(k)
                        for k in ("domain", "qtype", "resolver", "transport")
                    ),
                )
                return True
            cuts = [n // 2]
            if reply.status == 413:
                self.batch_size = max(1, min(self.batch_size, n // 2))
            else:
                hint = _INDEX.match(reply.detail)
                if hint and 0 <= int(hint.group(1)) < n:
                    i = int(hint.group(1))
                    cuts = [i, i + 1]  # the named measurement alone, then what is around it
            parts = await self.spool.call(spool.divide, batch.batch_id, cuts)
            log.warning(
                "collector refused batch %s of %d results (%s %s): divided into %d to find what it refuses",
                batch.batch_id,
                n,
                reply.reason,
                reply.detail[:200],
                len(parts),
            )
            return True
        delay = self.backoff.failed(reply.retry_after)
        self.unreachable = reply.reason == "connect"
        out.failure = f"{reply.reason}: {reply.detail}".strip(": ")
        await self.spool.call(spool.note_failure, batch.batch_id, out.failure, time.time() + delay)
        log.warning(
            "push of batch %s failed (%s); %d failures in a row, next try in %.1fs",
            batch.batch_id,
            out.failure[:300],
            self.backoff.failures,
            delay,
        )
        return False

    async def _acknowledged(self, batch: Batch, reply: Reply, out: PushOutcome) -> None:
        await self.spool.call(self.spool.spool.ack, batch.batch_id)
        self.backoff.succeeded()
        self.unreachable = False
        out.sent_batches += 1
        out.sent_results += len(batch.bodies)
        log.info(
            "batch %s acknowledged: %d results, %s",
            batch.batch_id,
            len(batch.bodies),
            "a duplicate (the collector had it already)" if reply.duplicate else "new",
        )

    async def _accepts_the_rest(self, head: Batch, out: PushOutcome) -> bool:
        """Send one batch from behind the refused head (further behind at each try while
        those are refused too); True when the collector accepts it, so it refuses what is at
        the head, not everything."""
        if self._probe_from is None:
            self._walked = len(head.bodies)
        behind = await self.spool.call(
            self.spool.spool.batch_after, self._probe_from or head.batch_id, self.batch_size
        )
        if behind is None:
            self._probe_from = None  # nothing further behind: from the head again next time
            return False
        await self._paced()
        reply = await self.send(behind.batch_id, behind.bodies)
        if reply.ok:
            await self._acknowledged(behind, reply, out)
            # What lies between the head and this batch may be set aside before asking again:
            # that is the run, and a bad deploy arriving meanwhile sets aside no more than it.
            self.allowance = self.refused_in_a_row + max(SUSPECT_AFTER, self._walked)
            self._probe_from = None
            log.warning(
                "the collector accepts the batch behind %d refused measurements: it refuses those, "
                "not everything; they are set aside",
                self.refused_in_a_row,
            )
            return True
        self.on_failure(reply.reason)
        if reply.status == 413 or reply.refuses_content:
            self._probe_from = behind.batch_id
            self._walked += len(behind.bodies)
        else:
            self._probe_from = None
        return False

    async def resend(self, items: list[Quarantined]) -> tuple[int, int, str | None]:
        """Send quarantined measurements again (after a collector fix, say), bisecting what is
        still refused; returns (acknowledged, still refused, why the collector failed or None).

        Batch ids derive from the quarantine rows, so a resend interrupted after the
        collector stored it is recognised as a duplicate the next time, not stored twice.
        """
        spool = self.spool.spool
        acknowledged = refused = 0
        queue = deque(items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size))
        while queue:
            group = queue.popleft()
            ids = [q.id for q in group]
            batch_id = str(uuid.uuid5(_RESEND, f"{self.config.probe_id}:" + ",".join(map(str, ids))))
            await self._paced()
            reply = await self.send(batch_id, [encode(clamp(q.measurement))[1] for q in group])
            if reply.ok:
                acknowledged += await self.spool.call(spool.release, ids)
            elif reply.status == 413 or reply.refuses_content:
                if len(group) == 1:
                    await self.spool.call(
                        spool.requarantine, ids, f"{reply.reason}: {reply.detail}".strip(": ")
                    )
                    refused += 1
                    continue
                hint = _INDEX.match(reply.detail)
                cut = int(hint.group(1)) if hint and reply.status != 413 else len(group) // 2
                parts = (
                    [p for p in (group[:cut], group[cut : cut + 1], group[cut + 1 :]) if p]
                    if hint
                    else [group[:cut], group[cut:]]
                )
                queue.extendleft(reversed(parts))
            else:
                return acknowledged, refused, f"{reply.reason}: {reply.detail}".strip(": ")
        return acknowledged, refused, None

    async def answers(self) -> bool:
        """Whether the collector answers HTTP at all (any status): one small GET of /healthz,
        no body to send or gzip, so it can be tried every second while the collector is down."""
        try:
            await self.client.get(
                f"{self.collector.url}/healthz", timeout=min(self.collector.timeout, REACHABLE_TIMEOUT)
            )
        except httpx2.HTTPError:
            return False
        return True

    async def fetch_lists(self, etag: str | None) -> tuple[str | None, list[tuple[str, str]] | None]:
        """The collector's lists files: (etag, [(name, text)]), or (etag, None) when unchanged."""
        headers = {"If-None-Match": etag} if etag else {}
        resp = await self.client.get(f"{self.collector.url}/api/v1/lists", headers=headers)
        if resp.status_code == 304:
            return etag, None
        resp.raise_for_status()
        files = [(str(f["name"]), str(f["content"])) for f in resp.json()["files"]]
        return resp.headers.get("etag"), files

    async def send(self, batch_id: str, bodies: list[str]) -> Reply:
        """POST one batch; never raises for anything the network or the collector does."""
        headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "Idempotency-Key": batch_id,
        }
        # zlib releases the GIL while it compresses: a worker thread keeps this off the loop.
        body = await asyncio.to_thread(self._body, batch_id, bodies)
        try:
            resp = await self.client.post(self.url, content=body, headers=headers)
        except httpx2.TimeoutException:
            return Reply(0, "timeout", "the collector did not answer in time")
        except httpx2.HTTPError as exc:
            return Reply(0, "connect", f"{type(exc).__name__}: {exc}"[:300])
        detail = ""
        duplicate = False
        try:
            doc = resp.json()
            if isinstance(doc, dict):
                detail = str(doc.get("detail") or "")
                duplicate = doc.get("duplicate") is True
        except ValueError:
            detail = resp.text[:200].replace("\n", " ")
        wait = retry_after(resp.headers.get("retry-after")) if resp.status_code in (429, 503) else None
        return Reply(resp.status_code, f"http {resp.status_code}", detail[:500], wait, duplicate)
