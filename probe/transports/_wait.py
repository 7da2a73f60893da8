"""The one way every transport waits for a reply, and keeps the record overtaking is judged on.

CONTRACTS.md section 3 (c): a silent query counts as a block only when the same
connection (streams) or endpoint (UDP) answered another query sent after this one's
last send, while this one was still waiting. A `Channel` numbers every send and
remembers the highest-numbered send whose query got its response; a query was
overtaken exactly when that number passed its own before its deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

__all__ = ["Channel", "await_reply"]

T = TypeVar("T")


class Channel:
    """Sends on one connection or endpoint, in order; which of them were answered."""

    __slots__ = ("answered", "name", "sent", "witnessed")

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent = 0
        self.answered = 0  # the highest send number whose query got its response
        self.witnessed = 0  # the send number of the latest witness query

    def stamp(self) -> int:
        self.sent += 1
        return self.sent

    def answer(self, stamp: int) -> None:
        # Over UDP a query sent several times passes its first send's number: the
        # response may answer that one, and only what is sure may prove overtaking.
        if stamp > self.answered:
            self.answered = stamp

    def overtook(self, stamp: int) -> bool:
        return self.answered > stamp

    def needs_witness(self, stamp: int) -> bool:
        """Nothing sent after `stamp` has been answered yet, and no witness is on its way."""
        return self.answered <= stamp and self.witnessed <= stamp


def _expire(fut: asyncio.Future[T]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


async def await_reply(
    fut: asyncio.Future[T],
    deadline: float,
    *,
    witness_at: float | None = None,
    witness: Callable[[], None] | None = None,
) -> T:
    """`fut`'s result, or TimeoutError at the loop time `deadline`; whatever else fails it propagates.

    If `fut` still waits at `witness_at`, `witness()` is called once (it sends a
    question the resolver answered before, behind this one).
    """
    loop = asyncio.get_running_loop()
    timer = loop.call_at(deadline, _expire, fut)
    wtimer = None
    if witness is not None and witness_at is not None and witness_at < deadline:

        def fire() -> None:
            if not fut.done():
                witness()

        wtimer = loop.call_at(witness_at, fire)
    try:
        return await fut
    finally:
        timer.cancel()
        if wtimer is not None:
            wtimer.cancel()
