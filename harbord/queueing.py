"""Load facts: recent service times, expected finish, and who waits first. Pure.

The daemon measures; these functions turn the measurements into the numbers the
policy compares (busy spill) and the order a backend's limiter serves its queue.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from harbord.schemas import Intent

T = TypeVar("T")

# The weight of the newest sample in the moving average: about the last five
# requests count, so a model that became slower (longer prompts, a reload) shows
# within a few answers without one outlier swinging it.
EWMA_WEIGHT = 0.3


def ewma(previous: float | None, sample: float, weight: float = EWMA_WEIGHT) -> float:
    """The next exponentially weighted moving average; the first sample starts it."""
    if previous is None:
        return sample
    return previous + weight * (sample - previous)


def expected_finish_ms(service_ms: float, in_flight: int, queued: int, parallel: int) -> float:
    """When a request sent now would be done: waiting batches plus its own service time.

    `parallel` requests run at once; the ones running and waiting go before this
    one, `parallel` at a time, each batch taking `service_ms` (a running request is
    counted whole: how far along it is, nobody knows).
    """
    slots = max(parallel, 1)
    ahead = in_flight + queued - slots + 1
    batches = -(-ahead // slots) if ahead > 0 else 0
    return (batches + 1) * service_ms


# -- the order of a limiter's wait queue ---------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class WaitKey:
    """Where a waiting request stands: the smallest key is served first.

    `due` is the arrival time, made earlier by `fast_head_start` for a `fast`
    request. The key is fixed on arrival, so a heap keeps the queue; a `heavy`
    request's key does not move while every later arrival's key is larger, so it
    reaches the front after at most `fast_head_start` seconds of newer `fast` ones.
    """

    due: float
    seq: int  # arrival order: equal `due` keeps first come, first served


def wait_key(intent: Intent, arrived: float, seq: int, fast_head_start: float) -> WaitKey:
    return WaitKey(arrived - fast_head_start if intent == "fast" else arrived, seq)


def serve_order(waiting: Sequence[tuple[Intent, float]], fast_head_start: float) -> list[int]:
    """Indexes of (intent, arrival time) waiters in the order they are to be served."""
    keys = [wait_key(intent, at, i, fast_head_start) for i, (intent, at) in enumerate(waiting)]
    return [key.seq for key in sorted(keys)]


class WaitQueue(Generic[T]):
    """A limiter's waiting requests, handed out in `wait_key` order (a heap).

    No clock and no I/O: the caller passes the time of arrival, so the order can be
    tested as data. `remove` serves a waiter that gave up (timeout, cancelled).
    """

    def __init__(self, fast_head_start: float) -> None:
        self.fast_head_start = fast_head_start
        self._heap: list[tuple[WaitKey, T]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, item: T, intent: Intent, arrived: float) -> None:
        key = wait_key(intent, arrived, next(self._seq), self.fast_head_start)
        heapq.heappush(self._heap, (key, item))

    def pop(self) -> T:
        """The next waiter to serve; IndexError when none waits."""
        return heapq.heappop(self._heap)[1]

    def remove(self, item: T) -> bool:
        for index, (_, waiting) in enumerate(self._heap):
            if waiting is item:
                self._heap[index] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return True
        return False
