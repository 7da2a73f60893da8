"""The one way every transport waits for a reply, and keeps the record overtaking is judged on.

docs/measurement.md (c): a silent query counts as a block only when the same
connection (streams) or endpoint (UDP) answered another query sent after this one's
last send, while this one was still waiting. A `Channel` numbers every send and
remembers the highest-numbered send whose query got its response; a query was
overtaken exactly when that number passed its own before its deadline.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

__all__ = ["Channel", "Dues", "Flights", "Timer", "await_reply", "witness_step"]

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


async def await_reply(
    fut: asyncio.Future[T],
    deadline: float,
    steps: Sequence[tuple[float, Callable[[], None]]] = (),
) -> T:
    """`fut`'s result, or TimeoutError at the loop time `deadline`; whatever else fails it propagates.

    `steps` are (loop time, action) pairs run in order while `fut` still waits: UDP's
    retransmissions, a witness sent behind a silent query. One timer is armed at a time,
    so a query answered at once costs one timer, not one per step.
    """
    timer = Timer(fut, deadline, steps)
    try:
        return await fut
    finally:
        timer.cancel()


class Timer:
    """`await_reply`'s timer, armed at once: `await fut` under it, then `cancel()` it, is
    `await_reply` without its coroutine layer, for the hottest paths (UDP and streams).

    A class, not a closure: a closure that re-arms itself refers to itself, and that cycle
    kept every query's future, steps and buffers alive until the garbage collector came by
    (it doubled the CPU cost of a UDP query). Given `dues`, its first arming joins that
    queue instead of the loop's timers when it can (see `Dues`)."""

    __slots__ = ("deadline", "fut", "handle", "index", "loop", "steps")

    def __init__(
        self,
        fut: asyncio.Future[Any],
        deadline: float,
        steps: Sequence[tuple[float, Callable[[], None]]],
        dues: Dues | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.fut: asyncio.Future[Any] | None = fut
        self.deadline = deadline
        self.steps = steps
        self.index = 0
        self.handle: asyncio.TimerHandle | None = None
        when = self._next()
        if dues is None or not dues.add(when, self):
            self.handle = self.loop.call_at(when, self._fire)

    def _next(self) -> float:
        """When this timer fires next: its next step, or the deadline."""
        steps, i = self.steps, self.index
        while i < len(steps) and steps[i][0] >= self.deadline:
            i += 1  # a step due after the deadline never runs
        self.index = i
        return steps[i][0] if i < len(steps) else self.deadline

    def _fire(self) -> None:
        fut = self.fut
        if fut is None or fut.done():
            return
        if self.index == len(self.steps):
            fut.set_exception(TimeoutError())
            return
        self.steps[self.index][1]()
        self.index += 1
        self.handle = self.loop.call_at(self._next(), self._fire)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        # A timer waiting in `Dues` stays queued until its time: hold nothing of the query there.
        self.fut = None
        self.steps = ()


class Dues:
    """The first timers of one exchanger's queries, which fall due in the order they were armed,
    swept by one loop timer for the earliest instead of a loop timer each.

    Every query of an exchanger arms its first timer (UDP's first retransmission, a
    stream's witness step) the same interval after it starts, so those times only grow.
    A loop timer per query cost a heap push, a cancel and later a heap pop through
    Python-level comparisons: with the retransmission schedule's own steps, the largest
    share of what issue 14 added to a UDP or TCP query (bench/README.md, "Winning it
    back"). Nearly every query is answered long before its first step and leaves a
    cancelled timer here, which the sweep drops. A timer due before the last one queued
    (a witness with its own schedule) is armed on the loop as before, and every timer
    still fires at its own time: the sweep runs at the earliest time queued and re-arms
    for the next one.
    """

    __slots__ = ("_armed", "_handle", "_last", "_loop", "_queue")

    def __init__(self) -> None:
        self._queue: deque[tuple[float, Timer]] = deque()
        self._last = float("-inf")
        self._armed = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, when: float, timer: Timer) -> bool:
        """Queue `timer` to fire at `when`; False, and nothing queued, if that is out of order."""
        if timer.loop is not self._loop:
            # First use, or an exchanger used again under a new event loop: a sweep armed on
            # the old one never runs, and must not keep this loop's timers from firing.
            self._loop = timer.loop
            self._queue.clear()
            self._last = float("-inf")
            self._handle = None
        if when < self._last:
            return False
        self._last = when
        queue = self._queue
        # Answered queries' timers leave from the front as new ones come: kept for a whole
        # step (thousands of them at a few thousand queries a second) they only cost memory
        # and the garbage collector's passes, which walk every live one.
        while queue and queue[0][1].fut is None:
            queue.popleft()
        queue.append((when, timer))
        if self._handle is None:
            self._armed = when
            self._handle = timer.loop.call_at(when, self._sweep, timer.loop)
        return True

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        queue = self._queue
        limit = max(self._armed, loop.time())
        try:
            while queue and queue[0][0] <= limit:
                queue.popleft()[1]._fire()
        finally:
            if queue:  # re-armed even if a step raised, so that no later timer is lost
                self._armed = queue[0][0]
                self._handle = loop.call_at(self._armed, self._sweep, loop)


def witness_step(
    deadline: float, share: float, send: Callable[[], None]
) -> tuple[tuple[float, Callable[[], None]]]:
    """The `await_reply` step that sends a witness behind a silent stream query once `share` of
    its remaining time has passed (docs/measurement.md, (c): a live resolver proves itself by answering it)."""
    now = asyncio.get_running_loop().time()
    return ((now + (deadline - now) * share, send),)


class Flights:
    """Tasks a transport starts on its own (witness queries): held until done, as the loop keeps
    only weak references to tasks, and cancelled when the exchanger closes."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def start(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()
