"""Ollama's scheduler as placement sees it: slots, loaded models, memory and eviction."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .models import ModelInfo, _key
from .plumbing import Base, Ctx, Reply
from .wire import (
    BUSY_TEXT,
    DEFAULT_KEEP_ALIVE_S,
    DRIVER_TEXT,
    FOREVER_S,
    _mapping,
    _sleep_at_least,
)

DEFAULT_MAX_LOADED: Final = 3  # OLLAMA_MAX_LOADED_MODELS' default (per GPU, and for a CPU)
GIB: Final = 1 << 30


class PerModel:
    """Seconds per model (normalised name), with a default for the others.

    Built from a number, or a mapping whose ``""`` (or ``"*"``) key is the default.
    """

    __slots__ = ("by_model", "default")

    def __init__(self, value: float | Mapping[str, float] | None = None) -> None:
        self.default = 0.0
        self.by_model: dict[str, float] = {}
        if isinstance(value, Mapping):
            for name, secs in value.items():
                if name in ("", "*"):
                    self.default = float(secs)
                else:
                    self.by_model[_key(name)] = float(secs)
        elif value is not None:
            self.default = float(value)

    def __call__(self, model: str) -> float:
        return self.by_model.get(_key(model), self.default) if self.by_model else self.default


@dataclass(slots=True)
class Loaded:
    """A model in memory (or being loaded: ``ready`` not set yet)."""

    info: ModelInfo
    expires: float  # epoch seconds
    size: int  # weights + KV cache for context_length
    size_vram: int
    context_length: int
    keep_alive: float  # seconds it stays after its last request ends; < 0: forever
    last_used: float  # monotonic: least recently used idle models are evicted first
    ready: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class Tally:
    """What the scheduler did to models, for ``/_fake/stats``."""

    loads: int = 0
    evictions: int = 0  # unloaded to make room (count or memory)
    unloads: int = 0  # keep_alive 0, ollama stop, delete
    expirations: int = 0  # keep_alive ran out
    loads_by_model: dict[str, int] = field(default_factory=dict)
    evictions_by_model: dict[str, int] = field(default_factory=dict)

    def load(self, key: str) -> None:
        self.loads += 1
        self.loads_by_model[key] = self.loads_by_model.get(key, 0) + 1

    def evict(self, key: str) -> None:
        self.evictions += 1
        self.evictions_by_model[key] = self.evictions_by_model.get(key, 0) + 1

    def as_json(self) -> dict[str, Any]:
        return {
            "loads": self.loads,
            "evictions": self.evictions,
            "unloads": self.unloads,
            "expirations": self.expirations,
            "loads_by_model": dict(self.loads_by_model),
            "evictions_by_model": dict(self.evictions_by_model),
        }


class Scheduler:
    """Ollama's request scheduling, reduced to what placement can observe.

    ``parallel`` requests per loaded model run at once (OLLAMA_NUM_PARALLEL); a request
    also waits while the models it would have to evict are busy (``room``). Waiting
    requests past ``max_queue`` (OLLAMA_MAX_QUEUE) are refused with 503 busy.
    ``max_loaded`` (OLLAMA_MAX_LOADED_MODELS; None: no limit) is read by Residency.
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

    def tick(self) -> int:
        """The next position in the server's event order (admissions and finishes)."""
        self._seq += 1
        return self._seq

    def has_room(self) -> bool:
        return self.waiting < self.max_queue

    def busy(self, key: str) -> bool:
        return self.active.get(key, 0) > 0

    async def acquire(self, key: str, room: Callable[[], bool]) -> None:
        if self._cond is None:
            self._cond = asyncio.Condition()
        cond = self._cond
        parallel = self.parallel
        self.waiting += 1
        try:
            async with cond:
                await cond.wait_for(
                    lambda: (parallel is None or self.active.get(key, 0) < parallel) and room()
                )
                self.active[key] = self.active.get(key, 0) + 1
        finally:
            self.waiting -= 1

    def release(self, key: str) -> None:
        self.active[key] = max(self.active.get(key, 0) - 1, 0)
        self.notify()

    def notify(self) -> None:
        """Let waiting requests re-check (a slot ended, a load finished)."""
        if self._cond is not None:
            # called from a handler's finally (maybe cancelled): wake the queue from a task
            task = asyncio.get_running_loop().create_task(self._wake(self._cond))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _wake(cond: asyncio.Condition) -> None:
        async with cond:
            cond.notify_all()


@dataclass(frozen=True, slots=True)
class Want:
    """How a request needs its model loaded."""

    context_length: int
    size: int
    size_vram: int


class Residency(Base):
    """Admission, loading, keep-alive expiry and eviction of models, as Ollama does them.

    At most ``max_loaded`` models, and within the memory budget (``vram`` on a GPU
    server, ``ram`` on a CPU one): a load that does not fit evicts idle models, least
    recently used first, and waits for busy ones to finish. A load takes ``load_time``
    for its model; a second request for a model being loaded waits for that load.
    """

    def _budget(self) -> int | None:
        return self.ram if self.cpu else self.vram

    def _mem(self, size: int, size_vram: int) -> int:
        return size if self.cpu else size_vram

    def _busy(self, key: str) -> bool:
        ld = self.loaded.get(key)
        return self.sched.busy(key) or (ld is not None and not ld.ready.is_set())

    def _prune(self) -> None:
        """Drop idle models whose keep_alive ran out (Ollama's expiry timer)."""
        now = time.time()
        for key, ld in list(self.loaded.items()):
            if ld.expires <= now and ld.ready.is_set() and not self.sched.busy(key):
                del self.loaded[key]
                self.tally.expirations += 1

    def resident(self) -> list[Loaded]:
        """Models loaded now (not those still loading), for /api/ps and stats."""
        self._prune()
        return [ld for ld in self.loaded.values() if ld.ready.is_set()]

    def listed(self) -> list[Loaded]:
        """What /api/ps lists: the models loaded and those still loading, as Ollama's
        PsHandler ranges over every runner its scheduler holds, a loading one from the
        moment its load begins (server/sched.go `load`, server/routes.go `PsHandler`);
        the longest time left first."""
        self._prune()
        return sorted(self.loaded.values(), key=lambda ld: ld.expires, reverse=True)

    def _want(self, info: ModelInfo, body: Mapping[str, Any]) -> Want:
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
        return Want(ctx_len, size, size_vram)

    @staticmethod
    def _matches(ld: Loaded, want: Want) -> bool:
        return ld.context_length == want.context_length and ld.size_vram == want.size_vram

    def _over(self, key: str, need: int) -> bool:
        """Whether loading ``key`` (``need`` bytes of the budget) needs room made."""
        others = [ld for k, ld in self.loaded.items() if k != key]
        limit = self.sched.max_loaded
        if limit is not None and len(others) >= limit:
            return True
        budget = self._budget()
        used = sum(self._mem(ld.size, ld.size_vram) for ld in others)
        return budget is not None and bool(others) and used + need > budget

    def _matching(self, key: str, want: Want) -> Loaded | None:
        """``key``'s entry (loaded or loading) if it is the one ``want`` asks for, once
        expired models are gone."""
        self._prune()
        current = self.loaded.get(key)
        return current if current is not None and self._matches(current, want) else None

    def _room(self, key: str, want: Want) -> bool:
        """Whether ``key`` can run once idle models are evicted (busy ones stay)."""
        if self._matching(key, want) is not None:
            return True
        busy = [ld for k, ld in self.loaded.items() if k != key and self._busy(k)]
        limit = self.sched.max_loaded
        if limit is not None and len(busy) >= limit:
            return False
        budget = self._budget()
        if budget is None or not busy:
            return True
        used = sum(self._mem(ld.size, ld.size_vram) for ld in busy)
        return used + self._mem(want.size, want.size_vram) <= budget

    def _evict_for(self, key: str, want: Want) -> None:
        """Unload idle models, least recently used first, until ``key`` fits."""
        self.loaded.pop(key, None)
        need = self._mem(want.size, want.size_vram)
        idle = [k for k in self.loaded if not self._busy(k)]
        idle.sort(key=lambda k: self.loaded[k].last_used)
        while idle and self._over(key, need):
            victim = idle.pop(0)
            del self.loaded[victim]
            self.tally.evict(victim)

    async def _load(
        self,
        ctx: Ctx,
        info: ModelInfo,
        model: str,
        body: Mapping[str, Any],
        keep_alive: float | None,
    ) -> int:
        """Queue for a slot, scheduler faults, then load (or reuse) the model.

        Returns the load time in ns as Ollama's ``load_duration`` counts it (from the
        request's arrival until its runner is ready, server/routes.go): for a model that
        was not loaded, the wait for busy models to be evicted, any wait for another
        request's load of it, the model's ``load_time`` and any ``load_delay`` fault;
        near zero for a loaded one (its wait for a parallel slot is the runner's, after).
        """
        f = self.faults
        applies = f.applies(model)
        if f.busy and applies:
            raise Reply(self._err(ctx, 503, BUSY_TEXT))
        want = self._want(info, body)
        arrived = time.perf_counter_ns()
        current = self._matching(info.key, want)
        loaded = current is not None and current.ready.is_set()
        await self._admit(ctx, info, want)
        t = time.perf_counter_ns() if loaded else arrived
        if f.load_delay > 0.0 and applies:
            await _sleep_at_least(f.load_delay)
        f = self.faults
        if info.key in f.oom_models:
            raise Reply(self._err(ctx, 500, f.oom_text))
        if f.driver_error and f.applies(model):
            text = f.driver_text or DRIVER_TEXT.format(path=info.blob_path)
            raise Reply(self._err(ctx, 500, text))
        if self.cpu and self.ram is not None and want.size > self.ram:
            text = (
                f"model requires more system memory ({want.size / GIB:.1f} GiB) "
                f"than is available ({self.ram / GIB:.1f} GiB)"
            )
            raise Reply(self._err(ctx, 500, text))
        ka = DEFAULT_KEEP_ALIVE_S if keep_alive is None else keep_alive
        ld = await self._ensure_loaded(info, want, ka)
        ld.keep_alive = ka
        ld.expires = time.time() + (FOREVER_S if ka < 0 else ka)
        ld.last_used = time.monotonic()
        if ka == 0:
            ctx.unload = info.key
        return time.perf_counter_ns() - t

    async def _ensure_loaded(self, info: ModelInfo, want: Want, keep_alive: float) -> Loaded:
        key = info.key
        while True:
            current = self._matching(key, want)
            if current is not None:
                if current.ready.is_set():
                    return current
                await current.ready.wait()  # another request is loading it
                continue  # (that load may have been cancelled)
            self._evict_for(key, want)
            expires = time.time() + (FOREVER_S if keep_alive < 0 else keep_alive)
            entry = Loaded(
                info,
                expires,
                want.size,
                want.size_vram,
                want.context_length,
                keep_alive,
                time.monotonic(),
            )
            self.loaded[key] = entry
            try:
                seconds = self.load_time(key)
                if seconds > 0.0:
                    await _sleep_at_least(seconds)
            except BaseException:
                if self.loaded.get(key) is entry:
                    del self.loaded[key]
                raise
            finally:
                entry.ready.set()
                self.sched.notify()
            self.tally.load(key)
            return entry

    async def _admit(self, ctx: Ctx, info: ModelInfo, want: Want) -> None:
        """Wait for a slot as Ollama's scheduler does; 503 busy when the queue is full."""
        if not self.sched.has_room():
            raise Reply(self._err(ctx, 503, BUSY_TEXT))
        await self.sched.acquire(info.key, lambda: self._room(info.key, want))
        ctx.slot = info.key
        ctx.rec.admitted_seq = self.sched.tick()

    def _finish(self, ctx: Ctx) -> None:
        """A request on a model ended: its idle timer starts, or keep_alive 0 unloads it."""
        key = ctx.slot
        if key is None:
            return
        self.sched.release(key)
        ld = self.loaded.get(key)
        if ld is None or not ld.ready.is_set() or self.sched.busy(key):
            return
        ld.last_used = time.monotonic()
        if ctx.unload == key:
            del self.loaded[key]
            self.tally.unloads += 1
            return
        ld.expires = time.time() + (FOREVER_S if ld.keep_alive < 0 else ld.keep_alive)

    def unload(self, key: str) -> None:
        """An explicit unload (keep_alive 0 with no prompt, or a delete)."""
        if self.loaded.pop(key, None) is not None:
            self.tally.unloads += 1
