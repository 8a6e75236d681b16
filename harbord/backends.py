"""One Ollama backend as the daemon sees it: health, inventory, load, limits.

The prober (health.py) and real requests (relay.py) change this state; the
policy reads it through `view`, an immutable snapshot rebuilt only when
something it shows changes, so a routing decision never waits for I/O.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp
import msgspec

from harbord.config import BackendConfig
from harbord.policy import BackendView, normalize_model
from harbord.schemas import BackendStatus, ErrorClass, Health, LoadedModel, PsModel, UnitStatus

log = logging.getLogger(__name__)


class Limiter:
    """At most `limit` requests at once, at most `max_queue` waiting for a slot.

    `acquire` answers False at once when the queue is full and after
    `queue_timeout` seconds of waiting, so the caller can spill to the next
    backend instead of waiting without bound. A limit of 0 means no limit.
    """

    def __init__(self, limit: int, max_queue: int, queue_timeout: float) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> bool:
        if not self.limit or (self.active < self.limit and not self._waiters):
            self.active += 1
            return True
        if len(self._waiters) >= self.max_queue:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # we were handed a slot as we were cancelled
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        return True

    def release(self) -> None:
        # Hand the slot straight to the next waiter, so a new arrival cannot jump the queue.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1


class Backend:
    def __init__(self, name: str, config: BackendConfig) -> None:
        self.name = name
        self.config = config
        self.health: Health = "unknown"
        self.cooldown = False
        self.hung = False
        self.version: str | None = None
        self.latency_ms: float | None = None
        self.last_error: str | None = None
        self.last_error_class: ErrorClass | None = None
        self.last_change = time.time()
        self.probe_timeouts = 0  # consecutive probes that timed out
        self.models: dict[str, int] | None = None
        self.loaded: list[PsModel] = []
        self.inventory_at = 0.0
        self.in_flight = 0
        self.served = 0
        self.limiter = Limiter(config.max_concurrency, config.max_queue, config.queue_timeout)
        # No overall limit: only connecting is timed here (relay.py times the rest).
        self.client_timeout = aiohttp.ClientTimeout(sock_connect=config.connect_timeout)
        # Requests still waiting for their first byte: the prober ends them when
        # it declares the backend hung, so they move on to the next backend.
        self.waiting: set[asyncio.Timeout] = set()
        self.wake = asyncio.Event()
        self.unit_status: UnitStatus | None = None
        self.on_change: Callable[[Backend], None] | None = None
        self.view = self._build_view()

    # -- the policy's snapshot ------------------------------------------------

    def _build_view(self) -> BackendView:
        spilled: dict[str, tuple[int, int]] = {}
        if self.config.kind == "gpu":
            for model in self.loaded:
                if 0 < model.size_vram < model.size:
                    spilled[normalize_model(model.name)] = (model.size, model.size_vram)
        return BackendView(
            name=self.name,
            kind=self.config.kind,
            health=self.health,
            cooldown=self.cooldown,
            models=self.models,
            spilled=spilled,
            memory_limit=self.config.memory_limit if self.config.kind == "gpu" else None,
        )

    def changed(self) -> None:
        self.view = self._build_view()
        if self.on_change is not None:
            self.on_change(self)

    def reconfigure(self, config: BackendConfig) -> None:
        self.config = config
        self.limiter.limit = config.max_concurrency
        self.limiter.max_queue = config.max_queue
        self.limiter.queue_timeout = config.queue_timeout
        self.client_timeout = aiohttp.ClientTimeout(sock_connect=config.connect_timeout)
        self.changed()

    # -- health transitions -----------------------------------------------------

    def mark_up(self, version: str | None = None, latency_ms: float | None = None) -> None:
        self.probe_timeouts = 0
        if version is not None:
            self.version = version
        if latency_ms is not None:
            self.latency_ms = latency_ms
        if self.health in ("up", "degraded") and not self.cooldown and not self.hung:
            return
        if self.health != "up":
            log.info(
                "backend %s is up%s", self.name, f" (ollama {self.version})" if self.version else ""
            )
        # A degraded backend stays degraded until a request succeeds on it.
        self.health = "degraded" if self.health == "degraded" else "up"
        self.cooldown = False
        self.hung = False
        self.last_change = time.time()
        self.changed()

    def mark_down(
        self, reason: str, error_class: ErrorClass = "network", cooldown: bool = False
    ) -> None:
        self.last_error, self.last_error_class = reason, error_class
        if self.health == "down" and self.cooldown == (cooldown or self.cooldown):
            return
        if self.health != "down":
            log.warning("backend %s is down: %s", self.name, reason)
            self.last_change = time.time()
        self.health = "down"
        self.cooldown = self.cooldown or cooldown
        self.changed()
        self.wake.set()

    def mark_hung(self, reason: str) -> None:
        """The port accepts but does not answer: free the requests waiting on it."""
        self.hung = True
        self.mark_down(reason)
        loop = asyncio.get_running_loop()
        for pending in list(self.waiting):
            pending.reschedule(loop.time())

    def record_success(self) -> None:
        self.served += 1
        if self.health != "up" or self.cooldown:
            self.health = "up"
            self.cooldown = False
            self.hung = False
            self.last_change = time.time()
            self.changed()

    def record_failure(self, error_class: ErrorClass, text: str, refused: bool = False) -> None:
        self.last_error, self.last_error_class = text, error_class
        if error_class == "network":
            self.mark_down(text, cooldown=refused)
        elif error_class == "driver" and self.health != "degraded":
            log.warning("backend %s is degraded: %s", self.name, text)
            self.health = "degraded"
            self.last_change = time.time()
            self.changed()

    # -- inventory ------------------------------------------------------------

    def set_inventory(self, models: dict[str, int] | None, loaded: list[PsModel] | None) -> None:
        changed = False
        if models is not None and models != self.models:
            self.models = models
            changed = True
        if loaded is not None and loaded != self.loaded:
            self.loaded = loaded
            changed = True
        self.inventory_at = time.monotonic()
        if changed:
            self.changed()

    def status(self) -> BackendStatus:
        return BackendStatus(
            name=self.name,
            url=self.config.url,
            kind=self.config.kind,
            unit=self.config.unit,
            health=self.health,
            version=self.version,
            latency_ms=self.latency_ms,
            in_flight=self.in_flight,
            queued=self.limiter.queued,
            last_error=self.last_error,
            last_error_class=self.last_error_class,
            last_change=self.last_change,
            cooldown=self.cooldown,
            models=sorted(self.models or ()),
            loaded=[LoadedModel(**msgspec.structs.asdict(m)) for m in self.loaded],
            memory_pressure=sorted(self.view.spilled),
            unit_status=self.unit_status,
        )
