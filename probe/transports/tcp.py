"""DNS over a byte stream (RFC 7766): one pipelined connection, replies matched by ID.

Plain TCP lives here; DoT (dot.py) is the same stream wrapped in TLS. Queries are
written back to back without waiting; replies may arrive in any order and are
matched by ID and question. A connection that breaks is re-opened once, and the
queries that were on it are retried on the new one.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from typing import Any

from probe.specs import Endpoint
from probe.transports._conn import RetryAlone, SharedConnection
from probe.transports._errors import expire, failure_from, timeout
from probe.transports.base import Exchange, Failure, Options
from probe.wire import question_of, random_id, set_id

__all__ = ["StreamExchanger", "TcpExchanger", "close_transport"]


class _Broken(Exception):
    """The connection ended under a query that had been sent on it."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.text)
        self.failure = failure


class _StreamConn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending: dict[int, tuple[asyncio.Future[bytes], bytes]] = {}
        self.dead: Failure | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 2:
            size = (buf[0] << 8) | buf[1]
            if len(buf) < size + 2:
                break
            msg = bytes(buf[2 : size + 2])
            del buf[: size + 2]
            if len(msg) < 12:
                continue
            item = self.pending.get(int.from_bytes(msg[:2], "big"))
            if item is None or item[0].done():
                continue
            fut, question = item
            if msg[12 : 12 + len(question)].lower() != question.lower():
                fut.set_exception(_Broken(Failure("error", "dns_round_trip", "mismatched response")))
            else:
                fut.set_result(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.dead = failure_from(exc or EOFError(), "dns_round_trip")
        for fut, _ in self.pending.values():
            if not fut.done():
                fut.set_exception(_Broken(self.dead))


class StreamExchanger(RetryAlone):
    """Queries over one pipelined TCP (or TLS) connection to one endpoint."""

    tls: bool = False
    connect_phase = "connect"

    def __init__(self, endpoint: Endpoint, options: Options) -> None:
        self.endpoint = endpoint
        self.options = options
        self._shared = SharedConnection(self._open, lambda c: c.dead is None, _abort_conn)

    def _ssl(self) -> ssl.SSLContext | None:
        return None

    async def _open(self) -> _StreamConn:
        loop = asyncio.get_running_loop()
        ctx = self._ssl()
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                _StreamConn,
                self.endpoint.connect_host,
                self.endpoint.port,
                ssl=ctx,
                server_hostname=self.endpoint.host if ctx else None,
            ),
            self.options.timeout,
        )
        return conn

    @property
    def handshakes(self) -> int:
        return self._shared.handshakes

    async def _once(self, query: bytes, evidence: dict[str, Any], shared: bool) -> Exchange:
        try:
            conn = await (self._shared.get(evidence) if shared else self._shared.private(evidence))
        except Exception as exc:  # translated at the edge, once
            phase = "tls_handshake" if self.tls and not isinstance(exc, OSError) else self.connect_phase
            return Exchange(None, failure_from(exc, phase), evidence=evidence)
        try:
            return await self._send(conn, query, evidence)
        finally:
            if not shared:
                self._shared.discard(conn)

    async def _send(self, conn: _StreamConn, query: bytes, evidence: dict[str, Any]) -> Exchange:
        loop = asyncio.get_running_loop()
        qid = random_id()
        while qid in conn.pending:
            qid = random_id()
        fut: asyncio.Future[bytes] = loop.create_future()
        conn.pending[qid] = (fut, question_of(query))
        timer = loop.call_later(self.options.timeout, expire, fut)
        sent = time.perf_counter()
        try:
            assert conn.transport is not None
            conn.transport.write(struct.pack("!H", len(query)) + set_id(query, qid))
            data = await fut
        except _Broken as exc:
            return Exchange(None, exc.failure, evidence=evidence)
        except TimeoutError:
            return Exchange(None, timeout(), evidence=evidence)
        except Exception as exc:
            return Exchange(None, failure_from(exc, "dns_round_trip"), evidence=evidence)
        finally:
            timer.cancel()
            conn.pending.pop(qid, None)
        return Exchange(data, None, (time.perf_counter() - sent) * 1000, evidence)

    async def aclose(self) -> None:
        conn = self._shared.take()
        if conn is not None and conn.transport is not None:
            await close_transport(conn.transport, conn.lost)


class TcpExchanger(StreamExchanger):
    """Plain DNS over TCP."""


def _abort_conn(conn: _StreamConn) -> None:
    if conn.transport is not None:
        conn.transport.abort()


async def close_transport(transport: asyncio.BaseTransport, lost: asyncio.Future[None]) -> None:
    """Close politely (TLS close_notify), but never let a silent peer keep the socket open."""
    transport.close()
    try:
        await asyncio.wait_for(asyncio.shield(lost), 0.5)
    except TimeoutError:
        abort = getattr(transport, "abort", None)
        if abort is not None:
            abort()
