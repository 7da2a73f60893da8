"""Plain DNS over UDP: random ID and source port, retransmission, strict matching, racing answers kept.

A few connected sockets per endpoint carry many queries at once, demultiplexed by
ID; each socket is retired after a bounded number of queries so that source ports
keep changing. A query is sent up to `udp_sends` times within its timeout (at 0, 1/3
and 2/3 of it by default), since one lost datagram must not read as a block; the
first datagram that is its response wins. Anything else that arrives under its ID
(another question, QR=0, a wrong opcode) is ignored, kept as evidence, and the wait
goes on, as a stub resolver would. After the response the socket keeps listening for
`udp_linger` seconds: an on-path injector races the real resolver, and both answers
arriving is the evidence.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from probe.specs import Endpoint
from probe.transports._errors import failure_from, timeout
from probe.transports._wait import Channel, Dues, Timer
from probe.transports.base import Exchange, Loss, Options, Phase
from probe.transports.tcp import TcpExchanger
from probe.wire import question_of, random_id, reply_problem, set_id

__all__ = ["UdpExchanger"]

_TC = 0x02  # the TC bit in the third header byte
_KEEP_IGNORED = 4  # datagrams that were not the response, kept per query as evidence


class _Pending:
    """One query in flight on a socket. Its sends are methods, not closures made per query."""

    __slots__ = (
        "answered",
        "channel",
        "deadline",
        "expired",
        "first",
        "future",
        "ignored",
        "last",
        "late",
        "owner",
        "qid",
        "question",
        "sends",
        "sent",
        "sock",
        "wire",
    )

    def __init__(
        self,
        future: asyncio.Future[bytes],
        qid: int,
        question: bytes,
        sock: _Socket,
        wire: bytes,
        owner: UdpExchanger,
        deadline: float,
    ) -> None:
        self.future = future
        self.qid = qid
        self.question = question
        self.sock = sock
        self.wire = wire
        self.owner = owner
        self.channel = owner.channel
        self.deadline = deadline
        self.sends = 0
        self.first = 0  # channel numbers of the first and the last send
        self.last = 0
        self.sent = 0.0
        self.answered: bytes | None = None
        self.expired = False  # timed out; `future` now waits for a late response
        self.late: list[bytes] = []
        self.ignored: list[tuple[str, bytes]] = []

    def send(self) -> None:
        if self.future.done():
            return
        self.last = self.channel.stamp()
        if not self.sends:
            self.first = self.last
        self.sends += 1
        self.sent = time.perf_counter()
        try:
            self.sock.send(self.wire)
        except OSError as exc:
            self.future.set_exception(exc)

    def witness(self) -> None:
        self.owner._witness(self.last, self.deadline)


class _Socket:
    """A connected, non-blocking UDP socket read straight from the selector.

    asyncio's datagram transport reads one datagram per wake-up; under load that is
    an event-loop iteration per answer. Draining the socket on each wake-up, as
    dnsperf does, costs a fraction of that. The kernel drops datagrams from any
    source but the resolver's address and port, since the socket is connected.
    """

    def __init__(self, sock: socket.socket, channel: Channel) -> None:
        self.sock = sock
        self.channel = channel
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
                self._fail(exc)
                return
            self.datagram_received(data)

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def close(self) -> None:
        if self.closed_exc is None:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.closed_exc = ConnectionAbortedError("socket closed")
            self._fail(self.closed_exc)

    def datagram_received(self, data: bytes) -> None:
        if len(data) < 2:
            return
        entry = self.pending.get(int.from_bytes(data[:2], "big"))
        if entry is None:
            return  # stray, or after the linger window: nothing to attach it to
        if entry.answered is not None:
            if data != entry.answered:
                entry.late.append(data)
            return
        problem = reply_problem(data, entry.qid, entry.question)
        if problem is not None:
            # What a blind spoofer or a confused middlebox sends: a stub drops it and
            # keeps waiting, and so do we, keeping it as evidence.
            if len(entry.ignored) < _KEEP_IGNORED:
                entry.ignored.append((problem, data))
            return
        if not entry.future.done():
            self.channel.answer(entry.first)
            entry.future.set_result(data)

    def _fail(self, exc: Exception) -> None:
        for entry in self.pending.values():
            if entry.answered is None and not entry.future.done():
                if entry.expired:
                    entry.future.cancel()  # nobody awaits a late response: no error to report
                else:
                    entry.future.set_exception(exc)


class UdpExchanger:
    """Queries over UDP to one endpoint; falls back to TCP when an answer is truncated."""

    def __init__(self, endpoint: Endpoint, options: Options) -> None:
        self.endpoint = endpoint
        self.options = options
        self.witness: bytes | None = None
        self.witness_after = 0.25  # UDP: after the last retransmission, a quarter of its interval
        self.channel = Channel(str(endpoint))
        self.loss = Loss()  # the engine may share one across the exchangers of an endpoint
        self._dues = Dues()  # every query's first retransmission, in the order they fall due
        self._sockets: list[_Socket] = []
        self._retired: list[_Socket] = []
        self._next = 0
        self._opening: asyncio.Lock | None = None
        self._tcp: TcpExchanger | None = None
        self._witnesses: set[asyncio.Future[Exchange]] = set()

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
            proto = _Socket(raw, self.channel)
            if i < len(self._sockets):
                self._retire(self._sockets[i])
                self._sockets[i] = proto
            else:
                self._sockets.append(proto)
            return proto

    def _retire(self, sock: _Socket) -> None:
        # In-flight queries end within a timeout, linger windows after it, and late responses
        # matter until their confirmation pass (confirm_after, plus its own timeout) is judged.
        self._retired.append(sock)
        loop = asyncio.get_running_loop()
        o = self.options
        delay = max(o.timeout + o.udp_linger, o.confirm_after + 2 * o.timeout) + 0.1
        loop.call_later(delay, self._close_retired, sock)

    def _close_retired(self, sock: _Socket) -> None:
        if sock in self._retired:
            self._retired.remove(sock)
        sock.close()

    def exchange(self, query: bytes) -> Coroutine[Any, Any, Exchange]:
        # Not itself a coroutine: one coroutine layer less per query. Awaited at once by callers,
        # so the deadline taken here is the one taken when the exchange starts.
        loop = asyncio.get_running_loop()
        return self._exchange(query, loop.time() + self.options.timeout, self.options.udp_sends, True, loop)

    async def _exchange(
        self,
        query: bytes,
        deadline: float,
        sends: int,
        witness: bool,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Exchange:
        if loop is None:
            loop = asyncio.get_running_loop()
        try:
            sock = self._ready_socket() or await self._socket()
        except Exception as exc:  # noqa: BLE001 - an exchanger never raises: every failure is classified
            return Exchange(None, failure_from(exc, Phase.CONNECT), sends=0)
        sock.used += 1
        qid = random_id()
        while qid in sock.pending:
            qid = random_id()
        entry = _Pending(
            loop.create_future(), qid, question_of(query), sock, set_id(query, qid), self, deadline
        )
        sock.pending[qid] = entry
        channel = self.channel
        start = loop.time()
        step = (deadline - start) / max(1, sends)
        entry.send()
        send = entry.send
        steps: list[tuple[float, Callable[[], None]]] = [(start + step * i, send) for i in range(1, sends)]
        if witness:
            # A quarter of an interval after the last send, a witness follows a query that
            # nothing sent after it has overtaken yet.
            steps.append((start + step * (sends - 1) + step * self.witness_after, entry.witness))
        timer = Timer(entry.future, deadline, steps, self._dues)  # await_reply, one coroutine layer less
        try:
            data = await entry.future
        except TimeoutError:
            # Keep listening under this ID: a response after the deadline is evidence too.
            entry.expired = True
            entry.future = loop.create_future()
            return Exchange(
                None,
                timeout(),
                evidence=_ignored(entry),
                sends=entry.sends,
                channel=channel.name,
                overtaken=channel.overtook(entry.last),
                late=entry.future,
            )
        except Exception as exc:  # noqa: BLE001 - an exchanger never raises: every failure is classified
            del sock.pending[qid]
            failure = failure_from(exc, Phase.DNS_ROUND_TRIP)
            return Exchange(None, failure, evidence=_ignored(entry), sends=entry.sends, channel=channel.name)
        finally:
            timer.cancel()
        self.loss.add(entry.sends)
        latency = (time.perf_counter() - entry.sent) * 1000
        evidence = _ignored(entry) if entry.ignored else {}  # nearly always nothing to keep: no call
        if data[2] & _TC:
            del sock.pending[qid]
            return await self._fallback(query, deadline, latency, evidence, entry.sends)
        entry.answered = data
        result = Exchange(data, None, latency, evidence, sends=entry.sends, channel=channel.name)
        if self.options.udp_linger > 0:
            self._linger(sock, qid, entry, result, evidence)
        else:
            del sock.pending[qid]
        return result

    def _linger(
        self, sock: _Socket, qid: int, entry: _Pending, result: Exchange, evidence: dict[str, Any]
    ) -> None:
        """Keep listening under the answered ID for `udp_linger` seconds: a second, different
        answer to the same query is kept as evidence."""
        loop = asyncio.get_running_loop()
        settled: asyncio.Future[None] = loop.create_future()
        result.settled = settled

        def close_window() -> None:
            sock.pending.pop(qid, None)
            if entry.late:
                evidence["late"] = entry.late
            settled.set_result(None)

        loop.call_later(self.options.udp_linger, close_window)

    def _witness(self, stamp: int, deadline: float) -> None:
        if self.witness is None or not self.channel.needs_witness(stamp):
            return
        self.channel.witnessed = self.channel.sent + 1  # the witness's first send, made next
        task = asyncio.ensure_future(self._exchange(self.witness, deadline, 2, False))
        self._witnesses.add(task)
        task.add_done_callback(self._witnesses.discard)

    async def _fallback(
        self, query: bytes, deadline: float, udp_ms: float, evidence: dict[str, Any], sends: int
    ) -> Exchange:
        """RFC 7766: a truncated UDP answer is retried over TCP, and the measurement says so."""
        if self._tcp is None:
            self._tcp = TcpExchanger(self.endpoint, self.options)
        result = await self._tcp._once(query, deadline, evidence, shared=True)
        result.evidence["tc_fallback"] = True
        result.evidence["udp_truncated_ms"] = round(udp_ms, 3)
        result.sends += sends
        return result

    async def aclose(self) -> None:
        for task in list(self._witnesses):
            task.cancel()
        for sock in self._sockets + self._retired:
            sock.close()
        self._sockets.clear()
        self._retired.clear()
        if self._tcp is not None:
            await self._tcp.aclose()


def _ignored(entry: _Pending) -> dict[str, Any]:
    if not entry.ignored:
        return {}
    return {
        "ignored": [
            {"reason": why, "wire": base64.b64encode(wire).decode("ascii")} for why, wire in entry.ignored
        ]
    }


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
