"""DNS over a byte stream (RFC 7766): one pipelined connection, replies matched by ID.

Plain TCP lives here; DoT (dot.py) is the same stream wrapped in TLS, negotiated after
the TCP connection so that a stalled handshake is reported as `tls_handshake`, not
`connect`. Queries are written back to back without waiting; replies may arrive in any
order and must be the response to a query on the connection (ID and question), or the
connection is no longer trusted. A connection that breaks under a query is retried
once on a connection of its own (`RetryAlone`).
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from functools import partial
from typing import Any

from probe.specs import Endpoint
from probe.transports._conn import Opening, RetryAlone, SharedConnection
from probe.transports._errors import Broken, error, failure_from, timeout
from probe.transports._wait import Channel, Dues, Flights, Timer, witness_step
from probe.transports.base import Exchange, Options, Phase
from probe.wire import question_of, random_id, reply_problem, set_id

__all__ = ["StreamExchanger", "TcpExchanger", "close_transport"]

_RT = Phase.DNS_ROUND_TRIP


class _Pending:
    __slots__ = ("expired", "future", "qid", "question", "stamp")

    def __init__(self, future: asyncio.Future[bytes], qid: int, question: bytes, stamp: int) -> None:
        self.future = future
        self.qid = qid
        self.question = question
        self.stamp = stamp
        self.expired = False  # timed out; `future` now waits for a late response


class _StreamConn(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending: dict[int, _Pending] = {}
        self.dead: Broken | None = None
        self.lost = asyncio.get_running_loop().create_future()
        self.channel = Channel(name)

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
            item = self.pending.get(int.from_bytes(msg[:2], "big")) if len(msg) >= 2 else None
            if item is None or item.future.done():
                continue  # a reply to a query that gave up, or to nobody: not ours to judge
            problem = reply_problem(msg, item.qid, item.question)
            if problem is not None:
                if item.expired:
                    item.future.cancel()
                else:
                    # On a stream there is no one else it could be for: the transport failed.
                    item.future.set_exception(Broken(error(_RT, f"not the response: {problem}")))
                continue
            self.channel.answer(item.stamp)
            item.future.set_result(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.dead = Broken(failure_from(exc or EOFError(), _RT))
        for item in self.pending.values():
            if not item.future.done():
                if item.expired:
                    item.future.cancel()
                else:
                    item.future.set_exception(self.dead)


class StreamExchanger(RetryAlone):
    """Queries over one pipelined TCP (or TLS) connection to one endpoint."""

    tls: bool = False

    def __init__(self, endpoint: Endpoint, options: Options) -> None:
        self.endpoint = endpoint
        self.options = options
        self.witness: bytes | None = None
        self.witness_after = 0.25
        self._shared = SharedConnection(self._open, lambda c: c.dead is None, _abort_conn)
        self._conns = 0
        self._witnesses = Flights()
        self._dues = Dues()  # every query's witness step, in the order they fall due

    def _ssl(self) -> ssl.SSLContext | None:
        return None

    async def _open(self, deadline: float, state: Opening) -> _StreamConn:
        loop = asyncio.get_running_loop()
        self._conns += 1
        name = f"{self.endpoint}#{self._conns}"
        async with asyncio.timeout_at(deadline):
            state.phase = Phase.CONNECT
            transport, conn = await loop.create_connection(
                lambda: _StreamConn(name), self.endpoint.connect_host, self.endpoint.port
            )
            ctx = self._ssl()
            if ctx is not None:
                state.phase = Phase.TLS_HANDSHAKE
                try:
                    tls = await loop.start_tls(transport, conn, ctx, server_hostname=self.endpoint.host)
                except BaseException:
                    transport.abort()
                    raise
                assert tls is not None
                conn.transport = tls
        return conn

    @property
    def handshakes(self) -> int:
        return self._shared.handshakes

    async def _once(self, query: bytes, deadline: float, evidence: dict[str, Any], shared: bool) -> Exchange:
        try:
            if shared:
                conn = self._shared.live() or await self._shared.get(deadline, evidence)
            else:
                conn = await self._shared.private(deadline, evidence)
        except Broken as exc:
            return Exchange(None, exc.failure, evidence=evidence, sends=0)
        try:
            pending = self._submit(conn, query)
            return await self._collect(conn, pending, deadline, evidence, witness=True)
        finally:
            if not shared:
                self._shared.discard(conn)

    def _submit(self, conn: _StreamConn, query: bytes) -> _Pending:
        """Write the query now (no await between numbering and writing, so the order is true)."""
        if len(conn.pending) > _MAX_PENDING:
            _forget_expired(conn)
        qid = random_id()
        while qid in conn.pending:
            qid = random_id()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        item = _Pending(fut, qid, question_of(query), conn.channel.stamp())
        conn.pending[qid] = item
        if conn.dead is not None:
            fut.set_exception(conn.dead)
        else:
            assert conn.transport is not None
            conn.transport.write(struct.pack("!H", len(query)) + set_id(query, qid))
        return item

    async def _collect(
        self, conn: _StreamConn, item: _Pending, deadline: float, evidence: dict[str, Any], witness: bool
    ) -> Exchange:
        loop = asyncio.get_running_loop()
        sent = time.perf_counter()
        timer = Timer(  # await_reply, one coroutine layer less
            item.future,
            deadline,
            witness_step(
                deadline, self.witness_after, partial(self._send_witness, conn, item.stamp, deadline)
            )
            if witness
            else (),
            self._dues,
        )
        try:
            data = await item.future
        except Broken as exc:
            conn.pending.pop(item.qid, None)
            return Exchange(None, exc.failure, evidence=evidence, channel=conn.channel.name)
        except TimeoutError:
            # Keep the ID on the connection: a response after the deadline is evidence too.
            item.expired = True
            item.future = loop.create_future()
            return Exchange(
                None,
                timeout(),
                evidence=evidence,
                channel=conn.channel.name,
                overtaken=conn.channel.overtook(item.stamp),
                late=item.future,
            )
        finally:
            timer.cancel()
        conn.pending.pop(item.qid, None)
        return Exchange(data, None, (time.perf_counter() - sent) * 1000, evidence, channel=conn.channel.name)

    def _send_witness(self, conn: _StreamConn, stamp: int, deadline: float) -> None:
        if self.witness is None or conn.dead is not None or not conn.channel.needs_witness(stamp):
            return
        item = self._submit(conn, self.witness)
        conn.channel.witnessed = item.stamp
        self._witnesses.start(self._collect(conn, item, deadline, {}, witness=False))

    async def aclose(self) -> None:
        self._witnesses.cancel()
        conn = self._shared.take()
        if conn is not None and conn.transport is not None:
            await close_transport(conn.transport, conn.lost)


class TcpExchanger(StreamExchanger):
    """Plain DNS over TCP."""


_MAX_PENDING = 16384  # IDs held on one connection; past it, late listening gives way to new queries


def _forget_expired(conn: _StreamConn) -> None:
    for qid, item in list(conn.pending.items()):
        if item.expired:
            item.future.cancel()
            del conn.pending[qid]


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
