"""The daemon's shared context: configuration, backends, state and the ledger.

Everything the request handlers and background loops share lives here: the
backends, the StateStore (pins and affinity, and every change to them), the
ledger, and reload. It owns the backend
connection pools (`upstreams`, the request path's); the prober keeps its own pools
of the same client for harbord's reads off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from harbord import __version__, policy
from harbord.backends import Backend
from harbord.config import Config
from harbord.health import Prober
from harbord.keep_hot import keep_hot
from harbord.ledger import Ledger
from harbord.scheduler import Scheduler
from harbord.schemas import (
    BackendStatus,
    CheckEntry,
    Plan,
    Status,
)
from harbord.state import StateStore
from harbord.upstream import Pools

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)


class Harbor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.state = StateStore(config.state_dir, config.routing.affinity_ttl)
        self.ledger = Ledger()
        self.registry: CollectorRegistry | None = None  # made on the first scrape
        self.draining = False
        self.supervision = "off"
        # Every request that reaches a backend is admitted, placed and accounted there.
        self.scheduler = Scheduler(config, self.state)
        self.scheduler.status_changed = lambda: self.status_changed()
        self.scheduler.pools = self.upstreams = Pools()  # the request path's connections
        self._keep_hot: asyncio.Task[None] | None = None
        self._prober: Prober | None = None
        self.status_changed: Callable[[], None] = lambda: None
        # Set by the supervisor when systemd is there: (backend name) -> (ok, message).
        self.restart_backend: Callable[[str], Awaitable[tuple[bool, str]]] | None = None

    @property
    def backends(self) -> dict[str, Backend]:
        """The backends, owned by the scheduler."""
        return self.scheduler.backends

    # -- lifecycle ------------------------------------------------------------

    @property
    def prober(self) -> Prober:
        assert self._prober is not None, "Harbor.start() not called"
        return self._prober

    async def start(self) -> None:
        self.state.load()
        self._prober = Prober(self.config.routing)
        scheduler, facts = self.scheduler, self._prober.model_facts
        scheduler.facts = lambda: facts.facts
        scheduler.want_facts = facts.want
        scheduler.read_loaded = self._prober.after_load
        await self._prober.probe_all(list(self.backends.values()))
        self._prober.start(list(self.backends.values()))
        self._keep_hot = asyncio.create_task(
            keep_hot(self.scheduler, asyncio.Event()), name="keep-hot"
        )

    async def close(self) -> None:
        if self._keep_hot is not None:
            self._keep_hot.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keep_hot
        if self._prober is not None:
            await self._prober.stop()
        await self.state.flush()
        self.upstreams.close()

    async def apply_config(self, config: Config) -> None:
        """Reload: keep what still exists, start probing what is new."""
        self.config = config
        removed = self.scheduler.build_backends(config)
        self.upstreams.keep({b.config.url for b in self.backends.values()})
        if self._prober is not None:
            self._prober.routing = config.routing
            await self._prober.stop(removed)
            self._prober.start(list(self.backends.values()))
            for backend in self.backends.values():
                backend.wake.set()
        self.status_changed()

    # -- routing --------------------------------------------------------------

    def plan(self, request: policy.RouteRequest) -> Plan:
        return self.scheduler.place(request)

    # -- reporting ------------------------------------------------------------

    def status(self) -> Status:
        now = time.time()
        return Status(
            version=__version__,
            pid=os.getpid(),
            started_at=self.started_at,
            uptime_s=round(now - self.started_at, 3),
            socket=str(self.config.socket),
            backends=[self._backend_status(b) for b in self.backends.values()],
            pins=self.state.active_pins(now),
            affinity=self.state.active_affinity(now),
            counters=self.ledger.counters,
            in_flight=self.ledger.in_flight,
            state_note=self.state.note,
            supervision=self.supervision,
        )

    def _backend_status(self, backend: Backend) -> BackendStatus:
        status = backend.status()
        status.served = self.ledger.counters.by_backend.get(backend.name, 0)
        ttfb = sorted(
            d.first_byte_ms
            for d in self.ledger.decisions.values()
            if d.served_by == backend.name and d.first_byte_ms is not None
        )
        status.ttfb_p50_ms = ttfb[len(ttfb) // 2] if ttfb else None
        return status

    def check(self) -> dict[str, CheckEntry]:
        return {
            b.name: CheckEntry(
                status="healthy"
                if b.health in ("up", "degraded") and not b.cooldown
                else "unhealthy",
                version=b.version,
                url=b.config.url,
                is_gpu=b.config.kind == "gpu",
            )
            for b in self.backends.values()
        }

    def summary(self) -> str:
        """One line for systemd's STATUS=, e.g. `gpu up, cpu down (restarting), 3 in flight`."""
        parts = []
        for b in self.backends.values():
            text = f"{b.name} {b.health}"
            unit = b.unit_status
            if unit is not None and unit.note:
                text += f" ({unit.note})"
            elif b.cooldown:
                text += " (cooling down)"
            parts.append(text)
        parts.append(f"{self.ledger.in_flight} in flight")
        if self.draining:
            parts.append("draining")
        return ", ".join(parts)


HARBOR: web.AppKey[Harbor] = web.AppKey("harbor", Harbor)
