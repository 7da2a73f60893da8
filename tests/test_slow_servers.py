"""A slow or hostile server cannot hold a probe: one deadline per attempt covers the wait for a
free stream, the request and the whole body, and a body is at most 65,535 bytes (docs/measurement.md). The DoH server here speaks real HTTP/2 (h2) over real TLS on loopback; the lab
(probe/lab.py) drips and oversizes its replies on every other transport.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
import urllib.parse
from collections.abc import Iterator

import dns.message
import dns.opcode
import dns.rrset
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest

from probe.catalogue import resolve_spec
from probe.lab import Behaviour, LabCA, LabServer, LabThread, Zone
from probe.model import Outcome
from probe.transports import Options
from probe.wire import reply_problem

from .conftest import measure, start_lab

HOST = "127.53.1.7"
D = "blockprobe-lab.net"


def _answer(wire: bytes) -> bytes:
    q = dns.message.from_wire(wire)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "93.184.216.34"))
    return r.to_wire()


class _H2(asyncio.Protocol):
    """HTTP/2 DoH whose behaviour depends on the first label: drip, big, drop or answer."""

    def __init__(self, max_streams: int) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.max_streams = max_streams
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # a stream server's: it can write and abort
        self.transport = transport
        self.conn.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams}
        )
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.close()  # e.g. a stream beyond our limit, opened before our SETTINGS arrived
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                path = dict(ev.headers)[b":path"].decode()
                param = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)["dns"][0]
                wire = base64.urlsafe_b64decode(param + "=" * (-len(param) % 4))
                label = str(dns.message.from_wire(wire).question[0].name).split(".")[0]
                task = asyncio.ensure_future(self._respond(ev.stream_id, label, wire))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        self.transport.write(self.conn.data_to_send())

    async def _respond(self, sid: int, label: str, wire: bytes) -> None:
        # The client resets streams it gave up on; a server must take that in its stride.
        with contextlib.suppress(h2.exceptions.H2Error, KeyError):
            await self._respond_unsafe(sid, label, wire)

    async def _respond_unsafe(self, sid: int, label: str, wire: bytes) -> None:
        if label == "drop":
            return
        body = _answer(wire)
        if label == "big":
            body = body + bytes(200_000)  # a DNS message is never this long
        self.conn.send_headers(
            sid, [(":status", "200"), ("content-type", "application/dns-message")], end_stream=False
        )
        if label == "drip":
            for b in body:  # one byte every 0.3 s: httpx-style per-read timeouts never trip
                self.conn.send_data(sid, bytes([b]))
                self.transport.write(self.conn.data_to_send())
                await asyncio.sleep(0.3)
            self.conn.end_stream(sid)
        else:
            for i in range(0, len(body), 16384):
                self.conn.send_data(sid, body[i : i + 16384], end_stream=i + 16384 >= len(body))
        self.transport.write(self.conn.data_to_send())


class Server:
    def __init__(self, ca: LabCA, max_streams: int = 100) -> None:
        self.loop = asyncio.new_event_loop()
        self.ca = ca
        self.max_streams = max_streams
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def _protocol(self) -> _H2:
        proto = _H2(self.max_streams)
        self.protocols.append(proto)
        return proto

    def start(self) -> str:
        self.protocols: list[_H2] = []
        self.thread.start()
        ctx = self.ca.server_context(["h2"])
        self.server = asyncio.run_coroutine_threadsafe(
            self.loop.create_server(self._protocol, HOST, 0, ssl=ctx), self.loop
        ).result(5)
        port = self.server.sockets[0].getsockname()[1]
        return f"https://{HOST}:{port}/dns-query"

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            for proto in self.protocols:  # Python 3.11 has no Server.close_clients()
                for task in proto.tasks:
                    task.cancel()
                proto.transport.abort()
            await asyncio.sleep(0.05)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def doh(lab_ca: LabCA, request: pytest.FixtureRequest) -> Iterator[str]:
    server = Server(lab_ca, getattr(request, "param", 100))
    yield server.start()
    server.stop()


def test_a_dripping_body_ends_at_the_deadline(doh: str, lab_ca: LabCA) -> None:
    started = time.monotonic()
    ms = measure([f"drip.{D}"], [resolve_spec(doh)], ca=lab_ca, timeout=1.0)
    elapsed = time.monotonic() - started
    assert (ms[0].outcome, ms[0].blocked) == (Outcome.TIMEOUT, None)
    assert elapsed < 2 * 1.0 + 1.5, elapsed  # two attempts of one deadline each, whatever the server does


def test_a_body_longer_than_any_dns_message_is_refused(doh: str, lab_ca: LabCA) -> None:
    ms = measure([f"big.{D}"], [resolve_spec(doh)], ca=lab_ca, timeout=2.0)
    assert (ms[0].outcome, ms[0].error) == (Outcome.ERROR, "http: body over 65535 bytes")


@pytest.mark.parametrize("doh", [1], indirect=True)
def test_waiting_for_a_free_stream_is_bounded_and_never_a_block(doh: str, lab_ca: LabCA) -> None:
    # One stream at a time: the dropped name holds it, so the others wait for a slot. When
    # its stream times out the slot is freed and the next query goes; none may hang.
    started = time.monotonic()
    ms = measure([f"drop.{D}", f"a.{D}", f"b.{D}"], [resolve_spec(doh)], ca=lab_ca, timeout=1.0)
    elapsed = time.monotonic() - started
    assert elapsed < 2 * 1.0 + 1.5, elapsed
    assert not [m for m in ms if m.blocked], [(m.domain, m.outcome, m.error) for m in ms]
    drop = next(m for m in ms if m.domain == f"drop.{D}")
    # This server closes a connection that opens a stream before its SETTINGS arrive, so the
    # confirmation pass may end in a closed connection instead of a silence: never a block.
    assert drop.outcome in (Outcome.TIMEOUT, Outcome.ERROR)
    assert drop.blocked is None


def test_reply_rules_of_the_contract() -> None:
    q = dns.message.make_query(f"x.{D}", "A", id=4660)
    wire = q.to_wire()
    qname = q.question[0].name.to_wire()
    assert qname is not None  # no file given: the bytes are returned
    question = wire[12 : 12 + len(qname) + 4]
    r = dns.message.make_response(q)
    assert reply_problem(r.to_wire(), 4660, question) is None
    assert reply_problem(wire, 4660, question) == "not a response (QR=0)"
    assert reply_problem(r.to_wire(), 0, question) == "wrong message ID"  # DoQ: the ID must be 0
    r.set_opcode(dns.opcode.NOTIFY)
    assert reply_problem(r.to_wire(), 4660, question) == "opcode 4, not QUERY"
    upper = dns.message.make_response(dns.message.make_query(f"X.{D.upper()}", "A", id=4660))
    assert reply_problem(upper.to_wire(), 4660, question) is None  # names compare case-insensitively
    other = dns.message.make_response(dns.message.make_query(f"x.{D}", "AAAA", id=4660))
    assert reply_problem(other.to_wire(), 4660, question) == "question does not match"


def test_options_default_to_three_udp_sends() -> None:
    assert Options().udp_sends == 3


REAL = {"A": ("93.184.216.34",)}
DRIP = 0.3  # seconds between bytes: under any per-read timeout, so only a whole-exchange deadline ends it


@pytest.fixture(scope="module")
def slow_labs(lab_thread: LabThread, lab_ca: LabCA) -> dict[str, str]:
    """Specs of lab endpoints that drip or oversize: every transport, and DoH over HTTP/1.1."""
    zone = Zone()
    zone.set(f"drip.{D}", Behaviour(action="drip", records=REAL, drip_interval=DRIP))
    zone.set(f"big.{D}", Behaviour(action="oversize", records=REAL))
    lab: LabServer = start_lab(lab_thread, zone, HOST, lab_ca, transports=("dot", "doh", "doh3", "doq"))
    http1: LabServer = start_lab(lab_thread, zone, HOST, lab_ca, transports=("doh",), http1_only=True)
    return {**lab.specs(), "doh-http1": http1.specs()["doh"]}


@pytest.mark.parametrize("transport", ["tcp", "dot", "doh", "doh-http1", "doh3", "doq"])
def test_a_dripping_reply_ends_at_the_deadline_on_every_stream(
    transport: str, slow_labs: dict[str, str], lab_ca: LabCA
) -> None:
    started = time.monotonic()
    ms = measure([f"drip.{D}"], [resolve_spec(slow_labs[transport])], ca=lab_ca, timeout=1.0)
    elapsed = time.monotonic() - started
    assert (ms[0].outcome, ms[0].blocked) == (Outcome.TIMEOUT, None), ms[0].to_json()
    assert elapsed < 2 * 1.0 + 1.5, elapsed  # two attempts of one deadline each, whatever the server does
    if transport in ("doh", "doh3", "doq"):
        # Bytes of the response arrived on its own stream: a slow answer, never a silence
        # (another stream answered meanwhile would otherwise make it a proven block).
        assert ms[0].evidence["phase"] == "dns_response", ms[0].to_json()


@pytest.mark.parametrize(
    ("transport", "error"),
    [
        ("doh", "http: body over 65535 bytes"),
        ("doh-http1", "http: body over 65535 bytes"),
        ("doh3", "http: body over 65535 bytes"),
        ("doq", "quic: response over 65535 bytes"),
    ],
)
def test_a_reply_longer_than_any_dns_message_is_refused_on_every_transport(
    transport: str, error: str, slow_labs: dict[str, str], lab_ca: LabCA
) -> None:
    """TCP and DoT frame a message with a 2-byte length: there, no reply can be longer."""
    ms = measure([f"big.{D}"], [resolve_spec(slow_labs[transport])], ca=lab_ca, timeout=2.0)
    assert (ms[0].outcome, ms[0].blocked, ms[0].error) == (Outcome.ERROR, None, error), ms[0].to_json()
