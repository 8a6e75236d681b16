"""The daemon's shared context: configuration, backends, state and the ledger.

Everything the request handlers and background loops share lives here: the
backends, the StateStore (pins and affinity, and every change to them), the
ledger, and reload. It owns the backend
connection pools (`upstreams`, the request path's); the prober keeps its own pools
of the same client for harbord's reads off the request path.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from harbord import __version__, policy
from harbord.backends import Backend
from harbord.config import Config
from harbord.health import Prober
from harbord.ledger import Ledger
from harbord.schemas import (
    BackendStatus,
    CheckEntry,
    ModelFacts,
    Plan,
    Status,
)
from harbord.state import StateStore
from harbord.upstream import Pools

log = logging.getLogger(__name__)

_NO_FACTS: dict[str, ModelFacts] = {}


class Harbor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.state = StateStore(config.state_dir, config.routing.affinity_ttl)
        self.ledger = Ledger()
        self.registry: CollectorRegistry | None = None  # made on the first scrape
        self.draining = False
        self.supervision = "off"
        self.backends: dict[str, Backend] = {}
        self._views: list[policy.BackendView] = []
        # The relay's own keep-alive connections to the backends (the hot path).
        self.upstreams = Pools()
        self._prober: Prober | None = None
        self.status_changed: Callable[[], None] = lambda: None
        # Set by the supervisor when systemd is there: (backend name) -> (ok, message).
        self.restart_backend: Callable[[str], Awaitable[tuple[bool, str]]] | None = None
        self._build_backends(config)

    # -- lifecycle ------------------------------------------------------------

    @property
    def prober(self) -> Prober:
        assert self._prober is not None, "Harbor.start() not called"
        return self._prober

    async def start(self) -> None:
        self.state.load()
        self._prober = Prober(self.config.routing)
        await self._prober.probe_all(list(self.backends.values()))
        self._prober.start(list(self.backends.values()))

    async def close(self) -> None:
        if self._prober is not None:
            await self._prober.stop()
        await self.state.flush()
        self.upstreams.close()

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
        if backend.came_up:
            backend.came_up = False
            self.state.drop_affinity_away_from(backend.name, self._views)
        self.status_changed()

    async def apply_config(self, config: Config) -> None:
        """Reload: keep what still exists, start probing what is new."""
        removed = [name for name in self.backends if name not in config.backends]
        self.config = config
        self.state.affinity_ttl = config.routing.affinity_ttl
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
        routing = self.config.routing
        prober = self._prober
        facts = prober.model_facts.facts if prober is not None else _NO_FACTS
        plan = policy.plan(
            request,
            [b.view for b in self.backends.values()],  # brings each view's load up to date
            self.state.pins,
            self.state.affinity,
            self.config.models,
            routing.default_intent,
            time.time(),
            model_facts=facts,
            affinity_ttl=routing.affinity_ttl,
            cpu_slowdown=routing.cpu_slowdown,
        )
        model = plan.model
        if prober is not None and model is not None and model not in facts:
            # Never waited for: this plan goes without; a later one has the facts. Asked
            # of the backend the plan goes to first, which is about to load the model.
            backends = self.backends
            prober.model_facts.want(model, [backends[name] for name in plan.backends])
        return plan

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
