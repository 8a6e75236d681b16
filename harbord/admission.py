"""Admission to one backend: at most `limit` generations at once, fast before heavy.

The scheduler holds one `Limiter` per backend; its `active` count is the one count
of generations running there (`Backend.in_flight` reads it).
"""

from __future__ import annotations

import asyncio

from harbord.queueing import WaitQueue
from harbord.schemas import Intent


class Limiter:
    """At most `limit` requests at once, at most `max_queue` waiting for a slot.

    `acquire` answers False at once when the queue is full and after
    `queue_timeout` seconds of waiting, so the caller can spill to the next
    backend instead of waiting without bound. A limit of 0 means no limit.
    Waiters are served `fast` before `heavy`, with ageing (queueing.WaitQueue).
    """

    def __init__(
        self, limit: int, max_queue: int, queue_timeout: float, fast_head_start: float = 10.0
    ) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.active = 0
        self._waiters: WaitQueue[asyncio.Future[None]] = WaitQueue(fast_head_start)

    @property
    def fast_head_start(self) -> float:
        return self._waiters.fast_head_start

    @fast_head_start.setter
    def fast_head_start(self, seconds: float) -> None:
        self._waiters.fast_head_start = seconds  # for later arrivals; keys are fixed

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self, intent: Intent = "fast") -> bool:
        if not self.limit or (self.active < self.limit and not self._waiters):
            self.active += 1
            return True
        if len(self._waiters) >= self.max_queue:
            return False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.push(waiter, intent, loop.time())
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter
        except TimeoutError:
            # Handed a slot just as the time ran out: take it rather than lose it.
            return waiter.done() and not waiter.cancelled()
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # we were handed a slot as we were cancelled
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            self._waiters.remove(waiter)  # False when release() popped it already
        return True

    def release(self) -> None:
        # Hand the slot straight to the next waiter, so a new arrival cannot jump the queue.
        while self._waiters:
            waiter = self._waiters.pop()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1
