"""The daemon's shared context: configuration, backends, state and the ledger.

Everything the request handlers and background loops share lives here, with
the operations that change it (pins, affinity, reload). It owns the backend
connection pools (`upstreams`, the request path's only client) and the
aiohttp session the prober and the supervisor use off the request path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from harbord import __version__, policy
from harbord.backends import Backend
from harbord.config import Config
from harbord.health import Prober
from harbord.ledger import Ledger
from harbord.schemas import (
    Affinity,
    BackendStatus,
    CheckEntry,
    Pin,
    Plan,
    Status,
)
from harbord.state import StateStore
from harbord.upstream import Pools

log = logging.getLogger(__name__)

class Harbor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.state = StateStore(config.state_dir)
        self.ledger = Ledger()
        self.registry: CollectorRegistry | None = None  # made on the first scrape
        self.draining = False
        self.supervision = "off"
        self.backends: dict[str, Backend] = {}
        self._views: list[policy.BackendView] = []
        self._session: aiohttp.ClientSession | None = None
        # The relay's own keep-alive connections to the backends (the hot path).
        self.upstreams = Pools()
        self._prober: Prober | None = None
        self._save_task: asyncio.Task[None] | None = None
        self._save_again = False
        self.status_changed: Callable[[], None] = lambda: None
        # Set by the supervisor when systemd is there: (backend name) -> (ok, message).
        self.restart_backend: Callable[[str], Awaitable[tuple[bool, str]]] | None = None
        self._build_backends(config)

    # -- lifecycle ------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Harbor.start() not called"
        return self._session

    @property
    def prober(self) -> Prober:
        assert self._prober is not None, "Harbor.start() not called"
        return self._prober

    async def start(self) -> None:
        self.state.load()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        self._prober = Prober(self._session, self.config.routing)
        await self._prober.probe_all(list(self.backends.values()))
        self._prober.start(list(self.backends.values()))

    async def close(self) -> None:
        if self._prober is not None:
            await self._prober.stop()
        if self._save_task is not None:
            await asyncio.shield(self._save_task)
        self.upstreams.close()
        if self._session is not None:
            await self._session.close()

    def _build_backends(self, config: Config) -> None:
        fresh: dict[str, Backend] = {}
        for name, backend_config in config.backends.items():
            backend = self.backends.get(name)
            if backend is None:
                backend = Backend(name, backend_config)
                backend.on_change = self._backend_changed
            elif backend.config != backend_config:
                backend.reconfigure(backend_config)
            fresh[name] = backend
        self.backends = fresh
        self._views = [b.view for b in fresh.values()]

    def _backend_changed(self, backend: Backend) -> None:
        self._views = [b.view for b in self.backends.values()]
        self.status_changed()

    async def apply_config(self, config: Config) -> None:
        """Reload: keep what still exists, start probing what is new."""
        removed = [name for name in self.backends if name not in config.backends]
        self.config = config
        self._build_backends(config)
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
        return policy.plan(
            request,
            self._views,
            self.state.pins,
            self.state.affinity,
            self.config.models,
            self.config.routing.default_intent,
            time.time(),
        )

    # -- pins and affinity ------------------------------------------------------

    def pin(
        self, model: str, backend: str, reason: str, for_seconds: float | None, source: str
    ) -> Pin:
        now = time.time()
        until = now + for_seconds if for_seconds else None
        pin = Pin(
            backend=backend,
            reason=reason,
            since=now,
            until=until,
            source="oom" if source == "oom" else "operator",
        )
        self.ledger.metrics.pins_set[pin.source] += 1
        self.state.pins[policy.normalize_model(model)] = pin
        log.info(
            "pinned %s to %s: %s%s",
            model,
            backend,
            reason,
            f" (for {for_seconds:.0f}s)" if for_seconds else "",
        )
        self.schedule_save()
        return pin

    def unpin(self, model: str) -> bool:
        removed = self.state.pins.pop(policy.normalize_model(model), None)
        if removed is not None:
            log.info("unpinned %s (was %s)", model, removed.backend)
            self.schedule_save()
        return removed is not None

    def learn_affinity(self, model: str, backend: str) -> None:
        current = self.state.affinity.get(model)
        if current is None or current.backend != backend:
            self.state.affinity[model] = Affinity(backend=backend, since=time.time())
            self.schedule_save()

    def expire_pins(self) -> None:
        for model in self.state.expire(time.time()):
            log.info("pin of %s expired", model)
            self.schedule_save()

    def schedule_save(self) -> None:
        """Save soon, off the event loop; changes during a save cause one more."""
        if self._save_task is not None and not self._save_task.done():
            self._save_again = True
            return
        self._save_task = asyncio.get_running_loop().create_task(self._save())

    async def _save(self) -> None:
        while True:
            self._save_again = False
            data = self.state.snapshot()
            await asyncio.to_thread(self.state.save, data)
            if not self._save_again:
                return

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
            pins={m: p for m, p in self.state.pins.items() if p.active(now)},
            affinity=dict(self.state.affinity),
            counters=self.ledger.counters,
            in_flight=self.ledger.in_flight,
            state_note=self.state.note,
            supervision=self.supervision,
        )

    def _backend_status(self, backend: Backend) -> BackendStatus:
        status = backend.status()
        status.served = backend.served
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
