"""DNS over QUIC (RFC 9250): one QUIC connection per endpoint, one stream per query.

Streams opened in the same loop iteration leave in as few datagrams as possible:
transmission is deferred to the end of the iteration instead of once per query.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from functools import partial
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived, StreamReset

from probe.limits import MAX_DOH_BODY
from probe.specs import Endpoint
from probe.transports._conn import Opening, RetryAlone, SharedConnection
from probe.transports._errors import Broken, error, timeout
from probe.transports._wait import Channel, Flights, await_reply, witness_step
from probe.transports.base import Exchange, Failure, Options, Phase
from probe.wire import question_of, reply_problem

__all__ = ["DoqExchanger"]

_RT = Phase.DNS_ROUND_TRIP
_DOQ_INTERNAL_ERROR = 0x1  # RFC 9250 section 4.3: DOQ_INTERNAL_ERROR, to give up a stream
# Timed-out streams kept open for a late response, per connection. The peer grants a limited
# number of concurrent streams (aioquic: 128); past this many, the oldest is given up (STOP_SENDING,
# which obliges the peer to reset it and hand the credit back), so dropped names cannot use up
# the connection's streams.
_MAX_LATE_STREAMS = 32


class _Query:
    __slots__ = ("data", "expired", "future", "question", "stamp")

    def __init__(self, future: asyncio.Future[bytes], question: bytes, stamp: int) -> None:
        self.future = future
        self.question = question
        self.stamp = stamp
        self.data = bytearray()
        self.expired = False  # timed out; `future` now waits for a late response

    def started(self) -> bool:
        """Whether any of the response has arrived (then a timeout is no silence)."""
        return bool(self.data)

    def fail(self, failure: Failure) -> None:
        if self.future.done():
            return
        if self.expired:
            self.future.cancel()  # nobody awaits a late response: no error to report
        else:
            self.future.set_exception(Broken(failure))


class _DoqProtocol(QuicConnectionProtocol):
    def __init__(self, quic: QuicConnection, name: str = "") -> None:
        super().__init__(quic)
        self.streams: dict[int, _Query] = {}
        self.dead: Broken | None = None
        self.channel = Channel(name)
        self._tx: asyncio.Handle | None = None

    def transmit_soon(self) -> None:
        if self._tx is None:
            self._tx = asyncio.get_running_loop().call_soon(self._transmit)

    def _transmit(self) -> None:
        self._tx = None
        self.transmit()

    def end_stream(self, sid: int, failure: Failure) -> None:
        """Give up one stream: fail its query and tell the server to stop."""
        q = self.streams.pop(sid, None)
        if q is not None:
            q.fail(failure)
        with contextlib.suppress(Exception):  # the stream may already be closed on the server's side
            self._quic.reset_stream(sid, _DOQ_INTERNAL_ERROR)
            self._quic.stop_stream(sid, _DOQ_INTERNAL_ERROR)
        self.transmit_soon()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            q = self.streams.get(event.stream_id)
            if q is None:
                return
            q.data.extend(event.data)
            if len(q.data) > MAX_DOH_BODY + 2:
                self.end_stream(event.stream_id, error(_RT, f"quic: response over {MAX_DOH_BODY} bytes"))
            elif event.end_stream:
                del self.streams[event.stream_id]
                self._complete(q)
        elif isinstance(event, StreamReset):
            q = self.streams.pop(event.stream_id, None)
            if q is not None:
                q.fail(error(_RT, f"quic: stream reset ({event.error_code})"))
        elif isinstance(event, ConnectionTerminated):
            reason = event.reason_phrase or f"error code {event.error_code}"
            if 0x100 <= event.error_code <= 0x1FF and event.frame_type is not None:
                # RFC 9001 section 4.8: a transport CRYPTO_ERROR carries the TLS alert in the low
                # byte; an application close (no frame type) may reuse these numbers (H3_NO_ERROR).
                self._fail(error(Phase.TLS_HANDSHAKE, f"tls: certificate verify failed: {reason}"))
            else:
                self._fail(error(_RT, f"quic: connection closed: {reason}", True))

    def reclaim(self) -> None:
        """Give up the oldest timed-out streams beyond `_MAX_LATE_STREAMS`."""
        late = [sid for sid, q in self.streams.items() if q.expired]
        for sid in late[: max(0, len(late) - _MAX_LATE_STREAMS)]:
            self.end_stream(sid, error(_RT, "quic: stream given up"))

    def _complete(self, q: _Query) -> None:
        if q.future.done():
            return
        data = bytes(q.data)
        if len(data) < 2 or struct.unpack("!H", data[:2])[0] != len(data) - 2:
            q.fail(error(_RT, "malformed response: bad DoQ framing"))
            return
        # RFC 9250 section 4.2.1: the message ID is 0 on DoQ, in both directions.
        problem = reply_problem(data[2:], 0, q.question)
        if problem is not None:
            q.fail(error(_RT, f"not the response: {problem}"))
            return
        self.channel.answer(q.stamp)
        q.future.set_result(data[2:])

    def _fail(self, failure: Failure) -> None:
        self.dead = Broken(failure)
        for q in self.streams.values():
            q.fail(failure)
        self.streams.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.dead is None:
            self._fail(error(_RT, "quic: connection lost", True))


class DoqExchanger(RetryAlone):
    """Queries as bidirectional streams on one verified QUIC connection (ALPN `doq`)."""

    alpn = "doq"
    protocol: type[_DoqProtocol] = _DoqProtocol

    def __init__(self, endpoint: Endpoint, options: Options) -> None:
        self.endpoint = endpoint
        self.options = options
        self.witness: bytes | None = None
        self.witness_after = 0.25
        self._shared = SharedConnection(self._open, lambda p: p.dead is None, _abort_quic)
        self._conns = 0
        self._witnesses = Flights()

    async def _open(self, deadline: float, state: Opening) -> _DoqProtocol:
        loop = asyncio.get_running_loop()
        self._conns += 1
        name = f"{self.endpoint}#{self._conns}"
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=[self.alpn],
            server_name=self.endpoint.host,  # checked against the certificate, IP SANs included
            verify_mode=ssl.CERT_REQUIRED,
            idle_timeout=30.0,
        )
        if self.options.ca_file:
            config.load_verify_locations(self.options.ca_file)
        state.phase = Phase.CONNECT
        infos = await loop.getaddrinfo(self.endpoint.connect_host, self.endpoint.port, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
        quic = QuicConnection(configuration=config)
        _, proto = await loop.create_datagram_endpoint(lambda: self.protocol(quic, name), local_addr=local)
        state.phase = Phase.QUIC_HANDSHAKE
        try:
            proto.connect(addr)
            async with asyncio.timeout_at(deadline):
                await proto.wait_connected()
        except ConnectionError:
            _abort_quic(proto)
            # aioquic says only "ConnectionError"; the reason came with ConnectionTerminated.
            raise proto.dead or Broken(error(Phase.QUIC_HANDSHAKE, "quic: handshake failed")) from None
        except BaseException:
            _abort_quic(proto)
            raise
        return proto

    @property
    def handshakes(self) -> int:
        return self._shared.handshakes

    async def _once(self, query: bytes, deadline: float, evidence: dict[str, Any], shared: bool) -> Exchange:
        try:
            if shared:
                proto = self._shared.live() or await self._shared.get(deadline, evidence)
            else:
                proto = await self._shared.private(deadline, evidence)
        except Broken as exc:
            return Exchange(None, exc.failure, evidence=evidence, sends=0)
        try:
            return await self._collect(proto, query, deadline, evidence, witness=True)
        finally:
            if not shared:
                proto.close()
                self._shared.discard(proto)

    def _submit(self, proto: _DoqProtocol, query: bytes) -> int:
        """Open the stream and write the query; returns the stream id."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        proto.reclaim()
        quic = proto._quic
        sid = quic.get_next_available_stream_id()
        proto.streams[sid] = _Query(fut, question_of(query), proto.channel.stamp())
        # RFC 9250 section 4.2.1: the message ID MUST be 0 on DoQ; our queries already are.
        quic.send_stream_data(sid, struct.pack("!H", len(query)) + query, end_stream=True)
        proto.transmit_soon()
        return sid

    async def _collect(
        self, proto: _DoqProtocol, query: bytes, deadline: float, evidence: dict[str, Any], witness: bool
    ) -> Exchange:
        if proto.dead is not None:
            return Exchange(None, proto.dead.failure, evidence=evidence, sends=0)
        sid = self._submit(proto, query)
        q = proto.streams[sid]
        sent = time.perf_counter()
        try:
            msg = await await_reply(
                q.future,
                deadline,
                witness_step(
                    deadline, self.witness_after, partial(self._send_witness, proto, q.stamp, deadline)
                )
                if witness
                else (),
            )
        except Broken as exc:
            return Exchange(None, exc.failure, evidence=evidence, channel=proto.channel.name)
        except TimeoutError:
            proto.end_stream(sid, timeout())
            if q.started():
                # The server was answering, only too slowly: no silence, so never a block.
                return Exchange(
                    None, timeout(Phase.DNS_RESPONSE), evidence=evidence, channel=proto.channel.name
                )
            overtaken = proto.channel.overtook(q.stamp)
            return Exchange(
                None, timeout(), evidence=evidence, channel=proto.channel.name, overtaken=overtaken
            )
        latency = (time.perf_counter() - sent) * 1000
        result = self._result(q, query, msg, latency, evidence)
        result.channel = proto.channel.name
        return result

    # A hook: Doh3Exchanger overrides it and reads the stream and the query; plain DoQ needs neither.
    def _result(
        self, _q: _Query, _query: bytes, msg: bytes, latency: float, evidence: dict[str, Any]
    ) -> Exchange:
        return Exchange(msg, None, latency, evidence)

    def _send_witness(self, proto: _DoqProtocol, stamp: int, deadline: float) -> None:
        if self.witness is None or proto.dead is not None or not proto.channel.needs_witness(stamp):
            return
        proto.channel.witnessed = proto.channel.sent + 1
        self._witnesses.start(self._collect(proto, self.witness, deadline, {}, witness=False))

    async def aclose(self) -> None:
        self._witnesses.cancel()
        proto = self._shared.take()
        if proto is not None:
            proto.close()  # CONNECTION_CLOSE to the server, then the socket goes
            _abort_quic(proto)


def _abort_quic(proto: _DoqProtocol) -> None:
    # aioquic re-arms a timer that transmits on the socket; once the socket is gone that timer
    # must not fire (it raises inside the event loop's callback).
    for handle in (getattr(proto, "_timer", None), proto._tx):
        if handle is not None:
            handle.cancel()
    proto._tx = None
    if proto._transport is not None:
        proto._transport.close()
