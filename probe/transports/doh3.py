"""DNS over HTTPS over HTTP/3 (RFC 8484 on RFC 9114): DoQ's QUIC connection handling, HTTP/3 framing.

One QUIC connection per endpoint (ALPN `h3`), one request stream per query, GET with
`?dns=` like DoH over HTTP/2. HTTP status and version are kept as evidence.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamReset

from probe.transports._errors import expire, timeout
from probe.transports.base import Exchange, Failure
from probe.transports.doh import judge_http
from probe.transports.doq import DoqExchanger, _Broken, _DoqProtocol

__all__ = ["Doh3Exchanger"]


class _H3Response:
    __slots__ = ("body", "ctype", "future", "status")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.status = 0
        self.ctype = b""
        self.body = bytearray()


class _H3Protocol(_DoqProtocol):
    def __init__(self, quic: QuicConnection) -> None:
        super().__init__(quic)
        self.h3 = H3Connection(quic)
        self.responses: dict[int, _H3Response] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated | StreamReset):
            super().quic_event_received(event)
            failure = self.dead or Failure("error", "http", "http3: stream reset", True)
            ids = list(self.responses) if isinstance(event, ConnectionTerminated) else [event.stream_id]
            for sid in ids:
                r = self.responses.pop(sid, None)
                if r is not None and not r.future.done():
                    r.future.set_exception(_Broken(failure))
            return
        for ev in self.h3.handle_event(event):
            if not isinstance(ev, HeadersReceived | DataReceived):
                continue
            r = self.responses.get(ev.stream_id)
            if r is None:
                continue
            if isinstance(ev, HeadersReceived):
                for k, v in ev.headers:
                    if k == b":status":
                        r.status = int(v)
                    elif k == b"content-type":
                        r.ctype = v
            else:
                r.body += ev.data
            if ev.stream_ended:
                del self.responses[ev.stream_id]
                if not r.future.done():
                    r.future.set_result(None)


class Doh3Exchanger(DoqExchanger):
    """GET requests as HTTP/3 streams on one verified QUIC connection."""

    alpn = H3_ALPN[0]
    protocol = _H3Protocol

    async def _send(self, proto: _DoqProtocol, query: bytes, evidence: dict[str, Any]) -> Exchange:
        assert isinstance(proto, _H3Protocol)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        sid = proto._quic.get_next_available_stream_id()
        r = _H3Response(fut)
        proto.responses[sid] = r
        ep = self.endpoint
        host = f"[{ep.host}]" if ":" in ep.host else ep.host
        authority = (host if ep.port == 443 else f"{host}:{ep.port}").encode()
        dns_param = base64.urlsafe_b64encode(query).rstrip(b"=")
        sep = b"&" if "?" in ep.path else b"?"
        headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority),
                   (b":path", ep.path.encode() + sep + b"dns=" + dns_param),
                   (b"accept", b"application/dns-message")]  # fmt: skip
        proto.h3.send_headers(sid, headers, end_stream=True)
        proto.transmit_soon()
        sent = time.perf_counter()
        timer = loop.call_later(self.options.timeout, expire, fut)
        try:
            await fut
        except _Broken as exc:
            return Exchange(None, exc.failure, evidence=evidence)
        except TimeoutError:
            proto.responses.pop(sid, None)
            return Exchange(None, timeout(), evidence=evidence)
        finally:
            timer.cancel()
        latency = (time.perf_counter() - sent) * 1000
        evidence["http_version"] = "HTTP/3"
        evidence["http_status"] = r.status
        return judge_http(r.status, r.ctype, bytes(r.body), query, latency, evidence)
