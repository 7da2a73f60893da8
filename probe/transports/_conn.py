"""The one connection of an endpoint: opened on first use, shared, re-opened when it dies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from probe.transports._errors import Broken, failure_from, timeout
from probe.transports.base import Exchange, Phase

__all__ = ["Opening", "RetryAlone", "SharedConnection"]

C = TypeVar("C")


class Opening:
    """Where a connection attempt stands, so that a query that gives up waiting names the right phase."""

    __slots__ = ("phase",)

    def __init__(self, phase: Phase = Phase.CONNECT) -> None:
        self.phase = phase


class SharedConnection(Generic[C]):
    """Every query of a run shares one live connection; concurrent first uses share one handshake.

    The opening task itself installs the new connection, so no caller can slip in
    between the handshake finishing and the connection being visible and open a second.
    Each caller waits for the handshake only until its own deadline; the handshake
    itself runs until the deadline of the query that started it.
    """

    def __init__(
        self,
        open_: Callable[[float, Opening], Awaitable[C]],
        alive: Callable[[C], bool],
        discard: Callable[[C], None],
    ) -> None:
        self._open = open_
        self._alive = alive
        self._discard = discard
        self.current: C | None = None
        self._opening: asyncio.Future[C] | None = None
        self._state = Opening()
        self.handshakes = 0
        self.private_opens = 0

    async def _open_and_install(self, deadline: float, state: Opening) -> C:
        conn = await self._open(deadline, state)
        old, self.current = self.current, conn
        if old is not None:
            self._discard(old)
        self.handshakes += 1
        return conn

    def live(self) -> C | None:
        """The live connection, when there is one: no coroutine for what nearly every query finds."""
        conn = self.current
        return conn if conn is not None and self._alive(conn) else None

    async def get(self, deadline: float, evidence: dict[str, Any]) -> C:
        """The live connection; the caller that waited for a handshake gets `connect_ms`."""
        conn = self.current
        if conn is not None and self._alive(conn):
            return conn
        if self._opening is None or self._opening.done():
            self._state = Opening()
            self._opening = asyncio.ensure_future(self._open_and_install(deadline, self._state))
        return await self._wait(self._opening, self._state, deadline, evidence)

    async def private(self, deadline: float, evidence: dict[str, Any]) -> C:
        """A connection of its own for one query, outside the shared one; `discard` it after."""
        state = Opening()
        self.private_opens += 1
        opening = asyncio.ensure_future(self._open(deadline, state))
        try:
            return await self._wait(opening, state, deadline, evidence)
        except Broken:
            opening.cancel()  # nobody else waits for a private connection
            raise

    @staticmethod
    async def _wait(
        opening: asyncio.Future[C], state: Opening, deadline: float, evidence: dict[str, Any]
    ) -> C:
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(opening)
        except TimeoutError:
            # This query's own deadline passed during the handshake: it was never sent.
            raise Broken(timeout(state.phase)) from None
        except Exception as exc:  # noqa: BLE001 - any handshake failure is translated into a Failure
            raise Broken(failure_from(exc, state.phase)) from None
        finally:
            evidence["connect_ms"] = round((time.perf_counter() - started) * 1000, 3)

    def discard(self, conn: C) -> None:
        self._discard(conn)

    def take(self) -> C | None:
        """Detach the current connection for closing."""
        conn, self.current = self.current, None
        return conn


class RetryAlone:
    """`exchange` for transports that multiplex queries on one shared connection."""

    options: Any

    async def _once(self, query: bytes, deadline: float, evidence: dict[str, Any], shared: bool) -> Exchange:
        raise NotImplementedError

    async def exchange(self, query: bytes) -> Exchange:
        evidence: dict[str, Any] = {}
        deadline = asyncio.get_running_loop().time() + self.options.timeout
        result = await self._once(query, deadline, evidence, shared=True)
        if result.failure is None or not result.failure.retriable:
            return result
        # The shared connection broke under pipelined queries, and any one of them may
        # have broken it (unbound closes a TCP connection to DROP a name). Retry alone on
        # a connection of its own, within the same deadline, so that one dropped name
        # cannot take the others down.
        evidence["retried"] = result.failure.text
        again = await self._once(query, deadline, evidence, shared=False)
        again.sends += result.sends
        return again
