"""uvicorn as the collector runs it: header, keep-alive and body deadlines and connection limits.

uvicorn bounds the keep-alive wait between requests, but not the wait for a request's
headers: a connection that sends half a request line stays open for ever. GuardedH11
closes a connection whose next request has not finished its headers within
`server.header_timeout` (the first request's from the moment the socket was accepted, TLS
handshake included; later ones from their first byte). `limit_concurrency` turns away
requests beyond `server.max_connections` with 503.

CollectorServer listens itself rather than through uvicorn's startup, for two things that
startup cannot do: the TLS handshake gets the header deadline (asyncio's default is 60 s,
and a socket that never sends a ClientHello is not yet a connection uvicorn counts), and
every accepted socket, in its handshake or not, is counted per source address. A source
at `server.max_connections_per_ip` open sockets has its next one closed at once, so one
client cannot take every slot from the probes and the health checks; on a TLS listener,
sockets still in their handshake also count towards `server.max_connections`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
from asyncio import sslproto
from collections.abc import Generator
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.h11_impl import H11Protocol

from collector.config import CollectorConfig

__all__ = ["Admission", "CollectorServer", "GuardedH11", "server_config"]

logger = logging.getLogger("uvicorn.error")


def _source(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


class Admission:
    """Open sockets, per source address and in all, from accept to close."""

    def __init__(self, max_connections: int, max_per_ip: int) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.per_ip: dict[str, int] = {}
        self.total = 0
        self.refused = 0  # sockets closed at accept (tests and logs read it)

    def admit(self, source: str, count_towards_total: bool) -> bool:
        """Take a place for a socket from `source` (False: close it). `count_towards_total`: refuse
        also when every place is taken (a TLS handshake, which cannot be answered with 503)."""
        n = self.per_ip.get(source, 0)
        if n >= self.max_per_ip or (count_towards_total and self.total >= self.max_connections):
            self.refused += 1
            return False
        self.per_ip[source] = n + 1
        self.total += 1
        return True

    def release(self, source: str) -> None:
        n = self.per_ip.get(source, 0) - 1
        if n > 0:
            self.per_ip[source] = n
        else:
            self.per_ip.pop(source, None)
        self.total -= 1


class GuardedH11(H11Protocol):
    header_timeout: float = 10.0
    max_connections: int = 1000
    max_connections_per_ip: int = 64

    def __init__(self, *args: Any, admission: Admission | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.admission = admission  # None: counted by the TLS layer below, or not at all
        self._source: str | None = None
        self._accepted = self.loop.time()  # made by the server at accept, before any handshake

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # The first request's headers are due `header_timeout` after accept, handshake included.
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_at(
            self._accepted + self.header_timeout, self._headers_late
        )
        if self.admission is not None:
            source = _source(transport)
            if self.admission.admit(source, count_towards_total=False):
                self._source = source
            else:
                transport.abort()

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
        if self.admission is not None and self._source is not None:
            self.admission.release(self._source)
            self._source = None
        super().connection_lost(exc)


class GuardedTLS(sslproto.SSLProtocol):
    """asyncio's own TLS layer, as `create_server(ssl=…)` would put in front of the HTTP
    protocol, but made here so that the socket is counted from accept and the handshake
    must finish within the header deadline."""

    def __init__(self, admission: Admission, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.admission = admission
        self._source: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        source = _source(transport)
        if not self.admission.admit(source, count_towards_total=True):
            assert isinstance(transport, asyncio.Transport)  # a socket's, as the server makes
            transport.abort()
            return
        self._source = source
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._source is None:
            return  # refused at accept: nothing was started
        self.admission.release(self._source)
        self._source = None
        super().connection_lost(exc)


def server_config(app: Any, config: CollectorConfig, **extra: Any) -> uvicorn.Config:
    """The uvicorn config for `app` under `config` (tests pass log_level and the like in `extra`)."""
    protocol = type(
        "Guarded",
        (GuardedH11,),
        {
            "header_timeout": config.header_timeout,
            "max_connections": config.max_connections,
            "max_connections_per_ip": config.max_connections_per_ip,
        },
    )
    options: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "http": protocol,
        "loop": "asyncio",  # GuardedTLS is asyncio's TLS layer
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
    """uvicorn's server, listening through GuardedH11 (and GuardedTLS), minus the re-raise of
    SIGTERM after a graceful stop, so that the process can close its database and exit 0
    (systemd then records a clean stop)."""

    admission: Admission | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        config = self.config
        protocol = config.http_protocol_class
        if sockets is not None or config.fd is not None or config.uds is not None:
            await super().startup(sockets)  # not how the collector runs: uvicorn's own way
            return
        if not (isinstance(protocol, type) and issubclass(protocol, GuardedH11)):
            await super().startup(sockets)
            return
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        loop = asyncio.get_running_loop()
        admission = Admission(protocol.max_connections, protocol.max_connections_per_ip)
        self.admission = admission
        tls = config.ssl

        def create_protocol() -> asyncio.BaseProtocol:
            http = protocol(
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=loop,
                admission=None if tls else admission,
            )
            if tls is None:
                return http
            return GuardedTLS(
                admission,
                loop,
                http,
                tls,
                None,
                server_side=True,
                ssl_handshake_timeout=protocol.header_timeout,
            )

        try:
            server = await loop.create_server(
                create_protocol, host=config.host, port=config.port, backlog=config.backlog
            )
        except OSError as exc:
            logger.error(exc)
            await self.lifespan.shutdown()
            sys.exit(STARTUP_FAILURE)
        self.servers = [server]
        self._log_started_message(list(server.sockets))
        self.started = True

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
