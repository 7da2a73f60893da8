"""The collector's HTTP API (FastAPI on uvicorn): ingest, lists, metrics, status page, evidence.

FastAPI because the request body is a typed model: the same pydantic model validates
strictly (422 naming the first bad field) and generates the OpenAPI description that
the fuzzing tests and client authors use. Bodies are size-limited before parsing, and
gzip is inflated with a bound on the inflated size, in one ASGI middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from collector.auth import hash_token, owner_of
from collector.config import CollectorConfig
from collector.metrics import make_registry
from collector.pages import Pages
from collector.schema import Batch
from collector.store import Store, parse_time

__all__ = ["create_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _TooLarge(Exception):
    def __init__(self, detail: str) -> None:
        self.detail = detail


class BodyLimits:
    """ASGI middleware: refuse bodies over `max_body`, inflate gzip up to `max_decompressed`."""

    def __init__(
        self,
        app: Any,
        max_body: int,
        max_decompressed: int,
        on_reject: Callable[[str], None],
        concurrency: int = 4,
    ) -> None:
        self.app = app
        # Batches are parsed into objects several times their wire size: a few at a time keeps
        # memory bounded however many probes push at once (the others wait their turn).
        self.gate = asyncio.Semaphore(concurrency)
        self.max_body = max_body
        self.max_decompressed = max_decompressed
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        async with self.gate:
            await self._limited(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            length = 0
        try:
            if length > self.max_body:
                raise _TooLarge(f"body of {length} bytes is over the limit of {self.max_body}")
            body = bytearray()
            more = True
            while more:
                msg = await receive()
                body += msg.get("body", b"")
                more = msg.get("more_body", False)
                if len(body) > self.max_body:
                    raise _TooLarge(f"body is over the limit of {self.max_body} bytes")
            encoding = headers.get("content-encoding", "identity").strip().lower()
            if encoding == "gzip":
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                try:
                    data = inflater.decompress(bytes(body), self.max_decompressed + 1)
                except zlib.error:
                    await _plain(send, 400, "the body is not valid gzip")
                    self.on_reject("bad_encoding")
                    return
                if len(data) > self.max_decompressed or inflater.unconsumed_tail:
                    raise _TooLarge(f"the inflated body is over the limit of {self.max_decompressed} bytes")
                body = bytearray(data)
            elif encoding not in ("identity", ""):
                await _plain(send, 415, f"content-encoding {encoding!r} is not supported (gzip or none)")
                self.on_reject("bad_encoding")
                return
        except _TooLarge as exc:
            self.on_reject("too_large")
            await _plain(send, 413, exc.detail)
            return
        new_headers = [
            (k, v) for k, v in scope["headers"] if k.lower() not in (b"content-encoding", b"content-length")
        ]
        new_headers.append((b"content-length", str(len(body)).encode()))
        scope = dict(scope, headers=new_headers)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


async def _plain(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def _loc(loc: Any) -> str:
    out = ""
    for part in loc:
        if part == "body":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def create_app(config: CollectorConfig, store: Store) -> FastAPI:
    """The ASGI application for one store."""
    registry, health = make_registry(store, config.stale_after)
    pages = Pages(store, config.stale_after, config.prometheus_url)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def retention() -> None:
            while True:
                cutoff = time.time() - config.retention_days * 86400
                await run_in_threadpool(store.trim_archive, cutoff)
                await asyncio.sleep(3600)

        task = asyncio.create_task(retention())
        yield
        task.cancel()

    app = FastAPI(title="blockprobe collector", version="1", docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Receives measurements from authenticated probes; serves metrics, lists and evidence.")  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        health.rejected.labels("invalid").inc()
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid"}
        return JSONResponse(status_code=422, content={"detail": f"{_loc(first['loc'])}: {first['msg']}",
                                                      "errors": len(errors)})  # fmt: skip

    async def probe_of_token(request: Request) -> str:
        """The probe id a bearer token belongs to (401 when there is none)."""
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            health.rejected.labels("unauthorized").inc()
            raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        digest = hash_token(token.strip())
        owner = await run_in_threadpool(_owner, store, digest)
        if owner is None:
            health.rejected.labels("unauthorized").inc()
            raise HTTPException(401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
        return owner

    @app.post("/api/v1/results", responses={401: {}, 403: {}, 413: {}, 415: {}, 422: {}})
    async def ingest(batch: Batch, probe_id: str = Depends(probe_of_token)) -> dict[str, Any]:
        """Store a batch of measurements. A batch id seen before is acknowledged and not stored again."""
        started = time.perf_counter()
        if batch.probe.id != probe_id:
            health.rejected.labels("forbidden").inc()
            raise HTTPException(403, f"this token belongs to probe {probe_id!r}, not {batch.probe.id!r}")
        received = time.time()
        rows = [m.model_dump(mode="json") for m in batch.measurements]
        clamped = 0
        oldest = received - config.max_age_days * 86400
        for i, m in enumerate(rows):
            try:
                t = parse_time(m["time"])
            except ValueError:
                health.rejected.labels("invalid").inc()
                raise HTTPException(422, f"measurements[{i}].time: {m['time']!r} is not a time") from None
            if t > received + config.max_future_skew:
                m["clock_clamped_from"] = m["time"]  # keep what the probe said, store when we got it
                m["time"] = (
                    datetime.fromtimestamp(received, UTC)
                    .isoformat(timespec="milliseconds")
                    .replace("+00:00", "Z")
                )
                clamped += 1
            elif t < oldest:
                health.rejected.labels("clock").inc()
                raise HTTPException(422, f"measurements[{i}].time: {m['time']} is more than "
                                         f"{config.max_age_days:g} days old (check the probe's clock)")  # fmt: skip
        probe = batch.probe.model_dump()
        try:
            result = await run_in_threadpool(store.ingest, probe, batch.batch_id, rows, received)
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
        return out

    @app.get("/api/v1/lists", responses={304: {}, 401: {}})
    async def lists(request: Request, probe_id: str = Depends(probe_of_token)) -> Response:
        """The lists files in force, for probes to fetch (ETag: the hash of their contents)."""
        files = []
        for path in config.lists:
            text = await run_in_threadpool(Path(path).read_text, "utf-8")
            files.append(
                {
                    "name": Path(path).name,
                    "sha256": hashlib.sha256(text.encode()).hexdigest(),
                    "content": text,
                }
            )
        etag = '"' + hashlib.sha256("".join(f["sha256"] for f in files).encode()).hexdigest()[:32] + '"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        return JSONResponse({"files": files}, headers={"ETag": etag})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus exposition: findings from the latest state, and the collector's own health."""
        data = await run_in_threadpool(health.scrape, store, config.stale_after)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        await run_in_threadpool(store.probes)
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def status_page(show: str | None = Query(None, pattern="^(leak|overblock)$")) -> HTMLResponse:
        """The answer first: a country × resolver × transport matrix, then leaks, then overblocks."""
        return HTMLResponse(await run_in_threadpool(pages.status, show))

    @app.get("/evidence", response_class=HTMLResponse)
    async def evidence(
        probe: str = Query(max_length=64), resolver: str = Query(max_length=128), transport: str = Query(max_length=8),
        qtype: str = Query(max_length=8), domain: str = Query(max_length=253), format: str = Query("html", pattern="^(html|json)$"),
    ) -> Response:  # fmt: skip
        """One series: the judgement in words, its history, the raw responses (or JSON, newest first)."""
        rows, html = await run_in_threadpool(pages.evidence, (probe, resolver, transport, qtype, domain))
        return JSONResponse(rows) if format == "json" else HTMLResponse(html)

    app.add_middleware(BodyLimits, max_body=config.max_body, max_decompressed=config.max_decompressed,
                       on_reject=lambda reason: health.rejected.labels(reason).inc(),
                       concurrency=config.max_concurrent_ingest)  # fmt: skip
    app.state.health = health
    app.state.registry = registry
    return app


def _owner(store: Store, digest: str) -> str | None:
    return owner_of(digest, [(p, h) for p, h, _created, revoked in store.tokens() if revoked is None])


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "never"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
