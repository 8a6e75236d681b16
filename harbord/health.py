"""The prober: keeps each backend's health and inventory current, off the request path.

One loop per backend: `GET /api/version` with a short timeout, every
`probe_interval` while up and every `probe_interval_down` while not; the
model list (`/api/tags`) and loaded models (`/api/ps`) every
`inventory_interval`, or at once when something changed them. A request
that sees a network failure wakes the loop so the backend's state is
confirmed (or cleared) within a round trip.

Placement facts are gathered here too, off the request path: each GPU backend's
memory (gpu_memory.discover: at start, when the backend comes back up, as after a
restart of its unit, and every `MEMORY_REFRESH`), the models' shapes
(`model_facts`, fetched when a plan first needs them), and `/api/ps` right after an
answer that loaded a model (`after_load`), so a spill is known within a second.

Every read goes through the request path's client (upstream.Pools), on a Pools of its
own (`pools`, shared with model facts and warm-up). The client has no connection limit,
so a hung backend's stuck probes could not hold back a request either way; kept apart,
a probe that times out (and aborts its connection, counting towards hung) never takes
one of the relay's warm connections with it, and a reload closes the two separately.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TypeVar

import msgspec

from harbord.backends import Backend
from harbord.config import RoutingConfig
from harbord.gpu_memory import GpuFigures, Sources, discover
from harbord.model_facts import ModelFactsCache
from harbord.schemas import Ps, Tags, Version
from harbord.upstream import ConnectError, Pools, StatusError, Undecodable, UpstreamError
from harbord.views import normalize_model

log = logging.getLogger(__name__)

_version = msgspec.json.Decoder(Version)
_tags = msgspec.json.Decoder(Tags)
_ps = msgspec.json.Decoder(Ps)
# A GPU's memory hardly changes while its Ollama runs: read again this often, and
# whenever the backend comes back up (its unit restarted, a new Ollama logged anew).
MEMORY_REFRESH = 300.0

T = TypeVar("T")


class Prober:
    def __init__(self, routing: RoutingConfig) -> None:
        self.pools = Pools()
        self.routing = routing
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._memory_tasks: dict[str, asyncio.Task[None]] = {}
        self._ps_tasks: dict[str, asyncio.Task[None]] = {}
        self.model_facts = ModelFactsCache(self.pools)
        self.gpu_sources = Sources()  # where discover() looks; tests point it elsewhere

    async def probe_all(self, backends: list[Backend]) -> None:
        """One round over every backend (used before READY=1); a probe cannot stop the start."""
        results = await asyncio.gather(
            *(self.probe(backend, inventory=True) for backend in backends), return_exceptions=True
        )
        for backend, result in zip(backends, results, strict=True):
            if isinstance(result, Exception):
                log.error("probe of %s failed unexpectedly", backend.name, exc_info=result)

    def start(self, backends: list[Backend]) -> None:
        self.pools.keep({backend.config.url for backend in backends})  # a reload moved one
        for backend in backends:
            if backend.name not in self._tasks:
                self._tasks[backend.name] = asyncio.create_task(
                    self._loop(backend), name=f"probe-{backend.name}"
                )
            if backend.config.kind == "gpu" and backend.name not in self._memory_tasks:
                self._memory_tasks[backend.name] = asyncio.create_task(
                    self._memory_loop(backend), name=f"gpu-memory-{backend.name}"
                )

    async def stop(self, names: list[str] | None = None) -> None:
        every = names is None
        for tasks in (self._tasks, self._memory_tasks, self._ps_tasks):
            for name in list(tasks) if names is None else names:
                task = tasks.pop(name, None)
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if every:
            await self.model_facts.stop()
            self.pools.close()

    async def _memory_loop(self, backend: Backend) -> None:
        while True:
            backend.rediscover.clear()
            if backend.config.vram:
                backend.set_gpu_figures(GpuFigures())  # configured: nothing to find
            else:
                try:
                    figures = await discover(backend.config.unit, self.gpu_sources)
                except Exception:  # discovery must never end the loop
                    log.exception("GPU memory of %s not discovered", backend.name)
                else:
                    if figures.missing and not (figures.journal or figures.sysfs):
                        log.info("GPU memory of %s: %s", backend.name, "; ".join(figures.missing))
                    backend.set_gpu_figures(figures)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(MEMORY_REFRESH):
                    await backend.rediscover.wait()

    def after_load(self, backend: Backend) -> asyncio.Task[None]:
        """Read the backend's /api/ps now, so a spill is known at once (the relay calls
        this after an answer that loaded a model). One read at a time per backend."""
        running = self._ps_tasks.get(backend.name)
        if running is not None and not running.done():
            return running
        task = asyncio.create_task(self.refresh_loaded(backend), name=f"ps-{backend.name}")
        self._ps_tasks[backend.name] = task
        return task

    async def refresh_loaded(self, backend: Backend) -> None:
        timeout = max(self.routing.probe_timeout, 1.0)
        try:
            ps = await self._optional(backend.config.url, "/api/ps", _ps, timeout)
        except UpstreamError as err:
            log.info("loaded models of %s not read: %s", backend.name, type(err).__name__)
            return
        if ps is not None:
            backend.set_loaded(list(ps.models or ()))

    async def _loop(self, backend: Backend) -> None:
        while True:
            try:
                await self.probe(backend)
            except asyncio.CancelledError:
                raise
            except Exception:  # a probe must never end the loop
                log.exception("probe of %s failed unexpectedly", backend.name)
            interval = (
                self.routing.probe_interval
                if backend.health in ("up", "degraded")
                else self.routing.probe_interval_down
            )
            backend.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await backend.wake.wait()

    async def probe(self, backend: Backend, inventory: bool | None = None) -> None:
        url = backend.config.url
        started = time.monotonic()
        was_up = backend.health in ("up", "degraded") and not backend.hung
        try:
            version = await self.pools.fetch_json(
                url, "GET", "/api/version", _version, self.routing.probe_timeout
            )
        except Undecodable:
            backend.mark_down("probe: /api/version did not answer like Ollama", "other")
            return
        except UpstreamError as err:
            self._probe_failed(backend, err)
            return
        backend.mark_up(version.version, (time.monotonic() - started) * 1000)
        due = time.monotonic() - backend.inventory_at >= self.routing.inventory_interval
        if inventory or (inventory is None and (due or not was_up)):
            await self.refresh_inventory(backend)

    def _probe_failed(self, backend: Backend, err: UpstreamError) -> None:
        """A probe got no answer, or not a 200: only timeouts in a row make it hung."""
        if err.timeout:
            backend.probe_timeouts += 1
            limit = self.routing.hung_after_probes
            if backend.probe_timeouts >= limit:
                backend.mark_hung(f"hung: {backend.probe_timeouts} probes timed out")
            else:
                log.info(
                    "probe of %s timed out (%d/%d)", backend.name, backend.probe_timeouts, limit
                )
            return
        backend.probe_timeouts = 0
        if isinstance(err, ConnectError):
            backend.mark_down(f"connection refused ({err.reason})", cooldown=True)
        elif isinstance(err, StatusError):
            backend.mark_down(f"probe: /api/version answered {err.status}")
        else:
            backend.mark_down(f"probe failed: {type(err).__name__}")

    async def _optional(
        self, url: str, path: str, decoder: msgspec.json.Decoder[T], timeout: float
    ) -> T | None:
        """A GET's decoded answer; None when the backend answered with another status."""
        try:
            return await self.pools.fetch_json(url, "GET", path, decoder, timeout)
        except StatusError:
            return None

    async def refresh_inventory(self, backend: Backend) -> None:
        timeout = max(self.routing.probe_timeout, 5.0)
        url = backend.config.url
        try:
            tags = await self._optional(url, "/api/tags", _tags, timeout)
            ps = await self._optional(url, "/api/ps", _ps, timeout)
        except UpstreamError as err:
            log.info("inventory of %s not refreshed: %s", backend.name, type(err).__name__)
            return
        models = None
        if tags is not None:
            models = {normalize_model(m.name): m.size for m in tags.models or ()}
            self.model_facts.invalidate(models)
        backend.set_inventory(models, list(ps.models or ()) if ps is not None else None)
        for model in models or ():
            # Known before the first request for it, so that one is placed by memory too.
            self.model_facts.want(model, [backend])
