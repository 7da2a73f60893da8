"""The ingest path, authentication first: nothing unauthenticated costs more than reading headers.

`POST /api/v1/results` is served here, in front of FastAPI's routing, in this order:

1. the bearer token, from the headers alone (a cached map of token digests: no database
   round trip per request, at most one refresh a second for unknown tokens);
2. the probe's results quota, then its own gate (two batches at a time per probe, so one
   token cannot hold every slot);
3. the body, within `server.body_timeout` and `limits.max_body`;
4. inflating, a structural scan (depth and container count) and JSON parsing, in a worker
   thread behind a small global gate, so the event loop keeps answering other probes;
5. validation (collector.schema), the quotas on groups and series, then the store.

A request that fails a step gets the status and a reason, and costs nothing past that step.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import math
import re
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from collector.auth import hash_token
from collector.config import CollectorConfig
from collector.metrics import Health
from collector.schema import MAX_BODY_DEPTH, Batch
from collector.store import SeriesQuotaExceeded, Store, parse_time, rule_of
from probe.limits import MAX_BATCH_MEASUREMENTS

__all__ = ["INGEST_PATH", "IngestGate", "TokenCache", "json_response", "parse_body"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

INGEST_PATH = "/api/v1/results"
PER_PROBE_CONCURRENCY = 2
# A measurement holds a handful of arrays and objects (ede, answers, cname, control,
# evidence...): 64 each is far above what a probe sends and bounds what a body can make
# Python allocate (an empty list is 56 bytes; `[[],[],…]` is 3 bytes each on the wire).
CONTAINERS_PER_MEASUREMENT = 64


# After a body this large, hand freed memory back to the system: glibc keeps what worker
# threads freed in their arenas, so one 64 MB body would leave the process that much bigger
# for good on a small machine.
TRIM_ABOVE = 8 << 20


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Refusal(Exception):
    """A request refused with a status, a reason and maybe headers (Retry-After)."""

    def __init__(
        self,
        status: int,
        detail: str,
        reason: str,
        headers: dict[str, str] | None = None,
        errors: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason
        self.headers = headers or {}
        self.errors = errors


def json_response(
    status: int, payload: Any, headers: dict[str, str] | None = None
) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps(payload).encode()
    out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    out += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, body, out


async def send_response(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class TokenCache:
    """Probe token digest → probe id, refreshed from the store in a worker thread.

    Refreshed every `ttl` seconds, at once after a token change made through the same
    store object, and on an unknown token at most once every `miss_interval` seconds:
    a flood of made-up tokens costs one query a second, not one per request. Looking the
    digest up in a dict can leak, through timing, at most something about a SHA-256 of a
    token, which does not help to guess one (256 random bits).
    """

    def __init__(self, store: Store, ttl: float = 2.0, miss_interval: float = 1.0) -> None:
        self.store = store
        self.ttl = ttl
        self.miss_interval = miss_interval
        self._owners: dict[str, str] = {}
        self._loaded = -math.inf
        self._generation = -1
        self._lock = asyncio.Lock()

    def _load(self) -> dict[str, str]:
        return {h: p for p, h, _created, revoked in self.store.tokens() if revoked is None}

    async def owner(self, token: str) -> str | None:
        digest = hash_token(token)
        now = time.monotonic()
        stale = now - self._loaded > self.ttl or self.store.token_generation != self._generation
        if stale or (digest not in self._owners and now - self._loaded > self.miss_interval):
            async with self._lock:
                if (
                    time.monotonic() - self._loaded > self.miss_interval
                    or self.store.token_generation != self._generation
                ):
                    generation = self.store.token_generation
                    self._owners = await run_in_threadpool(self._load)
                    self._generation = generation
                    self._loaded = time.monotonic()
        return self._owners.get(digest)


def bearer(headers: dict[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Bucket:
    """A token bucket per probe: `rate` results a minute, bursts up to a minute's worth."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.at = time.monotonic()
        self.lock = threading.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait_for(self, n: int) -> float:
        """0 when `n` results fit now (and takes them), else the seconds until they would."""
        with self.lock:
            self._refill()
            need = min(
                float(n), self.capacity
            )  # a batch bigger than a minute's worth passes on a full bucket
            if self.level >= need:
                self.level -= n
                return 0.0
            return (need - self.level) / self.rate

    def empty_for(self) -> float:
        with self.lock:
            self._refill()
            return 0.0 if self.level > 0 else -self.level / self.rate + 1 / self.rate


class GroupQuota:
    """Per probe, the current (resolver, transport, rule) groups, bounded.

    Each group is a set of Prometheus series (counts per finding, reachability, latency):
    without a bound one token could make them up by the hundred thousand. Seeded from the
    store on a probe's first batch after start; groups unseen for `stale_after` drop out.
    """

    def __init__(self, store: Store, limit: int, stale_after: float) -> None:
        self.store = store
        self.limit = limit
        self.stale_after = stale_after
        self.seen: dict[str, dict[tuple[str, str, str], float]] = {}
        self.lock = threading.Lock()

    def admit(self, probe_id: str, groups: set[tuple[str, str, str]], now: float) -> int | None:
        """None when the groups fit (and records them), else how many groups the probe would have."""
        if probe_id not in self.seen:
            seeded = self.store.groups(probe_id, now - self.stale_after)
            with self.lock:
                self.seen.setdefault(probe_id, dict.fromkeys(seeded, now))
        with self.lock:
            known = self.seen[probe_id]
            new = [g for g in groups if g not in known]
            if len(known) + len(new) > self.limit:
                for g, t in list(known.items()):
                    if t < now - self.stale_after:
                        del known[g]
                if len(known) + len(new) > self.limit:
                    return len(known) + len(new)
            for g in groups:
                known[g] = now
            return None


_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_LEAF = re.compile(rb"\[\]|\{\}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _brackets_outside_strings(data: bytes) -> bytes:
    """The brackets of `data` outside its JSON strings, in order. Inside a string every backslash
    starts a two-byte escape, so removing `\\\\` pairs first and then `\\"` leaves only the
    quotes that delimit strings; then only brackets and quotes are kept (at C speed), and every
    other piece between quotes is outside a string. A quarter of the time of a pattern that
    removes strings from the whole body (bench/README.md); an unterminated string's tail is
    dropped, which json.loads refuses anyway."""
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    return b"".join(data.translate(None, _NOT_STRUCTURE).split(b'"')[::2])


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a number")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string (key or value) holding an unpaired UTF-16 surrogate, or None."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body"
        elif isinstance(v, dict):
            for k, item in v.items():
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    return where or "body"
                stack.append((f"{where}.{k}" if where else k, item))
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(v))
    return None


def parse_body(data: bytes) -> Any:
    """JSON with bounds a body cannot escape: depth, container count, finite numbers, valid UTF-8
    without unpaired surrogates. Raises Refusal (422)."""
    # Structure first, on bytes and at C speed, before Python allocates a single object for it.
    # Counting brackets with those inside strings is an upper bound that needs no copy: a body
    # over it is refused even if its strings hold the brackets (no probe sends such text).
    limit = CONTAINERS_PER_MEASUREMENT * MAX_BATCH_MEASUREMENTS + 64
    if data.count(b"[") + data.count(b"{") > limit:
        raise Refusal(422, f"the body holds more than {limit} JSON arrays and objects", "invalid")
    brackets = _brackets_outside_strings(data)
    # Each pass removes the innermost pairs: anything left after MAX_BODY_DEPTH passes is deeper.
    for _ in range(MAX_BODY_DEPTH):
        if not brackets:
            break
        brackets = _LEAF.sub(b"", brackets)
    if brackets and _LEAF.search(brackets):
        raise Refusal(422, f"the body is nested deeper than {MAX_BODY_DEPTH} levels", "invalid")
    del brackets
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refusal(422, f"the body is not UTF-8 (byte {exc.start})", "invalid") from None
    try:
        doc = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise Refusal(422, f"the body is not valid JSON: {str(exc)[:200]}", "invalid") from None
    if _SURROGATE_ESCAPE.search(data):  # escapes of surrogates are rare: walk only when present
        where = _lone_surrogate(doc)
        if where is not None:
            raise Refusal(422, f"{where}: holds an unpaired UTF-16 surrogate (not text)", "invalid")
    return doc


def _loc(loc: Any) -> str:
    out = ""
    for part in loc:
        if part == "body":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _inflate(body: bytes, encoding: str, max_decompressed: int) -> bytes:
    if encoding != "gzip":
        return body
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, max_decompressed + 1)
    except zlib.error:
        raise Refusal(400, "the body is not valid gzip", "bad_encoding") from None
    if len(data) > max_decompressed or inflater.unconsumed_tail:
        raise Refusal(413, f"the inflated body is over the limit of {max_decompressed} bytes", "too_large")
    return data


class IngestGate:
    """ASGI middleware that serves POST /api/v1/results and passes everything else on."""

    def __init__(
        self, app: Any, config: CollectorConfig, store: Store, health: Health, tokens: TokenCache
    ) -> None:
        self.app = app
        self.config = config
        self.store = store
        self.health = health
        self.tokens = tokens
        self.work_gate = asyncio.Semaphore(config.max_concurrent_ingest)
        self.probe_gates: dict[str, asyncio.Semaphore] = {}
        self.buckets: dict[str, Bucket] = {}
        self.groups = GroupQuota(store, config.max_groups_per_probe, config.stale_after)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != INGEST_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            status, payload, extra = await self._ingest(headers, receive)
        except Refusal as r:
            self.health.rejected.labels(r.reason).inc()
            status, extra = r.status, r.headers
            payload = {"detail": r.detail} if r.errors is None else {"detail": r.detail, "errors": r.errors}
        except _Disconnected:
            return
        await send_response(send, *json_response(status, payload, extra))

    async def _ingest(self, headers: dict[str, str], receive: Receive) -> tuple[int, Any, dict[str, str]]:
        token = bearer(headers)
        if token is None:
            raise Refusal(401, "a bearer token is required", "unauthorized", {"WWW-Authenticate": "Bearer"})
        probe_id = await self.tokens.owner(token)
        if probe_id is None:
            raise Refusal(401, "unknown or revoked token", "unauthorized", {"WWW-Authenticate": "Bearer"})
        bucket = self.buckets.setdefault(probe_id, Bucket(self.config.results_per_minute))
        wait = bucket.empty_for()
        if wait > 0:
            self.health.throttled.labels(probe_id, "results").inc()
            raise Refusal(
                429,
                f"probe {probe_id!r} is over its quota of {self.config.results_per_minute} results a minute",
                "quota",
                {"Retry-After": str(math.ceil(wait))},
            )
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            raise Refusal(400, "content-length is not a number", "invalid") from None
        if length > self.config.max_body:
            raise Refusal(
                413, f"body of {length} bytes is over the limit of {self.config.max_body}", "too_large"
            )
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("gzip", "identity", ""):
            raise Refusal(
                415, f"content-encoding {encoding[:40]!r} is not supported (gzip or none)", "bad_encoding"
            )
        gate = self.probe_gates.setdefault(probe_id, asyncio.Semaphore(PER_PROBE_CONCURRENCY))
        try:
            await asyncio.wait_for(gate.acquire(), self.config.body_timeout)
        except TimeoutError:
            self.health.throttled.labels(probe_id, "busy").inc()
            raise Refusal(
                429,
                f"probe {probe_id!r} already has {PER_PROBE_CONCURRENCY} batches in flight",
                "busy",
                {"Retry-After": "1"},
            ) from None
        try:
            body = await self._read(receive)
            async with self.work_gate:
                return await run_in_threadpool(self._process, probe_id, body, encoding, bucket)
        finally:
            gate.release()

    async def _read(self, receive: Receive) -> bytes:
        body = bytearray()
        try:
            async with asyncio.timeout(self.config.body_timeout):
                more = True
                while more:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        raise _Disconnected
                    body += msg.get("body", b"")
                    more = msg.get("more_body", False)
                    if len(body) > self.config.max_body:
                        raise Refusal(
                            413, f"body is over the limit of {self.config.max_body} bytes", "too_large"
                        )
        except TimeoutError:
            raise Refusal(
                408, f"the body did not arrive within {self.config.body_timeout:g} s", "slow_body"
            ) from None
        return bytes(body)

    def _check_times(self, rows: list[dict[str, Any]], received: float) -> int:
        """Refuse a batch with a time that is not one or is too old; clamp times in the future
        to `received` (returns how many were)."""
        config = self.config
        clamped = 0
        oldest = received - config.max_age_days * 86400
        for i, m in enumerate(rows):
            try:
                t = parse_time(m["time"])
            except ValueError:
                raise Refusal(
                    422, f"measurements[{i}].time: {m['time']!r} is not a time", "invalid"
                ) from None
            if t > received + config.max_future_skew:
                m["clock_clamped_from"] = m["time"]  # keep what the probe said, store when we got it
                m["time"] = (
                    datetime.fromtimestamp(received, UTC)
                    .isoformat(timespec="milliseconds")
                    .replace("+00:00", "Z")
                )
                clamped += 1
            elif t < oldest:
                raise Refusal(
                    422,
                    f"measurements[{i}].time: {m['time']} is more than {config.max_age_days:g} days "
                    "old (check the probe's clock)",
                    "clock",
                )
        return clamped

    def _process(
        self, probe_id: str, body: bytes, encoding: str, bucket: Bucket
    ) -> tuple[int, Any, dict[str, str]]:
        """Everything CPU-bound, in a worker thread: inflate, parse, validate, check, store."""
        started = time.perf_counter()
        config, health = self.config, self.health
        data = _inflate(body, encoding, config.max_decompressed)
        refused: Refusal | None = None
        try:
            doc = parse_body(data)
        except Refusal as exc:
            refused = exc.with_traceback(None)  # its frames would keep `data` alive
        big = len(data) > TRIM_ABOVE
        del data
        if big:
            _trim()
        if refused is not None:
            raise refused
        try:
            batch = Batch.model_validate(doc)
        except ValidationError as exc:
            errors = exc.errors()
            first = errors[0] if errors else {"loc": (), "msg": "invalid"}
            raise Refusal(
                422, f"{_loc(first['loc'])}: {first['msg']}", "invalid", errors=len(errors)
            ) from None
        finally:
            del doc
        if batch.probe.id != probe_id:
            raise Refusal(
                403, f"this token belongs to probe {probe_id!r}, not {batch.probe.id!r}", "forbidden"
            )
        received = time.time()
        rows = batch.model_dump(mode="json")["measurements"]  # one call: a fifth less than one each
        clamped = self._check_times(rows, received)
        wait = bucket.wait_for(len(rows))
        if wait > 0:
            health.throttled.labels(probe_id, "results").inc()
            raise Refusal(
                429,
                f"{len(rows)} results would put probe {probe_id!r} over its quota of "
                f"{config.results_per_minute} a minute",
                "quota",
                {"Retry-After": str(math.ceil(wait))},
            )
        groups = {(m["resolver"], m["transport"], rule_of(m) or "") for m in rows}
        over = self.groups.admit(probe_id, groups, received)
        if over is not None:
            health.throttled.labels(probe_id, "groups").inc()
            raise Refusal(
                429,
                f"this batch would give probe {probe_id!r} {over} resolver × transport × list groups, "
                f"over its quota of {config.max_groups_per_probe}",
                "quota",
                {"Retry-After": str(math.ceil(config.stale_after))},
            )
        probe = batch.probe.model_dump()
        try:
            result = self.store.ingest(
                probe,
                batch.batch_id,
                rows,
                received,
                max_series=(config.max_series_per_probe, received - config.stale_after),
            )
        except SeriesQuotaExceeded as exc:
            health.throttled.labels(probe_id, "series").inc()
            raise Refusal(
                429,
                f"probe {probe_id!r}: {exc}",
                "quota",
                {"Retry-After": str(math.ceil(config.stale_after))},
            ) from None
        except Exception:
            health.db_errors.inc()
            raise
        health.batches.labels("stored" if result.new else "duplicate").inc()
        health.results.inc(result.stored)
        health.clamped.inc(clamped)
        health.ingest.observe(time.perf_counter() - started)
        out: dict[str, Any] = {
            "batch_id": batch.batch_id,
            "stored": result.stored,
            "duplicate": not result.new,
        }
        if clamped:
            out["clamped"] = clamped
            out["warning"] = (
                f"{clamped} measurement times were in the future and were set to the receive time"
            )
        return 200, out, {}


class _Disconnected(Exception):
    pass
