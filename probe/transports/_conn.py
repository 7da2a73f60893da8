"""The one connection of an endpoint: opened on first use, shared, re-opened when it dies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from probe.transports.base import Exchange

__all__ = ["RetryAlone", "SharedConnection"]

C = TypeVar("C")


class SharedConnection(Generic[C]):
    """Every query of a run shares one live connection; concurrent first uses share one handshake.

    The opening task itself installs the new connection, so no caller can slip in
    between the handshake finishing and the connection being visible and open a second.
    """

    def __init__(
        self,
        open_: Callable[[], Awaitable[C]],
        alive: Callable[[C], bool],
        discard: Callable[[C], None],
    ) -> None:
        self._open = open_
        self._alive = alive
        self._discard = discard
        self.current: C | None = None
        self._opening: asyncio.Future[C] | None = None
        self.handshakes = 0
        self.private_opens = 0

    async def _open_and_install(self) -> C:
        conn = await self._open()
        old, self.current = self.current, conn
        if old is not None:
            self._discard(old)
        self.handshakes += 1
        return conn

    async def get(self, evidence: dict[str, Any]) -> C:
        """The live connection; the caller that waited for a handshake gets `connect_ms`."""
        conn = self.current
        if conn is not None and self._alive(conn):
            return conn
        if self._opening is None or self._opening.done():
            self._opening = asyncio.ensure_future(self._open_and_install())
        started = time.perf_counter()
        try:
            return await asyncio.shield(self._opening)
        finally:
            evidence["connect_ms"] = round((time.perf_counter() - started) * 1000, 3)

    async def private(self, evidence: dict[str, Any]) -> C:
        """A connection of its own for one query, outside the shared one; `discard` it after."""
        started = time.perf_counter()
        try:
            return await self._open()
        finally:
            evidence["connect_ms"] = round((time.perf_counter() - started) * 1000, 3)
            self.private_opens += 1

    def discard(self, conn: C) -> None:
        self._discard(conn)

    def take(self) -> C | None:
        """Detach the current connection for closing."""
        conn, self.current = self.current, None
        return conn


class RetryAlone:
    """`exchange` for transports that multiplex queries on one shared connection."""

    async def _once(self, query: bytes, evidence: dict[str, Any], shared: bool) -> Exchange:
        raise NotImplementedError

    async def exchange(self, query: bytes) -> Exchange:
        evidence: dict[str, Any] = {}
        result = await self._once(query, evidence, shared=True)
        if result.failure is None or not result.failure.retriable:
            return result
        # The shared connection broke under pipelined queries, and any one of them may
        # have broken it (unbound closes a TCP connection to DROP a name). Retry alone on
        # a connection of its own, so that one dropped name cannot take the others down.
        evidence["retried"] = result.failure.text
        return await self._once(query, evidence, shared=False)
