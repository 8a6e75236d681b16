"""Keep the interactive model hot: load it again on an idle GPU after an eviction.

When a load on a GPU backend evicted the model `fast` requests use most (the
embedding model of a RAG turn took its place, say), the next chat would pay a
full load. So once that backend is idle again, the model is loaded back in the
background with an empty generate, through the scheduler like any request. It
respects the user: a model whose keep_alive ran out stays unloaded, and so does
one the user unloaded, until it is asked for again (residency.model_to_keep_hot).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from harbord import residency
from harbord.policy import RouteRequest
from harbord.scheduler import Scheduler

log = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between looks; the loop also wakes when an eviction is seen


async def keep_hot(scheduler: Scheduler, wake: asyncio.Event) -> None:
    """The loop: look, load at most one model per idle backend, wait."""
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(INTERVAL):
                await wake.wait()
        wake.clear()
        if not scheduler.config.routing.keep_hot:
            continue
        for backend in list(scheduler.backends.values()):
            if backend.config.kind != "gpu" or backend.residency.resident is None:
                continue
            if backend.in_flight or backend.limiter.queued or backend.health != "up":
                continue
            model = residency.model_to_keep_hot(
                scheduler.usage,
                time.time(),
                backend.residency.resident,
                backend.residency.evicted_at,
                backend.residency.unloaded_by_user,
            )
            if model is None or (backend.models is not None and model not in backend.models):
                continue
            plan = scheduler.plan_only(RouteRequest(model=model))
            if not plan.steps or plan.steps[0].backend != backend.name:
                continue  # the model's fast requests go elsewhere now
            backend.residency.evicted_at.pop(model, None)
            log.info("keeping %s hot: loading it again on idle %s", model, backend.name)
            error = await scheduler.preload(backend, model, None)
            if error is None:
                backend.residency.kept_hot.add(model)
            else:
                log.warning("keeping %s hot on %s failed: %s", model, backend.name, error)
