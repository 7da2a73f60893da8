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
import time
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack

from probe.specs import Endpoint
from probe.transports._conn import RetryAlone, SharedConnection
from probe.transports._errors import expire, failure_from, timeout
from probe.transports.base import Exchange, Failure, Options
from probe.transports.tcp import close_transport
from probe.transports.tls import client_context
from probe.wire import question_of

__all__ = ["DohExchanger"]

_CT = b"application/dns-message"
_WINDOW = 1 << 24


class _Broken(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.text)
        self.failure = failure


class _PlainEncoder(hpack.Encoder):
    """HPACK without Huffman coding: pure-Python Huffman of each unique `?dns=` path cost
    more CPU than the rest of the exchange, to save a few bytes on loopback-sized frames."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


class _Stream:
    __slots__ = ("body", "ctype", "future", "status")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.status = 0
        self.ctype = b""
        self.body = bytearray()


class _H2Conn(asyncio.Protocol):
    def __init__(self) -> None:
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
        self.dead: Failure | None = None
        self.waiters: list[asyncio.Future[None]] = []
        self.lost = asyncio.get_running_loop().create_future()
        self._flush_handle: asyncio.Handle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        ssl_obj = transport.get_extra_info("ssl_object")
        if ssl_obj is None or ssl_obj.selected_alpn_protocol() != "h2":
            return  # no preface: the exchanger hands this endpoint to HTTP/1.1
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

    def can_open(self) -> bool:
        # Our own count: h2's open_outbound_streams walks every stream on each call.
        return len(self.streams) < self.h2.remote_settings.max_concurrent_streams

    def _wake(self) -> None:
        while self.waiters and (self.dead is not None or self.can_open()):
            w = self.waiters.pop(0)
            if not w.done():
                w.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._kill(Failure("error", "http", f"http2: protocol error: {exc}"))
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
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                st = self.streams.pop(ev.stream_id, None)
                if st is not None and not st.future.done():
                    st.future.set_result(None)
            elif isinstance(ev, h2.events.StreamReset):
                st = self.streams.pop(ev.stream_id, None)
                if st is not None and not st.future.done():
                    st.future.set_exception(
                        _Broken(Failure("error", "http", f"http2: stream reset ({ev.error_code!s})", True))
                    )
            elif isinstance(ev, h2.events.ConnectionTerminated):
                last = ev.last_stream_id or 0
                self.dead = Failure("error", "http", "http2: connection closed by server (GOAWAY)", True)
                for sid, st in list(self.streams.items()):
                    if sid > last and not st.future.done():
                        st.future.set_exception(_Broken(self.dead))
                        del self.streams[sid]
        self._wake()
        self.flush_soon()

    def _kill(self, failure: Failure) -> None:
        self.dead = failure
        for st in self.streams.values():
            if not st.future.done():
                st.future.set_exception(_Broken(failure))
        self.streams.clear()
        self._wake()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self._kill(failure_from(exc or EOFError(), "http"))


class DohExchanger(RetryAlone):
    """GET (or POST) requests as HTTP/2 streams on one verified TLS connection."""

    alpn = ("h2", "http/1.1")

    def __init__(self, endpoint: Endpoint, options: Options) -> None:
        self.endpoint = endpoint
        self.options = options
        self._shared: SharedConnection[_H2Conn | None] = SharedConnection(
            self._open, lambda c: c is None or c.dead is None, _abort_h2
        )
        self._http1: Any = None  # an httpx2.AsyncClient once the server refused h2
        port = "" if endpoint.port == 443 else f":{endpoint.port}"
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        self._authority = (host + port).encode()
        self._path = endpoint.path.encode()

    async def _open(self) -> _H2Conn | None:
        loop = asyncio.get_running_loop()
        transport, conn = await asyncio.wait_for(
            loop.create_connection(
                _H2Conn,
                self.endpoint.connect_host,
                self.endpoint.port,
                ssl=client_context(self.options.ca_file, self.alpn),
                server_hostname=self.endpoint.host,
            ),
            self.options.timeout,
        )
        ssl_obj = transport.get_extra_info("ssl_object")
        if ssl_obj is None or ssl_obj.selected_alpn_protocol() != "h2":
            transport.abort()  # the server wants HTTP/1.1: httpx2 takes over for this endpoint
            return None
        return conn

    @property
    def handshakes(self) -> int:
        return self._shared.handshakes

    async def _once(self, query: bytes, evidence: dict[str, Any], shared: bool) -> Exchange:
        if self._http1 is not None:
            return await self._exchange_http1(query, evidence)
        try:
            conn = await (self._shared.get(evidence) if shared else self._shared.private(evidence))
        except Exception as exc:  # translated at the edge, once
            phase = "connect" if isinstance(exc, OSError) and not _is_ssl(exc) else "tls_handshake"
            return Exchange(None, failure_from(exc, phase), evidence=evidence)
        if conn is None:
            if self._http1 is None:  # concurrent queries all learn it at once; one client
                self._start_http1()
            return await self._exchange_http1(query, evidence)
        try:
            return await self._exchange_h2(conn, query, evidence)
        finally:
            if not shared:
                self._shared.discard(conn)

    async def _exchange_h2(self, conn: _H2Conn, query: bytes, evidence: dict[str, Any]) -> Exchange:
        loop = asyncio.get_running_loop()
        while not conn.can_open() and conn.dead is None:
            waiter: asyncio.Future[None] = loop.create_future()
            conn.waiters.append(waiter)
            await waiter
        if conn.dead is not None:
            return Exchange(None, conn.dead, evidence=evidence)
        fut: asyncio.Future[None] = loop.create_future()
        st = _Stream(fut)
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
        sent = time.perf_counter()
        timer = loop.call_later(self.options.timeout, expire, fut)
        try:
            await fut
        except _Broken as exc:
            return Exchange(None, exc.failure, evidence=evidence)
        except TimeoutError:
            conn.streams.pop(sid, None)
            try:
                conn.h2.reset_stream(sid)
                conn.flush_soon()
            except h2.exceptions.H2Error:
                pass
            return Exchange(None, timeout(), evidence=evidence)
        finally:
            timer.cancel()
        latency = (time.perf_counter() - sent) * 1000
        evidence["http_version"] = "HTTP/2"
        evidence["http_status"] = st.status
        return judge_http(st.status, st.ctype, bytes(st.body), query, latency, evidence)

    def _start_http1(self) -> None:
        import httpx2

        self._http1 = httpx2.AsyncClient(
            verify=client_context(self.options.ca_file, ("http/1.1",)),
            http1=True,
            http2=False,
            timeout=self.options.timeout,
        )

    async def _exchange_http1(self, query: bytes, evidence: dict[str, Any]) -> Exchange:
        host = self.endpoint.connect_host
        host = f"[{host}]" if ":" in host else host
        url = f"https://{host}:{self.endpoint.port}{self.endpoint.path}"
        headers = {"accept": "application/dns-message", "host": self._authority.decode()}
        extensions = {"sni_hostname": self.endpoint.host}
        sent = time.perf_counter()
        try:
            if self.options.doh_post:
                headers["content-type"] = "application/dns-message"
                resp = await self._http1.post(url, content=query, headers=headers, extensions=extensions)
            else:
                dns_param = base64.urlsafe_b64encode(query).rstrip(b"=").decode()
                resp = await self._http1.get(
                    url, params={"dns": dns_param}, headers=headers, extensions=extensions
                )
        except Exception as exc:
            if type(exc).__name__.endswith("Timeout") or isinstance(exc, TimeoutError):
                return Exchange(None, timeout(), evidence=evidence)
            return Exchange(None, failure_from(exc, "http"), evidence=evidence)
        latency = (time.perf_counter() - sent) * 1000
        evidence["http_version"] = resp.http_version
        evidence["http_status"] = resp.status_code
        ctype = resp.headers.get("content-type", "").encode("latin-1")
        return judge_http(resp.status_code, ctype, resp.content, query, latency, evidence)

    async def aclose(self) -> None:
        conn = self._shared.take()
        if conn is not None and conn.transport is not None:
            await close_transport(conn.transport, conn.lost)
        if self._http1 is not None:
            await self._http1.aclose()
            await asyncio.sleep(0)  # let the transport run its connection_lost before the loop ends


def _abort_h2(conn: _H2Conn | None) -> None:
    if conn is not None and conn.transport is not None:
        conn.transport.abort()


def _is_ssl(exc: BaseException) -> bool:
    import ssl

    return isinstance(exc, ssl.SSLError)


def judge_http(
    status: int, ctype: bytes, body: bytes, query: bytes, latency: float, evidence: dict[str, Any]
) -> Exchange:
    """A DoH response over any HTTP version: 200, application/dns-message, and our question."""
    if status != 200:
        return Exchange(None, Failure("error", "http", f"http: status {status}"), latency, evidence)
    if ctype.split(b";")[0].strip().lower() != _CT:
        text = ctype.decode("latin-1") or "none"
        return Exchange(None, Failure("error", "http", f"http: content-type {text}"), latency, evidence)
    q = question_of(query)
    if len(body) < 12 or body[12 : 12 + len(q)].lower() != q.lower():
        return Exchange(None, Failure("error", "dns_round_trip", "mismatched response"), latency, evidence)
    return Exchange(body, None, latency, evidence)
