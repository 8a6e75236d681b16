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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
import msgspec

from harbord.backends import Backend
from harbord.config import RoutingConfig
from harbord.gpu_memory import GpuFigures, Sources, discover
from harbord.model_facts import ModelFactsCache
from harbord.policy import normalize_model
from harbord.schemas import UNDECODABLE, Ps, Tags, Version

log = logging.getLogger(__name__)

_version = msgspec.json.Decoder(Version)
_tags = msgspec.json.Decoder(Tags)
_ps = msgspec.json.Decoder(Ps)
# A GPU's memory hardly changes while its Ollama runs: read again this often, and
# whenever the backend comes back up (its unit restarted, a new Ollama logged anew).
MEMORY_REFRESH = 300.0


class Prober:
    def __init__(self, session: aiohttp.ClientSession, routing: RoutingConfig) -> None:
        self.session = session
        self.routing = routing
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._memory_tasks: dict[str, asyncio.Task[None]] = {}
        self._ps_tasks: dict[str, asyncio.Task[None]] = {}
        self.model_facts = ModelFactsCache(session)
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
        for backend in backends:
            # The routing table's queue order applies to every backend's limiter.
            backend.limiter.fast_head_start = self.routing.fast_head_start
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
        timeout = aiohttp.ClientTimeout(total=max(self.routing.probe_timeout, 1.0))
        try:
            async with self.session.get(f"{backend.config.url}/api/ps", timeout=timeout) as resp:
                ps = _ps.decode(await resp.read()) if resp.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError, *UNDECODABLE) as err:
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
        timeout = aiohttp.ClientTimeout(total=self.routing.probe_timeout)
        started = time.monotonic()
        was_up = backend.health in ("up", "degraded") and not backend.hung
        try:
            async with self.session.get(f"{url}/api/version", timeout=timeout) as resp:
                body = await resp.read()
                if resp.status != 200:
                    backend.probe_timeouts = 0
                    backend.mark_down(f"probe: /api/version answered {resp.status}")
                    return
        except aiohttp.ClientConnectorError as err:
            backend.probe_timeouts = 0
            backend.mark_down(f"connection refused ({_os_reason(err)})", cooldown=True)
            return
        except TimeoutError:
            backend.probe_timeouts += 1
            limit = self.routing.hung_after_probes
            if backend.probe_timeouts >= limit:
                backend.mark_hung(f"hung: {backend.probe_timeouts} probes timed out")
            else:
                log.info(
                    "probe of %s timed out (%d/%d)", backend.name, backend.probe_timeouts, limit
                )
            return
        except (aiohttp.ClientError, OSError) as err:
            backend.probe_timeouts = 0
            backend.mark_down(f"probe failed: {type(err).__name__}")
            return
        try:
            version = _version.decode(body).version
        except UNDECODABLE:
            backend.mark_down("probe: /api/version did not answer like Ollama", "other")
            return
        backend.mark_up(version, (time.monotonic() - started) * 1000)
        due = time.monotonic() - backend.inventory_at >= self.routing.inventory_interval
        if inventory or (inventory is None and (due or not was_up)):
            await self.refresh_inventory(backend)

    async def refresh_inventory(self, backend: Backend) -> None:
        timeout = aiohttp.ClientTimeout(total=max(self.routing.probe_timeout, 5.0))
        url = backend.config.url
        try:
            async with self.session.get(f"{url}/api/tags", timeout=timeout) as resp:
                tags = _tags.decode(await resp.read()) if resp.status == 200 else None
            async with self.session.get(f"{url}/api/ps", timeout=timeout) as resp:
                ps = _ps.decode(await resp.read()) if resp.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError, *UNDECODABLE) as err:
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


def _os_reason(err: aiohttp.ClientConnectorError) -> str:
    return err.os_error.strerror or type(err.os_error).__name__
