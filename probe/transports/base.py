"""The one contract every transport implements, and the values it returns."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from probe.specs import Endpoint

__all__ = ["Exchange", "Exchanger", "Failure", "FailureKind", "Loss", "Options", "Phase"]


class FailureKind(StrEnum):
    """The two transport outcomes of docs/measurement.md."""

    TIMEOUT = "timeout"
    ERROR = "error"


class Phase(StrEnum):
    """The operation that failed (OONI's vocabulary). Only a silence in `dns_round_trip` can be a block."""

    CONNECT = "connect"
    TLS_HANDSHAKE = "tls_handshake"
    QUIC_HANDSHAKE = "quic_handshake"
    STREAM_WAIT = "stream_wait"  # waiting for a free HTTP/2 stream: the query was never sent
    DNS_ROUND_TRIP = "dns_round_trip"
    # The response had begun to arrive (headers or bytes of the message) and was incomplete at
    # the deadline: a server answering too slowly, not a silence, so never a block.
    DNS_RESPONSE = "dns_response"
    HTTP = "http"
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class Failure:
    """A transport failure, classified once (STYLE.md 2): what failed, and in which phase.

    `text` is the short error of the measurement; `retriable` says the shared connection
    broke under the query (reset, close, GOAWAY), so a connection of its own may succeed.
    """

    kind: FailureKind
    phase: Phase
    text: str
    retriable: bool = False

    @property
    def silence(self) -> bool:
        """No response although the query was on the wire: the only failure that may be a block."""
        return self.kind is FailureKind.TIMEOUT and self.phase is Phase.DNS_ROUND_TRIP


@dataclass(slots=True)
class Exchange:
    """What one query got: a response's wire, or a failure; and evidence either way.

    `latency_ms` is the time from the last send of the query to its response; it never
    includes connection setup, which is reported as `evidence["connect_ms"]` on the
    query that waited for it. `sends` counts datagrams or stream writes of this query.
    `channel` names the connection (streams) or endpoint (UDP) it waited on, and
    `overtaken` says that, while it waited in silence, that channel answered a query
    sent after this one's last send (docs/measurement.md (c)). `late`, on a silence,
    completes with the response should it still arrive after the deadline (a recursor
    that answers SERVFAIL once its upstream gives up, 8 s later): the engine looks before
    it judges, and a silence that was answered late was no DROP. `settled`, when set,
    completes once a UDP socket has stopped listening for racing answers, which are
    then in `evidence["late"]`.
    """

    response: bytes | None
    failure: Failure | None = None
    latency_ms: float | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    settled: asyncio.Future[None] | None = None
    late: asyncio.Future[bytes] | None = None
    sends: int = 1
    channel: str | None = None
    overtaken: bool = False


@dataclass(slots=True)
class Loss:
    """Datagram loss seen on one endpoint in a run: of the sends of queries that were
    answered in the end, how many went unanswered (docs/measurement.md (d))."""

    sends: int = 0
    lost: int = 0

    def add(self, sends: int) -> None:
        self.sends += sends
        if sends > 1:  # nearly every query is answered at its first send: no call to max() for it
            self.lost += sends - 1

    @property
    def rate(self) -> float:
        """The rule-of-succession estimate (lost+1)/(sends+2): never 0 on little evidence, so a
        handful of lucky sends cannot make a silence look impossible to explain by loss."""
        return (self.lost + 1) / (self.sends + 2)


@dataclass(frozen=True, slots=True)
class Options:
    """Knobs shared by all transports; I/O objects are passed in, never global."""

    timeout: float = 5.0
    ca_file: str | None = None
    udp_linger: float = 0.2
    udp_sockets: int = 4
    udp_queries_per_socket: int = 512
    udp_sends: int = 3  # sends within one timeout: at 0, 1/3 and 2/3 of it
    # A silent query is asked again no sooner than this after its first send: later than
    # recursors give up on an unreachable upstream (Knot Resolver ~8 s, BIND 10 s), so that
    # the second answer is their SERVFAIL, not a second silence that looks like a DROP.
    confirm_after: float = 10.0
    doh_post: bool = False


class Exchanger(Protocol):
    """One endpoint's connection(s); `exchange` sends a query with ID 0 and never raises.

    `witness` is a query this endpoint answered earlier in the run (set by the engine):
    when a query waits in silence and nothing sent after it has been answered, the
    transport sends the witness behind it, so that a live resolver proves itself.
    """

    endpoint: Endpoint
    witness: bytes | None
    # When a silent stream query sends its witness, as a share of its remaining time: late
    # enough that a live resolver has usually answered it (no witness needed), early enough
    # that the witness's own answer arrives in time. The confirmation pass sends it at once.
    witness_after: float

    async def exchange(self, query: bytes) -> Exchange: ...

    async def aclose(self) -> None: ...
