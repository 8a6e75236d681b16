"""Loading a restarted backend's models again, as they were before the restart.

The supervisor takes `loaded_models` (from the backend's last `/api/ps`) just
before it restarts a unit, then runs `warm` as a task: once the backend answers
again, each model is loaded with an empty generate and the keep_alive it had
left, so the restart costs the user no cold start.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Callable

from harbord.backends import Backend
from harbord.harbor import Harbor

log = logging.getLogger(__name__)

WARM_WAIT = 180.0  # how long a restarted backend may take to answer before warming
WARM_ATTEMPTS = 3
WAIT_STEP = 0.25  # seconds between looks at whether the backend answers
FOREVER = 10 * 365 * 86400.0  # an expiry further away than this is keep_alive -1

Models = list[tuple[str, str | int | None]]  # (model, keep_alive to load it with)


def keep_alive_for(expires_at: str | None, now: float) -> str | int | None:
    """What to pass as keep_alive to get back the model's remaining time; None: the default."""
    if not expires_at:
        return None
    try:
        expires = datetime.datetime.fromisoformat(expires_at).timestamp()
    except ValueError:
        return None
    remaining = expires - now
    if remaining > FOREVER:
        return -1
    if remaining < 1:
        return None
    return f"{int(remaining)}s"


def loaded_models(backend: Backend, now: float) -> Models:
    """The models the backend has loaded now (wall clock `now`), with their time left."""
    return [(m.name, keep_alive_for(m.expires_at, now)) for m in backend.loaded]


async def warm(
    harbor: Harbor, backend: Backend, models: Models, set_note: Callable[[str | None], None]
) -> None:
    """Load the models once the backend answers again; `set_note` shows "warming" meanwhile."""
    try:
        for model, keep_alive in models:
            for attempt in range(1, WARM_ATTEMPTS + 1):
                if not await _answering(backend):
                    log.warning(
                        "not warming %s: it did not answer within %gs", backend.name, WARM_WAIT
                    )
                    return
                set_note("warming")
                error = await _load(harbor, backend, model, keep_alive)
                if error is None or attempt == WARM_ATTEMPTS:
                    break
                await asyncio.sleep(backend.config.connect_timeout)
            if error is not None:
                log.warning("warming %s on %s failed: %s", model, backend.name, error)
        await harbor.prober.refresh_inventory(backend)  # status shows them loaded
    finally:
        set_note(None)


async def _answering(backend: Backend) -> bool:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(WARM_WAIT):
            while backend.health not in ("up", "degraded") or backend.hung:
                await asyncio.sleep(WAIT_STEP)
            return True
    return False


async def _load(
    harbor: Harbor, backend: Backend, model: str, keep_alive: str | int | None
) -> str | None:
    """An empty generate loads the model; None when it did, else what went wrong."""
    # Through the scheduler like any request: it holds a slot and what the load
    # teaches (the load time, what is resident) is learned.
    started = time.monotonic()
    error = await harbor.scheduler.preload(backend, model, keep_alive)
    if error is not None:
        return error
    log.info(
        "warmed %s on %s in %.1fs (keep_alive %s)",
        model,
        backend.name,
        time.monotonic() - started,
        keep_alive or "default",
    )
    return None
