"""A scriptable loopback resolver speaking UDP, TCP, DoT, DoH and DoQ.

It answers from a `Zone` of scripted behaviours written as data: NXDOMAIN, a block
page, REFUSED with EDE 16, a drop, truncation, a malformed or mismatched reply, the
query echoed back, a reply under the wrong message ID, an answer injected ahead of the
real one, and so on. `probe demo` runs a few of these to imitate ISPs and public
resolvers; the test suite drives every block shape through it on every transport;
users can aim their own alert pipeline at it.
It binds only where it is told (loopback by default) on port 0.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import struct
import tempfile
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trustme
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived as H3DataReceived
from aioquic.h3.events import HeadersReceived as H3HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamDataReceived

__all__ = ["Behaviour", "LabCA", "LabServer", "LabThread", "Reply", "Service", "Zone", "respond"]

ACTIONS = frozenset(
    {
        "answer",
        "drop",
        "truncate",
        "malformed",
        "mismatch",
        "inject",
        "close",
        "echo",
        "wrong_id",
        "drip",
        "oversize",
    }
)
LAB_TRANSPORTS = ("udp", "tcp", "dot", "doh", "doh3", "doq")


@dataclass(frozen=True)
class Behaviour:
    """How the lab answers one name (and optionally one type).

    `records` maps a type (A, AAAA, HTTPS, TXT) to presentation-format data; `cname`
    is a chain placed before them; `ede` a list of (code, extra text); `action` one of
    answer, drop (no reply), truncate (TC=1 over UDP, the full answer over streams),
    malformed, mismatch (the reply names another question), inject (over UDP a forged
    answer with `injected` addresses arrives `inject_gap` seconds before the real one),
    close (streams: the connection is closed instead of answering; UDP: no reply),
    echo (the query itself comes back: QR=0), wrong_id (the answer under another message
    ID than the query's; on DoQ and DoH, whose queries carry 0, a non-zero one), drip
    (streams: the reply, framing included, written one byte every `drip_interval` seconds;
    UDP: answer), oversize (DoH, DoH/3 and DoQ: the answer followed by `OVERSIZE` bytes of
    padding, more than any DNS message; elsewhere a 2-byte length or a datagram bounds it).
    """

    rcode: str = "NOERROR"
    records: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    cname: tuple[str, ...] = ()
    ede: tuple[tuple[int, str], ...] = ()
    action: str = "answer"
    delay: float = 0.0
    soa: bool = True
    ra: bool = True
    ttl: int = 300
    injected: tuple[str, ...] = ("203.98.7.65",)
    inject_gap: float = 0.02
    http_status: int = 200
    drip_interval: float = 0.5

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action {self.action!r} is not one of {', '.join(sorted(ACTIONS))}")
        dns.rcode.from_text(self.rcode)


NXDOMAIN = Behaviour(rcode="NXDOMAIN")
OVERSIZE = 200_000  # bytes of padding after an `oversize` answer


@dataclass
class Zone:
    """Names → behaviours; `*.name` covers names below; unknown names are NXDOMAIN with a SOA."""

    names: dict[str, Behaviour] = field(default_factory=dict)
    by_type: dict[tuple[str, str], Behaviour] = field(default_factory=dict)
    default: Behaviour = NXDOMAIN
    nsid: str | None = None

    def set(self, name: str, behaviour: Behaviour, qtype: str | None = None) -> None:
        key = name.lower().rstrip(".")
        if qtype is None:
            self.names[key] = behaviour
        else:
            self.by_type[(key, qtype.upper())] = behaviour

    def lookup(self, name: str, qtype: str) -> Behaviour:
        name = name.lower().rstrip(".")
        candidates = [name]
        labels = name.split(".")
        candidates += ["*." + ".".join(labels[i:]) for i in range(1, len(labels))]
        for cand in candidates:
            hit = self.by_type.get((cand, qtype)) or self.names.get(cand)
            if hit is not None:
                return hit
        return self.default


def _answer(
    query: dns.message.Message, zone: Zone, b: Behaviour, qname_override: str | None = None
) -> dns.message.Message:
    resp = dns.message.make_response(query)
    if not b.ra:
        resp.flags &= ~dns.flags.RA
    question = query.question[0]
    qtype = dns.rdatatype.to_text(question.rdtype)
    owner = question.name if qname_override is None else dns.name.from_text(qname_override)
    if qname_override is not None:
        resp.question = [dns.rrset.RRset(owner, question.rdclass, question.rdtype)]
    resp.set_rcode(dns.rcode.from_text(b.rcode))
    for target in b.cname:
        tname = dns.name.from_text(target)
        rr = dns.rrset.from_text(owner, b.ttl, "IN", "CNAME", tname.to_text())
        resp.answer.append(rr)
        owner = tname
    for text in b.records.get(qtype, ()):
        rr = dns.rrset.from_text(owner, b.ttl, question.rdclass, qtype, text)
        existing = resp.find_rrset(resp.answer, owner, question.rdclass, question.rdtype, create=True)
        for rd in rr:
            existing.add(rd, b.ttl)
    negative = b.rcode == "NXDOMAIN" or (b.rcode == "NOERROR" and not b.records.get(qtype))
    if negative and b.soa:
        # A real negative answer proves itself with the zone's SOA (RFC 2308).
        zone_apex = owner.parent() if len(owner) > 1 else owner
        soa = "ns.lab.test. hostmaster.lab.test. 1 3600 600 86400 60"
        resp.authority.append(dns.rrset.from_text(zone_apex, 60, "IN", "SOA", soa))
    options: list[dns.edns.Option] = [dns.edns.EDEOption(dns.edns.EDECode(c), t or None) for c, t in b.ede]
    if query.edns >= 0:
        if zone.nsid is not None and any(o.otype == dns.edns.NSID for o in query.options):
            options.append(dns.edns.NSIDOption(zone.nsid.encode()))
        resp.use_edns(0, payload=1232, options=options)
    return resp


class Reply(NamedTuple):
    """What the lab does with one query: replies as (delay, wire), the DoH status, or a close;
    `drip` seconds between the bytes a stream writes, `padding` zero bytes after the message."""

    replies: list[tuple[float, bytes]]
    http_status: int = 200
    close: bool = False
    drip: float = 0.0
    padding: int = 0


def respond(wire: bytes, zone: Zone, transport: str) -> Reply:
    """What the lab sends back for one query on `transport`."""
    try:
        query = dns.message.from_wire(wire)
    except Exception:  # noqa: BLE001 - a lab answers any garbage with FORMERR, like a server, never a crash
        if len(wire) < 12:
            return Reply([])
        return Reply([(0.0, wire[:2] + b"\x81\x01" + b"\x00" * 8)])
    if not query.question:
        return Reply([])
    q = query.question[0]
    b = zone.lookup(q.name.to_text(omit_final_dot=True), dns.rdatatype.to_text(q.rdtype))
    if b.action in ("drop", "close"):
        return Reply([], b.http_status, b.action == "close")
    if b.action == "echo":
        return Reply([(b.delay, wire)], b.http_status)
    if b.action == "wrong_id":
        resp = _answer(query, zone, b)
        resp.id = query.id ^ 0x4B1D  # never the query's ID, and never 0 when the query's is 0
        return Reply([(b.delay, resp.to_wire())], b.http_status)
    if b.action == "mismatch":
        return Reply([(b.delay, _answer(query, zone, b, "mismatch.lab.test.").to_wire())], b.http_status)
    resp = _answer(query, zone, b)
    out = resp.to_wire()
    limit = max(query.payload, 512) if query.edns >= 0 else 512
    if transport == "udp" and (b.action == "truncate" or len(out) > limit):
        tc = dns.message.make_response(query)
        tc.flags |= dns.flags.TC
        return Reply([(b.delay, tc.to_wire())], b.http_status)
    if b.action == "malformed":
        # Claim one more answer record than there are bytes for.
        ancount = struct.unpack("!H", out[6:8])[0] + 1
        out = out[:6] + struct.pack("!H", ancount) + out[8:] + b"\xc0\x0c\x00\x01\x00\x01\x00\x00"
    if b.action == "inject" and transport == "udp":
        forged = Behaviour(records={"A": b.injected, "AAAA": ()}, ttl=b.ttl)
        fake = _answer(query, zone, forged).to_wire()
        return Reply([(0.0, fake), (b.delay + b.inject_gap, out)], b.http_status)
    drip = b.drip_interval if b.action == "drip" and transport != "udp" else 0.0
    padding = OVERSIZE if b.action == "oversize" and transport in ("doh", "doh3", "doq") else 0
    return Reply([(b.delay, out)], b.http_status, drip=drip, padding=padding)


async def _drip(data: bytes, interval: float, write: Callable[[bytes], bool]) -> bool:
    """Write `data` one byte at a time; `write` says False once the peer is gone (then so do we)."""
    for i in range(len(data)):
        if not write(data[i : i + 1]):
            return False
        if i + 1 < len(data):
            await asyncio.sleep(interval)
    return True


class LabCA:
    """A throw-away CA (trustme) and a certificate for the lab's addresses and names."""

    def __init__(
        self, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), directory: Path | None = None
    ) -> None:
        self.ca = trustme.CA()
        self.hosts = hosts
        self.cert = self.ca.issue_cert(*hosts)
        self.dir = directory or Path(tempfile.mkdtemp(prefix="blockprobe-lab-"))
        self.ca_file = self.dir / "lab-ca.pem"
        self.cert_file = self.dir / "lab-cert.pem"
        self.key_file = self.dir / "lab-key.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.cert.private_key_pem.write_to_path(str(self.key_file))
        for i, blob in enumerate(self.cert.cert_chain_pems):
            blob.write_to_path(str(self.cert_file), append=i > 0)

    def server_context(self, alpn: list[str]) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        ctx.set_alpn_protocols(alpn)
        return ctx


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: LabServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server.queries += 1
        self.server.arrivals.append(time.monotonic())
        loop = asyncio.get_running_loop()
        for delay, wire in respond(data, self.server.zone, "udp").replies:
            if delay > 0:
                loop.call_later(delay, self._send, wire, addr)
            else:
                self._send(wire, addr)

    def _send(self, wire: bytes, addr: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(wire, addr)


class _Slot:
    """One query's place in an in-order connection: its reply once it has one."""

    __slots__ = ("data", "ready")

    def __init__(self) -> None:
        self.data = b""
        self.ready = False


class _Stream(asyncio.Protocol):
    """TCP and DoT: length-prefixed messages, answered concurrently (out of order if delayed).

    With the server's `in_order`, a connection's replies are written in the order of its
    queries, as dnsdist 1.7 does on DoT: a query that is never answered (a drop) holds
    back every reply behind it on that connection, for as long as the connection lives.
    """

    def __init__(self, server: LabServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.slots: deque[_Slot] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        loop = asyncio.get_running_loop()
        while len(self.buf) >= 2:
            size = struct.unpack("!H", self.buf[:2])[0]
            if len(self.buf) < size + 2:
                return
            msg = bytes(self.buf[2 : size + 2])
            del self.buf[: size + 2]
            self.server.queries += 1
            reply = respond(msg, self.server.zone, "tcp")
            if reply.close:
                assert self.transport is not None
                self.transport.close()
                return
            if self.server.in_order:
                slot = _Slot()
                self.slots.append(slot)
                if reply.replies:  # a drop leaves its slot empty for good
                    delay, wire = reply.replies[-1]
                    framed = struct.pack("!H", len(wire)) + wire
                    if delay > 0:
                        loop.call_later(delay, self._fill, slot, framed)
                    else:
                        self._fill(slot, framed)
                continue
            for delay, wire in reply.replies:
                framed = struct.pack("!H", len(wire)) + wire
                if reply.drip:
                    self.server.drip(delay, framed, reply.drip, self._write)
                elif delay > 0:
                    loop.call_later(delay, self._write, framed)
                else:
                    self._write(framed)

    def _fill(self, slot: _Slot, framed: bytes) -> None:
        slot.data, slot.ready = framed, True
        while self.slots and self.slots[0].ready:
            self._write(self.slots.popleft().data)

    def _write(self, data: bytes) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True


class _Doh(asyncio.Protocol):
    """DoH on HTTP/2 (or HTTP/1.1 when that is what ALPN settled on): GET ?dns= and POST."""

    def __init__(self, server: LabServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.h2: h2.connection.H2Connection | None = None
        self.bodies: dict[int, bytearray] = {}
        self.heads: dict[int, dict[bytes, bytes]] = {}
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections += 1
        ssl_obj = transport.get_extra_info("ssl_object")
        if ssl_obj is not None and ssl_obj.selected_alpn_protocol() == "h2":
            self.h2 = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=False, header_encoding=None)
            )
            self.h2.initiate_connection()
            transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        if self.h2 is None:
            self._http1(data)
            return
        for ev in self.h2.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                self.heads[ev.stream_id] = dict(ev.headers)
                self.bodies[ev.stream_id] = bytearray()
            elif isinstance(ev, h2.events.DataReceived):
                self.bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                head = self.heads.pop(ev.stream_id, {})
                body = bytes(self.bodies.pop(ev.stream_id, b""))
                self._request(ev.stream_id, head.get(b":method", b""), head.get(b":path", b""), body)
        self._flush()

    def _flush(self) -> None:
        if self.h2 is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.h2.data_to_send())

    @staticmethod
    def _query_of(method: bytes, path: bytes, body: bytes) -> bytes | None:
        if method == b"POST":
            return body
        parsed = urllib.parse.urlsplit(path.decode("latin-1"))
        values = urllib.parse.parse_qs(parsed.query).get("dns")
        if not values:
            return None
        text = values[0]
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    def _request(self, sid: int, method: bytes, path: bytes, body: bytes) -> None:
        self.server.queries += 1
        query = self._query_of(method, path, body)
        if query is None:
            self._reply(sid, 400, b"")
            return
        reply = respond(query, self.server.zone, "doh")
        if reply.close and self.transport is not None:
            self.transport.close()
        if not reply.replies:
            return  # drop: the stream never ends, the client times out
        delay, wire = reply.replies[-1]
        status = reply.http_status
        body = wire + bytes(reply.padding)
        if status != 200:
            body = b"blocked by order\n"
        loop = asyncio.get_running_loop()
        if delay > 0:
            loop.call_later(delay, self._reply, sid, status, body, reply.drip)
        else:
            self._reply(sid, status, body, reply.drip)

    def _reply(self, sid: int, status: int, body: bytes, drip: float = 0.0) -> None:
        ctype = b"application/dns-message" if status == 200 else b"text/plain"
        if self.h2 is None:
            head = (
                f"HTTP/1.1 {status} X\r\ncontent-type: {ctype.decode()}\r\n"
                f"content-length: {len(body)}\r\nconnection: keep-alive\r\n\r\n"
            ).encode()
            if drip:
                self._write1(head)
                self.server.drip(0.0, body, drip, self._write1)
            else:
                self._write1(head + body)
            return
        try:
            self.h2.send_headers(
                sid,
                [
                    (b":status", str(status).encode()),
                    (b"content-type", ctype),
                    (b"content-length", str(len(body)).encode()),
                ],
            )
            if drip:
                self._flush()
                self.server.drip(
                    0.0, body, drip, lambda b: self._send_h2(sid, b), lambda: self._send_h2(sid, b"", True)
                )
                return
            # In frames of the default maximum size, as far as the client's window lets us.
            for i in range(0, len(body), 16384):
                chunk = body[i : i + 16384]
                if len(chunk) > self.h2.local_flow_control_window(sid):
                    break
                self.h2.send_data(sid, chunk, end_stream=i + 16384 >= len(body))
        except h2.exceptions.H2Error:
            return
        self._flush()

    def _write1(self, data: bytes) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True

    def _send_h2(self, sid: int, data: bytes, end: bool = False) -> bool:
        assert self.h2 is not None
        try:
            self.h2.send_data(sid, data, end_stream=end)
        except h2.exceptions.H2Error:
            return False  # the client reset the stream it gave up on
        self._flush()
        return self.transport is not None and not self.transport.is_closing()

    def _http1(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
            length = int(headers.get(b"content-length", b"0") or 0)
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            parts = lines[0].split(b" ")
            if len(parts) != 3:
                if self.transport is not None:
                    self.transport.close()
                return
            self._request(0, parts[0], parts[1], body)


class _DoqServer(QuicConnectionProtocol):
    lab: LabServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bufs: dict[int, bytearray] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if not isinstance(event, StreamDataReceived):
            return
        buf = self.bufs.setdefault(event.stream_id, bytearray())
        buf += event.data
        if not event.end_stream:
            return
        del self.bufs[event.stream_id]
        self.lab.queries += 1
        reply = respond(bytes(buf[2:]), self.lab.zone, "doq")
        if reply.close:
            self._quic.close(error_code=0x2, reason_phrase="lab: closing as scripted")
            self.transmit()
        if not reply.replies:
            return
        delay, wire = reply.replies[-1]
        sid = event.stream_id
        framed = struct.pack("!H", len(wire)) + wire + bytes(reply.padding)
        if reply.drip:
            self.lab.drip(
                delay, framed, reply.drip, lambda b: self._send(sid, b), lambda: self._send(sid, b"", True)
            )
            return

        def send() -> None:
            self._quic.send_stream_data(sid, framed, end_stream=True)
            self.transmit()

        if delay > 0:
            asyncio.get_running_loop().call_later(delay, send)
        else:
            send()

    def _send(self, sid: int, data: bytes, end: bool = False) -> bool:
        try:
            self._quic.send_stream_data(sid, data, end_stream=end)
        except Exception:  # noqa: BLE001 - the client reset the stream or closed the connection
            return False
        self.transmit()
        return True


class _H3Server(QuicConnectionProtocol):
    """DoH over HTTP/3: GET ?dns= and POST, answered like the HTTP/2 endpoint."""

    lab: LabServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.heads: dict[int, dict[bytes, bytes]] = {}
        self.bodies: dict[int, bytearray] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        for ev in self.h3.handle_event(event):
            if isinstance(ev, H3HeadersReceived):
                self.heads[ev.stream_id] = dict(ev.headers)
                self.bodies[ev.stream_id] = bytearray()
            elif isinstance(ev, H3DataReceived):
                self.bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data)
            else:
                continue
            if ev.stream_ended:
                head = self.heads.pop(ev.stream_id, {})
                body = bytes(self.bodies.pop(ev.stream_id, b""))
                self._request(ev.stream_id, head, body)

    def _request(self, sid: int, head: dict[bytes, bytes], body: bytes) -> None:
        self.lab.queries += 1
        query = _Doh._query_of(head.get(b":method", b""), head.get(b":path", b""), body)
        if query is None:
            self._reply(sid, 400, b"")
            return
        reply = respond(query, self.lab.zone, "doh3")
        if reply.close:
            self._quic.close(error_code=0x100, reason_phrase="lab: closing as scripted")
            self.transmit()
        if not reply.replies:
            return
        delay, wire = reply.replies[-1]
        status = reply.http_status
        body = wire + bytes(reply.padding)
        if status != 200:
            body = b"blocked by order\n"
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._reply, sid, status, body, reply.drip)
        else:
            self._reply(sid, status, body, reply.drip)

    def _reply(self, sid: int, status: int, body: bytes, drip: float = 0.0) -> None:
        ctype = b"application/dns-message" if status == 200 else b"text/plain"
        self.h3.send_headers(
            sid,
            [
                (b":status", str(status).encode()),
                (b"content-type", ctype),
                (b"content-length", str(len(body)).encode()),
            ],
        )
        if drip:
            self.transmit()
            self.lab.drip(0.0, body, drip, lambda b: self._send(sid, b), lambda: self._send(sid, b"", True))
            return
        self.h3.send_data(sid, body, end_stream=True)
        self.transmit()

    def _send(self, sid: int, data: bytes, end: bool = False) -> bool:
        try:
            self.h3.send_data(sid, data, end_stream=end)
        except Exception:  # noqa: BLE001 - the client reset the stream or closed the connection
            return False
        self.transmit()
        return True


class LabServer:
    """One scripted resolver on one loopback address, every transport on its own port.

    `in_order=True` makes TCP and DoT answer each connection's queries in the order they
    came, like dnsdist 1.7's DoT front end; the default answers each as soon as it can.
    """

    def __init__(
        self,
        zone: Zone,
        host: str = "127.0.0.1",
        ca: LabCA | None = None,
        transports: tuple[str, ...] = LAB_TRANSPORTS,
        http1_only: bool = False,
        in_order: bool = False,
    ) -> None:
        self.zone = zone
        self.in_order = in_order  # TCP and DoT reply in query order (see _Stream)
        self.host = host
        self.ca = ca
        self.transports = transports
        self.http1_only = http1_only
        self.ports: dict[str, int] = {}
        self.queries = 0
        self.connections = 0
        self.arrivals: list[float] = []  # monotonic arrival times of UDP queries
        self._closers: list[Any] = []
        self._drips: set[asyncio.Task[None]] = set()

    def drip(
        self,
        delay: float,
        data: bytes,
        interval: float,
        write: Callable[[bytes], bool],
        end: Callable[[], object] | None = None,
    ) -> None:
        """Write `data` a byte every `interval` seconds after `delay`, then `end()`; stopped with the lab."""

        async def run() -> None:
            await asyncio.sleep(delay)
            if await _drip(data, interval, write) and end is not None:
                end()

        task = asyncio.get_running_loop().create_task(run())
        self._drips.add(task)
        task.add_done_callback(self._drips.discard)

    async def start(self) -> LabServer:
        loop = asyncio.get_running_loop()
        # UDP and TCP share a port number, as on a real resolver: truncated UDP answers
        # are retried over TCP on the same port.
        for _ in range(20):
            udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(self.host, 0))
            port = udp.get_extra_info("sockname")[1]
            try:
                await self._stream("tcp", lambda: _Stream(self), None, port)
            except OSError:
                udp.close()
                continue
            break
        else:
            raise OSError("no free port for UDP and TCP together")
        self.ports["udp"] = port
        self._closers.append(udp.close)
        if self.ca is not None:
            if "dot" in self.transports:
                await self._stream("dot", lambda: _Stream(self), self.ca.server_context(["dot"]))
            if "doh" in self.transports:
                alpn = ["http/1.1"] if self.http1_only else ["h2", "http/1.1"]
                await self._stream("doh", lambda: _Doh(self), self.ca.server_context(alpn))
            if "doh3" in self.transports:
                h3config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
                h3config.load_cert_chain(str(self.ca.cert_file), str(self.ca.key_file))

                class H3Proto(_H3Server):
                    pass

                H3Proto.lab = self
                h3server = await serve(self.host, 0, configuration=h3config, create_protocol=H3Proto)
                assert h3server._transport is not None
                self.ports["doh3"] = h3server._transport.get_extra_info("sockname")[1]
                self._closers.append(h3server.close)
            if "doq" in self.transports:
                config = QuicConfiguration(is_client=False, alpn_protocols=["doq"])
                config.load_cert_chain(str(self.ca.cert_file), str(self.ca.key_file))
                lab = self

                class Proto(_DoqServer):
                    pass

                Proto.lab = lab
                server = await serve(self.host, 0, configuration=config, create_protocol=Proto)
                assert server._transport is not None
                self.ports["doq"] = server._transport.get_extra_info("sockname")[1]
                self._closers.append(server.close)
        return self

    async def _stream(self, name: str, factory: Any, ctx: ssl.SSLContext | None, port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, self.host, port, ssl=ctx)
        self.ports[name] = server.sockets[0].getsockname()[1]
        self._closers.append(server.close)

    def specs(self) -> dict[str, str]:
        """Resolver specs (docs/cli.md, resolver specs) for each transport the lab is serving."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = {"udp": "udp", "tcp": "tcp", "dot": "tls", "doh": "https", "doh3": "h3", "doq": "quic"}
        out = {}
        for name, port in self.ports.items():
            path = "/dns-query" if name in ("doh", "doh3") else ""
            out[name] = f"{scheme[name]}://{host}:{port}{path}"
        return out

    async def stop(self) -> None:
        for task in list(self._drips):
            task.cancel()
        for close in self._closers:
            close()
        self._closers.clear()


class Service(Protocol):
    """Anything a `LabThread` can run: a lab server, an impairment proxy."""

    async def start(self) -> Any: ...

    async def stop(self) -> None: ...


_S = TypeVar("_S", bound=Service)
_T = TypeVar("_T")


class LabThread:
    """Lab servers (and proxies in front of them) on an event loop of their own thread,
    for callers that are not async."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="blockprobe-lab", daemon=True)
        self._thread.start()
        self.servers: list[Service] = []

    def start(self, server: _S) -> _S:
        asyncio.run_coroutine_threadsafe(server.start(), self.loop).result(timeout=30)
        self.servers.append(server)
        return server

    def call(self, coro: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        """Run a coroutine on the lab's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def stop_server(self, server: Service) -> None:
        """Stop one server or proxy before the others (a test that ends a lab early)."""
        self.call(server.stop())
        self.servers.remove(server)

    def stop(self) -> None:
        async def stop_all() -> None:
            for s in self.servers:
                await s.stop()

        asyncio.run_coroutine_threadsafe(stop_all(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def __enter__(self) -> LabThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
