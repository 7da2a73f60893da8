"""A userspace impaired network in front of a resolver, for tests and benchmarks.

`ImpairProxy` listens on a loopback address of its own and relays every port of an
upstream resolver (a `LabServer` or a real unbound), damaging the traffic as an
`Impairment` says. Datagrams (plain DNS, and the QUIC of DoQ and DoH over HTTP/3)
can be lost, delayed, jittered, duplicated or reordered, each direction on its own.
Streams (TCP, and the TLS of DoT and DoH carried as opaque bytes: the proxy never
terminates TLS, so the client still verifies the upstream's certificate) can stall
at accept or before the first bytes of the server, be reset after a number of bytes,
or drip one byte at a time. A resolver can vanish: from a moment on, or after a
number of queries or connections, nothing more reaches it (datagrams are dropped, stream
connections are held open and blackholed) and so nothing more is answered, which is what
a resolver that crashed behind a firewall that still accepts connections looks like.
What it had sent before still arrives, as packets on the wire would.

Every random choice comes from generators seeded by `Impairment.seed`, so a run with
the same arrival order makes the same choices; `ImpairProxy.counters` says what was
actually done. Run it on a `LabThread` like a lab server. It refuses any address but
loopback, upstream and its own: the impaired network is for the lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["Counters", "ImpairProxy", "Impairment", "PathImpairment", "StreamImpairment"]

# Which upstream ports carry datagrams and which carry byte streams.
DATAGRAM_TRANSPORTS = frozenset({"udp", "doq", "doh3"})
STREAM_TRANSPORTS = frozenset({"tcp", "dot", "doh"})
_SCHEMES = {"udp": "udp", "tcp": "tcp", "dot": "tls", "doh": "https", "doh3": "h3", "doq": "quic"}
_CHUNK = 65536
_UDP_IDLE = 30.0  # a client socket silent this long has its upstream socket closed


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _check_probability(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{type(owner).__name__}.{name}: {value!r} is not a probability in [0, 1]")


def _check_non_negative(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if value is not None and value < 0:
            raise ValueError(f"{type(owner).__name__}.{name}: {value!r} must not be negative")


@dataclass(frozen=True)
class PathImpairment:
    """What happens to datagrams going one way.

    Each datagram is lost with probability `loss`; one that survives waits `delay` plus
    a uniform draw in [0, `jitter`] seconds (so jitter alone reorders), is held a further
    `reorder_gap` seconds with probability `reorder` (so the ones behind overtake it),
    and is sent twice with probability `duplicate` (the copy after its own draw of the
    jitter, or `reorder_gap` when there is no jitter).
    """

    loss: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_gap: float = 0.05

    def __post_init__(self) -> None:
        _check_probability(self, "loss", "duplicate", "reorder")
        _check_non_negative(self, "delay", "jitter", "reorder_gap")

    @property
    def clean(self) -> bool:
        return not (self.loss or self.delay or self.jitter or self.duplicate or self.reorder)


@dataclass(frozen=True)
class StreamImpairment:
    """What happens to stream connections (TCP, DoT, DoH), each chosen 1 in N by the seeded RNG.

    A stalled connection (`stall_one_in`) forwards nothing for `stall_for` seconds: with
    `stall_at="accept"` from the moment it is accepted (the upstream is not even
    dialled; over TLS the handshake stalls), with `stall_at="reply"` once the server
    has sent `stall_skip` bytes (0: its first bytes, which over TLS is the ServerHello;
    a plain TCP connection then stalls its first reply). It then carries on normally.
    A reset connection (`reset_one_in`) is aborted with a TCP RST, both sides, once
    `reset_after` bytes of the server have been forwarded. A dripping connection
    (`drip_one_in`) forwards the server's bytes one at a time, `drip_interval` apart.
    0 means never; 1 means every connection.
    """

    stall_one_in: int = 0
    stall_for: float = 0.0
    stall_at: str = "accept"
    stall_skip: int = 0
    reset_one_in: int = 0
    reset_after: int = 0
    drip_one_in: int = 0
    drip_interval: float = 0.0

    def __post_init__(self) -> None:
        _check_non_negative(
            self,
            "stall_one_in",
            "stall_for",
            "stall_skip",
            "reset_one_in",
            "reset_after",
            "drip_one_in",
            "drip_interval",
        )
        if self.stall_at not in ("accept", "reply"):
            raise ValueError(f"StreamImpairment.stall_at: {self.stall_at!r} is not one of accept, reply")


@dataclass(frozen=True)
class Impairment:
    """The whole impaired network in front of one resolver.

    `vanish_after_queries` counts the DNS queries the proxy can see: datagrams to the
    plain UDP port and messages on plain TCP (it cannot count inside TLS or QUIC); the
    query that would exceed it is the first one lost. `vanish_after_connections` counts
    stream connections; `vanish_after` is seconds from start. Whichever comes first.
    """

    to_server: PathImpairment = field(default_factory=PathImpairment)
    to_client: PathImpairment = field(default_factory=PathImpairment)
    stream: StreamImpairment = field(default_factory=StreamImpairment)
    vanish_after_queries: int | None = None
    vanish_after_connections: int | None = None
    vanish_after: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_non_negative(self, "vanish_after_queries", "vanish_after_connections", "vanish_after")

    @classmethod
    def both_ways(cls, path: PathImpairment, **kw: Any) -> Impairment:
        """The same datagram impairment in both directions."""
        return cls(to_server=path, to_client=path, **kw)


@dataclass
class Counters:
    """What the proxy did, for assertions and reports. Directions: `c2s` (to the server), `s2c`."""

    datagrams_c2s: int = 0
    datagrams_s2c: int = 0
    lost_c2s: int = 0
    lost_s2c: int = 0
    duplicated_c2s: int = 0
    duplicated_s2c: int = 0
    reordered_c2s: int = 0  # delivered after a datagram that arrived later than it
    reordered_s2c: int = 0
    queries: int = 0  # the queries the proxy can see (see Impairment)
    connections: int = 0
    stalled: int = 0
    resets: int = 0
    dripping: int = 0
    vanished_datagrams: int = 0  # dropped because the resolver had vanished
    blackholed: int = 0  # connections open when, or opened after, the resolver vanished
    vanished_at: float | None = None  # monotonic

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Path:
    """One direction's datagram impairment: decides, schedules and counts."""

    def __init__(self, proxy: ImpairProxy, cfg: PathImpairment, rng: random.Random, direction: str) -> None:
        self.proxy = proxy
        self.cfg = cfg
        self.rng = rng
        self.direction = direction

    def count(self, what: str) -> None:
        name = f"{what}_{self.direction}"
        setattr(self.proxy.counters, name, getattr(self.proxy.counters, name) + 1)

    def submit(self, data: bytes, seq: int, order: list[int], send: Callable[[bytes], None]) -> None:
        """Send `data` (arrival number `seq`; `order` is [highest delivered]) through this path."""
        self.count("datagrams")
        cfg = self.cfg
        if cfg.clean:
            self._deliver(data, seq, order, send)
            return
        if cfg.loss and self.rng.random() < cfg.loss:
            self.count("lost")
            return
        copies = [self._wait()]
        if cfg.duplicate and self.rng.random() < cfg.duplicate:
            self.count("duplicated")
            copies.append(copies[0] + (self.rng.uniform(0, cfg.jitter) if cfg.jitter else cfg.reorder_gap))
        loop = asyncio.get_running_loop()
        for i, wait in enumerate(copies):
            if wait <= 0:
                self._deliver(data, seq, order, send, i > 0)
            else:
                loop.call_later(wait, self._deliver, data, seq, order, send, i > 0)

    def _wait(self) -> float:
        cfg = self.cfg
        wait = cfg.delay + (self.rng.uniform(0, cfg.jitter) if cfg.jitter else 0.0)
        if cfg.reorder and self.rng.random() < cfg.reorder:
            wait += cfg.reorder_gap
        return wait

    def _deliver(
        self, data: bytes, seq: int, order: list[int], send: Callable[[bytes], None], copy: bool = False
    ) -> None:
        # A vanished resolver hears nothing more; what it sent before is already on the wire.
        if self.direction == "c2s" and self.proxy.gone():
            self.proxy.counters.vanished_datagrams += 1
            return
        if not copy:
            if seq < order[0]:
                self.count("reordered")
            order[0] = max(order[0], seq)
        send(data)


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, session: _UdpSession) -> None:
        self.session = session

    def datagram_received(self, data: bytes, _addr: Any) -> None:  # asyncio's signature; one upstream
        self.session.from_server(data)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error from upstream: the client just hears nothing, as on a real path


class _UdpSession:
    """One client address: its own upstream socket, so replies find their way back."""

    def __init__(self, relay: _UdpRelay, addr: Any) -> None:
        self.relay = relay
        self.addr = addr
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: list[bytes] = []
        self.last = time.monotonic()
        self.seq = [0, 0]  # arrivals per direction
        self.order = ([0], [0])  # highest delivered per direction

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Upstream(self), remote_addr=(self.relay.proxy.upstream, self.relay.upstream_port)
            )
        except OSError:
            self.relay.sessions.pop(self.addr, None)
            return
        self.transport = transport
        for data in self.waiting:
            transport.sendto(data)
        self.waiting.clear()

    def to_server(self, data: bytes) -> None:
        self.last = time.monotonic()
        self.seq[0] += 1
        self.relay.proxy.c2s.submit(data, self.seq[0], self.order[0], self._send_up)

    def _send_up(self, data: bytes) -> None:
        if self.transport is None:
            self.waiting.append(data)
        elif not self.transport.is_closing():
            self.transport.sendto(data)

    def from_server(self, data: bytes) -> None:
        self.last = time.monotonic()
        self.seq[1] += 1
        self.relay.proxy.s2c.submit(data, self.seq[1], self.order[1], self._send_down)

    def _send_down(self, data: bytes) -> None:
        self.relay.send_to_client(data, self.addr)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _UdpRelay(asyncio.DatagramProtocol):
    def __init__(self, proxy: ImpairProxy, name: str, upstream_port: int) -> None:
        self.proxy = proxy
        self.name = name
        self.upstream_port = upstream_port
        self.transport: asyncio.DatagramTransport | None = None
        self.sessions: dict[Any, _UdpSession] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        proxy = self.proxy
        if self.name == "udp":
            proxy.counters.queries += 1
            limit = proxy.impairment.vanish_after_queries
            if limit is not None and proxy.counters.queries > limit:
                proxy.vanish()
        if proxy.client_spoke():
            proxy.counters.vanished_datagrams += 1
            return
        session = self.sessions.get(addr)
        if session is None:
            session = self.sessions[addr] = _UdpSession(self, addr)
            proxy.spawn(session.open())
        session.to_server(data)

    def send_to_client(self, data: bytes, addr: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)

    def sweep(self) -> None:
        cutoff = time.monotonic() - _UDP_IDLE
        for addr, session in list(self.sessions.items()):
            if session.last < cutoff:
                session.close()
                del self.sessions[addr]

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()
        if self.transport is not None:
            self.transport.close()


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # Linger 0: close() sends RST rather than FIN, as a middlebox's reset does.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _StreamConnection:
    """One accepted stream connection and what is done to it."""

    def __init__(
        self,
        proxy: ImpairProxy,
        name: str,
        upstream_port: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.name = name
        self.upstream_port = upstream_port
        self.reader = reader
        self.writer = writer
        self.up_writer: asyncio.StreamWriter | None = None
        self.blackholed = False
        cfg, rng = proxy.impairment.stream, proxy.stream_rng
        self.stall = bool(cfg.stall_one_in) and rng.random() < 1 / cfg.stall_one_in
        self.reset = bool(cfg.reset_one_in) and rng.random() < 1 / cfg.reset_one_in
        self.drip = bool(cfg.drip_one_in) and rng.random() < 1 / cfg.drip_one_in
        self.frame = bytearray()  # plain TCP: the client's bytes, to count queries by their length prefix

    async def run(self) -> None:
        proxy, cfg = self.proxy, self.proxy.impairment.stream
        proxy.counters.connections += 1
        limit = proxy.impairment.vanish_after_connections
        if limit is not None and proxy.counters.connections > limit:
            proxy.vanish()
        try:
            if proxy.gone():
                await self._blackhole()
                return
            if self.stall:
                proxy.counters.stalled += 1
            if self.stall and cfg.stall_at == "accept":
                self.stall = False
                if not await proxy.wait_unless_gone(cfg.stall_for):
                    await self._blackhole()
                    return
            try:
                up_reader, self.up_writer = await asyncio.open_connection(proxy.upstream, self.upstream_port)
            except OSError:
                _abort_with_rst(self.writer)
                return
            if self.reset:
                proxy.counters.resets += 1
            if self.drip:
                proxy.counters.dripping += 1
            await self._relay(up_reader)
        except (ConnectionError, OSError):
            pass
        finally:
            if self.up_writer is not None:
                self.up_writer.transport.abort()
            if not self.writer.transport.is_closing():
                self.writer.transport.abort()

    async def _relay(self, up_reader: asyncio.StreamReader) -> None:
        c2s = asyncio.ensure_future(self._client_to_server())
        s2c = asyncio.ensure_future(self._server_to_client(up_reader))
        try:
            # The client decides when the connection ends; what the server still
            # had to say gets a moment, unless the resolver is gone.
            await c2s
            if not self.proxy.gone():
                await asyncio.wait_for(asyncio.shield(s2c), 2.0)
        except TimeoutError:
            pass
        finally:
            c2s.cancel()
            s2c.cancel()
            await asyncio.gather(c2s, s2c, return_exceptions=True)

    async def _blackhole(self) -> None:
        """Forward nothing more to the server, and hold the connection open until the client gives up."""
        self._mark_blackholed()
        while await self.reader.read(_CHUNK):
            pass

    def _mark_blackholed(self) -> None:
        if not self.blackholed:
            self.blackholed = True
            self.proxy.counters.blackholed += 1

    def _count_queries(self, data: bytes) -> None:
        self.frame += data
        proxy = self.proxy
        while len(self.frame) >= 2:
            size = struct.unpack("!H", self.frame[:2])[0]
            if len(self.frame) < size + 2:
                return
            del self.frame[: size + 2]
            proxy.counters.queries += 1
            limit = proxy.impairment.vanish_after_queries
            if limit is not None and proxy.counters.queries > limit:
                proxy.vanish()

    async def _client_to_server(self) -> None:
        assert self.up_writer is not None
        while True:
            data = await self.reader.read(_CHUNK)
            if not data:
                if self.proxy.gone():
                    return
                if self.up_writer.can_write_eof():
                    self.up_writer.write_eof()
                return
            if self.name == "tcp":
                self._count_queries(data)
            if self.proxy.client_spoke():
                await self._blackhole()
                return
            if self.up_writer.transport.is_closing():
                return  # reset by us, or closed by the server: what the client still sends goes nowhere
            self.up_writer.write(data)
            await self.up_writer.drain()

    async def _server_to_client(self, up_reader: asyncio.StreamReader) -> None:
        cfg, proxy, writer = self.proxy.impairment.stream, self.proxy, self.writer
        sent = 0
        while True:
            data = await up_reader.read(_CHUNK)
            if not data:
                if proxy.gone():
                    return  # a vanished resolver does not close anything either
                if writer.can_write_eof():
                    writer.write_eof()
                return
            if self.stall and sent + len(data) > cfg.stall_skip:
                head = max(0, cfg.stall_skip - sent)
                if not await self._write(data[:head]):
                    return
                sent += head
                data = data[head:]
                self.stall = False
                if not await proxy.wait_unless_gone(cfg.stall_for):
                    return
            if self.reset and sent + len(data) >= cfg.reset_after:
                await self._write(data[: cfg.reset_after - sent])
                _abort_with_rst(writer)
                if self.up_writer is not None:
                    _abort_with_rst(self.up_writer)
                return
            if not await self._write(data):
                return
            sent += len(data)

    async def _write(self, data: bytes) -> bool:
        """Forward to the client; False if the connection to it is gone."""
        if self.writer.transport.is_closing():
            return False
        if not data:
            return True
        if not self.drip:
            self.writer.write(data)
            await self.writer.drain()
            return True
        interval = self.proxy.impairment.stream.drip_interval
        for i in range(len(data)):
            if self.writer.transport.is_closing():
                return False
            self.writer.write(data[i : i + 1])
            await self.writer.drain()
            await asyncio.sleep(interval)
        return True


class ImpairProxy:
    """An impaired path to one upstream resolver, on a loopback address of its own.

    `ports` maps transport names (udp, tcp, dot, doh, doh3, doq, as in `LabServer.ports`)
    to the upstream's ports; the proxy listens on `host` with one port per transport
    (udp and tcp share one, as on a resolver) and `specs()` gives resolver specs for
    them. `vanish_when`, if given, is asked on every datagram and stream chunk from a
    client; once it says true the resolver vanishes (a benchmark can tie this to the
    upstream's own query count, which sees inside TLS). Start and stop it on the
    upstream's event loop, or through `LabThread.start`.
    """

    def __init__(
        self,
        upstream: str,
        ports: Mapping[str, int],
        impairment: Impairment | None = None,
        host: str = "127.54.0.1",
        vanish_when: Callable[[], bool] | None = None,
    ) -> None:
        for what, address in (("upstream", upstream), ("host", host)):
            if not _is_loopback(address):
                # Tests and benchmarks must not send traffic off the machine (HELPERS.md).
                raise ValueError(f"ImpairProxy {what}: {address!r} is not a loopback address")
        unknown = set(ports) - DATAGRAM_TRANSPORTS - STREAM_TRANSPORTS
        if unknown:
            raise ValueError(f"ImpairProxy ports: {sorted(unknown)!r} are not transports this proxy relays")
        self.upstream = upstream
        self.upstream_ports = dict(ports)
        self.impairment = impairment or Impairment()
        self.host = host
        self.vanish_when = vanish_when
        self.ports: dict[str, int] = {}
        self.counters = Counters()
        seed = self.impairment.seed
        self.c2s = _Path(self, self.impairment.to_server, random.Random(f"{seed}/c2s"), "c2s")
        self.s2c = _Path(self, self.impairment.to_client, random.Random(f"{seed}/s2c"), "s2c")
        self.stream_rng = random.Random(f"{seed}/stream")
        self._vanished = False
        self._started = 0.0
        self._relays: list[_UdpRelay] = []
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Future[Any]] = set()
        self._gone_event: asyncio.Event | None = None
        self._gone_event_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def of(
        cls,
        server: Any,
        impairment: Impairment | None = None,
        host: str = "127.54.0.1",
        vanish_when: Callable[[], bool] | None = None,
    ) -> ImpairProxy:
        """A proxy in front of every port of a `LabServer`, or of a real resolver described by
        `host` and `ports` (where `dns` stands for the UDP and TCP port, as in tests/real.py)."""
        ports = dict(server.ports)
        if "dns" in ports:
            ports.setdefault("udp", ports["dns"])
            ports.setdefault("tcp", ports.pop("dns"))
        return cls(server.host, ports, impairment, host, vanish_when)

    # -- vanishing ---------------------------------------------------------------

    def vanish(self) -> None:
        """From now on nothing reaches the resolver, so it answers nothing new. Any thread."""
        if not self._vanished:
            self._vanished = True
            self.counters.vanished_at = time.monotonic()
            if self._gone_event is not None and self._gone_event_loop is not None:
                self._gone_event_loop.call_soon_threadsafe(self._gone_event.set)

    def gone(self) -> bool:
        """Whether the resolver has vanished."""
        if not self._vanished:
            after = self.impairment.vanish_after
            if after is not None and time.monotonic() - self._started >= after:
                self.vanish()
        return self._vanished

    def client_spoke(self) -> bool:
        """Called on everything a client sends: asks `vanish_when`; whether the resolver is gone."""
        if not self._vanished and self.vanish_when is not None and self.vanish_when():
            self.vanish()
        return self.gone()

    async def wait_unless_gone(self, seconds: float) -> bool:
        """Sleep `seconds`; False as soon as the resolver vanishes."""
        assert self._gone_event is not None
        if self.gone():
            return False
        try:
            await asyncio.wait_for(self._gone_event.wait(), seconds)
        except TimeoutError:
            return not self.gone()
        return False

    # -- life cycle --------------------------------------------------------------

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> ImpairProxy:
        loop = asyncio.get_running_loop()
        self._gone_event = asyncio.Event()
        self._gone_event_loop = loop
        self._started = time.monotonic()
        shared = self.upstream_ports.get("udp") is not None and self.upstream_ports.get("tcp") is not None
        for name, port in self.upstream_ports.items():
            if name in self.ports:
                continue
            if shared and name in ("udp", "tcp"):
                await self._start_shared()
            elif name in DATAGRAM_TRANSPORTS:
                self.ports[name] = await self._start_datagram(name, port, 0)
            else:
                self.ports[name] = await self._start_stream(name, port, 0)
        self.spawn(self._sweeper())
        if self.impairment.vanish_after is not None:
            loop.call_later(self.impairment.vanish_after, self.gone)
        return self

    async def _start_shared(self) -> None:
        # As on a real resolver, a truncated UDP answer is retried over TCP on the same port.
        for _ in range(20):
            port = await self._start_datagram("udp", self.upstream_ports["udp"], 0)
            try:
                await self._start_stream("tcp", self.upstream_ports["tcp"], port)
            except OSError:
                relay = self._relays.pop()
                relay.close()
                continue
            self.ports["udp"] = self.ports["tcp"] = port
            return
        raise OSError(f"no free port on {self.host} for UDP and TCP together")

    async def _start_datagram(self, name: str, upstream_port: int, port: int) -> int:
        loop = asyncio.get_running_loop()
        relay = _UdpRelay(self, name, upstream_port)
        transport, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=(self.host, port))
        self._relays.append(relay)
        bound: int = transport.get_extra_info("sockname")[1]
        return bound

    async def _start_stream(self, name: str, upstream_port: int, port: int) -> int:
        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.spawn(_StreamConnection(self, name, upstream_port, reader, writer).run())

        server = await asyncio.start_server(accept, self.host, port)
        self._servers.append(server)
        bound: int = server.sockets[0].getsockname()[1]
        return bound

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(5)
            for relay in self._relays:
                relay.sweep()

    def specs(self) -> dict[str, str]:
        """Resolver specs (docs/cli.md, resolver specs) through the proxy, per transport."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        out = {}
        for name, port in self.ports.items():
            path = "/dns-query" if name in ("doh", "doh3") else ""
            out[name] = f"{_SCHEMES[name]}://{host}:{port}{path}"
        return out

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for relay in self._relays:
            relay.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._servers.clear()
        self._relays.clear()
