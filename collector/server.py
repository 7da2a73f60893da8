"""uvicorn as the collector runs it: header, keep-alive and body deadlines and a connection limit.

uvicorn bounds the keep-alive wait between requests, but not the wait for a request's
headers: a connection that sends half a request line stays open for ever. GuardedH11
closes a connection whose next request has not finished its headers within
`server.header_timeout` (from the first byte, or from connecting). `limit_concurrency`
turns away connections beyond `server.max_connections` with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Generator
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from collector.config import CollectorConfig

__all__ = ["CollectorServer", "GuardedH11", "server_config"]


class GuardedH11(H11Protocol):
    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        waiting = before is None or before.response_complete
        if waiting:
            self._arm()  # bytes of a new request: its headers are due within the deadline
        super().data_received(data)
        if self.cycle is not before:
            self._disarm()  # a request's headers were complete

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a pipelined request started

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def server_config(app: Any, config: CollectorConfig, **extra: Any) -> uvicorn.Config:
    """The uvicorn config for `app` under `config` (tests pass log_level and the like in `extra`)."""
    protocol = type("Guarded", (GuardedH11,), {"header_timeout": config.header_timeout})
    options: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "http": protocol,
        "ssl_certfile": config.tls_cert,
        "ssl_keyfile": config.tls_key,
        "timeout_keep_alive": config.keep_alive_timeout,
        "limit_concurrency": config.max_connections,
        "h11_max_incomplete_event_size": 16 * 1024,
        "access_log": False,
        "proxy_headers": False,
        "server_header": False,
        "lifespan": "on",
        "log_level": "info",
    }
    options.update(extra)
    return uvicorn.Config(app, **options)


class CollectorServer(uvicorn.Server):
    """uvicorn's server, minus the re-raise of SIGTERM after a graceful stop, so that the
    process can close its database and exit 0 (systemd then records a clean stop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
