"""The collector's HTTP API (FastAPI on uvicorn): ingest, lists, metrics, status page, evidence.

FastAPI because the request body is a typed model: the same pydantic model validates
strictly (422 naming the first bad field) and generates the OpenAPI description that
the fuzzing tests and client authors use. The ingest itself runs in collector.ingest,
in front of routing, so that the token is checked before a byte of body is read.
Reads can be locked (config `reads`); every response carries the security headers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import hmac
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from collector.compliance import run_forever as run_compliance
from collector.config import CollectorConfig, ReadAccess
from collector.export import findings_page
from collector.ingest import INGEST_PATH, IngestGate, TokenCache, bearer, json_response, send_response
from collector.metrics import make_registry
from collector.pages import Pages, decode_cursor
from collector.reach import ip_blocks
from collector.schema import Batch
from collector.store import Store

__all__ = ["create_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


SECURITY_HEADERS = [
    # Pages are server-rendered with inline styles and no scripts: nothing else may load.
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]

PROBE_PATHS = ("/api/v1/results", "/api/v1/lists")  # probe tokens guard these, in the app
READS_AT_ONCE = 2  # on-demand reads at a time (the ingest has max_concurrent_ingest of its own)


class ReadGuard:
    """ASGI middleware: read access (config `reads`) on every path but the probes' own, and the
    security headers on every response."""

    def __init__(self, app: Any, access: ReadAccess, on_reject: Callable[[], None]) -> None:
        self.app = app
        self.access = access
        self.on_reject = on_reject

    def _open(self, path: str) -> bool:
        if path in PROBE_PATHS:
            return True
        if path == "/healthz":
            return self.access.open_healthz
        if path == "/metrics":
            return self.access.open_metrics
        return self.access.open_pages

    def allowed(self, authorization: str) -> bool:
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        a = self.access
        if scheme.lower() == "bearer" and a.token_sha256 and value:
            return hmac.compare_digest(hashlib.sha256(value.encode()).hexdigest(), a.token_sha256)
        if scheme.lower() == "basic" and a.basic_user and a.basic_password_sha256 and value:
            try:
                user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            same_user = hmac.compare_digest(user.encode(), a.basic_user.encode())
            same_password = hmac.compare_digest(
                hashlib.sha256(password.encode()).hexdigest(), a.basic_password_sha256
            )
            return same_user and same_password
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        if not self._open(scope["path"]):
            authorization = ""
            for k, v in scope["headers"]:
                if k.lower() == b"authorization":
                    authorization = v.decode("latin-1")
            if not self.allowed(authorization):
                self.on_reject()
                status, body, headers = json_response(
                    401,
                    {"detail": "reading this collector needs the read token or the read user's password"},
                    {"WWW-Authenticate": 'Basic realm="blockprobe", charset="UTF-8"'},
                )
                await send_response(secured, status, body, headers)
                return
        await self.app(scope, receive, secured)


class _Packed:
    """A rendered body and its gzip, made once per render in the worker thread: a scrape of a
    few megabytes costs each reader a tenth of that on the wire and no compression."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.gzipped = gzip.compress(body, 1)

    def response(self, request: Request, media_type: str) -> Response:
        if "gzip" in request.headers.get("accept-encoding", "").lower():
            return Response(
                self.gzipped,
                media_type=media_type,
                headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"},
            )
        return Response(self.body, media_type=media_type, headers={"Vary": "Accept-Encoding"})


class Rendered:
    """A rendered page or scrape, kept for `ttl` seconds; one render at a time, in a worker thread,
    shared by all who ask meanwhile: readers cannot pile renders on the ingest's database.

    While readers keep coming, a value up to 3 × `ttl` old is served at once and refreshed
    behind them, and goes on being served until that refresh lands, however long it takes on a
    loaded machine (up to 10 × the larger of `ttl` and the last render's duration; when readers waited for a refresh that outlived the window, the slowest
    /metrics under hammering took 4 to 5 s: bench/README.md), so a busy reader never waits
    for a render; after a quiet spell (a scrape
    every 15 s) the reader waits for a fresh one rather than get the last scrape's numbers,
    unless renders have grown slow: a value up to 3 × the last render's duration old is then
    served as well, since waiting would cost the reader more than the value's age (a scrape
    that waits for a 20 s render times out, and Prometheus would see no findings at all).
    `ttl` 0: a fresh render every time.
    """

    def __init__(self, ttl: float, make: Callable[[], Any]) -> None:
        self.ttl = ttl
        self.make = make
        self.value: Any = None
        self.at = -math.inf
        self.took = 0.0  # how long the last render took
        self.pending: asyncio.Future[Any] | None = None
        self.behind = False  # the pending render was started while the value could still be served

    async def get(self) -> Any:
        if self.ttl <= 0:
            return await run_in_threadpool(self.make)
        age = time.monotonic() - self.at
        if self.value is not None and age < self.ttl:
            return self.value
        span = max(self.ttl, self.took)
        servable = self.value is not None and age < 3 * span
        if self.pending is None:
            self.pending = asyncio.ensure_future(run_in_threadpool(self._timed))
            self.pending.add_done_callback(self._done)
            self.behind = servable
        # Behind busy readers, not for ever: a render hung on the database shows after 10 spans.
        if self.value is not None and (servable or (self.behind and age < 10 * span)):
            return self.value
        return await asyncio.shield(self.pending)

    def _timed(self) -> Any:
        start = time.monotonic()
        value = self.make()
        self.took = time.monotonic() - start
        return value

    def _done(self, fut: asyncio.Future[Any]) -> None:
        self.pending = None
        if not fut.cancelled() and fut.exception() is None:
            self.value, self.at = fut.result(), time.monotonic()


class SingleFlight:
    """`fn` in a worker thread, once at a time: who asks while it runs waits for that run, so
    any number of callers (health checks, open by default) take one thread, never a pile of them."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.running: asyncio.Future[Any] | None = None
        self.waiters = 0

    async def run(self) -> Any:
        if self.running is None:
            self.running = asyncio.ensure_future(run_in_threadpool(self.fn))
            self.running.add_done_callback(self._done)
        self.waiters += 1
        try:
            return await asyncio.shield(self.running)
        finally:
            self.waiters -= 1

    def _done(self, fut: asyncio.Future[Any]) -> None:
        self.running = None
        if not fut.cancelled():
            fut.exception()  # retrieved: the waiters raise it


def create_app(config: CollectorConfig, store: Store) -> FastAPI:  # noqa: C901 - the routes are closures here
    """The ASGI application for one store."""
    registry, health = make_registry()
    pages = Pages(store, config.stale_after, config.prometheus_url, ip_block_window=config.ip_block_window)
    tokens = TokenCache(store)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async def retention() -> None:
            while True:
                cutoff = time.time() - config.retention_days * 86400
                await run_in_threadpool(store.trim_archive, cutoff)
                await asyncio.sleep(3600)

        task = asyncio.create_task(retention())
        compliance = asyncio.create_task(
            run_compliance(store, config.stale_after, config.compliance_interval, config.max_future_skew)
        )
        yield
        task.cancel()
        compliance.cancel()

    app = FastAPI(
        title="blockprobe collector",
        version="1",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        description="Receives measurements from authenticated probes; serves metrics, lists and evidence.",
    )

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        health.rejected.labels("invalid").inc()
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid"}
        return JSONResponse(
            status_code=422,
            content={"detail": f"{_loc(first['loc'])}: {first['msg']}", "errors": len(errors)},
        )

    async def probe_of_token(request: Request) -> str:
        """The probe id a bearer token belongs to (401 when there is none)."""
        token = bearer({"authorization": request.headers.get("authorization", "")})
        if token is None:
            health.rejected.labels("unauthorized").inc()
            raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        owner = await tokens.owner(token)
        if owner is None:
            health.rejected.labels("unauthorized").inc()
            raise HTTPException(401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
        return owner

    @app.post(
        INGEST_PATH,
        responses={400: {}, 401: {}, 403: {}, 408: {}, 413: {}, 415: {}, 422: {}, 429: {}},
        response_model=IngestReply,
        dependencies=[Depends(probe_of_token)],
    )
    async def ingest(batch: Batch) -> IngestReply:  # noqa: ARG001 - declares the body's schema for OpenAPI
        """Store a batch of measurements. A batch id this probe sent before is acknowledged and not
        stored again. 429 with Retry-After when the probe is over a quota.

        Served by collector.ingest.IngestGate before routing (the token is checked before the
        body is read); this declaration gives the OpenAPI description its schema.
        """
        raise HTTPException(500, "the ingest gate did not serve this request")

    @app.get("/api/v1/lists", responses={304: {}, 401: {}}, dependencies=[Depends(probe_of_token)])
    async def lists(request: Request) -> Response:
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

    findings = Rendered(
        config.render_cache_seconds,
        lambda: _Packed(
            health.findings(
                store,
                config.stale_after,
                config.max_domain_series,
                config.ip_block_window,
                config.max_exported_series_per_probe,
            )
            + health.own()
        ),
    )

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> Response:
        """Prometheus exposition: findings from the latest state, and the collector's own health."""
        packed: _Packed = await findings.get()
        return packed.response(request, CONTENT_TYPE_LATEST)

    health_check = SingleFlight(lambda: store.probes())

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        await health_check.run()
        return {"status": "ok"}

    # Rendered off the loop, cached a moment and gzipped once, so readers hammering the page
    # never slow ingest; one cache per view.
    def view(show: str | None) -> Callable[[], _Packed]:
        return lambda: _Packed(pages.status(show).encode())

    status_views = {
        show: Rendered(config.render_cache_seconds, view(show)) for show in (None, "leak", "overblock")
    }
    # Reads made on demand (pages past the first, findings pages, evidence, IP blocks) run two at
    # a time in the worker threads the ingest also uses; beyond that a reader is told to come
    # back (503, Retry-After) rather than queued, so no number of readers can pile reads on the
    # database or take the ingest's threads.
    paged_reads = asyncio.Semaphore(READS_AT_ONCE)

    def busy() -> HTTPException:
        health.rejected.labels("read_busy").inc()
        return HTTPException(
            503, "other pages are being read; retry in a second", headers={"Retry-After": "1"}
        )

    async def read(fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a worker thread, if one of the read slots is free (else 503)."""
        if paged_reads.locked():
            raise busy()
        async with paged_reads:
            return await run_in_threadpool(fn, *args)

    @app.get("/", response_class=HTMLResponse, responses={422: {}, 503: {}})
    async def status_page(
        request: Request,
        show: str | None = Query(None, pattern="^(leak|overblock)$"),
        after: str | None = Query(None, max_length=2048, pattern="^[A-Za-z0-9_-]+$"),
    ) -> Response:
        """The answer first: a country × resolver × transport matrix, then leaks, then overblocks.
        `show` pages through one section; `after` is the cursor of its next page."""
        if after is None or show is None:
            packed: _Packed = await status_views[show].get()
            return packed.response(request, "text/html; charset=utf-8")
        try:
            key = decode_cursor(after, 3)
        except ValueError as exc:
            raise HTTPException(422, f"after: {exc}") from None
        html = await read(pages.status, show, None, key)
        return _Packed(html.encode()).response(request, "text/html; charset=utf-8")

    @app.get("/api/v1/findings", responses={422: {}, 503: {}})
    async def findings_list(
        finding: str = Query("leak", pattern="^(leak|overblock)$"),
        country: str | None = Query(None, pattern="^[A-Z]{2}$"),
        resolver: str | None = Query(None, max_length=128),
        transport: str | None = Query(None, pattern="^(udp|tcp|dot|doh|doh3|doq)$"),
        probe: str | None = Query(None, max_length=64),
        order: str | None = Query(None, max_length=128),
        limit: int = Query(1000, ge=1, le=10_000),
        after: str | None = Query(None, max_length=2048, pattern="^[A-Za-z0-9_-]+$"),
        format: str = Query("json", pattern="^(json|csv)$"),
    ) -> Response:
        """Every current leak or overblock series (not capped, unlike /metrics), `limit` a page in
        (country, domain, qtype, resolver, transport, probe) order; `next` (and the Link header)
        gives the following page, until it is null. Filters narrow the list and its `series` total."""
        filters = {
            "country": country,
            "resolver": resolver,
            "transport": transport,
            "probe": probe,
            "order": order,
        }
        since = time.time() - config.stale_after
        try:
            page = await read(findings_page, store, since, finding, filters, after, limit, format)
        except ValueError as exc:
            raise HTTPException(422, f"after: {exc}") from None
        headers = {"link": f'<{page.next}>; rel="next"'} if page.next else {}
        headers["x-total-series"] = str(page.series)
        if format == "csv":
            headers["content-disposition"] = f'attachment; filename="blockprobe-{finding}s.csv"'
            return Response(page.csv(), media_type="text/csv; charset=utf-8", headers=headers)
        return Response(page.json(), media_type="application/json", headers=headers)

    @app.get("/api/v1/ip-blocks", responses={503: {}})
    async def ip_block_list() -> JSONResponse:
        """The IP-level blocks inferred from the answer checks of the last `ip_block_window`
        seconds (as on the status page and in blockprobe_ip_block), with the probes on each side."""
        now = time.time()
        found = await read(ip_blocks, store, now, config.ip_block_window)
        return JSONResponse(
            {"window": config.ip_block_window, "at": now, "ip_blocks": [b.to_json() for b in found]}
        )

    @app.get("/evidence", response_class=HTMLResponse, responses={503: {}})
    async def evidence(
        probe: str = Query(max_length=64),
        resolver: str = Query(max_length=128),
        transport: str = Query(max_length=8),
        qtype: str = Query(max_length=8),
        domain: str = Query(max_length=253),
        format: str = Query("html", pattern="^(html|json)$"),
    ) -> Response:
        """One series: the judgement in words, its history, the raw responses (or JSON, newest first)."""
        rows, html = await read(pages.evidence, (probe, resolver, transport, qtype, domain))
        return JSONResponse(rows) if format == "json" else HTMLResponse(html)

    # Added last, so outermost: read access and headers first, then the ingest gate.
    app.add_middleware(IngestGate, config=config, store=store, health=health, tokens=tokens)
    app.add_middleware(
        ReadGuard, access=config.reads, on_reject=lambda: health.rejected.labels("read_unauthorized").inc()
    )
    app.state.health = health
    app.state.health_check = health_check
    app.state.registry = registry
    return app


class IngestReply(BaseModel):
    batch_id: str
    stored: int
    duplicate: bool
    clamped: int | None = None
    warning: str | None = None


def _loc(loc: Any) -> str:
    out = ""
    for part in loc:
        if part == "body":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "never"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
