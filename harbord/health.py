"""The prober: keeps each backend's health and inventory current, off the request path.

One loop per backend: `GET /api/version` with a short timeout, every
`probe_interval` while up and every `probe_interval_down` while not; the
model list (`/api/tags`) and loaded models (`/api/ps`) every
`inventory_interval`, or at once when something changed them. A request
that sees a network failure wakes the loop so the backend's state is
confirmed (or cleared) within a round trip.
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
from harbord.policy import normalize_model
from harbord.schemas import UNDECODABLE, Ps, Tags, Version

log = logging.getLogger(__name__)

_version = msgspec.json.Decoder(Version)
_tags = msgspec.json.Decoder(Tags)
_ps = msgspec.json.Decoder(Ps)


class Prober:
    def __init__(self, session: aiohttp.ClientSession, routing: RoutingConfig) -> None:
        self.session = session
        self.routing = routing
        self._tasks: dict[str, asyncio.Task[None]] = {}

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
            if backend.name not in self._tasks:
                self._tasks[backend.name] = asyncio.create_task(
                    self._loop(backend), name=f"probe-{backend.name}"
                )

    async def stop(self, names: list[str] | None = None) -> None:
        for name in list(self._tasks) if names is None else names:
            task = self._tasks.pop(name, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

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
        backend.set_inventory(models, list(ps.models or ()) if ps is not None else None)


def _os_reason(err: aiohttp.ClientConnectorError) -> str:
    return err.os_error.strerror or type(err.os_error).__name__
