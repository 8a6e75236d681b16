"""Ollama's scheduler as placement sees it: slots, loaded models, memory and eviction."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .models import ModelInfo
from .plumbing import Base, Ctx, Reply
from .wire import (
    BUSY_TEXT,
    DEFAULT_KEEP_ALIVE_S,
    DRIVER_TEXT,
    FOREVER_S,
    _mapping,
    _sleep_at_least,
)


@dataclass(slots=True)
class Loaded:
    info: ModelInfo
    expires: float  # epoch seconds
    size: int  # weights + KV cache for context_length
    size_vram: int
    context_length: int


class Scheduler:
    """Ollama's request scheduling, reduced to what placement can observe.

    ``parallel`` requests per loaded model run at once (OLLAMA_NUM_PARALLEL), at most
    ``max_loaded`` models are loaded (OLLAMA_MAX_LOADED_MODELS): a request for another
    model waits until enough running models are idle to evict. Waiting requests past
    ``max_queue`` (OLLAMA_MAX_QUEUE) are refused with 503 busy.
    """

    def __init__(self, parallel: int | None, max_queue: int, max_loaded: int | None) -> None:
        self.parallel = parallel
        self.max_queue = max_queue
        self.max_loaded = max_loaded
        self.active: dict[str, int] = {}
        self.waiting = 0
        self._seq = 0
        self._cond: asyncio.Condition | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def limited(self) -> bool:
        return self.parallel is not None or self.max_loaded is not None

    def tick(self) -> int:
        """The next position in the server's event order (admissions and finishes)."""
        self._seq += 1
        return self._seq

    def has_room(self) -> bool:
        return self.waiting < self.max_queue

    def _can_run(self, key: str) -> bool:
        if self.parallel is not None and self.active.get(key, 0) >= self.parallel:
            return False
        if self.max_loaded is not None:
            busy_others = sum(1 for k, n in self.active.items() if n > 0 and k != key)
            if busy_others >= self.max_loaded:
                return False
        return True

    async def acquire(self, key: str) -> None:
        if self._cond is None:
            self._cond = asyncio.Condition()
        cond = self._cond
        self.waiting += 1
        try:
            async with cond:
                await cond.wait_for(lambda: self._can_run(key))
                self.active[key] = self.active.get(key, 0) + 1
        finally:
            self.waiting -= 1

    def release(self, key: str) -> None:
        self.active[key] = max(self.active.get(key, 0) - 1, 0)
        if self._cond is not None:
            # called from a handler's finally (maybe cancelled): wake the queue from a task
            task = asyncio.get_running_loop().create_task(self._wake(self._cond))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _wake(cond: asyncio.Condition) -> None:
        async with cond:
            cond.notify_all()


class Residency(Base):
    """Admission, loading and eviction of models."""

    async def _load(
        self,
        ctx: Ctx,
        info: ModelInfo,
        model: str,
        body: Mapping[str, Any],
        keep_alive: float | None,
    ) -> int:
        """Queue for a slot, scheduler faults, then load (or reuse) the model.

        Returns the load time in ns: ``load_time`` (plus any ``load_delay`` fault)
        when this request loaded the model, near zero when it was already loaded.
        """
        f = self.faults
        applies = f.applies(model)
        if f.busy and applies:
            raise Reply(self._err(ctx, 503, BUSY_TEXT))
        await self._admit(ctx, info)
        t = time.perf_counter_ns()
        if f.load_delay > 0.0 and applies:
            await _sleep_at_least(f.load_delay)
        f = self.faults
        if info.key in f.oom_models:
            raise Reply(self._err(ctx, 500, f.oom_text))
        if f.driver_error and f.applies(model):
            text = f.driver_text or DRIVER_TEXT.format(path=info.blob_path)
            raise Reply(self._err(ctx, 500, text))
        opts = _mapping(body.get("options"))
        num_ctx = opts.get("num_ctx")
        ctx_len = min(
            num_ctx
            if isinstance(num_ctx, int) and not isinstance(num_ctx, bool) and num_ctx > 0
            else self.context_length,
            info.context_max,
        )
        size = info.size + info.kv_cache_bytes(ctx_len)
        if self.cpu or opts.get("num_gpu") == 0:
            size_vram = 0
        elif self.vram is None:
            size_vram = size
        else:
            size_vram = min(size, self.vram)  # past the GPU's memory, the rest spills to RAM
        now = time.time()
        current = self.loaded.get(info.key)
        if (
            current is None
            or current.expires <= now
            or current.context_length != ctx_len
            or current.size_vram != size_vram
        ):
            self._evict_for(info.key)
            if self.load_time > 0.0:
                await _sleep_at_least(self.load_time)
        ka = DEFAULT_KEEP_ALIVE_S if keep_alive is None else keep_alive
        expires = time.time() + (FOREVER_S if ka < 0 else ka)
        self.loaded[info.key] = Loaded(info, expires, size, size_vram, ctx_len)
        if ka == 0:
            ctx.unload = info.key
        return time.perf_counter_ns() - t

    async def _admit(self, ctx: Ctx, info: ModelInfo) -> None:
        """Wait for a slot as Ollama's scheduler does; 503 busy when the queue is full."""
        if not self.sched.limited:
            ctx.rec.admitted_seq = self.sched.tick()
            return
        if not self.sched.has_room():
            raise Reply(self._err(ctx, 503, BUSY_TEXT))
        await self.sched.acquire(info.key)
        ctx.slot = info.key
        ctx.rec.admitted_seq = self.sched.tick()

    def _evict_for(self, key: str) -> None:
        """Make room for ``key`` under the loaded-model limit: unload idle models first."""
        self.loaded.pop(key, None)
        limit = self.sched.max_loaded
        if limit is None:
            return
        others = [k for k in self.loaded if k != key]
        others.sort(key=lambda k: (self.sched.active.get(k, 0) > 0, self.loaded[k].expires))
        while len(others) >= limit:
            self.loaded.pop(others.pop(0), None)
