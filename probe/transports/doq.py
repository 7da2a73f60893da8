"""DNS over QUIC (RFC 9250): one QUIC connection per endpoint, one stream per query.

Streams opened in the same loop iteration leave in as few datagrams as possible:
transmission is deferred to the end of the iteration instead of once per query.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived, StreamReset

from probe.specs import Endpoint
from probe.transports._conn import RetryAlone, SharedConnection
from probe.transports._errors import expire, failure_from, timeout
from probe.transports.base import Exchange, Failure, Options
from probe.wire import question_of

__all__ = ["DoqExchanger"]


class _Broken(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.text)
        self.failure = failure


class _DoqProtocol(QuicConnectionProtocol):
    def __init__(self, quic: QuicConnection) -> None:
        super().__init__(quic)
        self.streams: dict[int, tuple[asyncio.Future[bytes], bytearray]] = {}
        self.dead: Failure | None = None
        self._tx: asyncio.Handle | None = None

    def transmit_soon(self) -> None:
        if self._tx is None:
            self._tx = asyncio.get_running_loop().call_soon(self._transmit)

    def _transmit(self) -> None:
        self._tx = None
        self.transmit()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            item = self.streams.get(event.stream_id)
            if item is None:
                return
            item[1].extend(event.data)
            if event.end_stream:
                del self.streams[event.stream_id]
                if not item[0].done():
                    item[0].set_result(bytes(item[1]))
        elif isinstance(event, StreamReset):
            item = self.streams.pop(event.stream_id, None)
            if item is not None and not item[0].done():
                item[0].set_exception(
                    _Broken(Failure("error", "dns_round_trip", f"quic: stream reset ({event.error_code})"))
                )
        elif isinstance(event, ConnectionTerminated):
            reason = event.reason_phrase or f"error code {event.error_code}"
            if 0x100 <= event.error_code <= 0x1FF and event.frame_type is not None:
                # RFC 9001 section 4.8: a transport CRYPTO_ERROR carries the TLS alert in the low
                # byte; an application close (no frame type) may reuse these numbers (H3_NO_ERROR).
                self._fail(Failure("error", "tls_handshake", f"tls: certificate verify failed: {reason}"))
            else:
                self._fail(Failure("error", "dns_round_trip", f"quic: connection closed: {reason}", True))

    def _fail(self, failure: Failure) -> None:
        self.dead = failure
        for fut, _ in self.streams.values():
            if not fut.done():
                fut.set_exception(_Broken(failure))
        self.streams.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.dead is None:
            self._fail(Failure("error", "dns_round_trip", "quic: connection lost", True))


class DoqExchanger(RetryAlone):
    """Queries as bidirectional streams on one verified QUIC connection (ALPN `doq`)."""

    alpn = "doq"
    protocol: type[_DoqProtocol] = _DoqProtocol

    def __init__(self, endpoint: Endpoint, options: Options) -> None:
        self.endpoint = endpoint
        self.options = options
        self._shared = SharedConnection(self._open, lambda p: p.dead is None, _abort_quic)

    async def _open(self) -> _DoqProtocol:
        loop = asyncio.get_running_loop()
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=[self.alpn],
            server_name=self.endpoint.host,  # checked against the certificate, IP SANs included
            verify_mode=ssl.CERT_REQUIRED,
            idle_timeout=30.0,
        )
        if self.options.ca_file:
            config.load_verify_locations(self.options.ca_file)
        infos = await loop.getaddrinfo(self.endpoint.connect_host, self.endpoint.port, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
        quic = QuicConnection(configuration=config)
        transport, proto = await loop.create_datagram_endpoint(lambda: self.protocol(quic), local_addr=local)
        try:
            proto.connect(addr)
            await asyncio.wait_for(proto.wait_connected(), self.options.timeout)
        except ConnectionError:
            transport.close()
            # aioquic says only "ConnectionError"; the reason came with ConnectionTerminated.
            raise _Broken(
                proto.dead or Failure("error", "quic_handshake", "quic: handshake failed")
            ) from None
        except BaseException:
            transport.close()
            raise
        return proto

    @property
    def handshakes(self) -> int:
        return self._shared.handshakes

    async def _once(self, query: bytes, evidence: dict[str, Any], shared: bool) -> Exchange:
        try:
            proto = await (self._shared.get(evidence) if shared else self._shared.private(evidence))
        except _Broken as exc:
            return Exchange(None, exc.failure, evidence=evidence)
        except Exception as exc:  # translated at the edge, once
            return Exchange(None, failure_from(exc, "quic_handshake"), evidence=evidence)
        try:
            return await self._send(proto, query, evidence)
        finally:
            if not shared:
                proto.close()
                self._shared.discard(proto)

    async def _send(self, proto: _DoqProtocol, query: bytes, evidence: dict[str, Any]) -> Exchange:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        quic = proto._quic
        sid = quic.get_next_available_stream_id()
        proto.streams[sid] = (fut, bytearray())
        # RFC 9250 section 4.2.1: the message ID MUST be 0 on DoQ; our queries already are.
        quic.send_stream_data(sid, struct.pack("!H", len(query)) + query, end_stream=True)
        proto.transmit_soon()
        sent = time.perf_counter()
        timer = loop.call_later(self.options.timeout, expire, fut)
        try:
            data = await fut
        except _Broken as exc:
            return Exchange(None, exc.failure, evidence=evidence)
        except TimeoutError:
            proto.streams.pop(sid, None)
            return Exchange(None, timeout(), evidence=evidence)
        finally:
            timer.cancel()
        latency = (time.perf_counter() - sent) * 1000
        if len(data) < 2 or struct.unpack("!H", data[:2])[0] != len(data) - 2:
            return Exchange(
                None,
                Failure("error", "dns_round_trip", "malformed response: bad DoQ framing"),
                latency,
                evidence,
            )
        msg = data[2:]
        q = question_of(query)
        if len(msg) < 12 or msg[12 : 12 + len(q)].lower() != q.lower():
            return Exchange(
                None, Failure("error", "dns_round_trip", "mismatched response"), latency, evidence
            )
        return Exchange(msg, None, latency, evidence)

    async def aclose(self) -> None:
        proto = self._shared.take()
        if proto is not None:
            proto.close()  # CONNECTION_CLOSE to the server, then the socket goes
            _abort_quic(proto)


def _abort_quic(proto: _DoqProtocol) -> None:
    if proto._transport is not None:
        proto._transport.close()
