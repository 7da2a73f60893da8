"""DNS over HTTPS (RFC 8484): many streams on one HTTP/2 connection; HTTP/1.1 fallback.

The hot path drives h2 (the HTTP/2 engine inside httpx2) directly on an asyncio
protocol: a full HTTP client per request costs ~2 ms of CPU, more than 50 times
what the exchange itself needs. When the server's ALPN answer is not h2 the
endpoint falls back, for the rest of the run, to httpx2 over HTTP/1.1.
The HTTP status and version of every exchange are kept as evidence.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack

from probe.limits import MAX_DOH_BODY
from probe.specs import Endpoint
from probe.transports._conn import Opening, RetryAlone, SharedConnection
from probe.transports._errors import Broken, error, failure_from, timeout
from probe.transports._wait import Channel, Flights, await_reply, witness_step
from probe.transports.base import Exchange, Failure, Options, Phase
from probe.transports.tcp import close_transport
from probe.transports.tls import client_context
from probe.wire import question_of, reply_problem

__all__ = ["DohExchanger"]

_CT = b"application/dns-message"
_WINDOW = 1 << 24


class _PlainEncoder(hpack.Encoder):
    """HPACK without Huffman coding: pure-Python Huffman of each unique `?dns=` path cost
    more CPU than the rest of the exchange, to save a few bytes on loopback-sized frames."""

    # hpack's signature, kept so a caller passing huffman= still works; the answer is always no.
    def encode(self, headers: Any, huffman: bool = True) -> bytes:  # noqa: ARG002
        return super().encode(headers, huffman=False)


class _Stream:
    __slots__ = ("body", "ctype", "future", "late", "query", "stamp", "status")

    def __init__(self, future: asyncio.Future[None], stamp: int, query: bytes) -> None:
        self.future = future
        self.stamp = stamp
        self.query = query
        self.status = 0
        self.ctype = b""
        self.body = bytearray()
        self.late: asyncio.Future[bytes] | None = None  # set once the query timed out

    def fail(self, failure: Failure) -> None:
        if self.late is not None:
            self.late.cancel()  # nobody awaits a late response: no error to report
        elif not self.future.done():
            self.future.set_exception(Broken(failure))

    def ended(self) -> None:
        if self.late is None:
            if not self.future.done():
                self.future.set_result(None)
        elif not self.late.done():
            ex = doh_exchange(self.status, self.ctype, bytes(self.body), self.query, 0.0, {})
            if ex.response is None:
                self.late.cancel()
            else:
                self.late.set_result(ex.response)


class _H2Conn(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            # We build every request header ourselves; re-checking them costs more CPU than the exchange.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            split_outbound_cookies=False,
            # Of a response we read only :status and content-type; h2 still enforces the framing.
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config)
        self.h2.encoder = _PlainEncoder()
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.dead: Broken | None = None
        self.waiters: list[asyncio.Future[None]] = []
        self.lost = asyncio.get_running_loop().create_future()
        self.channel = Channel(name)
        self._flush_handle: asyncio.Handle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def start(self, transport: asyncio.Transport) -> None:
        """TLS is up with ALPN h2: send the connection preface."""
        self.transport = transport
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_WINDOW)
        transport.write(self.h2.data_to_send())

    def flush_soon(self) -> None:
        # Coalesce the frames of every request issued in this loop iteration into one write.
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def reclaim(self) -> bool:
        """Give up listening late on the oldest timed-out stream, so a new query gets its slot."""
        for sid, st in self.streams.items():
            if st.late is not None:
                self._end(sid, timeout())
                return True
        return False

    def can_open(self) -> bool:
        # Our own count: h2's open_outbound_streams walks every stream on each call.
        return len(self.streams) < self.h2.remote_settings.max_concurrent_streams

    def _wake(self) -> None:
        while self.waiters and (self.dead is not None or self.can_open()):
            w = self.waiters.pop(0)
            if not w.done():
                w.set_result(None)

    def data_received(self, data: bytes) -> None:  # noqa: C901 - one branch per h2 event type
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._kill(error(Phase.HTTP, f"http2: protocol error: {exc}"))
            return
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    for k, v in ev.headers:
                        if k == b":status":
                            st.status = int(v)
                        elif k == b"content-type":
                            st.ctype = v
            elif isinstance(ev, h2.events.DataReceived):
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.body += ev.data
                    if len(st.body) > MAX_DOH_BODY:
                        # No DNS message is longer: a server streaming more is not answering DNS.
                        self._end(ev.stream_id, error(Phase.HTTP, f"http: body over {MAX_DOH_BODY} bytes"))
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                st = self.streams.pop(ev.stream_id, None)
                if st is not None:
                    if st.status == 200:
                        self.channel.answer(st.stamp)
                    st.ended()
            elif isinstance(ev, h2.events.StreamReset):
                st = self.streams.pop(ev.stream_id, None)
                if st is not None:
                    st.fail(error(Phase.HTTP, f"http2: stream reset ({ev.error_code!s})", True))
            elif isinstance(ev, h2.events.ConnectionTerminated):
                last = ev.last_stream_id or 0
                self.dead = Broken(error(Phase.HTTP, "http2: connection closed by server (GOAWAY)", True))
                for sid, st in list(self.streams.items()):
                    if sid > last:
                        st.fail(self.dead.failure)
                        del self.streams[sid]
        self._wake()
        self.flush_soon()

    def _end(self, sid: int, failure: Failure) -> None:
        """Give up one stream: reset it, fail its query, and free its slot for a waiting one."""
        st = self.streams.pop(sid, None)
        if st is not None:
            st.fail(failure)
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.reset_stream(sid)
        self.flush_soon()
        self._wake()

    def _kill(self, failure: Failure) -> None:
        self.dead = Broken(failure)
        for st in self.streams.values():
            st.fail(failure)
        self.streams.clear()
        self._wake()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self._kill(failure_from(exc or EOFError(), Phase.HTTP))


class DohExchanger(RetryAlone):
    """GET (or POST) requests as HTTP/2 streams on one verified TLS connection."""

    alpn = ("h2", "http/1.1")

    def __init__(self, endpoint: Endpoint, options: Options) -> None:
        self.endpoint = endpoint
        self.options = options
        self.witness: bytes | None = None
        self.witness_after = 0.25
        self._shared: SharedConnection[_H2Conn | None] = SharedConnection(
            self._open, lambda c: c is None or c.dead is None, _abort_h2
        )
        self._http1: Any = None  # an httpx2.AsyncClient once the server refused h2
        port = "" if endpoint.port == 443 else f":{endpoint.port}"
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        self._authority = (host + port).encode()
        self._path = endpoint.path.encode()
        self._conns = 0
        self._witnesses = Flights()

    async def _open(self, deadline: float, state: Opening) -> _H2Conn | None:
        loop = asyncio.get_running_loop()
        self._conns += 1
        name = f"{self.endpoint}#{self._conns}"
        async with asyncio.timeout_at(deadline):
            state.phase = Phase.CONNECT
            transport, conn = await loop.create_connection(
                lambda: _H2Conn(name), self.endpoint.connect_host, self.endpoint.port
            )
            state.phase = Phase.TLS_HANDSHAKE
            try:
                tls = await loop.start_tls(
                    transport,
                    conn,
                    client_context(self.options.ca_file, self.alpn),
                    server_hostname=self.endpoint.host,
                )
            except BaseException:
                transport.abort()
                raise
        assert tls is not None
        ssl_obj = tls.get_extra_info("ssl_object")
        if ssl_obj is None or ssl_obj.selected_alpn_protocol() != "h2":
            tls.abort()  # the server wants HTTP/1.1: httpx2 takes over for this endpoint
            return None
        conn.start(tls)
        return conn

    @property
    def handshakes(self) -> int:
        return self._shared.handshakes

    async def _once(self, query: bytes, deadline: float, evidence: dict[str, Any], shared: bool) -> Exchange:
        if self._http1 is not None:
            return await self._exchange_http1(query, deadline, evidence)
        try:
            if shared:
                conn = self._shared.live() or await self._shared.get(deadline, evidence)
            else:
                conn = await self._shared.private(deadline, evidence)
        except Broken as exc:
            return Exchange(None, exc.failure, evidence=evidence, sends=0)
        if conn is None:
            if self._http1 is None:  # concurrent queries all learn it at once; one client
                self._start_http1()
            return await self._exchange_http1(query, deadline, evidence)
        try:
            return await self._exchange_h2(conn, query, deadline, evidence, witness=True)
        finally:
            if not shared:
                self._shared.discard(conn)

    async def _exchange_h2(
        self, conn: _H2Conn, query: bytes, deadline: float, evidence: dict[str, Any], witness: bool
    ) -> Exchange:
        loop = asyncio.get_running_loop()
        # The deadline's timer is armed only for a query that has to wait for a stream.
        if not conn.can_open() and conn.dead is None and not conn.reclaim():
            try:
                async with asyncio.timeout_at(deadline):
                    while True:
                        waiter: asyncio.Future[None] = loop.create_future()
                        conn.waiters.append(waiter)
                        await waiter
                        if conn.can_open() or conn.dead is not None or conn.reclaim():
                            break
            except TimeoutError:
                return Exchange(None, timeout(Phase.STREAM_WAIT), evidence=evidence, sends=0)
        if conn.dead is not None:
            return Exchange(None, conn.dead.failure, evidence=evidence, sends=0)
        sid, st = self._submit(conn, query)
        sent = time.perf_counter()
        try:
            await await_reply(
                st.future,
                deadline,
                witness_step(
                    deadline, self.witness_after, partial(self._send_witness, conn, st.stamp, deadline)
                )
                if witness
                else (),
            )
        except Broken as exc:
            return Exchange(None, exc.failure, evidence=evidence, channel=conn.channel.name)
        except TimeoutError:
            if st.status or st.body:
                # The server was answering, only too slowly: no silence, so never a block.
                conn._end(sid, timeout())
                return Exchange(
                    None, timeout(Phase.DNS_RESPONSE), evidence=evidence, channel=conn.channel.name
                )
            overtaken = conn.channel.overtook(st.stamp)
            if conn.waiters:
                conn._end(sid, timeout())  # queries wait for this slot: it is theirs now
            else:
                # Keep the stream: a response after the deadline is evidence too. Its slot
                # goes back as soon as a new query needs one (reclaim).
                st.late = loop.create_future()
            return Exchange(
                None,
                timeout(),
                evidence=evidence,
                channel=conn.channel.name,
                overtaken=overtaken,
                late=st.late,
            )
        latency = (time.perf_counter() - sent) * 1000
        evidence["http_version"] = "HTTP/2"
        evidence["http_status"] = st.status
        result = doh_exchange(st.status, st.ctype, bytes(st.body), query, latency, evidence)
        result.channel = conn.channel.name
        return result

    def _submit(self, conn: _H2Conn, query: bytes) -> tuple[int, _Stream]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        st = _Stream(fut, conn.channel.stamp(), query)
        sid = conn.h2.get_next_available_stream_id()
        conn.streams[sid] = st
        if self.options.doh_post:
            headers = [
                (b":method", b"POST"),
                (b":scheme", b"https"),
                (b":authority", self._authority),
                (b":path", self._path),
                (b"accept", _CT),
                (b"content-type", _CT),
                (b"content-length", str(len(query)).encode()),
            ]
            conn.h2.send_headers(sid, headers)
            conn.h2.send_data(sid, query, end_stream=True)
        else:
            dns_param = base64.urlsafe_b64encode(query).rstrip(b"=")
            sep = b"&" if b"?" in self._path else b"?"
            headers = [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", self._authority),
                # Unique per query: never indexed, so it does not churn the HPACK table.
                hpack.NeverIndexedHeaderTuple(b":path", self._path + sep + b"dns=" + dns_param),
                (b"accept", _CT),
            ]
            conn.h2.send_headers(sid, headers, end_stream=True)
        conn.flush_soon()
        return sid, st

    def _send_witness(self, conn: _H2Conn, stamp: int, deadline: float) -> None:
        if self.witness is None or conn.dead is not None or not conn.channel.needs_witness(stamp):
            return
        # With every stream taken the witness waits for one like any query (reclaiming a
        # stream kept for a late answer first): the queries already waiting may all be silent
        # ones, as in the confirmation pass, and skipping it left them unproven.
        conn.channel.witnessed = conn.channel.sent + 1
        self._witnesses.start(self._exchange_h2(conn, self.witness, deadline, {}, witness=False))

    def _start_http1(self) -> None:
        import httpx2

        self._http1 = httpx2.AsyncClient(
            verify=client_context(self.options.ca_file, ("http/1.1",)),
            http1=True,
            http2=False,
            timeout=self.options.timeout,
        )

    async def _exchange_http1(self, query: bytes, deadline: float, evidence: dict[str, Any]) -> Exchange:
        host = self.endpoint.connect_host
        host = f"[{host}]" if ":" in host else host
        url = f"https://{host}:{self.endpoint.port}{self.endpoint.path}"
        headers = {"accept": "application/dns-message", "host": self._authority.decode()}
        extensions = {"sni_hostname": self.endpoint.host}
        sent = time.perf_counter()
        if self.options.doh_post:
            headers["content-type"] = "application/dns-message"
            request = self._http1.build_request(
                "POST", url, content=query, headers=headers, extensions=extensions
            )
        else:
            dns_param = base64.urlsafe_b64encode(query).rstrip(b"=").decode()
            request = self._http1.build_request(
                "GET", url, params={"dns": dns_param}, headers=headers, extensions=extensions
            )
        # One deadline for the whole exchange: httpx2's own timeouts are per read, so a
        # server that drips its body a byte at a time would never trip them.
        body = bytearray()
        resp = None
        try:
            async with asyncio.timeout_at(deadline):
                resp = await self._http1.send(request, stream=True)
                try:
                    async for chunk in resp.aiter_raw():
                        body += chunk
                        if len(body) > MAX_DOH_BODY:
                            failure = error(Phase.HTTP, f"http: body over {MAX_DOH_BODY} bytes")
                            return Exchange(None, failure, evidence=evidence)
                finally:
                    await resp.aclose()
        except TimeoutError:
            # HTTP/1.1 answers one request at a time per connection: nothing can overtake it,
            # so this silence is never proven (docs/measurement.md (c)).
            phase = Phase.HTTP if resp is None else Phase.DNS_ROUND_TRIP
            return Exchange(None, timeout(phase), evidence=evidence)
        except Exception as exc:  # noqa: BLE001 - an exchanger never raises: every failure is classified
            return Exchange(None, failure_from(exc, Phase.HTTP), evidence=evidence)
        assert resp is not None
        latency = (time.perf_counter() - sent) * 1000
        evidence["http_version"] = resp.http_version
        evidence["http_status"] = resp.status_code
        ctype = resp.headers.get("content-type", "").encode("latin-1")
        return doh_exchange(resp.status_code, ctype, bytes(body), query, latency, evidence)

    async def aclose(self) -> None:
        self._witnesses.cancel()
        conn = self._shared.take()
        if conn is not None and conn.transport is not None:
            await close_transport(conn.transport, conn.lost)
        if self._http1 is not None:
            await self._http1.aclose()
            await asyncio.sleep(0)  # let the transport run its connection_lost before the loop ends


def _abort_h2(conn: _H2Conn | None) -> None:
    if conn is not None and conn.transport is not None:
        conn.transport.abort()


def doh_exchange(
    status: int, ctype: bytes, body: bytes, query: bytes, latency: float, evidence: dict[str, Any]
) -> Exchange:
    """A DoH response over any HTTP version: 200, application/dns-message, and the response to our query."""
    if status != 200:
        return Exchange(None, error(Phase.HTTP, f"http: status {status}"), latency, evidence)
    if ctype.split(b";")[0].strip().lower() != _CT:
        text = ctype.decode("latin-1") or "none"
        return Exchange(None, error(Phase.HTTP, f"http: content-type {text}"), latency, evidence)
    problem = reply_problem(body, (query[0] << 8) | query[1], question_of(query))
    if problem is not None:
        return Exchange(None, error(Phase.DNS_ROUND_TRIP, f"not the response: {problem}"), latency, evidence)
    return Exchange(body, None, latency, evidence)
