"""DNS over HTTPS over HTTP/3 (RFC 8484 on RFC 9114): DoQ's QUIC connection handling, HTTP/3 framing.

One QUIC connection per endpoint (ALPN `h3`), one request stream per query, GET with
`?dns=` like DoH over HTTP/2. HTTP status and version are kept as evidence.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamReset

from probe.limits import MAX_DOH_BODY
from probe.transports._errors import error
from probe.transports.base import Exchange, Phase
from probe.transports.doh import doh_exchange
from probe.transports.doq import DoqExchanger, _DoqProtocol, _Query

__all__ = ["Doh3Exchanger"]


class _H3Query(_Query):
    __slots__ = ("ctype", "late", "query", "status")

    def __init__(self, future: asyncio.Future[bytes], query: bytes, stamp: int) -> None:
        super().__init__(future, b"", stamp)
        self.query = query
        self.status = 0
        self.ctype = b""
        self.late: asyncio.Future[bytes] | None = None

    def started(self) -> bool:
        return bool(self.data) or self.status != 0

    def late_done(self) -> None:
        """A late HTTP response: the DNS message, if it is one for our query, completes `late`."""
        if self.late is None or self.late.done():
            return
        ex = doh_exchange(self.status, self.ctype, bytes(self.data), self.query, 0.0, {})
        if ex.response is None:
            self.late.cancel()
        else:
            self.late.set_result(ex.response)


class _H3Protocol(_DoqProtocol):
    def __init__(self, quic: QuicConnection, name: str = "") -> None:
        super().__init__(quic, name)
        self.h3 = H3Connection(quic)

    def quic_event_received(self, event: QuicEvent) -> None:  # noqa: C901 - one branch per QUIC/H3 event type
        if isinstance(event, ConnectionTerminated | StreamReset):
            super().quic_event_received(event)
            return
        for ev in self.h3.handle_event(event):
            if not isinstance(ev, HeadersReceived | DataReceived):
                continue
            q = self.streams.get(ev.stream_id)
            if not isinstance(q, _H3Query):
                continue
            if isinstance(ev, HeadersReceived):
                for k, v in ev.headers:
                    if k == b":status":
                        q.status = int(v)
                    elif k == b"content-type":
                        q.ctype = v
            else:
                q.data += ev.data
                if len(q.data) > MAX_DOH_BODY:
                    self.end_stream(ev.stream_id, error(Phase.HTTP, f"http: body over {MAX_DOH_BODY} bytes"))
                    continue
            if ev.stream_ended:
                del self.streams[ev.stream_id]
                if not q.future.done():
                    if q.status == 200:
                        self.channel.answer(q.stamp)
                    # The HTTP judgement (status, type, the response to our query) is doh_exchange's.
                    q.future.set_result(bytes(q.data))
                    if q.expired:
                        q.late_done()


class Doh3Exchanger(DoqExchanger):
    """GET requests as HTTP/3 streams on one verified QUIC connection."""

    alpn = H3_ALPN[0]
    protocol = _H3Protocol

    def _submit(self, proto: _DoqProtocol, query: bytes) -> int:
        assert isinstance(proto, _H3Protocol)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        proto.reclaim()
        sid = proto._quic.get_next_available_stream_id()
        proto.streams[sid] = _H3Query(fut, query, proto.channel.stamp())
        ep = self.endpoint
        host = f"[{ep.host}]" if ":" in ep.host else ep.host
        authority = (host if ep.port == 443 else f"{host}:{ep.port}").encode()
        dns_param = base64.urlsafe_b64encode(query).rstrip(b"=")
        sep = b"&" if "?" in ep.path else b"?"
        headers = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", authority),
            (b":path", ep.path.encode() + sep + b"dns=" + dns_param),
            (b"accept", b"application/dns-message"),
        ]
        proto.h3.send_headers(sid, headers, end_stream=True)
        proto.transmit_soon()
        return sid

    def _result(
        self, q: _Query, query: bytes, msg: bytes, latency: float, evidence: dict[str, Any]
    ) -> Exchange:
        assert isinstance(q, _H3Query)
        evidence["http_version"] = "HTTP/3"
        evidence["http_status"] = q.status
        return doh_exchange(q.status, q.ctype, msg, query, latency, evidence)
