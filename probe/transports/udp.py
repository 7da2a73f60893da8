"""Plain DNS over UDP: random ID and source port, strict matching, racing answers kept.

A few connected sockets per endpoint carry many queries at once, demultiplexed by
ID; each socket is retired after a bounded number of queries so that source ports
keep changing. After the first answer to a query the socket keeps listening for
`udp_linger` seconds: an on-path injector races the real resolver, and both
answers arriving is the evidence.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from typing import Any

from probe.specs import Endpoint
from probe.transports._errors import expire, failure_from, timeout
from probe.transports.base import Exchange, Options
from probe.transports.tcp import TcpExchanger
from probe.wire import question_of, random_id, set_id

__all__ = ["UdpExchanger"]

_TC = 0x02  # the TC bit in the third header byte


class _Pending:
    __slots__ = ("answered", "future", "late", "notes", "question", "sent", "settled", "timer")

    def __init__(self, future: asyncio.Future[bytes], question: bytes, sent: float) -> None:
        self.future = future
        self.question = question
        self.sent = sent
        self.answered: bytes | None = None
        self.late: list[bytes] = []
        self.notes: list[str] = []
        self.settled: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None


class _Socket:
    """A connected, non-blocking UDP socket read straight from the selector.

    asyncio's datagram transport reads one datagram per wake-up; under load that is
    an event-loop iteration per answer. Draining the socket on each wake-up, as
    dnsperf does, costs a fraction of that. The kernel drops datagrams from any
    source but the resolver's address and port, since the socket is connected.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending: dict[int, _Pending] = {}
        self.used = 0
        self.closed_exc: Exception | None = None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        recv = self.sock.recv
        for _ in range(512):  # bounded, so one busy socket cannot starve the loop
            try:
                data = recv(65535)
            except BlockingIOError:
                return
            except OSError as exc:
                # ICMP port unreachable surfaces here on a connected socket.
                self.error_received(exc)
                return
            self.datagram_received(data, None)

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def close(self) -> None:
        if self.closed_exc is None:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.connection_lost(None)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 12:
            return
        entry = self.pending.get(int.from_bytes(data[:2], "big"))
        if entry is None:
            return  # stray, or after the linger window: nothing to attach it to
        if entry.answered is not None:
            if data != entry.answered:
                entry.late.append(data)
            return
        q = entry.question
        if data[12 : 12 + len(q)].lower() != q.lower():
            # A response for another question under our ID is what a blind spoofer
            # sends; a stub would drop it and keep waiting, and so do we.
            entry.notes.append("ignored a response whose question does not match")
            return
        if not entry.future.done():
            entry.future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable arrives here on a connected socket.
        for entry in self.pending.values():
            if entry.answered is None and not entry.future.done():
                entry.future.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed_exc = exc or ConnectionAbortedError("socket closed")
        for entry in self.pending.values():
            if entry.answered is None and not entry.future.done():
                entry.future.set_exception(self.closed_exc)


class UdpExchanger:
    """Queries over UDP to one endpoint; falls back to TCP when an answer is truncated."""

    def __init__(self, endpoint: Endpoint, options: Options) -> None:
        self.endpoint = endpoint
        self.options = options
        self._sockets: list[_Socket] = []
        self._retired: list[_Socket] = []
        self._next = 0
        self._opening: asyncio.Lock | None = None
        self._tcp: TcpExchanger | None = None
        self._closed = False

    def _ready_socket(self) -> _Socket | None:
        self._next = (self._next + 1) % self.options.udp_sockets
        i = self._next
        if i < len(self._sockets):
            sock = self._sockets[i]
            if sock.closed_exc is None and sock.used < self.options.udp_queries_per_socket:
                return sock
        return None

    async def _socket(self) -> _Socket:
        if self._opening is None:
            self._opening = asyncio.Lock()
        i = self._next
        async with self._opening:
            loop = asyncio.get_running_loop()
            family, addr = await _address(loop, self.endpoint.connect_host, self.endpoint.port)
            raw = socket.socket(family, socket.SOCK_DGRAM)
            try:
                raw.setblocking(False)
                raw.connect(addr)  # an ephemeral source port chosen at random by the kernel
            except OSError:
                raw.close()
                raise
            proto = _Socket(raw)
            if i < len(self._sockets):
                self._retire(self._sockets[i])
                self._sockets[i] = proto
            else:
                self._sockets.append(proto)
            return proto

    def _retire(self, sock: _Socket) -> None:
        # In-flight queries and linger windows end within timeout + linger.
        self._retired.append(sock)
        loop = asyncio.get_running_loop()
        delay = self.options.timeout + self.options.udp_linger + 0.1
        loop.call_later(delay, self._close_retired, sock)

    def _close_retired(self, sock: _Socket) -> None:
        if sock in self._retired:
            self._retired.remove(sock)
        sock.close()

    async def exchange(self, query: bytes) -> Exchange:
        try:
            sock = self._ready_socket() or await self._socket()
        except Exception as exc:
            return Exchange(None, failure_from(exc, "connect"))
        sock.used += 1
        loop = asyncio.get_running_loop()
        qid = random_id()
        while qid in sock.pending:
            qid = random_id()
        question = question_of(query)
        entry = _Pending(loop.create_future(), question, time.perf_counter())
        sock.pending[qid] = entry
        fut = entry.future
        timer = loop.call_later(self.options.timeout, expire, fut)
        try:
            sock.send(set_id(query, qid))
            data = await fut
        except Exception as exc:
            del sock.pending[qid]
            failure = timeout() if isinstance(exc, TimeoutError) else failure_from(exc, "dns_round_trip")
            ev: dict[str, Any] = {"notes": entry.notes} if entry.notes else {}
            return Exchange(None, failure, evidence=ev)
        finally:
            timer.cancel()
        latency = (time.perf_counter() - entry.sent) * 1000
        evidence: dict[str, Any] = {}
        if entry.notes:
            evidence["notes"] = entry.notes
        if data[2] & _TC:
            del sock.pending[qid]
            return await self._fallback(query, latency, evidence)
        entry.answered = data
        result = Exchange(data, None, latency, evidence)
        if self.options.udp_linger > 0:
            settled: asyncio.Future[None] = loop.create_future()
            result.settled = settled

            def close_window() -> None:
                sock.pending.pop(qid, None)
                if entry.late:
                    evidence["late"] = entry.late
                settled.set_result(None)

            loop.call_later(self.options.udp_linger, close_window)
        else:
            del sock.pending[qid]
        return result

    async def _fallback(self, query: bytes, udp_ms: float, evidence: dict[str, Any]) -> Exchange:
        """RFC 7766: a truncated UDP answer is retried over TCP, and the measurement says so."""
        if self._tcp is None:
            self._tcp = TcpExchanger(self.endpoint, self.options)
        result = await self._tcp.exchange(query)
        result.evidence.update(evidence)
        result.evidence["tc_fallback"] = True
        result.evidence["udp_truncated_ms"] = round(udp_ms, 3)
        return result

    async def aclose(self) -> None:
        self._closed = True
        for sock in self._sockets + self._retired:
            sock.close()
        self._sockets.clear()
        self._retired.clear()
        if self._tcp is not None:
            await self._tcp.aclose()


async def _address(loop: asyncio.AbstractEventLoop, host: str, port: int) -> tuple[int, Any]:
    """Where to send: IP literals directly (no resolver thread on the hot path), names via getaddrinfo."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        return infos[0][0], infos[0][4]
    if ip.version == 6:
        return socket.AF_INET6, (host, port, 0, 0)
    return socket.AF_INET, (host, port)
