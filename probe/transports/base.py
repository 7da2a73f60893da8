"""The one contract every transport implements, and the values it returns."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

from probe.specs import Endpoint

__all__ = ["Exchange", "Exchanger", "Failure", "Options"]


@dataclass(frozen=True, slots=True)
class Failure:
    """A transport failure, classified once (STYLE.md 2): what failed, and in which phase.

    `kind` is `timeout` or `error`, the two transport outcomes of CONTRACTS.md section 3;
    `phase` is the operation that failed (connect, tls_handshake, quic_handshake,
    dns_round_trip, http); `text` is the short error of the measurement.
    """

    kind: str
    phase: str
    text: str
    retriable: bool = False


@dataclass(slots=True)
class Exchange:
    """What one query got: a response's wire, or a failure; and evidence either way.

    `latency_ms` is the time from sending the query to its first response; it never
    includes connection setup, which is reported as `evidence["connect_ms"]` on the
    query that waited for it. `settled`, when set, completes once a UDP socket has
    stopped listening for racing answers, which are then in `evidence["late"]`.
    """

    response: bytes | None
    failure: Failure | None = None
    latency_ms: float | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    settled: asyncio.Future[None] | None = None


@dataclass(frozen=True, slots=True)
class Options:
    """Knobs shared by all transports; I/O objects are passed in, never global."""

    timeout: float = 5.0
    ca_file: str | None = None
    udp_linger: float = 0.2
    udp_sockets: int = 4
    udp_queries_per_socket: int = 512
    doh_post: bool = False


class Exchanger(Protocol):
    """One endpoint's connection(s); `exchange` sends a query with ID 0 and never raises."""

    endpoint: Endpoint

    async def exchange(self, query: bytes) -> Exchange: ...

    async def aclose(self) -> None: ...
