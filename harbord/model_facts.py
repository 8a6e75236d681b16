"""The models' shapes for the KV-cache estimate: `/api/show`'s `model_info`, cached.

A plan never waits for these. They are fetched in the background as soon as a
backend's inventory lists the model (a few at a time), so a model is usually known
before its first request; a plan that still finds a model unknown (just pulled)
goes without (model_size.estimate_memory then counts weights and reserve only) and asks for it here.
An entry is forgotten when the model's size in the inventory changes (pulled
anew), and a failed fetch is retried after `retry_after`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import msgspec

from harbord.model_size import parse_model_info
from harbord.schemas import ModelFacts
from harbord.upstream import Pools, UpstreamError

if TYPE_CHECKING:
    from harbord.backends import Backend

log = logging.getLogger(__name__)

SHOW_TIMEOUT = 10.0
RETRY_AFTER = 60.0
CONCURRENT_FETCHES = 4


class ShowTensor(msgspec.Struct):
    name: str = ""
    shape: list[int] = msgspec.field(default_factory=list)


class Show(msgspec.Struct):
    """The part of `/api/show`'s answer read here.

    `tensors` give the vocabulary, and which layers have attention where the answer
    (not verbose) hides the per-layer lists of a hybrid model.
    """

    model_info: dict[str, object] | None = None
    tensors: list[ShowTensor] | None = None


_show = msgspec.json.Decoder(Show)


class ModelFactsCache:
    def __init__(
        self,
        pools: Pools,
        timeout: float = SHOW_TIMEOUT,
        retry_after: float = RETRY_AFTER,
    ) -> None:
        self.pools = pools
        self.timeout = timeout
        self.retry_after = retry_after
        # What policy.plan reads (model_facts=): only models whose shape is known.
        self.facts: dict[str, ModelFacts] = {}
        # Model -> its size when fetched, facts or not (a model without the shape
        # keys is not asked again until its size changes).
        self._sizes: dict[str, int] = {}
        self._failed: dict[str, float] = {}  # model -> monotonic time of the failure
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # A model store of many models is read a few at a time, not all at once.
        self._slots: asyncio.Semaphore | None = None

    def want(self, model: str, backends: Iterable[Backend]) -> asyncio.Task[None] | None:
        """Fetch the model's facts in the background unless known or on their way.

        The fetch task (or None when nothing was started): callers need not await it.
        """
        if model in self._sizes or model in self._tasks:
            return None
        failed = self._failed.get(model)
        if failed is not None and time.monotonic() - failed < self.retry_after:
            return None
        for backend in backends:
            size = backend.models.get(model) if backend.models else None
            if size is not None and backend.health in ("up", "degraded") and not backend.cooldown:
                task = asyncio.get_running_loop().create_task(
                    self._fetch(model, backend.config.url, size), name=f"show-{model}"
                )
                self._tasks[model] = task
                task.add_done_callback(self._done)
                return task
        return None

    def _done(self, task: asyncio.Task[None]) -> None:
        for model, running in list(self._tasks.items()):
            if running is task:
                del self._tasks[model]

    async def _fetch(self, model: str, url: str, size: int) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(CONCURRENT_FETCHES)
        async with self._slots:
            await self._fetch_now(model, url, size)

    async def _fetch_now(self, model: str, url: str, size: int) -> None:
        body = msgspec.json.encode({"model": model})
        try:
            show = await self.pools.fetch_json(url, "POST", "/api/show", _show, self.timeout, body)
        except UpstreamError as err:
            self._failed[model] = time.monotonic()
            log.info("facts of %s not fetched from %s: %s", model, url, err or type(err).__name__)
            return
        self._failed.pop(model, None)
        self._sizes[model] = size
        tensors = [(t.name, t.shape) for t in show.tensors or ()]
        facts = parse_model_info(show.model_info or {}, tensors)
        if facts is None:
            log.info("%s: /api/show gave no model shape; its KV cache is not estimated", model)
            return
        self.facts[model] = facts

    def invalidate(self, models: Mapping[str, int]) -> None:
        """Forget what was fetched for a model whose size in an inventory changed."""
        for model, size in models.items():
            known = self._sizes.get(model)
            if known is not None and known != size:
                del self._sizes[model]
                self.facts.pop(model, None)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
